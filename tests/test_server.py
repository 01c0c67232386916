"""`qwen2vl serve` driven by the official `openai` client; commands find and use the session."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import ROOT, run_process, start_server, stop, stop_text_in

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    state = tmp_path_factory.mktemp("state")
    process, url = start_server(tiny_model, state, "--keep-alive", "never", "--max-body-size", "2MB")
    yield {"url": url, "state": state, "process": process}
    stop(process)


@pytest.fixture(scope="module")
def client(server, tiny_model):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(path, text):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(path)}},
                                         {"type": "text", "text": text}]}]


def in_process(cli, *args) -> str:
    result = cli(*args, "--no-server")
    assert result.exit_code == 0, result.stderr
    return result.stdout[:-1]


def test_plain_and_streamed_completions_equal_in_process(client, cli, images, tiny_model):
    expected = in_process(cli, "describe", images["a"], "-n", "12")
    reply = client.chat.completions.create(model=str(tiny_model), messages=image_message(images["a"], "Describe this image."),
                                           max_tokens=12)
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens == 12 and reply.usage.prompt_tokens > 20
    chunks = list(client.chat.completions.create(
        model=str(tiny_model), messages=image_message(images["a"], "Describe this image."), max_tokens=12,
        stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 12
    models = client.models.list()
    assert [m.id for m in models.data] == [str(tiny_model)]


def test_n_choices_plain_and_streamed(client, cli, images, tiny_model):
    """n choices (vLLM's and OpenAI's `n`), through the official client: greedy, each is the in-process answer;
    sampled with a seed, choice i is the answer to the same request with seed + i, plain and streamed alike (each
    chunk names its choice); the usage counts the prompt once and every choice's tokens."""
    expected = in_process(cli, "describe", images["a"], "-n", "8")
    messages = image_message(images["a"], "Describe this image.")
    greedy = client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=8, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert [c.message.content for c in greedy.choices] == [expected] * 3
    single = client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=8)
    assert greedy.usage.prompt_tokens == single.usage.prompt_tokens
    assert greedy.usage.completion_tokens == 3 * single.usage.completion_tokens

    def sampled(seed, **extra):
        return client.chat.completions.create(model=str(tiny_model), messages=messages, max_tokens=8,
                                              temperature=1.0, seed=seed, **extra)

    alone = [sampled(seed).choices[0].message.content for seed in (41, 42, 43)]
    assert len(set(alone)) > 1, "the samples should differ: the test can fail"
    plain = sampled(41, n=3)
    assert [c.message.content for c in plain.choices] == alone
    texts, finished, usage = {}, [], None
    for chunk in sampled(41, n=3, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            finished += [choice.index] * bool(choice.finish_reason)
    assert [texts[i] for i in range(3)] == alone and sorted(finished) == [0, 1, 2]
    assert usage.completion_tokens == plain.usage.completion_tokens and usage.prompt_tokens == single.usage.prompt_tokens


def test_health_says_where_a_requests_time_went(server, client, images, tiny_model):
    """/health's timings_ms: the server's own phases (body read, admitted, first text piece delivered) beside the
    engine's, each a median of recent requests in milliseconds."""
    list(client.chat.completions.create(model=str(tiny_model), messages=image_message(images["a"], "Describe."),
                                        max_tokens=4, stream=True))
    timings = httpx.get(server["url"] + "/health", timeout=10).json()["timings_ms"]
    for phase in ("read", "admit", "deliver"):
        assert 0 <= timings[phase] < 10000, timings


def test_concurrent_requests_all_answered_correctly(client, cli, images, tiny_model):
    jobs = [(images[name], prompt) for name in ("a", "b", "c") for prompt in ("Describe this image.", "What is it?")]
    expected = [in_process(cli, "describe", path, "-p", prompt, "-n", "10") for path, prompt in jobs]

    def ask(job):
        path, prompt = job
        reply = client.chat.completions.create(model=str(tiny_model), messages=image_message(path, prompt), max_tokens=10)
        return reply.choices[0].message.content

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        assert list(pool.map(ask, jobs)) == expected


@pytest.mark.parametrize("case, status", [
    ("bad_base64", 400), ("missing_messages", 400), ("not_json", 400), ("bad_part", 400),
    ("too_large", 413), ("local_path", 403), ("file_url", 403), ("wrong_model", 404), ("bad_temperature", 400),
    ("over_the_context", 400), ("image_in_system", 400), ("nested", 400), ("nan_temperature", 400),
    ("infinite_top_p", 400), ("no_repetition_penalty", 400), ("unpaired_surrogate", 400), ("surrogate_in_a_part", 400),
    ("text_part_without_text", 400),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client, images, tiny_model, case, status):
    url = server["url"] + "/v1/chat/completions"
    good = {"model": str(tiny_model), "max_tokens": 4, "messages": image_message(images["a"], "Hi")}
    bodies = {
        "bad_base64": {**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}]}]},
        "missing_messages": {"model": str(tiny_model)},
        "bad_part": {**good, "messages": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]},
        "too_large": {**good, "padding": "x" * (3 * 1024 * 1024)},
        "local_path": {**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": str(images["a"])}}]}]},
        "file_url": {**good, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": images["a"].as_uri()}}]}]},
        "wrong_model": {**good, "model": "gpt-4o"},
        "bad_temperature": {**good, "temperature": "hot"},
        "nan_temperature": {**good, "temperature": float("nan")},
        "infinite_top_p": {**good, "top_p": float("inf")},
        "no_repetition_penalty": {**good, "repetition_penalty": 0},  # was taken as no penalty at all
        "unpaired_surrogate": {**good, "messages": [{"role": "user", "content": "\ud800"}]},  # JSON's escape: was a 500
        "surrogate_in_a_part": {**good, "messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]},
        "text_part_without_text": {**good, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "over_the_context": {**good, "max_tokens": 32767},
        "image_in_system": {**good, "messages": [
            {"role": "system", "content": image_message(images["a"], "Hi")[0]["content"]},
            *image_message(images["a"], "Hi")]},
    }
    if case in ("not_json", "nested"):
        content = b"{not json" if case == "not_json" else b"[" * 100000 + b"]" * 100000
        response = httpx.post(url, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    else:  # json.dumps (httpx's json= refuses NaN and Infinity, which Python's json.loads reads)
        response = httpx.post(url, content=json.dumps(bodies[case]), headers={"Content-Type": "application/json"},
                              timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if case == "over_the_context":
        assert error["code"] == "context_length_exceeded"  # OpenAI's code: clients tell it from a server failure
    assert client.chat.completions.create(model=str(tiny_model), messages=image_message(images["a"], "Hi"),
                                          max_tokens=2).choices[0].message.content


def test_any_64_bit_seed_is_taken(server, tiny_model, images):
    """A seed is any 64-bit integer, as vLLM takes it (it was a 500 outside 0..2**32-1: the generator's range, which
    a seed now maps into): the same sampled answer for a seed and for it plus 2**32."""
    url = server["url"] + "/v1/chat/completions"

    def sampled(seed: int) -> str:
        body = {"model": str(tiny_model), "max_tokens": 8, "temperature": 1.5, "seed": seed,
                "messages": image_message(images["a"], "Hi")}
        response = httpx.post(url, json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    assert sampled(7) == sampled(7 + 2 ** 32) == sampled(7 - 2 ** 32)
    assert sampled(-1) == sampled(2 ** 64 - 1)


def test_disconnected_stream_frees_the_worker(server, client, images, tiny_model):
    body = {"model": str(tiny_model), "max_tokens": 5000, "stream": True, "repetition_penalty": 1.0,
            "messages": image_message(images["a"], "Go on forever.")}
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body, timeout=30) as response:
        for line in response.iter_lines():
            if '"content"' in line and '"content": ""' not in line:
                break  # got a token; hang up
    started = time.time()
    reply = client.chat.completions.create(model=str(tiny_model), messages=image_message(images["b"], "Hi"), max_tokens=3)
    assert reply.choices[0].message.content and time.time() - started < 20


def test_commands_discover_the_session_without_importing_torch(server, images, tiny_model, cli):
    env = {"QWEN2VL_STATE_DIR": str(server["state"]), "QWEN2VL_MODEL": str(tiny_model)}
    code = ("import sys\nsys.argv = ['qwen2vl', 'describe', %r, '-n', '12', '--json']\n"
            "import http.client\ncalls = []\nrequest = http.client.HTTPConnection.request\n"  # /health asked once
            "http.client.HTTPConnection.request = lambda self, method, url, *a, **k: calls.append(str(url)) or request(self, method, url, *a, **k)\n"
            "from qwen2vl_cli.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('HEALTH', sum(url.endswith('/health') for url in calls))\n"
            "print('TORCH', 'torch' in sys.modules, 'transformers' in sys.modules)" % str(images["a"]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         env={**os.environ, **env})
    lines = out.stdout.strip().splitlines()
    assert lines[-2:] == ["HEALTH 1", "TORCH False False"], out.stdout + out.stderr
    record = json.loads(lines[0])
    assert record["timings"]["load_s"] == 0.0  # nothing was loaded here
    assert record["text"] == in_process(cli, "describe", images["a"], "-n", "12")
    explicit = run_process("describe", images["a"], "-n", "12", "--server", server["url"], env=env)
    assert explicit.returncode == 0 and explicit.stdout.decode()[:-1] == record["text"]
    forced = run_process("describe", images["a"], "-n", "12", "--no-server", "--json", env=env)
    assert json.loads(forced.stdout)["timings"]["load_s"] > 0
    # no model named at all (no --model, no $QWEN2VL_MODEL): the server's only model answers, and is named
    adopted = run_process("describe", images["a"], "-n", "12", "--json", "--server", server["url"],
                          env={"QWEN2VL_MODEL": None, "QWEN2VL_STATE_DIR": str(server["state"])})
    assert adopted.returncode == 0, adopted.stderr
    assert json.loads(adopted.stdout)["text"] == record["text"]
    assert json.loads(adopted.stdout)["model"] == str(tiny_model)
    other = run_process("describe", images["a"], "--model", "someone/else", "--server", server["url"], env=env)
    assert other.returncode != 0 and b"not served here" in other.stderr  # a named model is never swapped


def test_errors_and_exit_codes_are_the_same_through_the_server(server, images, tmp_path, tiny_model):
    env = {"QWEN2VL_STATE_DIR": str(server["state"]), "QWEN2VL_MODEL": str(tiny_model)}
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(images["c"].read_bytes()[:300])
    for extra in ([], ["--no-server"]):
        out = run_process("describe", truncated, *extra, env=env)
        assert out.returncode == 3 and out.stderr.decode().strip() == f"qwen2vl: error: {truncated}: truncated image"
    gone = run_process("describe", images["a"], "--server", "http://127.0.0.1:9/", env=env)
    assert gone.returncode == 6 and b"cannot reach the server" in gone.stderr
    # --server as host:port (no scheme: http), and URLs that are none (usage errors, not exit 1 or 6)
    bare = run_process("describe", images["a"], "-n", "12", "--server", server["url"].removeprefix("http://"), env=env)
    assert bare.returncode == 0 and bare.stdout == run_process("describe", images["a"], "-n", "12", env=env).stdout
    for url, said in (("http://[::1", "not a valid URL (Invalid IPv6 URL)"), ("ftp://host", "give an http(s) URL"),
                      ("http://host:99999", "not a valid URL (Port out of range")):
        wrong = run_process("describe", images["a"], "--server", url, env=env)
        assert wrong.returncode == 2 and said in wrong.stderr.decode(), wrong.stderr
    for command in (["describe"], ["video"]):  # a source URL that does not parse: its input error
        wrong = run_process(*command, "http://[::1", env=env)
        assert wrong.returncode == 3, wrong.stderr
        assert wrong.stderr.decode().strip() == "qwen2vl: error: http://[::1: not a valid URL (Invalid IPv6 URL)"


def test_batch_through_the_server_equals_in_process(server, images, tmp_path, tiny_model):
    env = {"QWEN2VL_STATE_DIR": str(server["state"]), "QWEN2VL_MODEL": str(tiny_model)}
    out_remote, out_local = tmp_path / "remote.jsonl", tmp_path / "local.jsonl"
    paths = [images[name] for name in ("a", "b", "c")]
    remote = run_process("batch", *paths, "-n", "8", "-o", out_remote, "--server", server["url"], "--concurrency", "3", env=env)
    local = run_process("batch", *paths, "-n", "8", "-o", out_local, "--no-server", env=env)
    assert remote.returncode == local.returncode == 0, remote.stderr
    read = lambda p: sorted(json.loads(line)["text"] for line in p.read_text().splitlines())  # noqa: E731
    assert read(out_remote) == read(out_local)


def test_batch_keeps_enough_requests_in_flight_to_a_local_session_and_a_few_to_a_server(server, cli, tiny_model,
                                                                                       tmp_path, monkeypatch):
    """A batch through a local session (the user's own: its engine batches what it is sent) keeps up to
    SESSION_CONCURRENCY requests in flight (within half of the session's --max-queue), not the few a --server URL
    (anyone's) gets by default; --concurrency sets either. The answers are the in-process ones."""
    from PIL import Image

    from qwen2vl_cli.client import DEFAULT_CONCURRENCY, SESSION_CONCURRENCY, RemoteSession

    paths = []
    for index in range(48):
        paths.append(tmp_path / f"p{index:02d}.png")
        Image.new("RGB", (56, 56), (index * 5, 90, 200 - index * 4)).save(paths[-1])
    complete, lock, now = RemoteSession.complete, threading.Lock(), [0]
    most: list[int] = []

    def counted(self, request):
        with lock:
            now[0] += 1
            most[-1] = max(most[-1], now[0])
        try:
            time.sleep(0.05)  # each request takes a moment, as a real answer does: the client's limit shows
            return complete(self, request)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(RemoteSession, "complete", counted)
    env = {"QWEN2VL_STATE_DIR": str(server["state"])}
    texts = {}
    for name, where in (("session", []), ("server", ["--server", server["url"]]),
                        ("session-5", ["--concurrency", "5"]), ("local", ["--no-server"])):
        most.append(0)
        out = tmp_path / f"{name}.jsonl"
        result = cli("batch", *paths, "-n", "4", "-o", out, *where, env=env)
        assert result.exit_code == 0, result.stderr
        texts[name] = sorted((r["source"], r["text"]) for r in map(json.loads, out.read_text().splitlines()))
    assert DEFAULT_CONCURRENCY < most[0] <= SESSION_CONCURRENCY and most[1] == DEFAULT_CONCURRENCY
    assert most[2] == 5 and most[3] == 0
    assert texts["session"] == texts["server"] == texts["session-5"] == texts["local"] and len(texts["local"]) == 48
    small = tmp_path / "small-queue"
    small.mkdir()
    process, _ = start_server(tiny_model, small, "--keep-alive", "never", "--max-queue", "12")
    try:
        most.append(0)
        out = tmp_path / "small.jsonl"
        result = cli("batch", *paths[:24], "-n", "4", "-o", out, env={"QWEN2VL_STATE_DIR": str(small)})
        assert result.exit_code == 0 and most[-1] == 6, (result.stderr, most)
    finally:
        stop(process)


def test_stop_texts_end_answers_alike_in_process_and_through_the_server(server, images, tmp_path, tiny_model):
    """--stop: each answer is the one without it, cut before the text's first appearance (left out), whether the
    model answers in this process or in a session; `describe`'s JSON says finish_reason "stop"."""
    env = {"QWEN2VL_STATE_DIR": str(server["state"]), "QWEN2VL_MODEL": str(tiny_model)}
    full = json.loads(run_process("describe", images["a"], "-n", "12", "--json", "--no-server", env=env).stdout)
    text = full["text"]
    start, stop_at = stop_text_in(text)
    for where in (["--no-server"], ["--server", server["url"]]):
        cut = run_process("describe", images["a"], "-n", "12", "--json", "--stop", stop_at, "--stop", "\\n\\t\\n",
                          *where, env=env)
        assert cut.returncode == 0, cut.stderr
        answer = json.loads(cut.stdout)
        assert answer["text"] == text[:start] and answer["finish_reason"] == "stop", (where, answer, text)
        assert answer["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]
    paths = [images[name] for name in ("a", "b", "c")]
    uncut = tmp_path / "uncut.jsonl"
    assert run_process("batch", *paths, "-n", "12", "-o", uncut, "--no-server", env=env).returncode == 0
    answers = [json.loads(line)["text"] for line in uncut.read_text().splitlines()]
    expected = sorted(t[:t.find(stop_at)] if stop_at in t else t for t in answers)
    for name, where in (("local", ["--no-server"]), ("remote", ["--server", server["url"]])):
        out = tmp_path / f"{name}.jsonl"
        done = run_process("batch", *paths, "-n", "12", "-o", out, "--stop", stop_at, *where, env=env)
        assert done.returncode == 0, done.stderr
        assert sorted(json.loads(line)["text"] for line in out.read_text().splitlines()) == expected, name


def test_non_loopback_bind_needs_a_key(tiny_model, tmp_path):
    process, _ = start_server(tiny_model, tmp_path, "--host", "0.0.0.0", wait=False)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 2 and b"needs an API key" in stderr
    background = run_process("serve", "--background", "-m", tiny_model, "--host", "0.0.0.0", "--port", "0",
                             env={"QWEN2VL_STATE_DIR": str(tmp_path)})  # refused before a session is started
    assert background.returncode == 2 and background.stderr == (
        b"qwen2vl: error: --host 0.0.0.0: binding beyond loopback needs an API key (--api-key or QWEN2VL_API_KEY)\n")
    assert not list(tmp_path.glob("serve-*.log"))


def test_api_key_local_media_keep_alive_and_stop(tiny_model, tmp_path, images):
    media = tmp_path / "media"
    media.mkdir()
    (media / "a.png").write_bytes(images["a"].read_bytes())
    os.symlink(images["b"], media / "escape.png")  # points outside the allowed folder
    state = tmp_path / "state"
    process, url = start_server(tiny_model, state, "--api-key", "s3cret", "--keep-alive", "1s",
                                "--allowed-local-media-path", media)
    try:
        keyed = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=120)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        local = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(media / "a.png")}},
                                              {"type": "text", "text": "Hi"}]}]
        first = keyed.chat.completions.create(model=str(tiny_model), messages=local, max_tokens=6).choices[0].message.content
        with pytest.raises(openai.PermissionDeniedError):
            keyed.chat.completions.create(model=str(tiny_model), max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": str(media / "escape.png")}}]}])
        with pytest.raises(openai.PermissionDeniedError):
            keyed.chat.completions.create(model=str(tiny_model), max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"{media}/../media/../{images['b'].name}"}}]}])
        headers = {"Authorization": "Bearer s3cret"}
        deadline = time.time() + 30
        while httpx.get(url + "/health", headers=headers).json()["loaded"]:
            assert time.time() < deadline, "keep-alive never unloaded the model"
            time.sleep(0.2)
        again = keyed.chat.completions.create(model=str(tiny_model), messages=local, max_tokens=6).choices[0].message.content
        assert again == first  # reloaded on demand, same answer
        other = state / "fastpath-checks.json"  # the folder holds other JSON too (passed fast-path checks)
        other.write_text(json.dumps({"0" * 64: {"errors": [0.01], "at": 1}}))
        listed = run_process("ps", env={"QWEN2VL_STATE_DIR": str(state), "QWEN2VL_API_KEY": "s3cret"})
        assert listed.returncode == 0 and other.exists(), listed.stderr
        assert str(process.pid).encode() in listed.stdout and str(tiny_model).encode() in listed.stdout
        other.unlink()
        listed = run_process("ps", "--json", env={"QWEN2VL_STATE_DIR": str(state), "QWEN2VL_API_KEY": "s3cret"})
        (record,) = json.loads(listed.stdout)
        assert record["pid"] == process.pid and record["health"]["model"] == str(tiny_model)
        assert record["health"]["load_s"] > 0 and "weights" in record["health"]["load_phases_s"]
        token = json.loads(next(state.glob("*.json")).read_text())["token"]
        assert token and token not in listed.stdout.decode()  # the session's secret stays in its record
        stopped = run_process("stop", env={"QWEN2VL_STATE_DIR": str(state)})
        assert stopped.returncode == 0 and process.wait(timeout=30) is not None
        assert not list(state.glob("*.json"))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_background_start_and_stop(tiny_model, tmp_path, images):
    env = {"QWEN2VL_STATE_DIR": str(tmp_path), "QWEN2VL_MODEL": str(tiny_model)}
    started = run_process("serve", "--port", "0", "--background", "--api-key", "s3cret-k3y", env=env, timeout=180)
    assert started.returncode == 0, started.stderr
    url = started.stdout.decode().strip()
    auth = {"Authorization": "Bearer s3cret-k3y"}
    health = httpx.get(url + "/health", timeout=5, headers=auth).json()
    assert health["model"] == str(tiny_model)
    with open(f"/proc/{health['pid']}/cmdline", "rb") as cmdline:  # what every local user sees in ps
        shown = cmdline.read()
    assert b"s3cret-k3y" not in shown and shown.endswith(str(tiny_model).encode() + b"\0")  # the model, for ps
    with open(f"/proc/{health['pid']}/environ", "rb") as environ:  # the config came on its stdin, key and all
        assert b"s3cret-k3y" not in environ.read()
    used = run_process("describe", images["a"], "-n", "4", "--json", env={**env, "QWEN2VL_API_KEY": "s3cret-k3y"})
    assert json.loads(used.stdout)["timings"]["load_s"] == 0.0
    assert run_process("stop", env=env).returncode == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=2)


