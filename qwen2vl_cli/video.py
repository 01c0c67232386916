"""Videos and frame sequences -> the frames the model sees, sampled and sized as qwen-vl-utils does.

Sources: a video file (path, file:// or http(s) URL), a directory of frame images (natural order), or a
glob of frame images. Frame sampling uses qwen-vl-utils' own arithmetic (`smart_nframes`,
`calculate_video_frame_range`); decoding goes through decord, torchcodec or our PyAV reader, which
replaces qwen-vl-utils' torchvision fallback (torchvision 0.29 has no `read_video`).
Every failure raises InputError (exit 3); nothing here is imported for --help.
"""

from __future__ import annotations

import glob
import math
import os
import re
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, UsageError
from .sources import (PATCH_FACTOR, FetchLimits, as_sent, check_regular, decode_data_uri, decode_image, display_name,
                      download, file_url_to_path, on_grid, read_local, read_stdin, refuse_empty,
                      refuse_other_urls, scheme_of)

BACKENDS = ("auto", "decord", "pyav", "torchcodec")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
VIDEO_EXTENSIONS = ("mp4", "mov", "m4v", "mkv", "webm", "avi")  # what `batch` reads as a video (phones' and the web's)
DEFAULT_FPS = 2.0  # qwen-vl-utils' FPS
DEFAULT_MAX_FRAMES = 256
DEFAULT_TOTAL_PIXELS = 24576 * 28 * 28  # bounds a video near 24k tokens, whatever its length
DEFAULT_VIDEO_MAX_DOWNLOAD = 2 * 1024 ** 3
MAX_FRAMES = 768  # qwen-vl-utils' FPS_MAX_FRAMES: the most frames one video can give the model
VIDEO_MIN_PIXELS = 128 * 28 * 28  # qwen-vl-utils' per-frame bounds for videos
VIDEO_MAX_PIXELS = 768 * 28 * 28


@dataclass(frozen=True)
class VideoOptions:
    """Sampling and sizing, as qwen-vl-utils takes them per video."""

    fps: float | None = None
    nframes: int | None = None
    min_frames: int | None = None
    max_frames: int | None = DEFAULT_MAX_FRAMES
    start: float | None = None
    end: float | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    total_pixels: int | None = DEFAULT_TOTAL_PIXELS
    resized_height: int | None = None
    resized_width: int | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.fps is not None and self.nframes is not None:
            raise UsageError("--fps/--nframes", "give one or the other, not both")
        if self.min_frames is not None and self.max_frames is not None and self.min_frames > self.max_frames:
            raise UsageError(f"--min-frames {self.min_frames}", f"above --max-frames {self.max_frames}")
        if (self.resized_height is None) != (self.resized_width is None):
            raise UsageError("--resized-height/--resized-width", "give both or neither")
        if self.backend not in BACKENDS:
            raise UsageError("--video-backend", f"{self.backend!r} is not one of {', '.join(BACKENDS)}")

    def sampling_ele(self) -> dict:
        """The keys qwen-vl-utils' smart_nframes and calculate_video_frame_range read."""
        ele: dict = {}
        if self.nframes is not None:
            ele["nframes"] = self.nframes
        else:
            ele["fps"] = self.fps if self.fps is not None else DEFAULT_FPS
            if self.min_frames is not None:
                ele["min_frames"] = self.min_frames
            if self.max_frames is not None:
                ele["max_frames"] = self.max_frames
        if self.start is not None:
            ele["video_start"] = self.start
        if self.end is not None:
            ele["video_end"] = self.end
        return ele


@dataclass
class VideoFrames:
    """What the model will see of one video."""

    source: str
    frames: object  # torch tensor (T, C, H, W), float, sized
    metadata: object  # transformers VideoMetadata
    facts: dict
    notes: list[str]


def is_frame_sequence(source: str) -> bool:
    """A directory of frames, or a glob pattern of frames."""
    if source.startswith(("http://", "https://", "data:")):
        return False
    path = Path(os.path.expanduser(file_url_to_path(source) if source.startswith("file://") else source))
    return path.is_dir() or (not path.exists() and any(c in source for c in "*?["))


def is_video_file(source: str) -> bool:
    """A source named as a video: a path, file:// or http(s) URL ending in a VIDEO_EXTENSIONS suffix (any case),
    or a data:video/ URI. `batch` reads these as videos and every other source as an image."""
    if source[:11].lower() == "data:video/":
        return True
    if source.startswith("data:") or source in ("", "-"):
        return False
    path = urllib.parse.urlsplit(source).path if source.startswith(("http://", "https://")) else source
    return Path(path).suffix.lower().lstrip(".") in VIDEO_EXTENSIONS


