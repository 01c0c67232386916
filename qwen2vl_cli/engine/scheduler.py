"""The engine: one thread owns the model and answers every request, whatever command or client it comes from.

Requests come in as Tickets (`Engine.submit`). Where the fast path serves them (greedy decoding, by default on
CUDA) they are batched continuously: a prepared request is prefilled between decode steps and joins the running
batch (fast.decoder.Rows) in a free row; it leaves as soon as it is done (end of text, its own max tokens or stop
string, or its caller gone), and a waiting request takes the row at the next step. Streamed and non-streamed
requests share the batch; a streamed one is prefilled ahead of waiting non-streamed ones, each of them passed a
bounded number of times (`_queue`: an interactive answer does not wait behind a batch's queue). The others
(sampling, penalties, quantized weights, the CPU by default) are answered by transformers' `generate` on the same
thread: non-streamed ones with the same options together, as one padded batch.

One failure policy: a prefill that runs out of GPU memory is split and retried, down to one request, whose caller
gets the error; an error reaches the callers of the requests it concerns and the engine serves on.
"""

from __future__ import annotations

import atexit
import dataclasses
import math
import queue
import threading
import time
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

from ..types import ChatRequest, Completion, TextDelta
from .tickets import Answer, Ticket

MAX_ROWS = 128  # rows of the running batch at most (each a full-length K/V cache row; within CACHE_SHARE)
CPU_ROWS = 8
MIN_CACHE = 2048  # a row's length in the cache at least (positions); grown for longer requests
CACHE_SHARE = 0.5  # of the GPU memory free after loading, what the running batch's cache may take
PREFILL_TOKENS = 4096  # prompt tokens prefilled between two decode steps at most (the running rows wait meanwhile)
STOCK_BATCH = 16  # non-streamed requests answered by one `generate` at most
PREPARERS = 4  # helper threads preparing requests (images on the GPU, tokenizing) while the engine decodes
PHASES_KEPT = 256  # recent requests whose phases timings_ms() summarizes
IDLE_EXIT_S = 2.0  # the engine's thread ends after this long without work (a server's stays: --keep-alive)
PASSES = 32  # a waiting non-streamed request lets this many streamed ones go ahead of it at most (`_queue`)


