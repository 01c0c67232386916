"""The engine's benchmark (issue 15): qwen2vl's continuous-batching engine beside the code before it (static
batches), side by side in one run, on a random-weight 2B (real shapes, bf16) and 1280x960 photos (1230 tokens):

  - batch captioning, 128 new tokens each (`run_batch`, as `qwen2vl batch` runs it): images/s;
  - realistic answer lengths (per item from a seeded distribution, 16-320 tokens), the same items through
    `generate_batch` (the engine: one request each; before: static batches of its batch size, each as long as
    its longest answer): images/s and useful tokens/s;
  - 16 concurrent clients through `qwen2vl serve` (8 streamed, 8 not, 4 requests each): images/s, and the
    streamed requests' time to first token while the others run (median);
  - a `qwen2vl describe` one-liner with no session running, and the one after it: wall seconds;
  - the engine side also: the server's load without the server (16 threads submitting in process); a streamed
    one-liner's time to first token while a batch's queue runs (`one_liners_into_a_batch`); what the
    GPU alone takes for one prefill and one decode step (CUDA events), with the batch rate those bound; and 100
    one-liners 8 at a time (`xargs -P 8`) beside one `qwen2vl batch` over the same photos (wall seconds).

Each side runs in its own process with its own tree on PYTHONPATH (the tree before: `git archive COMMIT`).

    python benchmarks/engine.py --baseline DIR [--images 192] [--json-out FILE] [--only engine] [--profile DIR]

`--profile DIR` samples the engine side's threads (benchmarks/sampler.py): DIR/batch.json (the in-process
measures), DIR/server.json (the server under 16 clients), DIR/one_liner.json (the one-liner after the first).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 128
MAX_PIXELS = 1280 * 28 * 28
UNUSED_EOS = 151935  # an id the tokenizer never makes: every answer runs to its length
CLIENTS, PER_CLIENT = 16, 4
BYTECODE = Path(tempfile.gettempdir()) / "qwen2vl-bench-bytecode"  # every measured process's (_env)
_COMPILED: set[str] = set()  # trees whose command-line modules are in BYTECODE


def lengths(count: int, seed: int = 0) -> list[int]:
    """Answer lengths as captions come: most short, a long tail (lognormal, median ~80, 16-320)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [int(n) for n in np.clip(rng.lognormal(np.log(80), 0.7, count), 16, 320)]