def require_backend(choice: str) -> None:
    """A UsageError now where --video-backend names a decoder that is not installed (not one per video)."""
    _readers(choice)


FRAME_LIST_PREFIX = "data:video/jpeg;base64,"  # vLLM's form of a frame list: base64 images joined by commas


def is_frame_list_uri(source: str) -> bool:
    return source[:len(FRAME_LIST_PREFIX)].lower() == FRAME_LIST_PREFIX


def frame_list_uri(frames) -> str:
    """Sized frames (T, C, H, W, whole values) -> one data URI of lossless PNG frames, the frame-list form
    vLLM reads (despite its name, its frames may be any image format) and `qwen2vl serve` reads too."""
    import base64
    import io

    from PIL import Image

    parts = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame.permute(1, 2, 0).round().clamp(0, 255).byte().numpy()).save(buffer, "PNG",
                                                                                            compress_level=1)
        parts.append(base64.b64encode(buffer.getvalue()).decode())
    return FRAME_LIST_PREFIX + ",".join(parts)


def decode_frame_list(uri: str) -> list:
    """A frame-list data URI -> decoded images, each checked like any image."""
    from .sources import decode_base64

    parts = uri[len(FRAME_LIST_PREFIX):].split(",")
    if len(parts) > MAX_FRAMES:
        raise InputError(display_name(uri), f"{len(parts)} frames, more than {MAX_FRAMES}")
    name = display_name(uri)
    return [decode_image(decode_base64(part, f"{name} frame {i + 1}"), f"{name} frame {i + 1}")
            for i, part in enumerate(parts)]


def frames_as_sent(source: str) -> VideoFrames | None:
    """A frame-list data URI whose frames a client has sized already (one size, sources.on_grid), taken as
    they are; None when they are not, to be sized as usual."""
    import numpy as np
    import torch

    images = decode_frame_list(source)
    width, height = images[0].size
    if any(image.size != (width, height) for image in images) or not on_grid(width, height):
        return None
    frames = torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)
    metadata = {"frames_indices": list(range(len(images))), "total_num_frames": len(images), "fps": DEFAULT_FPS}
    return _result(frames.float(), metadata, DEFAULT_FPS, "frames", display_name(source),
                   Probe(DEFAULT_FPS, len(images), width, height), [])


def natural_key(path: Path) -> list:
    """frame2 before frame10."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def list_frames(source: str) -> list[Path]:
    """The frame files of a directory or glob, in natural order."""
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        try:
            files = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS]
        except PermissionError:
            raise InputError(source, "permission denied") from None
        if not files:
            raise InputError(source, f"directory holds no frame images ({', '.join(FRAME_EXTENSIONS)})")
    else:
        files = [Path(p) for p in glob.glob(os.path.expanduser(source)) if os.path.isfile(p)]
        if not files:
            raise InputError(source, "no files match this pattern")
    return sorted(files, key=natural_key)


def resolve_video(source: str, options: VideoOptions = VideoOptions(), limits: FetchLimits = FetchLimits()) -> VideoFrames:
    """Any video source -> sampled, sized frames with their metadata, or InputError."""
    import logging

    logging.getLogger("qwen_vl_utils").setLevel(logging.ERROR)  # we report reductions ourselves, once
    refuse_empty(source)
    if is_frame_sequence(source):
        return _frames_from_images(source, options)
    name = display_name(source)
    if is_frame_list_uri(source):
        return frames_from_images(decode_frame_list(source), options, name, [], "frames")
    scheme = scheme_of(source)
    if source == "-" or scheme in ("http", "https", "data"):  # decoders want a file: spool the bytes to one
        if source == "-":  # its bytes, or base64 or a data URI of them, as an image on stdin
            name, data, suffix = "stdin", as_sent(read_stdin(limits)), ""
        elif scheme == "data":
            data, suffix = decode_data_uri(source), ""
        else:
            data, suffix = download(source, limits), Path(urllib.parse.urlsplit(source).path).suffix
        with tempfile.NamedTemporaryFile(suffix=suffix) as handle:
            handle.write(data)
            handle.flush()
            return _frames_from_file(handle.name, name, options)
    refuse_other_urls(source, scheme)
    path = file_url_to_path(source) if scheme == "file" else Path(os.path.expanduser(source))
    check_regular(path, name)  # a FIFO or a device would hang or never end in the decoder
    return _frames_from_file(str(path), name, options)


@dataclass
class Probe:
    fps: float
    total_frames: int
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.total_frames / self.fps


def probe(path: str, name: str) -> Probe:
    """Open the container with PyAV: is it a video, with a video stream, and how long is it?"""
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["no streams"]
                raise InputError(name, f"has no video stream ({', '.join(kinds)} only)")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            frames = stream.frames
            if frames <= 0 and fps > 0:
                seconds = (float(stream.duration * stream.time_base) if stream.duration
                           else (container.duration or 0) / 1_000_000)
                frames = int(round(seconds * fps))
            width, height = stream.codec_context.width, stream.codec_context.height
    except InputError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError) as exc:
        # FFmpeg's own words ("Invalid data found when processing input"), not "[Errno -1094995529] ...: PATH"
        reason = getattr(exc, "strerror", None) or str(exc).split(":")[0].strip() or type(exc).__name__
        raise InputError(name, _an_image(path) or f"not a readable video ({reason})") from None
    if fps <= 0 or frames <= 0 or not width or not height:
        raise InputError(name, _an_image(path) or "not a readable video (no frame rate or no frames)")
    return Probe(fps, frames, width, height)


def _an_image(path: str) -> str | None:
    """Where a file FFmpeg cannot play as a video is an image Pillow knows (its header alone), the reason saying so."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            pass
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    return ("an image, not a video: give it as one (`qwen2vl describe`, `ask SOURCE`, an image_url part; a directory "
            "or glob of frames is a video)")


