"""A submitted request (Ticket) and its answer as the tokens come (Answer): the engine's per-request
bookkeeping, and the two adapters that let transformers' `generate` feed Answers (Feed, AnswersDone)."""

from __future__ import annotations

import threading
import time
from typing import Callable

from ..types import ChatRequest, Completion, TextDelta, held_back, stop_at


class Ticket:
    """One submitted request. `emit` gets TextDelta pieces (when streamed), then a Completion, or an exception;
    it is called on the engine's thread. `cancel()` stops it: its row is free at the next step."""

    def __init__(self, request: ChatRequest, emit: Callable, stream: bool, prepared=None) -> None:
        self.request, self.emit, self.stream, self.prepared = request, emit, stream, prepared
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.answer: Answer | None = None
        self.fast: bool | None = None  # decided by the engine: continuous batch or `generate`
        self.row: int | None = None
        self.prepared_at: float | None = None  # when its tensors were ready, and when its prefill started
        self.prefill_started: float | None = None  # (the phases the engine reports)
        self.passed = 0  # streamed requests that went ahead of it while it waited (scheduler.PASSES at most)
        self.closed = threading.Event()  # the engine is done with it (answered, failed or cancelled)

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def done(self) -> bool:
        return self.closed.is_set()

    @property
    def prompt_tokens(self) -> int:
        return int(self.prepared["attention_mask"].sum())

    @property
    def span(self) -> int:
        """Cache positions the answer can take: the prompt and every new token."""
        return self.prepared["input_ids"].shape[1] + self.request.generation.max_new_tokens


class Answer:
    """A ticket's tokens as they come: text pieces for a stream (held back where a stop string may begin), and
    whether it is done (an end token, its max tokens, a stop string)."""

    def __init__(self, session, ticket: Ticket) -> None:
        self.session, self.ticket = session, ticket
        self.options = ticket.request.generation
        self.ids: list[int] = []
        self.done = False
        self.first_token_s: float | None = None
        self.watch = ticket.stream or bool(self.options.stop)  # decode as it goes (else once, at the end)
        self.prefix = self.read = 0  # incremental decoding: text of ids[prefix:read] is already out
        self.held = ""  # decoded, not shown yet: it could be the start of a stop string

    def add(self, token: int) -> bool:
        """Take the next token; True once the answer is done."""
        if self.done:
            return True
        if not self.ids:
            self.first_token_s = time.perf_counter() - self.ticket.submitted
        self.ids.append(token)
        if token in self.session.eos_ids:
            self.done = True
        elif self.watch:
            self.held += self._new_text()
            cut = stop_at(self.held, self.options.stop) if self.options.stop else None
            if cut is not None:
                self.held, self.done = self.held[:cut], True
            elif self.ticket.stream:
                keep = held_back(self.held, self.options.stop) if self.options.stop else 0
                if len(self.held) > keep:
                    self.ticket.emit(TextDelta(self.held[:len(self.held) - keep]))
                    self.held = self.held[len(self.held) - keep:]
        if len(self.ids) >= self.options.max_new_tokens:
            self.done = True
        return self.done

    def _new_text(self) -> str:
        """The text the newest tokens add (none while they end inside a character or in stray bytes). Whether the
        text ends in U+FFFD shows in its last 4 bytes, so in its last 4 tokens: while a run of stray bytes (a model
        repeating one) grows, those alone are decoded each step, not the whole run since the last text out. (Skipped
        special tokens have no bytes: after one, text may come a step later than it could, never other text.)"""
        decode = self.session.decode
        if len(self.ids) - self.prefix > 8 and decode(self.ids[-4:]).endswith("\ufffd"):
            return ""
        shown = decode(self.ids[self.prefix:self.read])
        text = decode(self.ids[self.prefix:])
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(shown):]
        return ""

    def finish(self) -> Completion:
        """The Completion (a stream gets what it has not seen first; as in the Completion's text, not a character
        the answer ends inside)."""
        if self.ticket.stream and not stop_at(self.held, self.options.stop or ()):
            shown = self.session.decode(self.ids[self.prefix:self.read])
            rest = self.held + self.session.whole_text(self.ids[self.prefix:])[len(shown):]
            cut = stop_at(rest, self.options.stop) if self.options.stop else None
            if rest[:cut]:
                self.ticket.emit(TextDelta(rest[:cut]))
        self.held = ""
        return self.session.completion(self.ids, self.ticket.prompt_tokens, self.options, self.first_token_s,
                                       time.perf_counter() - self.ticket.submitted)


class AnswersDone:
    """A stopping criterion per row of a `generate` batch: a row stops once its Answer is done (its stop string,
    its caller gone); generation ends when every row has."""

    def __init__(self, answers) -> None:
        self.answers = answers

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        done = [a.done or a.ticket.cancelled.is_set() for a in self.answers]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Feed:
    """A transformers streamer that hands each row's new token to its Answer (the first call is the prompt)."""

    def __init__(self, answers) -> None:
        self.answers, self.prompt_seen = answers, False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for answer, token in zip(self.answers, value.reshape(-1).tolist()):
            answer.add(token)

    def end(self) -> None:
        pass
