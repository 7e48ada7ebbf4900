"""Nearest-centroid assignment: our fused Triton kernel against torch addmm + argmin in chunks.

    python bench/kmeans_assign.py                         # GPU: 4M points x {39, 768} dims, K in {500, 2000}
    python bench/kmeans_assign.py --points 100000          # CPU: the torch path only (no interpreter)

Figures: points x centroids per second (N*K/t) and achieved TFLOP/s counting the dot products only (2*N*K*D).
Rows on the GPU:
  torch chunked fp32       triton_ops.kmeans.assign_nearest_reference (addmm into a 16384 x K chunk, then min)
  ours fp32 / tf32 / bf16  the kernel with 3xTF32 (~fp32), TF32 and bf16 products (fp32 accumulation, results)
  ours fused fp32          assign_and_sum: assignment plus the Lloyd sums/counts in the same pass
  torch assign+sums fp32   the reference assignment followed by index_add_/bincount
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from triton_ops import kmeans as km  # noqa: E402


def bench(fn, device, steps):
    """Median milliseconds of fn()."""
    if device == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=5, rep=50)
    fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=None, help="default: 4M on GPU, 100k on CPU")
    ap.add_argument("--dims", type=int, nargs="+", default=[39, 768])
    ap.add_argument("--clusters", type=int, nargs="+", default=[500, 2000])
    ap.add_argument("--steps", type=int, default=3, help="timed repeats on CPU (GPU uses triton's do_bench)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(args.threads)
    N = args.points or (4_000_000 if device == "cuda" else 100_000)
    kernel = device == "cuda" and km.HAS_TRITON
    if not kernel:
        print("no GPU: the Triton kernel is not timed (the interpreter is for correctness only); torch path:")
    print(f"{'D':>4} {'K':>5} {'path':<24} {'ms':>9} {'Gpairs/s':>9} {'TFLOP/s':>8} {'vs torch':>8}")
    for D in args.dims:
        g = torch.Generator().manual_seed(0)
        x32 = torch.randn(N, D, generator=g).to(device)
        for K in args.clusters:
            c = torch.randn(K, D, generator=g).to(device)
            rows = [("torch chunked fp32", lambda: km.assign_nearest_reference(x32, c))]
            if kernel:
                xbf = x32.to(torch.bfloat16)
                with km.use_backend("triton"):
                    labels, _ = km.assign_nearest(x32, c)
                agree = (labels == km.assign_nearest_reference(x32, c)[0]).float().mean().item()
                print(f"{D:>4} {K:>5} kernel fp32 labels agreeing with torch: {agree:.5f}")

                def ours(x, tf32=False, fused=False):
                    with km.use_backend("triton"):
                        return (km.assign_and_sum if fused else km.assign_nearest)(x, c, allow_tf32=tf32)

                rows += [("ours fp32", lambda: ours(x32)),
                         ("ours tf32", lambda: ours(x32, tf32=True)),
                         ("ours bf16", lambda: ours(xbf)),
                         ("ours fused fp32", lambda: ours(x32, fused=True)),
                         ("torch assign+sums fp32",
                          lambda: km.cluster_sums_reference(x32, km.assign_nearest_reference(x32, c)[0], K))]
            base = None
            for name, fn in rows:
                ms = bench(fn, device, args.steps)
                base = base or ms
                print(f"{D:>4} {K:>5} {name:<24} {ms:9.2f} {N * K / ms / 1e6:9.2f} "
                      f"{2 * N * K * D / ms / 1e9:8.3f} {base / ms:7.2f}x")


if __name__ == "__main__":
    main()
