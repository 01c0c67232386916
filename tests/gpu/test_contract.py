"""The fast path's load-time contract check on the GPU, in bf16: it passes with this transformers, and a
real break (the layers leaving the cache empty, as with transformers 5.24 before the fix) is caught with a
margin over bf16 rounding."""

from __future__ import annotations

import re

import pytest

from ..conftest import break_the_fast_layers_cache
from .conftest import DEVICE


def test_the_contract_holds_here(checkpoint, measured):
    from qwen2vl_cli.engine.fast.decoder import CONTRACT_TOLERANCE
    from qwen2vl_cli.types import GenerationOptions, ModelSpec
    from qwen2vl_cli.engine.session import get_session

    session = get_session(ModelSpec(model=str(checkpoint), device=DEVICE)).load()
    assert session.fast_path_enabled(GenerationOptions()), "the fast path stepped aside"
    measured("relative_errors", [round(e, 5) for e in session.fast.errors])
    half = session.fast.dtype.is_floating_point and session.fast.dtype.itemsize == 2
    assert max(session.fast.errors) < CONTRACT_TOLERANCE[not half] / 2  # a margin under the tolerance


def test_an_empty_cache_is_caught(checkpoint, measured, monkeypatch):
    from qwen2vl_cli.engine.fast import decoder as fastpath
    from qwen2vl_cli.types import ModelSpec
    from qwen2vl_cli.engine.session import ModelSession, _contract_probes

    monkeypatch.setenv("QWEN2VL_FASTPATH", "off")  # a model without the fast path: `enable` puts it on below
    session = ModelSession(ModelSpec(model=str(checkpoint), device=DEVICE)).load()
    break_the_fast_layers_cache(monkeypatch)
    single = [probe for probe in _contract_probes() if len(probe) == 1]  # the batch probe fails outright
    probes = [(session.to_device(prepared), prepared) for prepared in map(session.prepare, single)]
    with pytest.raises(fastpath.ContractError) as caught:
        fastpath.enable(session.model, probes)
    error = re.search(r"relative error ([0-9.e+-]+)", str(caught.value))
    measured("relative_error_with_an_empty_cache", float(error.group(1)) if error else str(caught.value))
    assert all("forward" not in layer.__dict__ for layer in session.model.model.language_model.layers)
    session.unload()


def test_a_checked_load_leaves_no_probe_shapes_and_an_unload_frees_the_gpu(checkpoint, measured, monkeypatch):
    """The load's check runs its probe prompts through the prefill: their image sizes and prompt lengths are not
    left for a session's idle time to capture. An unload (the server's --keep-alive) gives the weights' memory
    back, although the load froze them for the collector (engine/session.collector_paused)."""
    import torch

    from qwen2vl_cli.engine.fast import checks
    from qwen2vl_cli.engine.session import ModelSession
    from qwen2vl_cli.types import ModelSpec

    from .conftest import DRY

    if DRY:
        pytest.skip("the check is run at every load on the CPU, and no prompt graphs are made there")
    monkeypatch.setattr(checks, "passed", lambda key: None)  # as at a first load: the check runs
    before = torch.cuda.memory_allocated()
    session = ModelSession(ModelSpec(model=str(checkpoint), device=DEVICE)).load()
    loaded = torch.cuda.memory_allocated()
    assert session.fast and not session.fast.checked_before
    assert not session.fast.prefill.pending and not session.fast.prefill.seen
    session.unload()
    measured("gib_loaded_then_after_unload", [round((loaded - before) / 2**30, 2),
                                              round((torch.cuda.memory_allocated() - before) / 2**30, 2)])
    assert torch.cuda.memory_allocated() - before < 0.05 * (loaded - before)


def test_few_row_projections_are_as_close_to_exact_as_cublas(measured):
    """A decode step of 1-16 rows multiplies by the weights in Triton (kernels.linear: a GEMV for one row, one
    tensor-core tile of rows for the wide products), not cuBLAS: on the 2B's projections its bf16 products are as
    close to the float32 products as cuBLAS's are."""
    import torch
    import torch.nn.functional as F

    from benchmarks.gpu import PROJECTIONS_2B
    from qwen2vl_cli.engine.fast import kernels

    torch.manual_seed(0)
    errors = {}
    for name, (n, k, bias) in PROJECTIONS_2B.items():
        w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02
        b = torch.randn(n, device=DEVICE, dtype=torch.bfloat16) if bias else None
        for rows in (1, 3, 16):
            x = torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16)
            exact = F.linear(x.float(), w.float(), None if b is None else b.float())
            ours, theirs = kernels.linear(x, w, b), F.linear(x, w, b)
            errors[f"{name} rows={rows}"] = [round(((y.float() - exact).norm() / exact.norm()).item(), 6)
                                             for y in (ours, theirs)]
            assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    measured("relative_errors_ours_cublas", errors)
    assert not kernels._broken, kernels._broken
    assert all(ours <= 1.25 * theirs + 1e-6 for ours, theirs in errors.values()), errors