def read_video_pyav(ele: dict):
    """qwen-vl-utils' reader contract, with PyAV: (frames TCHW uint8, metadata dict, sample_fps).

    Decodes once, front to back, keeping only the sampled frames, so long videos stay small in memory.
    """
    import av
    import numpy as np
    import torch
    from qwen_vl_utils.vision_process import calculate_video_frame_range, smart_nframes

    path = ele["video"]
    info = probe(path, path)
    start, end, total = calculate_video_frame_range(ele, info.total_frames, info.fps)
    nframes = smart_nframes(ele, total_frames=total, video_fps=info.fps)
    wanted = torch.linspace(start, end, nframes).round().long().tolist()
    keep: dict[int, np.ndarray] = {}
    last = None
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        if start > 0:  # jump near the start instead of decoding everything before it
            container.seek(int(start / info.fps / stream.time_base), stream=stream, backward=True)
        for frame in container.decode(stream):
            index = (int(round(float(frame.pts * stream.time_base) * info.fps))
                     if frame.pts is not None else (last or 0) + 1)
            last = index
            if index < start:
                continue
            if index in wanted and index not in keep:
                keep[index] = frame.to_ndarray(format="rgb24")
            if index >= wanted[-1]:
                break
    if not keep:
        raise ValueError("no frames could be decoded")
    if last is not None and wanted[-1] - last > info.fps:  # never pad a cut-off video with copies of its last frame
        raise ValueError(f"truncated or corrupt: frames decode only to {last / info.fps:.1f}s of {info.duration:.1f}s "
                         f"(--end {max(1, int(last / info.fps)):d} reads what is there)")
    ordered = []
    for index in wanted:  # a frame the container did not deliver is replaced by the nearest one before it
        nearest = max((k for k in keep if k <= index), default=min(keep))
        ordered.append(keep[nearest])
    video = torch.from_numpy(np.stack(ordered)).permute(0, 3, 1, 2)
    sample_fps = nframes / max(total, 1e-6) * info.fps
    return video, dict(fps=info.fps, frames_indices=wanted, total_num_frames=total, video_backend="pyav"), sample_fps


def _readers(choice: str):
    """The backends to try, in order: decord, torchcodec (when installed), PyAV."""
    import importlib.util

    from .compat import video_readers

    readers = {**video_readers(), "pyav": read_video_pyav}  # in the order they are tried
    usable = [(name, read) for name, read in readers.items()
              if name == "pyav" or importlib.util.find_spec(name) is not None]
    if choice != "auto":
        if choice not in dict(usable):
            raise UsageError("--video-backend", f"{choice} is not installed")
        return [(choice, readers[choice])]
    return usable


