"""Self-attention over padded audio batches: a FlashAttention-2-style Triton kernel with per-clip key lengths.

`attention(q, k, v, lengths, dropout_p)` is the one entry point the encoder calls. q, k, v are B x H x T x D and q is
not pre-scaled (1/sqrt(D) is applied inside, as in F.scaled_dot_product_attention). For clip b, keys at or past
lengths[b] get no weight and output rows at or past lengths[b] are zero (and so pass no gradient back).

Why a kernel: music clips in a batch have different lengths (250..1500 frames at 50 Hz), and torch's SDPA with a
boolean mask cannot use its flash backend, falls back to the mem-efficient one and still does the padded work. The
kernel follows FlashAttention-2 (Dao 2023, arXiv:2307.08691; Triton tutorial 06-fused-attention.py): online softmax
in fp32 over key blocks, only the log-sum-exp kept for backward, P recomputed there. What it adds:
  * key blocks at or past a clip's length are never loaded, and query blocks past it exit at once;
  * attention-probability dropout (wav2vec 2.0 / HuBERT / data2vec use p=0.1 in pre-training) drawn in-kernel with
    Philox from (seed, batch*head, query, key // 8), one call per 8 keys (16-bit slices, p rounded to 1/65536), so
    forward, backward and `dropout_keep_mask` see the same bits and no T x T tensor exists anywhere. Counters are
    unique while T * T / 8 < 2^32 (T < 185k frames, an hour at 50 Hz).
Inputs: fp16 / bf16 / fp32, head dim 16/32/64/128, any strides (model.py passes transposed views). Accumulation is
fp32; fp32 inputs multiply as 3xTF32 (about fp32 accuracy) on tensor cores.

Backend choice: `BACKEND` ("auto" | "triton" | "torch"), initialised from the env var MUSICSSL_ATTENTION, or the
context manager `use_backend("triton")`. "auto" runs the kernel on CUDA tensors when Triton imports, the head dim
is supported and a config fits the GPU (see CONFIGS), and torch everywhere else. "triton" on CPU tensors needs
TRITON_INTERPRET=1 set before triton is imported (Triton's interpreter runs the same kernel code with numpy; this is
how the tests check it without a GPU).
"""
import contextlib
import functools
import math
import os
import sys

import torch
import torch.nn.functional as F

import triton_ops

try:  # Triton is optional: without it (macOS, CPU-only wheels) the torch path below still works.
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

BACKEND = os.environ.get("MUSICSSL_ATTENTION", "auto")
BACKENDS = ("auto", "triton", "torch")
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def use_backend(name):
    """with use_backend("triton"): ... forces the kernel (or "torch" forces the reference) inside the block."""
    global BACKEND
    if name not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {name!r}")
    old, BACKEND = BACKEND, name
    try:
        yield
    finally:
        BACKEND = old


# ------------------------------------------------------------------------------------------------ plain torch

def attention_reference(q, k, v, lengths=None, dropout_p=0.0, dropout_mask=None):
    """Plain torch. q, k, v: B x H x T x D. lengths: B (valid frames per clip) or None (all valid).
    Keys at or past a clip's length get no weight; query rows past it are zero.
    dropout_mask: optional B x H x T x T bool keep-mask (e.g. from `dropout_keep_mask`); when given, the attention
    is computed explicitly in fp32 with exactly that mask, which is how the tests check the kernel's dropout."""
    B, H, T, D = q.shape
    if dropout_mask is not None:
        scores = q.float() @ k.float().transpose(-1, -2) / math.sqrt(D)
        if lengths is not None:
            key_valid = torch.arange(T, device=q.device)[None, :] < lengths.to(q.device).clamp_min(1)[:, None]
            scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
        probs = scores.softmax(-1) * dropout_mask / (1.0 - dropout_p)
        out = (probs @ v.float()).to(q.dtype)
    elif lengths is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    else:
        # A clip of length 0 keeps key 0 so softmax has something to normalise; its rows are zeroed below anyway.
        key_valid = torch.arange(T, device=q.device)[None, :] < lengths.to(q.device).clamp_min(1)[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid[:, None, None, :], dropout_p=dropout_p)
    if lengths is None:
        return out
    row_valid = torch.arange(T, device=q.device)[None, :] < lengths.to(q.device)[:, None]
    return torch.where(row_valid[:, None, :, None], out, torch.zeros((), dtype=out.dtype, device=out.device))


