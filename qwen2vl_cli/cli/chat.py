"""`describe`, `ask` and `video`: one conversation about images and videos, answered on stdout."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import UsageError
from ..render import Environment, OutputOptions
from ..types import ChatRequest
from ..sources import FetchLimits, ImageOptions
from . import common
from .options import (DEFAULTS, ApiKeyOpt, AttnOpt, DeviceOpt, DtypeOpt, EndOpt, FpsOpt, JsonOpt, MaxDownloadOpt,
                      MaxFramesOpt, MaxNewTokensOpt, MaxPixelsOpt, MinFramesOpt, MinPixelsOpt, ModelOpt, NFramesOpt,
                      KeepAliveOpt, NoServerOpt, NoStreamOpt, QuantizeOpt, QuietOpt, RepetitionPenaltyOpt,
                      ResizedHeightOpt, ResizedWidthOpt, SeedOpt, ServerOpt, StartOpt, StopOpt, SystemOpt,
                      TemperatureOpt, TimeoutOpt, TopKOpt, TopPOpt, TotalPixelsOpt, VerboseOpt, VideoBackendOpt,
                      VisionIdsOpt, utf8_text)

DEFAULT_DESCRIBE_PROMPT = "Describe this image."
DEFAULT_VIDEO_QUESTION = "Describe this video."

SOURCE_HELP = ("Image: a path, file:// or http(s) URL, data URI, base64 string, or - for stdin (its bytes, base64 "
               "or a data URI).")
VIDEO_HELP = ("Video: a file (mp4, mkv, webm, mov, avi), a file:// or http(s) URL, a data URI, - for stdin, a "
              "directory of frame images, or a quoted glob of frame images.")


def describe(
    sources: Annotated[list[str], typer.Argument(metavar="SOURCE", help=SOURCE_HELP + " Several go into one conversation.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", "--question", "-q", callback=utf8_text, help="What to ask of the image(s).")] = DEFAULT_DESCRIBE_PROMPT,
    system: SystemOpt = None,
    vision_ids: VisionIdsOpt = False,
    model: ModelOpt = None,
    device: DeviceOpt = DEFAULTS["device"],
    dtype: DtypeOpt = DEFAULTS["dtype"],
    attn: AttnOpt = DEFAULTS["attn"],
    quantize: QuantizeOpt = None,
    min_pixels: MinPixelsOpt = None,
    max_pixels: MaxPixelsOpt = None,
    resized_height: ResizedHeightOpt = None,
    resized_width: ResizedWidthOpt = None,
    max_new_tokens: MaxNewTokensOpt = DEFAULTS["max_new_tokens"],
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    json_output: JsonOpt = False,
    no_stream: NoStreamOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
    timeout: TimeoutOpt = DEFAULTS["timeout"],
    max_download: MaxDownloadOpt = DEFAULTS["max_download"],
    server: ServerOpt = None,
    no_server: NoServerOpt = False,
    keep_alive: KeepAliveOpt = common.DEFAULT_KEEP_ALIVE,
    api_key: ApiKeyOpt = None,
) -> None:
    """Describe one or more images.

    Example: qwen2vl describe photo.jpg
    """
    env = Environment.from_system(quiet=quiet)
    images = common.image_options(min_pixels, max_pixels, resized_height, resized_width)
    generation = common.generation_options(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop)
    spec = common.model_spec(model, device, dtype, attn, quantize)
    inputs = common.Inputs(sources, images, FetchLimits(timeout, max_download), text_flag="-p")
    session = common.backend(spec, server, no_server, api_key, env=env, keep_alive=keep_alive, inputs=inputs)
    request = ChatRequest(prompt=prompt, media=common.media(session, inputs, env), system=system,
                          vision_ids=vision_ids, generation=generation)
    common.answer(session, request, spec, env, OutputOptions(json=json_output, stream=not no_stream), verbose)


def ask(
    sources: Annotated[list[str] | None, typer.Argument(metavar="SOURCE", help=SOURCE_HELP + " None: a text-only chat.")] = None,
    question: Annotated[str | None, typer.Option("--question", "-q", "--prompt", "-p", callback=utf8_text, help="The question to answer (required).")] = None,
    videos: Annotated[list[str] | None, typer.Option("--video", metavar="SOURCE", help=VIDEO_HELP + " Repeatable; videos follow the images.")] = None,
    system: SystemOpt = None,
    vision_ids: VisionIdsOpt = False,
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
    json_output: JsonOpt = False,
    no_stream: NoStreamOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    timeout: TimeoutOpt = DEFAULTS["timeout"],
    max_download: MaxDownloadOpt = DEFAULTS["max_download"],
    server: ServerOpt = None,
    no_server: NoServerOpt = False,
    keep_alive: KeepAliveOpt = common.DEFAULT_KEEP_ALIVE,
    api_key: ApiKeyOpt = None,
) -> None:
    """Ask a question about images and videos, or chat with no media at all.

    Example: qwen2vl ask a.jpg b.jpg -q "What differs between these pictures?"
    """
    from ..video import VideoOptions

    if question is None:
        raise _missing_question(sources or [])
    env = Environment.from_system(quiet=quiet)
    limits = FetchLimits(timeout, max_download)
    images = common.image_options(min_pixels, max_pixels, resized_height, resized_width, images=bool(sources),
                                  videos=bool(videos))
    video_options = VideoOptions(fps, nframes, min_frames, max_frames, start, end, min_pixels, max_pixels,
                                 total_pixels, resized_height, resized_width, video_backend)
    generation = common.generation_options(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop)
    spec = common.model_spec(model, device, dtype, attn, quantize)
    inputs = common.Inputs(sources or [], images, limits, videos or [], video_options, text_flag="-q")
    session = common.backend(spec, server, no_server, api_key, env=env, keep_alive=keep_alive, inputs=inputs)
    request = ChatRequest(prompt=question, media=common.media(session, inputs, env, verbose), system=system,
                          vision_ids=vision_ids, generation=generation)
    common.answer(session, request, spec, env, OutputOptions(json=json_output, stream=not no_stream), verbose)


def _missing_question(sources: list[str]) -> UsageError:
    """-q is required; a question typed as the last SOURCE (`ask photo.jpg "What is this?"`) is shown where it goes."""
    import shlex

    last = sources[-1] if sources else ""
    if common.reads_as_prose(last):
        return UsageError("--question", "missing; the question goes after -q: "
                                        + shlex.join(["qwen2vl", "ask", *sources[:-1], "-q", last]))
    return UsageError("--question", 'missing: give the question with -q, e.g. -q "What is in this picture?"')


def video(
    source: Annotated[str, typer.Argument(metavar="SOURCE", help=VIDEO_HELP)],
    question: Annotated[str, typer.Option("--question", "-q", "--prompt", "-p", callback=utf8_text, help="What to ask of the video.")] = DEFAULT_VIDEO_QUESTION,
    system: SystemOpt = None,
    model: ModelOpt = None,
    device: DeviceOpt = DEFAULTS["device"],
    dtype: DtypeOpt = DEFAULTS["dtype"],
    attn: AttnOpt = DEFAULTS["attn"],
    quantize: QuantizeOpt = None,
    fps: FpsOpt = None,
    nframes: NFramesOpt = None,
    min_frames: MinFramesOpt = None,
    max_frames: MaxFramesOpt = DEFAULTS["max_frames"],
    start: StartOpt = None,
    end: EndOpt = None,
    min_pixels: MinPixelsOpt = None,
    max_pixels: MaxPixelsOpt = None,
    total_pixels: TotalPixelsOpt = DEFAULTS["total_pixels"],
    resized_height: ResizedHeightOpt = None,
    resized_width: ResizedWidthOpt = None,
    video_backend: VideoBackendOpt = DEFAULTS["video_backend"],
    max_new_tokens: MaxNewTokensOpt = DEFAULTS["max_new_tokens"],
    temperature: TemperatureOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    seed: SeedOpt = None,
    stop: StopOpt = None,
    json_output: JsonOpt = False,
    no_stream: NoStreamOpt = False,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
    timeout: TimeoutOpt = DEFAULTS["timeout"],
    max_download: MaxDownloadOpt = DEFAULTS["video_max_download"],
    server: ServerOpt = None,
    no_server: NoServerOpt = False,
    keep_alive: KeepAliveOpt = common.DEFAULT_KEEP_ALIVE,
    api_key: ApiKeyOpt = None,
) -> None:
    """Describe a video or answer a question about it.

    Example: qwen2vl video clip.mp4 -q "What happens after the door opens?" --fps 1
    """
    from ..video import VideoOptions

    env = Environment.from_system(quiet=quiet)
    common.image_options(min_pixels, max_pixels, resized_height, resized_width, images=False, videos=True)
    options = VideoOptions(fps, nframes, min_frames, max_frames, start, end, min_pixels, max_pixels,
                           total_pixels, resized_height, resized_width, video_backend)
    generation = common.generation_options(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop)
    spec = common.model_spec(model, device, dtype, attn, quantize)
    inputs = common.Inputs([], ImageOptions(), FetchLimits(timeout, max_download), [source], options)
    session = common.backend(spec, server, no_server, api_key, env=env, keep_alive=keep_alive, inputs=inputs)
    request = ChatRequest(prompt=question, system=system, media=common.media(session, inputs, env, verbose),
                          generation=generation)
    common.answer(session, request, spec, env, OutputOptions(json=json_output, stream=not no_stream), verbose)