def _frames_from_file(path: str, name: str, options: VideoOptions) -> VideoFrames:
    info = probe(path, name)
    ele = {"video": path, **options.sampling_ele()}
    _check_range(options, info, name)
    _check_frame_count(ele, info, name)
    errors, notes = [], []
    for backend, reader in _readers(options.backend):
        try:
            video, metadata, sample_fps = reader(ele)
            break
        except Exception as exc:  # noqa: BLE001 - try the next backend, report all if none works
            errors.append(f"{backend}: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
    else:
        raise InputError(name, "could not decode the video (" + "; ".join(errors) + ")")
    if errors:
        notes.append(f"{name}: fell back to {backend} ({errors[0]})")
    requested = _requested_frames(ele, info)
    if requested is not None and requested > len(metadata["frames_indices"]):
        notes.append(f"{name}: sampled {len(metadata['frames_indices'])} frames instead of {requested} "
                     f"(--max-frames {options.max_frames})")
    return _sized(video, metadata, sample_fps, backend, name, options, info, notes)


def _requested_frames(ele: dict, info: Probe) -> int | None:
    """How many frames --fps asks for over the clip, before --max-frames caps it."""
    if "fps" not in ele:
        return None
    start = ele.get("video_start") or 0.0
    end = min(ele.get("video_end") or info.duration, info.duration)
    return min(int((end - start) * ele["fps"]), int((end - start) * info.fps))


def _check_range(options: VideoOptions, info: Probe, name: str) -> None:
    if options.start is not None and options.start < 0 or options.end is not None and options.end <= 0:
        raise InputError(name, "--start and --end must be positive seconds")
    if options.start is not None and options.start >= info.duration:
        raise InputError(name, f"--start {options.start:g}s is past the end of the video ({info.duration:.2f}s)")
    if options.start is not None and options.end is not None and options.start >= options.end:
        raise InputError(name, f"--start {options.start:g}s is not before --end {options.end:g}s")
    if options.end is not None and options.end > info.duration + 1 / info.fps:
        raise InputError(name, f"--end {options.end:g}s is past the end of the video ({info.duration:.2f}s)")


def _check_frame_count(ele: dict, info: Probe, name: str) -> None:
    from qwen_vl_utils.vision_process import calculate_video_frame_range, smart_nframes

    try:
        _, _, total = calculate_video_frame_range(ele, info.total_frames, info.fps)
        smart_nframes(ele, total_frames=total, video_fps=info.fps)
    except (ValueError, AssertionError) as exc:
        text = str(exc)
        bounds = re.search(r"interval \[(\d+), (\d+)\], but got (\d+)", text)
        if bounds and int(bounds[2]) < int(bounds[1]):
            reason = (f"not enough frames: {bounds[2]} to sample from (in the part --start/--end keep); Qwen2-VL "
                      f"takes at least {bounds[1]} (one frame is an image: qwen2vl describe)")
            raise InputError(name, reason) from None
        if bounds:
            raise InputError(name, f"not enough frames: {bounds[3]} asked for (--nframes/--fps), {bounds[1]} to "
                                   f"{bounds[2]} there") from None
        raise InputError(name, text.splitlines()[0]) from None


def _frames_from_images(source: str, options: VideoOptions) -> VideoFrames:
    """A frame directory or glob: its files in natural order, at most --max-frames of them."""
    import torch

    files = list_frames(source)
    notes = []
    if options.nframes and options.nframes > len(files):
        raise InputError(source, f"not enough frames: {len(files)} found, --nframes {options.nframes} asked for")
    limit = options.nframes or options.max_frames
    if limit and len(files) > limit:
        picks = torch.linspace(0, len(files) - 1, limit).round().long().tolist()
        notes.append(f"{source}: used {limit} of {len(files)} frames "
                     f"(--{'nframes' if options.nframes else 'max-frames'})")
        files = [files[i] for i in picks]
    images = [decode_image(read_local(f, str(f)), str(f)) for f in files]
    return frames_from_images(images, options, source, notes, "frames", [f.name for f in files])


def frames_from_images(images: list, options: VideoOptions, source: str, notes: list[str], backend: str,
                       names: list[str] | None = None) -> VideoFrames:
    """Decoded frames of one video, sized through qwen-vl-utils' own frame-list path (the seeds' form)."""
    from qwen_vl_utils import fetch_video

    names = names or [f"frame {i + 1}" for i in range(len(images))]
    odd = next((i for i, image in enumerate(images) if image.size != images[0].size), None)
    if odd is not None:  # one video has one frame size
        raise InputError(source, f"frames differ in size: {names[0]} is {images[0].width}x{images[0].height}, "
                                 f"{names[odd]} is {images[odd].width}x{images[odd].height}")
    sample_fps = options.fps or DEFAULT_FPS
    ele = {"video": images, "sample_fps": sample_fps, "total_pixels": options.total_pixels or DEFAULT_TOTAL_PIXELS,
           **{k: v for k, v in (("min_pixels", options.min_pixels), ("max_pixels", options.max_pixels),
                                ("resized_height", options.resized_height),
                                ("resized_width", options.resized_width)) if v is not None}}
    try:
        video, metadata = fetch_video(ele, return_video_metadata=True)
    except (ValueError, AssertionError) as exc:
        raise InputError(source, str(exc).splitlines()[0]) from None
    width, height = images[0].size
    info = Probe(sample_fps, len(images), width, height)
    return _result(video, metadata, sample_fps, backend, source, info, notes)


def _sized(video, metadata: dict, sample_fps: float, backend: str, name: str, options: VideoOptions,
           info: Probe, notes: list[str]) -> VideoFrames:
    """Resize every frame as qwen-vl-utils' fetch_video does (same bounds, same interpolation)."""
    from qwen_vl_utils.vision_process import FRAME_FACTOR, smart_resize
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    nframes, _, height, width = video.shape
    min_pixels = options.min_pixels or VIDEO_MIN_PIXELS
    total_pixels = options.total_pixels or 128000 * 28 * 28 * 0.9  # qwen-vl-utils' default
    max_pixels = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    unbounded = max(VIDEO_MAX_PIXELS, int(min_pixels * 1.05))  # the same without --total-pixels
    if options.max_pixels is not None:
        max_pixels, unbounded = min(options.max_pixels, max_pixels), min(options.max_pixels, unbounded)
    try:
        if options.resized_height and options.resized_width:
            size = smart_resize(options.resized_height, options.resized_width, factor=PATCH_FACTOR)
        else:
            size = smart_resize(height, width, factor=PATCH_FACTOR, min_pixels=min_pixels, max_pixels=max_pixels)
            wanted = smart_resize(height, width, factor=PATCH_FACTOR, min_pixels=min_pixels, max_pixels=unbounded)
            if size[0] * size[1] < wanted[0] * wanted[1]:
                notes.append(f"{name}: frames reduced to {size[1]}x{size[0]} to keep {nframes} frames within "
                             f"--total-pixels {int(total_pixels)}")
    except (ValueError, AssertionError) as exc:
        raise InputError(name, str(exc).splitlines()[0]) from None
    frames = transforms.functional.resize(video, list(size), interpolation=InterpolationMode.BICUBIC,
                                          antialias=True).float()
    return _result(frames, metadata, sample_fps, backend, name, info, notes)


def _result(frames, metadata: dict, sample_fps: float, backend: str, name: str, info: Probe,
            notes: list[str]) -> VideoFrames:
    """Package sized frames with the metadata the processor needs and the facts --verbose shows."""
    from transformers.video_utils import VideoMetadata

    nframes, _, height, width = frames.shape
    indices = [int(i) for i in metadata["frames_indices"]]
    meta = VideoMetadata(total_num_frames=int(metadata["total_num_frames"]), fps=float(metadata["fps"]),
                         width=info.width, height=info.height, frames_indices=indices, video_backend=backend)
    facts = {
        "source": name, "backend": backend, "video_fps": round(info.fps, 3),
        "video_frames": info.total_frames, "duration_s": round(info.duration, 3),
        "frames": int(nframes), "sample_fps": round(float(sample_fps), 4),
        "times_s": [round(i / info.fps, 3) for i in indices] if backend != "frames" else None,
        "width": int(width), "height": int(height), "tokens": expected_tokens(nframes, height, width),
    }
    return VideoFrames(name, frames, meta, facts, notes)


def describe_facts(facts: dict) -> str:
    """One --verbose line: what the model will see of a video."""
    times = facts.get("times_s") or []
    span = f", t={times[0]:.2f}..{times[-1]:.2f}s" if times else ""
    return (f"{facts['source']}: {facts['video_frames']} frames at {facts['video_fps']:g} fps "
            f"({facts['duration_s']:.2f}s); sampled {facts['frames']} frames at {facts['sample_fps']:g} fps{span}; "
            f"{facts['width']}x{facts['height']} each; {facts['tokens']} video tokens; backend {facts['backend']}")


def expected_tokens(frames: int, height: int, width: int) -> int:
    return math.ceil(frames / 2) * (height // PATCH_FACTOR) * (width // PATCH_FACTOR)
