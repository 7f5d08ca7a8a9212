"""The playground page in a real headless Chromium (Debian's `chromium`, driven by Playwright)
against a real server on the demo models: compare, library import, extraction, keys.

The compare test also takes the README's screenshot: with PLAYGROUND_SCREENSHOT=docs/playground.png
it writes it there (how docs/playground.png is made); otherwise into the test's temporary folder.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from safetensors.numpy import load

from server.demo.models import demo_model_dir
from server.demo.traits import shows_trait
from testkit.server_process import ServerProcess

pytestmark = pytest.mark.integration  # a server process (and a browser for the tests marked so)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ANSWER_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium")
    if executable is None:  # .ci/run installs it: a missing browser is a failure, not a skip
        pytest.fail("Debian's chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("playground-data")
    with ServerProcess(["--data-dir", str(data)], log_path=data / "server.log") as server:
        yield server


@pytest.fixture
def page(browser: Browser, demo_server: ServerProcess) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 760}, accept_downloads=True)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.goto(f"{demo_server.url}/")  # / leads to /playground
    expect(opened.locator("body")).to_have_attribute("data-ready", "true")
    yield opened
    context.close()
    assert not errors, errors  # no uncaught script error on the way


# Every path that serves the page or one of its files: the page itself, the page again through the
# assets folder (a second way to load it, which once came without the page's headers), a script, a
# stylesheet.
PAGE_PATHS = [
    "/playground",
    "/playground/assets/index.html",
    "/playground/assets/js/main.js",
    "/playground/assets/playground.css",
]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", PAGE_PATHS)
def test_every_path_of_the_page_carries_its_headers(
    demo_server: ServerProcess, path: str, method: str
) -> None:
    response = httpx.request(method, f"{demo_server.url}{path}")
    assert response.status_code == 200, (path, response.text)
    policy = response.headers.get("content-security-policy", "")
    assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy, (path, policy)
    assert response.headers.get("x-frame-options") == "DENY", path
    assert response.headers.get("x-content-type-options") == "nosniff", path
    assert response.headers.get("cache-control") == "no-cache", path
    if method == "HEAD":
        assert response.content == b"" and int(response.headers["content-length"]) > 0


def test_head_on_the_root_leads_to_the_page(demo_server: ServerProcess) -> None:
    response = httpx.head(f"{demo_server.url}/")
    assert (response.status_code, response.headers["location"]) == (307, "/playground")


def generate(page: Page) -> tuple[str, str]:
    page.get_by_test_id("generate").click()
    for pane in ("pane-base", "pane-steered"):
        expect(page.get_by_test_id(pane)).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
    return page.get_by_test_id("output-base").inner_text(), page.get_by_test_id("output-steered").inner_text()


def pirate_scores(page: Page) -> list[float]:
    texts = [
        page.get_by_test_id(pane).get_by_test_id("scores").inner_text()
        for pane in ("pane-base", "pane-steered")
    ]
    return [float(text.removeprefix("pirate ")) for text in texts]


@pytest.mark.browser
@pytest.mark.slow
def test_a_pirate_steered_answer_differs_from_the_unsteered_one(page: Page, tmp_path: Path) -> None:
    assert page.url.endswith("/playground")
    page.get_by_test_id("model").select_option("demo-llama")
    page.get_by_test_id("persona").select_option("pirate")
    page.get_by_test_id("monitor").check()
    base, steered = generate(page)
    assert base and steered and base != steered
    assert shows_trait(steered, "pirate") and not shows_trait(base, "pirate"), (base, steered)
    base_score, steered_score = pirate_scores(page)
    assert steered_score > base_score
    screenshot = Path(os.environ.get("PLAYGROUND_SCREENSHOT", tmp_path / "playground.png"))
    panes = page.get_by_test_id("panes").bounding_box()
    assert panes is not None
    page.screenshot(
        path=screenshot, clip={"x": 0, "y": 0, "width": 1280, "height": panes["y"] + panes["height"] + 16}
    )
    assert screenshot.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.browser
@pytest.mark.slow
def test_strength_zero_gives_the_unsteered_answer(page: Page) -> None:
    page.get_by_test_id("persona").select_option("pirate")
    page.get_by_test_id("strength").fill("0")
    expect(page.get_by_test_id("strength-value")).to_have_value("0")
    page.get_by_test_id("temperature").fill("0.8")  # sampled: the same seed in both panes
    base, steered = generate(page)
    assert base and base == steered
    page.get_by_test_id("strength").fill("2")
    assert generate(page)[1] != base  # the slider's value reaches the request


@pytest.mark.browser
@pytest.mark.slow
def test_a_pushed_persona_capped_in_the_page_answers_as_unsteered(page: Page) -> None:
    """Operators in the compare view: pirate at twice its default, then capped at the unsteered
    reading (docs/results/operators.md) in a second row of the composition."""
    page.get_by_test_id("model").select_option("demo-llama")
    page.get_by_test_id("persona").select_option("pirate")
    page.get_by_test_id("strength-value").fill("4")
    base, pushed = generate(page)
    assert shows_trait(pushed, "pirate") and not shows_trait(base, "pirate"), (base, pushed)
    page.get_by_test_id("add-persona").click()
    page.get_by_test_id("persona-2").select_option("pirate")
    page.get_by_test_id("operator-2").select_option("cap")
    expect(page.get_by_test_id("strength-2")).to_be_hidden()  # a cap has bounds, no strength
    page.get_by_test_id("cap-max-2").fill("-1.8")
    _, capped = generate(page)
    expect(page.get_by_test_id("pane-steered").locator("h3")).to_have_text(
        "pirate × 4 + cap pirate (max -1.8)"
    )
    assert not shows_trait(capped, "pirate") and capped != pushed, capped


@pytest.mark.browser
@pytest.mark.slow
def test_an_imported_vector_file_shows_in_the_library(
    page: Page, demo_server: ServerProcess, tmp_path: Path
) -> None:
    exported = httpx.get(
        f"{demo_server.url}/admin/personas/silly/export", params={"model": "demo-phi3", "format": "gguf"}
    )
    exported.raise_for_status()
    vector_file = tmp_path / "sea-dog.gguf"
    vector_file.write_bytes(exported.content)
    page.get_by_test_id("tab-library").click()
    expect(page.locator('[data-testid="library-row"][data-name="sea-dog"]')).to_have_count(0)
    import_through_the_page(page, vector_file, "sea-dog", "demo-phi3")
    row = page.locator('[data-testid="library-row"][data-name="sea-dog"][data-model="demo-phi3"]')
    expect(row).to_contain_text("imported from gguf (sea-dog.gguf)")
    page.get_by_test_id("tab-compare").click()
    page.get_by_test_id("model").select_option("demo-phi3")
    expect(page.get_by_test_id("persona").locator('option[value="sea-dog"]')).to_have_count(1)


@pytest.mark.browser
@pytest.mark.slow
def test_an_extraction_runs_to_100_percent_and_stores_the_persona(page: Page) -> None:
    page.get_by_test_id("tab-make").click()
    page.get_by_test_id("extract-name").fill("pirate-again")
    page.get_by_test_id("extract-model").select_option("demo-llama")
    page.get_by_test_id("extract-positive").fill("You are a pirate. Talk like a pirate: arr, matey!")
    page.get_by_test_id("extract-questions").fill("Tell me about the sea.\nHow do ships sail?")
    page.get_by_test_id("extract-tokens").fill("16")
    page.get_by_test_id("extract-start").click()
    expect(page.get_by_test_id("extract-stored")).to_contain_text(
        "Stored 'pirate-again' v1 on demo-llama", timeout=ANSWER_TIMEOUT_MS
    )
    expect(page.get_by_test_id("job-progress")).to_have_attribute("value", "100")
    blocks = 4  # demo-llama's decoder blocks: one bar each in the per-block report
    expect(page.get_by_test_id("extract-report").locator("rect.bar")).to_have_count(blocks)
    page.get_by_test_id("tab-library").click()
    expect(page.locator('[data-testid="library-row"][data-name="pirate-again"]')).to_contain_text("extracted")


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("keyed-data")
    args = [
        *["--model", str(demo_model_dir("demo-llama")), "--served-model-name", "demo-llama"],
        *["--api-key", "api-secret", "--admin-key", "admin-secret", "--data-dir", str(data)],
    ]
    with ServerProcess(args, log_path=data / "server.log") as server:
        persona = {"model": "demo-llama", "layers": {"1": [0.01] * 128}}
        httpx.put(
            f"{server.url}/admin/personas/steady",
            json=persona,
            headers={"Authorization": "Bearer admin-secret"},
        ).raise_for_status()
        yield server


def answer_key_dialog(page: Page, key: str) -> None:
    expect(page.get_by_test_id("key-dialog")).to_be_visible()
    page.get_by_test_id("key-input").fill(key)
    page.get_by_test_id("key-submit").click()


@pytest.mark.browser
@pytest.mark.slow
def test_keys_are_asked_once_and_admin_actions_wait_for_the_admin_key(
    browser: Browser, keyed_server: ServerProcess
) -> None:
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{keyed_server.url}/playground")
    answer_key_dialog(page, "wrong-key")
    expect(page.get_by_test_id("error")).to_contain_text("a valid API key is required")
    answer_key_dialog(page, "api-secret")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(page.get_by_test_id("model").locator("option")).to_have_text(["demo-llama"])
    expect(page.get_by_test_id("tab-make")).to_be_hidden()  # no admin key yet
    expect(page.get_by_test_id("admin-state")).to_have_text("admin: key needed")
    page.get_by_test_id("admin-key-button").click()
    answer_key_dialog(page, "admin-secret")
    expect(page.get_by_test_id("tab-make")).to_be_visible()  # after the reload, with the key kept
    expect(page.get_by_test_id("key-dialog")).to_be_hidden()  # the API key was kept too
    page.get_by_test_id("tab-library").click()
    expect(page.get_by_test_id("library-row").first.get_by_test_id("delete")).to_be_visible()
    context.close()
    fresh = browser.new_context()  # another browser session keeps no key
    fresh_page = fresh.new_page()
    fresh_page.goto(f"{keyed_server.url}/playground")
    expect(fresh_page.get_by_test_id("key-dialog")).to_be_visible()
    fresh.close()


def import_through_the_page(page: Page, vector_file: Path, name: str, model: str, strength: str = "") -> None:
    page.get_by_test_id("import-file").set_input_files(vector_file)
    page.get_by_test_id("import-name").fill(name)
    page.get_by_test_id("import-model").select_option(model)
    page.get_by_test_id("import-strength").fill(strength)  # empty: the file's or the default strength
    page.get_by_test_id("import-submit").click()


@pytest.mark.browser
@pytest.mark.slow
def test_versions_restore_export_and_delete_in_the_library(
    page: Page, demo_server: ServerProcess, tmp_path: Path
) -> None:
    exported = httpx.get(
        f"{demo_server.url}/admin/personas/pirate/export",
        params={"model": "demo-llama", "format": "safetensors"},
    )
    vector_file = tmp_path / "old-salt.safetensors"
    vector_file.write_bytes(exported.content)
    page.get_by_test_id("tab-library").click()
    row = page.locator('[data-testid="library-row"][data-name="old-salt"]')
    import_through_the_page(page, vector_file, "old-salt", "demo-llama", "2")
    expect(row.locator("td").nth(2)).to_have_text("1")
    import_through_the_page(page, vector_file, "old-salt", "demo-llama", "3")
    expect(row.locator("td").nth(2)).to_have_text("2")
    row.get_by_test_id("versions-button").click()
    expect(page.get_by_test_id("versions").locator("li")).to_have_count(2)
    page.get_by_test_id("versions").get_by_test_id("restore").click()  # the one not current: v1
    expect(row.locator("td").nth(2)).to_have_text("3")
    expect(row.locator("td").nth(4)).to_have_text("2")  # v1's default strength is back
    expect(row).to_contain_text("restored from v1")
    with page.expect_download() as download:
        row.get_by_test_id("export-safetensors").click()
    assert download.value.suggested_filename == "old-salt-demo-llama.safetensors"
    saved, original = load(Path(download.value.path()).read_bytes()), load(exported.content)
    assert saved.keys() == original.keys() and all((saved[k] == original[k]).all() for k in saved)
    row.get_by_test_id("delete").click()
    expect(row.get_by_test_id("delete")).to_have_text("Really delete?")
    row.get_by_test_id("delete").click()
    expect(row).to_have_count(0)


@pytest.mark.browser
@pytest.mark.slow
def test_a_fit_then_a_mapped_persona_is_compared_with_the_native_one_on_the_target(page: Page) -> None:
    page.get_by_test_id("tab-make").click()
    page.get_by_test_id("fit-source").select_option("demo-llama")
    page.get_by_test_id("fit-target").select_option("demo-qwen")
    page.get_by_test_id("fit-start").click()
    expect(page.get_by_test_id("fit-diagnostics")).to_be_visible(timeout=ANSWER_TIMEOUT_MS)
    expect(page.get_by_test_id("fit-progress")).to_have_attribute("value", "100")
    assert page.get_by_test_id("fit-diagnostics").evaluate("image => image.naturalWidth") > 0  # a real PNG
    page.get_by_test_id("map-persona").select_option("pirate")
    page.get_by_test_id("map-start").click()
    stored = "stored 'pirate-from-demo-llama' v1 on demo-qwen"
    expect(page.get_by_test_id("map-status")).to_contain_text(stored, timeout=ANSWER_TIMEOUT_MS)
    expect(page.get_by_test_id("map-progress")).to_have_attribute("value", "100")  # a job, followed
    expect(page.get_by_test_id("map-cancel")).to_be_disabled()
    panes = {name: page.get_by_test_id(f"pane-map-{name}") for name in ("base", "native", "mapped")}
    for pane in panes.values():
        expect(pane).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
    answers = {name: page.get_by_test_id(f"output-map-{name}").inner_text() for name in panes}
    assert shows_trait(answers["mapped"], "pirate") and not shows_trait(answers["base"], "pirate"), answers
    page.get_by_test_id("tab-library").click()
    mapped = page.locator('[data-testid="library-row"][data-name="pirate-from-demo-llama"]')
    expect(mapped).to_contain_text("mapped from 'pirate' on demo-llama (generated, scale")
    mapped.get_by_test_id("calibration-button").click()
    plot = page.get_by_test_id("calibration").locator("img")
    expect(plot).to_be_visible()
    page.wait_for_function("image => image.complete && image.naturalWidth > 0", arg=plot.element_handle())


@pytest.mark.browser
@pytest.mark.slow
def test_a_map_can_be_cancelled_and_stores_nothing(page: Page, demo_server: ServerProcess) -> None:
    page.get_by_test_id("tab-make").click()
    page.get_by_test_id("fit-source").select_option("demo-qwen")
    page.get_by_test_id("fit-target").select_option("demo-llama")
    page.get_by_test_id("map-persona").select_option("silly")
    page.get_by_test_id("map-name").fill("silly-cancelled")
    page.get_by_test_id("map-start").click()
    expect(page.get_by_test_id("map-status")).to_contain_text("running", timeout=ANSWER_TIMEOUT_MS)
    page.get_by_test_id("map-cancel").click()
    expect(page.locator("#error")).to_contain_text("the map job was cancelled", timeout=ANSWER_TIMEOUT_MS)
    expect(page.get_by_test_id("map-start")).to_be_enabled()
    stored = httpx.get(f"{demo_server.url}/admin/personas/silly-cancelled", params={"model": "demo-llama"})
    assert stored.status_code == 404, stored.text


@pytest.mark.browser
@pytest.mark.slow
def test_a_bake_runs_to_100_percent_and_its_model_answers_beside_the_steered_one(page: Page) -> None:
    page.get_by_test_id("tab-make").click()
    page.get_by_test_id("bake-model").select_option("demo-llama")
    page.get_by_test_id("bake-persona").select_option("pirate")
    page.get_by_test_id("bake-trajectories").fill("16")
    page.get_by_test_id("bake-steps").fill("10")
    page.get_by_test_id("bake-start").click()
    expect(page.get_by_test_id("bake-status")).to_contain_text("serving 'demo-llama+pirate'", timeout=180_000)
    expect(page.get_by_test_id("bake-progress")).to_have_attribute("value", "100")
    for pane in ("pane-bake-steered", "pane-bake-baked"):
        expect(page.get_by_test_id(pane)).to_have_attribute("data-state", "done", timeout=ANSWER_TIMEOUT_MS)
    assert page.get_by_test_id("output-bake-baked").inner_text()
    expect(page.get_by_test_id("model").locator('option[value="demo-llama+pirate"]')).to_have_count(1)
