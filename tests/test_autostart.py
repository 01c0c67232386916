"""A session that starts itself: the first one-liner with no session running starts `qwen2vl serve` in the
background and answers through it; later ones reuse it; it ends itself after --keep-alive idle; --no-server,
--keep-alive 0 and QWEN2VL_AUTOSTART=0 start none. Real processes, a state directory of their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from .conftest import ROOT, run_process


def _sessions(state_dir) -> list[dict]:
    return [json.loads(p.read_text()) for p in state_dir.glob("[0-9]*.json")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_one_liner_starts_a_session_that_later_ones_reuse_and_that_ends_itself(tiny_model, images, tmp_path):
    expected = run_process("describe", images["a"], "-m", tiny_model, "-n", "12", "--no-server")
    assert expected.returncode == 0, expected.stderr
    expected_many = run_process("ask", *[images["a"]] * 40, "-q", "Which?", "-m", tiny_model, "-n", "4", "--no-server")
    assert expected_many.returncode == 0, expected_many.stderr
    env = {"QWEN2VL_AUTOSTART": "1", "QWEN2VL_STATE_DIR": str(tmp_path)}
    old_log, recent_log = tmp_path / "serve-1700000000.log", tmp_path / "serve-1700000001.log"
    old_log.write_text("a session's log from long ago\n")
    recent_log.write_text("yesterday's\n")
    os.utime(old_log, (time.time() - 8 * 86400,) * 2)
    os.utime(recent_log, (time.time() - 86400,) * 2)
    first = run_process("describe", images["a"], "-m", tiny_model, "-n", "12", "--keep-alive", "4s", env=env)
    assert first.returncode == 0, first.stderr
    assert not old_log.exists() and recent_log.exists()  # logs of sessions started a week ago go, as one starts
    assert first.stdout == expected.stdout  # the answer through the session is the in-process one
    assert b"started a background session" in first.stderr and first.stderr.count(b"\n") == 1
    [session] = _sessions(tmp_path)
    again = run_process("ask", images["a"], "-q", "Describe this image.", "-m", tiny_model, "-n", "12", "--json",
                        env=env)
    assert again.returncode == 0, again.stderr
    assert b"started" not in again.stderr and _sessions(tmp_path) == [session]  # reused, said once
    assert json.loads(again.stdout)["text"] + "\n" == expected.stdout.decode()
    # your user's only: anyone else on the machine who reaches its port is refused (its key is in its record, 0600)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    refused = httpx.post(session["url"] + "/v1/chat/completions", json=body, timeout=30)
    assert refused.status_code == 401, refused.text
    assert set(httpx.get(session["url"] + "/health", timeout=30).json()) == {"status", "pid"}
    record = next(tmp_path.glob(f"{session['pid']}.json"))
    assert record.stat().st_mode & 0o777 == 0o600 and len(session["api_key"]) >= 32
    keyed = httpx.post(session["url"] + "/v1/chat/completions", json=body, timeout=30,
                       headers={"Authorization": f"Bearer {session['api_key']}"})
    assert keyed.status_code == 200, keyed.text
    shown = run_process("ps", "--json", env=env)
    assert json.loads(shown.stdout)[0]["health"]["model"] == str(tiny_model) and b"api_key" not in shown.stdout
    # a prompt over the context is the usage error it is in process (exit 2, the same words), not a server's failure
    over = run_process("describe", images["a"], "-m", tiny_model, "-n", "32000", "--min-pixels", "1000*28*28", env=env)
    assert over.returncode == 2, over.stderr
    assert b"+ --max-new-tokens 32000: over the model's context of 32768 tokens" in over.stderr
    assert b"HTTP" not in over.stderr and over.stderr.count(b"\n") == 1
    # nor does a shared server's --max-images (32) bind the owner's commands: 40 images answer as in process
    many = run_process("ask", *[images["a"]] * 40, "-q", "Which?", "-m", tiny_model, "-n", "4", env=env)
    assert many.returncode == 0, many.stderr
    assert many.stdout == expected_many.stdout
    # a one-liner through the session is a light process: no torch, not what typer >= 0.29 (pydantic) would
    # import, and no httpx (http.client reaches a server on this machine): ~0.2 s of every later one-liner
    light = ("torch", "transformers", "numpy", "pydantic", "click", "pygments", "fastapi", "uvicorn", "httpx")
    code = ("import sys\nsys.argv = ['qwen2vl', 'describe', %r, '-m', %r, '-n', '12']\n"
            "from qwen2vl_cli.cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in %r if m in sys.modules))" % (str(images["a"]), str(tiny_model), light))
    client = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                            env={**os.environ, **env})
    assert client.stdout == expected.stdout.decode() + "LOADED []\n", client.stdout + client.stderr
    deadline = time.monotonic() + 30
    while _alive(session["pid"]) and time.monotonic() < deadline:  # 4 s idle: it ends itself, record removed
        time.sleep(0.2)
    assert not _alive(session["pid"]) and not _sessions(tmp_path)


def test_a_proxy_named_for_other_hosts_is_not_used_to_reach_the_local_session(tiny_model, images, tmp_path):
    """HTTP_PROXY and the like (a dead one here, NO_PROXY unset, as many machines have them) are for remote hosts:
    the session on loopback is reached directly, found by a later one-liner, and stopped."""
    proxy = "http://127.0.0.1:9"
    env = {"QWEN2VL_AUTOSTART": "1", "QWEN2VL_STATE_DIR": str(tmp_path), "HTTP_PROXY": proxy, "http_proxy": proxy,
           "HTTPS_PROXY": proxy, "ALL_PROXY": proxy, "all_proxy": proxy, "NO_PROXY": None, "no_proxy": None}
    try:
        first = run_process("describe", images["a"], "-m", tiny_model, "-n", "4", "--keep-alive", "30s", env=env,
                            timeout=90)
        assert first.returncode == 0, first.stderr
        assert b"started a background session" in first.stderr, first.stderr
        again = run_process("describe", images["a"], "-m", tiny_model, "-n", "4", env=env, timeout=30)
        assert again.returncode == 0 and again.stdout == first.stdout, again.stderr
        assert b"started" not in again.stderr and len(_sessions(tmp_path)) == 1
    finally:
        stopped = run_process("stop", env=env, timeout=30)
    assert stopped.returncode == 0 and not _sessions(tmp_path), stopped.stderr


@pytest.mark.skipif(sys.version_info < (3, 11), reason="python -P (a console script's path) is 3.11's")
def test_a_session_started_from_a_folder_holding_a_qwen2vl_cli_runs_the_installed_code(tiny_model, images, tmp_path):
    """A one-liner run in a folder that holds a package named qwen2vl_cli (a dataset, a cloned repository) starts
    the installed qwen2vl's session, not that folder's code (`python -m` puts its working directory first); so
    does `serve --background`, whose relative paths still mean what they meant where it was run."""
    folder = tmp_path / "datasets" / "photos"  # deeper than the state folder: relative paths differ from there
    (folder / "qwen2vl_cli").mkdir(parents=True)
    (folder / "qwen2vl_cli" / "__init__.py").write_text("")
    (folder / "qwen2vl_cli" / "__main__.py").write_text(f"open({str(folder / 'RAN')!r}, 'w').close()\n")
    env = {**os.environ, "QWEN2VL_AUTOSTART": "1", "QWEN2VL_STATE_DIR": str(tmp_path / "state")}
    ask = [sys.executable, "-P", "-m", "qwen2vl_cli", "describe", str(images["a"]), "-m", tiny_model, "-n", "4"]
    first = subprocess.run(ask, capture_output=True, cwd=folder, env=env, timeout=120)  # -P: as the `qwen2vl` script
    try:
        assert first.returncode == 0 and b"started a background session" in first.stderr, first.stderr
        assert not (folder / "RAN").exists() and len(_sessions(tmp_path / "state")) == 1
        assert run_process("stop", env={"QWEN2VL_STATE_DIR": str(tmp_path / "state")}).returncode == 0
        # `serve --background` too, and it still runs where it was asked to: a relative --model is found
        relative = os.path.relpath(tiny_model, folder)
        started = subprocess.run([*ask[:4], "serve", "--background", "-m", relative, "--port", "0"], cwd=folder,
                                 capture_output=True, env=env, timeout=120)
        assert started.returncode == 0 and not (folder / "RAN").exists(), started.stderr
        again = subprocess.run(ask, capture_output=True, cwd=folder, env=env, timeout=120)
        assert again.returncode == 0 and b"started" not in again.stderr, again.stderr  # answered by that session
        assert again.stdout == first.stdout and len(_sessions(tmp_path / "state")) == 1
    finally:
        run_process("stop", env={"QWEN2VL_STATE_DIR": str(tmp_path / "state")})


def test_a_one_liner_asking_other_settings_gets_a_session_of_its_own(tiny_model, images, tmp_path):
    """A session serves its model with its settings: a one-liner that asks for others (here bfloat16 and eager
    attention against a float32, sdpa session) is not answered by it; one that asks for what it is, or for
    auto, is."""
    env = {"QWEN2VL_AUTOSTART": "1", "QWEN2VL_STATE_DIR": str(tmp_path)}
    ask = ("describe", images["a"], "-m", tiny_model, "-n", "12")
    first = run_process(*ask, "--keep-alive", "30s", env=env)
    assert first.returncode == 0 and b"started a background session" in first.stderr, first.stderr
    [default] = _sessions(tmp_path)
    other = ("--dtype", "bfloat16", "--attn", "eager")
    expected = run_process(*ask, *other, "--no-server")
    assert expected.returncode == 0 and expected.stdout != first.stdout, expected.stderr  # they answer differently
    second = run_process(*ask, *other, "--keep-alive", "30s", env=env)
    assert second.returncode == 0 and b"started a background session" in second.stderr, second.stderr
    assert second.stdout == expected.stdout and len(_sessions(tmp_path)) == 2
    for same in (("--dtype", "float32"), ("--attn", "sdpa", "--device", "cpu"), ()):  # what the first resolved to
        again = run_process(*ask, *same, env=env)
        assert again.returncode == 0 and b"started" not in again.stderr and again.stdout == first.stdout, same
    assert run_process(*ask, *other, env=env).stdout == expected.stdout and len(_sessions(tmp_path)) == 2
    stopped = run_process("stop", env=env)
    assert stopped.returncode == 0, stopped.stderr


def test_ctrl_c_while_a_session_starts_leaves_none_running(tiny_model, images, tmp_path):
    """Ctrl-C while the first one-liner waits for the session it started: exit 130, and that session is stopped
    (it would otherwise load and stay for its keep-alive, a process the user never saw started)."""
    import signal

    env = {**os.environ, "QWEN2VL_AUTOSTART": "1", "QWEN2VL_STATE_DIR": str(tmp_path)}
    client = subprocess.Popen([sys.executable, "-m", "qwen2vl_cli", "describe", str(images["a"]), "-m", tiny_model,
                               "-n", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("serve-*.log")) and time.monotonic() < deadline:  # the session was started
        time.sleep(0.05)
    assert client.poll() is None, client.communicate()
    client.send_signal(signal.SIGINT)
    _, stderr = client.communicate(timeout=30)
    assert client.returncode == 130 and stderr.endswith(b"qwen2vl: error: interrupted\n"), stderr
    time.sleep(8)  # a session left running would have loaded the tiny model and recorded itself by now
    assert not _sessions(tmp_path)


def test_ctrl_c_while_the_session_is_spawned_stops_it(tiny_model, tmp_path, monkeypatch):
    """Ctrl-C inside Popen (which waits for the child's exec; the test above can land there under load) is
    held until the child is known, then stops it: no session is left running that nothing owns."""
    import signal

    from qwen2vl_cli.server import registry
    from qwen2vl_cli.server.config import ServerConfig
    from qwen2vl_cli.types import ModelSpec

    monkeypatch.setenv("QWEN2VL_STATE_DIR", str(tmp_path))
    children: list[subprocess.Popen] = []
    real = subprocess.Popen

    def popen(*args, **kwargs):
        children.append(real(*args, **kwargs))
        os.kill(os.getpid(), signal.SIGINT)  # the interrupt, inside the spawn
        return children[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
    try:
        with pytest.raises(KeyboardInterrupt):
            registry.Launched(ServerConfig(ModelSpec(str(tiny_model)), port=0, keep_alive_s=30, exit_when_idle=True))
        assert children[0].wait(timeout=30) == -signal.SIGTERM
    finally:
        for child in children:
            child.kill()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_session_is_started_when_asked_not_to(tiny_model, images, tmp_path):
    env = {"QWEN2VL_AUTOSTART": "1", "QWEN2VL_STATE_DIR": str(tmp_path)}
    for extra, extra_env in ((["--no-server"], {}), (["--keep-alive", "0"], {}), ([], {"QWEN2VL_AUTOSTART": "0"})):
        result = run_process("describe", images["b"], "-m", tiny_model, "-n", "4", *extra, env={**env, **extra_env})
        assert result.returncode == 0, result.stderr
        assert b"background session" not in result.stderr and not _sessions(tmp_path), extra


def test_a_state_folder_that_cannot_be_used_leaves_one_liners_in_process_and_refuses_a_background_serve(
        tiny_model, images, tmp_path):
    """QWEN2VL_STATE_DIR naming a file (or a folder that cannot be made): a one-liner answers in-process, saying
    once why no session started; `serve`, in the background or not, is its one-line error, exit 6, before any
    load (a session nothing can find or stop is not started)."""
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    env = {"QWEN2VL_AUTOSTART": "1", "QWEN2VL_STATE_DIR": str(blocked)}
    result = run_process("describe", images["b"], "-m", tiny_model, "-n", "4", env=env)
    assert result.returncode == 0 and result.stdout.strip(), result.stderr
    assert result.stderr.decode().startswith(f"qwen2vl: could not start a background session ({blocked}: cannot "
                                             "keep sessions' records there") and result.stderr.count(b"\n") == 1
    for background in (["--background"], []):
        refused = run_process("serve", *background, "-m", tiny_model, "--port", "0", env=env, timeout=30)
        assert refused.returncode == 6 and refused.stderr.count(b"\n") == 1, refused.stderr
        assert b"set QWEN2VL_STATE_DIR to a folder you can write in" in refused.stderr and blocked.read_text() == ""


def test_a_bad_input_is_an_error_at_once_and_starts_no_session(tiny_model, images, tmp_path):
    """Inputs are read while a running session is looked for: a missing, truncated or unreachable image, known bad
    by then, is its one-line error (exit 3) before any session is started, for seconds, to no use."""
    env = {"QWEN2VL_AUTOSTART": "1", "QWEN2VL_STATE_DIR": str(tmp_path)}
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(images["jpg"].read_bytes()[:300])
    for source, reason in ((tmp_path / "missing.jpg", b"no such file"), (truncated, b"image"),
                           ("http://127.0.0.1:9/photo.jpg", b"127.0.0.1")):
        result = run_process("describe", images["a"], source, "-m", tiny_model, "-n", "4", env=env)
        assert result.returncode == 3, result.stderr
        assert result.stderr.count(b"\n") == 1 and reason in result.stderr, result.stderr
        assert b"background session" not in result.stderr and not _sessions(tmp_path)
    video = run_process("ask", "-q", "What happens?", "--video", tmp_path / "missing.mp4", "-m", tiny_model, env=env)
    assert video.returncode == 3 and b"missing.mp4" in video.stderr and not _sessions(tmp_path), video.stderr


def test_a_slow_input_is_read_while_the_session_it_needs_loads(tiny_model, images, tmp_path, http_server):
    """The first one-liner starts its session while a slow input (a download here, a long video's decode) is still
    being read, instead of after it: the photo's server answers only once the session has been started. A bad one
    read that way is still its one-line error (exit 3), and the session started for it is stopped."""

    def once_a_session_starts(state, status, body):
        def route():
            deadline = time.monotonic() + 20
            while not list(state.glob("serve-*.log")) and time.monotonic() < deadline:
                time.sleep(0.05)
            answered.append(bool(list(state.glob("serve-*.log"))))
            return status, body, {"Content-Type": "image/png"}
        return route

    answered: list = []
    good, bad = tmp_path / "good", tmp_path / "bad"
    http_server.routes["/after-start.png"] = once_a_session_starts(good, 200, images["a"].read_bytes())
    http_server.routes["/gone-after-start.png"] = once_a_session_starts(bad, 404, b"gone")
    env = {"QWEN2VL_AUTOSTART": "1", "QWEN2VL_STATE_DIR": str(good)}
    first = run_process("describe", f"{http_server.url}/after-start.png", "-m", tiny_model, "-n", "6", env=env)
    try:
        assert first.returncode == 0 and b"started a background session" in first.stderr, first.stderr
        assert answered == [True]  # the session was on its way before the photo came
        again = run_process("describe", images["a"], "-m", tiny_model, "-n", "6", env=env)
        assert again.stdout == first.stdout and b"started" not in again.stderr, again.stderr  # the same photo
    finally:
        run_process("stop", env=env)
    refused = run_process("describe", f"{http_server.url}/gone-after-start.png", "-m", tiny_model, "-n", "6",
                          env={**env, "QWEN2VL_STATE_DIR": str(bad)})
    assert refused.returncode == 3 and refused.stderr.count(b"\n") == 1 and b"404" in refused.stderr, refused.stderr
    assert answered == [True, True]
    time.sleep(8)  # a session left running would have loaded the tiny model and recorded itself by now
    assert not _sessions(bad)


def test_a_model_that_cannot_load_starts_no_session(tmp_path, images):
    """A broken model directory: no server is spawned (it would fail the same way); the in-process load says why."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    state = tmp_path / "state"
    result = run_process("describe", images["a"], "-m", broken, env={"QWEN2VL_AUTOSTART": "1",
                                                                     "QWEN2VL_STATE_DIR": str(state)})
    assert result.returncode == 4, result.stderr
    assert b"background session" not in result.stderr and not list(state.glob("*.json"))


def test_verbose_through_a_session_says_which_answers_and_its_load(tiny_model, images, tmp_path):
    """--verbose names the session that answers and gives its own line (weights, path, the load's phases), as an
    in-process one-liner gives its own."""
    import re

    env = {"QWEN2VL_AUTOSTART": "1", "QWEN2VL_STATE_DIR": str(tmp_path)}
    try:
        for _ in range(2):  # the one-liner that starts the session, then one that finds it
            done = run_process("describe", images["a"], "-m", tiny_model, "-n", "4", "--verbose", env=env)
            assert done.returncode == 0, done.stderr
            found = re.search(rf"qwen2vl: answering through session ([0-9]+) at http://127\.0\.0\.1:[0-9]+: "
                              rf"{re.escape(str(tiny_model))}: float32 weights on cpu; fast path off \(CPU\); "
                              r"loaded in [0-9.]+s \(imports [0-9.]+s", done.stderr.decode())
            assert found and [int(found.group(1))] == [s["pid"] for s in _sessions(tmp_path)], done.stderr
    finally:
        run_process("stop", env=env)


def test_a_taken_port_is_the_same_usage_error_in_the_background_as_in_the_foreground(tiny_model, tmp_path):
    """`serve --port N` with N taken: one line naming the address, exit 2, at once, whether the server is to run
    in this process or in the background (a started session's socket is bound by its starter and handed over; it
    was the session's own error, exit 6 naming a log); nothing is started or recorded."""
    import socket

    state = tmp_path / "state"
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        for background in (["--background"], []):
            started = time.monotonic()
            result = run_process("serve", *background, "-m", tiny_model, "--port", port,
                                 env={"QWEN2VL_STATE_DIR": str(state)}, timeout=60)
            assert result.returncode == 2 and result.stderr.count(b"\n") == 1, (background, result.stderr)
            assert f"127.0.0.1:{port}: Address already in use".encode() in result.stderr and b"--port 0" in result.stderr
            assert b"log" not in result.stderr and time.monotonic() - started < 20, result.stderr
            assert not list(state.glob("*.json")) and not list(state.glob("*.log")), background
    finally:
        taken.close()


def test_a_started_session_that_fails_to_load_is_one_line_at_once(tiny_model, tmp_path):
    """A session that fails as it starts (its weights cut short) ends its starter's wait at once,
    with the session's own one-line error from its log; nothing is left recorded."""
    import shutil

    broken = tmp_path / "cut"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    state = tmp_path / "state"
    started = time.monotonic()
    result = run_process("serve", "--background", "-m", broken, "--port", "0", env={"QWEN2VL_STATE_DIR": str(state)})
    assert result.returncode == 6 and result.stderr.count(b"\n") == 1, result.stderr
    assert b"the server exited (qwen2vl: error: " in result.stderr and b"log: " in result.stderr, result.stderr
    assert time.monotonic() - started < 60 and not list(state.glob("*.json"))


def test_one_liners_started_together_start_one_session(tiny_model, images, tmp_path):
    """Three one-liners at once (as `xargs -P` runs them) with no session: one starts it, the others wait for it
    and answer through it; every answer is the in-process one."""
    import subprocess
    import sys

    from .conftest import ROOT

    expected = run_process("describe", images["c"], "-m", tiny_model, "-n", "8", "--no-server")
    env = {**os.environ, "QWEN2VL_AUTOSTART": "1", "QWEN2VL_STATE_DIR": str(tmp_path)}
    processes = [subprocess.Popen([sys.executable, "-m", "qwen2vl_cli", "describe", str(images["c"]), "-m",
                                   str(tiny_model), "-n", "8", "--keep-alive", "30s"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=env, cwd=ROOT) for _ in range(3)]
    outputs = [process.communicate(timeout=300) for process in processes]
    try:
        assert [process.returncode for process in processes] == [0, 0, 0], [err for _, err in outputs]
        assert all(out == expected.stdout for out, _ in outputs)
        assert sum(b"started a background session" in err for _, err in outputs) == 1
        assert len(_sessions(tmp_path)) == 1
    finally:
        run_process("stop", env={"QWEN2VL_STATE_DIR": str(tmp_path)})


def test_a_bad_keep_alive_is_a_usage_error_even_without_a_session(cli, images):
    result = cli("describe", images["a"], "--keep-alive", "soon", "--no-server")
    assert result.exit_code == 2 and "not a duration" in result.stderr


def test_which_sessions_serve_which_settings():
    from qwen2vl_cli import __version__
    from qwen2vl_cli.server.registry import serves
    from qwen2vl_cli.types import ModelSpec

    health = {"model": "m", "version": __version__, "resolved": {"device": "cuda", "dtype": "bfloat16", "attn": "sdpa"},
              "settings": {"device": "auto", "dtype": "auto", "attn": "auto", "quantize": None}}
    assert serves(health, ModelSpec("m")) and serves(health, ModelSpec("m", "cuda", "bfloat16", "sdpa"))
    assert not serves(health, ModelSpec("other"))
    assert not serves(health, ModelSpec("m", dtype="float16")) and not serves(health, ModelSpec("m", attn="eager"))
    assert not serves(health, ModelSpec("m", device="cuda:1")) and not serves(health, ModelSpec("m", quantize="4bit"))
    assert serves(health, ModelSpec("m", device="cuda:0"))  # the first GPU, named either way
    assert serves({**health, "settings": {**health["settings"], "quantize": "4bit"}}, ModelSpec("m", quantize="4bit"))
    assert serves({**health, "settings": {**health["settings"], "quantize": "4bit"}}, ModelSpec("m"))  # not asked
    assert not serves({**health, "version": "0.0.1"}, ModelSpec("m"))  # a session left running by another release
    assert not serves({"model": "m"}, ModelSpec("m"))  # an older session says neither
