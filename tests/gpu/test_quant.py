"""Quantized checkpoints on CUDA (issue 12): GPTQ-Int4, GPTQ-Int8 and AWQ in the released layout against
their dequantized float16 twins, with gptqmodel's Triton kernels run inside the fast path (continuous batch,
CUDA graphs); the commands' stdout stays clean. Skipped where the quant extra is not installed."""

from __future__ import annotations

import json

import pytest

from ..conftest import run_process
from .conftest import DEVICE, DRY

pytest.importorskip("gptqmodel", reason="the quant extra is not installed")

from ..test_quant import (FORMATS, assert_answers_like_twin, engine_ids, make_requests, quantize_all,  # noqa: E402
                          write_frames)

NEAR_TIE_HALF = 1e-2  # float16 kernels: a first differing token only where the twin's top two are this close


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    from tests.checkpoint import build_checkpoint

    folder = tmp_path_factory.mktemp("quantized")
    return quantize_all(build_checkpoint(folder / "small", "small"), folder)


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    return write_frames(tmp_path_factory.mktemp("frames"), 112, 84)


@pytest.mark.parametrize("name", list(FORMATS))
def test_quantized_answers_like_the_twin_on_cuda(quantized, media, frames, measured, name):
    from qwen2vl_cli.types import ModelSpec
    from qwen2vl_cli.engine.session import ModelSession

    quant_dir, twin_dir = quantized[name]
    quant = ModelSession(ModelSpec(str(quant_dir), device=DEVICE)).load()
    twin = ModelSession(ModelSpec(str(twin_dir), device=DEVICE, dtype="float32" if DRY else "float16")).load()
    requests = make_requests(media["photo"], frames, max_new_tokens=32)
    assert quant.fast_path_enabled(requests[0].generation) or DRY
    seen = assert_answers_like_twin(quant, twin, requests, NEAR_TIE_HALF, ours_from=engine_ids, against_recipe=True)
    measured(f"quant_{name}", {"weights": quant.quantization, "dtype": str(quant.model.dtype), "requests": seen})


def test_commands_with_a_quantized_checkpoint_keep_stdout_clean(quantized, media):
    model = str(quantized["gptq4"][0])
    described = run_process("describe", media["photo"], "-n", "16", "--json", "-v", "--model", model,
                            "--no-server", "--device", DEVICE, timeout=300)
    assert described.returncode == 0, described.stderr.decode()
    assert json.loads(described.stdout)["usage"]["completion_tokens"] > 0
    assert b"GPTQ-Int4 weights" in described.stderr
    assert b"fast path on" in described.stderr  # (a dry run forces it on, as CUDA has it)
