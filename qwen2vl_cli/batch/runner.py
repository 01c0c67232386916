"""The batch loop: skip what is done, decode and prepare the next batches on CPU threads while the model
generates the current one, group images by size so padding stays small, write every result as it
finishes, and say at the end what happened."""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import InputError, describe_exception
from ..session import ChatRequest, Completion, GenerationOptions, ModelSession
from ..sources import FetchLimits, ImageOptions
from .inputs import BatchItem

WINDOW_BATCHES = 4  # items are sorted by size within windows of this many batches
CPU_BATCH_SIZE = 4
MAX_AUTO_BATCH_SIZE = 64


@dataclass(frozen=True)
class BatchConfig:
    prompt: str
    system: str | None
    images: ImageOptions
    limits: FetchLimits
    generation: GenerationOptions
    batch_size: int | None = None
    workers: int = 4


@dataclass
class BatchSummary:
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0  # this run's failures
    failed_before: int = 0  # items whose record from an earlier run is an error (not retried without --retry-errors)
    load_s: float = 0.0
    seconds: float = 0.0  # captioning time, model load excluded
    interrupted: bool = False

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def any_failed(self) -> bool:
        return bool(self.failed or self.failed_before)

    def line(self) -> str:
        state = "interrupted" if self.interrupted else "finished"
        before = (f" + {self.failed_before} failed in an earlier run (--retry-errors redoes them)"
                  if self.failed_before else "")
        left = self.total - self.done - self.skipped - self.failed - self.failed_before
        return (f"batch {state}: {self.done} done, {self.skipped} skipped (already done), {self.failed} failed"
                f"{before}, {left} left; {self.seconds:.1f}s (+{self.load_s:.1f}s model load), "
                f"{self.images_per_second:.2f} images/s")


class Results:
    """Fans each record out to every sink, and counts. `on_failure(source, reason)` hears of each failure
    (sidecar-only runs, which keep no record of them, say them on stderr)."""

    def __init__(self, sinks: list, summary: BatchSummary, advance: Callable[[int], None],
                 on_failure: Callable[[str, str], None] | None = None) -> None:
        self.sinks, self.summary, self.advance, self.on_failure = sinks, summary, advance, on_failure

    def state(self, item: BatchItem) -> str | None:
        """'ok' when a sink holds a result for the item, 'error' when only a failure is on record, else None."""
        states = {sink.state(item) for sink in self.sinks}
        return "ok" if "ok" in states else "error" if "error" in states else None

    def write(self, item: BatchItem, text: str | None, error: str | None) -> None:
        record = {"source": item.source, **({"prompt": item.prompt} if item.prompt else {}), "text": text,
                  "error": error, **item.extra}
        for sink in self.sinks:
            sink.write(record)
        if error:
            self.summary.failed += 1
            if self.on_failure:
                self.on_failure(item.source, error)
        else:
            self.summary.done += 1
        self.advance(1)


def auto_batch_size(session: ModelSession, config: BatchConfig) -> int:
    """From free GPU memory and the worst-case item (max pixels + max new tokens); 4 on the CPU."""
    if session.device == "remote":  # keep --concurrency requests in flight, and the next ones ready
        return session.concurrency * 2
    if not (session.device or "").startswith("cuda"):
        return CPU_BATCH_SIZE
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(session.device))
    text = session.model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * session.model.dtype.itemsize
    image_tokens = (config.images.max_pixels or 16384 * 28 * 28) // (28 * 28)
    per_item = (image_tokens + config.generation.max_new_tokens + 64) * kv_per_token * 4  # activations, headroom
    return int(max(1, min(MAX_AUTO_BATCH_SIZE, free * 0.6 // per_item)))


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def run_batch(items: list[BatchItem], session: ModelSession, config: BatchConfig, results: Results,
              on_start: Callable[[int, int], None] = lambda todo, batch: None) -> BatchSummary:
    """Caption every item not done yet; Ctrl-C stops after the batch in flight is written."""
    summary = results.summary
    summary.total = len(items)
    states = [results.state(item) for item in items]
    todo = [item for item, state in zip(items, states) if state is None]
    summary.failed_before = states.count("error")
    summary.skipped = states.count("ok")
    if not todo:
        return summary
    loading = time.perf_counter()
    session.load()
    summary.load_s = time.perf_counter() - loading
    started = time.perf_counter()
    batch_size = config.batch_size or auto_batch_size(session, config)
    on_start(len(todo), batch_size)
    stop = threading.Event()
    ready: queue.Queue = queue.Queue(maxsize=2)
    producer = threading.Thread(target=_produce, args=(todo, session, config, batch_size, ready, stop),
                                name="qwen2vl-prepare", daemon=True)
    producer.start()
    try:
        while True:
            kind, payload = ready.get()
            if kind == "end":
                break
            if kind == "error":
                raise payload
            if kind == "failed":
                for item, reason in payload:
                    results.write(item, None, reason)
                continue
            batch_items, requests, prepared = payload
            _generate(session, batch_items, requests, prepared, results)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        stop.set()
        while producer.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get_nowait()
            except queue.Empty:
                producer.join(0.05)
        summary.seconds = time.perf_counter() - started
    return summary


def _generate(session: ModelSession, items: list[BatchItem], requests: list[ChatRequest], prepared,
              results: Results) -> None:
    """One batch; on out-of-memory or a failing item, split and retry so one item never sinks the rest."""
    try:
        completions: list[Completion] = session.generate_batch(requests, prepared)
    except Exception as exc:  # noqa: BLE001 - isolate the item(s) that fail
        if len(items) == 1:
            results.write(items[0], None, describe_exception(exc)[0])
            return
        _release_cuda_memory()
        half = len(items) // 2
        _generate(session, items[:half], requests[:half], None, results)
        _generate(session, items[half:], requests[half:], None, results)
        return
    for item, completion in zip(items, completions):
        results.write(item, completion.text, None)


def _release_cuda_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _decode(item: BatchItem, session, config: BatchConfig):
    """(item, Media, None) or (item, None, reason)."""
    try:
        return item, session.image_media(item.source, config.images, config.limits), None
    except InputError as exc:
        return item, None, exc.reason
    except Exception as exc:  # noqa: BLE001 - a bad file must not stop the run
        return item, None, describe_exception(exc)[0]


def _produce(todo: list[BatchItem], session: ModelSession, config: BatchConfig, batch_size: int,
             ready: queue.Queue, stop: threading.Event) -> None:
    """Decode windows of items on a thread pool, sort them by size, prepare batches, hand them over."""

    def hand_over(message) -> bool:
        while not stop.is_set():
            try:
                ready.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        with ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="qwen2vl-decode") as pool:
            for window in _chunks(todo, batch_size * WINDOW_BATCHES):
                if stop.is_set():
                    return
                decoded = list(pool.map(lambda item: _decode(item, session, config), window))
                failed = [(item, reason) for item, image, reason in decoded if reason]
                if failed and not hand_over(("failed", failed)):
                    return
                good = sorted(((item, media) for item, media, reason in decoded if not reason),
                              key=lambda pair: (pair[1].facts["width"] * pair[1].facts["height"],
                                                pair[1].facts["width"]))
                for group in _chunks(good, batch_size):
                    requests = [ChatRequest(prompt=item.prompt or config.prompt, system=config.system, media=[media],
                                            generation=config.generation) for item, media in group]
                    prepared = session.prepare(requests, on_device=True)
                    if not hand_over(("batch", ([item for item, _ in group], requests, prepared))):
                        return
        hand_over(("end", None))
    except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
        hand_over(("error", exc))
