"""`serve`, `ps` and `stop`: a cached model session that every other command finds and uses."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ServerError, UsageError
from ..render import Environment
from ..server.config import DEFAULT_MAX_BODY
from ..server.registry import DEFAULT_PORT
from ..sources import FetchLimits, FetchPolicy
from . import common
from .options import (DEFAULTS, ApiKeyOpt, AttnOpt, DeviceOpt, DtypeOpt, MaxDownloadOpt, ModelOpt, QuantizeOpt,
                      QuietOpt, TimeoutOpt, parse_bytes, parse_duration, size_text)

READY_TIMEOUT_S = 900


def serve(
    model: ModelOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind; anything but loopback needs --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port (0 picks a free one).")] = DEFAULT_PORT,
    keep_alive: Annotated[str, typer.Option("--keep-alive", metavar="DURATION", help="Unload the model after this long idle (30s, 10m, 1h, never); the next request reloads it.")] = "10m",
    background: Annotated[bool, typer.Option("--background", "-d", help="Start detached; return once it is ready.")] = False,
    status: Annotated[bool, typer.Option("--status", help="Show the running sessions (as qwen2vl ps) and exit.")] = False,
    api_key: ApiKeyOpt = None,
    allowed_local_media_path: Annotated[Path | None, typer.Option("--allowed-local-media-path", metavar="DIR", help="Let requests name local files, only below DIR.")] = None,
    max_body_size: Annotated[int, typer.Option("--max-body-size", parser=parse_bytes, metavar="SIZE", help="Largest request body (413 above it).")] = size_text(DEFAULT_MAX_BODY),
    served_model_name: Annotated[str | None, typer.Option("--served-model-name", metavar="NAME", help="Model name clients use (default: --model).")] = None,
    allow_fetch: Annotated[bool, typer.Option("--allow-fetch", help="Fetch http(s) image and video URLs that requests name, from public addresses only (loopback, private and link-local ones are refused, redirects included).")] = False,
    allowed_media_domains: Annotated[str | None, typer.Option("--allowed-media-domains", metavar="HOST,...", help="Fetch URLs on these hosts only (as named, wherever they resolve). Without this or --allow-fetch, no URL is fetched.")] = None,
    max_prompt_tokens: Annotated[int | None, typer.Option("--max-prompt-tokens", min=1, metavar="N", help="Refuse prompts longer than this, media included (default: the model's context).")] = None,
    max_images: Annotated[int, typer.Option("--max-images", min=0, metavar="N", help="Most images in one request.")] = 32,
    max_videos: Annotated[int, typer.Option("--max-videos", min=0, metavar="N", help="Most videos in one request.")] = 4,
    max_queue: Annotated[int, typer.Option("--max-queue", min=1, metavar="N", help="Most requests waiting or running; more get 429 with Retry-After.")] = 64,
    allowed_hosts: Annotated[str | None, typer.Option("--allowed-hosts", metavar="NAME,...", help="Host headers to answer ('*': any; default: the bind address, loopback names on loopback).")] = None,
    device: DeviceOpt = DEFAULTS["device"],
    dtype: DtypeOpt = DEFAULTS["dtype"],
    attn: AttnOpt = DEFAULTS["attn"],
    quantize: QuantizeOpt = None,
    timeout: TimeoutOpt = DEFAULTS["timeout"],
    max_download: MaxDownloadOpt = DEFAULTS["max_download"],
    quiet: QuietOpt = False,
) -> None:
    """Keep the model loaded and serve an OpenAI-compatible API; other commands use it automatically.

    Example: qwen2vl serve --background && qwen2vl describe photo.jpg
    """
    from ..server.config import ServerConfig

    env = Environment.from_system(quiet=quiet)
    if status:
        return ps(api_key=api_key)
    if allowed_local_media_path is not None and not allowed_local_media_path.is_dir():
        raise UsageError("--allowed-local-media-path", f"{allowed_local_media_path} is not a directory")
    if served_model_name is not None and not served_model_name.strip():
        raise UsageError("--served-model-name", "empty: clients name the model by it")
    config = ServerConfig(
        spec=common.model_spec(model, device, dtype, attn, quantize), host=host, port=port, api_key=api_key,
        keep_alive_s=parse_duration(keep_alive), max_body=max_body_size,
        allowed_local=allowed_local_media_path.resolve() if allowed_local_media_path else None,
        limits=FetchLimits(timeout, max_download, FetchPolicy(allow_fetch, _names(allowed_media_domains))),
        served_name=served_model_name, max_prompt_tokens=max_prompt_tokens, max_images=max_images,
        max_videos=max_videos, max_queue=max_queue, allowed_hosts=_names(allowed_hosts))
    if background:
        return _start_background(config, env)
    from ..server.app import run_server

    def ready(url, session):
        env.note(f"serving {config.model_name} on {url} ({session.device}); Ctrl-C stops it")

    run_server(config, on_ready=ready, loading=env.status(f"Loading {config.spec.model} ..."))


def _names(text: str | None) -> tuple[str, ...]:
    """'a.com, B.org' -> ('a.com', 'b.org')."""
    return tuple(name.strip().lower().rstrip(".") for name in (text or "").split(",") if name.strip())


def _start_background(config, env: Environment) -> None:
    """Start a session serving `config` detached, wait until it serves, print its URL."""
    from ..server.registry import Launched

    with env.status(f"Starting a session for {config.model_name} ..."):
        state = Launched(config).ready(READY_TIMEOUT_S)
    print(state["url"], flush=True)
    env.note(f"session {state['pid']} serves {config.model_name}; `qwen2vl stop` ends it")


def ps(
    api_key: ApiKeyOpt = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON list: each session's record and the "
                                              "facts its /health gives (load phases, timings, queue).")] = False,
) -> None:
    """Show running sessions: pid, URL, model, device, weights (dtype, attention, quantization), loaded, idle time."""
    from ..server.registry import list_servers

    servers = list_servers(api_key)
    if json_output:  # the secrets (token, a started session's key) stay in its record, the proof with the session
        print(json.dumps([{**{key: value for key, value in info.items() if key not in ("token", "api_key")},
                           "health": {key: value for key, value in (info["health"] or {}).items() if key != "proof"}
                           if info["health"] is not None else None} for info in servers]))
        return
    if not servers:
        print("no qwen2vl session is running", file=sys.stderr)
        return
    print(f"{'PID':>8}  {'URL':<24}  {'DEVICE':<7}  {'WEIGHTS':<20}  {'LOADED':<6}  {'IDLE':>8}  MODEL")
    for info in servers:
        facts = info.get("health") or {}
        loaded = "yes" if facts.get("loaded") else ("no" if facts else "?")
        idle = f"{facts['idle_s']:.0f}s" if "idle_s" in facts else "?"
        resolved, quantize = facts.get("resolved") or {}, (facts.get("settings") or {}).get("quantize")
        weights = " ".join(filter(None, (resolved.get("dtype"), resolved.get("attn"), quantize))) or "?"
        print(f"{info['pid']:>8}  {info['url']:<24}  {str(facts.get('device', info.get('device'))):<7}  "
              f"{weights:<20}  {loaded:<6}  {idle:>8}  {info['model']}")


def stop(
    model: Annotated[str | None, typer.Option("--model", "-m", metavar="ID|DIR", help="Stop only the sessions serving this model.")] = None,
) -> None:
    """Stop the running sessions (all of them, or those serving --model)."""
    from ..server.registry import list_servers, remove_state, stop_server

    wanted = common.model_spec(model, "auto", "auto", "auto").model if model else None
    servers = [s for s in list_servers() if wanted is None or s["model"] == wanted]
    if not servers:
        print("no qwen2vl session is running" + (f" for {model}" if model else ""), file=sys.stderr)
        return
    for info in servers:
        if info["health"] is None:  # not provably ours (gone, or its pid or port taken by another process)
            remove_state(int(info["pid"]))
            print(f"removed the record of {info['pid']} ({info['model']}): it does not answer as that session",
                  file=sys.stderr)
            continue
        if not stop_server(info):
            raise ServerError(str(info["pid"]), "did not stop within 30s")
        print(f"stopped {info['pid']} ({info['model']})", file=sys.stderr)

