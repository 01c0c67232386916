"""The server's bridge to the engine (engine/scheduler.py): a Job carries one HTTP request's events from the
engine's thread to the server's event loop; cancelling it (its client gone) frees its place in the engine."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..types import ChatRequest


@dataclass
class Job:
    """One request; its events (TextDelta, Completion or an exception) go to `events` on the server's loop."""

    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    ticket: object = None  # the engine's Ticket

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        if self.ticket is not None:
            self.ticket.cancel()


def start_job(engine, request: ChatRequest, stream: bool) -> Job:
    """Submit `request` to the engine; its events arrive on the running loop's Job."""
    job = Job(asyncio.get_running_loop())
    job.ticket = engine.submit(request, job.emit, stream=stream)
    return job
