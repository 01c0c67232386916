"""Quantized checkpoints (issue 12) on the CPU, offline: tiny GPTQ-Int4, GPTQ-Int8 and AWQ checkpoints in
the released layout, built at test time, each against its dequantized float twin (the same weights as
floats: the oracle); every command and the server answer with them; the failures get exit 4."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import run_process, start_server, stop

pytest.importorskip("gptqmodel", reason="the quant extra is not installed")
pytest.importorskip("optimum")

FORMATS = {"gptq4": ("gptq", 4), "gptq8": ("gptq", 8), "awq4": ("awq", 4)}
NEAR_TIE = 1e-3  # a first differing token is accepted only where the twin's own top two logits are this close


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    from tests.checkpoint import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("small-qwen2vl"), "small")


def quantize_all(small: Path, folder: Path) -> dict[str, tuple[Path, Path]]:
    """Every format of FORMATS made from `small`: name -> (quantized checkpoint, its dequantized twin)."""
    from tests.checkpoint import quantize_checkpoint

    return {name: (quantize_checkpoint(small, folder / name, folder / f"{name}-twin", method, bits),
                   folder / f"{name}-twin") for name, (method, bits) in FORMATS.items()}


def write_frames(folder: Path, width: int, height: int) -> Path:
    """Four noise frames: a frame-directory video."""
    from .conftest import noise_image

    for i in range(4):
        noise_image(width, height, 30 + i).save(folder / f"f{i}.png")
    return folder


@pytest.fixture(scope="module")
def quantized(small_model, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    return quantize_all(small_model, tmp_path_factory.mktemp("quantized"))


def make_requests(image_path, frames, max_new_tokens: int = 16):
    """An image, text alone and a frame-directory video."""
    from qwen2vl_cli.types import ChatRequest, GenerationOptions, Media
    from qwen2vl_cli.sources import resolve_image
    from qwen2vl_cli.video import resolve_video

    options = GenerationOptions(max_new_tokens=max_new_tokens)
    image = resolve_image(str(image_path))
    video = resolve_video(str(frames))
    return [ChatRequest("Describe this image.", [Media("image", "c", image)], generation=options),
            ChatRequest("Write a haiku about GPUs.", generation=options),
            ChatRequest("What happens?", [Media("video", "f", video.frames, metadata=video.metadata)],
                        generation=options)]


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    return write_frames(tmp_path_factory.mktemp("frames"), 84, 56)


def _ids(session, request) -> list[int]:
    """The session's model's greedy ids (transformers' generate: quantized layers and twin alike)."""
    import torch

    inputs = session.to_device(session.prepare([request]))
    with torch.inference_mode():
        output = session.model.generate(**inputs, **session.generate_kwargs(request.generation))
    return output[0, inputs["input_ids"].shape[1]:].tolist()


def engine_ids(session, request) -> list[int]:
    """The session's greedy ids as its engine answers (the fast path where it is on: continuous batch, graphs)."""
    from qwen2vl_cli.engine import tickets

    seen: list[list[int]] = []
    original = tickets.Answer.finish

    def finish(self):
        seen.append(list(self.ids))
        return original(self)

    tickets.Answer.finish = finish
    try:
        session.engine.generate([request])
    finally:
        tickets.Answer.finish = original
    return seen[0]


def _first_difference(ours: list[int], theirs: list[int]) -> int | None:
    return next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)


def assert_answers_like_twin(quant, twin, requests, near_tie: float = NEAR_TIE, ours_from=_ids,
                             against_recipe: bool = False) -> list[dict]:
    """Greedy ids token for token (the quantized session's from `ours_from`, the twin's from `generate`); where
    the two first differ, the twin's own logits for the two tokens must be within `near_tie` of its largest
    logit (the kernels sum in another order), never a real disagreement. Returns what was seen per request
    (for the GPU suite's record); `against_recipe` also records how far `ours` agrees with the seed recipe's
    `generate` on the quantized checkpoint itself (reported, not asserted)."""
    import torch

    seen = []
    for request in requests:
        ours, theirs = ours_from(quant, request), _ids(twin, request)
        first = _first_difference(ours, theirs)
        seen.append({"prompt": request.prompt, "tokens": len(theirs), "first_difference": first})
        if against_recipe:
            recipe = _ids(quant, request)
            seen[-1]["seed_recipe_first_difference"] = _first_difference(ours, recipe)
            same = sum(a == b for a, b in zip(ours, recipe))
            seen[-1]["seed_recipe_agreement"] = round(same / max(1, len(recipe)), 3)
        if first is None:
            assert len(ours) == len(theirs), request.prompt
            continue
        inputs = dict(twin.to_device(twin.prepare([request])))
        extend = len(theirs[:first])  # the twin's answer so far, appended to every per-token input
        for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            if key in inputs:
                tail = theirs[:first] if key == "input_ids" else [int(key == "attention_mask")] * extend
                inputs[key] = torch.cat([inputs[key], torch.tensor([tail], dtype=inputs[key].dtype,
                                                                   device=inputs[key].device)], dim=1)
        with torch.no_grad():
            logits = twin.model(**inputs).logits[0, -1].float()
        gap = (logits[theirs[first]] - logits[ours[first]]).abs().item()
        seen[-1]["gap"] = round(gap / logits.abs().max().item(), 6)
        assert gap < near_tie * logits.abs().max().item(), (request.prompt, first, gap)
    return seen


