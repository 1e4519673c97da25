"""The typer app behind ``soctune``: parses, builds objects from the registries, calls the
library, renders with rich. No maths lives here."""

from __future__ import annotations

import os
import sys
from enum import Enum

import typer
from rich.console import Console
from rich.table import Table

from soctune.registry import SoctuneError

try:  # typer ≥ 0.25 vendors click
    from typer._click import exceptions as _click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as _click_exceptions  # type: ignore[no-redef]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fine-tune diffusion and flow-matching models on a reward, as stochastic optimal control.")
console = Console()
err_console = Console(stderr=True)


class ListWhat(str, Enum):
    processes = "processes"
    solvers = "solvers"
    rewards = "rewards"


def _rows(what: ListWhat) -> list[tuple[str, str]]:
    if what is ListWhat.processes:
        from soctune.sde import list_processes

        return list_processes()
    if what is ListWhat.solvers:
        from soctune.solvers import list_solvers

        return list_solvers()
    from soctune.rewards import list_rewards

    return list_rewards()


@app.callback()
def _root() -> None:
    """soctune: every fine-tuning method on every sampler, with numbers you can trust."""


@app.command("list")
def list_cmd(what: ListWhat = typer.Argument(None, help="processes, solvers or rewards (default: all three)")) -> None:
    """List the registered processes, solvers and rewards with one-line descriptions."""
    for w in [what] if what is not None else list(ListWhat):
        table = Table(title=w.value, title_justify="left")
        table.add_column("name", style="bold cyan", no_wrap=True)
        table.add_column("description")
        for name, desc in _rows(w):
            table.add_row(name, desc)
        console.print(table)


def main() -> None:
    """Console-script entry point: user mistakes end with one line and exit code 2; the full
    traceback only with SOCTUNE_DEBUG=1 or ``--debug``."""
    debug = os.environ.get("SOCTUNE_DEBUG") == "1" or "--debug" in sys.argv
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    try:
        app(standalone_mode=False)
    except SoctuneError as exc:
        if debug:
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("aborted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except _click_exceptions.NoArgsIsHelpError:  # help was already printed
        sys.exit(0)
    except _click_exceptions.ClickException as exc:  # usage errors: one line, no box
        if debug:
            raise
        hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) is not None else ""
        msg = " ".join(exc.format_message().split())
        err_console.print(f"[bold red]error:[/] {msg}{hint}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
