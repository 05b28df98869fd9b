"""What the commands print through: a console that survives its reader leaving, help screens
without noise, and aiokafka's routine start-up errors kept off the screen.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from typing import Annotated, Any

import typer
from aiokafka import errors as kafka_errors
from rich.console import Console
from typer.core import TyperArgument, TyperCommand, TyperGroup


class TerminalConsole(Console):
    """A console whose reader may go away (`make run | tee run.log`, then Ctrl-C, which
    ends tee first). Rich's answer to a broken pipe is SystemExit, raised from wherever the
    print was: inside the signal handler it undid the stop, inside the reporter it ended
    the run without draining. This console goes quiet instead, so printing never decides
    whether or how the pipeline stops."""

    gone = False

    def on_broken_pipe(self) -> None:
        self.quiet = True
        self.gone = True
        # Later writes to the descriptor (a log line, the interpreter's flush at exit) must
        # not raise either.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.file.fileno())
            os.close(devnull)


# aiokafka logs these as ERROR while it waits for a group coordinator: routine on a new
# broker (it is creating __consumer_offsets) and while a coordinator moves; it retries
# by itself, and the run goes on.
_COORDINATOR_WAITS = (
    kafka_errors.GroupCoordinatorNotAvailableError,
    kafka_errors.NotCoordinatorForGroupError,
    kafka_errors.GroupLoadInProgressError,
)


class RoutineKafkaErrors(logging.Filter):
    """Drops (or, verbose, shows as DEBUG) aiokafka's ERROR records about waiting for a
    group coordinator."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka") or record.levelno < logging.WARNING:
            return True
        args = record.args if isinstance(record.args, tuple) else ()
        if not any(isinstance(a, _COORDINATOR_WAITS) for a in args):
            return True
        if not self.verbose:
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


# The `--verbose` flag every long-running command takes.
Verbose = Annotated[
    bool,
    typer.Option("--verbose", "-v", help="Also print debug logs, the Kafka client's included."),
]


class _PlainHelp:
    """Help screens as the click convention writes them: a flag (`--help`, `--verbose`)
    shows no `<bool>` type, and an argument is named EVENT_ID in the usage line, not
    {event_id} (Typer 0.29's defaults)."""

    def get_params(self, ctx: Any) -> list[Any]:
        params: list[Any] = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces: list[str] = super().collect_usage_pieces(ctx)  # type: ignore[misc]
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                typer_name = param._usage_display_name()
                name = param.display_name_raw.upper() + ("..." if param.nargs != 1 else "")
                plain = name if param.required else f"[{name}]"
                pieces = [plain if p == typer_name else p for p in pieces]
        return pieces


class PlainCommand(_PlainHelp, TyperCommand):
    pass


class PlainGroup(_PlainHelp, TyperGroup):
    pass


class Commands(typer.Typer):
    """A command group whose commands and subgroups print plain help screens."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", PlainGroup)
        super().__init__(**kwargs)

    def command(
        self, name: str | None = None, *, cls: type[TyperCommand] | None = None, **kwargs: Any
    ) -> Callable[[Any], Any]:
        return super().command(name, cls=cls or PlainCommand, **kwargs)
