"""Shared fixtures: one tiny random-weight Qwen2-VL checkpoint per test session, test images, a local
HTTP server, and a CliRunner wrapper that keeps stdout and stderr apart."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _ctrl_c_as_on_a_terminal():
    """The processes tests start and interrupt (Ctrl-C tests) take SIGINT even where the suite itself was started
    ignoring it (a shell's background job): a handled signal is reset to its default in a child, an ignored one
    is inherited."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(scope="session", autouse=True)
def _offline_and_isolated(tmp_path_factory):
    """No test touches the network hub or the user's cache."""
    home = tmp_path_factory.mktemp("hf_home")
    cleared = ("QWEN2VL_MODEL", "QWEN2VL_DEBUG", "QWEN2VL_SERVER", "QWEN2VL_API_KEY", "QWEN2VL_FASTPATH")
    saved = {k: os.environ.get(k) for k in ("HF_HOME", "HF_HUB_OFFLINE", "QWEN2VL_STATE_DIR", "QWEN2VL_AUTOSTART",
                                            *cleared)}
    # a session the user has running is not found, and one-liners start none (tests/test_autostart.py does):
    # in-process tests stay in-process
    os.environ.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", QWEN2VL_STATE_DIR=str(tmp_path_factory.mktemp("state")),
                      QWEN2VL_AUTOSTART="0")
    for key in cleared:
        os.environ.pop(key, None)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random-weight Qwen2-VL in Hugging Face layout, loaded through from_pretrained by the tests."""
    from tests.checkpoint import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny-qwen2vl"), "tiny")


def noise_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(mode)
    array = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(array if channels > 1 else array[..., 0], mode)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """Small test images of different sizes (each a handful of vision tokens)."""
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, (w, h, seed) in {"a": (84, 56, 1), "b": (60, 100, 2), "c": (112, 112, 3)}.items():
        paths[name] = folder / f"{name}.png"
        noise_image(w, h, seed).save(paths[name])
    paths["jpg"] = folder / "photo.jpg"
    noise_image(90, 70, 4).save(paths["jpg"], quality=90)
    return paths


@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(tiny_model):
    """Run `qwen2vl ARGS` in-process on the tiny checkpoint (the model stays loaded between calls)."""
    from typer.testing import CliRunner

    from qwen2vl_cli.cli import app

    def run(*args: str, input: bytes | str | None = None, model: bool = True, env: dict | None = None) -> Run:
        argv = [str(a) for a in args]
        if model and argv and argv[0] in ("describe", "ask", "video", "batch"):
            argv += ["--model", str(tiny_model)]
        result = CliRunner().invoke(app, argv, input=input, env=env)
        return Run(result.exit_code, result.stdout, result.stderr)

    return run


def break_the_fast_layers_cache(monkeypatch) -> None:
    """Makes the fast path's text layers drop the cache argument (under either name), as they did with
    transformers 5.24 before the fix: the prompt's keys never reach the cache, answers go wrong silently."""
    from qwen2vl_cli.engine.fast import decoder as fastpath

    original = fastpath.install_text

    def install_dropping_the_cache(model, fused):
        original(model, fused)
        for layer in model.model.language_model.layers:
            patched = layer.forward
            layer.forward = lambda *a, _p=patched, **k: _p(*a, **{n: v for n, v in k.items()
                                                                  if n not in ("cache", "past_key_values")})

    monkeypatch.setattr(fastpath, "install_text", install_dropping_the_cache)


def run_process(*args: str, input: bytes | None = None, env: dict | None = None, timeout: float = 120):
    """Run `python -m qwen2vl_cli ARGS` in a real process (`env`: variables set, or unset where None)."""
    full_env = {k: v for k, v in {**os.environ, **(env or {})}.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "qwen2vl_cli", *map(str, args)], input=input,
                          capture_output=True, env=full_env, timeout=timeout, cwd=ROOT)


def start_server(model, state_dir, *extra, wait=True):
    """A real `qwen2vl serve` subprocess on `model`; (process, URL) once /health answers."""
    env = {**os.environ, "QWEN2VL_STATE_DIR": str(state_dir), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "qwen2vl_cli", "serve", "-m", str(model), "--port", "0",
                                *map(str, extra)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    if not wait:
        return process, None
    deadline = time.time() + 120
    while time.time() < deadline:
        assert process.poll() is None, process.stderr.read().decode()
        states = list(state_dir.glob(f"{process.pid}.json"))
        if states:
            url = json.loads(states[0].read_text())["url"]
            try:
                if httpx.get(url + "/health", timeout=1, headers=_auth(extra)).status_code == 200:
                    return process, url
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError("server did not start")


def _auth(extra) -> dict:
    extra = list(map(str, extra))
    return {"Authorization": f"Bearer {extra[extra.index('--api-key') + 1]}"} if "--api-key" in extra else {}


def stop(process):
    process.terminate()
    process.wait(timeout=30)


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes, dict]] = {}

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path.startswith("/slow"):
            time.sleep(3)
        route = self.routes.get(self.path.split("?")[0], (404, b"not found", {}))
        status, body, headers = route() if callable(route) else route  # a callable: what to answer, when it is asked
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def http_server():
    """A loopback HTTP server; tests register routes in `server.routes[path] = (status, body, headers)` (or a
    function returning them, called on each request)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.routes = _Handler.routes
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield server
    server.shutdown()


def stop_text_in(text: str) -> tuple[int, str]:
    """A --stop text taken from an answer: two characters, not blank, from the fourth on, first seen where taken;
    (where, the text). The answer with it is text[:where]."""
    where = next(i for i in range(3, len(text) - 1) if text[i:i + 2].strip() and text.find(text[i:i + 2]) == i)
    return where, text[where:where + 2]


def answer_text(decode, ids: list[int]) -> str:
    """The text an answer of `ids` shows: their decode, less a character they end inside (an answer cut by its
    length mid-character decodes to U+FFFD there): the text of the longest prefix of them that does not end in
    U+FFFD, as vLLM and tokenizers' DecodeStream leave it. `decode`: ids -> text (the seed recipe's processor)."""
    end = len(ids)
    while end and decode(ids[:end]).endswith("\ufffd"):
        end -= 1
    return decode(ids[:end])
