"""Rendering: the answer streams through Rich on a terminal, as plain text when piped, or as one JSON
object; diagnostics (spinner, notes, errors) always go to stderr."""

from __future__ import annotations

import contextlib
import json
import re
import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, TextIO

from .types import Completion, TextDelta

# control characters (C0 but tab and newline, DEL, C1): in a model's answer or a file name, ESC sequences would
# reach the terminal and move the cursor, hide text, retitle the window or write the clipboard (OSC 52)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str, lines: bool = True) -> str:
    """`text` as a terminal may be given it: each control character shown as its escape (`\\x1b`); with
    `lines` False a newline too (a diagnostic is one line, whatever a file name holds)."""
    text = _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)
    return text if lines else text.replace("\n", "\\n")


@dataclass
class Environment:
    """The streams a command talks to and whether they are terminals (tests swap it)."""

    stdout: TextIO
    stderr: TextIO
    stdout_isatty: bool
    stderr_isatty: bool
    quiet: bool = False

    @classmethod
    def from_system(cls, quiet: bool = False) -> "Environment":
        return cls(sys.stdout, sys.stderr, _isatty(sys.stdout), _isatty(sys.stderr), quiet)

    def console(self, stderr: bool = False):
        from rich.console import Console

        return Console(file=self.stderr if stderr else self.stdout, highlight=False,
                       force_terminal=self.stderr_isatty if stderr else self.stdout_isatty)

    def note(self, message: str) -> None:
        """A diagnostic line on stderr, unless --quiet."""
        if not self.quiet:
            print(f"qwen2vl: {printable(message, lines=False)}", file=self.stderr, flush=True)

    @contextlib.contextmanager
    def status(self, message: str) -> Iterator[None]:
        """A spinner on stderr while something slow runs (terminals only)."""
        if self.quiet or not self.stderr_isatty:
            yield
            return
        with self.console(stderr=True).status(message, spinner="dots"):
            yield


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def error(message: str, stream: TextIO | None = None) -> None:
    """The one-line error format: `qwen2vl: error: <input>: <reason>`."""
    print(f"qwen2vl: error: {printable(message, lines=False)}", file=stream or sys.stderr, flush=True)


def json_line(record: dict) -> str:
    """One JSON object and a newline: UTF-8 text as it is, but a lone surrogate (a file name that is not UTF-8, as
    Python names it) as the \\u escape ensure_ascii would write, so that the line is valid JSON on any stream and
    reads back to the same name."""
    return json.dumps(record, ensure_ascii=False).encode("utf-8", "backslashreplace").decode("utf-8") + "\n"


@dataclass
class OutputOptions:
    json: bool = False
    stream: bool = True


def render_answer(events: Iterable[TextDelta | Completion], env: Environment, output: OutputOptions,
                  record: dict) -> Completion:
    """Print an answer as it streams; `record` holds the JSON fields besides text, usage and timings."""
    if output.json:
        completion = _last(events)
        env.stdout.write(json_line(answer_record(completion, record)))
    elif env.stdout_isatty:
        completion = _render_rich(events, env, output.stream)
    else:
        completion = _render_plain(events, env, output.stream)
    env.stdout.flush()
    return completion


def answer_record(completion: Completion, record: dict) -> dict:
    """The --json object: text first, then sources, prompt, model, usage and timings."""
    timings = dict(record.pop("timings", {}))
    timings.update(first_token_s=_round(completion.first_token_s), total_s=_round(completion.total_s))
    return {
        "text": completion.text,
        **record,
        "finish_reason": completion.finish_reason,
        "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens},
        "timings": timings,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _last(events: Iterable[TextDelta | Completion]) -> Completion:
    completion = None
    for event in events:
        if isinstance(event, Completion):
            completion = event
    assert completion is not None, "a stream always ends with a Completion"
    return completion


def _render_plain(events, env: Environment, stream: bool) -> Completion:
    completion = None
    for event in events:
        if isinstance(event, Completion):
            completion = event
        elif stream:
            env.stdout.write(event.text)
            env.stdout.flush()
    if not stream:
        env.stdout.write(completion.text)
    env.stdout.write("\n")
    return completion


def _render_rich(events, env: Environment, stream: bool) -> Completion:
    from rich.live import Live
    from rich.markdown import Markdown

    console = env.console()
    if not stream:
        completion = _last(events)
        console.print(Markdown(printable(completion.text)))
        return completion
    text, completion = "", None
    with Live(Markdown(""), console=console, refresh_per_second=12, vertical_overflow="visible") as live:
        for event in events:
            if isinstance(event, Completion):
                completion = event
                live.update(Markdown(printable(completion.text)))
            else:
                text += event.text
                live.update(Markdown(printable(text)))
    return completion
