"""The playground's files as shipped: the controls tests drive, the ids the scripts need, nothing
fetched from elsewhere (the browser tests are in test_playground.py)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from server.api.routes.playground import ASSETS_PATH, PLAYGROUND_DIR

# The controls a browser test may drive (issue: stable data-testid attributes).
REQUIRED_TEST_IDS = {
    "prompt", "model", "persona", "strength", "generate", "output-base", "output-steered", "scores",
    "library-row", "import-file", "extract-start", "job-progress",
}  # fmt: skip


class _Attributes(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.test_ids: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name == "id" and value:
                self.ids.add(value)
            elif name == "data-testid" and value:
                self.test_ids.add(value)
            elif name in ("src", "href") and value:
                self.links.append(value)


def _page() -> _Attributes:
    parsed = _Attributes()
    parsed.feed((PLAYGROUND_DIR / "index.html").read_text(encoding="utf-8"))
    return parsed


def _scripts() -> dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8") for path in (PLAYGROUND_DIR / "js").glob("*.js")}


def test_every_required_test_id_is_on_the_page_or_made_by_a_script() -> None:
    scripts = "\n".join(_scripts().values())
    made = set(re.findall(r'"data-testid":\s*[`"]([a-z-]+)', scripts))
    # The panes' outputs are named output-${id}; their ids are written where the panes are made.
    made |= {f"output-{pane_id}" for pane_id in re.findall(r'id:\s*"([a-z-]+)"', scripts)}
    missing = REQUIRED_TEST_IDS - _page().test_ids - made
    assert not missing, missing


def test_every_element_the_scripts_look_up_is_on_the_page() -> None:
    looked_up = {
        name for text in _scripts().values() for name in re.findall(r'\$\("([A-Za-z0-9-]+)"\)', text)
    }
    assert looked_up, "the scripts look elements up with $(id)"
    assert looked_up <= _page().ids, looked_up - _page().ids


def test_the_page_loads_only_its_own_files() -> None:
    links = _page().links
    assert all(link.startswith((ASSETS_PATH + "/", "data:")) for link in links), links
    for link in links:
        if link.startswith(ASSETS_PATH):
            assert (PLAYGROUND_DIR / link.removeprefix(ASSETS_PATH + "/")).is_file(), link
    scripts = _scripts()
    for name, text in scripts.items():
        assert not re.search(r"https?://", text.replace("http://www.w3.org/2000/svg", "")), name
        for imported in re.findall(r'from "\./([a-z]+\.js)"', text):
            assert imported in scripts, f"{name} imports {imported}"
