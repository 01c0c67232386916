"""The batch loop: skip what is done, decode and prepare the next items (images, videos) on CPU threads while the
engine answers the ones before, submit each as a place frees up (the engine batches them continuously), write
every result as it is answered, and say at the end what happened."""

from __future__ import annotations

import math
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Iterator

from ..errors import InputError, UsageError, describe_exception
from ..types import ChatRequest, GenerationOptions, TextDelta
from ..sources import FetchLimits, ImageOptions, read_image
from ..video import VideoOptions, resolve_video
from .inputs import BatchItem
from .sinks import ItemNotWritten

DEFAULT_PROMPTS = {"image": "Describe this image.", "video": "Describe this video."}  # where none is given
WINDOW_ITEMS = 64  # items are decoded and sorted by size in windows of this many
READY_ITEMS = 16  # prepared items waiting for a place in the engine, at most
# Videos run to ~24k tokens each (--total-pixels), a photo to ~1.2k: a window holds at most WINDOW_VIDEOS of them
# decoded (no more than the --workers decoding them: the first is answered after one round of decodes), the queue
# READY_VIDEOS prepared, and in flight a video counts as its tokens in PHOTO_TOKENS
# (in_flight_limit is in photos), so that a folder of clips holds no more frames in memory than one of photos.
WINDOW_VIDEOS = 8
READY_VIDEOS = 4
PHOTO_TOKENS = 1280


@dataclass(frozen=True)
class BatchConfig:
    prompt: str | None  # None: DEFAULT_PROMPTS for the item's kind
    system: str | None
    images: ImageOptions
    limits: FetchLimits
    generation: GenerationOptions
    batch_size: int | None = None
    workers: int = 4
    videos: VideoOptions = VideoOptions()

    def prompt_for(self, item: BatchItem) -> str:
        return item.prompt or (self.prompt if self.prompt is not None else DEFAULT_PROMPTS[item.kind])


@dataclass
class BatchSummary:
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0  # this run's failures
    failed_before: int = 0  # items whose record from an earlier run is an error (not retried without --retry-errors)
    cut: int = 0  # answers that reached --max-new-tokens (finish_reason "length")
    load_s: float = 0.0
    seconds: float = 0.0  # captioning time, model load excluded
    interrupted: bool = False
    unit: str = "images"  # what the rate counts: "videos" or "items" (both) in runs with videos

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
        cut = f"; {self.cut} cut off at --max-new-tokens (-n)" if self.cut else ""
        return (f"batch {state}: {self.done} done, {self.skipped} skipped (already done), {self.failed} failed"
                f"{before}, {left} left; {self.seconds:.1f}s (+{self.load_s:.1f}s model load), "
                f"{self.images_per_second:.2f} {self.unit}/s{cut}")


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

    def write(self, item: BatchItem, text: str | None, error: str | None, finish_reason: str | None = None) -> None:
        """`finish_reason`: how the answer ended ("stop"; "length": it reached --max-new-tokens), None for a failure."""
        record = {"source": item.source, **({"prompt": item.prompt} if item.prompt else {}), "text": text,
                  "error": error, "finish_reason": finish_reason, **item.extra}
        for sink in self.sinks:  # sidecars first: a results file records what became of them
            try:
                sink.write(record)
            except ItemNotWritten as exc:  # no place there for this answer: the item fails (its text kept), the run
                error = error or str(exc)  # goes on
                record = {**record, "error": error}
        if error:
            self.summary.failed += 1
            if self.on_failure:
                self.on_failure(item.source, error)
        else:
            self.summary.done += 1
            self.summary.cut += finish_reason == "length"
        self.advance(1)


