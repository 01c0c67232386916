"""Host-side settings measured side by side in one run (issue 15), on a random-weight 2B (bf16) and 1280x960
photos (1230 tokens), 128 new tokens:

  - the server under 16 clients (8 streamed, 8 not; benchmarks/engine.py's measure) with Python's GIL switch
    interval and the decode steps queued ahead varied: images/s and streamed time to first token. At 16 rows a
    decode step is ~2 ms of GPU time, less than the 5 ms a thread may hold the GIL by default;
  - an in-process one-liner (wall seconds, load phases) as shipped and with the GPU's context started on a helper
    thread at the process's start (alternated).

Each variant runs the tree's own code; the variants change only module settings before it starts.

    python benchmarks/host.py --out RESULT.json [--checkpoint DIR]
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

SERVER_VARIANTS = {  # name -> statements run before qwen2vl_cli's main in the server's process
    "as_shipped": "",
    "switch_interval_1ms": "import sys; sys.setswitchinterval(0.001)",
    "ahead_4": "import qwen2vl_cli.engine.fast.decoder as d; d.AHEAD = 4",
    "switch_1ms_ahead_4": "import sys; sys.setswitchinterval(0.001); import qwen2vl_cli.engine.fast.decoder as d; d.AHEAD = 4",
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
    args = parser.parse_args()
    import subprocess

    import torch

    from cold import phases
    from engine import MAX_PIXELS, serve_and_clients
    from gpu import make_photos

    work = Path(tempfile.mkdtemp(prefix="qwen2vl-host-"))
    checkpoint = args.checkpoint
    if not checkpoint:
        from tests.checkpoint import build_checkpoint

        checkpoint = str(build_checkpoint(work / "ckpt", "2b", std=0.02, dtype="bfloat16", device="cuda"))
        torch.cuda.empty_cache()
    photos = [str(p) for p in make_photos(work / "photos", 64)]
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(0),
                    "server": {}, "load": {}}
    for index, (name, setup) in enumerate(SERVER_VARIANTS.items()):
        report["server"][name] = serve_and_clients(str(ROOT), checkpoint, photos, None, python=runner(setup),
                                                   port=8710 + index)
        print(name, json.dumps(report["server"][name]), flush=True)

    env = {**os.environ, "QWEN2VL_STATE_DIR": str(work / "state"), "PYTHONPYCACHEPREFIX": str(work / "bytecode")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
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
