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
    Philox from (seed, batch*head, query, key), so forward, backward and `dropout_keep_mask` see the same bits and
    no T x T tensor exists anywhere.
Inputs: fp16 / bf16 / fp32, head dim 16/32/64/128, any strides (model.py passes transposed views). Accumulation is
fp32; fp32 inputs multiply as 3xTF32 (about fp32 accuracy) on tensor cores.

Backend choice: `BACKEND` ("auto" | "triton" | "torch"), initialised from the env var MUSICSSL_ATTENTION, or the
context manager `use_backend("triton")`. "auto" runs the kernel on CUDA tensors when Triton imports and the head dim
is supported, and torch everywhere else. "triton" on CPU tensors needs TRITON_INTERPRET=1 set before triton is
imported (Triton's interpreter runs the same kernel code with numpy; this is how the tests check it without a GPU).
"""
import contextlib
import math
import os

import torch
import torch.nn.functional as F

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

if HAS_TRITON:

    @triton.jit
    def _dropout_keep(seed, bh, rows, cols, T, dropout_p):
        # One Philox counter per (batch*head, query, key): the same bits whatever the block shape, so the forward,
        # both backward kernels and dropout_keep_mask agree. int64 so B*H*T*T may exceed 2^31.
        offsets = bh.to(tl.int64) * T * T + rows.to(tl.int64) * T + cols.to(tl.int64)
        return tl.rand(seed, offsets) >= dropout_p

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, O, LSE, Lengths,
                         stride_qb, stride_qh, stride_qt, stride_qd,
                         stride_kb, stride_kh, stride_kt, stride_kd,
                         stride_vb, stride_vh, stride_vt, stride_vd,
                         stride_ob, stride_oh, stride_ot, stride_od,
                         H, T, T_BUCKET, sm_scale_log2, dropout_p, seed,
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
                keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], T, dropout_p)
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

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, Delta, DK, DV, Lengths,
                              stride_qb, stride_qh, stride_qt, stride_qd,
                              stride_kb, stride_kh, stride_kt, stride_kd,
                              stride_vb, stride_vh, stride_vt, stride_vd,
                              stride_dob, stride_doh, stride_dot, stride_dod,
                              stride_gb, stride_gh, stride_gt, stride_gd,
                              H, T, T_BUCKET, sm_scale, sm_scale_log2, dropout_p, seed,
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
                keep = _dropout_keep(seed, bh, rows[None, :], cols[:, None], T, dropout_p)
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

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, Delta, DQ, Lengths,
                            stride_qb, stride_qh, stride_qt, stride_qd,
                            stride_kb, stride_kh, stride_kt, stride_kd,
                            stride_vb, stride_vh, stride_vt, stride_vd,
                            stride_dob, stride_doh, stride_dot, stride_dod,
                            stride_gb, stride_gh, stride_gt, stride_gd,
                            H, T, T_BUCKET, sm_scale, sm_scale_log2, dropout_p, seed,
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
                keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], T, dropout_p)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION)
        dq *= sm_scale
        dq_offs = b * stride_gb + h * stride_gh + rows[:, None] * stride_gt + offs_d[None, :] * stride_gd
        tl.store(DQ + dq_offs, dq.to(DQ.dtype.element_ty), mask=(rows < T)[:, None])

    @triton.jit
    def _dropout_mask_kernel(Out, T, dropout_p, seed, BLOCK: tl.constexpr):
        bh = tl.program_id(2)
        rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], T, dropout_p)
        offs = bh.to(tl.int64) * T * T + rows[:, None] * T + cols[None, :]
        tl.store(Out + offs, keep.to(tl.int8), mask=(rows < T)[:, None] & (cols < T)[None, :])

    # Autotuning on the GPU. Candidates are the usual FlashAttention-2 tiles for head dim 32..128 on A100/H100
    # (tutorial 06); the key includes T rounded up to a power of two so a new crop length does not retune.
    _FWD_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                    for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
                                         (128, 32, 4, 4), (64, 32, 4, 4), (128, 64, 4, 4), (64, 128, 4, 3)]]
    _BWD_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                    for bm, bn, w, s in [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3),
                                         (128, 64, 8, 3), (16, 128, 4, 3)]]
    _DQ_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                   for bm, bn, w, s in [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3),
                                        (128, 16, 4, 3)]]
    _TUNE_KEY = ["T_BUCKET", "HEAD_DIM", "DROPOUT", "PRECISION"]
    _TUNED = {_attn_fwd_kernel: triton.autotune(_FWD_CONFIGS, key=_TUNE_KEY)(_attn_fwd_kernel),
              _attn_bwd_dkdv_kernel: triton.autotune(_BWD_CONFIGS, key=_TUNE_KEY)(_attn_bwd_dkdv_kernel),
              _attn_bwd_dq_kernel: triton.autotune(_DQ_CONFIGS, key=_TUNE_KEY)(_attn_bwd_dq_kernel)}

# Under the interpreter one small fixed tile: small so that the tests' short sequences span several blocks.
INTERPRET_BLOCK = 16


def _launch(kernel, grid, *args, **kwargs):
    """Autotuned launch on the GPU; one fixed tile under the interpreter (autotuning there would only cost time)."""
    if _interpreting():
        blocks = dict(BLOCK_M=INTERPRET_BLOCK, BLOCK_N=INTERPRET_BLOCK)
        kernel[grid(blocks)](*args, **kwargs, **blocks)
    else:
        _TUNED[kernel][grid](*args, **kwargs)


def _strides(t):
    return tuple(t.stride())


def _precision(dtype):
    # fp16/bf16 products are exact on tensor cores (fp32 accumulation). fp32 inputs use 3xTF32 (Triton's "tf32x3":
    # a = a_hi + a_lo, three TF32 MMAs) for ~fp32 accuracy on tensor cores: plain TF32 would cost ~1e-3 relative
    # error, and "ieee" runs on FMA units and spills registers at these tile sizes (ptxas -v on sm_90).
    return "tf32x3" if dtype == torch.float32 else "tf32"


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
            H, T, triton.next_power_of_2(T), LOG2E / math.sqrt(D), dropout_p, seed,
            HEAD_DIM=D, DROPOUT=dropout_p > 0, PRECISION=_precision(q.dtype))
    return o, lse


def _attention_backward(q, k, v, o, lse, do, lengths32, dropout_p, seed):
    B, H, T, D = q.shape
    # delta = rowsum(dO * O), one number per query (the softmax-backward correction term).
    delta = (do.float() * o.float()).sum(-1).contiguous()
    dq, dk, dv = (_empty_like_heads_last(q) for _ in range(3))
    common = dict(HEAD_DIM=D, DROPOUT=dropout_p > 0, PRECISION=_precision(q.dtype))
    scalars = (H, T, triton.next_power_of_2(T), 1.0 / math.sqrt(D), LOG2E / math.sqrt(D), dropout_p, seed)
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
    if seed is None:
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,)).item()) if dropout_p > 0 else 0
    lengths32 = _lengths_int32(lengths, q.shape[0], q.shape[2], q.device)
    return _FlashAttention.apply(q, k, v, lengths32, float(dropout_p), int(seed))


def dropout_keep_mask(seed, B, H, T, dropout_p, device="cpu"):
    """B x H x T x T bool: the keep-mask the kernel draws for this seed (True = kept). For tests and debugging only;
    the kernel itself never materialises it."""
    if not HAS_TRITON:
        raise RuntimeError("dropout_keep_mask needs triton")
    out = torch.empty(B, H, T, T, dtype=torch.int8, device=device)
    block = 16 if _interpreting() else 64
    _dropout_mask_kernel[(triton.cdiv(T, block), triton.cdiv(T, block), B * H)](out, T, float(dropout_p), int(seed),
                                                                               BLOCK=block)
    return out.bool()


def _kernel_applies(q):
    return HAS_TRITON and q.is_cuda and q.shape[-1] in SUPPORTED_HEAD_DIMS and q.dtype in SUPPORTED_DTYPES


def attention(q, k, v, lengths=None, dropout_p=0.0, seed=None):
    """Scaled dot-product self-attention over a padded batch; see the module docstring for semantics and backends.
    q, k, v: B x H x T x D; lengths: B valid frames per clip (int) or None; dropout_p: attention dropout (pass 0 in
    eval); seed: dropout seed for the kernel path (None = drawn from torch's generator)."""
    if BACKEND not in BACKENDS:
        raise ValueError(f"attention backend (MUSICSSL_ATTENTION) must be one of {BACKENDS}, got {BACKEND!r}")
    if BACKEND == "triton" or (BACKEND == "auto" and _kernel_applies(q)):
        return attention_triton(q, k, v, lengths, dropout_p, seed)
    return attention_reference(q, k, v, lengths, dropout_p)
