"""Hostile and careless input: bounded reads (devices, FIFOs, drip-feeding servers), broken model directories,
requests over the model's context, a closed or full stdout, unwritable outputs, concurrent batch runs,
hostile manifests, cut-off videos. Cases that could eat the machine run in a subprocess under a memory
limit and a timeout: a regression fails the test instead of taking the machine down."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from .conftest import ROOT, noise_image
from .test_sources import one_error_line

MEMORY_LIMIT = 6 * 1024 ** 3  # address space: torch's import fits, a runaway read does not get far


def bounded(*args, env: dict | None = None, timeout: float = 60, stdin=None, stdout=subprocess.PIPE,
            input: bytes | None = None) -> subprocess.CompletedProcess:
    """`python -m qwen2vl_cli ARGS` under a memory limit and a timeout."""

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))

    return subprocess.run([sys.executable, "-m", "qwen2vl_cli", *map(str, args)], env={**os.environ, **(env or {})},
                          cwd=ROOT, timeout=timeout, preexec_fn=limit, stdin=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, input=input)


def error_line(process) -> str:
    lines = process.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen2vl: error: "), process.stderr.decode()
    return lines[0]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "photo.png"
    noise_image(64, 48, 1).save(path)
    return path


# ---- reads are bounded --------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [["describe", "/dev/zero"], ["describe", "/dev/urandom"],
                                     ["batch", "/dev/zero"], ["video", "/dev/zero"]])
def test_devices_are_refused_not_read(command, tiny_model):
    started = time.monotonic()
    process = bounded(*command, "--model", tiny_model, "-n", "2", "--no-server")
    assert time.monotonic() - started < 30
    if command[0] == "batch":  # the item fails, the run finishes
        assert process.returncode == 5
        assert "character device, not a regular file" in json.loads(process.stdout)["error"]
    else:
        assert process.returncode == 3 and "is a character device, not a regular file" in error_line(process)


def test_a_fifo_nobody_writes_to_is_refused(cli, tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result = cli("describe", fifo, "-n", "2")
    assert result.exit_code == 3
    one_error_line(result, "named pipe (FIFO), not a regular file")


def test_local_files_have_the_download_cap(cli, tmp_path, photo):
    big = tmp_path / "big.png"
    big.write_bytes(photo.read_bytes() + b"\0" * 5000)
    result = cli("describe", big, "--max-download", "1KB")
    assert result.exit_code == 3
    one_error_line(result, "too large")


@pytest.fixture
def drip_server():
    """Answers 200 with a long body, one byte every 0.2 s: each read is quick, the whole never ends."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nContent-Type: image/png\r\n\r\n")
                try:
                    while not stop.wait(0.2):
                        connection.sendall(b"x")
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/slow.png"
    stop.set()
    listener.close()


def test_timeout_bounds_the_whole_download(cli, drip_server):
    started = time.monotonic()
    result = cli("describe", drip_server, "--timeout", "1.5")
    assert time.monotonic() - started < 5
    assert result.exit_code == 3
    one_error_line(result, "timed out after 1.5s")


# ---- model directories ----------------------------------------------------------------------------------
def _broken_copy(tiny_model, tmp_path, damage):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    damage(folder)
    return folder


