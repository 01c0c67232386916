"""Quantized formats on one GPU, side by side in one run: BF16, GPTQ-Int8, GPTQ-Int4 and AWQ (2B, batch 1),
each through the seed card's recipe (from_pretrained with torch_dtype="auto", device_map="auto", then
generate) and through qwen2vl's session; tokens/s over the whole answer (prefill included, as the card's
table) and peak GPU memory, at the given prompt lengths.

    python benchmarks/quant.py --out RESULT.json [--lengths 1,6144] [--new-tokens 256] [--recipe-tokens 256]
    python benchmarks/quant.py --out RESULT.json --kernels   # the decode step's projections alone

The checkpoints are random-weight (no weights can be downloaded here), built in the released layouts by
tests/checkpoint.py; the answers are forced to full length (an unused end-of-text id).
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

UNUSED_ID = 151935
IMAGE_TOKENS = 15360  # at most this many tokens an image (the model allows 16384): longer prompts take several
MAX_PIXELS = 16384 * 28 * 28


def photo(path: Path, tokens: int) -> Path:
    """An image of about `tokens` vision tokens (one per 28x28 pixels), at 3:2."""
    import math

    import numpy as np
    from PIL import Image

    rows = max(1, round(math.sqrt(tokens * 2 / 3)))
    cols = max(1, tokens // rows)
    pixels = np.random.default_rng(tokens).integers(0, 256, (rows * 28 // 4, cols * 28 // 4, 3), dtype=np.uint8)
    Image.fromarray(pixels).resize((cols * 28, rows * 28)).save(path)
    return path


def _peak_gb() -> float:
    """The answer's peak GPU memory (allocated: weights, cache, activations), the peak reset before each prompt:
    prompts run shortest first, so what an earlier one left allocated (qwen2vl's cache) is at most its own."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 1e9, 2)


def seed_recipe(folder: Path, prompts: dict, new_tokens: int) -> dict:
    """The card's recipe: load with torch_dtype="auto", device_map="auto"; process_vision_info; generate.
    One change for quantized checkpoints: the kernel qwen2vl picks (gptqmodel's Triton ones). Left to
    choose, gptqmodel takes Machete on an H100, which downloads CUTLASS and compiles it at load: offline,
    the recipe as written cannot load a GPTQ checkpoint at all."""
    import torch
    from qwen_vl_utils import process_vision_info
    from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration

    from qwen2vl_cli.engine.quant import load_kwargs

    kernel = load_kwargs(str(folder), AutoConfig.from_pretrained(folder), None, "cuda")
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder, torch_dtype="auto", device_map="auto", **kernel)
    processor = AutoProcessor.from_pretrained(folder)
    warm = processor(text=["Hi"], return_tensors="pt").to("cuda")
    model.generate(**warm, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # CUDA and kernel warm-up
    results = {}
    for length, images in prompts.items():
        content = [{"type": "image", "image": str(image), "max_pixels": MAX_PIXELS} for image in images]
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": "Describe this image."}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        vision, _ = process_vision_info(messages)
        inputs = processor(text=[text], images=vision, padding=True, return_tensors="pt").to("cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        results[length] = {"prompt_tokens": int(inputs["input_ids"].shape[1]),
                           "tokens_per_s": round(new_tokens / seconds, 2), "peak_gb": _peak_gb()}
        del inputs
    return {"lengths": results}


def qwen2vl(folder: Path, prompts: dict, new_tokens: int) -> dict:
    """qwen2vl's session: the fast path for float weights, transformers' generate for quantized ones."""
    import torch

    from qwen2vl_cli.types import ChatRequest, GenerationOptions, ModelSpec
    from qwen2vl_cli.engine.session import ModelSession
    from qwen2vl_cli.sources import ImageOptions, read_image

    session = ModelSession(ModelSpec(str(folder), device="cuda")).load()
    held = {"weights_gb": round(sum(t.numel() * t.element_size() for t in
                                    [*session.model.parameters(), *session.model.buffers()]) / 1e9, 2),
            "after_load_gb": round(torch.cuda.memory_allocated() / 1e9, 2)}  # (the fast path's check included)
    session.model.generation_config.eos_token_id = [UNUSED_ID]
    session.eos_ids = {UNUSED_ID}  # (the engine's copy, read at load)
    options = GenerationOptions(max_new_tokens=new_tokens)
    results = {}
    for length, images in prompts.items():
        media = [session.image_media(read_image(str(image), ImageOptions(max_pixels=MAX_PIXELS)))
                 for image in images]
        request = ChatRequest("Describe this image.", media, generation=options)
        session.generate_batch([request])  # warm: the fast path's graphs for this shape
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        completion = session.generate_batch([request])[0]
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        assert completion.completion_tokens == new_tokens, completion.completion_tokens
        first = completion.first_token_s or 0.0  # the prompt's pass; the rest is decoding
        results[length] = {"prompt_tokens": completion.prompt_tokens, "tokens_per_s": round(new_tokens / seconds, 2),
                           "peak_gb": _peak_gb(), "first_token_s": round(first, 3),
                           "decode_tokens_per_s": round((new_tokens - 1) / max(1e-9, completion.total_s - first), 1)}
    return {"lengths": results, **held, "weights": session.quantization or "bf16",
            "fused_kernel_runs": {str(k): v for k, v in session.fast.quantized.items()} if session.fast else None}


def kernel_times(rows_list=(1, 4, 16, 64), repeat: int = 50) -> dict:
    """The fused dequantizing kernel (engine/fast/quantized.py) on the 2B's projections (one layer: q/k/v,
    o, gate/up, down), over random packed weights, against the libraries' dequantizers (gptqmodel's GPTQ
    Triton kernel and AWQ's, which is what their layers run: dequantize, then multiply) and against float16
    F.linear on the same shapes. Microseconds per layer, each timed as `repeat` calls in one CUDA graph."""
    import torch
    import torch.nn.functional as F
    from gptqmodel.nn_modules.triton_utils.dequant import dequant
    from gptqmodel.quantization.awq.modules.triton.gemm import awq_dequantize_triton

    from qwen2vl_cli.engine.fast import _triton
    from qwen2vl_cli.engine.fast.quantized import FusedQuantized, Part

    def timed(function) -> float:
        function()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeat):
                function()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000 / (5 * repeat)

    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden, inter = 1536, 8960
    layer = {"qkv": (hidden, [1536, 256, 256]), "o": (hidden, [1536]), "gate_up": (hidden, [inter, inter]),
             "down": (inter, [hidden])}
    report = {}
    for name, bits, awq in (("GPTQ-Int4", 4, False), ("GPTQ-Int8", 8, False), ("AWQ", 4, True)):
        per, group = 32 // bits, 128
        fused_layer, dense_layer, errors = {}, {}, []
        for key, (k, widths) in layer.items():
            parts = []
            for n in widths:
                words = lambda *shape: torch.randint(-2 ** 31, 2 ** 31 - 1, shape, device="cuda", dtype=torch.int32,  # noqa: E731
                                                     generator=generator)
                qweight = words(k, n // per) if awq else words(k // per, n)
                scales = (torch.rand(k // group, n, device="cuda", generator=generator) * 0.01).half()
                parts.append(Part(qweight, words(k // group, n // per), scales, n))
            modules = [type("Layer", (), {"in_features": k, "bias": None})() for _ in widths]
            fused = FusedQuantized(modules, parts, bits, awq, group)
            fused.zero = 0  # their dequantizers read the zeros as stored (gptqmodel holds GPTQ ones as "v2")
            weights = [awq_dequantize_triton(p.qweight, p.scales, p.qzeros) if awq else
                       dequant(torch.float16, p.qweight, p.scales, p.qzeros,
                               torch.arange(k, device="cuda", dtype=torch.int32) // group, bits, 32, 2 ** bits - 1)
                       for p in parts]
            dense = torch.cat(weights, 1).t().contiguous()  # [N, K]: what F.linear reads
            fused_layer[key], dense_layer[key] = fused, (dense, weights, parts)
            for rows in (1, 5):  # the one-row kernel and the tiled one
                x = torch.randn(rows, k, device="cuda", generator=generator).half()
                ours, theirs = _triton.quant_matmul(x, fused).float(), F.linear(x, dense).float()
                errors.append(float((ours - theirs).norm() / theirs.norm()))
        rows_report, configs = {}, {}
        default = dict(_triton.GEMV)
        for block_n in (32, 64, 128, 256):  # the one-row kernel's tile, warps and programs a multiprocessor
            for warps in (4, 8):
                for waves in (2, 4, 8):
                    _triton.GEMV.update(BLOCK_N=block_n, AWQ_BLOCK_N=block_n, num_warps=warps, waves=waves)
                    xs = {key: torch.randn(1, k, device="cuda", generator=generator).half()
                          for key, (k, _) in layer.items()}
                    configs[f"BLOCK_N={block_n},num_warps={warps},waves={waves}"] = round(sum(
                        timed(lambda key=key: _triton.quant_matmul(xs[key], fused_layer[key])) for key in layer), 1)
        _triton.GEMV.update(default)
        for rows in rows_list:
            xs = {key: torch.randn(rows, k, device="cuda", generator=generator).half() for key, (k, _) in layer.items()}
            fused_us = sum(timed(lambda key=key: _triton.quant_matmul(xs[key], fused_layer[key])) for key in layer)
            dense_us = sum(timed(lambda key=key: F.linear(xs[key], dense_layer[key][0])) for key in layer)
            library_us = 0.0
            for key, (dense, weights, parts) in dense_layer.items():
                k = layer[key][0]
                g_idx = torch.arange(k, device="cuda", dtype=torch.int32) // 128
                library = (lambda p: awq_dequantize_triton(p.qweight, p.scales, p.qzeros)) if awq else (
                    lambda p: dequant(torch.float16, p.qweight, p.scales, p.qzeros, g_idx, bits, 32, 2 ** bits - 1))
                library_us += timed(lambda key=key, library=library, parts=parts: [
                    xs[key] @ library(p) for p in parts])
            rows_report[rows] = {"fused_us": round(fused_us, 1), "library_us": round(library_us, 1),
                                 "float16_us": round(dense_us, 1)}
        report[name] = {"max_relative_error_vs_library_dequantized": max(errors), "per_layer": rows_report,
                        "one_row_configs_us": configs, "best_one_row_config": min(configs, key=configs.get)}
        print(name, json.dumps(report[name]), flush=True)
    return report


def main() -> None:
    """Each format and path in a process of its own (peak memory is then that format's); the results
    gathered into one file."""
    import subprocess
    import sys

    import torch
    import transformers

    from tests.checkpoint import build_checkpoint, quantize_checkpoint

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--folder", default="/tmp/qwen2vl-quant-bench")
    parser.add_argument("--lengths", default="1,6144")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--recipe-tokens", type=int, help="the seed recipe's answer length (default --new-tokens):"
                        " at ~15 tokens/s, 2,048 tokens a prompt would not fit a device call")
    parser.add_argument("--formats", default="BF16,GPTQ-Int8,GPTQ-Int4,AWQ")
    parser.add_argument("--kernels", action="store_true", help="time the fused kernel alone (kernel_times)")
    parser.add_argument("--ways", default="seed_recipe,qwen2vl")
    parser.add_argument("--gemv", default="", help="the one-row kernel's settings, e.g. BLOCK_N=128,waves=4 "
                        "(engine/fast/_triton.GEMV), for the qwen2vl side")
    parser.add_argument("--one", nargs=2, metavar=("DIR", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.recipe_tokens = args.recipe_tokens or args.new_tokens
    if args.kernels:
        report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels": kernel_times()}
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        return
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    prompts = {}
    for n in map(int, args.lengths.split(",")):  # "1": text alone; else images of about n tokens in all
        n_images = n - 32  # the chat template's text: a prompt of "30,720" plus 2,048 new tokens fits the context
        whole, rest = divmod(n_images, IMAGE_TOKENS)
        sizes = [IMAGE_TOKENS] * whole + [rest] * bool(rest) if n > 1 else []
        prompts[n] = [photo(folder / f"photo-{n}-{i}.png", size) for i, size in enumerate(sizes)]
    if args.one:  # a child: one format through one path
        run = seed_recipe if args.one[1] == "seed_recipe" else qwen2vl
        if args.gemv:
            from qwen2vl_cli.engine.fast import _triton

            _triton.GEMV.update({key: int(value) for key, value in (kv.split("=") for kv in args.gemv.split(","))})
        tokens = args.recipe_tokens if run is seed_recipe else args.new_tokens
        print(json.dumps({**run(Path(args.one[0]), prompts, tokens), "new_tokens": tokens}))
        return
    base = folder / "bf16"
    if not (base / "config.json").exists():
        build_checkpoint(base, "2b", std=0.02, dtype="bfloat16", device="cuda")
    wanted = args.formats.split(",")
    formats = {"BF16": base} if "BF16" in wanted else {}
    for name, (method, bits) in {"GPTQ-Int8": ("gptq", 8), "GPTQ-Int4": ("gptq", 4), "AWQ": ("awq", 4)}.items():
        if name not in wanted:
            continue
        target = folder / name
        if not (target / "config.json").exists():
            quantize_checkpoint(base, target, folder / f"{name}-twin", method, bits)
        formats[name] = target
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "transformers": transformers.__version__, "new_tokens": args.new_tokens,
              "recipe_tokens": args.recipe_tokens, "gemv": args.gemv or "default",
              "peak_gb": "torch.cuda.max_memory_allocated over each answer (reset before it), each format and path "
              "in its own process, prompts in increasing length", "formats": {}}
    for name, path in formats.items():
        result["formats"][name] = {}
        for way in args.ways.split(","):
            child = subprocess.run([sys.executable, __file__, "--out", "-", "--folder", str(folder), "--lengths",
                                    args.lengths, "--new-tokens", str(args.new_tokens), "--recipe-tokens",
                                    str(args.recipe_tokens), "--gemv", args.gemv, "--one", str(path), way],
                                   capture_output=True, text=True)
            lines = child.stdout.strip().splitlines()
            result["formats"][name][way] = json.loads(lines[-1]) if child.returncode == 0 and lines else {
                "error": (child.stderr.strip().splitlines() or ["no output"])[-1]}
        print(name, json.dumps(result["formats"][name]), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