def median_ms(seconds: list[float]) -> float | None:
    """The median of durations in seconds, as milliseconds (None for none): what `timings_ms` reports."""
    return round(sorted(seconds)[len(seconds) // 2] * 1000, 1) if seconds else None


class Engine:
    """Owns the session's model on one thread; `submit`, `stream` and `generate` are safe from any thread."""

    def __init__(self, session, keep_alive_s: float | None = None, max_rows: int | None = None) -> None:
        self.session = session
        self.keep_alive_s = keep_alive_s  # unload the model after this long without requests
        self.serving = False  # a server's engine (it outlives requests): it uses idle moments (_may_capture)
        self.max_rows = max_rows
        self.inbox: queue.Queue[Ticket | None] = queue.Queue()
        self.waiting: deque[Ticket] = deque()  # prepared, not yet answering
        self.live: list[Ticket | None] = []  # by row of the running batch
        self.rows = None  # fast.decoder.Rows, made for the first request the fast path serves
        self.in_flight: deque = deque()  # decode steps queued on the GPU: (event, host tokens, owners by row)
        self.host: list = []  # pinned buffers the steps copy their tokens into, reused round-robin
        self.preparing = 0
        self.stock_running = 0  # requests in the `generate` under way
        self.prefill_limit = PREFILL_TOKENS
        self.last_active = time.monotonic()
        self.job_s = 1.0  # a running average of how long an answer takes, for Retry-After
        self.phases: deque = deque(maxlen=PHASES_KEPT)  # (prepare, wait, prefill) seconds of recent requests
        self.closing = threading.Event()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.pool: ThreadPoolExecutor | None = None  # prepares requests while the GPU decodes others

    # ---- the callers' side -----------------------------------------------------------------------
    def submit(self, request: ChatRequest, emit: Callable, stream: bool = False, prepared=None) -> Ticket:
        """Queue a request; `prepared` is `session.prepare([request])` done ahead (e.g. by a batch's producer)."""
        ticket = Ticket(request, emit, stream, prepared)
        with self.lock:  # the thread leaves when idle (under this lock, with the inbox empty): none is stranded
            if self.thread is None or not self.thread.is_alive():
                self.closing.clear()
                self.thread = threading.Thread(target=self._run, name="qwen2vl-engine", daemon=True)
                self.thread.start()
                _ENGINES.add(self)
            # while the engine is busy, a request is prepared at once on a helper thread (not when the engine's
            # thread gets to it); an idle engine prepares it itself, starting the vision tower early
            ahead = prepared is None and self.session.model is not None and self.busy
            if ahead:
                self.preparing += 1
            else:
                self.inbox.put(ticket)
        if ahead:
            self._prepare_aside(ticket)
        return ticket

    def stream(self, request: ChatRequest) -> Iterator[TextDelta | Completion]:
        """One answer as it is generated: TextDelta pieces, then the Completion. Closing the iterator (Ctrl-C, a
        client gone) cancels the request."""
        events: queue.Queue = queue.Queue()
        ticket = self.submit(request, events.put, stream=True)
        try:
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Completion):
                    return
        finally:
            if not ticket.done:
                ticket.cancel()
                ticket.closed.wait(timeout=30)  # the engine has stopped working on it: safe to exit, or go on

    def generate(self, requests: list[ChatRequest]) -> list[Completion]:
        """Answers to several requests, in their order (batched with whatever else runs); the first error is
        raised, and the requests not answered by then are cancelled."""
        results: queue.Queue = queue.Queue()
        tickets = [self.submit(request, lambda event, i=i: results.put((i, event))) for i, request in enumerate(requests)]
        answers: list = [None] * len(tickets)
        try:
            for _ in tickets:
                index, event = results.get()
                if isinstance(event, BaseException):
                    raise event
                answers[index] = event
        finally:
            for ticket in tickets:
                if not ticket.done:
                    ticket.cancel()
        return answers

    def close(self, wait_s: float = 0.0) -> None:
        """Stop the engine's thread once it is between steps (`wait_s`: wait that long for it)."""
        self.closing.set()
        self.inbox.put(None)
        if wait_s and self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(wait_s)

    @property
    def running(self) -> int:
        """Requests being answered now."""
        return sum(ticket is not None for ticket in self.live) + self.stock_running

    @property
    def queued(self) -> int:
        return self.inbox.qsize() + len(self.waiting) + self.preparing

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.preparing or self.in_flight or self.running)

    @property
    def idle_s(self) -> float:
        return 0.0 if self.busy or not self.inbox.empty() else time.monotonic() - self.last_active

    @property
    def capacity(self) -> int:
        """How many requests are answered together at most (the running batch's rows, or one stock batch)."""
        return self.rows.capacity if self.rows is not None else self._stock_limit()

    def _stock_limit(self) -> int:
        """Requests in one `generate` at most: --batch-size, else STOCK_BATCH on a GPU, CPU_ROWS elsewhere."""
        cuda = (self.session.device or "").startswith("cuda")
        return self.max_rows or (STOCK_BATCH if cuda else CPU_ROWS)

    def timings_ms(self) -> dict:
        """Medians over the recent fast-path requests: submitted -> prepared, prepared -> prefill started (the
        wait for a row), prefill -> first token (with the requests prefilled beside it)."""
        recent = list(self.phases)
        if not recent:
            return {}
        return {"requests": len(recent), **{name: median_ms([p[i] for p in recent])
                                            for i, name in enumerate(("prepare", "wait", "prefill"))}}

    def retry_after_s(self) -> int:
        """A fair guess of when a place in the queue frees up (a 429's Retry-After)."""
        return max(1, math.ceil(self.job_s * max(1, self.queued) / max(1, self.capacity)))

    # ---- the engine's thread ---------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        with torch.inference_mode():  # nothing on this thread records autograd (it kept a vision tower's activations)
            self._serve()

    def _serve(self) -> None:
        while not self.closing.is_set():
            try:
                idle = not (self.waiting or self.in_flight or (self.rows is not None and self.rows.count))
                if self._take(block=idle) is _IDLE:
                    return  # nothing to do for a while: the thread ends (and holds nothing); submit starts another
                self._drop_cancelled()
                if self.waiting and not self.waiting[0].fast:
                    self._answer_stock()
                    continue
                self._admit()
                if self.rows is not None and self.rows.count:
                    self._enqueue_step()
                while self.in_flight and (len(self.in_flight) > self._ahead() or not self.rows.count):
                    self._consume()
            except BaseException as exc:  # noqa: BLE001 - the requests it concerns get it; the engine lives on
                self._fail_running(exc)

    def _ahead(self) -> int:
        from .fast.decoder import AHEAD

        return AHEAD if self.session.device and self.session.device.startswith("cuda") else 0

    def _take(self, block: bool):
        """New tickets from the inbox: prepared ones wait for a row; the others are prepared, here when the engine
        has nothing else to do (a lone request: the vision tower starts while the prompt is tokenized), else on
        the preparing threads, which hand them back through the inbox."""
        while True:
            try:
                ticket = self.inbox.get(timeout=0.5) if block and not self._may_capture() else self.inbox.get_nowait()
            except queue.Empty:
                if not block:
                    return None
                if self._may_capture():
                    self.session.fast.prefill.capture_pending()  # one graph, then the inbox is looked at again
                    continue
                self._maybe_unload()
                if self.keep_alive_s is None and time.monotonic() - self.last_active > IDLE_EXIT_S:
                    with self.lock:
                        if self.inbox.empty() and not self.preparing:
                            self.thread = None
                            return _IDLE
                continue
            block = False
            if ticket is None:
                return
            self.last_active = time.monotonic()
            if ticket.cancelled.is_set():
                ticket.closed.set()
                continue
            try:
                self._ensure_loaded()
            except BaseException as exc:  # noqa: BLE001 - the model cannot load: every caller hears why
                ticket.closed.set()
                ticket.emit(exc)
                continue
            if ticket.fast is None:
                ticket.fast = self.session.fast_path_enabled(ticket.request.generation)
            if ticket.prepared is not None:
                ticket.prepared_at = ticket.prepared_at or time.perf_counter()
                self._queue(ticket)
            elif self.waiting or self.in_flight or (self.rows is not None and self.rows.count) or not self.inbox.empty():
                self._prepare_later(ticket)
            else:
                self._prepare(ticket, early=ticket.fast)

    def _may_capture(self) -> bool:
        """A server's engine has prompt graphs to capture while it has nothing to do (a command's would only
        delay its process's exit)."""
        fast = self.session.fast
        return (self.serving and fast is not None and fast.prefill is not None
                and bool(fast.prefill.pending) and fast.prefill.use_graphs)

    def _ensure_loaded(self) -> None:
        if self.session.model is None:
            self.session.load()

    def _prepare(self, ticket: Ticket, early: bool = False) -> None:
        try:
            ticket.prepared = self.session.prepare_one(ticket.request, early=early)
        except BaseException as exc:  # noqa: BLE001 - a bad request is its caller's error
            ticket.closed.set()
            ticket.emit(exc)
            return
        ticket.prepared_at = time.perf_counter()
        self._queue(ticket)

    def _queue(self, ticket: Ticket) -> None:
        """A prepared request takes its place among the waiting ones: in order, except that a streamed answer on the
        fast path (someone is watching it come: a one-liner, a chat) goes ahead of the non-streamed ones at the end
        of the queue (a batch's, `"stream": false` API calls), behind any other streamed one. No work is added or
        lost, only reordered, and a non-streamed request is passed PASSES times at most, so none waits for long
        (each pass costs it one prefill and a row's turn), however old the queue is when the stream arrives."""
        index = len(self.waiting)
        if ticket.stream and ticket.fast:
            while index and (other := self.waiting[index - 1]).fast and not other.stream and other.passed < PASSES:
                index -= 1
            for other in list(self.waiting)[index:]:
                other.passed += 1
        self.waiting.insert(index, ticket)

    def _prepare_later(self, ticket: Ticket) -> None:
        with self.lock:
            self.preparing += 1
        self._prepare_aside(ticket)

    def _prepare_aside(self, ticket: Ticket) -> None:
        """Prepare on a helper thread (counted in `preparing` by the caller); back through the inbox."""
        with self.lock:
            if self.pool is None:
                self.pool = ThreadPoolExecutor(max_workers=PREPARERS, thread_name_prefix="qwen2vl-prepare")

        def prepare() -> None:
            try:
                ticket.prepared = self.session.prepare_one(ticket.request)
                ticket.prepared_at = time.perf_counter()
            except BaseException as exc:  # noqa: BLE001
                ticket.closed.set()
                ticket.emit(exc)
            else:
                self.inbox.put(ticket)
            finally:
                with self.lock:
                    self.preparing -= 1

        self.pool.submit(prepare)

    def _maybe_unload(self) -> None:
        if (self.keep_alive_s is not None and self.session.model is not None and not self.busy
                and time.monotonic() - self.last_active >= self.keep_alive_s):
            self.session.unload()

    def drop_cache(self) -> None:
        """Free the running batch's cache (the model is unloading; nothing is running)."""
        self.rows, self.host, self.live = None, [], []

    def _drop_cancelled(self) -> None:
        for ticket in [t for t in self.waiting if t.cancelled.is_set()]:
            self.waiting.remove(ticket)
            ticket.closed.set()
        for ticket in [t for t in self.live if t is not None and t.cancelled.is_set()]:
            self._release(ticket)

    # ---- the continuous batch --------------------------------------------------------------------
    def _admit(self) -> None:
        """Prefill waiting fast-path requests into free rows: as many as fit, PREFILL_TOKENS at most between two
        decode steps (the rows decoding go on while a queue of new requests is prefilled). The running batch
        grows to the rows asked for (within its memory) and to the longest request's length."""
        fast = [t for t in self.waiting if t.fast]
        if not fast or not self.waiting[0].fast:
            return
        longest = max(t.span for t in fast)
        count = self.rows.count if self.rows is not None else 0
        wanted = 1 << (count + len(fast) - 1).bit_length()  # a power of two: the decode graphs' row counts
        if self.rows is None or longest > self.rows.size or wanted > self.rows.capacity:
            self._resize(wanted, longest)
        rows = self.rows
        group: list[Ticket] = []
        while self.waiting and self.waiting[0].fast and rows.count + len(group) < rows.capacity:
            ticket = self.waiting[0]
            if ticket.span > rows.size:
                break  # longer than the memory allows beside the rows in use: it waits for them
            width = max(t.prepared["input_ids"].shape[1] for t in group + [ticket])
            if group and width * (len(group) + 1) > self.prefill_limit:
                break
            group.append(self.waiting.popleft())
        if group:
            self._prefill(group)

    def _resize(self, capacity: int, span: int) -> None:
        """A running batch of at least `capacity` rows and `span` positions each where memory allows (within
        CACHE_SHARE of what is free, MAX_ROWS, --batch-size), the rows in use copied over; never smaller than now."""
        import torch

        from .fast.decoder import CACHE_BLOCK, Rows

        fast, old = self.session.fast, self.rows
        size = max(MIN_CACHE, -(-span // CACHE_BLOCK) * CACHE_BLOCK, old.size if old else 0)
        limit = min(MAX_ROWS, self.max_rows or MAX_ROWS)
        if fast.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(fast.device)
            held = old.capacity * old.size * fast.kv_bytes_per_token if old else 0
            limit = min(limit, int((free + held) * CACHE_SHARE // (size * fast.kv_bytes_per_token)))
        else:
            limit = min(limit, CPU_ROWS)
        count = old.count if old else 0
        if limit < max(1, count):
            if count:  # no room for this length beside the rows in use: keep what we have (it waits for them)
                size, limit = old.size, old.capacity
            else:  # one row, whatever the estimate says: where it does not fit, its caller hears of it
                limit = 1
        capacity = max(min(capacity, limit), count, 1, old.capacity if old and size == old.size else 1)
        if old is not None and capacity == old.capacity and size == old.size:
            return
        while self.in_flight:  # the rows in use are copied as they are after every queued step
            self._consume()
        count = old.count if old else 0
        try:
            rows = Rows(fast, capacity, size, self.session.eos_ids, self.session.pad_id)
        except torch.cuda.OutOfMemoryError:
            if old is None:
                raise  # not one row fits: the waiting requests hear of it
            torch.cuda.empty_cache()
            self.max_rows = old.capacity  # one failure policy: stay as large as we are, and go on
            return
        self.rows = rows
        if old is not None and count:
            for new_layers, old_layers in ((rows.keys, old.keys), (rows.values, old.values)):
                for new, before in zip(new_layers, old_layers):
                    new[:count, :, :old.size].copy_(before[:count])
            rows.mask[:count, ..., :old.size].copy_(old.mask[:count])
            for name in ("tokens", "positions", "slot", "finished"):
                getattr(rows, name)[:count].copy_(getattr(old, name)[:count])
            rows.count = count
        del old
        self.live = (self.live + [None] * capacity)[:capacity]
        pinned = fast.device.type == "cuda"
        self.host = [torch.empty(capacity, dtype=torch.long, pin_memory=pinned) for _ in range(self._ahead() + 2)]

    def _prefill(self, group: list[Ticket]) -> None:
        """Prefill `group` into free rows. A conversation of images and text has the fast prefill to itself (CUDA
        graphs where its shape came before; no host syncs); the others (videos) go through the model's forward
        together. Each part's first tokens are read like a decode step's (`_consume`), as soon as that part is
        done: the host does not wait, and a request's first token does not wait for the others'."""
        import torch

        session, rows = self.session, self.rows
        applies = session.fast.prefill.applies
        alone = [t for t in group if applies(t.prepared)]
        rest = [t for t in group if t not in alone]
        parts = [[t] for t in alone] + ([rest] if rest else [])
        joined: list[Ticket] = []
        for index, part in enumerate(parts):
            started = time.perf_counter()
            try:
                host = part[0].prepared if len(part) == 1 else session.collate([t.prepared for t in part])
                inputs = session.to_device(host)
                with torch.inference_mode():
                    logits, prompt_kv, delta = session.fast._prefill(inputs, host)
                    first = logits.argmax(-1)
                    attention = inputs["attention_mask"]
                    places = rows.join(prompt_kv, attention, first, attention.sum(-1) + delta.reshape(-1).to(attention.device))
                del prompt_kv, logits
            except torch.cuda.OutOfMemoryError as exc:
                torch.cuda.empty_cache()
                if len(part) == 1 and not joined:
                    part[0].closed.set()
                    part[0].emit(exc)
                    continue
                self.prefill_limit = max(1, self.prefill_limit // 2)  # one failure policy: smaller, and again
                self.waiting.extendleft(reversed([t for p in parts[index:] for t in p]))
                break
            except BaseException as exc:  # noqa: BLE001 - this part's requests get the error
                if len(part) > 1:  # each on its own, so one bad request does not fail the others
                    for ticket in part:
                        self._prefill([ticket])
                    continue
                part[0].closed.set()
                part[0].emit(exc)
                continue
            for ticket, row in zip(part, places):
                ticket.row, ticket.answer, ticket.prefill_started = row, Answer(session, ticket), started
                self.live[row] = ticket
            joined += part
            self._enqueue_tokens(first, tuple(part))  # read as soon as this part is done, not the whole group

    def _enqueue_tokens(self, tokens, owners: tuple) -> None:
        """Tokens made on the GPU for `owners` (in order), read in turn with the decode steps (`_consume`)."""
        import torch

        cuda = tokens.is_cuda
        host = torch.empty(len(owners), dtype=torch.long, pin_memory=cuda)
        host.copy_(tokens, non_blocking=cuda)
        event = None
        if cuda:
            event = torch.cuda.Event()
            event.record()
        self.in_flight.append((event, host, owners))

    def _enqueue_step(self) -> None:
        if self.rows.will_capture():  # once per row count: the first tokens made meanwhile are not kept waiting
            while self.in_flight:
                self._consume()
            if not self.rows.count:
                return
        host = self.host[0]
        self.host.append(self.host.pop(0))
        event, bucket = self.rows.step(host)
        self.in_flight.append((event, host, tuple(self.live[:bucket])))

    def _consume(self) -> None:
        """Read the oldest step in flight; each row's token goes to the ticket that held the row then."""
        event, host, owners = self.in_flight.popleft()
        if event is not None:
            event.synchronize()
        tokens = host[:len(owners)].tolist()
        for ticket, token in zip(owners, tokens):
            if ticket is not None and not ticket.done and ticket.answer.add(token):
                self._release(ticket)

    def _release(self, ticket: Ticket) -> None:
        """A ticket is done (or cancelled): its caller gets the Completion, and its row is free."""
        ticket.closed.set()
        row, rows = ticket.row, self.rows
        if row is not None:
            last = rows.count - 1
            rows.leave(row)
            moved, self.live[last] = self.live[last], None
            if row != last:
                self.live[row], moved.row = moved, row
            ticket.row = None
        answer = ticket.answer
        if answer is not None and answer.first_token_s is not None and ticket.prefill_started is not None:
            first = ticket.submitted + answer.first_token_s
            self.phases.append((ticket.prepared_at - ticket.submitted, ticket.prefill_started - ticket.prepared_at,
                                first - ticket.prefill_started))
        if not ticket.cancelled.is_set():
            self._finished(ticket, answer.finish())

    def _finished(self, ticket: Ticket, completion: Completion) -> None:
        ticket.closed.set()
        self.last_active = time.monotonic()
        self.job_s = 0.8 * self.job_s + 0.2 * completion.total_s
        ticket.emit(completion)

    def _fail_running(self, exc: BaseException) -> None:
        """An error outside one request's prefill (a decode step): every request answering gets it, and the
        running batch starts anew."""
        for ticket in [t for t in self.live if t is not None] + list(self.waiting):
            if not ticket.done:
                ticket.closed.set()
                ticket.emit(exc)
        self.waiting.clear()
        self.in_flight.clear()
        self.rows, self.live = None, []
        if type(exc).__name__ == "OutOfMemoryError":
            import torch

            torch.cuda.empty_cache()
            self.max_rows = max(1, (self.max_rows or MAX_ROWS) // 2)  # smaller next time

    # ---- transformers' generate ------------------------------------------------------------------
    def _answer_stock(self) -> None:
        """The first waiting request, with the non-streamed ones that share its options (one padded batch)."""
        first = self.waiting.popleft()
        group = [first]
        if not first.stream:
            same = dataclasses.replace(first.request.generation, stop=())
            limit = self._stock_limit()
            for ticket in list(self.waiting):
                if len(group) >= limit:
                    break
                if (not ticket.fast and not ticket.stream
                        and dataclasses.replace(ticket.request.generation, stop=()) == same):
                    self.waiting.remove(ticket)
                    group.append(ticket)
        self.stock_running = len(group)
        try:
            self._generate(group)
        finally:
            self.stock_running = 0

    def _generate(self, group: list[Ticket]) -> None:
        session = self.session
        try:
            host = group[0].prepared if len(group) == 1 else session.collate([t.prepared for t in group])
            for ticket in group:
                ticket.answer = Answer(session, ticket)
            session.generate_stock(session.to_device(host), group[0].request.generation, [t.answer for t in group])
        except BaseException as exc:  # noqa: BLE001
            if len(group) > 1 and not isinstance(exc, KeyboardInterrupt):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                for ticket in group:  # one failure policy: smaller, down to one request
                    ticket.answer = None
                    self._generate([ticket])
                return
            group[0].closed.set()
            group[0].emit(exc)
            return
        for ticket in group:
            if ticket.cancelled.is_set():
                ticket.closed.set()
            else:
                self._finished(ticket, ticket.answer.finish())


_IDLE = object()
_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _stop_engines() -> None:
    """At exit each engine's thread stops between steps: a process must not end inside a CUDA or torch call."""
    for engine in list(_ENGINES):
        engine.close(wait_s=10.0)
