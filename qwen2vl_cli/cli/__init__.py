"""The Typer app: registers the commands and turns every failure into one line and an exit code."""

from __future__ import annotations

import importlib
import os
import sys
import traceback

import typer
from typer.core import TyperGroup

try:  # typer >= 0.26 vendors click
    from typer._click.exceptions import ClickException as CliUsageError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException as CliUsageError

from .. import __version__
from ..errors import ExitStatus, OutputError, debug_enabled, describe_exception, ending_promptly
from ..render import error


class Qwen2VLGroup(TyperGroup):
    """Catches what a command raises, once: one line on stderr, the documented exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.BadParameter, CliUsageError):
            raise
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - this is the one error boundary
            if debug_enabled():
                traceback.print_exc()
            message, status = describe_exception(exc)
            error(message)
            raise typer.Exit(int(status)) from None


def _version(value: bool) -> None:
    if value:
        print(f"qwen2vl {__version__}")
        raise typer.Exit()


def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Qwen2-VL in the shell: describe images, ask about them, caption folders.

    Exit codes: 0 success, 1 other error, 2 usage error, 3 an input could not be read or decoded,
    4 the model could not be loaded, 5 a batch finished with failed items, 6 a server failed to
    answer, 7 the output could not be written, 130 interrupted.
    """


# each command's module (cli/chat.py, cli/batch.py, cli/serve.py): the function there has the command's name
COMMANDS = {"describe": "chat", "ask": "chat", "video": "chat", "batch": "batch", "serve": "serve", "ps": "serve",
            "stop": "serve"}


def make_app(only: str | None = None) -> typer.Typer:
    """The app with every command, or with `only` that one (what a process that runs it needs: typer reads every
    registered command's signature before it parses a word, ~30-60 ms of each one-liner for the six it does not run,
    and the modules of the others, ~15 ms more)."""
    made = typer.Typer(
        name="qwen2vl",
        cls=Qwen2VLGroup,
        help="Qwen2-VL in the shell: describe images, ask about them, caption folders.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
        add_completion=True,
    )
    made.callback()(root)
    for name, module in COMMANDS.items():
        if only in (None, name):
            made.command(name)(getattr(importlib.import_module(f"{__name__}.{module}"), name))
    return made


def __getattr__(name: str):
    """`app`, the whole app, built on first use (a process that runs one command builds only that: main)."""
    if name == "app":
        globals()["app"] = made = make_app()
        return made
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def invoked(words: list[str]) -> str | None:
    """The command a command line runs when it names one first (`qwen2vl describe ...`); None for anything else (no
    command, a misspelt one, the root's options, shell completion), which the whole app answers."""
    if words and words[0] in COMMANDS and not os.environ.get("_QWEN2VL_COMPLETE"):
        return words[0]
    return None


class _ClosedOutput:
    """Stands in for a stdout the shell closed (`>&-`): writing to it is an output error, not a crash."""

    def write(self, text: str) -> int:
        raise OutputError("stdout", "closed")

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def main() -> None:
    """Console-script entry point."""
    # httpx imports its own command-line client (click, pygments, rich: ~45 ms) on import when those are
    # installed; nothing here runs it, and a None in sys.modules makes that import fail as httpx expects
    sys.modules.setdefault("httpx._main", None)
    if sys.stderr is None:  # `2>&-`: diagnostics go nowhere rather than onto stdout
        sys.stderr = open(os.devnull, "w")
    if sys.stdout is None:
        sys.stdout = _ClosedOutput()
    # the process ends promptly only where main() is the program (a console script's or `python -m`'s __main__),
    # not where a test or another program calls it and goes on
    with ending_promptly(program=sys._getframe(1).f_globals.get("__name__") == "__main__"):
        try:
            command = invoked(sys.argv[1:])
            make_app(command)(prog_name="qwen2vl")
        except KeyboardInterrupt:
            error("interrupted")
            sys.exit(ExitStatus.INTERRUPTED)
