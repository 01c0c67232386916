"""Options shared by several commands, each defined once as an `Annotated` alias, and their parsers."""

from __future__ import annotations

import math
import re
from typing import Annotated

import typer

from ..types import ATTN_IMPLEMENTATIONS, DEFAULT_MAX_NEW_TOKENS, DEVICES, DTYPES
from ..sources import DEFAULT_MAX_DOWNLOAD, DEFAULT_TIMEOUT_S, PATCH_FACTOR, encodable
from ..video import DEFAULT_MAX_FRAMES, DEFAULT_TOTAL_PIXELS, DEFAULT_VIDEO_MAX_DOWNLOAD

_PRODUCT_RE = re.compile(r"^\s*\d+(\s*[*x]\s*\d+)*\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)


def finite(value: float | None) -> float | None:
    """Every number option's check beside its range: click's float ranges let nan through (and inf where open)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a number.")
    return value


def utf8_text(value: str | None) -> str | None:
    """Every text option's check: bytes that are not UTF-8 (a terminal in another encoding) reach Python as
    surrogate escapes, which no tokenizer takes."""
    if value is not None and not encodable(value):
        raise typer.BadParameter("not valid UTF-8 text (typed in another encoding?)")
    return value


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def stop_texts(values: list[str] | None) -> list[str] | None:
    """--stop's reading: UTF-8; \\n, \\t and \\\\ stand for a newline, a tab and a backslash (a shell passes '\\n'
    as two characters). Empty or too many: common.generation_options says so."""
    return [re.sub(r"\\([nt\\])", lambda match: _ESCAPES[match.group(1)], utf8_text(value)) for value in values or ()]


MODEL_PANEL = "Model"
VISION_PANEL = "Resolution"
GEN_PANEL = "Generation"
OUTPUT_PANEL = "Output"
FETCH_PANEL = "Fetching"


def parse_pixels(value: str | int | None) -> int | None:
    """'1280*28*28' or '1003520' -> 1003520."""
    if value is None or isinstance(value, int):
        return value
    if not _PRODUCT_RE.match(value):
        raise typer.BadParameter(f"{value!r} is not a pixel count (an integer or a product like 1280*28*28)")
    result = 1
    for factor in re.split(r"[*x]", value.replace(" ", "")):
        result *= int(factor)
    if result <= 0:
        raise typer.BadParameter(f"{value!r} must be positive")
    return result


def parse_bytes(value: str | int | None) -> int | None:
    """'100MB', '1.5GiB', '500k' or '1048576' -> bytes."""
    if value is None or isinstance(value, int):
        return value
    match = _SIZE_RE.match(value)
    if not match:
        raise typer.BadParameter(f"{value!r} is not a size (e.g. 100MB, 2GiB, 500000)")
    unit = (match.group(2) or "b").lower()[:1]
    scale = {"b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}[unit]
    size = int(float(match.group(1)) * scale)
    if size < 1:  # a cap of nothing refuses every input (or request) there is
        raise typer.BadParameter(f"{value!r}: a size of at least 1 byte")
    return size


def size_text(size: int) -> str:
    """104857600 -> '100MB' (parse_bytes' units: 1024-based), for defaults as help and man pages show them."""
    for unit, scale in (("GB", 1024 ** 3), ("MB", 1024 ** 2), ("KB", 1024)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


def parse_duration(text: str) -> float | None:
    """'10m', '90s', '1h', '0' (unload at once); 'never' or -1: keep the model loaded."""
    text = text.strip().lower()
    if text in ("never", "forever", "-1", "inf"):
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?", text)
    if not match:
        raise typer.BadParameter(f"{text!r} is not a duration (e.g. 30s, 10m, 1h, never)")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]
    return float(match.group(1)) * scale


def _checked_duration(value: str) -> str:
    """A --keep-alive value, checked when parsed (even where no session is started)."""
    parse_duration(value)
    return value


# ---- model ---------------------------------------------------------------------------------------
ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", metavar="ID|DIR", rich_help_panel=MODEL_PANEL, show_default=False,
    help="Hugging Face model id or local checkpoint directory "
         "(default: $QWEN2VL_MODEL, else Qwen/Qwen2-VL-2B-Instruct).")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", metavar="|".join(DEVICES) + "|cuda:N", rich_help_panel=MODEL_PANEL,
    help="Where the model runs; auto picks CUDA, then MPS, then the CPU.")]
DtypeOpt = Annotated[str, typer.Option(
    "--dtype", metavar="|".join(DTYPES), rich_help_panel=MODEL_PANEL,
    help="Weight precision; auto is bfloat16 on CUDA, float16 on MPS, float32 on the CPU.")]
