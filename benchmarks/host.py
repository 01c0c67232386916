"""Host-side settings measured side by side in one run (issue 15), on a random-weight 2B (bf16) and 1280x960
photos (1230 tokens), 128 new tokens:

  - the server under 16 clients (8 streamed, 8 not; benchmarks/engine.py's measure), the clients as threads of
    the benchmark's process (as engine.py runs them) and as processes of their own, with Python's GIL switch
    interval at 1 ms, with uvicorn on httptools and uvloop (--fast-site), and (with --baseline DIR) the tree
    before beside this one: images/s, streamed time to first token, CPU seconds per second of the server and
    the clients (`/health`'s phases with them);
  - an in-process one-liner (wall seconds, load phases) as shipped and with the GPU's context started on a helper
    thread at the process's start (alternated; --skip-load leaves it out).

On 2026-12-03 (H200) a 1 ms switch interval and 4 decode steps queued ahead, each alone and together, changed
nothing beyond noise (14.0-14.7 images/s, threads as clients); nor did the helper-thread context (one-liner
walls 7.99 / 10.35 s against 7.26 / 10.05).

    python benchmarks/host.py --out RESULT.json [--checkpoint DIR] [--baseline DIR] [--skip-load] [--fast-site DIR]
                              [--variants NAME,...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SERVER_VARIANTS = {  # name -> (the tree: "before" or "this", statements run before qwen2vl_cli's main in the
    # server's process, clients as processes)
    "before_threads": ("before", "", False),
    "before_processes": ("before", "", True),
    "threads": ("this", "", False),
    "processes": ("this", "", True),  # each client its own process: the benchmark's 16 threads share one GIL
    "processes_switch_1ms": ("this", "import sys; sys.setswitchinterval(0.001)", True),
    "processes_fast_http": ("this", "import os, sys; sys.path.insert(0, os.environ['FAST_SITE'])", True),  # uvicorn
    # picks httptools (HTTP parsing in C) and uvloop when it can import them (uvicorn[standard]); --fast-site
}
LOAD_VARIANTS = {  # the GPU's context made when the load's first tensor needs it, or on a helper thread from the
    # start (the driver's work releases the GIL, so it could overlap the imports)
    "as_shipped": "",
    "context_on_helper_thread": "import threading, torch\n"
                                "threading.Thread(target=lambda: torch.empty(1, device='cuda'), daemon=True).start()",
}


def runner(setup: str) -> list[str]:
    """A command line that runs `python -m qwen2vl_cli` after `setup`."""
    code = f"{setup}\nimport runpy\nrunpy.run_module('qwen2vl_cli', run_name='__main__', alter_sys=True)"
    return [sys.executable, "-P", "-c", code]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint", help="a 2B checkpoint (built when not given)")
    parser.add_argument("--baseline", help="the tree before (a `git archive` of its commit): its server beside")
    parser.add_argument("--skip-load", action="store_true", help="no one-liner load variants")
    parser.add_argument("--fast-site", help="a folder with httptools and uvloop installed: the fast_http variant")
    parser.add_argument("--variants", help="comma-separated server variants to run (default: all that can)")
    args = parser.parse_args()
    import subprocess

    import torch

    from cold import phases
    from engine import MAX_PIXELS, serve_and_clients
    from gpu import checkpoint_at, make_photos, with_bytecode

    work = Path(tempfile.mkdtemp(prefix="qwen2vl-host-"))
    checkpoint = checkpoint_at(args.checkpoint, work)
    torch.cuda.empty_cache()
    photos = [str(p) for p in make_photos(work / "photos", 64)]
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(0),
                    "server": {}, "load": {}}
    trees = {"this": str(ROOT), "before": args.baseline and str(Path(args.baseline).resolve())}
    if args.fast_site:
        os.environ["FAST_SITE"] = str(Path(args.fast_site).resolve())
    for index, (name, (tree, setup, processes)) in enumerate(SERVER_VARIANTS.items()):
        if trees[tree] and (args.fast_site or "fast_http" not in name) and \
                (not args.variants or name in args.variants.split(",")):
            report["server"][name] = serve_and_clients(trees[tree], checkpoint, photos, None, python=runner(setup),
                                                       port=8710 + index, processes=processes)
            print(name, json.dumps(report["server"][name]), flush=True)
    if args.skip_load:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        return

    env = with_bytecode({**os.environ, "QWEN2VL_STATE_DIR": str(work / "state")}, work / "bytecode")
    command = ["describe", photos[0], "--model", checkpoint, "--no-server", "--verbose", "-n", "128",
               "--max-pixels", str(MAX_PIXELS)]
    subprocess.run(runner("") + command, env=env, capture_output=True, timeout=600)  # bytecode, caches, the check
    for _ in range(2):
        for name, setup in LOAD_VARIANTS.items():
            start = time.perf_counter()
            done = subprocess.run(runner(setup) + command, env=env, capture_output=True, text=True, timeout=600)
            report["load"].setdefault(name, []).append({"wall_s": round(time.perf_counter() - start, 2),
                                                        "load": phases(done.stderr), "rc": done.returncode})
    print(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
