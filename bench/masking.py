"""Span-mask generation: our vectorised torch `span_mask` against a per-row numpy loop with fairseq's semantics.

    python bench/masking.py [--batch 64 --frames 1500 --repeat 20 --rounds 9 --threads 1]

The loop below is written from the reference's documented behaviour (spec pretrain.md §2: compute_mask_indices,
static lengths, overlaps allowed, require_same_masks); the tests use it as the statistical reference too.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import span_mask  # noqa: E402


def span_mask_numpy_loop(shape, mask_prob, mask_length, min_masks=2, lengths=None, same_count=True, rng=None):
    """Per-row reference, structured as fairseq's compute_mask_indices (spec §2): a fresh numpy Generator per row
    (fairseq builds one per row; with rng given, one shared Generator keeps the test reproducible), choice without
    replacement, span expansion by list comprehension, np.unique, then a second loop for the trimming."""
    B, T = shape
    rows = []
    for i in range(B):
        row_rng = rng if rng is not None else np.random.default_rng()
        sz = T if lengths is None else int(lengths[i])
        num = max(min_masks, int(mask_prob * sz / float(mask_length) + row_rng.random()))
        span_lengths = np.full(num, mask_length)
        min_len = min(span_lengths)
        if sz - min_len <= num:
            min_len = sz - num - 1
        starts = row_rng.choice(sz - min_len, num, replace=False)
        idx = np.asarray([starts[j] + offset for j in range(len(starts)) for offset in range(span_lengths[j])])
        rows.append(np.unique(idx[idx < sz]))
    target = min(len(r) for r in rows)
    mask = np.zeros((B, T), dtype=bool)
    for i, r in enumerate(rows):
        if same_count and len(r) > target:
            r = (rng if rng is not None else np.random.default_rng()).choice(r, target, replace=False)
        mask[i, r] = True
    return mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--frames", type=int, default=1500)
    ap.add_argument("--repeat", type=int, default=20, help="calls per round")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--mask-prob", type=float, default=0.65)
    ap.add_argument("--mask-length", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the numpy loop runs on one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = (args.batch, args.frames)
    gen = torch.Generator().manual_seed(0)

    loop = lambda: span_mask_numpy_loop(shape, args.mask_prob, args.mask_length)
    ours = lambda: span_mask(shape, args.mask_prob, args.mask_length, generator=gen)
    loop(), ours()  # warm-up
    # rounds alternate between the two, so a slow spell of a shared machine hits both; medians of the rounds
    rounds = {loop: [], ours: []}
    for _ in range(args.rounds):
        for fn, times in rounds.items():
            t = time.perf_counter()
            for _ in range(args.repeat):
                fn()
            times.append((time.perf_counter() - t) / args.repeat)
    t_loop, t_ours = (statistics.median(rounds[fn]) for fn in (loop, ours))
    print(f"span_mask {args.batch}x{args.frames} p={args.mask_prob} L={args.mask_length} on CPU "
          f"({torch.get_num_threads()} threads)")
    print(f"  numpy per-row loop (fairseq structure):   {t_loop * 1e3:8.2f} ms")
    print(f"  span_mask (vectorised torch):             {t_ours * 1e3:8.2f} ms")
    print(f"  speed-up: {t_loop / t_ours:.1f}x (target >= 20x)")


if __name__ == "__main__":
    main()
