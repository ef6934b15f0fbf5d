"""The command group of ``stimage-embed``: errors of the command line itself (an unknown
option, a value of the wrong type, a single-valued option given twice) are one line on
stderr with exit code 2, like every other bad input."""

from __future__ import annotations

import sys
from typing import Any

import typer
import typer.core
from typer import _click as click  # typer vendors its click: its exceptions and Option class


def repeated_single_options(command: click.core.Command, args: list[str]) -> list[str]:
    """Options of ``command`` that take one value but appear more than once in ``args``
    (click would silently keep the last one)."""
    singles: dict[str, str] = {}
    for param in command.params:
        is_option = getattr(param, "param_type_name", "") == "option"
        if is_option and not getattr(param, "multiple", False) and not getattr(param, "count", False):
            for decl in (*param.opts, *param.secondary_opts):
                singles[decl] = param.opts[0]
    seen: dict[str, int] = {}
    for arg in args:
        if arg == "--":
            break
        name = arg.split("=", 1)[0]
        if name in singles:
            seen[singles[name]] = seen.get(singles[name], 0) + 1
    return [name for name, n in seen.items() if n > 1]


class StimageGroup(typer.core.TyperGroup):
    """A Typer group whose usage errors are one line (``error: ...``), exit code 2."""

    def resolve_command(self, ctx: click.core.Context, args: list[str]) -> tuple[Any, Any, list[str]]:
        name, cmd, rest = super().resolve_command(ctx, args)
        if cmd is not None:
            twice = repeated_single_options(cmd, rest)
            if twice:
                raise click.exceptions.UsageError(
                    f"{', '.join(twice)} given more than once; it takes one value "
                    "(list options such as --slide accept several)",
                    ctx=ctx,
                )
        return name, cmd, rest

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: D102
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(0)
        except click.exceptions.ClickException as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) is not None else ""
            typer.echo(f"error: {' '.join(exc.format_message().split())}{where}", err=True)
            sys.exit(2 if isinstance(exc, click.exceptions.UsageError) else exc.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)
