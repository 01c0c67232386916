"""Cold start (issue 15): where a one-liner's seconds go when no session is running, on a random-weight 2B
(real shapes, bf16) and one 1280x960 photo (1230 tokens), 128 new tokens.

  - a first in-process one-liner (in_process_warmup): it writes the bytecode a pip install would have left (see
    below), fills Triton's and the OS's caches and runs the fast path's check (later loads remember it passed);
  - `qwen2vl --help`: wall seconds (must not import torch);
  - imports: `python -X importtime` of an in-process one-liner, the heaviest top-level packages (cumulative);
  - in-process (`--no-server --verbose`), twice: wall seconds and the load's phases as `--verbose` reports them
    (on "a warm disk");
  - in-process, its answer: --json's first_token_s and total_s (a first answer pays for first calls into CUDA,
    cuBLAS and Triton that a load's warm-up does beside its imports);
  - self-starting: the first one-liner (starts a session), the next five (answer through it): wall seconds,
    and the session's load phases and timings from its /health.

  - with --profile DIR: cProfile of one more in-process one-liner (DIR/in_process.prof) and of the client of one
    more self-starting one-liner (DIR/client.prof), for `python -m pstats`.

  - with --baseline DIR: all of it for the tree before (a `git archive` of its commit) first, in the same run;
    then the first one-liner of each tree in turn, --rounds times (the measure that moves most between runs).

    python benchmarks/cold.py --out RESULT.json [--checkpoint DIR] [--profile DIR] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WATCHED = ("torch", "transformers", "torchvision", "torch._dynamo", "triton", "qwen_vl_utils", "fastapi", "uvicorn",
           "PIL", "numpy", "rich", "typer", "httpx", "safetensors", "tokenizers", "torchao", "gptqmodel", "sympy")


def qwen2vl(*args: str, env: dict, prefix: tuple[str, ...] = ()) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-P", *prefix, "-m", "qwen2vl_cli", *args], env=env, capture_output=True,
                          text=True, timeout=600)
    return round(time.perf_counter() - start, 2), done


def import_times(stderr: str) -> dict:
    """`-X importtime` lines -> cumulative seconds of the watched packages (first import of each)."""
    found = {}
    for line in stderr.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if match and match.group(3) in WATCHED and match.group(3) not in found:
            found[match.group(3)] = round(int(match.group(1)) / 1e6, 2)
    return dict(sorted(found.items(), key=lambda item: -item[1]))


def phases(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "loaded in" in line]
    return lines[-1][lines[-1].index("loaded in"):] if lines else (stderr.strip().splitlines() or ["no output"])[-1]


def series(tree: str, env: dict, ask: list[str], state: Path, profile: str | None) -> dict:
    """Every measure of the docstring for the qwen2vl_cli in `tree`, its sessions recorded in `state`."""
    env = {**env, "PYTHONPATH": os.pathsep.join([tree, env.get("PYTHONPATH", "")]), "QWEN2VL_STATE_DIR": str(state)}
    report: dict = {"tree": tree}
    wall, done = qwen2vl(*ask, "--no-server", "--verbose", env=env)  # bytecode, Triton's, the OS's, the check's
    report["in_process_warmup"] = {"wall_s": wall if done.returncode == 0 else -1.0, "load": phases(done.stderr)}
    report["help_wall_s"], _ = qwen2vl("describe", "--help", env=env)
    _, done = qwen2vl(*ask, "--no-server", env=env, prefix=("-X", "importtime"))
    report["imports_s"] = import_times(done.stderr)
    for name in ("in_process_first", "in_process_second"):
        wall, done = qwen2vl(*ask, "--no-server", "--verbose", "--json", env=env)
        report[name] = {"wall_s": wall if done.returncode == 0 else -1.0, "load": phases(done.stderr),
                        "answer": _timings(done.stdout)}
        print(name, report[name], flush=True)
    if profile:
        Path(profile).mkdir(parents=True, exist_ok=True)
        qwen2vl(*ask, "--no-server", env=env, prefix=("-m", "cProfile", "-o", f"{profile}/in_process.prof"))
    walls = []
    for _ in range(6):
        wall, done = qwen2vl(*ask, env=env)
        walls.append(wall if done.returncode == 0 else -1.0)
    report["self_starting"] = {"first_wall_s": walls[0], "next_wall_s": walls[1:]}
    if profile:
        qwen2vl(*ask, env=env, prefix=("-m", "cProfile", "-o", f"{profile}/client.prof"))
    _, done = qwen2vl("ps", "--json", env=env)
    try:
        report["self_starting"]["session"] = json.loads(done.stdout)
    except json.JSONDecodeError:
        report["self_starting"]["session"] = done.stdout.strip() or done.stderr.strip()
    qwen2vl("stop", env=env)
    return report


def firsts(trees: list[str], env: dict, ask: list[str], state: Path, rounds: int) -> dict:
    """The first one-liner (it starts the session) of each tree in turn, `rounds` times: wall seconds and the
    session's load phases, each session stopped before the next one-liner."""
    found: dict = {tree: [] for tree in trees}
    for _ in range(rounds):
        for tree in trees:
            tree_env = {**env, "PYTHONPATH": os.pathsep.join([tree, env.get("PYTHONPATH", "")]),
                        "QWEN2VL_STATE_DIR": str(state)}
            wall, done = qwen2vl(*ask, env=tree_env)
            _, listed = qwen2vl("ps", "--json", env=tree_env)
            try:
                phases_s = json.loads(listed.stdout)[0]["health"]["load_phases_s"]
            except (ValueError, KeyError, IndexError, TypeError):
                phases_s = None
            found[tree].append({"wall_s": wall if done.returncode == 0 else -1.0, "load_phases_s": phases_s})
            qwen2vl("stop", env=tree_env)
            print("first", tree, found[tree][-1], flush=True)
    return found


