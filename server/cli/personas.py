"""`persona-server personas ...`: operator commands against a running server's admin API.

They speak HTTP rather than opening the store, so they work the same against one local server, a
remote one, or replicas sharing Redis, and every file is checked against the served model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer

app = typer.Typer(help="Upload, import, export, list and restore persona vectors on a running server.")

ServerUrl = Annotated[str, typer.Option("--url", envvar="PERSONA_SERVER_URL", help="Base URL of the server.")]
AdminKey = Annotated[
    str | None,
    typer.Option("--admin-key", envvar="PERSONA_SERVER_ADMIN_KEY", help="The server's admin key."),
]
Model = Annotated[str, typer.Option(help="Served model id the persona is for.")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _client(url: str, admin_key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=120)


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _checked(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    _fail(f"{response.status_code}: {message}")


def _send(url: str, admin_key: str | None, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        with _client(url, admin_key) as client:
            return _checked(client.request(method, path, **kwargs))
    except httpx.TransportError as exc:
        _fail(f"cannot reach {url}: {exc}")


def _echo_json(body: Any) -> None:
    typer.echo(json.dumps(body, indent=2))


def _if_match(version: int | None) -> dict[str, str]:
    return {} if version is None else {"If-Match": str(version)}


@app.command("list")
def list_personas(
    model: Annotated[str | None, typer.Option(help="Only this model's personas.")] = None,
    url: ServerUrl = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """List stored personas (name, model, version, blocks)."""
    params = {} if model is None else {"model": model}
    for info in _send(url, admin_key, "GET", "/admin/personas", params=params).json()["data"]:
        layers = ",".join(str(layer) for layer in info["layers"])
        typer.echo(f"{info['name']}\t{info['model']}\tv{info['version']}\tblocks {layers}")


@app.command("import")
def import_persona(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The vector file.")],
    name: Annotated[str, typer.Option(help="Persona name to store it under.")],
    model: Model,
    file_format: Annotated[
        str | None, typer.Option("--format", help="safetensors | gguf | pt (default: from the name).")
    ] = None,
    layers: Annotated[str | None, typer.Option(help="Blocks to import, e.g. 12,16 (needed for .pt).")] = None,
    default_strength: Annotated[float | None, typer.Option(help="Stored default strength.")] = None,
    default_positions: Annotated[str | None, typer.Option(help="all | prompt | response")] = None,
    description: Annotated[str | None, typer.Option(help="Free text.")] = None,
    if_match: Annotated[int | None, typer.Option(help="Only replace this version.")] = None,
    url: ServerUrl = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Import a safetensors, GGUF control vector or persona_vectors .pt file as a persona."""
    fields = {
        "model": model,
        "format": file_format,
        "layers": layers,
        "default_strength": default_strength,
        "default_positions": default_positions,
        "description": description,
    }
    form = {key: str(value) for key, value in fields.items() if value is not None}
    response = _send(
        url,
        admin_key,
        "POST",
        f"/admin/personas/{name}/import",
        files={"file": (file.name, file.read_bytes())},
        data=form,
        headers=_if_match(if_match),
    )
    _echo_stored(response.json())


def _echo_stored(info: dict[str, Any]) -> None:
    where = f"{info['name']} for {info['model']}"
    typer.echo(f"stored {where}: version {info['version']}, blocks {info['layers']}")


@app.command("upload")
def upload_persona(
    body: Annotated[
        Path,
        typer.Argument(exists=True, dir_okay=False, help="JSON body, as written by `extract --output`."),
    ],
    name: Annotated[str, typer.Option(help="Persona name to store it under.")],
    if_match: Annotated[int | None, typer.Option(help="Only replace this version.")] = None,
    url: ServerUrl = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Upload a persona from a JSON body {model, layers: {block: [floats]}, default_strength, ...}."""
    try:
        payload = json.loads(body.read_text())
    except ValueError as exc:
        _fail(f"{body} is not JSON: {exc}")
    payload.pop("report", None)  # `extract --output` adds its report, which is not part of an upload
    path = f"/admin/personas/{name}"
    response = _send(url, admin_key, "PUT", path, json=payload, headers=_if_match(if_match))
    _echo_stored(response.json())


@app.command("export")
def export_persona(
    name: Annotated[str, typer.Argument(help="Persona name.")],
    model: Model,
    file_format: Annotated[str, typer.Option("--format", help="safetensors | gguf | pt")] = "safetensors",
    version: Annotated[int | None, typer.Option(help="A kept version (default: the current one).")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File or folder to write.")] = None,
    url: ServerUrl = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Export a persona as a file (GGUF: loadable by llama.cpp's --control-vector)."""
    params: dict[str, Any] = {"model": model, "format": file_format}
    if version is not None:
        params["version"] = version
    response = _send(url, admin_key, "GET", f"/admin/personas/{name}/export", params=params)
    filename = response.headers.get("content-disposition", "").partition("filename=")[2].strip('"')
    target = output or Path(filename or f"{name}.{file_format}")
    if target.is_dir():
        target = target / (filename or f"{name}.{file_format}")
    target.write_bytes(response.content)
    typer.echo(f"wrote {target} ({len(response.content)} bytes)")


@app.command("versions")
def list_versions(
    name: Annotated[str, typer.Argument(help="Persona name.")],
    model: Model,
    url: ServerUrl = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """List the kept versions of a persona, newest first."""
    data = _send(url, admin_key, "GET", f"/admin/personas/{name}/versions", params={"model": model}).json()
    for info in data["data"]:
        kind = info["provenance"].get("kind", "?")
        typer.echo(f"v{info['version']}\t{kind}\tblocks {info['layers']}\t{info['checksum'][:12]}")


@app.command("restore")
def restore_persona(
    name: Annotated[str, typer.Argument(help="Persona name.")],
    model: Model,
    version: Annotated[int, typer.Option(help="The kept version to make current again.")],
    if_match: Annotated[int | None, typer.Option(help="Only if the current version is this one.")] = None,
    url: ServerUrl = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Make an old version current again (as a new version)."""
    body = {"model": model, "version": version}
    response = _send(
        url, admin_key, "POST", f"/admin/personas/{name}/restore", json=body, headers=_if_match(if_match)
    )
    info = response.json()
    typer.echo(f"restored {name} v{version} as version {info['version']}")


@app.command("delete")
def delete_persona(
    name: Annotated[str, typer.Argument(help="Persona name.")],
    model: Model,
    if_match: Annotated[int | None, typer.Option(help="Only if the current version is this one.")] = None,
    url: ServerUrl = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Delete a persona (its kept versions stay restorable)."""
    _send(
        url,
        admin_key,
        "DELETE",
        f"/admin/personas/{name}",
        params={"model": model},
        headers=_if_match(if_match),
    )
    typer.echo(f"deleted {name} for {model}")
