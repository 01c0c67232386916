"""Later one-liners of two trees side by side (issue 15's "every later one-liner <= 0.5 s" and "100 one-liners 8 at a
time"), on benchmarks/engine.py's random-weight 2B and 1280x960 photos. In blocks A, B, A, B (a machine's drift falls
on both): a tree's first one-liner starts its session, `--runs` more answer through it one after another (each timed
from its command to its exit), then 100 one-liners 8 at a time (`xargs -P 8`) through the same session; the session
is stopped. One `qwen2vl batch` over the same photos (the second tree's, in process) is the xargs bound.

    python benchmarks/later.py --trees BEFORE AFTER [--runs 8] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import MAX_PIXELS, NEW_TOKENS, _env, _python  # noqa: E402


def block(tree: str, checkpoint: str, photos: list[str], runs: int) -> dict:
    env = _env(tree, QWEN2VL_STATE_DIR=tempfile.mkdtemp(prefix="qwen2vl-state-"))
    options = ["--model", checkpoint, "-n", str(NEW_TOKENS), "--max-pixels", str(MAX_PIXELS)]
    walls = []
    for n in range(runs + 1):
        start = time.perf_counter()
        done = subprocess.run([*_python(None), "describe", photos[n % len(photos)], *options], env=env,
                              capture_output=True, timeout=600)
        walls.append(time.perf_counter() - start if done.returncode == 0 else float("nan"))
    start = time.perf_counter()
    done = subprocess.run(["xargs", "-P", "8", "-n", "1", *_python(None), "describe", "--json", *options],
                          input="\n".join(photos), env=env, capture_output=True, text=True, timeout=1800)
    xargs_s = time.perf_counter() - start
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    listed = subprocess.run([*_python(None), "ps", "--json"], env=env, capture_output=True, text=True, timeout=120)
    try:
        session_ms = json.loads(listed.stdout)[0]["health"]["timings_ms"]
    except (ValueError, KeyError, IndexError, TypeError):
        session_ms = None
    subprocess.run([*_python(None), "stop"], env=env, capture_output=True, timeout=120)
    request_s = [r["timings"]["total_s"] for r in records if r.get("timings", {}).get("total_s")]
    return {"first_s": round(walls[0], 2), "later_s": [round(w, 3) for w in walls[1:]],
            "later_median_s": round(statistics.median(walls[1:]), 3), "xargs_s": round(xargs_s, 2),
            "xargs_answers": len(records), "xargs_request_median_s": round(statistics.median(request_s), 3)
            if request_s else None, "session_timings_ms": session_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs=2, required=True, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--json-out")
    args = parser.parse_args()
    import torch

    from gpu import make_photos
    from tests.checkpoint import build_checkpoint

    work = Path(tempfile.mkdtemp(prefix="qwen2vl-later-"))
    checkpoint = str(build_checkpoint(work / "ckpt", "2b", std=0.02, dtype="bfloat16", device="cuda"))
    torch.cuda.empty_cache()
    photos = [str(p) for p in make_photos(work / "photos", 100)]
    trees = [str(Path(t).resolve()) for t in args.trees]
    report: dict = {"gpu": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M"),
                    "trees": trees, "blocks": []}
    for tree in (*trees, *trees):
        report["blocks"].append({"tree": tree, **block(tree, checkpoint, photos, args.runs)})
        print(json.dumps(report["blocks"][-1]), flush=True)
    listing = work / "photos.txt"
    listing.write_text("\n".join(photos) + "\n")
    start = time.perf_counter()
    subprocess.run([*_python(None), "batch", "-", "--model", checkpoint, "-n", str(NEW_TOKENS), "--max-pixels",
                    str(MAX_PIXELS), "--no-server"], stdin=listing.open(), env=_env(trees[1]), capture_output=True,
                   timeout=1800)
    report["batch_s"] = round(time.perf_counter() - start, 2)
    for tree in trees:
        mine = [b for b in report["blocks"] if b["tree"] == tree]
        report[tree] = {"later_median_s": round(statistics.median(s for b in mine for s in b["later_s"]), 3),
                        "xargs_s": [b["xargs_s"] for b in mine],
                        "xargs_over_batch": [round(b["xargs_s"] / report["batch_s"], 2) for b in mine]}
    print(json.dumps({k: v for k, v in report.items() if k != "blocks"}, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