def _timings(stdout: str) -> dict | None:
    """--json's timings (load_s, first_token_s, total_s) of an answer."""
    try:
        return json.loads(stdout)["timings"]
    except (ValueError, KeyError, TypeError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint", help="the 2B checkpoint's folder (built there if it holds none)")
    parser.add_argument("--profile", help="a folder for cProfile files of an in-process and a client one-liner")
    parser.add_argument("--baseline", help="the tree before (a `git archive` of its commit): measured first, "
                                           "in the same run, and first one-liners of both in turn")
    parser.add_argument("--rounds", type=int, default=3, help="first one-liners of each tree, with --baseline")
    args = parser.parse_args()
    import torch
    import transformers

    from benchmarks.gpu import checkpoint_at, make_photos, with_bytecode

    work = Path(tempfile.mkdtemp(prefix="qwen2vl-cold-"))
    checkpoint = checkpoint_at(args.checkpoint, work)
    photo = str(make_photos(work / "photos", 1)[0])
    gpu = torch.cuda.get_device_name(0)
    del torch
    env = with_bytecode(os.environ, os.environ.get("PYTHONPYCACHEPREFIX") or work / "bytecode")
    ask = ["describe", photo, "--model", checkpoint, "-n", "128", "--max-pixels", str(1280 * 28 * 28)]
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": gpu,
                    "transformers": transformers.__version__, "new_tokens": 128, "image_tokens": 1230,
                    "pycache_prefix": env["PYTHONPYCACHEPREFIX"]}
    if args.baseline:
        report["baseline"] = series(str(Path(args.baseline).resolve()), env, ask, work / "state-before", None)
    report.update(series(str(ROOT), env, ask, work / "state", args.profile))
    if args.baseline:
        report["first_one_liners_interleaved"] = firsts([str(Path(args.baseline).resolve()), str(ROOT)], env, ask,
                                                        work / "state-firsts", args.rounds)
    print(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