@pytest.mark.parametrize("damage, reason", [
    (lambda f: (f / "config.json").unlink(), "no config.json"),
    (lambda f: os.truncate(f / "model.safetensors", (f / "model.safetensors").stat().st_size // 2),
     "model.safetensors is truncated"),
    (lambda f: os.truncate(f / "model.safetensors", 5), "not a readable safetensors file"),
    (lambda f: (f / "model.safetensors").unlink(), "no weights"),
    (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer"),
    (lambda f: (f / "processor_config.json").unlink(), "no image processor configuration"),
    (lambda f: (f / "config.json").write_text("{not json"), "config.json is not valid JSON"),
], ids=["no-config", "truncated-weights", "cut-header", "no-weights", "no-tokenizer", "no-processor", "bad-config"])
def test_a_broken_model_directory_is_exit_4_before_loading(tiny_model, tmp_path, photo, damage, reason):
    folder = _broken_copy(tiny_model, tmp_path, damage)
    process = bounded("describe", photo, "--model", folder, "--no-server", timeout=60)
    assert process.returncode == 4
    assert reason in error_line(process)


def test_offline_is_found_in_seconds(tmp_path, photo):
    env = {"HF_HUB_OFFLINE": "", "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": "http://127.0.0.1:9"}
    started = time.monotonic()
    process = bounded("describe", photo, "--model", "Qwen/Qwen2-VL-2B-Instruct", "--no-server", env=env)
    assert time.monotonic() - started < 30
    assert process.returncode == 4
    assert "hub cannot be reached" in error_line(process)


# ---- the model's context ------------------------------------------------------------------------------------
def test_requests_over_the_context_are_usage_errors(cli, photo):
    assert cli("ask", "-q", "hi", "-n", "100000").exit_code == 2
    result = cli("describe", photo, "--min-pixels", "100000*28*28")
    assert result.exit_code == 2 and "100000 tokens per image" in result.stderr
    result = cli("describe", photo, photo, photo, "--min-pixels", "12000*28*28", "--max-pixels", "12000*28*28")
    assert result.exit_code == 2
    one_error_line(result, "the images/video alone are 36", "context of 32768 tokens")
    result = cli("ask", "-q", "hi", "-n", "32760", "--system", "word " * 20)
    assert result.exit_code == 2
    one_error_line(result, "the prompt is", "--max-new-tokens 32760")


# ---- standard streams ----------------------------------------------------------------------------------------
def test_closed_and_full_standard_streams(tiny_model, photo):
    args = ("--model", tiny_model, "-n", "2", "--no-server")
    closed_stdin = bounded("describe", photo, *args, stdin=subprocess.DEVNULL)
    assert closed_stdin.returncode == 0
    no_stdin = subprocess.run(f"{sys.executable} -m qwen2vl_cli describe - {' '.join(map(str, args))} <&-",
                              shell=True, capture_output=True, cwd=ROOT, timeout=60)
    assert no_stdin.returncode == 3 and "stdin: closed" in error_line(no_stdin)
    no_stdout = subprocess.run(f"{sys.executable} -m qwen2vl_cli describe {photo} {' '.join(map(str, args))} >&-",
                               shell=True, stderr=subprocess.PIPE, cwd=ROOT, timeout=60)
    assert no_stdout.returncode == 7 and "stdout: closed" in error_line(no_stdout)
    with open("/dev/full", "w") as full:
        process = bounded("describe", photo, *args, "--json", stdout=full)
    assert process.returncode == 7 and "no space left" in error_line(process)


def test_output_closed_early_is_the_tables_exit_7(tiny_model, photo):
    """stdout closed before the answer is written (`| head -c 0`): the exit table's 7 ("stdout closed"), one line
    (it was 1, "any other error")."""
    read, write = os.pipe()
    os.close(read)  # nobody will read: the first write gets EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "qwen2vl_cli", "describe", str(photo), "-m", str(tiny_model),
                               "-n", "4", "--no-server"], stdout=write, stderr=subprocess.PIPE, cwd=ROOT, timeout=120)
    finally:
        os.close(write)
    assert done.returncode == 7, done.stderr
    assert done.stderr.decode().strip().splitlines() == ["qwen2vl: error: output closed early (broken pipe)"]


# ---- batch outputs ---------------------------------------------------------------------------------------------
def test_output_in_a_missing_directory_fails_before_the_model_loads(cli, photo, tmp_path):
    result = cli("batch", photo, "-o", tmp_path / "nowhere" / "out.jsonl")
    assert result.exit_code == 7
    one_error_line(result, "no such directory")


def test_one_run_owns_a_results_file(cli, photo, tmp_path):
    from qwen2vl_cli.batch.sinks import OutputLock

    out = tmp_path / "out.jsonl"
    lock = OutputLock(out)  # another run holds it
    try:
        result = cli("batch", photo, "-n", "2", "-o", out)
    finally:
        lock.release()
    assert result.exit_code == 7 and "another qwen2vl batch is writing it" in result.stderr
    assert not out.exists()
    assert cli("batch", photo, "-n", "2", "-o", out).exit_code == 0
    assert len(out.read_text().splitlines()) == 1 and not list(tmp_path.glob(".*lock"))


