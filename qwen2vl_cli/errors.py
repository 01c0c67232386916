"""Exit codes, the one table that turns known exceptions into one-line messages, and how a process ends."""

from __future__ import annotations

import atexit
import contextlib
import enum
import errno
import os
import sys


class ExitStatus(enum.IntEnum):
    """The process exit codes qwen2vl documents (README, man page)."""

    SUCCESS = 0
    ERROR = 1
    USAGE = 2
    INPUT = 3
    MODEL = 4
    PARTIAL = 5
    SERVER = 6
    OUTPUT = 7
    INTERRUPTED = 130


EXIT_STATUS_MEANINGS = {
    ExitStatus.SUCCESS: "success",
    ExitStatus.ERROR: "any other error (out of memory, a bug; QWEN2VL_DEBUG=1 shows the traceback)",
    ExitStatus.USAGE: "usage error: unknown option, bad value, options that do not go together, over the context",
    ExitStatus.INPUT: "an input could not be read or decoded (missing, empty, corrupt, unreachable, too large)",
    ExitStatus.MODEL: "the model could not be loaded (no such directory, not cached while offline, no GPU)",
    ExitStatus.PARTIAL: "batch: the run finished but some items failed (each has a record with its error)",
    ExitStatus.SERVER: "a server (--server, or a running session) could not be reached, failed to answer, or refused",
    ExitStatus.OUTPUT: "the output could not be written (stdout closed or full, disk full, -o not writable)",
    ExitStatus.INTERRUPTED: "interrupted (Ctrl-C)",
}


FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # a disk or quota full: no output can be written


class Qwen2VLError(Exception):
    """Base of the errors qwen2vl raises on purpose; each carries its exit status."""

    status = ExitStatus.ERROR

    def __init__(self, subject: str, reason: str) -> None:
        super().__init__(f"{subject}: {reason}")
        self.subject = subject
        self.reason = reason


class InputError(Qwen2VLError):
    """An input (image, video, URL, stdin) could not be read or decoded."""

    status = ExitStatus.INPUT


class ModelLoadError(Qwen2VLError):
    """The model or its processor could not be loaded."""

    status = ExitStatus.MODEL


class UsageError(Qwen2VLError):
    """Options that parse but do not make sense together."""

    status = ExitStatus.USAGE


class ServerError(Qwen2VLError):
    """A qwen2vl or OpenAI-compatible server failed to answer."""

    status = ExitStatus.SERVER


class OutputError(Qwen2VLError):
    """An answer or a record could not be written (stdout closed, disk full, an unwritable -o)."""

    status = ExitStatus.OUTPUT


def debug_enabled() -> bool:
    """True when QWEN2VL_DEBUG asks for tracebacks."""
    return os.environ.get("QWEN2VL_DEBUG", "").strip() not in ("", "0", "false", "no")


def describe_exception(exc: BaseException) -> tuple[str, ExitStatus]:
    """Map any exception to (one-line message, exit status): the single error table."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", ExitStatus.INTERRUPTED
    if isinstance(exc, Qwen2VLError):
        return str(exc), exc.status
    if isinstance(exc, MemoryError):
        return "out of memory: lower --max-pixels or --max-new-tokens", ExitStatus.ERROR
    name = type(exc).__name__
    if name == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return "GPU out of memory: lower --max-pixels, --batch-size or --max-new-tokens", ExitStatus.ERROR
    if isinstance(exc, OSError) and exc.errno in FULL:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"cannot write{where}: no space left on the device", ExitStatus.OUTPUT
    if isinstance(exc, BrokenPipeError):
        return "output closed early (broken pipe)", ExitStatus.OUTPUT  # the table's "stdout closed"
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"unexpected {name}: {first_line} (QWEN2VL_DEBUG=1 shows the traceback)", ExitStatus.ERROR


@contextlib.contextmanager
def ending_promptly(program: bool = True):
    """Around a whole process's work (the CLI's main, a started session's): once it ends with an exit status, the
    process ends when the other exit handlers have run (threads joined, engines stopped between steps, temporary
    folders removed: registered later, they run first) and stdout and stderr are flushed, without the teardown of
    every module torch and transformers made: 0.2 s of an in-process one-liner on the CPU test machine, 0.4 s on
    the H100 machine. Where a flush fails (a closed pipe), the interpreter ends it as usual. Only where the work is
    the `program` itself: a test runner or another program that calls main() keeps its own exit and status."""
    if not program:
        yield
        return
    status: list[int] = []

    def end() -> None:
        if not status or "coverage" in sys.modules:  # coverage writes a measured process's data at its exit
            return
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except (OSError, ValueError):
            return
        os._exit(status[0])

    atexit.register(end)
    try:
        yield
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            status.append(exc.code or 0)
        raise
