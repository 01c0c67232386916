"""The server's bridge to the engine (engine/scheduler.py): a Job carries one HTTP request's events from the
engine's thread to the server's event loop; cancelling it (its client gone) frees its place in the engine.

Events are handed over in bunches: the engine's thread appends to the job's list and wakes the loop only when
the list was empty; the loop takes everything that came meanwhile at once. A loop that keeps up gets every
token on its own; a busy one is woken once for several, not once per token."""

from __future__ import annotations

import asyncio
import threading
import time

from ..types import ChatRequest, TextDelta


class Job:
    """One request; its events (TextDelta, Completion or an exception) are read on the server's loop with
    `events()`."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ticket = None  # the engine's Ticket
        self._lock = threading.Lock()
        self._pending: list = []
        self._ready = asyncio.Event()
        self.first_text_at: float | None = None  # when the engine emitted the first text piece (perf_counter)

    def emit(self, event) -> None:
        """Called on the engine's thread."""
        if self.first_text_at is None and isinstance(event, TextDelta):
            self.first_text_at = time.perf_counter()
        with self._lock:
            self._pending.append(event)
            if len(self._pending) > 1:  # the loop is woken already and has not taken the list yet
                return
        self.loop.call_soon_threadsafe(self._ready.set)

    async def events(self) -> list:
        """Every event that came since the last call (at least one), in order."""
        while True:
            await self._ready.wait()
            with self._lock:
                events, self._pending = self._pending, []
                self._ready.clear()
            if events:
                return events

    def cancel(self) -> None:
        if self.ticket is not None:
            self.ticket.cancel()


def joined(events: list) -> list:
    """Consecutive TextDeltas as one (one server-sent event for the text a busy loop found waiting)."""
    out: list = []
    for event in events:
        if isinstance(event, TextDelta) and out and isinstance(out[-1], TextDelta):
            out[-1] = TextDelta(out[-1].text + event.text)
        else:
            out.append(event)
    return out


def start_job(engine, request: ChatRequest, stream: bool) -> Job:
    """Submit `request` to the engine; its events arrive on the running loop's Job."""
    job = Job(asyncio.get_running_loop())
    job.ticket = engine.submit(request, job.emit, stream=stream)
    return job
