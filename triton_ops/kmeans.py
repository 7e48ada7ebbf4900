"""Nearest-centroid assignment for k-means (fairseq's dump_km_label / Lloyd's assignment step).

`assign_nearest(x, centroids)` returns (labels, squared distances) without materialising the N x K distance matrix,
`cluster_sums(x, labels, k)` the per-cluster sums and counts of the Lloyd update, and `assign_and_sum(x, centroids)`
both at once, so a k-means iteration reads the points once.

Why a kernel: HuBERT's label passes cluster millions of frames (39-dim MFCC for iteration 1, 768-dim features
later) into K = 100..2000 (music: 500 / 2000) clusters. The torch path computes ||c||^2 - 2 x.c with addmm into a
chunk x K matrix, writes it to memory and reads it back for argmin. The Triton kernel keeps a tile of points in
registers, streams tiles of centroids past it, accumulates x.c over D in fp32, and keeps a running (min, argmin)
per point, so only N labels and N distances are written. Distances use the same expansion
||x||^2 - 2 x.c + ||c||^2 as the torch path (clamped at 0); the minimum distance is the point's contribution to the
inertia for free.

Backend choice: `BACKEND` ("auto" | "triton" | "torch"), initialised from the env var MUSICSSL_KMEANS, or the
context manager `use_backend(...)`. "auto" = the kernels on CUDA tensors when Triton imports, torch otherwise.
"triton" on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported (that is how the tests run it).
"""
import contextlib
import functools
import os
import sys

import numpy as np
import torch

import triton_ops

try:  # Triton is optional: without it the torch paths below still work.
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

BACKEND = os.environ.get("MUSICSSL_KMEANS", "auto")
BACKENDS = ("auto", "triton", "torch")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@contextlib.contextmanager
def use_backend(name):
    """with use_backend("triton"): ... forces the kernels (or "torch" the reference) inside the block."""
    global BACKEND
    if name not in BACKENDS:
        raise ValueError(f"k-means backend must be one of {BACKENDS}, got {name!r}")
    old, BACKEND = BACKEND, name
    try:
        yield
    finally:
        BACKEND = old


# ------------------------------------------------------------------------------------------------ plain torch

# On CPU an N x K distance block that spills out of cache makes addmm + min 2-3x slower: blocks of ~0.5M distances
# (2 MB, an L2) instead. GPUs take 16k rows at once.
CPU_DISTANCE_BLOCK = 1 << 19


