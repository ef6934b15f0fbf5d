"""The ``stimage-embed`` command line: ingest -> embed -> train/predict -> compare.

Every verb has ``--help``. Errors from bad input are printed as one clear line naming
the file and field, with exit code 2. The verbs live in ``cli_<topic>`` modules, each with
a ``register(app)``; shared options, option parsing and printing are in
:mod:`stimage_embed.cli_helpers`, checks run before a store is touched in
:mod:`stimage_embed.cli_checks`.

One option convention for every verb: list options are repeatable and each value may be a
comma list (``--slide A --slide B,C``); their plural spelling is an alias (``--slides``,
``--backbones``, ``--heads``); a single-valued option given twice is an error.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from stimage_embed import (
    __version__,
    cli_compare,
    cli_downstream,
    cli_embed,
    cli_explain,
    cli_labels,
    cli_models,
    cli_search,
    cli_store,
    cli_view,
)
from stimage_embed.cli_group import StimageGroup

app = typer.Typer(
    name="stimage-embed",
    cls=StimageGroup,
    help="Embed H&E spot tiles once, cache them in LanceDB, train expression heads, compare backbones with SQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # plain help: wraps at any width instead of truncating in boxes
    context_settings={"max_content_width": 100},
)
log = logging.getLogger("stimage_embed")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"stimage-embed {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    """stimage-embed: predict spatial gene expression from H&E via cached foundation-model embeddings."""
    from stimage_embed.cli_helpers import configure_logging

    configure_logging(verbose)


cli_store.register(app)
cli_embed.register(app)
cli_models.register(app)
cli_compare.register(app)
cli_search.register(app)  # index, search
cli_view.register(app)  # view
cli_explain.register(app)  # explain, cluster
cli_downstream.register(app)  # clinical add, survival, response
cli_labels.register(app)  # labels add, labels compare

from stimage_embed.cli_labels import register as register_labels  # noqa: E402

register_labels(app)

if __name__ == "__main__":
    app()
