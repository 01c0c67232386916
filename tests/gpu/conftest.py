"""The GPU acceptance suite: every path of the README and the seeds on CUDA, on a full-size random-weight
checkpoint (2B; QWEN2VL_GPU_SIZE=7b for the 7B). Skipped where CUDA is absent, so the CPU suite stays green.

    python -m pytest tests/gpu        # README, Development, says which packages it needs beyond the install

QWEN2VL_GPU_CHECKPOINT=DIR keeps the checkpoint between runs (built there once); QWEN2VL_GPU_RESULT=FILE
writes the run's result (date, GPU, driver, versions, each test's outcome and what it measured) as JSON.
QWEN2VL_GPU_DRY=1 runs it on the CPU with the tiny checkpoint: a check of the suite itself, not of the GPU.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import pytest

from ..conftest import Run, noise_image

DRY = os.environ.get("QWEN2VL_GPU_DRY") == "1"
SIZE = "tiny" if DRY else os.environ.get("QWEN2VL_GPU_SIZE", "2b")
DEVICE = "cpu" if DRY else "cuda"
_RESULTS: dict = {"tests": {}, "measured": {}}


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _cuda() or DRY:
        return
    skip = pytest.mark.skip(reason="the GPU suite needs CUDA")
    for item in items:
        if "tests/gpu/" in item.nodeid.replace(os.sep, "/"):
            item.add_marker(skip)


def pytest_collectreport(report):
    """A module skipped as a whole (test_quant.py without gptqmodel) is in the result too, not left out of it."""
    if report.skipped and "tests/gpu/" in report.nodeid.replace(os.sep, "/"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _RESULTS["tests"][report.nodeid.split("tests/gpu/")[-1]] = {"outcome": "skipped", "s": 0.0,
                                                                   "reason": str(reason)[:300]}


def pytest_runtest_logreport(report):
    if "tests/gpu/" not in report.nodeid.replace(os.sep, "/"):
        return
    entry = _RESULTS["tests"].setdefault(report.nodeid.split("tests/gpu/")[-1], {"outcome": "passed", "s": 0.0})
    entry["s"] = round(entry["s"] + report.duration, 2)
    if report.failed:
        entry["outcome"] = "failed"
        entry["error"] = str(report.longrepr).strip().splitlines()[-1][:500]
    elif report.skipped:  # at setup (a fixture) or in the test's body (pytest.skip): not a pass
        entry["outcome"] = "skipped"


def pytest_sessionfinish(session, exitstatus):
    target = os.environ.get("QWEN2VL_GPU_RESULT")
    if not target or not _RESULTS["tests"]:
        return
    import torch
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() if _cuda() else "none (dry run on the CPU)"
    outcomes = [t["outcome"] for t in _RESULTS["tests"].values()]
    summary = {o: outcomes.count(o) for o in ("passed", "failed", "skipped")}
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "gpu_and_driver": smi, "python": platform.python_version(), "torch": torch.__version__,
              "transformers": transformers.__version__, "triton": triton_version, "checkpoint": SIZE,
              "summary": summary, **_RESULTS}
    Path(target).write_text(json.dumps(result, indent=1) + "\n")


@pytest.fixture(scope="session", autouse=True)
def _fast_path_on_the_cpu_too():
    """A dry run takes the fast path on the CPU as CUDA would (QWEN2VL_FASTPATH defaults to on there)."""
    if DRY:
        os.environ["QWEN2VL_FASTPATH"] = "on"
    yield
    os.environ.pop("QWEN2VL_FASTPATH", None)


@pytest.fixture
def measured(request):
    """record(key, value): what a test measured, kept in the result file under its name."""
    def record(key: str, value) -> None:
        _RESULTS["measured"].setdefault(request.node.name, {})[key] = value
    return record


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A full-size random-weight Qwen2-VL (the real configuration), built on the GPU once."""
    from tests.checkpoint import build_checkpoint

    folder = Path(os.environ.get("QWEN2VL_GPU_CHECKPOINT") or tmp_path_factory.mktemp("gpu-checkpoint")) / SIZE
    marker = folder / "qwen2vl_random_checkpoint.json"
    if marker.exists() and json.loads(marker.read_text())["size"] == SIZE:
        return folder
    # std 0.02 (the benchmark's): full-size answers then differ per input, which the tests check
    if DRY:
        return build_checkpoint(folder, SIZE)
    return build_checkpoint(folder, SIZE, std=0.02, dtype="bfloat16", device="cuda")


@pytest.fixture(scope="session")
def media(tmp_path_factory) -> dict[str, Path]:
    """Images from 20x20 to 4032x3024, a corrupt one, frames, a short clip and a 20-minute video."""
    from ..test_video import make_video

    folder = tmp_path_factory.mktemp("gpu-media")
    paths: dict[str, Path] = {}
    # small ones keep the random model's answers varied (with hundreds of image tokens it repeats one token)
    for name, (width, height, seed) in {"photo": (448, 336, 1), "tall": (280, 420, 2), "tiny": (20, 20, 3),
                                        "wide": (1280, 960, 4), "huge": (4032, 3024, 5),
                                        "small": (112, 84, 6), "small_tall": (84, 112, 7)}.items():
        paths[name] = folder / f"{name}.jpg"
        image = noise_image(width // 8 or 1, height // 8 or 1, seed).resize((width, height))  # photo-like
        image.save(paths[name], quality=90)
    paths["corrupt"] = folder / "corrupt.jpg"
    paths["corrupt"].write_bytes(paths["photo"].read_bytes()[:200])
    frames = folder / "frames"
    frames.mkdir()
    for i in range(1, 9):
        noise_image(28, 21, 100 + i).resize((224, 168)).save(frames / f"frame{i}.png")
    paths["frames"] = frames
    small_frames = folder / "small-frames"
    small_frames.mkdir()
    for i in range(1, 5):
        noise_image(112, 84, 200 + i).save(small_frames / f"frame{i}.png")
    paths["small_frames"] = small_frames
    paths["clip"] = make_video(folder / "clip.mp4", frames=40, fps=10, width=320, height=240)
    paths["long"] = make_video(folder / "long.mp4", frames=1200, fps=1, width=640, height=480, noise=False)
    return paths


@pytest.fixture(scope="session")
def gpu_cli(checkpoint):
    """`qwen2vl ARGS` in-process on the GPU checkpoint (each model setting loads once per test session)."""
    from typer.testing import CliRunner

    from qwen2vl_cli.cli import app

    def run(*args, input: bytes | str | None = None, env: dict | None = None) -> Run:
        argv = [str(a) for a in args]
        if argv and argv[0] in ("describe", "ask", "video", "batch") and "--model" not in argv:
            argv += ["--model", str(checkpoint)]
        result = CliRunner().invoke(app, argv, input=input, env=env)
        return Run(result.exit_code, result.stdout, result.stderr)

    return run


def free_sessions() -> None:
    """Unload every in-process session (the next command loads its model again)."""
    import gc

    import torch

    from qwen2vl_cli.engine import session as session_module

    for session in session_module._SESSIONS.values():
        session.unload()
    session_module._SESSIONS.clear()
    gc.collect()
    torch.cuda.empty_cache()
