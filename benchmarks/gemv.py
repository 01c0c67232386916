"""The one-row product of a decode step (`_triton.linear_row`) against F.linear (cuBLAS) on the 2B's projections,
bf16: its tile swept (BLOCK_N, BLOCK_K, warps; what `_triton.LINEAR_ROW` holds came from this), or, with `--rows`,
the product of 2-16 rows (`_triton.linear_rows`: the rows padded to one tensor-core tile; xargs, a few server
clients) against cuBLAS, its tile swept (`_triton.LINEAR_ROWS`). Each product is timed in a CUDA graph over enough
weight copies that L2 cannot hold them (us a call). The first sweep (2026-12-07) also tried the one-row kernel's way
for several rows (float32 products summed along K): slower than cuBLAS past 2 rows, so not kept.

    python benchmarks/gemv.py [--rows] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu import PROJECTIONS_2B  # noqa: E402
from qwen2vl_cli.engine.fast import _triton  # noqa: E402


def timed(run, copies: list[tuple], reps: int = 20) -> float:
    """us per call of run(*copy), the calls over all copies captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for copy in copies:
            run(*copy)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for copy in copies:
            run(*copy)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / len(copies) * 1000


def weights(n: int, k: int) -> list[torch.Tensor]:
    count = max(4, min(64, -(-400 * 2**20 // (n * k * 2))))  # >= 400 MB of copies: far past L2
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(count)]


def error(value, exact) -> float:
    return round(((value.float() - exact).norm() / exact.norm()).item(), 6)


def one_row() -> dict:
    report = {}
    for name, (n, k, bias) in PROJECTIONS_2B.items():
        copies = [(torch.randn(1, k, device="cuda", dtype=torch.bfloat16), w,
                   torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None,
                   torch.empty(1, n, device="cuda", dtype=torch.bfloat16)) for w in weights(n, k)]
        x, w, b, out = copies[0]
        exact = F.linear(x.float(), w.float(), None if b is None else b.float())
        entry = {"cublas_us": round(timed(lambda x, w, b, o: F.linear(x, w, b), copies), 2), "tiles": []}
        for block_n, block_k, warps in itertools.product((1, 2, 4, 8, 16, 32), (128, 256, 512, 1024), (2, 4, 8)):
            if not 256 <= block_n * block_k <= 16384:
                continue

            def run(x, w, b, o):
                _triton._linear_row_kernel[(triton.cdiv(n, block_n),)](
                    x, w, b if b is not None else o, o, n, k, HAS_BIAS=b is not None, BLOCK_N=block_n, BLOCK_K=block_k,
                    EVEN_K=k % block_k == 0, num_warps=warps)
            run(x, w, b, out)
            entry["tiles"].append([block_n, block_k, warps, round(timed(run, copies), 2), error(out, exact)])
        entry["best"] = min(entry["tiles"], key=lambda tile: tile[3])
        print(name, "cuBLAS", entry["cublas_us"], "us; best tile", entry["best"], flush=True)
        report[name] = entry
    return report


def rows() -> dict:
    report = {}
    for name, (n, k, _) in PROJECTIONS_2B.items():
        stack = weights(n, k)
        for m in (2, 4, 8, 16):
            copies = [(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), w,
                       torch.empty(m, n, device="cuda", dtype=torch.bfloat16)) for w in stack]
            x, w, out = copies[0]
            exact = F.linear(x.float(), w.float())
            entry = {"cublas_us": round(timed(lambda x, w, o: F.linear(x, w), copies), 2),
                     "cublas_error": error(F.linear(x, w), exact), "tiles": []}
            for block_n, block_k, warps, stages in itertools.product((16, 32, 64), (128, 256), (4,), (3, 5)):
                def run(x, w, o):
                    _triton._linear_rows_kernel[(triton.cdiv(n, block_n),)](
                        x, w, o, o, m, n, k, HAS_BIAS=False, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps,
                        num_stages=stages)
                run(x, w, out)
                entry["tiles"].append([block_n, block_k, warps, stages, round(timed(run, copies), 2),
                                       error(out, exact)])
            entry["best"] = min(entry["tiles"], key=lambda tile: tile[4])
            print(name, m, "rows: cuBLAS", entry["cublas_us"], "us; best tile", entry["best"], flush=True)
            report[f"{name} rows={m}"] = entry
        del stack
        torch.cuda.empty_cache()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", action="store_true",
                        help="the 2-16 row product against cuBLAS (not the one-row sweep)")
    parser.add_argument("--json-out")
    args = parser.parse_args()
    torch.manual_seed(0)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    report.update({"rows": rows()} if args.rows else {"one_row": one_row()})
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
