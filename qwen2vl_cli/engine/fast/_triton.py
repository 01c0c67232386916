"""Triton versions of kernels.py's functions (CUDA only; imported on first use).

Sizes that bound only the row dimension (prompt and image lengths) are not specialized on, so the
prefill kernels compile once, not again for each new batch shape; bounds of the contiguous dimension
stay specialized (their divisibility decides how wide the loads are).

Every intermediate that HF's torch ops round to the model dtype is rounded here too (`.to(dt)`), and
float32 work stays float32, so results match the torch versions up to the order of a row's sum.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .kernels import FEW_ROWS


@triton.jit
def _rounded(x, dt: tl.constexpr):
    """x (float32) rounded to `dt` and back, as a torch op with a `dt` result rounds. For bf16 this is done
    with integer arithmetic: the compiler folds a plain float round trip away (seen in the rotary kernels)."""
    if dt == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000  # round to nearest, ties to even
        return bits.to(tl.float32, bitcast=True)
    return x.to(dt).to(tl.float32)


@triton.jit
def _add_rms_kernel(h_ptr, d_ptr, w_ptr, s_ptr, o_ptr, n, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    dt = h_ptr.dtype.element_ty
    h = tl.load(h_ptr + row * n + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * n + cols, mask=mask, other=0.0)
        h = (h.to(tl.float32) + d.to(tl.float32)).to(dt)
        tl.store(s_ptr + row * n + cols, h, mask=mask)
    x = h.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / n
    y = (x * libdevice.rsqrt(variance + eps)).to(dt)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(o_ptr + row * n + cols, (w.to(tl.float32) * y.to(tl.float32)).to(o_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(hidden, delta, weight, eps, inplace=False):
    n = hidden.shape[-1]
    hidden = hidden.contiguous()
    total = hidden if inplace or delta is None else torch.empty_like(hidden)
    out = torch.empty_like(hidden)
    block = triton.next_power_of_2(n)
    _add_rms_kernel[(hidden.numel() // n,)](
        hidden, delta.contiguous() if delta is not None else hidden, weight, total, out, n, eps,
        HAS_DELTA=delta is not None, BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return total, out


@triton.jit
def _rope_store_kernel(qkv_ptr, pos_ptr, inv_ptr, slot_ptr, q_ptr, k_ptr, v_ptr, qkv_row, c_b, c_h, c_s,
                       HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    HALF: tl.constexpr = HD // 2
    dt = q_ptr.dtype.element_ty
    d = tl.arange(0, HD)
    angle = tl.load(pos_ptr + b).to(tl.float32) * tl.load(inv_ptr + (d % HALF))
    cos = _rounded(libdevice.cos(angle), dt)
    sin = _rounded(libdevice.sin(angle), dt)
    base = qkv_ptr + b * qkv_row + h * HD
    x = tl.load(base + d).to(tl.float32)
    partner = tl.load(base + (d + HALF) % HD).to(tl.float32)
    rotated = tl.where(d < HALF, -partner, partner)
    out = (_rounded(x * cos, dt) + _rounded(rotated * sin, dt)).to(dt)
    if h < HEADS:
        tl.store(q_ptr + (b * HEADS + h) * HD + d, out)
    else:
        kv = h - HEADS
        offset = b * c_b + kv * c_h + tl.load(slot_ptr + b) * c_s + d
        tl.store(k_ptr + offset, out)
        tl.store(v_ptr + offset, tl.load(qkv_ptr + b * qkv_row + (HEADS + KV_HEADS + kv) * HD + d))


def rope_store(qkv, positions, inv_freq, slot, keys, values, heads, kv_heads):
    batch, head_dim = qkv.shape[0], keys.shape[-1]
    qkv = qkv.reshape(batch, -1)
    q = torch.empty((batch, heads, head_dim), device=qkv.device, dtype=qkv.dtype)
    _rope_store_kernel[(batch, heads + kv_heads)](
        qkv, positions, inv_freq, slot, q, keys, values, qkv.stride(0), keys.stride(0), keys.stride(1),
        keys.stride(2), HEADS=heads, KV_HEADS=kv_heads, HD=head_dim, num_warps=1)
    return q


@triton.jit(do_not_specialize=["rows", "length"])  # row-dimension bounds only
def _rope_prefill_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, rows, length,
                         HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HD: tl.constexpr, BLOCK_S: tl.constexpr):
    """Prompt tokens: rotate q and k (HF's bf16 rounding) and lay q, k, v out as [B, heads, L, hd]."""
    r = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    h = tl.program_id(1)
    HALF: tl.constexpr = HD // 2
    d = tl.arange(0, HD)
    inside = (r < rows)[:, None]
    dt = q_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + r[:, None] * HD + d[None, :], mask=inside, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + r[:, None] * HD + d[None, :], mask=inside, other=0.0).to(tl.float32)
    base = qkv_ptr + r[:, None] * ((HEADS + 2 * KV_HEADS) * HD) + h * HD
    x = tl.load(base + d[None, :], mask=inside, other=0.0).to(tl.float32)
    partner = tl.load(base + ((d + HALF) % HD)[None, :], mask=inside, other=0.0).to(tl.float32)
    rotated = tl.where((d < HALF)[None, :], -partner, partner)
    out = (_rounded(x * cos, dt) + _rounded(rotated * sin, dt)).to(dt)
    b, t = r // length, r % length
    if h < HEADS:
        tl.store(q_ptr + ((b * HEADS + h) * length + t)[:, None] * HD + d[None, :], out, mask=inside)
    else:
        kv = h - HEADS
        offset = ((b * KV_HEADS + kv) * length + t)[:, None] * HD + d[None, :]
        tl.store(k_ptr + offset, out, mask=inside)
        tl.store(v_ptr + offset, tl.load(base + KV_HEADS * HD + d[None, :], mask=inside, other=0.0), mask=inside)


