"""GPU benchmark: the seed recipe (plain `generate`) beside qwen2vl's session path, same inputs.

Builds a full-size random-weight Qwen2-VL (2B by default, from the real configuration; no weights are
downloaded), writes it as a local safetensors checkpoint, and measures in one run:
  - model load time from that checkpoint,
  - time to first token and decode tokens/s at batch 1 (one 1230-token image),
  - batch captioning images/s (1230-token photos, 128 new tokens each): the seed recipe batched,
    and `qwen2vl batch`'s runner (prefetching, size-sorted batches, durable output),
  - peak GPU memory, and token agreement between the two paths.
Prints a table, then the JSON (also written to --json-out).

    python benchmarks/gpu.py [--model-size 2b|7b] [--images 256] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NEW_TOKENS = 128
MAX_PIXELS = 1280 * 28 * 28  # a 1280x960 photo -> 1230 image tokens


def synchronize():
    import torch

    torch.cuda.synchronize()


def with_bytecode(env: dict, folder: str | Path) -> dict:
    """`env` for a measured process, with the bytecode a pip install leaves beside the sources: the lent GPU
    machines set PYTHONDONTWRITEBYTECODE and carry packages installed without it, so every process there
    compiled torch, transformers and the command's own modules from source (seconds a load, ~0.3 s a one-liner)
    unless given a cache (`folder`, shared by every process of a run: the first writes, the others read)."""
    env = {**env, "PYTHONPYCACHEPREFIX": str(folder)}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def checkpoint_at(folder: str | Path | None, work: Path) -> str:
    """A random-weight 2B checkpoint (real shapes, bf16): `folder` where given and it holds one, else built there (or
    in `work`/ckpt) on the GPU."""
    from tests.checkpoint import build_checkpoint

    folder = Path(folder or work / "ckpt")
    if not (folder / "config.json").exists():
        build_checkpoint(folder, "2b", std=0.02, dtype="bfloat16", device="cuda")
    return str(folder)


def make_photos(folder: Path, count: int) -> list[Path]:
    """1280x960 JPEGs with smooth random content (JPEG-sized like photos, decoded like photos)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        small = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((1280, 960), Image.BICUBIC)
        path = folder / f"photo{i:05d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def load_stock(checkpoint: Path, dtype: str):
    """The checkpoint as the seed recipe loads it: plain transformers, none of qwen2vl's changes."""
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(
        checkpoint, dtype=getattr(torch, dtype), attn_implementation="sdpa", device_map="cuda").eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    return model, processor


def _conversation(path: Path) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image", "image": f"file://{path}", "max_pixels": MAX_PIXELS},
        {"type": "text", "text": "Describe this image."}]}]


def seed_recipe(model, processor, paths: list[Path], batch: int, new_tokens: int = NEW_TOKENS,
                margins: list | None = None) -> tuple[float, list[list[int]]]:
    """The model card's recipe, `batch` images per generate call; returns (seconds, generated ids).
    `margins`, when given, gets each answer's per-step gap between its top two logits."""
    import torch
    from qwen_vl_utils import process_vision_info

    outputs = []
    synchronize()
    start = time.perf_counter()
    for i in range(0, len(paths), batch):
        conversations = [_conversation(p) for p in paths[i:i + batch]]
        texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in conversations]
        images, _ = process_vision_info(conversations)
        inputs = processor(text=texts, images=images, padding=True, return_tensors="pt").to("cuda")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 output_scores=margins is not None, return_dict_in_generate=True)
        outputs += out.sequences[:, inputs.input_ids.shape[1]:].tolist()
        if margins is not None:  # [answers, steps]
            top = torch.stack([step.float().topk(2).values for step in out.scores], dim=1)
            margins += (top[..., 0] - top[..., 1]).tolist()
    synchronize()
    return time.perf_counter() - start, outputs


def seed_stream(model, processor, path: Path) -> tuple[float, float]:
    """The seed recipe streaming one answer: (time to first token, decode tokens/s); the image is decoded
    and resized before the clock starts, as for qwen2vl's measurement."""
    import torch
    from qwen_vl_utils import process_vision_info
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self):
            self.calls, self.tokens, self.first = 0, 0, None

        def put(self, value):
            self.calls += 1
            if self.calls >= 2:  # the first call carries the prompt
                self.first = self.first or time.perf_counter()
                self.tokens += value.numel()

        def end(self):
            synchronize()
            self.done = time.perf_counter()

    conversation = _conversation(path)
    images, _ = process_vision_info([conversation])
    clock = Clock()
    start = time.perf_counter()
    text = processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=images, return_tensors="pt").to("cuda")
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                       streamer=clock)
    return clock.first - start, (clock.tokens - 1) / (clock.done - clock.first)


