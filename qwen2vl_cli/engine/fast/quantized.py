"""Quantized projections on the fast path: GPTQ (4- and 8-bit) and AWQ (4-bit) layers, as gptqmodel loads them.

Their own kernels dequantize the whole weight matrix and then multiply (right for a long prompt, slow for a
decode step, which would read more bytes than float weights). `fuse` reads their packed buffers in place and
multiplies by one fused dequantizing kernel (_triton.quant_matmul) instead, for decode-sized inputs on CUDA:
q/k/v in one launch, gate/up in one, no copy of any weight. Longer inputs, the CPU, and any layout this does
not know take the modules' own forwards.

Nothing is assumed silently: at load, on CUDA, each fused group is run against its modules on a probe input
(which also settles how the zeros are stored: GPTQ "v1" keeps zero - 1); where they differ, the group keeps
the modules' forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FUSED_ROWS = 64  # inputs of up to this many rows (decode steps) take the fused kernel
PROBE_TOLERANCE = 2e-3  # relative error against the modules' own forward (float16 rounding and sum order)


@dataclass(frozen=True)
class Part:
    """One layer's packed buffers, as its library holds them."""
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    width: int  # output features


class FusedQuantized:
    """A function of the input over one or more quantized modules sharing their input (q/k/v, gate/up): their
    outputs side by side, by the fused kernel where it applies, else by the modules' forwards."""

    def __init__(self, modules, parts: list[Part] | None, bits: int = 0, awq: bool = False, group: int = 0):
        self.modules, self.parts = list(modules), parts
        self.bits, self.awq, self.group = bits, awq, group
        self.block_k = min(group, 128)
        self.zero = 0  # added to every stored zero (settled by `probe`)
        self.width = sum(part.width for part in parts) if parts else 0
        biases = [getattr(module, "bias", None) for module in self.modules]
        self.bias = torch.cat(biases).contiguous() if parts and all(b is not None for b in biases) else None
        if parts and any(b is not None for b in biases) and self.bias is None:
            self.parts = None  # some parts with a bias, some without: not worth a kernel variant

    def stock(self, x):
        outputs = [module(x) for module in self.modules]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, -1)

    def fused_applies(self, x) -> bool:
        return bool(self.parts) and x.is_cuda and x.numel() // x.shape[-1] <= FUSED_ROWS

    def __call__(self, x):
        if not self.fused_applies(x):
            return self.stock(x)
        from . import kernels

        return kernels.quant_matmul(x, self)

    @torch.inference_mode()
    def probe(self, kernel=None) -> bool:
        """Run the fused kernel (or `kernel`(x, self)) against the modules on a probe input, with the zeros as
        stored and as GPTQ "v1" stores them (zero - 1); keep the one that agrees. Where neither does, or the
        kernel fails, False, and the modules' forwards from then on."""
        if not self.parts:
            return False
        if kernel is None:
            from ._triton import quant_matmul as kernel
        scales = self.parts[0].scales
        generator = torch.Generator(device="cpu").manual_seed(0)
        x = (torch.randn(3, self.modules[0].in_features, generator=generator) * 0.5).to(scales.device, scales.dtype)
        reference = self.stock(x).float()
        for zero in (0, 1):
            self.zero = zero
            try:
                error = (kernel(x, self).float() - reference).norm() / reference.norm().clamp_min(1e-12)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception:  # noqa: BLE001 - no Triton, or it cannot compile this: the modules' forwards
                break
            if float(error) <= PROBE_TOLERANCE:
                return True
        self.parts = None
        return False


def fuse(modules) -> FusedQuantized:
    """The modules (one layer's, sharing their input) as one function; the fused kernel's view of them where
    they are all GPTQ/AWQ layers of one format it reads (`probe` still has to confirm it)."""
    parts = [_part(module) for module in modules]
    formats = {_format(module) for module in modules}
    if any(part is None for part in parts) or len(formats) != 1 or None in formats:
        return FusedQuantized(modules, None)
    bits, awq, group = formats.pop()
    return FusedQuantized(modules, parts, bits, awq, group)


def _format(module) -> tuple[int, bool, int] | None:
    """(bits, AWQ layout?, group size) of a module the kernel reads, else None."""
    bits, k = getattr(module, "bits", None), getattr(module, "in_features", None)
    qweight, qzeros, scales = (getattr(module, name, None) for name in ("qweight", "qzeros", "scales"))
    if not (isinstance(bits, int) and isinstance(k, int) and all(isinstance(t, torch.Tensor) for t in
                                                                  (qweight, qzeros, scales))):
        return None
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or not scales.is_floating_point():
        return None
    per = 32 // bits if bits in (4, 8) else 0
    groups, width = scales.shape
    if not per or groups == 0 or k % groups or width % per or qzeros.shape != (groups, width // per):
        return None
    group = k // groups
    if qweight.shape == (k, width // per) and bits == 4:
        awq = True
    elif qweight.shape == (k // per, width) and k % per == 0:
        awq = False
        g_idx = getattr(module, "g_idx", None)
        if isinstance(g_idx, torch.Tensor) and not torch.equal(
                g_idx.long().cpu(), torch.arange(k) // group):
            return None  # act-order checkpoints permute their groups: the modules' forward
    else:
        return None
    if group < 16 or group & (group - 1):  # the kernel's K tiles (a power of two) lie within one group
        return None
    return bits, awq, group


def _part(module) -> Part | None:
    buffers = [getattr(module, name, None) for name in ("qweight", "qzeros", "scales")]
    if not all(isinstance(t, torch.Tensor) and t.dim() == 2 and t.is_contiguous() for t in buffers):
        return None
    return Part(*buffers, width=buffers[2].shape[1])