def test_two_runs_at_once_never_write_an_item_twice(tiny_model, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for number in range(6):
        noise_image(40 + number * 4, 40, number).save(folder / f"{number}.png")
    for suffix in ("jsonl", "csv"):
        out = tmp_path / f"out.{suffix}"
        command = [sys.executable, "-m", "qwen2vl_cli", "batch", str(folder), "-n", "3", "-o", str(out),
                   "--model", str(tiny_model), "--no-server", "-b", "1"]
        runs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        codes = sorted(run.wait(timeout=120) for run in runs)
        assert codes in ([0, 0], [0, 7]), [run.stderr.read() for run in runs]
        rerun = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=120)
        assert rerun.returncode == 0 and b"6 skipped" in rerun.stderr
        lines = out.read_text().splitlines()
        assert len(lines) == 6 + (suffix == "csv")


def test_manifest_fields_never_overwrite_the_result(cli, photo, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"source": str(photo), "text": "injected", "error": "x"}) + "\n")
    result = cli("batch", "--manifest", manifest)
    assert result.exit_code == 3
    one_error_line(result, "m.jsonl line 1", "'text'")


def test_one_file_is_one_item_and_prompts_make_items(cli, photo, tmp_path, monkeypatch):
    monkeypatch.chdir(photo.parent)
    result = cli("batch", "photo.png", "./photo.png", f"file://{photo}", "-n", "2")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 1 and "listed twice" in result.stderr
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"source": str(photo), "prompt": p, "id": n}) + "\n"
                                for n, p in enumerate(["What colour?", "How many?"])))
    out = tmp_path / "out.jsonl"
    assert cli("batch", "--manifest", manifest, "-n", "2", "-o", out).exit_code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["prompt"], r["id"]) for r in records] == [("What colour?", 0), ("How many?", 1)]
    rerun = cli("batch", "--manifest", manifest, "-n", "2", "-o", out)
    assert rerun.exit_code == 0 and "2 skipped" in rerun.stderr


def test_sidecar_only_runs_name_their_failures(cli, photo, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    shutil.copy(photo, tmp_path / "good.png")
    result = cli("batch", tmp_path / "good.png", bad, "-n", "2", "--sidecar")
    assert result.exit_code == 5 and f"failed: {bad}: not an image" in result.stderr


def test_a_full_disk_leaves_no_temporary_sidecar(cli, photo, tmp_path, monkeypatch):
    import errno

    from qwen2vl_cli.batch import sinks

    shutil.copy(photo, tmp_path / "good.png")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(sinks.os, "replace", full)
    result = cli("batch", tmp_path / "good.png", "-n", "2", "--sidecar")
    assert result.exit_code == 7 and "no space left" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.png"]


# ---- videos and frames -------------------------------------------------------------------------------------------
def test_a_cut_off_video_is_refused_not_padded(cli, tmp_path):
    import av
    import numpy as np

    path = tmp_path / "front.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:  # the index at the front
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(100):
            frame = av.VideoFrame.from_ndarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.truncate(path, path.stat().st_size // 2)
    result = cli("video", path, "-n", "2", "-v")
    assert result.exit_code == 3
    one_error_line(result, "truncated or corrupt")


def test_frames_of_different_sizes_are_an_input_error(cli, tmp_path):
    noise_image(64, 48, 1).save(tmp_path / "f1.png")
    noise_image(48, 64, 2).save(tmp_path / "f2.png")
    result = cli("video", tmp_path, "-n", "2")
    assert result.exit_code == 3
    one_error_line(result, "frames differ in size", "f2.png is 48x64")


def test_lists_and_manifests_from_devices_are_bounded(tiny_model):
    with open("/dev/zero", "rb") as zero:
        listed = bounded("batch", "-", "--model", tiny_model, "--no-server", stdin=zero)
    assert listed.returncode == 3 and "stdin line 1: longer than" in error_line(listed)
    manifest = bounded("batch", "--manifest", "/dev/zero", "--model", tiny_model, "--no-server")
    assert manifest.returncode == 3 and "is a character device" in error_line(manifest)
