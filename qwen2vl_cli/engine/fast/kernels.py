"""Fused elementwise kernels for the fast path, and the products of a decode step of few rows (1-16): Triton on
CUDA, the same arithmetic in torch elsewhere.

Each function rounds where HF's modules round (bf16/fp16 results of each torch op, float32 where HF
upcasts), so fusing changes launch counts, not answers (the few-row products sum in another order than cuBLAS,
so in bf16/fp16 only; float32 stays on cuBLAS). The torch versions run on the CPU (and where Triton is missing);
the Triton versions are checked against them by `benchmarks/gpu.py --check-kernels`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ---- torch reference versions (HF's arithmetic) ------------------------------------------------------
def add_rms_norm_torch(hidden, delta, weight, eps, inplace=False):  # the sum is a new tensor here either way
    if delta is not None:
        hidden = hidden + delta
    variance = hidden.float().pow(2).mean(-1, keepdim=True)
    return hidden, weight * (hidden.float() * torch.rsqrt(variance + eps)).to(hidden.dtype)


def rope_store_torch(qkv, positions, inv_freq, slot, keys, values, heads, kv_heads):
    batch, head_dim = qkv.shape[0], keys.shape[-1]
    freqs = positions[:, None].float() * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    cos, sin = angles.cos().to(qkv.dtype), angles.sin().to(qkv.dtype)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    q = qkv[:, :q_size].view(batch, heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(batch, kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(batch, kv_heads, head_dim)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    rows = torch.arange(batch, device=keys.device)
    keys[rows, :, slot] = k
    values[rows, :, slot] = v
    return q


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def rope_prefill_torch(qkv, cos, sin, heads, kv_heads):
    """[B, L, (heads + 2 kv) * hd] + merged M-RoPE cos/sin [B, L, hd] -> rotated q, k and v, [B, heads, L, hd]."""
    batch, length = qkv.shape[:2]
    head_dim = cos.shape[-1]
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    q = qkv[..., :q_size].view(batch, length, heads, head_dim).transpose(1, 2)
    k = qkv[..., q_size:q_size + kv_size].view(batch, length, kv_heads, head_dim).transpose(1, 2)
    v = qkv[..., q_size + kv_size:].view(batch, length, kv_heads, head_dim).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def silu_mul_torch(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def vision_qkv_torch(qkv, cos, sin, heads, length=None):
    """[seq, 3*dim] -> q, k (rotated in float32, as HF's apply_rotary_pos_emb_vision) and v, each
    [seq // length, heads, length, hd]: one row per image when all images have `length` patches."""
    seq = qkv.shape[0]
    length = length or seq
    q, k, v = qkv.reshape(seq, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
    q = _rotate(q.float(), cos, sin).to(qkv.dtype)
    k = _rotate(k.float(), cos, sin).to(qkv.dtype)
    return tuple(x.reshape(seq // length, length, heads, -1).transpose(1, 2) for x in (q, k, v))


def decode_attention_torch(q, keys, values, mask, slot):
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def quick_gelu_torch(x):
    return x * torch.sigmoid(1.702 * x)


# ---- dispatch ----------------------------------------------------------------------------------------
_broken: list[str] = []  # why Triton failed, once; everything then runs the torch versions


def _run(name: str, fallback, *args, triton_ok: bool = True):
    """The Triton version of `name` for CUDA tensors, else (or if Triton cannot compile here) `fallback`."""
    if triton_ok and not _broken and args[0].is_cuda and triton_available():
        try:
            from . import _triton

            return getattr(_triton, name)(*args)
        except torch.cuda.OutOfMemoryError:
            raise  # the caller's to handle (the batch runner splits the batch)
        except Exception as exc:  # noqa: BLE001 - a missing compiler or an old GPU: stay correct, run slower
            if torch.cuda.is_current_stream_capturing():
                raise  # the CUDA-graph capture failed, not Triton: the capture's caller falls back
            import sys

            _broken.append(f"{type(exc).__name__}: {exc}".splitlines()[0])
            print(f"qwen2vl: warning: fused GPU kernels unavailable ({_broken[0]}); using plain torch ops",
                  file=sys.stderr)
    return fallback(*args)


def _triton_head_dim(n: int) -> bool:  # a power of two the kernels tile (tl.dot needs >= 16)
    return n >= 16 and n & (n - 1) == 0


def add_rms_norm(hidden, delta, weight, eps, inplace=False):
    """(hidden + delta, RMSNorm(hidden + delta) * weight); `inplace` lets the sum overwrite `hidden`."""
    return _run("add_rms_norm", add_rms_norm_torch, hidden, delta, weight, eps, inplace)


def rope_store(qkv, positions, inv_freq, slot, keys, values, heads, kv_heads):
    """Rotate the step's q and k (text positions), write each row's k and v at its `slot` [B] of the cache;
    q is [B, heads, hd]."""
    return _run("rope_store", rope_store_torch, qkv, positions, inv_freq, slot, keys, values, heads, kv_heads,
                triton_ok=_triton_head_dim(keys.shape[-1]))


def rope_prefill(qkv, cos, sin, heads, kv_heads):
    return _run("rope_prefill", rope_prefill_torch, qkv, cos, sin, heads, kv_heads,
                triton_ok=_triton_head_dim(cos.shape[-1]))


def silu_mul(gate_up):
    return _run("silu_mul", silu_mul_torch, gate_up)


def vision_qkv(qkv, cos, sin, heads, length=None):
    return _run("vision_qkv", vision_qkv_torch, qkv, cos, sin, heads, length)


def quick_gelu(x):
    return _run("quick_gelu", quick_gelu_torch, x)


def decode_attention(q, keys, values, mask, slot):
    """One decode step's attention: q [B, kv_heads, groups, hd] (the query heads that share a K/V head)
    against the static cache [B, kv_heads, size, hd], additive mask [B, 1, 1, size], each row's keys 0..slot
    written (slot [B])."""
    return _run("decode_attention", decode_attention_torch, q, keys, values, mask, slot,
                triton_ok=_triton_head_dim(q.shape[-1]))


FEW_ROWS = 16  # at most this many rows go to `linear_rows` (its tile's height; tl.dot takes 16 or more) ...
WIDE = 8192  # ... for a product at least this wide (narrower ones: too few tiles of N; cuBLAS is as fast)


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias). On CUDA, 16-bit weights read faster than by cuBLAS's choices for few rows: one row
    (a decode step at batch 1) through a GEMV, 2-16 rows of a wide product (gate/up, lm_head) through one tensor-core
    tile of rows; float32 stays on cuBLAS (its answers are the seed recipe's, checked token for token)."""
    rows = x.numel() // x.shape[-1]
    fits = (x.dtype == weight.dtype and weight.dtype in (torch.bfloat16, torch.float16) and weight.is_contiguous()
            and (bias is None or bias.is_contiguous()))
    if rows == 1:
        return _run("linear_row", F.linear, x, weight, bias, triton_ok=fits)
    wide = rows <= FEW_ROWS and weight.shape[0] >= WIDE
    return _run("linear_rows", F.linear, x, weight, bias, triton_ok=fits and wide)


def quant_matmul(x, fused):
    """x @ the dequantized weights of quantized.FusedQuantized's parts, side by side (their modules' forwards
    where Triton is missing)."""
    return _run("quant_matmul", lambda x, fused: fused.stock(x), x, fused)