def divergence(ours: str, ids: list[int], margins: list[float], tokenizer) -> dict:
    """The first step where the seed's answer (ids) stops being a prefix of ours, with its top-2 margin there."""
    for step in range(len(ids)):
        if not ours.startswith(tokenizer.decode(ids[: step + 1], skip_special_tokens=True).rstrip("\ufffd")):
            return {"step": step, "seed_top2_margin": round(margins[step], 5)}
    return {"step": len(ids)}


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> tuple[float, str]:
    """(share of token positions that agree, 'identical/total' answers)."""
    same = sum(sum(a == b for a, b in zip(x, y)) for x, y in zip(ours, theirs))
    total = max(1, sum(len(y) for y in theirs))
    return round(same / total, 4), f"{sum(x == y for x, y in zip(ours, theirs))}/{len(theirs)}"


# the 2B's projections: (out, in, bias)
PROJECTIONS_2B = {"qkv": (2048, 1536, True), "o": (1536, 1536, False), "gate_up": (17920, 1536, False),
                  "down": (1536, 8960, False), "lm_head": (151936, 1536, False)}


def check_kernels() -> dict:
    """Each Triton kernel against its torch version (HF's arithmetic) on fresh random inputs."""
    import torch

    from qwen2vl_cli.engine.fast import _triton, kernels

    torch.manual_seed(0)
    results = {}

    def compare(name, ours, reference):
        ours = ours if isinstance(ours, tuple) else (ours,)
        reference = reference if isinstance(reference, tuple) else (reference,)
        worst, equal, total = 0.0, 0, 0
        for a, b in zip(ours, reference):
            a, b = a.float(), b.float()
            assert torch.isfinite(a).all(), name
            worst = max(worst, ((a - b).norm() / b.norm().clamp_min(1e-30)).item())
            equal += (a == b).sum().item()
            total += b.numel()
        results[name] = {"rel_error": float(f"{worst:.3g}"), "bitwise_equal": round(equal / total, 5)}

    for dtype in (torch.bfloat16, torch.float32):
        tag = str(dtype).split(".")[-1]
        for batch in (1, 64):
            h, d = (torch.randn(batch, 1536, device="cuda", dtype=dtype) for _ in range(2))
            w = (1 + 0.1 * torch.randn(1536, device="cuda")).to(dtype)
            compare(f"add_rms_norm {tag} b{batch}", _triton.add_rms_norm(h.clone(), d, w, 1e-6),
                    kernels.add_rms_norm_torch(h.clone(), d, w, 1e-6))
            gu = torch.randn(batch, 2 * 8960, device="cuda", dtype=dtype)
            compare(f"silu_mul {tag} b{batch}", _triton.silu_mul(gu), kernels.silu_mul_torch(gu))
            qkv = torch.randn(batch, 2048, device="cuda", dtype=dtype)
            pos = torch.randint(0, 3000, (batch,), device="cuda")
            inv = 1.0 / (1e6 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
            slot = torch.randint(0, 1024, (batch,), device="cuda")  # each row's own cache slot
            caches = [torch.randn(batch, 2, 1024, 128, device="cuda", dtype=dtype) for _ in range(2)]
            copies = [c.clone() for c in caches]
            q1 = _triton.rope_store(qkv, pos, inv, slot, *caches, 12, 2)
            q2 = kernels.rope_store_torch(qkv, pos, inv, slot, *copies, 12, 2)
            compare(f"rope_store {tag} b{batch}", (q1, *caches), (q2, *copies))
            for size, filled in ((1536, 1300), (512, 40)):
                q = torch.randn(batch, 2, 6, 128, device="cuda", dtype=dtype)
                k, v = (torch.randn(batch, 2, size, 128, device="cuda", dtype=dtype) for _ in range(2))
                mask = torch.full((batch, 1, 1, size), float("-inf"), device="cuda", dtype=dtype)
                at = (filled - 1 - 7 * torch.arange(batch, device="cuda")).clamp(min=0)  # each row's own length
                for row in range(batch):
                    mask[row, ..., :int(at[row]) + 1] = 0.0
                mask[0, ..., :filled // 3] = float("-inf")  # row 0 left-padded
                compare(f"decode_attention {tag} b{batch} cache{size}",
                        _triton.decode_attention(q, k, v, mask, at), kernels.decode_attention_torch(q, k, v, mask, at))
        qkv = torch.randn(3, 1250, 2048, device="cuda", dtype=dtype)
        angles = torch.randn(3, 1250, 64, device="cuda") * 100
        cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
        for part, ours, reference in zip("qkv", _triton.rope_prefill(qkv, cos, sin, 12, 2),
                                         kernels.rope_prefill_torch(qkv, cos, sin, 12, 2)):
            compare(f"rope_prefill {tag} {part}", ours, reference)
        x = torch.randn(4920 * 2, 3840, device="cuda", dtype=dtype)
        angles = torch.randn(4920 * 2, 40, device="cuda") * 30
        cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
        for length in (None, 4920):
            compare(f"vision_qkv {tag} length={length}", _triton.vision_qkv(x, cos, sin, 16, length),
                    kernels.vision_qkv_torch(x, cos, sin, 16, length))
        y = torch.randn(4920, 5120, device="cuda", dtype=dtype) * 3
        compare(f"quick_gelu {tag}", _triton.quick_gelu(y), kernels.quick_gelu_torch(y))
        for name, (n, k, bias) in PROJECTIONS_2B.items():  # against cuBLAS: the same sum in another order
            w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
            b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
            for rows, product in ((1, _triton.linear_row), (3, _triton.linear_rows), (16, _triton.linear_rows)):
                x = torch.randn(rows, k, device="cuda", dtype=dtype)
                compare(f"{product.__name__} {tag} {name} rows={rows}", product(x, w, b),
                        torch.nn.functional.linear(x, w, b))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-size", choices=["2b", "7b"], default="2b")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="the seed recipe's batch size")
    parser.add_argument("--session-batch-size", type=int, default=None, help="qwen2vl's rows (default: from free memory)")
    parser.add_argument("--seed-images", type=int, default=64, help="images for the (slow) seed recipe")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--check-float32", action="store_true", help="also compare qwen2vl and the seed recipe in float32")
    parser.add_argument("--check-kernels", action="store_true", help="compare the Triton kernels with torch's")
    parser.add_argument("--skip-seed", action="store_true", help="leave out the (slow) seed recipe")
    args = parser.parse_args()

    import torch
    import transformers

    from qwen2vl_cli.batch.inputs import BatchItem
    from qwen2vl_cli.batch.runner import BatchConfig, BatchSummary, Results, run_batch
    from tests.checkpoint import build_checkpoint
    from qwen2vl_cli.engine.session import ModelSession
    from qwen2vl_cli.types import ChatRequest, Completion, GenerationOptions, Media, ModelSpec
    from qwen2vl_cli.sources import FetchLimits, ImageOptions, resolve_image

    work = Path(tempfile.mkdtemp(prefix="qwen2vl-bench-"))
    report: dict = {
        "gpu": torch.cuda.get_device_name(0), "driver": _driver(), "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "model": f"Qwen2-VL-{args.model_size.upper()} (random weights, real shapes), bf16, sdpa",
        "new_tokens": NEW_TOKENS, "image_tokens": 1230,
    }
    if args.check_kernels:
        report["kernels"] = check_kernels()
        print(json.dumps(report["kernels"], indent=1))
    start = time.perf_counter()
    checkpoint = build_checkpoint(work / "ckpt", args.model_size, std=0.02, dtype="bfloat16", device="cuda")
    report["checkpoint_build_s"] = round(time.perf_counter() - start, 1)
    paths = make_photos(work / "photos", args.images)
    same_paths = paths[:16]  # the answers compared token by token

    # ---- the seed recipe, on a model loaded by plain transformers ------------------------------
    stock, stock_processor = load_stock(checkpoint, "bfloat16")
    seed_stream(stock, stock_processor, paths[1])  # warm-up
    ttft, rate = min((seed_stream(stock, stock_processor, paths[0]) for _ in range(2)), key=lambda r: r[0])
    report["seed_ttft_ms_batch1"], report["seed_decode_tokens_per_s_batch1"] = round(ttft * 1000, 1), round(rate, 1)
    _, stock_ids = seed_recipe(stock, stock_processor, same_paths, 16)
    if not args.skip_seed:
        seconds, alone_ids = seed_recipe(stock, stock_processor, paths[:8], 1)
        report["seed_per_image_images_per_s"] = round(8 / seconds, 2)
        # the recipe against itself, one image per call vs 16 per call: bf16's own spread in answers
        decoded = lambda rows: [stock_processor.tokenizer(stock_processor.tokenizer.decode(  # noqa: E731
            ids, skip_special_tokens=True), add_special_tokens=False).input_ids for ids in rows]
        report["seed_alone_vs_batched_agreement_bf16"], report["seed_alone_vs_batched_identical_bf16"] = agreement(
            decoded(alone_ids), decoded(stock_ids[:8]))
        torch.cuda.reset_peak_memory_stats()
        seconds, _ = seed_recipe(stock, stock_processor, paths[:args.seed_images], args.batch_size)
        report["seed_batched_images_per_s"] = round(args.seed_images / seconds, 2)
        report["seed_batched_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del stock
    torch.cuda.empty_cache()

    # ---- qwen2vl's session path ---------------------------------------------------------------
    session = ModelSession(ModelSpec(model=str(checkpoint), device="cuda", dtype="bfloat16", attn="sdpa"))
    start = time.perf_counter()
    session.load()
    synchronize()
    report["load_s"] = round(time.perf_counter() - start, 2)
    session.model.generation_config.eos_token_id = [151935]  # an unused id: every answer is 128 tokens, as
    session.eos_ids = {151935}  # (the engine's copy, read at load)
    options = GenerationOptions(max_new_tokens=NEW_TOKENS)  # min_new_tokens makes them in the seed recipe
    image = resolve_image(str(paths[0]), ImageOptions(max_pixels=MAX_PIXELS))
    request = ChatRequest("Describe this image.", [Media("image", str(paths[0]), image)], generation=options)
    start = time.perf_counter()
    list(session.stream(request))  # warm-up: the fast path's contract check, kernels, CUDA graph
    report["warmup_s"] = round(time.perf_counter() - start, 2)
    if not session.fast:
        raise SystemExit("the fast path stepped aside on this transformers (see the note above): nothing to measure")
    report["fast_path_contract_relative_errors"] = [round(e, 5) for e in session.fast.errors]
    torch.cuda.reset_peak_memory_stats()
    prefill = session.fast.prefill
    prefill.use_graphs = False  # an image size the session has not seen twice: no vision graph yet
    fresh = [list(session.stream(request))[-1] for _ in range(3)]
    fresh_answer = fresh[0]
    report["ttft_ms_batch1_new_size"] = round(min(c.first_token_s for c in fresh) * 1000, 1)
    prefill.use_graphs = True
    captured = list(session.stream(request))[-1]  # the second time this size comes: its graphs are captured
    runs = [list(session.stream(request))[-1] for _ in range(3)]
    report["bf16_streamed_answer_with_graphs_vs_without"] = agreement(
        [session.processor.tokenizer(c.text).input_ids for c in (captured, runs[0])],
        [session.processor.tokenizer(fresh_answer.text).input_ids] * 2)
    best: Completion = min(runs, key=lambda c: c.total_s)
    report["ttft_ms_batch1"] = round(min(c.first_token_s for c in runs) * 1000, 1)
    report["decode_tokens_per_s_batch1"] = round((best.completion_tokens - 1) / (best.total_s - best.first_token_s), 1)
    report["peak_gib_batch1"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    torch.cuda.reset_peak_memory_stats()
    items = [BatchItem(str(p)) for p in paths]
    config = BatchConfig(prompt="Describe this image.", system=None, images=ImageOptions(max_pixels=MAX_PIXELS),
                         limits=FetchLimits(), generation=options, batch_size=args.session_batch_size, workers=8)
    texts: dict[str, str] = {}

    class Collect:  # a sink (has/write/close) that keeps the answers in memory
        def has(self, source):
            return False

        def write(self, record):
            texts[record["source"]] = record["text"]

        def close(self):
            pass

    summary = run_batch(items, session, config, Results([Collect()], BatchSummary(), lambda n: None))
    report["session_batch_images_per_s"] = round(summary.images_per_second, 2)
    report["session_batch_size"] = session.engine.rows.capacity  # rows of the running batch
    report["session_batch_failed"] = summary.failed
    report["session_batch_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    # ---- same answers: qwen2vl batch vs the seed recipe batched, on the same 16 photos ----------
    tokenizer = session.processor.tokenizer
    tokenize = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    ours = [tokenize(texts[str(p)]) for p in same_paths]
    theirs = [tokenize(stock_processor.tokenizer.decode(ids, skip_special_tokens=True)) for ids in stock_ids]
    report["token_agreement_bf16"], report["identical_answers_bf16"] = agreement(ours, theirs)
    if args.check_float32:  # the same in float32, where rounding rarely flips a greedy choice
        del session
        torch.cuda.empty_cache()
        stock32, processor32 = load_stock(checkpoint, "float32")
        margins: list = []
        _, ids32 = seed_recipe(stock32, processor32, same_paths, 16, new_tokens=64, margins=margins)
        del stock32
        torch.cuda.empty_cache()
        session32 = ModelSession(ModelSpec(model=str(checkpoint), device="cuda", dtype="float32", attn="sdpa")).load()
        session32.model.generation_config.eos_token_id = [151935]
        session32.eos_ids = {151935}
        short = [ChatRequest("Describe this image.", [Media("image", str(p), resolve_image(
            str(p), ImageOptions(max_pixels=MAX_PIXELS)))], generation=GenerationOptions(max_new_tokens=64))
            for p in same_paths]
        texts32 = [c.text for c in session32.generate_batch(short)]
        ours32 = [tokenize(text) for text in texts32]
        theirs32 = [tokenize(processor32.tokenizer.decode(ids, skip_special_tokens=True)) for ids in ids32]
        report["token_agreement_float32"], report["identical_answers_float32"] = agreement(ours32, theirs32)
        report["float32_differences"] = [  # where an answer leaves the seed's, and the seed's top-2 gap there
            {"photo": row, **divergence(texts32[row], ids32[row], margins[row], processor32.tokenizer)}
            for row in range(len(ids32)) if ours32[row] != theirs32[row]]
        report["float32_seed_median_top2_margin"] = round(sorted(m for row in margins for m in row)[
            len(margins) * len(margins[0]) // 2], 4)
        # one streamed answer: new size (no graphs), then captured, then replayed: each the batch's answer
        streamed = [list(session32.stream(short[0]))[-1].text for _ in range(3)]
        report["float32_streamed_answers_equal_batch"] = [tokenize(text) == ours32[0] for text in streamed]

    rows = [
        ("model load (local safetensors)", f"{report['load_s']} s"),
        ("warm-up (first request: kernels, CUDA graph)", f"{report['warmup_s']} s"),
        ("time to first token, 1230-token image", f"{report['ttft_ms_batch1']} ms "
                                                   f"(seed recipe {report['seed_ttft_ms_batch1']} ms)"),
        ("the same, a size not seen twice before (no graphs yet)", f"{report['ttft_ms_batch1_new_size']} ms"),
        ("decode, batch 1", f"{report['decode_tokens_per_s_batch1']} tokens/s "
                            f"(seed recipe {report['seed_decode_tokens_per_s_batch1']})"),
        (f"qwen2vl batch, batch {report['session_batch_size']}", f"{report['session_batch_images_per_s']} images/s, "
                                                    f"{report['session_batch_peak_gib']} GiB peak"),
        *([("seed recipe, one image per generate", f"{report['seed_per_image_images_per_s']} images/s"),
           (f"seed recipe, batch {args.batch_size}", f"{report['seed_batched_images_per_s']} images/s, "
                                                      f"{report['seed_batched_peak_gib']} GiB peak")]
          if not args.skip_seed else []),
        *([("the seed recipe against itself, 8 photos one by one vs in a batch of 16, bf16",
            f"{report['seed_alone_vs_batched_agreement_bf16']:.2%} of tokens "
            f"({report['seed_alone_vs_batched_identical_bf16']} answers identical)")] if not args.skip_seed else []),
        ("same 16 photos, qwen2vl batch vs seed recipe, bf16",
         f"{report['token_agreement_bf16']:.2%} of tokens ({report['identical_answers_bf16']} answers identical)"),
        *([("the same in float32 (64 tokens)", f"{report['token_agreement_float32']:.2%} of tokens "
                                                f"({report['identical_answers_float32']} answers identical)")]
          if args.check_float32 else []),
    ]
    print(f"\n{report['gpu']}, driver {report['driver']}, torch {report['torch']}, "
          f"transformers {report['transformers']}; {report['model']}")
    print("| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print(json.dumps(report))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2) + "\n")


def _driver() -> str:
    import subprocess

    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    main()
