"""Attention over a padded batch: our Triton kernel against torch's scaled_dot_product_attention.

    python bench/attention.py                       # GPU: 8 clips x 12 heads x T=1500 x d=64, bf16
    python bench/attention.py --batch 2 --steps 2   # CPU: the torch paths only (no interpreter), fp32

Lengths are drawn uniformly in [--min-len, T] (seeded; the first clip is always full length).
FLOP convention (FlashAttention-2 paper's): forward = 4 * H * D * sum_b L_b^2 (QK^T and PV, 2 flops per MAC),
forward+backward = 3.5x that (the backward does 5 matmuls to the forward's 2). Only unpadded work is counted
(L_b = clip length), so a path that does the padded work anyway is charged for it in time, not credited in FLOPs.
Rows:
  ours, padded             kernel with per-clip lengths
  sdpa+mask, padded        SDPA with a boolean key mask (mem-efficient / cuDNN backend; flash cannot take a mask)
  ours, unpadded           kernel on the same tensors with every clip full length (FLOPs = full T^2 work)
  sdpa, unpadded           SDPA without a mask (flash backend on GPU)
"""
import argparse
import contextlib
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from triton_ops import attention as attn  # noqa: E402


def bench(fn, device, steps):
    """Median milliseconds of fn()."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100)
    fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--T", type=int, default=1500)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=250)
    ap.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--steps", type=int, default=3, help="timed repeats on CPU (GPU uses triton's do_bench)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device == "cuda" else "fp32")]
    B, H, T, D = args.batch, args.heads, args.T, args.dim
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_len, T + 1, (B,), generator=g)
    lengths[0] = T
    lengths = lengths.to(device)
    full = torch.full((B,), T, device=device)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    d_out = torch.randn(B, H, T, D, generator=g).to(device, dtype)
    key_mask = (torch.arange(T, device=device)[None, :] < lengths[:, None])[:, None, None, :]

    work_padded = 4 * H * D * float((lengths.double() ** 2).sum())
    work_full = 4 * H * D * B * T * T
    print(f"device {device}, {dtype}, B={B} H={H} T={T} D={D}, lengths {lengths.tolist()} "
          f"({lengths.sum().item() / (B * T):.0%} of frames valid)")

    def sdpa_masked():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)

    def sdpa_plain():
        return F.scaled_dot_product_attention(q, k, v)

    rows = []
    if device == "cuda" and attn.HAS_TRITON:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        err = (attn.attention_triton(q, k, v, lengths).float() - attn.attention_reference(
            q.float(), k.float(), v.float(), lengths)).abs().max().item()
        print(f"kernel vs fp32 reference, max abs error: {err:.2e}")
        rows.append(("ours, padded", lambda: attn.attention_triton(q, k, v, lengths), work_padded, None))
        rows.append(("sdpa+mask, padded", sdpa_masked, work_padded,
                     [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]))
        rows.append(("ours, unpadded", lambda: attn.attention_triton(q, k, v, full), work_full, None))
        rows.append(("sdpa, unpadded", sdpa_plain, work_full, [SDPBackend.FLASH_ATTENTION]))
    else:
        print("no GPU: the Triton kernel is not timed (the interpreter is for correctness only); torch paths:")
        sdpa_kernel = None
        rows.append(("sdpa+mask, padded", sdpa_masked, work_padded, None))
        rows.append(("sdpa, unpadded", sdpa_plain, work_full, None))

    print(f"{'path':<20} {'fwd ms':>9} {'fwd TFLOP/s':>12} {'fwd+bwd ms':>11} {'fwd+bwd TFLOP/s':>16}")
    for name, fn, work, backends in rows:
        def fwd():
            with torch.no_grad():
                fn()

        def fwd_bwd():
            torch.autograd.grad(fn(), (q, k, v), d_out)

        with sdpa_kernel(backends) if backends else contextlib.nullcontext():
            ms_f = bench(fwd, device, args.steps)
            ms_fb = bench(fwd_bwd, device, args.steps)
        print(f"{name:<20} {ms_f:9.3f} {work / ms_f / 1e9:12.3f} {ms_fb:11.3f} {3.5 * work / ms_fb / 1e9:16.3f}")


if __name__ == "__main__":
    main()
