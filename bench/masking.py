"""Span-mask generation: our vectorised torch `span_mask` against a per-row numpy loop with fairseq's semantics.

    python bench/masking.py [--batch 64 --frames 1500 --repeat 20]

The loop below is written from the reference's documented behaviour (spec pretrain.md §2: compute_mask_indices,
static lengths, overlaps allowed, require_same_masks); the tests use it as the statistical reference too.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import span_mask  # noqa: E402


def span_mask_numpy_loop(shape, mask_prob, mask_length, min_masks=2, lengths=None, same_count=True, rng=None):
    """Per-row reference: one RNG draw sequence per row, np.random choice without replacement, then trimming."""
    rng = rng or np.random.default_rng()
    B, T = shape
    rows = []
    for i in range(B):
        sz = T if lengths is None else int(lengths[i])
        num = max(min_masks, int(mask_prob * sz / float(mask_length) + rng.random()))
        min_len = mask_length
        if sz - min_len <= num:
            min_len = sz - num - 1
        starts = rng.choice(sz - min_len, num, replace=False)
        idx = np.unique((starts[:, None] + np.arange(mask_length)[None, :]).ravel())
        rows.append(idx[idx < sz])
    target = min(len(r) for r in rows)
    mask = np.zeros((B, T), dtype=bool)
    for i, r in enumerate(rows):
        if same_count and len(r) > target:
            r = rng.choice(r, target, replace=False)
        mask[i, r] = True
    return mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--frames", type=int, default=1500)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--mask-prob", type=float, default=0.65)
    ap.add_argument("--mask-length", type=int, default=10)
    args = ap.parse_args()
    shape = (args.batch, args.frames)
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)

    def timed(fn):
        fn()  # warm-up
        t = time.perf_counter()
        for _ in range(args.repeat):
            fn()
        return (time.perf_counter() - t) / args.repeat

    t_loop = timed(lambda: span_mask_numpy_loop(shape, args.mask_prob, args.mask_length, rng=rng))
    t_ours = timed(lambda: span_mask(shape, args.mask_prob, args.mask_length, generator=gen))
    print(f"span_mask {args.batch}x{args.frames} p={args.mask_prob} L={args.mask_length} on CPU "
          f"({torch.get_num_threads()} threads)")
    print(f"  numpy per-row loop (reference semantics): {t_loop * 1e3:8.2f} ms")
    print(f"  span_mask (vectorised torch):             {t_ours * 1e3:8.2f} ms")
    print(f"  speed-up: {t_loop / t_ours:.1f}x (target >= 20x)")


if __name__ == "__main__":
    main()