def rope_prefill(qkv, cos, sin, heads, kv_heads):
    batch, length = qkv.shape[:2]
    head_dim = cos.shape[-1]
    q = torch.empty((batch, heads, length, head_dim), device=qkv.device, dtype=qkv.dtype)
    k = torch.empty((batch, kv_heads, length, head_dim), device=qkv.device, dtype=qkv.dtype)
    v = torch.empty_like(k)
    block_s = 16
    rows = batch * length
    _rope_prefill_kernel[(triton.cdiv(rows, block_s), heads + kv_heads)](
        qkv.contiguous(), cos.contiguous(), sin.contiguous(), q, k, v, rows, length,
        HEADS=heads, KV_HEADS=kv_heads, HD=head_dim, BLOCK_S=block_s, num_warps=4)
    return q, k, v


@triton.jit
def _silu_mul_kernel(gu_ptr, o_ptr, n, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    dt = o_ptr.dtype.element_ty
    g = tl.load(gu_ptr + row * 2 * n + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * 2 * n + n + cols, mask=mask, other=0.0).to(tl.float32)
    s = _rounded(g / (1.0 + libdevice.exp(-g)), dt)
    tl.store(o_ptr + row * n + cols, (s * u).to(dt), mask=mask)


def silu_mul(gate_up):
    n = gate_up.shape[-1] // 2
    gate_up = gate_up.contiguous()
    out = torch.empty((*gate_up.shape[:-1], n), device=gate_up.device, dtype=gate_up.dtype)
    block = 1024
    _silu_mul_kernel[(gate_up.numel() // (2 * n), triton.cdiv(n, block))](gate_up, out, n, BLOCK=block, num_warps=4)
    return out


@triton.jit(do_not_specialize=["seq", "length"])  # row-dimension bounds only
def _vision_qkv_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, seq, length,
                       HEADS: tl.constexpr, HD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    h = tl.program_id(1)
    HALF: tl.constexpr = HD // 2
    d = tl.arange(0, BLOCK_D)
    mask = (rows < seq)[:, None] & (d < HD)[None, :]
    dt = q_ptr.dtype.element_ty
    cos = tl.load(cos_ptr + rows[:, None] * HD + d[None, :], mask=mask, other=0.0)
    sin = tl.load(sin_ptr + rows[:, None] * HD + d[None, :], mask=mask, other=0.0)
    src = qkv_ptr + rows[:, None] * (3 * HEADS * HD) + h * HD
    partner = tl.where(d < HALF, d + HALF, d - HALF)[None, :]
    sign = tl.where(d < HALF, -1.0, 1.0)[None, :]
    dst = (((rows // length) * HEADS + h) * length + rows % length)[:, None] * HD + d[None, :]
    q = tl.load(src + d[None, :], mask=mask, other=0.0).to(tl.float32)
    qp = tl.load(src + partner, mask=mask, other=0.0).to(tl.float32) * sign
    tl.store(q_ptr + dst, (q * cos + qp * sin).to(dt), mask=mask)
    k = tl.load(src + HEADS * HD + d[None, :], mask=mask, other=0.0).to(tl.float32)
    kp = tl.load(src + HEADS * HD + partner, mask=mask, other=0.0).to(tl.float32) * sign
    tl.store(k_ptr + dst, (k * cos + kp * sin).to(dt), mask=mask)
    tl.store(v_ptr + dst, tl.load(src + 2 * HEADS * HD + d[None, :], mask=mask, other=0.0), mask=mask)


def vision_qkv(qkv, cos, sin, heads, length=None):
    """q, k, v as [count, heads, length, hd] (count = seq // length; one image when length is None)."""
    seq = qkv.shape[0]
    head_dim = qkv.shape[1] // (3 * heads)
    length = length or seq
    shape = (seq // length, heads, length, head_dim)
    q, k, v = (torch.empty(shape, device=qkv.device, dtype=qkv.dtype) for _ in range(3))
    block_s = 32
    _vision_qkv_kernel[(triton.cdiv(seq, block_s), heads)](
        qkv.contiguous(), cos.float().contiguous(), sin.float().contiguous(), q, k, v, seq, length,
        HEADS=heads, HD=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_S=block_s, num_warps=4)
    return q, k, v


@triton.jit
def _quick_gelu_kernel(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    dt = o_ptr.dtype.element_ty
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    scaled = _rounded(1.702 * x, dt)
    s = _rounded(1.0 / (1.0 + libdevice.exp(-scaled)), dt)
    tl.store(o_ptr + offsets, (x * s).to(dt), mask=mask)


def quick_gelu(x):
    x = x.contiguous()
    out = torch.empty_like(x)
    block = 2048
    _quick_gelu_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), BLOCK=block, num_warps=8)
    return out


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, slot_ptr, out_ptr, ml_ptr, scale, splits,
                             k_b, k_h, k_s, mask_b,
                             KV_HEADS: tl.constexpr, GROUPS: tl.constexpr, G_PAD: tl.constexpr, HD: tl.constexpr,
                             SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    """One (row, K/V head, stretch of the cache): the head's query rows against keys 0..slot of the stretch."""
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.program_id(2)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, HD)
    q = tl.load(q_ptr + ((b * KV_HEADS + h) * GROUPS + g[:, None]) * HD + d[None, :], mask=(g < GROUPS)[:, None],
                other=0.0)
    visible = tl.load(slot_ptr + b) + 1
    m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, HD), tl.float32)
    start = s * SPLIT
    stop = tl.minimum(start + SPLIT, visible)
    for n0 in range(start, stop, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        inside = n < stop
        k = tl.load(k_ptr + b * k_b + h * k_h + n[:, None] * k_s + d[None, :], mask=inside[:, None], other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        bias = tl.load(mask_ptr + b * mask_b + n, mask=inside, other=float("-inf")).to(tl.float32)
        scores = scores * scale + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_ptr + b * k_b + h * k_h + n[:, None] * k_s + d[None, :], mask=inside[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    row = (b * KV_HEADS + h) * splits + s
    tl.store(out_ptr + (row * G_PAD + g[:, None]) * HD + d[None, :], acc)
    tl.store(ml_ptr + (row * 2) * G_PAD + g, m_i)
    tl.store(ml_ptr + (row * 2 + 1) * G_PAD + g, l_i)


@triton.jit
def _decode_combine_kernel(out_ptr, ml_ptr, o_ptr, splits, KV_HEADS: tl.constexpr, GROUPS: tl.constexpr,
                           G_PAD: tl.constexpr, HD: tl.constexpr, S_PAD: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    gq = tl.program_id(2)
    s = tl.arange(0, S_PAD)
    d = tl.arange(0, HD)
    row = (b * KV_HEADS + h) * splits + s
    m = tl.load(ml_ptr + (row * 2) * G_PAD + gq, mask=s < splits, other=float("-inf"))
    l = tl.load(ml_ptr + (row * 2 + 1) * G_PAD + gq, mask=s < splits, other=0.0)
    top = tl.max(m, axis=0)
    weight = tl.exp(m - top)
    acc = tl.load(out_ptr + ((row * G_PAD + gq) * HD)[:, None] + d[None, :], mask=(s < splits)[:, None], other=0.0)
    result = tl.sum(acc * weight[:, None], axis=0) / tl.sum(l * weight, axis=0)
    tl.store(o_ptr + ((b * KV_HEADS + h) * GROUPS + gq) * HD + d, result.to(o_ptr.dtype.element_ty))


def decode_attention(q, keys, values, mask, slot):
    """q [B, kv, groups, hd] against each row's cache slots 0..slot[b] (additive mask [B, 1, 1, size])
    -> [B, kv, groups, hd].

    Split over the cache (flash-decoding): each program takes one stretch, a second kernel combines them,
    so even batch 1 with 2 K/V heads spreads over the whole GPU.
    """
    batch, kv_heads, groups, head_dim = q.shape
    size = keys.shape[2]
    block_n = 64
    split = 64 if batch * kv_heads * triton.cdiv(size, 64) <= 2048 else 256
    splits = triton.cdiv(size, split)
    g_pad = max(16, triton.next_power_of_2(groups))
    partial = torch.empty((batch * kv_heads * splits, g_pad, head_dim), device=q.device, dtype=torch.float32)
    ml = torch.empty((batch * kv_heads * splits, 2, g_pad), device=q.device, dtype=torch.float32)
    q = q.contiguous()
    _decode_attention_kernel[(batch, kv_heads, splits)](
        q, keys, values, mask, slot, partial, ml, head_dim ** -0.5, splits,
        keys.stride(0), keys.stride(1), keys.stride(2), mask.stride(0),
        KV_HEADS=kv_heads, GROUPS=groups, G_PAD=g_pad, HD=head_dim, SPLIT=split, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32, num_warps=4)
    out = torch.empty_like(q)
    _decode_combine_kernel[(batch, kv_heads, groups)](
        partial, ml, out, splits, KV_HEADS=kv_heads, GROUPS=groups, G_PAD=g_pad, HD=head_dim,
        S_PAD=triton.next_power_of_2(splits), num_warps=4)
    return out


# ---- one row's projections (a decode step at batch 1): 16-bit weights read once, in order --------------
# cuBLAS's picks for one row read a 2B layer's weights at 0.9-2.6 TB/s on an H100 (the small projections pay a
# split-K reduction or a tile wider than the work); this reads each weight row along K, at 1.3-3.2 TB/s. The tile
# from probe sweeps on an H100 (2026-12-07; us a call, cuBLAS -> this): q/k/v 5.99 -> 4.22, o 5.30 -> 3.61, gate/up
# 21.24 -> 19.88, down 14.13 -> 11.21, lm_head 159.3 -> 147.6: 0.23 ms of a 2.02 ms step.
LINEAR_ROW = {"BLOCK_N": 2, "BLOCK_K": 1024, "num_warps": 4}


@triton.jit
def _linear_row_kernel(x_ptr, w_ptr, b_ptr, out_ptr, N, K, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """out [N] = w [N, K] @ x [K] (+ bias, added in float32 before the one rounding, as cuBLAS's epilogue does).
    Products accumulate elementwise in float32 and are summed across K once, at the end."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    kk = tl.arange(0, BLOCK_K)
    rows = w_ptr + n[:, None].to(tl.int64) * K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        if EVEN_K:
            w = tl.load(rows + k[None, :], mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptr + k)
        else:
            w = tl.load(rows + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0,
                        eviction_policy="evict_first")
            x = tl.load(x_ptr + k, mask=k < K, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    out = tl.sum(acc, axis=1)
    if HAS_BIAS:
        out += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + n, out.to(out_ptr.dtype.element_ty), mask=n_ok)


def linear_row(x, weight, bias=None):
    """F.linear(x, weight, bias) for one row x [..., K] (one element before K) and a contiguous weight [N, K]."""
    n, k = weight.shape
    x = x.contiguous()
    out = torch.empty((*x.shape[:-1], n), device=x.device, dtype=x.dtype)
    block_n, block_k = LINEAR_ROW["BLOCK_N"], LINEAR_ROW["BLOCK_K"]
    _linear_row_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else out, out, n, k, HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_K=block_k, EVEN_K=k % block_k == 0, num_warps=LINEAR_ROW["num_warps"])
    return out


# ---- a few rows' wide projections (2-16 rows: xargs, a few server clients): one 16-row tensor-core tile --------
# cuBLAS's picks for 2-16 rows of the 2B's gate/up (17920 x 1536) and lm_head read them at 2.3-2.8 TB/s on an H100;
# this reads each weight tile once for all rows, at 2.5-3.0 (probe sweep, 2026-12-07, `benchmarks/gemv.py --rows`;
# us a call at 2 / 16 rows, cuBLAS -> this: gate/up 22.9 / 23.6 -> 21.2 / 21.8, lm_head 166 / 171 -> 155 / 161).
# The narrower products (q/k/v, o, down: too few 64-wide tiles of N for the GPU) do not gain: they stay on cuBLAS
# (`kernels.linear` decides).
LINEAR_ROWS = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}


@triton.jit
def _linear_rows_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [M, N] = x [M, K] @ w [N, K].T (+ bias in float32) for M <= ROWS: the rows padded to one tl.dot tile,
    products accumulated in float32 along K and rounded once."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    m = tl.arange(0, ROWS)
    m_ok = m < M
    kk = tl.arange(0, BLOCK_K)
    rows = w_ptr + n[:, None].to(tl.int64) * K
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        w = tl.load(rows + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0.0, eviction_policy="evict_first")
        x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + m[:, None] * N + n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def linear_rows(x, weight, bias=None):
    """F.linear(x, weight, bias) for x [..., K] of at most kernels.FEW_ROWS rows and a contiguous weight [N, K]."""
    n, k = weight.shape
    x = x.contiguous()
    out = torch.empty((*x.shape[:-1], n), device=x.device, dtype=x.dtype)
    block_n = LINEAR_ROWS["BLOCK_N"]
    _linear_rows_kernel[(triton.cdiv(n, block_n),)](
        x, weight, bias if bias is not None else out, out, x.numel() // k, n, k, HAS_BIAS=bias is not None,
        ROWS=FEW_ROWS, BLOCK_N=block_n, BLOCK_K=LINEAR_ROWS["BLOCK_K"], num_warps=LINEAR_ROWS["num_warps"],
        num_stages=LINEAR_ROWS["num_stages"])
    return out


# ---- quantized projections (GPTQ 4/8-bit, AWQ 4-bit), read in place: see quantized.py -----------------
@triton.jit
def _dequantized(qw_ptr, qz_ptr, s_ptr, k0, n0, N, dt: tl.constexpr, BITS: tl.constexpr, AWQ: tl.constexpr,
                 ZERO: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows k0.. and columns n0.. of one packed weight, [BLOCK_K, BLOCK_N] in `dt`: (q - zero) * scale, as the
    libraries' dequantizers compute it (float32, rounded once). GPTQ packs q along K (qweight [K/per, N]), AWQ
    along N in its interleaved order (qweight [K, N/per]); both pack zeros along N ([groups, N/per])."""
    MAXQ: tl.constexpr = (1 << BITS) - 1
    PER: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_N // PER
    lane = tl.arange(0, PER)
    if AWQ:
        column_shift = ((lane // 2) + (lane % 2) * (PER // 2)) * BITS  # column c sits in nibble c//2 + 4*(c%2)
    else:
        column_shift = lane * BITS
    group = k0 // GROUP
    words = n0 // PER + tl.arange(0, WORDS)
    words_ok = words < N // PER
    zeros = tl.load(qz_ptr + group * (N // PER) + words, mask=words_ok, other=0)
    zero = tl.reshape((zeros[:, None] >> column_shift[None, :]) & MAXQ, (BLOCK_N,)) + ZERO
    if AWQ:
        k = k0 + tl.arange(0, BLOCK_K)
        packed = tl.load(qw_ptr + k[:, None] * (N // PER) + words[None, :], mask=words_ok[None, :], other=0)
        q = tl.reshape((packed[:, :, None] >> column_shift[None, None, :]) & MAXQ, (BLOCK_K, BLOCK_N))
    else:
        rows = k0 // PER + tl.arange(0, BLOCK_K // PER)
        n = n0 + tl.arange(0, BLOCK_N)
        packed = tl.load(qw_ptr + rows[:, None] * N + n[None, :], mask=(n < N)[None, :], other=0)
        q = tl.reshape((packed[:, None, :] >> (lane * BITS)[None, :, None]) & MAXQ, (BLOCK_K, BLOCK_N))
    n = n0 + tl.arange(0, BLOCK_N)
    scale = tl.load(s_ptr + group * N + n, mask=n < N, other=0.0).to(tl.float32)
    return ((q - zero[None, :]).to(tl.float32) * scale[None, :]).to(dt)


@triton.jit
def _part_of(qw0, qz0, s0, n_0, qw1, qz1, s1, n_1, qw2, qz2, s2, n_2, blocks0, blocks1, BLOCK_N: tl.constexpr):
    """The part (of up to three side by side) this program's column block lies in: its buffers, width, first
    column within it and first column of the output."""
    block = tl.program_id(0)
    if block < blocks0:
        qw, qz, s, N, n0, c0 = qw0, qz0, s0, n_0, block * BLOCK_N, 0
    elif block < blocks0 + blocks1:
        qw, qz, s, N, n0, c0 = qw1, qz1, s1, n_1, (block - blocks0) * BLOCK_N, n_0
    else:
        qw, qz, s, N, n0, c0 = qw2, qz2, s2, n_2, (block - blocks0 - blocks1) * BLOCK_N, n_0 + n_1
    return qw, qz, s, N, n0, c0


@triton.jit
def _from_magic(q):
    """Small non-negative integers q (< 2**23) as float32 plus 2**23, by one OR and a bitcast: the integer-to-float
    conversion runs at a quarter of the FMA rate, and a decode step converts every weight once."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _gemv_store(acc, out_ptr, partial_ptr, bias_ptr, split, total, out_columns, ok, HAS_BIAS: tl.constexpr,
                PARTIAL: tl.constexpr):
    if PARTIAL:
        tl.store(partial_ptr + split * total + out_columns, acc, mask=ok)
    else:
        dt = out_ptr.dtype.element_ty
        out = acc.to(dt).to(tl.float32)  # the product rounds, then the bias adds (as the modules do)
        if HAS_BIAS:
            out += tl.load(bias_ptr + out_columns, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_columns, out.to(dt), mask=ok)


@triton.jit
def _quant_gemv_kernel(x_ptr, out_ptr, partial_ptr, bias_ptr, K, total, k_split,
                       qw0, qz0, s0, n_0, qw1, qz1, s1, n_1, qw2, qz2, s2, n_2, blocks0, blocks1,
                       BITS: tl.constexpr, AWQ: tl.constexpr, ZERO: tl.constexpr, GROUP: tl.constexpr,
                       HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       AWQ_ROWS: tl.constexpr):
    """One row (a decode step at batch 1): x [K] against the parts, as _quant_matmul_kernel, on the FMA units.
    Products accumulate elementwise in a register tile and are summed across K once, at the end (a reduction
    across threads for every tile cost more than the arithmetic); weights are unpacked in the order they are
    stored (GPTQ: [K/per, N], values of a word along K; AWQ: [K, N/per], values of a word along N, interleaved)."""
    qw, qz, s, N, n0, c0 = _part_of(qw0, qz0, s0, n_0, qw1, qz1, s1, n_1, qw2, qz2, s2, n_2, blocks0, blocks1, BLOCK_N)
    MAXQ: tl.constexpr = (1 << BITS) - 1
    PER: tl.constexpr = 32 // BITS
    MAGIC: tl.constexpr = 8388608.0  # 2**23, what _from_magic adds
    split = tl.program_id(2)
    if AWQ:
        WORDS: tl.constexpr = BLOCK_N // PER
        lane = tl.arange(0, PER)
        shift = ((lane // 2) + (lane % 2) * (PER // 2)) * BITS  # column c sits in nibble c//2 + 4*(c%2)
        word = n0 // PER + tl.arange(0, WORDS)
        word_ok = word < N // PER
        columns = word[:, None] * PER + lane[None, :]  # [WORDS, PER]
        column_ok = columns < N
        acc = tl.zeros((AWQ_ROWS, WORDS, PER), dtype=tl.float32)
        for k0 in range(split * k_split, (split + 1) * k_split, AWQ_ROWS):  # AWQ_ROWS divides the group
            group = k0 // GROUP
            zeros = tl.load(qz + group * (N // PER) + word, mask=word_ok, other=0)
            zero = _from_magic(((zeros[:, None] >> shift[None, :]) & MAXQ) + ZERO)
            scale = tl.load(s + group * N + columns, mask=column_ok, other=0.0).to(tl.float32)
            k = k0 + tl.arange(0, AWQ_ROWS)
            xk = tl.load(x_ptr + k).to(tl.float32)
            packed = tl.load(qw + k[:, None] * (N // PER) + word[None, :], mask=word_ok[None, :], other=0)
            w = (_from_magic((packed[:, :, None] >> shift[None, None, :]) & MAXQ) - zero[None, :, :]) * scale[None]
            acc += xk[:, None, None] * w
        _gemv_store(tl.sum(acc, axis=0), out_ptr, partial_ptr, bias_ptr, split, total, c0 + columns, column_ok,
                    HAS_BIAS, PARTIAL)
    else:
        ROWS: tl.constexpr = BLOCK_K // PER  # packed rows a tile: one group (BLOCK_K divides it)
        r = tl.arange(0, ROWS)
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < N
        zero_shift = (n % PER) * BITS
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        for k0 in range(split * k_split, (split + 1) * k_split, BLOCK_K):
            group = k0 // GROUP
            zeros = tl.load(qz + group * (N // PER) + n // PER, mask=n_ok, other=0)
            zero = _from_magic(((zeros >> zero_shift) & MAXQ) + ZERO)
            scale = tl.load(s + group * N + n, mask=n_ok, other=0.0).to(tl.float32)
            packed = tl.load(qw + (k0 // PER + r)[:, None] * N + n[None, :], mask=n_ok[None, :], other=0)
            tile = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
            for j in tl.static_range(PER):  # value j of each word: input k0 + PER * r + j
                xj = tl.load(x_ptr + k0 + r * PER + j).to(tl.float32)
                tile += xj[:, None] * (_from_magic((packed >> (j * BITS)) & MAXQ) - zero[None, :])
            acc += tile * scale[None, :]  # sum_k x_k (q_kn - z_n) s_n: the scale once a group
        _gemv_store(tl.sum(acc, axis=0), out_ptr, partial_ptr, bias_ptr, split, total, c0 + n, n_ok, HAS_BIAS,
                    PARTIAL)


@triton.jit
def _quant_matmul_kernel(x_ptr, out_ptr, partial_ptr, bias_ptr, M, K, total, k_split,
                         qw0, qz0, s0, n_0, qw1, qz1, s1, n_1, qw2, qz2, s2, n_2, blocks0, blocks1,
                         BITS: tl.constexpr, AWQ: tl.constexpr, ZERO: tl.constexpr, GROUP: tl.constexpr,
                         HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[:, parts' columns] = x @ dequantized(part).T for up to three parts sharing K (q/k/v, gate/up): one
    launch. The grid is (column blocks of all parts, row blocks, K splits); with splits, float32 partial sums go
    to `partial_ptr` [splits, M, total] for _split_sum_kernel, else the result (+ bias) to `out_ptr`."""
    qw, qz, s, N, n0, c0 = _part_of(qw0, qz0, s0, n_0, qw1, qz1, s1, n_1, qw2, qz2, s2, n_2, blocks0, blocks1, BLOCK_N)
    dt = x_ptr.dtype.element_ty
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    kk = tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(split * k_split, (split + 1) * k_split, BLOCK_K):
        x = tl.load(x_ptr + m[:, None].to(tl.int64) * K + (k0 + kk)[None, :], mask=m_ok[:, None], other=0.0)
        w = _dequantized(qw, qz, s, k0, n0, N, dt, BITS, AWQ, ZERO, GROUP, BLOCK_K, BLOCK_N)
        acc = tl.dot(x, w, acc)
    n = n0 + tl.arange(0, BLOCK_N)
    ok = m_ok[:, None] & (n < N)[None, :]
    columns = (c0 + n)[None, :]
    if PARTIAL:
        tl.store(partial_ptr + (split * M + m[:, None]).to(tl.int64) * total + columns, acc, mask=ok)
    else:
        out = acc.to(dt).to(tl.float32)  # the product rounds, then the bias adds (as the modules do)
        if HAS_BIAS:
            out += tl.load(bias_ptr + columns, mask=(n < N)[None, :], other=0.0).to(tl.float32)
        tl.store(out_ptr + m[:, None].to(tl.int64) * total + columns, out.to(dt), mask=ok)


@triton.jit
def _split_sum_kernel(partial_ptr, bias_ptr, out_ptr, size, total, splits, HAS_BIAS: tl.constexpr,
                      BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < size
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(splits):  # in order: the same sum every time
        acc += tl.load(partial_ptr + split * size + i, mask=ok, other=0.0)
    dt = out_ptr.dtype.element_ty
    out = acc.to(dt).to(tl.float32)
    if HAS_BIAS:
        out += tl.load(bias_ptr + i % total, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + i, out.to(dt), mask=ok)


QUANT_BLOCK_N = 64
# The one-row kernel's tile (columns for GPTQ and AWQ layouts, AWQ's rows), warps, and how many programs a
# multiprocessor it wants (K is split until there are that many). Best of benchmarks/quant.py --kernels's sweep on an
# H200 (2026-12-02): GPTQ-Int4 30.5 us a 2B layer, Int8 32.4, AWQ 49.0, float16 F.linear 36.9.
GEMV = {"BLOCK_N": 32, "AWQ_BLOCK_N": 128, "AWQ_ROWS": 32, "num_warps": 4, "waves": 2}


@functools.cache
def _multiprocessors(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def quant_matmul(x, fused):
    """x [..., K] @ the fused parts' dequantized weights (quantized.FusedQuantized) -> [..., sum of widths]."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    rows, k = x2.shape
    parts = fused.parts
    one_row = rows == 1
    block_n = (GEMV["AWQ_BLOCK_N"] if fused.awq else GEMV["BLOCK_N"]) if one_row else QUANT_BLOCK_N
    block_m = max(16, triton.next_power_of_2(rows))
    blocks = [triton.cdiv(part.width, block_n) for part in parts]
    row_blocks = 1 if one_row else triton.cdiv(rows, block_m)
    iterations = k // fused.block_k
    # split K until the grid has `waves` programs a multiprocessor (2 for rows > 1): narrow products have few blocks
    wanted = (GEMV["waves"] if one_row else 2) * _multiprocessors(x2.device)
    splits = next((d for d in range(1, iterations + 1) if iterations % d == 0
                   and sum(blocks) * row_blocks * d >= wanted), iterations)
    total = fused.width
    out = torch.empty((rows, total), device=x2.device, dtype=x2.dtype)
    partial = torch.empty((splits, rows, total), device=x2.device, dtype=torch.float32) if splits > 1 else out
    padded = list(parts) + [parts[0]] * (3 - len(parts))
    bias = fused.bias if fused.bias is not None else out
    pointers = [value for part in padded for value in (part.qweight, part.qzeros, part.scales, part.width)]
    common = dict(BITS=fused.bits, AWQ=fused.awq, ZERO=fused.zero, GROUP=fused.group, HAS_BIAS=fused.bias is not None,
                  PARTIAL=splits > 1, BLOCK_N=block_n, BLOCK_K=fused.block_k)
    grid = (sum(blocks), row_blocks, splits)
    k_split = iterations // splits * fused.block_k
    second = blocks[1] if len(blocks) > 1 else 0
    if one_row:
        _quant_gemv_kernel[grid](x2, out, partial, bias, k, total, k_split, *pointers, blocks[0], second, **common,
                                 AWQ_ROWS=min(GEMV["AWQ_ROWS"], fused.block_k), num_warps=GEMV["num_warps"])
    else:
        _quant_matmul_kernel[grid](x2, out, partial, bias, rows, k, total, k_split, *pointers, blocks[0], second,
                                   **common, BLOCK_M=block_m, num_warps=4)
    if splits > 1:
        block = 1024
        _split_sum_kernel[(triton.cdiv(rows * total, block),)](
            partial, bias, out, rows * total, total, splits, HAS_BIAS=fused.bias is not None, BLOCK=block,
            num_warps=4)
    return out.reshape(*shape[:-1], total)
