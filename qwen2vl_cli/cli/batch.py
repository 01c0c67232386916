"""`batch`: caption many images and videos, resumably, in GPU batches, writing every result as it finishes."""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from ..batch.inputs import DEFAULT_EXTENSIONS
from ..errors import ExitStatus, UsageError
from ..render import Environment, printable
from ..sources import FetchLimits
from . import common
from .options import (DEFAULTS, ApiKeyOpt, AttnOpt, BatchVerboseOpt, DeviceOpt, DtypeOpt, EndOpt, FpsOpt,
                      MaxDownloadOpt, MaxFramesOpt, MaxNewTokensOpt, MaxPixelsOpt, MinFramesOpt, MinPixelsOpt, ModelOpt,
                      NFramesOpt, NoServerOpt, QuantizeOpt, QuietOpt, RepetitionPenaltyOpt, ResizedHeightOpt,
                      ResizedWidthOpt, SeedOpt, ServerOpt, StartOpt, StopOpt, SystemOpt, TemperatureOpt, TimeoutOpt,
                      TopKOpt, TopPOpt, TotalPixelsOpt, VideoBackendOpt, utf8_text)

OUT_PANEL = "Results"


def batch(
    inputs: Annotated[list[str] | None, typer.Argument(
        metavar="INPUT", help="Image and video files, directories, quoted globs, URLs, or - for newline-separated paths on stdin.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", callback=utf8_text, show_default=False, help="The prompt for every item (default: \"Describe this image.\", or \"Describe this video.\" for a video; a manifest can set one per item).")] = None,
    manifest: Annotated[str | None, typer.Option("--manifest", metavar="FILE.jsonl|FILE.csv", help="One JSON object a line (or a CSV file with a header row): source, optional prompt, extra fields copied to the output.")] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Walk directories recursively.")] = False,
    ext: Annotated[str | None, typer.Option("--ext", metavar="LIST", help=f"Extensions that count in directories and globs (default: {', '.join(DEFAULT_EXTENSIONS)}).")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", metavar="FILE", rich_help_panel=OUT_PANEL, help="Write results to FILE (.jsonl or .csv) instead of stdout; rerunning resumes it.")] = None,
    sidecar: Annotated[bool, typer.Option("--sidecar", rich_help_panel=OUT_PANEL, help="Write each caption beside its file as <name>.txt (alone: a URL's record, with no file to sit beside, goes to stdout).")] = False,
    sidecar_ext: Annotated[str, typer.Option("--sidecar-ext", rich_help_panel=OUT_PANEL, help="Extension of sidecar files.")] = "txt",
    caption_prefix: Annotated[str, typer.Option("--prefix", rich_help_panel=OUT_PANEL, help="Text put before each sidecar caption.")] = "",
    caption_suffix: Annotated[str, typer.Option("--suffix", rich_help_panel=OUT_PANEL, help="Text put after each sidecar caption.")] = "",
    overwrite: Annotated[bool, typer.Option("--overwrite", rich_help_panel=OUT_PANEL, help="Redo every item: start the output file afresh and replace sidecars.")] = False,
    retry_errors: Annotated[bool, typer.Option("--retry-errors", rich_help_panel=OUT_PANEL, help="On resume, redo the items whose earlier result was an error.")] = False,
    batch_size: Annotated[int | None, typer.Option("--batch-size", "-b", min=1, show_default=False, help="Most images or videos the engine decodes together (default: grows with demand within free GPU memory, up to 128; 8 on the CPU).")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="CPU threads decoding and resizing the next images and videos.")] = 4,
    system: SystemOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = DEFAULTS["device"],
    dtype: DtypeOpt = DEFAULTS["dtype"],
    attn: AttnOpt = DEFAULTS["attn"],
    quantize: QuantizeOpt = None,
    min_pixels: MinPixelsOpt = None,
    max_pixels: MaxPixelsOpt = None,
    resized_height: ResizedHeightOpt = None,
    resized_width: ResizedWidthOpt = None,
    fps: FpsOpt = None,
    nframes: NFramesOpt = None,
    min_frames: MinFramesOpt = None,
    max_frames: MaxFramesOpt = DEFAULTS["max_frames"],
    start: StartOpt = None,
    end: EndOpt = None,
    total_pixels: TotalPixelsOpt = DEFAULTS["total_pixels"],
    video_backend: VideoBackendOpt = DEFAULTS["video_backend"],
    max_new_tokens: MaxNewTokensOpt = DEFAULTS["max_new_tokens"],
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    quiet: QuietOpt = False,
    verbose: BatchVerboseOpt = False,
    timeout: TimeoutOpt = DEFAULTS["timeout"],
    max_download: MaxDownloadOpt = DEFAULTS["max_download"],
    server: ServerOpt = None,
    no_server: NoServerOpt = False,
    api_key: ApiKeyOpt = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency", min=1, show_default=False, rich_help_panel="Session", help="Requests kept in flight to a server (retried with backoff on transient failures). Default: 4 to a --server, 32 to a local session (its engine batches them; the rest of its queue is left to one-liners).")] = None,
) -> None:
    """Caption many images and videos: JSON Lines on stdout, or a .jsonl/.csv file, or sidecar .txt files.

    Rerunning the same command skips what is done. A file named .mp4, .mov, .m4v, .mkv, .webm or .avi is
    read as a video (--fps, --max-frames ... sample it), any other as an image.

    Exit status:
      0    every item succeeded
      5    finished, but some items failed (each has a record with its error)
      7    the output cannot be written (another run holds -o, a full disk)
      130  interrupted (every answer finished so far is kept)

    Example: qwen2vl batch photos/ -r -o captions.jsonl
    """
    from ..batch.inputs import collect_items, parse_extensions
    from ..batch.runner import BatchConfig, Results, run_batch
    from ..batch.sinks import SidecarSink, open_output, sidecar_extension
    from ..video import VideoOptions, require_backend

    env = Environment.from_system(quiet=quiet)
    if not inputs and not manifest:
        raise UsageError("batch", "give INPUT paths, - for a list on stdin, or --manifest FILE")
    if manifest == "-" and "-" in (inputs or []):
        raise UsageError("-", "stdin is read once: pipe in either the list of sources or the manifest, not both")
    extensions = parse_extensions(ext)
    if sidecar:
        sidecar_ext = sidecar_extension(sidecar_ext, tuple({*extensions, *DEFAULT_EXTENSIONS}))
    items = collect_items(inputs or [], manifest=manifest, recursive=recursive, extensions=extensions, note=env.note)
    kinds = {item.kind for item in items}
    videos = VideoOptions(fps, nframes, min_frames, max_frames, start, end, min_pixels, max_pixels, total_pixels,
                          resized_height, resized_width, video_backend)
    if "video" in kinds:
        require_backend(video_backend)
    config = BatchConfig(
        prompt=prompt, system=system, limits=FetchLimits(timeout, max_download), batch_size=batch_size,
        images=common.image_options(min_pixels, max_pixels, resized_height, resized_width, images="image" in kinds,
                                    videos="video" in kinds),
        videos=videos, workers=workers,
        generation=common.generation_options(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                                             stop))
    session = common.backend(common.model_spec(model, device, dtype, attn, quantize), server, no_server, api_key, concurrency)
    fields = ["prompt"] * any(item.prompt for item in items) + sorted({key for item in items for key in item.extra})
    sinks = []
    if sidecar:  # alone, the answers of URLs and stdin (no file to sit beside) go to stdout
        elsewhere = open_output(None, fields, overwrite=False, retry_errors=False, note=env.note) if output is None else None
        sinks.append(SidecarSink(sidecar_ext, caption_prefix, caption_suffix, overwrite, elsewhere, items, env.note))
    if output is not None or not sidecar:  # (after the sidecars' checks: a refused run leaves -o unlocked)
        sinks.append(open_output(output, fields, overwrite=overwrite, retry_errors=retry_errors, note=env.note))
    on_failure = None if len(sinks) > 1 or not sidecar else lambda source, reason: env.note(f"failed: {source}: {reason}")
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # kill: finish writing, then exit 130
    try:
        unit = "images" if kinds <= {"image"} else "videos" if kinds == {"video"} else "items"
        with BatchProgress(env, len(items), unit) as progress:
            results = Results(sinks, progress.summary, progress.advance, on_failure)

            def started(todo: int, at_once: int) -> None:  # the model is loaded
                if verbose:
                    progress.note(session.describe_weights())
                progress.start(todo, at_once)

            notes = MediaNotes(progress.note, everyone=verbose)
            summary = run_batch(items, session, config, results, on_start=started, on_note=notes)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for sink in sinks:
            sink.close()
    notes.close(env.note)
    env.note(summary.line())
    if summary.interrupted:
        raise typer.Exit(ExitStatus.INTERRUPTED)
    if summary.any_failed:
        raise typer.Exit(ExitStatus.PARTIAL)


