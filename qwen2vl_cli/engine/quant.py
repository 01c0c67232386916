"""Quantized checkpoints (GPTQ-Int4/Int8 and AWQ, through gptqmodel) and quantizing on load
(`--quantize 4bit|8bit`, through bitsandbytes): what from_pretrained must be given, checked before loading.

The loaders' packages are the `quant` extra; without them a quantized checkpoint is exit 4 with the fix.
Their kernels are picked so that nothing compiles on first use (gptqmodel's torch kernels on the CPU,
its Triton kernels on CUDA, torch.compile off), the vision tower stays unquantized (real Qwen2-VL AWQ
releases name it `visual`, which transformers 5 calls `model.visual`), and whatever they print goes to
stderr, never into an answer on stdout. A load that leaves weights missing or unused is an error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys

from ..errors import ModelLoadError, UsageError

QUANTIZE_CHOICES = ("4bit", "8bit")
EXTRA = "pip install 'qwen2vl-cli[quant]'"
NEEDS = {"gptq": ("optimum", "gptqmodel"), "awq": ("gptqmodel",), "bitsandbytes": ("bitsandbytes",)}
UNQUANTIZED = ["model.visual", "visual", "lm_head"]  # the vision tower (both names) and the output head


def fast_path_takes(description: str | None) -> bool:
    """Whether the fast path runs these weights: float ones, and GPTQ/AWQ layers (gptqmodel's kernels, which a CUDA
    graph can hold); not bitsandbytes (its 8-bit matmul reads outliers on the host)."""
    return description is None or description.startswith(("GPTQ-", "AWQ-"))


def method_of(quantization: dict | None) -> str | None:
    """The checkpoint's quantization method ("gptq", "awq", "bitsandbytes", ...), or None for float weights."""
    return str(quantization.get("quant_method", "")).lower() or None if quantization else None


def describe(quantization: dict | None, quantize: str | None) -> str | None:
    """'GPTQ-Int4', 'AWQ-Int4', 'bitsandbytes 8-bit', or None: for --verbose and the fast path's note."""
    if quantize:
        return f"bitsandbytes {quantize[0]}-bit (on load)"
    method = method_of(quantization)
    if method in ("gptq", "awq"):
        return f"{method.upper()}-Int{quantization.get('bits', '?')}"
    return method


def load_kwargs(model: str, config, quantize: str | None, device: str) -> dict:
    """from_pretrained's arguments for this checkpoint (its loaded `config`) and --quantize: {} for float
    weights; ModelLoadError when the loader's packages are missing or the method is unknown."""
    quantization = quantization_of(config)
    method = method_of(quantization)
    if quantize and method:
        raise UsageError("--quantize", f"{model} is already quantized ({describe(quantization, None)})")
    if quantize:
        if quantize not in QUANTIZE_CHOICES:
            raise UsageError(f"--quantize {quantize}", "use 4bit or 8bit")
        _require("bitsandbytes", model)
        from transformers import BitsAndBytesConfig

        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=quantize == "4bit", load_in_8bit=quantize == "8bit", llm_int8_skip_modules=UNQUANTIZED,
            bnb_4bit_compute_dtype="float16" if device.startswith("cuda") else "float32", bnb_4bit_quant_type="nf4")}
    if method is None:
        return {}
    if method not in NEEDS:
        raise ModelLoadError(model, f"{method} quantization is not supported (GPTQ, AWQ and bitsandbytes are)")
    _require(method, model)
    cuda = device.startswith("cuda")
    if method == "gptq":
        from transformers import GPTQConfig

        return {"quantization_config": GPTQConfig.from_dict(
            {**quantization, "backend": "gptq_triton" if cuda else "gptq_torch"})}
    if method == "awq":
        from transformers import AwqConfig

        # the checkpoint's own list wins over one passed beside it: mend it in the config itself
        skip = sorted({*(quantization.get("modules_to_not_convert") or []), *UNQUANTIZED})
        config.quantization_config = {**quantization, "modules_to_not_convert": skip}
        return {"config": config, "quantization_config": AwqConfig.from_dict(
            {**config.quantization_config, "backend": "gemm_triton" if cuda else "torch_awq"})}
    return {}  # bitsandbytes checkpoints carry all their loader needs


def quantization_of(config) -> dict | None:
    """A loaded config's quantization_config, as a dict (None for float weights)."""
    found = getattr(config, "quantization_config", None)
    return found if isinstance(found, dict) or found is None else found.to_dict()


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _require(method: str, model: str) -> None:
    missing = [name for name in NEEDS[method] if not _installed(name)]
    if missing:
        raise ModelLoadError(model, f"{method.upper() if method != 'bitsandbytes' else method} weights need "
                                    f"{' and '.join(missing)}: {EXTRA}")


@contextlib.contextmanager
def quiet_loading(active: bool):
    """While a quantized model loads, what its loaders print (gptqmodel's banner and progress on stdout,
    warnings on stderr) is set aside, at the file-descriptor level so that C code is caught too; it goes
    to stderr with QWEN2VL_DEBUG=1, nowhere otherwise. An answer on stdout is never mixed with it."""
    if not active:
        yield
        return
    import tempfile

    from ..errors import debug_enabled

    os.environ.setdefault("GPTQMODEL_LOG_LEVEL", "WARN")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as aside:
        try:
            os.dup2(aside.fileno(), 1)
            os.dup2(aside.fileno(), 2)
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            if debug_enabled():
                aside.seek(0)
                sys.stderr.write(aside.read().decode(errors="replace"))


def eager(model) -> None:
    """gptqmodel's torch kernels wrap their dequantization in torch.compile when they are built: unwrap it
    (the first answer would wait tens of seconds for the compiler; eager is as fast on small batches)."""
    for module in model.modules():
        if "dequantize_weight" in vars(module):
            del module.dequantize_weight


def check_loading_info(model: str, info: dict) -> None:
    """Weights the checkpoint has that the model did not take, or the model needs that it lacks: a
    quantization mismatch (a vision tower quantized by mistake, say) that would answer garbage."""
    problems = []
    for key, label in (("missing_keys", "missing"), ("unexpected_keys", "unused"), ("mismatched_keys", "mis-shaped")):
        names = sorted(str(name if isinstance(name, str) else name[0]) for name in info.get(key) or [])
        if names:
            problems.append(f"{len(names)} {label} weights (e.g. {names[0]})")
    if problems:
        raise ModelLoadError(model, f"the checkpoint does not fit the model: {'; '.join(problems)}")
