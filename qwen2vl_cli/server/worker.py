"""The one thread that owns the model in a server: runs jobs, batches concurrent non-streamed requests
into one generate, streams the others token by token, and unloads the model after --keep-alive idle."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..session import ChatRequest, ModelSession

MAX_SERVER_BATCH = 16


@dataclass
class Job:
    """One request; its events (TextDelta, Completion or an exception) go to `events` on the server's loop."""

    request: ChatRequest
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class GenerationWorker:
    """Owns the session; `submit` is safe from any thread."""

    def __init__(self, session: ModelSession, keep_alive_s: float | None, max_batch: int = MAX_SERVER_BATCH) -> None:
        self.session = session
        self.keep_alive_s = keep_alive_s
        self.max_batch = max_batch
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.pending: deque[Job] = deque()
        self.last_active = time.monotonic()
        self.busy = False
        self.closing = threading.Event()
        self.thread = threading.Thread(target=self._run, name="qwen2vl-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.closing.set()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    @property
    def idle_s(self) -> float:
        return 0.0 if self.busy else time.monotonic() - self.last_active

    @property
    def queued(self) -> int:
        return self.jobs.qsize() + len(self.pending)

    def _next(self, timeout: float) -> Job | None:
        if self.pending:
            return self.pending.popleft()
        try:
            return self.jobs.get(timeout=timeout)
        except queue.Empty:
            return None

    def _run(self) -> None:
        while not self.closing.is_set():
            job = self._next(timeout=0.5)
            if job is None:
                self._maybe_unload()
                continue
            self.busy = True
            try:
                if job.cancelled.is_set():
                    continue
                if self.session.model is None:
                    self.session.load()
                if job.stream:
                    self._stream(job)
                else:
                    self._batch(self._gather(job))
            except BaseException as exc:  # noqa: BLE001 - the job gets the error; the server lives on
                job.emit(exc)
            finally:
                self.busy = False
                self.last_active = time.monotonic()

    def _maybe_unload(self) -> None:
        if self.keep_alive_s is not None and self.session.model is not None and self.idle_s >= self.keep_alive_s:
            self.session.unload()

    def _gather(self, first: Job) -> list[Job]:
        """`first` plus the queued non-streamed jobs with the same generation options."""
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if not job.stream and job.request.generation == first.request.generation:
                batch.append(job)
            else:
                self.pending.append(job)
        return batch

    def _batch(self, jobs: list[Job]) -> None:
        jobs = [job for job in jobs if not job.cancelled.is_set()]
        if not jobs:
            return
        try:
            completions = self.session.generate_batch([job.request for job in jobs])
        except BaseException:  # noqa: BLE001 - one bad request must not fail its neighbours
            if len(jobs) == 1:
                raise
            for job in jobs:
                try:
                    job.emit(self.session.generate_batch([job.request])[0])
                except BaseException as exc:  # noqa: BLE001
                    job.emit(exc)
            return
        for job, completion in zip(jobs, completions):
            job.emit(completion)

    def _stream(self, job: Job) -> None:
        events = self.session.stream(job.request)
        try:
            for event in events:
                if job.cancelled.is_set():  # the client went away: stop generating for it
                    break
                job.emit(event)
        finally:
            events.close()