AttnOpt = Annotated[str, typer.Option(
    "--attn", metavar="|".join(ATTN_IMPLEMENTATIONS), rich_help_panel=MODEL_PANEL,
    help="Attention kernel; auto uses flash_attention_2 when installed on CUDA, else sdpa.")]
QuantizeOpt = Annotated[str | None, typer.Option(
    "--quantize", metavar="4bit|8bit", rich_help_panel=MODEL_PANEL,
    help="Quantize a float checkpoint's language model on load (bitsandbytes; the vision tower stays as it "
         "is), for GPUs that cannot hold it whole. GPTQ and AWQ checkpoints need no option.")]

# ---- resolution ----------------------------------------------------------------------------------
MinPixelsOpt = Annotated[int | None, typer.Option(
    "--min-pixels", parser=parse_pixels, metavar="N", rich_help_panel=VISION_PANEL, show_default=False,
    help="Smallest area of an image (or video frame) in pixels, e.g. 256*28*28 "
         "(default: 4*28*28 for images, 128*28*28 for frames).")]
MaxPixelsOpt = Annotated[int | None, typer.Option(
    "--max-pixels", parser=parse_pixels, metavar="N", rich_help_panel=VISION_PANEL, show_default=False,
    help="Largest area of an image (or video frame) in pixels, e.g. 1280*28*28; one token per 28x28 "
         "pixels (default: 16384*28*28 for images, 768*28*28 for frames).")]
ResizedHeightOpt = Annotated[int | None, typer.Option(
    "--resized-height", min=1, metavar="PX", rich_help_panel=VISION_PANEL,
    help="Exact height (rounded to a multiple of 28); needs --resized-width.")]
ResizedWidthOpt = Annotated[int | None, typer.Option(
    "--resized-width", min=1, metavar="PX", rich_help_panel=VISION_PANEL,
    help="Exact width (rounded to a multiple of 28); needs --resized-height.")]

# ---- video ---------------------------------------------------------------------------------------
VIDEO_PANEL = "Video"
FpsOpt = Annotated[float | None, typer.Option(
    "--fps", min=0.01, callback=finite, rich_help_panel=VIDEO_PANEL, show_default=False,
    help="Frames sampled per second of video (default: 2); not with --nframes.")]
NFramesOpt = Annotated[int | None, typer.Option(
    "--nframes", min=2, rich_help_panel=VIDEO_PANEL, help="Exactly this many frames (rounded to even); not with --fps.")]
MinFramesOpt = Annotated[int | None, typer.Option(
    "--min-frames", min=1, rich_help_panel=VIDEO_PANEL, show_default=False,
    help="At least this many frames with --fps (default: 4).")]
MaxFramesOpt = Annotated[int, typer.Option(
    "--max-frames", min=2, rich_help_panel=VIDEO_PANEL, help="At most this many frames with --fps.")]
StartOpt = Annotated[float | None, typer.Option(
    "--start", min=0.0, callback=finite, metavar="SECONDS", rich_help_panel=VIDEO_PANEL, help="Start of the clip to watch.")]
EndOpt = Annotated[float | None, typer.Option(
    "--end", min=0.0, callback=finite, metavar="SECONDS", rich_help_panel=VIDEO_PANEL, help="End of the clip to watch.")]
TotalPixelsOpt = Annotated[int, typer.Option(
    "--total-pixels", parser=parse_pixels, metavar="N", rich_help_panel=VIDEO_PANEL,
    help="Pixel budget of all frames together; frames shrink to fit (bounds a video near N/784 tokens).")]
VideoBackendOpt = Annotated[str, typer.Option(
    "--video-backend", metavar="auto|decord|pyav|torchcodec", rich_help_panel=VIDEO_PANEL,
    help="Decoder; auto tries decord, torchcodec (when installed), then PyAV.")]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", rich_help_panel=OUTPUT_PANEL,
    help="Say on stderr what the model will see (frames, times, resolution, tokens) and which weights answer.")]
BatchVerboseOpt = Annotated[bool, typer.Option(  # batch's: no per-item facts above its progress bar
    "--verbose", "-v", rich_help_panel=OUTPUT_PANEL,
    help="Say on stderr which weights answer, where the load's time went, and every item's media note (without "
         "it, the first 3).")]

# ---- generation ----------------------------------------------------------------------------------
MaxNewTokensOpt = Annotated[int, typer.Option(
    "--max-new-tokens", "-n", min=1, rich_help_panel=GEN_PANEL, help="Longest answer, in tokens.")]
TemperatureOpt = Annotated[float | None, typer.Option(
    "--temperature", "-t", min=0.0, max=2.0, callback=finite, rich_help_panel=GEN_PANEL,
    help="Sample with this temperature; 0 or unset decodes greedily (deterministic).")]
