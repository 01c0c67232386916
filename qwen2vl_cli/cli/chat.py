"""`describe` and `ask`: one conversation about images (or plain text), answered on stdout."""

from __future__ import annotations

from typing import Annotated

import typer

from ..render import Environment, OutputOptions
from ..session import ChatRequest
from ..sources import FetchLimits
from . import common
from .options import (DEFAULTS, AttnOpt, DeviceOpt, DtypeOpt, JsonOpt, MaxDownloadOpt, MaxNewTokensOpt,
                      MaxPixelsOpt, MinPixelsOpt, ModelOpt, NoStreamOpt, QuietOpt, RepetitionPenaltyOpt,
                      ResizedHeightOpt, ResizedWidthOpt, SeedOpt, SystemOpt, TemperatureOpt, TimeoutOpt,
                      TopKOpt, TopPOpt, VisionIdsOpt)

DEFAULT_DESCRIBE_PROMPT = "Describe this image."

SOURCE_HELP = "Image: a path, file:// or http(s) URL, data URI, base64 string, or - for stdin."


def describe(
    sources: Annotated[list[str], typer.Argument(metavar="SOURCE", help=SOURCE_HELP + " Several go into one conversation.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="What to ask of the image(s).")] = DEFAULT_DESCRIBE_PROMPT,
    system: SystemOpt = None,
    vision_ids: VisionIdsOpt = False,
    model: ModelOpt = None,
    device: DeviceOpt = DEFAULTS["device"],
    dtype: DtypeOpt = DEFAULTS["dtype"],
    attn: AttnOpt = DEFAULTS["attn"],
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
    json_output: JsonOpt = False,
    no_stream: NoStreamOpt = False,
    quiet: QuietOpt = False,
    timeout: TimeoutOpt = DEFAULTS["timeout"],
    max_download: MaxDownloadOpt = DEFAULTS["max_download"],
) -> None:
    """Describe one or more images.

    Example: qwen2vl describe photo.jpg
    """
    _run(sources, prompt, **locals_without(locals(), "sources", "prompt"))


def ask(
    sources: Annotated[list[str] | None, typer.Argument(metavar="SOURCE", help=SOURCE_HELP + " None: a text-only chat.")] = None,
    question: Annotated[str, typer.Option("--question", "-q", help="The question to answer.")] = ...,
    system: SystemOpt = None,
    vision_ids: VisionIdsOpt = False,
    model: ModelOpt = None,
    device: DeviceOpt = DEFAULTS["device"],
    dtype: DtypeOpt = DEFAULTS["dtype"],
    attn: AttnOpt = DEFAULTS["attn"],
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
    json_output: JsonOpt = False,
    no_stream: NoStreamOpt = False,
    quiet: QuietOpt = False,
    timeout: TimeoutOpt = DEFAULTS["timeout"],
    max_download: MaxDownloadOpt = DEFAULTS["max_download"],
) -> None:
    """Ask a question about images, or chat with no image at all.

    Example: qwen2vl ask a.jpg b.jpg -q "What differs between these pictures?"
    """
    _run(sources or [], question, **locals_without(locals(), "sources", "question"))


def locals_without(values: dict, *names: str) -> dict:
    return {k: v for k, v in values.items() if k not in names}


def _run(sources: list[str], prompt: str, *, system, vision_ids, model, device, dtype, attn, min_pixels,
         max_pixels, resized_height, resized_width, max_new_tokens, temperature, top_p, top_k,
         repetition_penalty, seed, json_output, no_stream, quiet, timeout, max_download) -> None:
    env = Environment.from_system(quiet=quiet)
    images = common.image_options(min_pixels, max_pixels, resized_height, resized_width)
    media = common.resolve_images(sources, images, FetchLimits(timeout, max_download))
    request = ChatRequest(
        prompt=prompt, media=media, system=system, vision_ids=vision_ids,
        generation=common.generation_options(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed),
    )
    spec = common.model_spec(model, device, dtype, attn)
    common.answer(request, spec, env, OutputOptions(json=json_output, stream=not no_stream))