@pytest.mark.parametrize("name", list(FORMATS))
def test_quantized_answers_equal_the_dequantized_twin(quantized, images, frames, name):
    """Each format against its twin, on an image, text alone and a video."""
    from qwen2vl_cli.types import ModelSpec
    from qwen2vl_cli.engine.session import ModelSession

    quant_dir, twin_dir = quantized[name]
    quant = ModelSession(ModelSpec(str(quant_dir))).load()
    twin = ModelSession(ModelSpec(str(twin_dir))).load()
    assert quant.quantization == f"{FORMATS[name][0].upper()}-Int{FORMATS[name][1]}" and twin.quantization is None
    requests = make_requests(images["c"], frames)
    assert not quant.fast_path_enabled(requests[0].generation)
    assert_answers_like_twin(quant, twin, requests)


@pytest.mark.parametrize("name", ["gptq4", "awq4"])
def test_the_fast_path_runs_quantized_layers(quantized, images, frames, name, monkeypatch):
    """With the fast path on (the CUDA default; forced here), quantized layers run inside it (their own kernels
    in its decode step): the engine's answers are the twin's."""
    from qwen2vl_cli.types import ModelSpec
    from qwen2vl_cli.engine.session import ModelSession

    monkeypatch.setenv("QWEN2VL_FASTPATH", "on")
    quant_dir, twin_dir = quantized[name]
    quant = ModelSession(ModelSpec(str(quant_dir))).load()
    twin = ModelSession(ModelSpec(str(twin_dir))).load()
    requests = make_requests(images["c"], frames)
    assert quant.fast_path_enabled(requests[0].generation), "the fast path stepped aside"
    assert "fast path on" in quant.describe_weights()
    assert_answers_like_twin(quant, twin, requests, ours_from=engine_ids)


# Run in a process of its own with TRITON_INTERPRET=1: Triton's interpreter runs the fused kernel on the CPU.
FUSED_KERNEL_CHECK = """
import json, sys
import torch
from qwen2vl_cli.engine.fast import _triton, quantized
from qwen2vl_cli.engine.session import ModelSession
from qwen2vl_cli.types import ModelSpec

_triton._multiprocessors = lambda device: 64  # as many programs as a GPU wants: the K-split path runs too
model = ModelSession(ModelSpec(sys.argv[1])).load().model
generator = torch.Generator().manual_seed(1)
seen = []
for layer in model.model.language_model.layers:
    a, m = layer.self_attn, layer.mlp
    for modules in ([a.q_proj, a.k_proj, a.v_proj], [a.o_proj], [m.gate_proj, m.up_proj], [m.down_proj]):
        fused = quantized.fuse(modules)
        found = {"format": [fused.bits, fused.awq, fused.group], "probe": fused.probe(_triton.quant_matmul),
                 "zero": fused.zero, "errors": []}
        for rows in (1, 5, 17, 64):
            x = torch.randn(rows, modules[0].in_features, generator=generator).to(model.dtype)
            ours, theirs = _triton.quant_matmul(x, fused).float(), fused.stock(x).float()
            found["errors"].append(float((ours - theirs).norm() / theirs.norm()))
        fused.zero = 1 - fused.zero
        ours = _triton.quant_matmul(x, fused).float()
        found["wrong_zero_error"] = float((ours - theirs).norm() / theirs.norm())
        seen.append(found)
down = model.model.language_model.layers[0].mlp.down_proj  # two groups of 128 inputs
if getattr(down, "g_idx", None) is not None:  # an act-order checkpoint (groups permuted) is left to the modules
    down.g_idx.copy_(down.g_idx.flip(0))
    seen.append({"act_order_parts": quantized.fuse([down]).parts})
print(json.dumps(seen))
"""