def in_flight_limit(session, config: BatchConfig) -> int:
    """Items submitted and not answered yet, at most: every row of the engine's running batch busy (or every
    connection to a server), and as many ready to take a row as it frees (prepared images wait on the GPU)."""
    if session.device == "remote":
        return session.concurrency * 2
    rows = config.batch_size or session.engine.capacity
    return rows + max(4, rows // 2)


def weight(request: ChatRequest) -> int:
    """What an item counts for against in_flight_limit: an image 1, a video its tokens in photos (at least 1)."""
    tokens = sum(int(m.facts.get("tokens", 0)) for m in request.media if m.kind == "video")
    return max(1, math.ceil(tokens / PHOTO_TOKENS))


def run_batch(items: list[BatchItem], session, config: BatchConfig, results: Results,
              on_start: Callable[[int, int], None] = lambda todo, batch: None,
              on_note: Callable[[str], None] = lambda text: None) -> BatchSummary:
    """Caption every item not done yet, each submitted as a place in the engine frees up and written as soon as
    it is answered; Ctrl-C stops at once, with every answer so far written. `on_note` hears what was reduced to
    fit of each item's media (a clip's frames capped at --max-frames, a server that reads fewer)."""
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
    if config.batch_size and session.device != "remote":
        session.engine.max_rows = config.batch_size
    summary.load_s = time.perf_counter() - loading
    started = time.perf_counter()
    on_start(len(todo), config.batch_size or (session.concurrency if session.device == "remote" else 0))
    stop = threading.Event()
    videos = any(item.kind == "video" for item in todo)
    ready: queue.Queue = queue.Queue(maxsize=READY_VIDEOS if videos else READY_ITEMS)
    answered: queue.Queue = queue.Queue()
    producer = threading.Thread(target=_produce, args=(todo, session, config, ready, stop),
                                name="qwen2vl-prepare", daemon=True)
    producer.start()
    pending: dict[int, tuple[object, int]] = {}  # id(item) -> (the session's ticket, its weight)
    held = 0  # the weights in flight
    ended = False
    try:
        while not ended or pending:
            while not ended and held < in_flight_limit(session, config):
                try:
                    kind, payload = ready.get(timeout=0.05) if not pending else ready.get_nowait()
                except queue.Empty:
                    break
                if kind == "end":
                    ended = True
                elif kind == "error":
                    raise payload
                elif kind == "failed":
                    for item, reason in payload:
                        results.write(item, None, reason)
                else:
                    item, request, prepared = payload
                    emit = lambda event, item=item: None if isinstance(event, TextDelta) else answered.put((item, event))  # noqa: E731
                    pending[id(item)] = session.submit(request, emit, prepared=prepared), weight(request)
                    held += pending[id(item)][1]
                    for note in request.media[0].notes:
                        on_note(note)
            try:
                item, event = answered.get(timeout=0.05)
            except queue.Empty:
                continue
            held -= pending.pop(id(item), (None, 0))[1]
            if isinstance(event, BaseException):
                results.write(item, None, describe_exception(event)[0])
            else:
                results.write(item, event.text, None, event.finish_reason)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        stop.set()
        for ticket, _ in pending.values():
            ticket.cancel()
        while producer.is_alive():  # unblock a producer waiting on a full queue
            try:
                ready.get_nowait()
            except queue.Empty:
                producer.join(0.05)
        summary.seconds = time.perf_counter() - started
    return summary


def _windows(items: list[BatchItem], videos_at_most: int = WINDOW_VIDEOS) -> Iterator[list[BatchItem]]:
    """`items` in order, WINDOW_ITEMS at a time, a window ending early at `videos_at_most` videos."""
    window: list[BatchItem] = []
    videos = 0
    for item in items:
        window.append(item)
        videos += item.kind == "video"
        if len(window) == WINDOW_ITEMS or videos == videos_at_most:
            yield window
            window, videos = [], 0
    if window:
        yield window


def _decode(item: BatchItem, session, config: BatchConfig):
    """(item, Media, None) or (item, None, reason): an image read and sized, or a video sampled and sized."""
    try:
        if item.kind == "video":
            start, end = item.segment  # a manifest's part of the clip, else the run's --start/--end
            options = replace(config.videos, **({"start": start} if start is not None else {}),
                              **({"end": end} if end is not None else {}))
            return item, session.video_media(resolve_video(item.source, options, config.limits)), None
        return item, session.image_media(read_image(item.source, config.images, config.limits)), None
    except InputError as exc:
        return item, None, exc.reason
    except UsageError:  # the options, not the item (--video-backend not installed): the run stops
        raise
    except Exception as exc:  # noqa: BLE001 - a bad file must not stop the run
        return item, None, describe_exception(exc)[0]


def _produce(todo: list[BatchItem], session, config: BatchConfig, ready: queue.Queue, stop: threading.Event) -> None:
    """Decode windows of items on a thread pool, sort them by size (same-size images share the vision tower's
    attention call when prefilled together; videos after images), prepare each, hand them over."""

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
            for window in _windows(todo, min(WINDOW_VIDEOS, config.workers)):
                if stop.is_set():
                    return
                # once stopped (Ctrl-C), the window's decodes not started yet are not started: a window of long
                # clips would otherwise hold the exit for a round of decodes per worker
                decoded = list(pool.map(lambda item: (item, None, "stopped") if stop.is_set()
                                        else _decode(item, session, config), window))
                failed = [(item, reason) for item, image, reason in decoded if reason]
                if failed and not hand_over(("failed", failed)):
                    return
                good = sorted(((item, media) for item, media, reason in decoded if not reason),
                              key=lambda pair: (pair[1].kind, pair[1].facts.get("frames", 1),
                                                pair[1].facts["width"] * pair[1].facts["height"],
                                                pair[1].facts["width"]))
                for item, media in good:
                    request = ChatRequest(prompt=config.prompt_for(item), system=config.system, media=[media],
                                          generation=config.generation)
                    try:
                        prepared = session.prepare_one(request)
                    except Exception as exc:  # noqa: BLE001 - a bad item must not stop the run
                        if not hand_over(("failed", [(item, describe_exception(exc)[0])])):
                            return
                        continue
                    if not hand_over(("item", (item, request, prepared))):
                        return
        hand_over(("end", None))
    except BaseException as exc:  # noqa: BLE001 - surfaced in the main thread
        hand_over(("error", exc))
