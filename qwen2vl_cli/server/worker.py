"""The one thread that owns the model in a server: runs jobs, batches concurrent non-streamed requests
into one generate, streams the others token by token, and unloads the model after --keep-alive idle.
A job whose client has gone is dropped before it starts, and stops generating when it is running."""

from __future__ import annotations

import asyncio
import dataclasses
import math
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
        self.running = 0  # requests in the generation under way
        self.job_s = 1.0  # a running average of how long a generation takes, for Retry-After
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

    def retry_after_s(self) -> int:
        """A fair guess of when a place in the queue frees up (a 429's Retry-After)."""
        return max(1, math.ceil(self.job_s * max(1, self.queued) / self.max_batch))

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
            self.busy, started = True, time.monotonic()
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
                self.busy, self.running = False, 0
                self.last_active = time.monotonic()
                self.job_s = 0.8 * self.job_s + 0.2 * (self.last_active - started)

    def _maybe_unload(self) -> None:
        if self.keep_alive_s is not None and self.session.model is not None and self.idle_s >= self.keep_alive_s:
            self.session.unload()

    def _gather(self, first: Job) -> list[Job]:
        """`first` plus the queued non-streamed jobs with the same generation options (stop strings may
        differ: each answer is cut at its own)."""
        batch = [first]
        same = dataclasses.replace(first.request.generation, stop=())
        while len(batch) < self.max_batch:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if not job.stream and dataclasses.replace(job.request.generation, stop=()) == same:
                batch.append(job)
            else:
                self.pending.append(job)
        return batch

    def _batch(self, jobs: list[Job]) -> None:
        jobs = [job for job in jobs if not job.cancelled.is_set()]
        if not jobs:
            return
        self.running = len(jobs)
        if len(jobs) == 1:  # generated as a stream: it ends at its stop string, or when its client goes
            completion = None
            for event in self._events(jobs[0]):
                completion = event
            if completion is not None:
                jobs[0].emit(completion)
            return
        try:
            completions = self.session.generate_batch([job.request for job in jobs], cancelled=_AllCancelled(jobs))
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
        self.running = 1
        for event in self._events(job):
            job.emit(event)

    def _events(self, job: Job):
        """The job's answer as the session streams it, until its client goes away."""
        events = self.session.stream(job.request)
        try:
            for event in events:
                if job.cancelled.is_set():  # the client went away: stop generating for it
                    return
                yield event
        finally:
            events.close()


class _AllCancelled:
    """True once every job of a batch has been cancelled: the batch then stops generating."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    def is_set(self) -> bool:
        return all(job.cancelled.is_set() for job in self.jobs)