def test_sigterm_removes_the_state_file(tiny_model, tmp_path):
    process, url = start_server(tiny_model, tmp_path)
    assert list(tmp_path.glob(f"{process.pid}.json"))
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0, process.stderr.read().decode()  # a clean stop
    assert not list(tmp_path.glob("*.json")), "a terminated server left its state file behind"


def test_streamed_and_plain_requests_share_the_engines_batch(cli, images, tiny_model, tmp_path, monkeypatch):
    """16 clients at once (8 streamed, 8 not, different lengths) through a server whose engine batches them
    continuously (the fast path forced on, float32): every answer is the in-process one, and the server says
    it ran several at once."""
    jobs = [(images["abc"[i % 3]], ("Describe this image.", "What is it?")[i % 2], 4 + i) for i in range(16)]
    expected = [in_process(cli, "describe", path, "-p", prompt, "-n", str(n)) for path, prompt, n in jobs]
    monkeypatch.setenv("QWEN2VL_FASTPATH", "on")
    process, url = start_server(tiny_model, tmp_path, "--keep-alive", "never")
    busiest: list[int] = []
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(index: int) -> str:
            path, prompt, n = jobs[index]
            if index % 2:
                reply = client.chat.completions.create(model=str(tiny_model), messages=image_message(path, prompt),
                                                       max_tokens=n)
                return reply.choices[0].message.content
            chunks = client.chat.completions.create(model=str(tiny_model), messages=image_message(path, prompt),
                                                    max_tokens=n, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        def watch() -> None:
            for _ in range(200):
                busiest.append(httpx.get(url + "/health", timeout=5).json()["running"])
                time.sleep(0.02)

        with ThreadPoolExecutor(max_workers=17) as pool:
            watcher = pool.submit(watch)
            answers = list(pool.map(ask, range(16)))
            watcher.cancel()
        assert answers == expected
        assert max(busiest) > 1, "the requests were not answered together"
    finally:
        stop(process)


def test_a_busy_loop_gets_the_events_that_waited_together_and_none_is_lost():
    """The engine's thread emits faster than the loop reads: every event arrives, in order, in fewer wakes than
    events (a loop blocked for a while finds everything that came meanwhile in one list); the SSE bridge joins
    the waiting text pieces into one."""
    import asyncio
    import threading

    from qwen2vl_cli.server.worker import Job, joined
    from qwen2vl_cli.types import Completion, TextDelta

    count = 20000

    async def main():
        job = Job(asyncio.get_running_loop())

        def engine():
            for n in range(count):
                job.emit(TextDelta(f"{n},"))
            job.emit(Completion("", 0, 0, "length", None, 0.0))

        thread = threading.Thread(target=engine)
        thread.start()
        wakes, texts = 0, []
        while True:
            events = await asyncio.wait_for(job.events(), 30)  # a lost wake would hang here
            wakes += 1
            texts += [e.text for e in events if isinstance(e, TextDelta)]
            if isinstance(events[-1], Completion):
                break
            time.sleep(0.001)  # the loop busy with other clients
        thread.join()
        return wakes, texts

    wakes, texts = asyncio.run(main())
    assert "".join(texts) == "".join(f"{n}," for n in range(count))
    assert wakes < count // 4
    done = Completion("ab", 0, 2, "stop", None, 0.0)
    assert joined([TextDelta("a"), TextDelta("b"), done]) == [TextDelta("ab"), done]


def test_responses_go_out_without_waiting_for_the_clients_ack():
    """Nagle's algorithm is off on the server's connections: asyncio turns it off only on sockets made as TCP
    (proto 0 is not), and with it on, every response after a connection's first sat ~40 ms in the kernel,
    waiting for the client's delayed ACK (`batch --server`, OpenAI clients: each kept-alive request paid it).
    Checked on connections accepted through asyncio, as uvicorn accepts them from the server's socket."""
    import asyncio
    import socket

    from qwen2vl_cli.server.config import ServerConfig
    from qwen2vl_cli.types import ModelSpec

    async def accepted_nodelay() -> int:
        found = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                found.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=ServerConfig(ModelSpec("m"), port=0).listen())
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            return await asyncio.wait_for(found, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_the_local_transport_reads_a_server_as_httpx_does(server, tiny_model, images):
    """http.client, which reaches a server on this machine, gives what httpx gives (statuses, headers, JSON, the
    server-sent events and their text), and TransportError where no answer comes."""
    from qwen2vl_cli.transport import TransportError, _Httpx, http

    url = server["url"]
    local, reference = http(url), _Httpx(tls=False, loopback=True)
    assert type(local).__name__ == "_Local" and type(http("https://127.0.0.1:1")).__name__ == "_Httpx"
    body = {"model": str(tiny_model), "max_tokens": 12, "temperature": 0, "stream": True,
            "messages": image_message(images["a"], "Hi")}
    texts = []
    for client in (local, reference):
        health = client.get(url + "/health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert health.headers.get("Content-Type") == "application/json"
        refused = client.post(url + "/v1/chat/completions", json={**body, "model": "gpt-4o"}, timeout=10)
        assert refused.status_code == 404 and "not served here" in refused.json()["error"]["message"]
        with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as reply:
            assert reply.status_code == 200
            events = [line[6:] for line in reply.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        texts.append("".join(choice["delta"].get("content") or "" for event in events[:-1]
                             for choice in json.loads(event)["choices"]))
    assert texts[0] == texts[1] and texts[0]
    for client in (local, reference):
        with pytest.raises(TransportError):
            client.get("http://127.0.0.1:9/health", timeout=5)  # nothing listens there


def test_a_client_connecting_while_the_model_loads_waits_for_it_rather_than_being_refused(tiny_model, tmp_path):
    """The server's socket listens from the moment it is bound, before the load: a request sent then is answered
    once the model is loaded (a started session's starter connects the moment it is told, with no polling)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process, _ = start_server(tiny_model, tmp_path, "--port", port, wait=False)
    try:
        deadline = time.time() + 60
        while True:
            assert process.poll() is None and time.time() < deadline, process.stderr.read().decode()
            try:
                connection = socket.create_connection(("127.0.0.1", port), timeout=1)
                break
            except OSError:
                time.sleep(0.02)
        assert not list(tmp_path.glob(f"{process.pid}.json"))  # connected while it still loads
        with connection:
            connection.settimeout(120)
            connection.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200") and b'"loaded":true' in answer, answer[:300]
    finally:
        process.terminate()
        process.wait(timeout=30)