TopPOpt = Annotated[float | None, typer.Option(
    "--top-p", min=0.0, max=1.0, callback=finite, rich_help_panel=GEN_PANEL, help="Nucleus sampling; turns sampling on.")]
TopKOpt = Annotated[int | None, typer.Option(
    "--top-k", min=1, rich_help_panel=GEN_PANEL, help="Top-k sampling; turns sampling on.")]
RepetitionPenaltyOpt = Annotated[float | None, typer.Option(
    "--repetition-penalty", min=0.0, max=10.0, callback=finite, rich_help_panel=GEN_PANEL,
    help="Penalty above 1.0 discourages repeats (above 0).")]
SeedOpt = Annotated[int | None, typer.Option(
    "--seed", min=0, max=2 ** 32 - 1, rich_help_panel=GEN_PANEL, help="Random seed, for reproducible sampling.")]
StopOpt = Annotated[list[str] | None, typer.Option(
    "--stop", metavar="TEXT", callback=stop_texts, rich_help_panel=GEN_PANEL, show_default=False,
    help="End the answer where this text first appears, leaving it out; repeatable. \\n and \\t stand for a "
         "newline and a tab: --stop '\\n' gives one line.")]

# ---- prompt --------------------------------------------------------------------------------------
SystemOpt = Annotated[str | None, typer.Option(
    "--system", "-s", callback=utf8_text, help="System message (default: the model's, \"You are a helpful assistant.\").")]
VisionIdsOpt = Annotated[bool, typer.Option(
    "--vision-ids", help="Label inputs 'Picture 1:', 'Picture 2:' (and 'Video 1:') in the prompt.")]

# ---- output --------------------------------------------------------------------------------------
JsonOpt = Annotated[bool, typer.Option(
    "--json", rich_help_panel=OUTPUT_PANEL,
    help="Print one JSON object: text, sources, prompt, model, usage, timings.")]
NoStreamOpt = Annotated[bool, typer.Option(
    "--no-stream", rich_help_panel=OUTPUT_PANEL, help="Print the answer once it is complete.")]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", rich_help_panel=OUTPUT_PANEL, help="No spinner or notes on stderr; errors still show.")]

# ---- session -------------------------------------------------------------------------------------
SERVER_PANEL = "Session"
ServerOpt = Annotated[str | None, typer.Option(
    "--server", metavar="URL", envvar="QWEN2VL_SERVER", rich_help_panel=SERVER_PANEL, show_envvar=True,
    help="Send the work to this OpenAI-compatible server (qwen2vl serve, vLLM, SGLang; host:port alone is http). "
         "With no --model or QWEN2VL_MODEL, the model it serves answers (where it serves one).")]
NoServerOpt = Annotated[bool, typer.Option(
    "--no-server", rich_help_panel=SERVER_PANEL,
    help="Load the model in this process: use no running qwen2vl session and start none.")]
KeepAliveOpt = Annotated[str, typer.Option(
    "--keep-alive", metavar="DURATION", rich_help_panel=SERVER_PANEL,
    callback=_checked_duration,
    help="With no session running for the model, start one in the background and answer through it: later "
         "commands reuse it, and it ends after this long idle (30s, 5m, 1h). 0 answers in this process and "
         "starts none (as QWEN2VL_AUTOSTART=0 does).")]
ApiKeyOpt = Annotated[str | None, typer.Option(
    "--api-key", metavar="KEY", envvar="QWEN2VL_API_KEY", rich_help_panel=SERVER_PANEL, show_envvar=True,
    help="Bearer token for the server.")]

# ---- fetching ------------------------------------------------------------------------------------
TimeoutOpt = Annotated[float, typer.Option(
    "--timeout", min=0.1, callback=finite, metavar="SECONDS", rich_help_panel=FETCH_PANEL,
    help="Deadline for a whole http(s) download (connect, every read, the transfer).")]
MaxDownloadOpt = Annotated[int, typer.Option(
    "--max-download", parser=parse_bytes, metavar="SIZE", rich_help_panel=FETCH_PANEL,
    help="Largest input read: http(s) download, local image file or stdin, e.g. 100MB.")]

DEFAULTS = dict(
    # sizes as the help and man pages show them ("100MB", "24576*28*28"; each option's parser makes the number)
    max_frames=DEFAULT_MAX_FRAMES, total_pixels=f"{DEFAULT_TOTAL_PIXELS // PATCH_FACTOR ** 2}*28*28", video_backend="auto",
    video_max_download=size_text(DEFAULT_VIDEO_MAX_DOWNLOAD),
    device="auto", dtype="auto", attn="auto", max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
    timeout=DEFAULT_TIMEOUT_S, max_download=size_text(DEFAULT_MAX_DOWNLOAD),
)