class MediaNotes:
    """The items' media notes (frames capped at --max-frames, a server that reads fewer): the first SHOWN on
    stderr, then a count of the rest at the end (--verbose: every one), not a line per clip of a folder."""

    SHOWN = 3

    def __init__(self, say, everyone: bool = False) -> None:
        self.say, self.everyone, self.said, self.held_back = say, everyone, 0, 0

    def __call__(self, text: str) -> None:
        if self.everyone or self.said < self.SHOWN:
            self.said += 1
            self.say(text)
        else:
            self.held_back += 1

    def close(self, say) -> None:
        if self.held_back:
            say(f"{self.held_back} more notes like these on the items' media (--verbose shows each)")


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


class BatchProgress:
    """A Rich progress bar on stderr (items, images/s or videos/s, ETA) on a terminal; nothing otherwise."""

    def __init__(self, env: Environment, total: int, unit: str = "images") -> None:
        from ..batch.runner import BatchSummary

        self.env, self.total, self.summary = env, total, BatchSummary(unit=unit)
        self.bar = None
        self.task = None

    def __enter__(self) -> "BatchProgress":
        if self.env.quiet or not self.env.stderr_isatty:
            return self
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                            console=self.env.console(stderr=True), transient=False)
        self.bar.__enter__()
        self.task = self.bar.add_task("loading model", total=self.total, rate="")
        return self

    def start(self, todo: int, at_once: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=f"captioning ({at_once} at once)" if at_once else "captioning",
                            completed=self.total - todo)
            self._started = self.bar.get_time()
            self._done_at_start = self.total - todo

    def note(self, text: str) -> None:
        """A line on stderr above the bar (or alone, without one)."""
        if self.bar is not None:
            self.bar.console.print(f"qwen2vl: {printable(text, lines=False)}", markup=False, highlight=False)
        else:
            self.env.note(text)

    def advance(self, count: int) -> None:
        if self.bar is not None:
            elapsed = max(self.bar.get_time() - self._started, 1e-6)
            done = self.bar.tasks[0].completed + count - self._done_at_start
            self.bar.update(self.task, advance=count, rate=f"{done / elapsed:.2f} {self.summary.unit}/s")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