def side(tree: str, checkpoint: str, photos: list[str], out: str) -> None:
    """One side's measures, in this process (its tree first on sys.path)."""
    sys.path.insert(0, tree)
    if os.environ.get("QWEN2VL_BENCH_PROFILE") and tree == str(ROOT):
        from sampler import start

        start(os.path.join(os.environ["QWEN2VL_BENCH_PROFILE"], "batch.json"))
    import torch

    try:
        from qwen2vl_cli.engine.session import ModelSession
        from qwen2vl_cli.types import ChatRequest, GenerationOptions, Media, ModelSpec
    except ImportError:  # the tree before the engine
        from qwen2vl_cli.session import ChatRequest, GenerationOptions, Media, ModelSession, ModelSpec
    from qwen2vl_cli.batch.inputs import BatchItem
    from qwen2vl_cli.batch.runner import BatchConfig, BatchSummary, Results, run_batch
    from qwen2vl_cli.sources import FetchLimits, ImageOptions, resolve_image

    report: dict = {"tree": tree}
    session = ModelSession(ModelSpec(model=checkpoint, device="cuda", dtype="bfloat16", attn="sdpa")).load()
    session.model.generation_config.eos_token_id = [UNUSED_EOS]
    if hasattr(session, "eos_ids"):
        session.eos_ids = {UNUSED_EOS}
    images = [resolve_image(p, ImageOptions(max_pixels=MAX_PIXELS)) for p in photos]
    request = lambda i, n: ChatRequest("Describe this image.", [Media("image", photos[i], images[i])],  # noqa: E731
                                       generation=GenerationOptions(max_new_tokens=n))
    list(session.stream(request(0, 16)))  # warm-up: kernels, graphs
    session.generate_batch([request(i, 16) for i in range(8)])

    class Sink:
        def state(self, item):
            return None

        def write(self, record):
            if record["error"]:
                report.setdefault("errors", []).append(record["error"])

        def close(self):
            pass

    config = BatchConfig(prompt="Describe this image.", system=None, images=ImageOptions(max_pixels=MAX_PIXELS),
                         limits=FetchLimits(), generation=GenerationOptions(max_new_tokens=NEW_TOKENS), workers=8)
    torch.cuda.reset_peak_memory_stats()
    summary = run_batch([BatchItem(p) for p in photos], session, config, Results([Sink()], BatchSummary(), lambda n: None))
    report["batch_128_images_per_s"] = round(summary.images_per_second, 2)
    report["batch_128_failed"] = summary.failed
    report["batch_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    wanted = lengths(len(photos))
    requests = [request(i, n) for i, n in enumerate(wanted)]
    start = time.perf_counter()
    if hasattr(session, "engine"):
        answers = session.generate_batch(requests)
        report["rows"] = session.engine.rows.capacity
    else:  # static batches, each as long as its longest answer (what a batch of generate calls does)
        from qwen2vl_cli.batch.runner import auto_batch_size

        size = auto_batch_size(session, config)
        report["rows"] = size
        answers = []
        for first in range(0, len(requests), size):
            chunk = requests[first:first + size]
            longest = GenerationOptions(max_new_tokens=max(r.generation.max_new_tokens for r in chunk))
            for r in chunk:
                r.generation = longest
            answers += session.generate_batch(chunk)
    seconds = time.perf_counter() - start
    useful = sum(min(a.completion_tokens, n) for a, n in zip(answers, wanted))
    report["realistic_images_per_s"] = round(len(requests) / seconds, 2)
    report["realistic_useful_tokens_per_s"] = round(useful / seconds, 1)
    report["realistic_lengths"] = {"mean": round(statistics.mean(wanted), 1), "min": min(wanted), "max": max(wanted)}
    if hasattr(session, "engine"):
        report.update(clients_in_process(session, request, min(64, len(photos))))
        report.update(one_liners_into_a_batch(session, request, len(photos)))
        report["gpu_costs"] = gpu_costs(session, request)
    Path(out).write_text(json.dumps(report))


def run_clients(client) -> float:
    """Run `client(index)` on CLIENTS threads at once; seconds until the last is done."""
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def clients_in_process(session, request, count: int) -> dict:
    """The server measure's load without the server: 16 threads submitting to the engine (8 streamed, 8 not,
    in turn), `count` requests of 128 tokens: images/s and the streamed ones' time to first token. Set beside
    the server's, it separates what HTTP and the server's threads cost from what 16 rows can do."""
    from qwen2vl_cli.types import TextDelta

    ttft: list[float] = []
    session.engine.phases.clear()  # timings of these requests only, not the batch runs' before them

    def client(index: int) -> None:
        for k in range(count // CLIENTS):
            item = request((index * (count // CLIENTS) + k) % count, NEW_TOKENS)
            start = time.perf_counter()
            if index % 2:
                session.generate_batch([item])
                continue
            first = True
            for event in session.stream(item):
                if first and isinstance(event, TextDelta):
                    ttft.append(time.perf_counter() - start)
                    first = False

    seconds = run_clients(client)
    return {"in_process_16_clients_images_per_s": round(count // CLIENTS * CLIENTS / seconds, 2),
            "in_process_16_clients_ttft_ms_median": round(statistics.median(ttft) * 1000, 1),
            "in_process_16_clients_engine_timings_ms": session.engine.timings_ms()}


def one_liners_into_a_batch(session, request, count: int, every_s: float = 0.25) -> dict:
    """Issue 15's "time to first token for a request arriving into a busy engine", as a one-liner typed while a batch
    runs through the same session meets it: `count` non-streamed requests of 128 tokens submitted at once (a batch's
    queue), and a streamed one (16 tokens) every `every_s` while they run, each after the one before has ended; the
    streamed ones' times to first token (from submit), and the batch's images/s with them beside it."""
    from qwen2vl_cli.types import TextDelta

    results: list = []
    batch = threading.Thread(target=lambda: results.extend(
        session.generate_batch([request(i, NEW_TOKENS) for i in range(count)])))
    start = time.perf_counter()
    batch.start()
    ttft: list[float] = []
    index = 0
    while batch.is_alive():
        time.sleep(every_s)
        submitted = time.perf_counter()
        for event in session.stream(request(index % count, 16)):
            if isinstance(event, TextDelta):
                ttft.append(time.perf_counter() - submitted)
                break  # closing the stream cancels the rest: the probe frees its row at once
        index += 1
    batch.join()
    seconds = time.perf_counter() - start
    return {"busy_probe_ttft_ms_median": round(statistics.median(ttft) * 1000, 1) if ttft else None,
            "busy_probe_ttft_ms_max": round(max(ttft) * 1000, 1) if ttft else None, "busy_probes": len(ttft),
            "busy_batch_images_per_s": round(len(results) / seconds, 2)}


def gpu_ms(run, times: int) -> float:
    """GPU milliseconds per call of `run` (CUDA events around `times` calls in a row, after one warm-up call)."""
    import torch

    run()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(times):
        run()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / times


def gpu_costs(session, request) -> dict:
    """What the GPU alone takes (CUDA events, the host out of the way): one photo's prefill (vision tower and
    language model, graphs warm) and its vision tower, one decode step at 16 rows and at the running batch's most
    (scheduler.MAX_ROWS) of ~1360 positions; the batch rate they bound (every photo prefilled, 128 steps shared by
    the most rows, one after the other); and vision towers beside 64-row decode steps on two streams (`beside`)."""
    import torch

    from qwen2vl_cli.engine.fast.decoder import Rows
    from qwen2vl_cli.engine.scheduler import MAX_ROWS

    fast = session.fast
    prepared = session.prepare_one(request(0, NEW_TOKENS))
    inputs = session.to_device(prepared)
    with torch.inference_mode():
        fast._prefill(inputs, prepared)  # its shape seen twice: graphs from here on
        prefill_ms = gpu_ms(lambda: fast._prefill(inputs, prepared), 10)
        costs = {"prefill_ms": round(prefill_ms, 2)}
        rows = Rows(fast, MAX_ROWS, 2048, session.eos_ids, session.pad_id)
        host = torch.empty(MAX_ROWS, dtype=torch.long, pin_memory=True)
        length = int(prepared["input_ids"].shape[1]) + NEW_TOKENS // 2
        for count in sorted({16, 64, MAX_ROWS}):
            rows.count = count
            rows.slot[:count] = length
            rows.positions[:count] = length
            rows.finished[:count] = False
            rows.mask[:count, ..., :length] = 0.0
            costs[f"step_ms_{count}_rows"] = round(gpu_ms(lambda: rows.step(host), 50), 3)
        pixels, grid = inputs["pixel_values"], prepared["image_grid_thw"]
        costs["vision_ms"] = round(gpu_ms(lambda: fast.prefill._vision(pixels, grid), 10), 2)
        rows.count = 64
        costs.update(beside(lambda: fast.prefill._vision(pixels, grid), lambda: rows.step(host)))
        del rows
    per_image_ms = prefill_ms + NEW_TOKENS * costs[f"step_ms_{MAX_ROWS}_rows"] / MAX_ROWS
    costs["batch_bound_images_per_s"] = round(1000 / per_image_ms, 1)
    return costs


def beside(vision, step, towers: int = 8, steps: int = NEW_TOKENS) -> dict:
    """Whether the GPU overlaps the two kinds of work: `towers` vision towers on one stream queued at once with
    `steps` 64-row decode steps on another (of high priority, then of default priority): when each stream is done
    (ms from the start), to set against the two alone one after the other. (H200, 2026-12-06: 8 towers and 128
    steps took 538 ms side by side, 540 ms one after the other: the towers fill the GPU, the steps wait.)"""
    import torch

    side = torch.cuda.Stream()
    out = {}
    for name, stream in (("high_priority", torch.cuda.Stream(priority=-1)), ("default_priority", torch.cuda.Stream())):
        torch.cuda.synchronize()
        begin = torch.cuda.Event(enable_timing=True)
        begin.record()
        ends = []
        for where, run, times in ((side, vision, towers), (stream, step, steps)):
            where.wait_event(begin)
            with torch.cuda.stream(where):
                for _ in range(times):
                    run()
                ends.append(torch.cuda.Event(enable_timing=True))
                ends[-1].record()
        torch.cuda.synchronize()
        out[f"steps_on_{name}_stream_ms"] = {"towers_done": round(begin.elapsed_time(ends[0]), 1),
                                             "steps_done": round(begin.elapsed_time(ends[1]), 1)}
    return {"beside": {"towers": towers, "steps": steps, **out}}


def serve_and_clients(tree: str, checkpoint: str, photos: list[str], profile: str | None,
                      python: list[str] | None = None, port: int | None = None, processes: bool = False) -> dict:
    """`qwen2vl serve` of one tree, 16 clients at once (8 streamed, 8 not); images/s, streamed TTFT, and the CPU
    seconds the server's process and the clients used. `python`: the command line that runs qwen2vl_cli (default
    `_python`); `processes`: each client its own process (default: threads of this one, as before)."""
    import httpx

    env = _env(tree)
    port = port or (8701 if tree != str(ROOT) else 8702)
    python = python or _python(profile and os.path.join(profile, "server.json"))
    server = subprocess.Popen([*python, "serve", "--model", checkpoint, "--port", str(port),
                               "--max-queue", "256"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    pool = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        for _ in range(2):
            httpx.post(url + "/v1/chat/completions", json=_chat_body(photos[0], checkpoint, False) | {"max_tokens": 8},
                       timeout=300)
        work = [(url, checkpoint, photos, index) for index in range(CLIENTS)]
        server_cpu, clients_cpu = _cpu_s(server.pid), time.process_time()
        if processes:
            import multiprocessing

            pool = multiprocessing.get_context("spawn").Pool(CLIENTS)
            pool.map(time.sleep, [0.1] * CLIENTS, chunksize=1)  # every client process started and imported
            start = time.perf_counter()
            results = pool.map(_server_client, work, chunksize=1)
            seconds = time.perf_counter() - start
        else:
            results = [{}] * CLIENTS
            seconds = run_clients(lambda index: results.__setitem__(index, _server_client(work[index])))
        server_cpu = _cpu_s(server.pid) - server_cpu
        clients_cpu = sum(r["cpu_s"] for r in results) if processes else time.process_time() - clients_cpu
        ttft = [t for r in results for t in r["ttft"]]
        tokens = [n for r in results for n in r["tokens"]]
        facts = httpx.get(url + "/health", timeout=5).json()
        return {"server_images_per_s": round(CLIENTS * PER_CLIENT / seconds, 2),
                "server_engine_timings_ms": facts.get("timings_ms"),
                "server_streamed_ttft_ms_median": round(statistics.median(ttft) * 1000, 1) if ttft else None,
                "server_streamed_ttft_ms_max": round(max(ttft) * 1000, 1) if ttft else None,
                "server_nonstreamed_mean_tokens": round(statistics.mean(tokens), 1) if tokens else None,
                "server_cpu_s_per_s": round(server_cpu / seconds, 2), "clients": "processes" if processes else "threads",
                "clients_cpu_s_per_s": round(clients_cpu / seconds, 2),
                "server_errors": [e for r in results for e in r["errors"]][:5]}
    finally:
        if pool is not None:
            pool.terminate()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


def _chat_body(photo: str, model: str, stream: bool) -> dict:
    uri = "data:image/jpeg;base64," + base64.b64encode(Path(photo).read_bytes()).decode()
    return {"model": model, "stream": stream, "max_tokens": NEW_TOKENS, "temperature": 0,
            "mm_processor_kwargs": {"max_pixels": MAX_PIXELS},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                      {"type": "text", "text": "Describe this image."}]}]}


def _server_client(work: tuple) -> dict:
    """One of the server measure's clients (even ones stream): PER_CLIENT requests one after another; their times
    to first token, completion tokens, errors, and the CPU seconds this thread used."""
    import httpx

    url, model, photos, index = work
    streamed = index % 2 == 0
    bodies = [_chat_body(photos[(index * PER_CLIENT + k) % len(photos)], model, streamed) for k in range(PER_CLIENT)]
    ttft, tokens, errors = [], [], []
    cpu = time.thread_time()
    with httpx.Client(timeout=600) as http:
        for body in bodies:
            start = time.perf_counter()
            if streamed:
                with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
                    first = None
                    for line in response.iter_lines():
                        if line.startswith("data: ") and '"content": "' in line and first is None:
                            first = time.perf_counter() - start
                            if '"content": ""' not in line:
                                ttft.append(first)
                            else:
                                first = None
                    if response.status_code != 200:
                        errors.append(str(response.status_code))
            else:
                response = http.post(url + "/v1/chat/completions", json=body)
                if response.status_code != 200:
                    errors.append(response.text[:200])
                else:
                    tokens.append(response.json()["usage"]["completion_tokens"])
    return {"ttft": ttft, "tokens": tokens, "errors": errors, "cpu_s": time.thread_time() - cpu}


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used, its threads together (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _env(tree: str, **extra: str) -> dict:
    """The environment of a measured process of `tree`: first on PYTHONPATH, with bytecode as a pip install leaves
    it (gpu.with_bytecode), the command's own modules compiled ahead, as pip compiles them at install."""
    from gpu import with_bytecode

    env = with_bytecode({**os.environ, "PYTHONPATH": _path(tree), **extra}, BYTECODE)
    if tree not in _COMPILED:
        _COMPILED.add(tree)
        subprocess.run([sys.executable, "-P", "-c", "import PIL.Image, httpx, qwen2vl_cli.cli, qwen2vl_cli.client; "
                                                   "PIL.Image.init()"], env=env, check=True, capture_output=True)
    return env


def _path(tree: str) -> str:
    """PYTHONPATH with `tree` first (the carried wheels stay on it)."""
    return os.pathsep.join([tree, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


def _python(profile: str | None) -> list[str]:
    """The command line that runs `python -m qwen2vl_cli` of the tree on PYTHONPATH (-P: not of the current
    directory's), sampled into `profile` if given."""
    if profile:
        return [sys.executable, "-P", str(ROOT / "benchmarks" / "sampler.py"), profile, "-m", "qwen2vl_cli"]
    return [sys.executable, "-P", "-m", "qwen2vl_cli"]


def one_liners(tree: str, checkpoint: str, photo: str, profile: str | None) -> dict:
    """Wall seconds of `qwen2vl describe` with no session running, then of the next one (a tree with
    self-starting sessions answers it through the session the first started); the session is stopped after."""
    env = _env(tree, QWEN2VL_STATE_DIR=tempfile.mkdtemp(prefix="qwen2vl-state-"))
    walls = []
    for n in range(2):
        start = time.perf_counter()
        done = subprocess.run([*_python(n and profile and os.path.join(profile, "one_liner.json")), "describe", photo, "--model", checkpoint, "-n",
                               "128", "--max-pixels", str(MAX_PIXELS)], env=env, capture_output=True, timeout=600)
        walls.append(round(time.perf_counter() - start, 2) if done.returncode == 0 else -1.0)
    subprocess.run([sys.executable, "-P", "-m", "qwen2vl_cli", "stop"], env=env, capture_output=True, timeout=120)
    return {"one_liner_wall_s": walls[0], "next_one_liner_wall_s": walls[1]}


def xargs_and_batch(tree: str, checkpoint: str, photos: list[str], parallel: int = 8) -> dict:
    """Issue 15's pipeline measure: one `qwen2vl describe` per photo, `parallel` at a time (`xargs -P`), with no
    session running at the start (the first starts one, the others wait for it and answer through it), beside
    one `qwen2vl batch` over the same photos, each timed from its command to its last answer; and `batch` through the
    session the one-liners left (what it finds running), with 4 requests in flight (`--concurrency 4`, its
    default before) and with its default (more)."""
    env = _env(tree, QWEN2VL_STATE_DIR=tempfile.mkdtemp(prefix="qwen2vl-state-"))
    options = ["--model", checkpoint, "-n", str(NEW_TOKENS), "--max-pixels", str(MAX_PIXELS)]
    start = time.perf_counter()
    done = subprocess.run(["xargs", "-P", str(parallel), "-n", "1", *_python(None), "describe", "--json", *options],
                          input="\n".join(photos), env=env, capture_output=True, text=True, timeout=1800)
    xargs_s = time.perf_counter() - start
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    answers = len(records)
    # each one-liner's request as its client timed it (sent -> last token), to set against walls of ~8 x wall / 100
    request_s = [r["timings"]["total_s"] for r in records if r.get("timings", {}).get("total_s")]
    listed = subprocess.run([*_python(None), "ps", "--json"], env=env, capture_output=True, text=True, timeout=120)
    try:  # the session's phases (medians over the one-liners), to set against their walls
        session_ms = json.loads(listed.stdout)[0]["health"]["timings_ms"]
    except (ValueError, KeyError, IndexError, TypeError):
        session_ms = None
    listing = Path(tempfile.mkdtemp(prefix="qwen2vl-list-")) / "photos.txt"
    listing.write_text("\n".join(photos) + "\n")
    through: dict = {}
    for name, extra in (("concurrency_4", ["--concurrency", "4"]), ("default", [])):
        start = time.perf_counter()
        done = subprocess.run([*_python(None), "batch", "-", *options, *extra], stdin=listing.open(), env=env,
                              capture_output=True, text=True, timeout=1800)
        through[name] = {"wall_s": round(time.perf_counter() - start, 2), "rc": done.returncode,
                         "records": done.stdout.count("\n")}
    subprocess.run([*_python(None), "stop"], env=env, capture_output=True, timeout=120)
    start = time.perf_counter()
    batch = subprocess.run([*_python(None), "batch", "-", *options, "--no-server"], stdin=listing.open(), env=env,
                           capture_output=True, text=True, timeout=1800)
    batch_s = time.perf_counter() - start
    return {"xargs_photos": len(photos), "xargs_parallel": parallel, "xargs_wall_s": round(xargs_s, 2),
            "xargs_rc": done.returncode, "xargs_answers": answers, "xargs_session_timings_ms": session_ms,
            "xargs_request_s_median": round(statistics.median(request_s), 3) if request_s else None,
            "batch_cli_wall_s": round(batch_s, 2),
            "batch_cli_rc": batch.returncode, "xargs_over_batch": round(xargs_s / batch_s, 2),
            "batch_through_session": through}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the tree before (a `git archive` of its commit)")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--only", choices=("before", "engine"), help="measure one side")
    parser.add_argument("--profile", metavar="DIR", help="sample the engine side's threads into DIR")
    parser.add_argument("--side", nargs=3, metavar=("TREE", "CHECKPOINT", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        tree, checkpoint, out = args.side
        side(tree, checkpoint, json.loads(Path(out).read_text()), out)
        return
    sys.path.insert(0, str(ROOT))
    import torch
    import transformers

    from benchmarks.gpu import make_photos
    from tests.checkpoint import build_checkpoint

    work = Path(tempfile.mkdtemp(prefix="qwen2vl-engine-"))
    checkpoint = str(build_checkpoint(work / "ckpt", "2b", std=0.02, dtype="bfloat16", device="cuda"))
    torch.cuda.empty_cache()
    photos = [str(p) for p in make_photos(work / "photos", args.images)]
    report: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"),
                    "model": "Qwen2-VL-2B (random weights, real shapes), bf16, sdpa", "images": args.images,
                    "image_tokens": 1230}
    for name, tree in (("before", str(Path(args.baseline).resolve())), ("engine", str(ROOT))):
        if args.only and name != args.only:
            continue
        profile = args.profile if name == "engine" else None
        if profile:
            os.makedirs(profile, exist_ok=True)
        out = work / f"{name}.json"
        out.write_text(json.dumps(photos))
        started = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--baseline", tree, "--side", tree, checkpoint, str(out)],
                              env=_env(tree, **({"QWEN2VL_BENCH_PROFILE": profile} if profile else {})),
                              capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name}: failed")
        measures = json.loads(out.read_text())
        measures.update(serve_and_clients(tree, checkpoint, photos[:64], profile))
        measures.update(one_liners(tree, checkpoint, photos[0], profile))
        if name == "engine":
            measures.update(xargs_and_batch(tree, checkpoint, photos[:100]))
        measures["side_s"] = round(time.perf_counter() - started, 1)
        report[name] = measures
        print(name, json.dumps(measures), flush=True)
    before, engine = report.get("before", {}), report.get("engine", {})
    report["ratios"] = {key: round(engine[key] / before[key], 2) for key in
                        ("batch_128_images_per_s", "realistic_images_per_s", "server_images_per_s")
                        if before.get(key) and engine.get(key)}
    print(json.dumps(report, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
