"""One-liners in a pipeline (issue 15): where a `qwen2vl describe` through a running session spends its wall
seconds, one at a time and 8 at a time (as `xargs -P 8` runs them), on a random-weight 2B (real shapes, bf16),
1280x960 photos (1230 tokens) and 128 new tokens.

For each level: the processes' wall seconds (median), the request's own seconds inside them (--json's
first_token_s and total_s: from sending the request to the answer's end), so wall minus total is the client
process (Python, imports, finding the session, reading and encoding the photo, exit); one-liners per second;
and the session's /health phases afterwards. Every process gets bytecode as a pip install leaves it.

    python benchmarks/pipeline.py --out RESULT.json [--checkpoint DIR] [--count 48]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint", help="the 2B checkpoint's folder (built there if it holds none)")
    parser.add_argument("--count", type=int, default=48, help="one-liners at the 8-at-a-time level")
    args = parser.parse_args()
    import torch

    from benchmarks.gpu import MAX_PIXELS, NEW_TOKENS, checkpoint_at, make_photos
    from engine import _env, _python  # the measured processes' environment and command line, as engine.py's

    work = Path(tempfile.mkdtemp(prefix="qwen2vl-pipeline-"))
    checkpoint = checkpoint_at(args.checkpoint, work)
    photos = [str(p) for p in make_photos(work / "photos", args.count)]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": gpu,
                    "new_tokens": NEW_TOKENS, "image_tokens": 1230}
    del torch
    env = _env(str(ROOT), QWEN2VL_STATE_DIR=str(work / "state"))
    command = _python(None)
    options = ["--model", checkpoint, "-n", str(NEW_TOKENS), "--max-pixels", str(MAX_PIXELS)]

    def one_liner(photo: str) -> tuple[float, dict | None]:
        start = time.perf_counter()
        done = subprocess.run([*command, "describe", "--json", photo, *options], env=env, capture_output=True,
                              text=True, timeout=600)
        wall = time.perf_counter() - start
        try:
            return wall, json.loads(done.stdout)["timings"]
        except (ValueError, KeyError):
            return wall, None

    report["first_wall_s"] = round(one_liner(photos[0])[0], 2)  # starts the session
    report["next_walls_s"] = [round(one_liner(photo)[0], 2) for photo in photos[1:4]]
    for parallel, count in ((1, 8), (8, args.count)):
        start = time.perf_counter()
        with ThreadPoolExecutor(parallel) as pool:
            results = list(pool.map(one_liner, photos[:count]))
        elapsed = time.perf_counter() - start
        timed = [timings for _, timings in results if timings]
        walls = [wall for wall, _ in results]
        level = {"one_liners": count, "answered": len(timed), "per_s": round(count / elapsed, 2),
                 "wall_s_median": round(statistics.median(walls), 3),
                 "request_first_token_s_median": round(statistics.median(t["first_token_s"] for t in timed), 3),
                 "request_total_s_median": round(statistics.median(t["total_s"] for t in timed), 3)}
        level["client_s_median"] = round(level["wall_s_median"] - level["request_total_s_median"], 3)
        done = subprocess.run([*command, "ps", "--json"], env=env, capture_output=True, text=True)
        try:
            level["session_timings_ms"] = json.loads(done.stdout)[0]["health"]["timings_ms"]
        except (ValueError, KeyError, IndexError, TypeError):
            level["session_timings_ms"] = done.stderr.strip()
        report[f"parallel_{parallel}"] = level
        print(parallel, json.dumps(level), flush=True)
    for name, argv in (("help", ["describe", "--help"]), ("usage_error", ["describe", "--no-such-option"])):
        for _ in range(2):  # the second: the first may write bytecode (Typer's Rich help, for --help)
            start = time.perf_counter()
            subprocess.run([*command, *argv], env=env, capture_output=True)
        report[f"{name}_wall_s"] = round(time.perf_counter() - start, 3)
    subprocess.run([*command, "stop", "--all"], env=env, capture_output=True, timeout=120)
    print(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
