"""Where a decode step's GPU time goes (issue 15: a later one-liner is ~128 steps of one row): the step replayed from
its CUDA graph at 1, 2, 8, 16, 64 and 128 rows (CUDA events), the bytes it must read at least (weights, and each
row's K/V) and the rate that gives against the GPU's memory bandwidth; then the step's kernels one by one under
torch.profiler (the step run eagerly: the same kernels, each timed), summed by kernel name.

    python benchmarks/step.py [--checkpoint DIR] [--json-out FILE]
    QWEN2VL_FASTPATH=on python benchmarks/step.py --checkpoint TINY --device cpu     # the script itself, on the CPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

POSITIONS = 1360  # a 1230-token photo's prompt and half its 128-token answer
ROWS = (1, 2, 8, 16, 64, 128)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.gpu import checkpoint_at
    from qwen2vl_cli.engine.fast.decoder import Rows
    from qwen2vl_cli.engine.session import ModelSession
    from qwen2vl_cli.types import ModelSpec

    checkpoint = checkpoint_at(args.checkpoint, Path(tempfile.gettempdir()) / "qwen2vl-step")
    cuda = args.device == "cuda"
    session = ModelSession(ModelSpec(model=checkpoint, device=args.device, dtype="bfloat16" if cuda else "float32",
                                     attn="sdpa")).load()
    fast = session.fast
    language = fast.model.model.language_model
    weights = sum(p.numel() * p.element_size() for p in language.parameters())
    weights += fast.model.lm_head.weight.numel() * fast.model.lm_head.weight.element_size()
    weights -= language.embed_tokens.weight.numel() * language.embed_tokens.weight.element_size()  # one row read
    report: dict = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
                    "positions": POSITIONS, "weights_read_mb": round(weights / 2**20, 1), "rows": {}}
    host = torch.empty(max(ROWS), dtype=torch.long, pin_memory=cuda)
    with torch.inference_mode():
        for count in ROWS:
            rows = Rows(fast, count, 2048, session.eos_ids, session.pad_id)
            rows.count = count
            rows.slot[:count] = POSITIONS
            rows.positions[:count] = POSITIONS
            rows.finished[:count] = False
            rows.mask[:count, ..., :POSITIONS] = 0.0
            for _ in range(3):
                rows.step(host)  # the graph captured, then warm
            step_ms = timed(lambda: rows.step(host), 100, cuda)
            cache = count * POSITIONS * fast.kv_bytes_per_token
            entry = {"graph_step_ms": round(step_ms, 3), "kv_read_mb": round(cache / 2**20, 1),
                     "read_gb_per_s": round((weights + cache) / step_ms / 1e6, 1)}
            with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    rows._advance(rows.bucket())
                if cuda:
                    torch.cuda.synchronize()
            kernels: dict[str, list] = {}
            for event in prof.events():
                if event.device_type.name == ("CUDA" if cuda else "CPU") and (cuda or event.name.startswith("aten::")):
                    name = event.name[:90]
                    kernels.setdefault(name, [0, 0.0])
                    kernels[name][0] += 1
                    kernels[name][1] += (event.device_time if cuda else event.self_cpu_time_total) / 1000  # us -> ms
            total = sum(ms for _, ms in kernels.values()) / 10
            entry["eager_kernels_ms_per_step"] = round(total, 3)
            entry["kernels"] = [{"name": name, "per_step": calls // 10, "ms_per_step": round(ms / 10, 4)}
                                for name, (calls, ms) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]]
            report["rows"][count] = entry
            del rows
    text = json.dumps(report, indent=1)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text)


def timed(run, times: int, cuda: bool) -> float:
    """ms per call of `run`: GPU time on a GPU (engine.gpu_ms), wall time on the CPU."""
    import time

    from benchmarks.engine import gpu_ms

    if cuda:
        return gpu_ms(run, times)
    start = time.perf_counter()
    for _ in range(times):
        run()
    return (time.perf_counter() - start) * 1000 / times


if __name__ == "__main__":
    main()