def assign_nearest_reference(x, centroids, chunk=None):
    """x: N x D, centroids: K x D -> (labels int64 N, squared distance float32 N), in chunks of points."""
    on_cpu = x.device.type == "cpu"
    if chunk is None:
        chunk = max(256, CPU_DISTANCE_BLOCK // max(1, centroids.shape[0])) if on_cpu else 16384
    x = x.float()
    c = centroids.float()
    c_sq = (c * c).sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dists = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    ct = c.t()
    # one distance buffer for all blocks: a fresh 2 MB tensor per block is a fresh mmap, whose page faults cost as
    # much as the addmm on CPU
    buf = torch.empty(min(chunk, x.shape[0]), c.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        d = torch.addmm(c_sq[None, :], xs, ct, alpha=-2.0, out=buf[:xs.shape[0]])  # ||c||^2 - 2 x.c
        if on_cpu:
            # numpy's argmin is vectorised (SIMD) where torch's min-with-index over rows is not: 8x faster on a
            # 1024 x 500 block, which made it as costly as the addmm itself. Both take the lowest index on ties.
            i = torch.from_numpy(np.argmin(d.numpy(), axis=1))
            m = d.gather(1, i[:, None]).squeeze(1)
        else:
            m, i = d.min(1)
        labels[s:s + chunk] = i
        dists[s:s + chunk] = (m + (xs * xs).sum(1)).clamp_min_(0)
    return labels, dists


def cluster_sums_reference(x, labels, k):
    """Per-cluster sums (K x D, float32) and counts (K, int64) for the Lloyd update."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, labels, x.float())
    counts = torch.bincount(labels, minlength=k)
    return sums, counts


# ------------------------------------------------------------------------------------------------ Triton kernels

if HAS_TRITON:

    @triton.jit
    def _keep_nearest(dot, CSq, k0, K, best, best_idx, BLOCK_K: tl.constexpr):
        """Fold one tile of centroids into the running (min distance - ||x||^2, argmin) of each point."""
        ks = k0 + tl.arange(0, BLOCK_K)
        c_sq = tl.load(CSq + ks, mask=ks < K, other=float("inf"))  # padded centroids never win
        dist = c_sq[None, :] - 2.0 * dot
        tile_min, tile_arg = tl.min(dist, 1, return_indices=True)
        # strict < keeps the earlier tile on ties, and argmin takes the leftmost within a tile: lowest index wins,
        # as in torch's min
        better = tile_min < best
        return tl.where(better, tile_min, best), tl.where(better, k0 + tile_arg, best_idx)

    @triton.jit
    def _assign_kernel(X, C, CSq, Labels, Dists, Sums, Counts, N, K, D, DC,
                       stride_xn, stride_xd, stride_ck, stride_cd,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                       X_IN_ONE_TILE: tl.constexpr, ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_valid = rows < N
        x_rows = X + rows.to(tl.int64)[:, None] * stride_xn  # int64: N x D exceeds 2^31 at 4M x 768
        best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
        best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
        x_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        if X_IN_ONE_TILE:
            # D <= BLOCK_D (MFCC's 39 -> 64): the points' tile is loaded once and stays on chip for all of K.
            dd = tl.arange(0, BLOCK_D)
            x = tl.load(x_rows + dd[None, :] * stride_xd, mask=row_valid[:, None] & (dd < D)[None, :], other=0.0)
            x_sq = tl.sum(x.to(tl.float32) * x.to(tl.float32), 1)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                cT = tl.load(C + ks[None, :] * stride_ck + dd[:, None] * stride_cd,
                             mask=(ks < K)[None, :] & (dd < DC)[:, None], other=0.0)
                dot = tl.dot(x, cT, input_precision=PRECISION)
                best, best_idx = _keep_nearest(dot, CSq, k0, K, best, best_idx, BLOCK_K)
        else:
            # Wide features (HuBERT layer outputs, 768): x.c accumulates over chunks of D for each centroid tile;
            # the point tile is re-read from L1/L2, not DRAM.
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                x = tl.load(x_rows + dd[None, :] * stride_xd, mask=row_valid[:, None] & (dd < D)[None, :],
                            other=0.0).to(tl.float32)
                x_sq += tl.sum(x * x, 1)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                dot = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    dd = d0 + tl.arange(0, BLOCK_D)
                    x = tl.load(x_rows + dd[None, :] * stride_xd, mask=row_valid[:, None] & (dd < D)[None, :],
                                other=0.0)
                    cT = tl.load(C + ks[None, :] * stride_ck + dd[:, None] * stride_cd,
                                 mask=(ks < K)[None, :] & (dd < DC)[:, None], other=0.0)
                    dot = tl.dot(x, cT, dot, input_precision=PRECISION)
                best, best_idx = _keep_nearest(dot, CSq, k0, K, best, best_idx, BLOCK_K)
        tl.store(Labels + rows, best_idx.to(tl.int64), mask=row_valid)
        tl.store(Dists + rows, tl.maximum(best + x_sq, 0.0), mask=row_valid)
        if ACCUMULATE:
            # Lloyd update in the same pass: the tile of points is still in L1/L2, so x is read from DRAM once.
            # Relaxed atomics: nothing reads Sums/Counts before the kernel ends (a launch boundary orders everything),
            # and Triton's default (acq_rel) puts a GPU-wide fence and an L1 invalidate after every atomic.
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + tl.arange(0, BLOCK_D)
                m = row_valid[:, None] & (dd < D)[None, :]
                x = tl.load(x_rows + dd[None, :] * stride_xd, mask=m, other=0.0)
                tl.atomic_add(Sums + best_idx[:, None] * D + dd[None, :], x.to(tl.float32), mask=m, sem="relaxed")
            tl.atomic_add(Counts + best_idx, tl.full([BLOCK_N], 1, dtype=tl.int32), mask=row_valid, sem="relaxed")

    @triton.jit
    def _cluster_sums_kernel(X, Labels, Sums, Counts, N, D, stride_xn, stride_xd,
                             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_valid = rows < N
        labels = tl.load(Labels + rows, mask=row_valid, other=0).to(tl.int32)
        x_rows = X + rows.to(tl.int64)[:, None] * stride_xn
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            m = row_valid[:, None] & (dd < D)[None, :]
            x = tl.load(x_rows + dd[None, :] * stride_xd, mask=m, other=0.0)
            tl.atomic_add(Sums + labels[:, None] * D + dd[None, :], x.to(tl.float32), mask=m, sem="relaxed")
        tl.atomic_add(Counts + labels, tl.full([BLOCK_N], 1, dtype=tl.int32), mask=row_valid, sem="relaxed")


# ------------------------------------------------------------------------------------------------ configs

# Under the interpreter one small fixed tile, so the tests' small odd shapes span several tiles.
INTERPRET_BLOCK = 16
# Feature dims up to this are held in one tile (D padded to a power of two); wider ones are walked in chunks.
MAX_ONE_TILE_D = 128
CHUNK_D = 32  # chunk width for wider features: 64-wide chunks spill at these tiles

# Autotune candidates (BLOCK_N points, BLOCK_K centroids, num_warps, num_stages) per multiply ("tf32x3": fp32 inputs
# at ~fp32 accuracy; "tf32"; "16bit": bf16/fp16) and layout (one tile of D, or D in chunks). Chosen from
# triton_ops/compile_check.py's compile data for sm_80 and sm_90 with the accumulating (fused) variant, the larger:
# none exceeds the target's shared memory or spills more than compile_check.MAX_SPILL_BYTES per thread, which
# tests/test_kernels_compile.py holds them to. 3xTF32 keeps split operands (hi and lo halves) in registers and
# shared memory: its tiles are the smallest. On other GPUs candidates over the shared-memory estimate are dropped;
# with none left, `auto` uses torch and `triton` raises.
CONFIGS = {
    ("tf32x3", True): [(64, 32, 8, 2), (32, 128, 8, 2), (32, 64, 4, 3)],
    ("tf32x3", False): [(128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 2)],
    ("tf32", True): [(128, 128, 8, 3), (128, 64, 8, 2), (64, 128, 4, 3)],
    ("tf32", False): [(128, 128, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
    ("16bit", True): [(128, 128, 8, 3), (128, 64, 8, 2), (64, 128, 4, 3)],
    ("16bit", False): [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3)],
}
VARIANTS = {"fp32": "tf32x3", "tf32": "tf32", "bf16": "16bit", "fp16": "16bit"}

# The GPU whose limits the configs are planned for: triton_ops.gpu_limits (triton_ops/__init__.py).


def _block_d(D):
    """(BLOCK_D, X_IN_ONE_TILE) for feature dim D."""
    if D <= MAX_ONE_TILE_D:
        return max(16, 1 << (D - 1).bit_length()), True
    return (INTERPRET_BLOCK if _interpreting() else CHUNK_D), False


def _variant(dtype, allow_tf32):
    if dtype == torch.float32:
        return "tf32" if allow_tf32 else "fp32"
    return "bf16" if dtype == torch.bfloat16 else "fp16"


def shared_memory_estimate(config, variant, D, arch):
    """Bytes of shared memory an assignment config asks for: the centroid tile per pipeline stage and the points'
    tile, split in two halves under 3xTF32, plus a layout-conversion buffer for the distance tile (an upper bound
    checked against the compiler's figure by tests/test_kernels_compile.py)."""
    bn, bk, _, stages = config
    block_d, _ = _block_d(D)
    elt = 2 if VARIANTS[variant] == "16bit" else 4
    split = 2 if VARIANTS[variant] == "tf32x3" else 1
    tiles = (stages * block_d * bk + bn * block_d) * elt * split
    return tiles + bn * bk * 4


def kernel_configs(device, variant, D):
    """The candidates that fit this device for these inputs (empty if none does)."""
    arch, max_shared = triton_ops.gpu_limits(device)
    return [c for c in CONFIGS[(VARIANTS[variant], _block_d(D)[1])]
            if shared_memory_estimate(c, variant, D, arch) <= max_shared]


_SAID = set()


def kernel_fits(device, variant, D):
    if kernel_configs(device, variant, D):
        return True
    key = (triton_ops.gpu_limits(device), variant, D)
    if key not in _SAID:
        _SAID.add(key)
        arch, max_shared = triton_ops.gpu_limits(device)
        print(f"k-means: no kernel config fits sm_{arch} ({max_shared} B shared memory) for {variant} points of "
              f"{D} dims; using torch", file=sys.stderr, flush=True)
    return False


if HAS_TRITON:
    def _prune(configs, named_args, **kwargs):
        x = named_args["X"]
        variant = "tf32" if (x.dtype == torch.float32 and kwargs["PRECISION"] == "tf32") else _variant(x.dtype, False)
        allowed = set(kernel_configs(x.device, variant, named_args["D"]))
        return [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages) in allowed]

    # reset_to_zero because the accumulating variant adds into Sums/Counts on every trial. BLOCK_D is not tuned:
    # the launcher sets it from D (see _block_d).
    _ASSIGN_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                       for bn, bk, w, s in sorted({c for cs in CONFIGS.values() for c in cs})]
    _assign_tuned = triton.autotune(_ASSIGN_CONFIGS, key=["K", "D", "ACCUMULATE", "PRECISION"],
                                    reset_to_zero=["Sums", "Counts"],
                                    prune_configs_by={"early_config_prune": _prune})(_assign_kernel)

# cluster_sums' one launch config: 64 points x 64 dims per program, 4 warps (128 points spill with 4 warps)
CLUSTER_SUMS_BLOCK = (64, 64, 4)


def _check(x, centroids):
    if x.dim() != 2 or centroids.dim() != 2 or x.shape[1] != centroids.shape[1]:
        raise ValueError(f"k-means: points must be N x D and centroids K x D, got {tuple(x.shape)} and "
                         f"{tuple(centroids.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"k-means kernel: points must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if x.device != centroids.device:
        raise ValueError(f"k-means: points on {x.device} but centroids on {centroids.device}")


def _use_triton(x, allow_tf32=False):
    if BACKEND not in BACKENDS:
        raise ValueError(f"k-means backend (MUSICSSL_KMEANS) must be one of {BACKENDS}, got {BACKEND!r}")
    if BACKEND == "torch":
        return False
    if BACKEND == "auto":
        return (HAS_TRITON and x.is_cuda and x.dtype in SUPPORTED_DTYPES and x.dim() == 2
                and kernel_fits(x.device, _variant(x.dtype, allow_tf32), x.shape[1]))
    if not HAS_TRITON:
        raise RuntimeError("k-means: the Triton backend was requested but `import triton` failed")
    if not x.is_cuda and not _interpreting():
        raise RuntimeError("k-means: the Triton backend on CPU tensors needs TRITON_INTERPRET=1 set before triton "
                           "is imported")
    return True


def _assign_triton(x, centroids, accumulate, allow_tf32):
    _check(x, centroids)
    N, D = x.shape
    K = centroids.shape[0]
    # The dot runs in the points' dtype (bf16/fp16 on tensor cores, fp32 as IEEE or TF32), so the centroids are
    # rounded to it too and ||c||^2 is taken from the rounded values: one consistent distance per pair.
    c = centroids.to(x.dtype)
    c_sq = (c.float() ** 2).sum(1).contiguous()
    # Centroid rows padded with zeros to a multiple of 16 elements (once per call, K x D is small): the kernel reads
    # every centroid tile once per tile of points, and MFCC's 39-element rows would otherwise start at unaligned
    # addresses and load element by element. DC (divisible by 16) bounds the centroid loads; the zero columns add
    # nothing to x.c.
    DC = -(-D // 16) * 16
    if DC != D or not c.is_contiguous():
        c = torch.nn.functional.pad(c, (0, DC - D)).contiguous()
    labels = torch.empty(N, dtype=torch.long, device=x.device)
    dists = torch.empty(N, dtype=torch.float32, device=x.device)
    sums = torch.zeros(K if accumulate else 1, D, dtype=torch.float32, device=x.device)
    counts = torch.zeros(K if accumulate else 1, dtype=torch.int32, device=x.device)
    # fp32: 3xTF32 (~fp32 accuracy on tensor cores; "ieee" runs on FMA units and spills registers at these tiles),
    # or plain TF32 when the caller accepts ~1e-3 relative error in x.c. bf16/fp16 products are exact in fp32.
    precision = "tf32" if (allow_tf32 or x.dtype != torch.float32) else "tf32x3"
    args = (x, c, c_sq, labels, dists, sums, counts, N, K, D, DC, *x.stride(), *c.stride())
    block_d, one_tile = _block_d(D)
    flags = dict(BLOCK_D=block_d, X_IN_ONE_TILE=one_tile, ACCUMULATE=accumulate, PRECISION=precision)
    if _interpreting():
        b = INTERPRET_BLOCK
        _assign_kernel[(triton.cdiv(N, b),)](*args, BLOCK_N=b, BLOCK_K=b, **flags)
    else:
        if not kernel_configs(x.device, _variant(x.dtype, allow_tf32), D):
            arch, max_shared = triton_ops.gpu_limits(x.device)
            raise RuntimeError(f"k-means: no kernel config fits sm_{arch} ({max_shared} B shared memory) for "
                               f"{_variant(x.dtype, allow_tf32)} points of {D} dims; use the torch or auto backend")
        _assign_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](*args, **flags)
    return labels, dists, sums, counts.long()


# ------------------------------------------------------------------------------------------------ entry points

def assign_nearest(x, centroids, allow_tf32=False):
    """x: N x D, centroids: K x D -> (labels int64 N, squared distance float32 N). dists.sum() is the inertia.
    allow_tf32: on the kernel path, let fp32 inputs use TF32 tensor cores (faster; ~1e-3 relative error in x.c,
    which can flip near-ties)."""
    if _use_triton(x, allow_tf32):
        labels, dists, _, _ = _assign_triton(x, centroids, accumulate=False, allow_tf32=allow_tf32)
        return labels, dists
    return assign_nearest_reference(x, centroids)


def cluster_sums(x, labels, k):
    """Per-cluster sums (K x D, float32) and counts (K, int64) for the Lloyd update."""
    if not _use_triton(x):
        return cluster_sums_reference(x, labels, k)
    N, D = x.shape
    if labels.shape != (N,):
        raise ValueError(f"cluster_sums: labels must have shape ({N},), got {tuple(labels.shape)}")
    sums = torch.zeros(k, D, dtype=torch.float32, device=x.device)
    counts = torch.zeros(k, dtype=torch.int32, device=x.device)
    block_n, block_d, warps = (INTERPRET_BLOCK, INTERPRET_BLOCK, 4) if _interpreting() else CLUSTER_SUMS_BLOCK
    _cluster_sums_kernel[(triton.cdiv(N, block_n),)](x, labels.contiguous(), sums, counts, N, D, *x.stride(),
                                                     BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps)
    return sums, counts.long()


def assign_and_sum(x, centroids, allow_tf32=False):
    """One Lloyd iteration's pass over the points: (labels, sqdist, sums K x D float32, counts K int64).
    The kernel path fuses the two; the torch path calls the references one after the other."""
    if _use_triton(x, allow_tf32):
        return _assign_triton(x, centroids, accumulate=True, allow_tf32=allow_tf32)
    labels, dists = assign_nearest_reference(x, centroids)
    sums, counts = cluster_sums_reference(x, labels, centroids.shape[0])
    return labels, dists, sums, counts
