"""Issue 15's pipeline measure itself, for trees side by side: 100 `qwen2vl describe` one-liners 8 at a time
(`xargs -P 8`) from NO session running (the first starts one, the others wait for it and answer through it),
then one in-process `qwen2vl batch` over the same photos, each tree's in turn, `--rounds` times (A B A B: a machine's
drift falls on both); benchmarks/engine.py's random-weight 2B (bf16), 1280x960 photos, 128 new tokens. Each tree is
warmed first (bytecode, caches, the fast path's check) by one in-process one-liner.

    python benchmarks/xargs.py --trees BEFORE AFTER [--rounds 2] --json-out FILE
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import engine  # noqa: E402
from gpu import checkpoint_at, make_photos  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs="+", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json-out", required=True)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qwen2vl-xargs-"))
    checkpoint = checkpoint_at(None, work)
    photos = [str(p) for p in make_photos(work / "photos", 100)]
    trees = [str(Path(tree).resolve()) for tree in args.trees]
    for tree in trees:
        subprocess.run([*engine._python(None), "describe", photos[0], "--model", checkpoint, "-n", "8", "--no-server"],
                       env=engine._env(tree), capture_output=True, timeout=600)
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    report: dict = {"gpu": gpu.stdout.strip(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": []}
    for _ in range(args.rounds):
        for tree in trees:
            measured = {**engine.xargs_and_batch(tree, checkpoint, photos), "tree": tree}
            print(json.dumps(measured), flush=True)
            report["runs"].append(measured)
    Path(args.json_out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
