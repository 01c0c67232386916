"""What every answering command does after parsing: resolve inputs, get the session, stream, render."""

from __future__ import annotations

from ..errors import UsageError
from ..render import Environment, OutputOptions, render_answer
from ..session import ChatRequest, GenerationOptions, Media, ModelSpec, default_model, get_session
from ..sources import FetchLimits, ImageOptions, display_name, resolve_image
from ..video import VideoOptions, describe_facts


def model_spec(model: str | None, device: str, dtype: str, attn: str) -> ModelSpec:
    return ModelSpec(model=model or default_model(), device=device, dtype=dtype, attn=attn)


def image_options(min_pixels: int | None, max_pixels: int | None, resized_height: int | None,
                  resized_width: int | None) -> ImageOptions:
    """Check the resolution options fit together (usage error otherwise)."""
    if (resized_height is None) != (resized_width is None):
        raise UsageError("--resized-height/--resized-width", "give both or neither")
    if min_pixels and max_pixels and min_pixels > max_pixels:
        raise UsageError("--min-pixels", f"{min_pixels} is larger than --max-pixels {max_pixels}")
    return ImageOptions(min_pixels, max_pixels, resized_height, resized_width)


def generation_options(max_new_tokens: int, temperature: float | None, top_p: float | None,
                       top_k: int | None, repetition_penalty: float | None, seed: int | None) -> GenerationOptions:
    return GenerationOptions(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)


def resolve_images(sources: list[str], options: ImageOptions, limits: FetchLimits) -> list[Media]:
    """Every image source -> Media, in order; the first bad one raises InputError."""
    if sources.count("-") > 1:
        raise UsageError("-", "stdin can be read only once")
    media = []
    for source in sources:
        image = resolve_image(source, options, limits)
        width, height = image.size
        media.append(Media("image", display_name(source), image,
                           facts={"width": width, "height": height, "tokens": width * height // (28 * 28)}))
    return media


def resolve_videos(sources: list[str], options: VideoOptions, limits: FetchLimits, env: Environment,
                   verbose: bool) -> list[Media]:
    """Every video source -> Media; reductions are noted on stderr, --verbose says what the model sees."""
    from ..video import resolve_video

    media = []
    for source in sources:
        video = resolve_video(source, options, limits)
        for note in video.notes:
            env.note(note)
        if verbose:
            env.note(describe_facts(video.facts))
        media.append(Media("video", video.source, video.frames, metadata=video.metadata, facts=video.facts))
    return media


def answer(request: ChatRequest, spec: ModelSpec, env: Environment, output: OutputOptions) -> None:
    """Load the model (once per process), stream the answer and render it."""
    session = get_session(spec)
    if session.model is None:
        with env.status(f"Loading {spec.model} ..."):
            session.load()
    record = {
        "sources": [m.source for m in request.media],
        "prompt": request.prompt,
        "model": spec.model,
        "timings": {"load_s": round(session.load_s, 4)},
    }
    videos = [m.facts for m in request.media if m.kind == "video"]
    if videos:
        record["videos"] = videos
    render_answer(session.stream(request), env, output, record)
