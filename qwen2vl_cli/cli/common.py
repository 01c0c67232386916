"""What every answering command does after parsing: pick the backend (a running session or the model
in-process), resolve inputs through it, stream, render."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from ..errors import InputError, UsageError
from ..engine.quant import QUANTIZE_CHOICES
from ..render import Environment, OutputOptions, render_answer
from ..types import (ATTN_IMPLEMENTATIONS, DTYPES, MAX_STOP_STRINGS, ChatRequest, GenerationOptions, Media, ModelSpec,
                     default_model)
from ..sources import IMAGE_MIN_PIXELS, PATCH_FACTOR, FetchLimits, ImageOptions
from ..video import VIDEO_MIN_PIXELS, VideoOptions, describe_facts


MAX_CONTEXT = 32768  # Qwen2-VL's positions (max_position_embeddings); the session checks each request exactly


def model_spec(model: str | None, device: str, dtype: str, attn: str, quantize: str | None = None) -> ModelSpec:
    """Checked model options; a local checkpoint directory is named by its absolute path (sessions are found by it)."""
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise UsageError(f"--quantize {quantize}", f"use {' or '.join(QUANTIZE_CHOICES)}")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
        raise UsageError(f"--device {device}", "use auto, cpu, mps, cuda or cuda:N")
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype}", f"use one of {', '.join(DTYPES)}")
    if attn not in ATTN_IMPLEMENTATIONS:
        raise UsageError(f"--attn {attn}", f"use one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    name = model or default_model()
    if Path(os.path.expanduser(name)).is_dir():
        name = str(Path(os.path.expanduser(name)).resolve())
    return ModelSpec(model=name, device=device, dtype=dtype, attn=attn, quantize=quantize,
                     named=bool(model or os.environ.get("QWEN2VL_MODEL")))


DEFAULT_KEEP_ALIVE = "5m"  # how long a session a one-liner starts stays when idle


def server_url(url: str, flag: str) -> str:
    """--server as an http(s) URL with a host (and a port that is one; `host:port` alone is taken as http), or the
    usage error saying what one looks like."""
    import urllib.parse

    if "://" not in url:
        url = "http://" + url
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError as exc:
        raise UsageError(f"{flag} {url}", f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{flag} {url}", "give an http(s) URL, e.g. http://127.0.0.1:8000")
    return url


def backend(spec: ModelSpec, server: str | None, no_server: bool, api_key: str | None, concurrency: int | None = None,
            env: Environment | None = None, keep_alive: str | None = None, inputs: Inputs | None = None):
    """--server URL (or $QWEN2VL_SERVER), else a running local session for this model, else (where `keep_alive`
    is given: the one-liners) one started in the background for this and later commands, else in-process.
    `inputs` are being read meanwhile (see _start_session). `concurrency`: requests in flight to a server (default
    client.DEFAULT_CONCURRENCY to a --server; to a local session SESSION_CONCURRENCY, within half of its queue)."""
    if server and no_server:
        raise UsageError("--server/--no-server", "give one or the other")
    if not no_server:
        from ..client import DEFAULT_CONCURRENCY, SESSION_CONCURRENCY, RemoteSession

        url = server or os.environ.get("QWEN2VL_SERVER")
        if url:
            url = server_url(url, "--server" if server else "QWEN2VL_SERVER")
            return RemoteSession(url, spec.model, api_key, concurrency or DEFAULT_CONCURRENCY, adopt=not spec.named)
        from ..server.registry import find_server

        # a local session was found (or started) by its /health, which proved it ours: not asked again
        found = find_server(spec, api_key)
        if not found and keep_alive is not None:
            found = _start_session(spec, api_key, keep_alive, env, inputs)
        if found:  # a session a command started answers its own key (its record's), a user's the user's
            room = (found.get("health") or {}).get("max_queue") or 2 * SESSION_CONCURRENCY
            return RemoteSession(found["url"], spec.model, found.get("api_key") or api_key,
                                 concurrency or max(1, min(SESSION_CONCURRENCY, room // 2)), kind="qwen2vl")
    from ..engine.session import get_session

    return get_session(spec)


def _start_session(spec: ModelSpec, api_key: str | None, keep_alive: str, env: Environment | None,
                   inputs: Inputs | None = None) -> dict | None:
    """Start a session serving `spec` in the background (a free loopback port, ending itself after `keep_alive`
    idle) and return its record; None where none should start (--keep-alive 0, QWEN2VL_AUTOSTART=0, a model
    that cannot load: the in-process load says why) or it failed to (said on stderr). `inputs` still being read
    (a video's decode, a download) are waited for while the session loads; a bad one is its error and stops the
    session; one already known bad is its error before any session starts."""
    import secrets

    from ..errors import Qwen2VLError
    from ..modelfiles import hub_offline, hub_reachable, local_model_dir, validate_model_dir
    from ..server.config import ServerConfig
    from ..server.registry import Launched, find_server
    from .options import parse_duration

    if inputs is not None and inputs.done():
        inputs.result()

    idle = parse_duration(keep_alive)
    if idle is not None and idle <= 0 or os.environ.get("QWEN2VL_AUTOSTART", "1").strip().lower() in ("0", "no", "off"):
        return None
    folder = local_model_dir(spec.model)
    try:
        if folder is not None:
            validate_model_dir(folder, spec.model)
        elif hub_offline() or not hub_reachable():
            return None
    except Qwen2VLError:
        return None
    # a shared server's limits are not the owner's: its commands are bound only by the context, as in process
    # (an image is at least 4 tokens; a full context of image pixels is ~100 MB of base64)
    # your user's only: with no key of yours, one made here (handed over on its stdin, kept in its state file)
    config = ServerConfig(spec=spec, port=0, api_key=api_key or secrets.token_urlsafe(32), private=api_key is None,
                          keep_alive_s=idle, exit_when_idle=True, max_images=MAX_CONTEXT // 4,
                          max_videos=MAX_CONTEXT // 4, max_body=256 * 1024 ** 2)
    note = env.note if env is not None else lambda text: None
    with contextlib.ExitStack() as held:
        try:
            if env is not None:
                held.enter_context(env.status(f"Loading {spec.model} (in a background session) ..."))
            held.enter_context(_starting(spec))  # one-liners started together (xargs -P) start one session
            found = find_server(spec, api_key)
            if found:
                return found
            launched = Launched(config)
        except (Qwen2VLError, OSError) as exc:  # OSError: a state folder it cannot write in ($QWEN2VL_STATE_DIR)
            return _not_started(note, exc)
        try:
            if inputs is not None:
                inputs.result()
        except BaseException:
            launched.stop()
            raise
        try:
            state = launched.ready()
        except Qwen2VLError as exc:
            return _not_started(note, exc)
    note(f"started a background session for {spec.model} (pid {state['pid']}): later commands answer through "
         f"it; it ends after {keep_alive} idle (`qwen2vl stop` ends it now; --keep-alive 0 starts none)")
    return state


def _not_started(note, exc: BaseException) -> None:
    reason = f"{exc.strerror}: {exc.filename}" if isinstance(exc, OSError) and exc.filename else exc
    note(f"could not start a background session ({reason}); answering in this process")


@contextlib.contextmanager
def _starting(spec: ModelSpec):
    """Held while a session for `spec` is being started: this user's other commands wait, then find it."""
    import fcntl
    import hashlib

    from ..server.registry import state_folder

    folder = state_folder()
    name = hashlib.sha256(repr((spec.model, spec.settings())).encode()).hexdigest()[:16]
    with open(os.open(folder / f"starting-{name}.lock", os.O_WRONLY | os.O_CREAT, 0o600), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def image_options(min_pixels: int | None, max_pixels: int | None, resized_height: int | None,
                  resized_width: int | None, images: bool = True, videos: bool = False) -> ImageOptions:
    """Check the resolution options fit together and the inputs given (`images`, `videos`): a usage error
    otherwise, not the same input error on every image."""
    if (resized_height is None) != (resized_width is None):
        raise UsageError("--resized-height/--resized-width", "give both or neither")
    if min_pixels and min_pixels // PATCH_FACTOR ** 2 > MAX_CONTEXT:  # every image would be over any context
        raise UsageError("--min-pixels", f"{min_pixels} is {min_pixels // PATCH_FACTOR ** 2} tokens per image, "
                                         f"over Qwen2-VL's context of {MAX_CONTEXT} tokens")
    if min_pixels and max_pixels and min_pixels > max_pixels:
        raise UsageError("--min-pixels", f"{min_pixels} is larger than --max-pixels {max_pixels}")
    if max_pixels is not None and min_pixels is None and resized_height is None:  # below qwen-vl-utils' floor
        for kind, given, floor, tokens in (("an image", images, IMAGE_MIN_PIXELS, 4),
                                           ("a video frame", videos, VIDEO_MIN_PIXELS, 128)):
            if given and max_pixels < floor:
                raise UsageError("--max-pixels", f"{max_pixels} is below the least area of {kind}, {floor} "
                                                 f"({tokens}*28*28); give a smaller --min-pixels too")
    return ImageOptions(min_pixels, max_pixels, resized_height, resized_width)


def generation_options(max_new_tokens: int, temperature: float | None, top_p: float | None,
                       top_k: int | None, repetition_penalty: float | None, seed: int | None,
                       stop: list[str] | None = None) -> GenerationOptions:
    if max_new_tokens >= MAX_CONTEXT:
        raise UsageError(f"--max-new-tokens {max_new_tokens}", f"over Qwen2-VL's context of {MAX_CONTEXT} tokens")
    if repetition_penalty == 0:
        raise UsageError("--repetition-penalty 0", "must be above 0 (1.0 is no penalty)")
    if stop and not all(stop):
        raise UsageError("--stop", "empty: give the text the answer is to end before")
    if stop and len(stop) > MAX_STOP_STRINGS:
        raise UsageError("--stop", f"given {len(stop)} times; at most {MAX_STOP_STRINGS}")
    return GenerationOptions(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, tuple(stop or ()))


class Inputs:
    """`resolve_media` on a helper thread, started at once: reading and decoding (which release the GIL) overlap
    finding the session (its /health) and, where one must start, its load. `result()` gives
    them or raises their error; `done()` says whether that would wait."""

    def __init__(self, *args, text_flag: str | None = None) -> None:
        import threading

        self._result, self._error, self._text_flag = None, None, text_flag
        # a daemon: Ctrl-C during a slow download ends the command without waiting for the read
        self._thread = threading.Thread(target=self._run, args=args, name="qwen2vl-inputs", daemon=True)
        self._thread.start()

    def _run(self, *args) -> None:
        try:
            self._result = resolve_media(*args)
        except BaseException as exc:  # noqa: BLE001 - the command's, raised where it asks for the result
            self._error = exc
            misplaced = isinstance(exc, InputError) and exc.reason == "no such file" and reads_as_prose(exc.subject)
            if self._text_flag and misplaced:  # the prompt typed as a SOURCE: say where text goes
                self._error = InputError(exc.subject, f"no such file (text for the model goes after {self._text_flag})")

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> tuple[list, list]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


def reads_as_prose(source: str) -> bool:
    """A SOURCE that is a sentence, not a file, URL or data URI: a prompt typed where a SOURCE goes
    (`describe photo.jpg "What is in it?"`)."""
    return ((" " in source or source.endswith("?")) and not os.path.lexists(os.path.expanduser(source))
            and ":" not in source.split(" ", 1)[0])


def resolve_media(images: list[str], image_options: ImageOptions, limits: FetchLimits, videos: list[str] = (),
                  video_options: VideoOptions | None = None) -> tuple[list, list]:
    """Every source read and decoded (the sizing checked: each bad one an InputError), videos sampled and sized
    (Inputs runs it beside finding or starting the session): ([SourceImage], [VideoFrames]), for `media`."""
    from ..sources import read_image
    from ..video import resolve_video

    if [*images, *videos].count("-") > 1:
        raise UsageError("-", "stdin can be read only once")
    return ([read_image(source, image_options, limits) for source in images],
            [resolve_video(source, video_options, limits) for source in videos])


def media(session, inputs: Inputs, env: Environment, verbose: bool = False) -> list[Media]:
    """The inputs' images, then videos, in the form `session` takes; their notes on stderr, and with --verbose
    what the model sees of each video."""
    images, videos = inputs.result()
    items = [session.image_media(image) for image in images] + [session.video_media(v) for v in videos]
    for item in items:
        for note in item.notes:
            env.note(note)
        if verbose and item.kind == "video" and item.facts:
            env.note(describe_facts(item.facts))
    return items


def answer(session, request: ChatRequest, spec: ModelSpec, env: Environment, output: OutputOptions,
           verbose: bool = False) -> None:
    """Load the model (once per process; nothing to load with a server), stream the answer, render it."""
    if not session.loaded:
        remote = session.device == "remote"
        with env.status(f"Connecting to {session.url} ..." if remote else f"Loading {spec.model} ..."):
            session.load()
    if verbose:
        env.note(session.describe_weights())
    record = {
        "sources": [m.source for m in request.media],
        "prompt": request.prompt,
        "model": getattr(session, "model_name", spec.model),  # a server's, where it answers with its only model
        "timings": {"load_s": round(session.load_s, 4)},
    }
    videos = [m.facts for m in request.media if m.kind == "video" and m.facts]
    if videos:
        record["videos"] = videos
    render_answer(session.stream(request), env, output, record)