# ------------------------------------------------------------------------------------------------ Triton kernels

def _dropout_threshold(dropout_p):
    """The kernel keeps a score when its 16-bit random slice is >= this: P(drop) = threshold / 65536, within
    1 / 131072 of dropout_p (the kept values are scaled by 1 / (1 - dropout_p), as in the reference)."""
    return min(65535, max(1, round(dropout_p * 65536))) if dropout_p > 0 else 0


# The dropout seed changes every step and the threshold with p: neither may be specialised on (Triton specialises
# integers divisible by 16 or equal to 1, so 1 step in 16 would recompile every kernel).
SEED_ARGS = ["seed", "threshold"]

if HAS_TRITON:

    @triton.jit
    def _dropout_keep(seed, bh, rows, start_n, T_GROUPS, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # BLOCK_M x BLOCK_N keep-mask for queries `rows` and keys start_n .. start_n + BLOCK_N - 1.
        # One 10-round Philox call gives 128 bits; each covers 8 keys with 16-bit slices (FlashAttention-2 takes
        # 8-bit slices: 16 keys per call, but p is then rounded to 1/256; 16 bits round it to 1/65536). The counter
        # is (query * T_GROUPS + key // 8, batch*head): the same bits whatever the tile shape, so the forward, both
        # backward kernels and dropout_keep_mask agree; start_n and BLOCK_N are multiples of 8.
        groups = start_n // 8 + tl.arange(0, BLOCK_N // 8)
        c0 = (rows[:, None] * T_GROUPS + groups[None, :]).to(tl.uint32)
        c1 = tl.zeros([BLOCK_M, BLOCK_N // 8], dtype=tl.uint32) + bh.to(tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c1 * 0, c1 * 0)
        # key 8g + j takes slice j of call g; join/reshape interleave the 8 slices along the key axis
        lo = tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16))
        hi = tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16))
        bits = tl.reshape(tl.join(lo, hi), [BLOCK_M, BLOCK_N])
        return bits >= threshold

    @triton.jit
    def _dropout_keep_t(seed, bh, rows, start_n, T_GROUPS, threshold, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
        # _dropout_keep transposed (BLOCK_N keys x BLOCK_M queries), drawn in that orientation: transposing the
        # mask instead costs the dK/dV kernel ~500 bytes of register spills per thread (ptxas, sm_80).
        groups = start_n // 8 + tl.arange(0, BLOCK_N // 8)
        c0 = (groups[:, None] + rows[None, :] * T_GROUPS).to(tl.uint32)
        c1 = tl.zeros([BLOCK_N // 8, BLOCK_M], dtype=tl.uint32) + bh.to(tl.uint32)
        r0, r1, r2, r3 = tl.philox(seed, c0, c1, c1 * 0, c1 * 0)
        lo = tl.join(tl.join(r0 & 0xFFFF, r0 >> 16), tl.join(r1 & 0xFFFF, r1 >> 16))
        hi = tl.join(tl.join(r2 & 0xFFFF, r2 >> 16), tl.join(r3 & 0xFFFF, r3 >> 16))
        bits = tl.reshape(tl.permute(tl.join(lo, hi), (0, 2, 3, 4, 1)), [BLOCK_N, BLOCK_M])
        return bits >= threshold

    @triton.jit(do_not_specialize=SEED_ARGS)
    def _attn_fwd_kernel(Q, K, V, O, LSE, Lengths,
                         stride_qb, stride_qh, stride_qt, stride_qd,
                         stride_kb, stride_kh, stride_kt, stride_kd,
                         stride_vb, stride_vh, stride_vt, stride_vd,
                         stride_ob, stride_oh, stride_ot, stride_od,
                         H, T, T_BUCKET, sm_scale_log2, dropout_p, seed, threshold,
                         HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        L = tl.minimum(tl.load(Lengths + b), T)
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_valid = rows < L
        q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                    mask=row_valid[:, None], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max of the base-2 logits
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running softmax denominator (before dropout)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # A query block wholly past the clip runs no iterations and writes zeros; key blocks past it are not visited.
        hi = tl.where(start_m < L, L, 0)
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_valid = cols < L
            kT = tl.load(K + b * stride_kb + h * stride_kh + cols[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                         mask=col_valid[None, :], other=0.0)
            s = tl.dot(q, kT, input_precision=PRECISION) * sm_scale_log2
            s = tl.where(col_valid[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:
                # Dropout acts on the normalised probabilities, so the denominator above uses undropped p.
                keep = _dropout_keep(seed, bh, rows, start_n, (T + 7) // 8, threshold, BLOCK_M, BLOCK_N)
                p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            v = tl.load(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                        mask=col_valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = tl.where(row_valid[:, None], acc / l_safe[:, None], 0.0)
        tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :] * stride_od,
                 out.to(O.dtype.element_ty), mask=(rows < T)[:, None])
        tl.store(LSE + bh * T + rows, tl.where(row_valid, m_i + tl.log2(l_safe), 0.0), mask=rows < T)

    @triton.jit(do_not_specialize=SEED_ARGS)
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, Delta, DK, DV, Lengths,
                              stride_qb, stride_qh, stride_qt, stride_qd,
                              stride_kb, stride_kh, stride_kt, stride_kd,
                              stride_vb, stride_vh, stride_vt, stride_vd,
                              stride_dob, stride_doh, stride_dot, stride_dod,
                              stride_gb, stride_gh, stride_gt, stride_gd,
                              H, T, T_BUCKET, sm_scale, sm_scale_log2, dropout_p, seed, threshold,
                              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
        # One program per key block; loops over the clip's query blocks. Works in the transposed orientation
        # (keys x queries) so dK and dV accumulate in registers without atomics. dK, dV share the stride_g*.
        start_n = tl.program_id(0) * BLOCK_N
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        L = tl.minimum(tl.load(Lengths + b), T)
        cols = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        col_valid = cols < L
        k = tl.load(K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                    mask=col_valid[:, None], other=0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=col_valid[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        hi = tl.where(start_n < L, L, 0)
        for start_m in range(0, hi, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_valid = rows < L
            qT = tl.load(Q + b * stride_qb + h * stride_qh + rows[None, :] * stride_qt + offs_d[:, None] * stride_qd,
                         mask=row_valid[None, :], other=0.0)
            do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot
                         + offs_d[None, :] * stride_dod, mask=row_valid[:, None], other=0.0)
            lse = tl.load(LSE + bh * T + rows, mask=row_valid, other=0.0)
            delta = tl.load(Delta + bh * T + rows, mask=row_valid, other=0.0)
            sT = tl.dot(k, qT, input_precision=PRECISION) * sm_scale_log2
            # where, not multiply: padded rows may hold inf here and inf * 0 would poison the sums.
            pT = tl.where(col_valid[:, None] & row_valid[None, :], tl.exp2(sT - lse[None, :]), 0.0)
            dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            if DROPOUT:
                keep = _dropout_keep_t(seed, bh, rows, start_n, (T + 7) // 8, threshold, BLOCK_M, BLOCK_N)
                p_dropT = tl.where(keep, pT / (1.0 - dropout_p), 0.0)
                dpT = tl.where(keep, dpT / (1.0 - dropout_p), 0.0)
            else:
                p_dropT = pT
            dv += tl.dot(p_dropT.to(do.dtype), do, input_precision=PRECISION)
            # softmax backward: dS = P * (dP - rowsum(dO * O)); rowsum(dO*O) = rowsum(P * dP) also with dropout.
            dsT = pT * (dpT - delta[None, :])
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PRECISION)
        dk *= sm_scale
        out_offs = b * stride_gb + h * stride_gh + cols[:, None] * stride_gt + offs_d[None, :] * stride_gd
        tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=(cols < T)[:, None])
        tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=(cols < T)[:, None])

    @triton.jit(do_not_specialize=SEED_ARGS)
    def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, Delta, DQ, Lengths,
                            stride_qb, stride_qh, stride_qt, stride_qd,
                            stride_kb, stride_kh, stride_kt, stride_kd,
                            stride_vb, stride_vh, stride_vt, stride_vd,
                            stride_dob, stride_doh, stride_dot, stride_dod,
                            stride_gb, stride_gh, stride_gt, stride_gd,
                            H, T, T_BUCKET, sm_scale, sm_scale_log2, dropout_p, seed, threshold,
                            HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
        # One program per query block; loops over the clip's key blocks. DQ has strides stride_g*.
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        L = tl.minimum(tl.load(Lengths + b), T)
        rows = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        row_valid = rows < L
        q_offs = b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd
        q = tl.load(Q + q_offs, mask=row_valid[:, None], other=0.0)
        do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                     mask=row_valid[:, None], other=0.0)
        lse = tl.load(LSE + bh * T + rows, mask=row_valid, other=0.0)
        delta = tl.load(Delta + bh * T + rows, mask=row_valid, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        hi = tl.where(start_m < L, L, 0)
        for start_n in range(0, hi, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_valid = cols < L
            kT = tl.load(K + b * stride_kb + h * stride_kh + cols[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                         mask=col_valid[None, :], other=0.0)
            vT = tl.load(V + b * stride_vb + h * stride_vh + cols[None, :] * stride_vt + offs_d[:, None] * stride_vd,
                         mask=col_valid[None, :], other=0.0)
            s = tl.dot(q, kT, input_precision=PRECISION) * sm_scale_log2
            p = tl.where(row_valid[:, None] & col_valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, vT, input_precision=PRECISION)
            if DROPOUT:
                keep = _dropout_keep(seed, bh, rows, start_n, (T + 7) // 8, threshold, BLOCK_M, BLOCK_N)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
        dq *= sm_scale
        dq_offs = b * stride_gb + h * stride_gh + rows[:, None] * stride_gt + offs_d[None, :] * stride_gd
        tl.store(DQ + dq_offs, dq.to(DQ.dtype.element_ty), mask=(rows < T)[:, None])

    @triton.jit(do_not_specialize=SEED_ARGS)
    def _dropout_mask_kernel(Out, T, seed, threshold, BLOCK: tl.constexpr):
        bh = tl.program_id(2)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        start_n = tl.program_id(1) * BLOCK
        cols = start_n + tl.arange(0, BLOCK)
        keep = _dropout_keep(seed, bh, rows, start_n, (T + 7) // 8, threshold, BLOCK, BLOCK)
        offs = bh.to(tl.int64) * T * T + rows[:, None] * T + cols[None, :]
        tl.store(Out + offs, keep.to(tl.int8), mask=(rows < T)[:, None] & (cols < T)[None, :])

    _KINDS = {_attn_fwd_kernel: "fwd", _attn_bwd_dkdv_kernel: "dkdv", _attn_bwd_dq_kernel: "dq"}


# ------------------------------------------------------------------------------------------------ configs

# Autotune candidates, (BLOCK_M, BLOCK_N, num_warps, num_stages) with BLOCK_M = query rows and BLOCK_N = key rows of
# a tile, per kernel, input element size (2: fp16/bf16, 4: fp32 as 3xTF32) and head-dim class (dim_class). Chosen from
# triton_ops/compile_check.py's compile data for sm_80 (A100) and sm_90 (H100/H200) with dropout (the variant with more
# registers live): none asks for more shared memory than the GPU has or spills more than
# compile_check.MAX_SPILL_BYTES per thread, and tests/test_kernels_compile.py recompiles them (`--full`: every dtype,
# head dim, with and without dropout) to hold them to that. Larger tiles spill with dropout on sm_80: dK/dV at
# (64, 64) 364-524 bytes per thread, fp32 at head dim 128 anything wider than 32 x 16. Few per key: each is compiled and timed on
# the first step of every new shape. On other GPUs the candidates whose shared-memory estimate exceeds the device's
# limit are dropped; with none left, `auto` uses torch (and says so once) and `triton` raises.
CONFIGS = {
    ("fwd", 2, 64): [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
    ("fwd", 2, 128): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3)],
    ("fwd", 4, 64): [(64, 32, 4, 3), (128, 32, 8, 3), (32, 32, 4, 2)],
    ("fwd", 4, 128): [(32, 32, 4, 2), (32, 16, 4, 2)],
    ("dkdv", 2, 64): [(32, 64, 4, 3), (16, 128, 4, 3), (32, 64, 4, 2)],
    ("dkdv", 2, 128): [(32, 64, 4, 2), (16, 64, 4, 2), (32, 32, 4, 2)],
    ("dkdv", 4, 64): [(32, 32, 8, 2), (16, 32, 4, 2), (32, 16, 4, 2)],
    ("dkdv", 4, 128): [(32, 16, 8, 2), (16, 16, 4, 2)],
    ("dq", 2, 64): [(128, 64, 8, 3), (128, 32, 4, 3), (64, 32, 4, 3), (64, 64, 8, 2)],
    ("dq", 2, 128): [(128, 32, 8, 2), (64, 32, 4, 3), (64, 16, 4, 2), (32, 32, 4, 2)],
    ("dq", 4, 64): [(64, 16, 4, 2), (32, 32, 4, 2)],
    ("dq", 4, 128): [(32, 16, 8, 2), (16, 32, 4, 2), (16, 16, 4, 2)],
}
# Head dims 16 and 32 take the <= 64 tables without two candidates the full compile sweep rejected there: the
# (128, 128) forward, whose dropout costs 2.3-2.5x the instructions of the forward without at these widths (little
# matmul work per score), and fp32 dK/dV at (32, 32, 8 warps), which spills 144 B/thread on sm_90 at head dim 32.
CONFIGS.update({
    ("fwd", 2, 32): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
    ("fwd", 4, 32): CONFIGS[("fwd", 4, 64)],
    ("dkdv", 2, 32): CONFIGS[("dkdv", 2, 64)],
    ("dkdv", 4, 32): [(16, 32, 4, 2), (32, 16, 4, 2)],
    ("dq", 2, 32): CONFIGS[("dq", 2, 64)],
    ("dq", 4, 32): CONFIGS[("dq", 4, 64)],
})
KINDS = ("fwd", "dkdv", "dq")

# The GPU whose limits the configs are planned for: triton_ops.gpu_limits (triton_ops/__init__.py).


def shared_memory_estimate(kind, config, elt, head_dim, dropout, arch):
    """Bytes of shared memory a config asks for, from the tiles the kernel stages through it (a bound checked
    against the compiler's figure by tests/test_kernels_compile.py; only used to drop candidates on GPUs with less
    shared memory than the targets)."""
    bm, bn, _, stages = config
    buffers = stages if arch >= 90 else stages - 1  # Hopper's pipeliner keeps all stages in flight, Ampere's S - 1
    if kind == "fwd":  # K and V tiles per stage, the Q tile, the dropout mask's layout conversion
        tiles = buffers * 2 * bn * head_dim * elt + bm * head_dim * elt
    elif kind == "dkdv":  # Q and dO tiles per stage, K and V held
        tiles = buffers * 2 * bm * head_dim * elt + 2 * bn * head_dim * elt
    else:  # K and V tiles per stage, Q and dO held
        tiles = buffers * 2 * bn * head_dim * elt + 2 * bm * head_dim * elt
    if elt == 4:
        tiles *= 2  # 3xTF32 stages both halves of split operands
    # + the dropout mask's layout conversion, and 10% + 4 KB for conversion scratch the tiles above do not count
    return int(1.1 * (tiles + (bm * bn * 4 if dropout else 0))) + 4096


_SAID = set()


def dim_class(head_dim):
    """The CONFIGS key for a head dim: 32 (16, 32), 64 or 128."""
    return 32 if head_dim <= 32 else 64 if head_dim <= 64 else 128


def kernel_configs(kind, device, dtype, head_dim, dropout):
    """The candidates of CONFIGS that fit this device for these inputs (empty if none does)."""
    elt = dtype.itemsize
    arch, max_shared = triton_ops.gpu_limits(device)
    return [c for c in CONFIGS[(kind, elt, dim_class(head_dim))]
            if shared_memory_estimate(kind, c, elt, head_dim, dropout, arch) <= max_shared]


def kernel_fits(device, dtype, head_dim, dropout):
    """Whether forward and both backward kernels have a config for this device and input; says once if not."""
    if all(kernel_configs(kind, device, dtype, head_dim, dropout) for kind in KINDS):
        return True
    key = (triton_ops.gpu_limits(device), dtype, head_dim, bool(dropout))
    if key not in _SAID:
        _SAID.add(key)
        arch, max_shared = triton_ops.gpu_limits(device)
        print(f"attention: no kernel config fits sm_{arch} ({max_shared} B shared memory) for {dtype} head dim "
              f"{head_dim}{' with dropout' if dropout else ''}; using torch's scaled_dot_product_attention",
              file=sys.stderr, flush=True)
    return False


if HAS_TRITON:
    def _pruner(kind):
        def prune(configs, named_args, **kwargs):
            q = named_args["Q"]
            allowed = set(kernel_configs(kind, q.device, q.dtype, kwargs["HEAD_DIM"], kwargs["DROPOUT"]))
            return [c for c in configs
                    if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
        return prune

    def _autotuned(kernel, kind):
        # every candidate of this kernel; the pruner keeps those of the call's dtype, head dim and GPU. The key
        # includes T rounded up to a power of two, so a new crop length does not retune.
        tiles = sorted({c for (k, _, _), cs in CONFIGS.items() if k == kind for c in cs})
        configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in tiles]
        return triton.autotune(configs, key=["T_BUCKET", "HEAD_DIM", "DROPOUT", "PRECISION"],
                               prune_configs_by={"early_config_prune": _pruner(kind)})(kernel)

    _TUNED = {kernel: _autotuned(kernel, kind) for kernel, kind in _KINDS.items()}

# Under the interpreter one small fixed tile: small so that the tests' short sequences span several blocks.
INTERPRET_BLOCK = 16
_PINNED = {}


@contextlib.contextmanager
def pin_config(kind, config):
    """with pin_config("fwd", (128, 64, 8, 3)): the kernel of that kind runs with exactly this config (bypassing
    the autotuner; also under the interpreter, where num_warps/num_stages mean nothing). For bench/devcheck.py."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    old = _PINNED.get(kind)
    _PINNED[kind] = tuple(config)
    try:
        yield
    finally:
        if old is None:
            _PINNED.pop(kind)
        else:
            _PINNED[kind] = old


def _launch(kernel, grid, *args, **kwargs):
    """Autotuned launch on the GPU; one fixed tile under the interpreter (autotuning there would only cost time);
    a pinned config when pin_config says so."""
    pinned = _PINNED.get(_KINDS[kernel])
    if pinned is not None:
        bm, bn, warps, stages = pinned
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn)
        kernel[grid(blocks)](*args, **kwargs, **blocks, num_warps=warps, num_stages=stages)
    elif _interpreting():
        blocks = dict(BLOCK_M=INTERPRET_BLOCK, BLOCK_N=INTERPRET_BLOCK)
        kernel[grid(blocks)](*args, **kwargs, **blocks)
    else:
        _TUNED[kernel][grid](*args, **kwargs)


def _strides(t):
    return tuple(t.stride())


# How fp32 inputs multiply: "tf32x3" (default) or "tf32" (faster, ~1e-3 relative error; bench/devcheck.py compares).
FP32_PRECISION = "tf32x3"


def _precision(dtype):
    # fp16/bf16 products are exact on tensor cores (fp32 accumulation). fp32 inputs use 3xTF32 (Triton's "tf32x3":
    # a = a_hi + a_lo, three TF32 MMAs) for ~fp32 accuracy on tensor cores: plain TF32 would cost ~1e-3 relative
    # error, and "ieee" runs on FMA units and spills registers at these tile sizes (ptxas -v on sm_90).
    return FP32_PRECISION if dtype == torch.float32 else "tf32"


def _check_inputs(q, k, v, lengths):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"attention: q, k, v must all be B x H x T x D, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"attention kernel: q, k, v must share one dtype of {SUPPORTED_DTYPES}, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("attention kernel: q, k, v must be on one device")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"attention kernel: head dim {q.shape[-1]} not supported (one of {SUPPORTED_HEAD_DIMS})")
    if lengths is not None and (lengths.shape != (q.shape[0],) or lengths.dtype.is_floating_point):
        raise ValueError(f"attention: lengths must be an integer tensor of shape ({q.shape[0]},), got "
                         f"{lengths.dtype} {tuple(lengths.shape)}")


def _empty_like_heads_last(q):
    """B x H x T x D view of a B x T x H x D buffer: the layout model.py projects into and reads back from, so
    out.transpose(1, 2).reshape(B, T, H * D) there (and the gradients' way back) is a view, not a copy."""
    B, H, T, D = q.shape
    return torch.empty(B, T, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)


def _lengths_int32(lengths, B, T, device):
    if lengths is None:
        return torch.full((B,), T, dtype=torch.int32, device=device)
    return lengths.to(device=device, dtype=torch.int32).contiguous()


def _attention_forward(q, k, v, lengths32, dropout_p, seed):
    B, H, T, D = q.shape
    o = _empty_like_heads_last(q)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    _launch(_attn_fwd_kernel, grid,
            q, k, v, o, lse, lengths32, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            H, T, triton.next_power_of_2(T), LOG2E / math.sqrt(D), dropout_p, seed, _dropout_threshold(dropout_p),
            HEAD_DIM=D, DROPOUT=dropout_p > 0, PRECISION=_precision(q.dtype))
    return o, lse


def _attention_backward(q, k, v, o, lse, do, lengths32, dropout_p, seed):
    B, H, T, D = q.shape
    # delta = rowsum(dO * O), one number per query (the softmax-backward correction term).
    delta = (do.float() * o.float()).sum(-1).contiguous()
    dq, dk, dv = (_empty_like_heads_last(q) for _ in range(3))
    common = dict(HEAD_DIM=D, DROPOUT=dropout_p > 0, PRECISION=_precision(q.dtype))
    scalars = (H, T, triton.next_power_of_2(T), 1.0 / math.sqrt(D), LOG2E / math.sqrt(D), dropout_p, seed,
               _dropout_threshold(dropout_p))
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    _launch(_attn_bwd_dkdv_kernel,
            lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H),
            q, k, v, do, lse, delta, dk, dv, lengths32, *strides, *_strides(dk), *scalars, **common)
    _launch(_attn_bwd_dq_kernel,
            lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H),
            q, k, v, do, lse, delta, dq, lengths32, *strides, *_strides(dq), *scalars, **common)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lengths32, dropout_p, seed):
        o, lse = _attention_forward(q, k, v, lengths32, dropout_p, seed)
        ctx.save_for_backward(q, k, v, o, lse, lengths32)
        ctx.dropout_p, ctx.seed = dropout_p, seed
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, lengths32 = ctx.saved_tensors
        dq, dk, dv = _attention_backward(q, k, v, o, lse, do, lengths32, ctx.dropout_p, ctx.seed)
        return dq, dk, dv, None, None, None


def attention_triton(q, k, v, lengths=None, dropout_p=0.0, seed=None):
    """The Triton kernel, whatever BACKEND says. seed: Philox seed for dropout; None draws one from torch's CPU
    generator (so torch.manual_seed makes a run reproducible, and no GPU sync is needed)."""
    if not HAS_TRITON:
        raise RuntimeError("attention: the Triton backend was requested but `import triton` failed")
    if not q.is_cuda and not _interpreting():
        raise RuntimeError("attention: the Triton backend on CPU tensors needs TRITON_INTERPRET=1 set before "
                           "triton is imported")
    _check_inputs(q, k, v, lengths)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"attention: dropout_p must be in [0, 1), got {dropout_p}")
    if q.is_cuda and not (_PINNED or all(kernel_configs(kind, q.device, q.dtype, q.shape[-1], dropout_p > 0)
                                         for kind in KINDS)):
        arch, max_shared = triton_ops.gpu_limits(q.device)
        raise RuntimeError(f"attention: no kernel config fits sm_{arch} ({max_shared} B shared memory) for {q.dtype} "
                           f"head dim {q.shape[-1]}; use the torch or auto backend")
    if seed is None:
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item()) if dropout_p > 0 else 0
    lengths32 = _lengths_int32(lengths, q.shape[0], q.shape[2], q.device)
    return _FlashAttention.apply(q, k, v, lengths32, float(dropout_p), int(seed))


def dropout_keep_mask(seed, B, H, T, dropout_p, device="cpu", block=None):
    """B x H x T x T bool: the keep-mask the kernel draws for this seed (True = kept). For tests and debugging only;
    the kernel itself never materialises it. block: tile size (a multiple of 8; the mask does not depend on it)."""
    if not HAS_TRITON:
        raise RuntimeError("dropout_keep_mask needs triton")
    out = torch.empty(B, H, T, T, dtype=torch.int8, device=device)
    block = block or (16 if _interpreting() else 64)
    _dropout_mask_kernel[(triton.cdiv(T, block), triton.cdiv(T, block), B * H)](
        out, T, int(seed), _dropout_threshold(dropout_p), BLOCK=block)
    return out.bool()


def _kernel_applies(q, dropout_p):
    return (HAS_TRITON and q.is_cuda and q.shape[-1] in SUPPORTED_HEAD_DIMS and q.dtype in SUPPORTED_DTYPES
            and kernel_fits(q.device, q.dtype, q.shape[-1], dropout_p > 0))


def attention(q, k, v, lengths=None, dropout_p=0.0, seed=None):
    """Scaled dot-product self-attention over a padded batch; see the module docstring for semantics and backends.
    q, k, v: B x H x T x D; lengths: B valid frames per clip (int) or None; dropout_p: attention dropout (pass 0 in
    eval); seed: dropout seed for the kernel path (None = drawn from torch's generator)."""
    if BACKEND not in BACKENDS:
        raise ValueError(f"attention backend (MUSICSSL_ATTENTION) must be one of {BACKENDS}, got {BACKEND!r}")
    if BACKEND == "triton" or (BACKEND == "auto" and _kernel_applies(q, dropout_p)):
        return attention_triton(q, k, v, lengths, dropout_p, seed)
    return attention_reference(q, k, v, lengths, dropout_p)
