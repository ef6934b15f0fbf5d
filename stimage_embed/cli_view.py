"""``stimage-embed view``: serve the local web viewer (:mod:`stimage_embed.viewer`).

Listens on loopback (127.0.0.1) by default. Any other ``--host`` is refused unless
``--allow-remote`` is given, and then a warning is printed: the viewer has no login, and
anyone who can reach the port can read the store's slides and predictions.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from pathlib import Path
from typing import Annotated

import typer

from stimage_embed.cli_helpers import StoreOpt, cli_errors
from stimage_embed.errors import InputError

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InputError(None, "--host/--port", f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(128)
    return sock


def view(
    store: StoreOpt = Path("store"),
    host: Annotated[str, typer.Option(help="Address to listen on (loopback unless --allow-remote).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).")] = 8765,
    allow_remote: Annotated[
        bool,
        typer.Option(
            "--allow-remote",
            help="Allow a --host other than loopback (no login: anyone reaching the port reads the store).",
        ),
    ] = False,
) -> None:
    """Start the web viewer of the store's slides and predictions and print its URL."""
    import uvicorn

    from stimage_embed.store import Store
    from stimage_embed.viewer.app import create_app

    if not is_loopback(host) and not allow_remote:
        raise InputError(None, "--host", f"{host} is not loopback; add --allow-remote to serve beyond this machine")
    if not 0 <= port <= 65535:
        raise InputError(None, "--port", f"expected 0-65535, got {port}")
    st = Store(store)
    if not st.exists():
        raise InputError(st.path, "--store", "no store here (run `stimage-embed ingest` first)")
    if not is_loopback(host):
        typer.echo(
            f"warning: listening on {host}, beyond this machine: the viewer has no login, anyone who can reach "
            "the port can read the store's slides and predictions",
            err=True,
        )
    sock = bind(host, port)
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"stimage-embed viewer of {st.path}: http://{shown}:{actual}/  (Ctrl-C to stop)", err=False)
    config = uvicorn.Config(create_app(st), log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


def register(app: typer.Typer) -> None:
    """Add the ``view`` verb to the CLI."""
    app.command(name="view")(cli_errors(view))