@pytest.mark.parametrize("name", list(FORMATS))
def test_the_fused_kernel_reads_each_layout_in_place(quantized, name):
    """The fast path's fused dequantizing kernel (Triton, run here by its interpreter) over the layers as gptqmodel
    loaded them: its probe settles the zeros' convention and passes, and at every decode width (1-64 rows, the
    K-split path included) it computes what the modules compute; the other zero convention is caught (so the
    probe can fail), and an act-order GPTQ layer is left to its module."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    result = subprocess.run([sys.executable, "-c", FUSED_KERNEL_CHECK, str(quantized[name][0])], capture_output=True,
                            text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    method, bits = FORMATS[name]
    groups = [found for found in seen if "probe" in found]
    assert len(groups) == 4 * 2  # four groups a layer, two layers
    for found in groups:
        assert found["format"] == [bits, method == "awq", 128], found
        assert found["probe"] and found["zero"] == 0, found  # gptqmodel holds GPTQ zeros as they are ("v2")
        assert max(found["errors"]) < 1e-3, found  # float16 outputs: a rounding apart at most
        assert found["wrong_zero_error"] > 0.01, found
    if method == "gptq":
        assert seen[-1] == {"act_order_parts": None}


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_command_answers_with_a_quantized_checkpoint(quantized, images, frames, tmp_path, name):
    model = str(quantized[name][0])
    described = run_process("describe", images["c"], "-n", "6", "--json", "--model", model, "--no-server",
                            timeout=300)
    assert described.returncode == 0, described.stderr.decode()
    record = json.loads(described.stdout)  # nothing a dependency printed is on stdout
    assert record["text"] and record["usage"]["completion_tokens"] == 6
    asked = run_process("ask", "-q", "Hi.", "-n", "4", "--model", model, "--no-server", "-v", timeout=300)
    assert asked.returncode == 0 and f"{FORMATS[name][0].upper()}-Int{FORMATS[name][1]} weights" in \
        asked.stderr.decode()
    watched = run_process("video", frames, "-q", "What happens?", "-n", "4", "--model", model, "--no-server",
                          timeout=300)
    assert watched.returncode == 0, watched.stderr.decode()
    out = tmp_path / "captions.jsonl"
    batch = run_process("batch", images["a"], images["b"], images["c"], "-n", "6", "-o", out, "--model", model,
                        "--no-server", timeout=300)
    assert batch.returncode == 0, batch.stderr.decode()
    captions = {Path(r["source"]).name: r["text"] for r in map(json.loads, out.read_text().splitlines())}
    assert captions["c.png"] == record["text"]  # batched beside other images, the same answer


def test_the_server_serves_a_quantized_checkpoint(quantized, images, tmp_path):
    openai = pytest.importorskip("openai")
    import base64

    model = str(quantized["gptq4"][0])
    expected = run_process("describe", images["c"], "-n", "8", "--model", model, "--no-server", timeout=300)
    process, url = start_server(model, tmp_path, "--keep-alive", "never")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
        data = "data:image/png;base64," + base64.b64encode(images["c"].read_bytes()).decode()
        reply = client.chat.completions.create(model=model, max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data}}, {"type": "text", "text": "Describe this image."}]}])
        assert reply.choices[0].message.content == expected.stdout.decode()[:-1]
    finally:
        stop(process)


def test_quantize_on_load(small_model, images):
    pytest.importorskip("bitsandbytes")
    done = run_process("describe", images["c"], "-n", "6", "--quantize", "8bit", "--model", small_model,
                       "--no-server", "--json", timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["usage"]["completion_tokens"] == 6


def test_quantize_refuses_a_quantized_checkpoint_and_bad_values(quantized, images):
    again = run_process("describe", images["c"], "--quantize", "8bit", "--model", quantized["gptq4"][0], "--no-server")
    assert again.returncode == 2 and b"already quantized" in again.stderr
    bad = run_process("describe", images["c"], "--quantize", "3bit", "--no-server")
    assert bad.returncode == 2


def test_a_missing_loader_is_exit_4_with_the_fix(quantized, images, tmp_path):
    """gptqmodel hidden from the process: one line naming the extra to install."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['gptqmodel'] = None  # as if not installed\n")
    import os

    env = {"PYTHONPATH": f"{blocker}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    missing = run_process("describe", images["c"], "--model", quantized["gptq4"][0], "--no-server", env=env)
    message = missing.stderr.decode().strip()
    assert missing.returncode == 4 and len(message.splitlines()) == 1, message
    assert "pip install 'qwen2vl-cli[quant]'" in message


def test_a_checkpoint_that_does_not_fit_is_exit_4(quantized, images, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(quantized["gptq4"][0], tmp_path / "missing-layer")
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.qweight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    missing = run_process("describe", images["c"], "--model", broken, "--no-server")
    assert missing.returncode == 4 and b"missing weights" in missing.stderr, missing.stderr
    refused = shutil.copytree(quantized["awq4"][0], tmp_path / "bad-group")
    config = json.loads((refused / "config.json").read_text())
    config["quantization_config"]["group_size"] = 96  # 128 inputs are not a whole number of groups
    (refused / "config.json").write_text(json.dumps(config))
    kernel = run_process("describe", images["c"], "--model", refused, "--no-server")
    assert kernel.returncode == 4 and len(kernel.stderr.decode().strip().splitlines()) == 1, kernel.stderr
