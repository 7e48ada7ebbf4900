"""Speed of probe.py's two stages, on whatever device is there (CPU unless CUDA is available).

    python bench/probe.py                      # base encoder: extraction throughput; heads: one vs the sweep grid
    python bench/probe.py --config tiny --clips 4

1. Extraction: the frozen encoder (random init, the given architecture) over 30 s windows (GTZAN / MTT / MTG) and
   4 s notes (NSynth), batched as probe.py batches them; clips/s and audio-seconds/s, audio decoding excluded.
2. Heads: one epoch of a single head against one epoch of the --sweep grid (6 lrs x {weighted, each state}) on
   random cached features, to show what training the grid together costs against one head.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import probe  # noqa: E402


def bench_extraction(encoder, device, seconds, clips, per_batch):
    rng = np.random.default_rng(0)
    windows = [rng.standard_normal(int(seconds * 16000)).astype(np.float32) for _ in range(clips)]
    probe.pooled_hidden_states(encoder, windows[:1], device)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(0, clips, per_batch):
        probe.pooled_hidden_states(encoder, windows[s:s + per_batch], device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return clips / dt, clips * seconds / dt


def bench_heads(states, dim, classes, rows, device, lrs):
    g = torch.Generator().manual_seed(0)
    task = probe.Task(reader=None, kind="multiclass", num_classes=classes, metrics=("acc",), epochs=1, patience=1,
                      plateau_patience=1)
    n = rows // 2
    split = lambda: (torch.randn(2 * n, states, dim, generator=g), torch.arange(n).repeat_interleave(2),
                     torch.randint(0, classes, (n,), generator=g))
    data = {"train": split(), "valid": split(), "test": split()}
    times = {}
    for name, grid in (("one head", [("all", 1e-3)]),
                       ("sweep", [(c, lr) for lr in lrs for c in ["all"] + list(range(states))])):
        t0 = time.perf_counter()
        probe.train_heads(task, data, [c for c, _ in grid], [lr for _, lr in grid], 1, 0, device, log=lambda *a: None)
        times[name] = (time.perf_counter() - t0, len(grid))
    return times


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="hubert_base", choices=sorted(probe.MODEL_CONFIGS))
    p.add_argument("--clips", type=int, default=4, help="30 s clips to time (4 s notes: 4x as many)")
    p.add_argument("--batch", type=int, default=2, help="30 s windows per encoder call (notes: 8x as many)")
    p.add_argument("--rows", type=int, default=2048, help="training windows for the head benchmark")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = probe.Encoder(probe.MODEL_CONFIGS[args.config]()).eval().to(args.device)
    cfg = encoder.cfg
    cpu = f"CPU, {torch.get_num_threads()} threads"
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    print(f"{args.config} encoder ({cfg.layers} layers, dim {cfg.dim}) on {where}")
    for seconds, clips, per_batch in ((30.0, args.clips, args.batch), (4.0, 4 * args.clips, 8 * args.batch)):
        cps, aps = bench_extraction(encoder, args.device, seconds, clips, per_batch)
        print(f"extraction, {seconds:>4g} s clips, {per_batch:2d} per batch: {cps:7.2f} clips/s  "
              f"{aps:8.1f} audio-s/s")
    times = bench_heads(cfg.layers + 1, cfg.dim, 10, args.rows, args.device, probe.SWEEP_LRS)
    (t1, _), (tg, heads) = times["one head"], times["sweep"]
    print(f"heads, one epoch over {args.rows} windows: one head {t1:.2f} s, the {heads}-head sweep grid {tg:.2f} s "
          f"({tg / t1:.1f}x one head, against {heads}x for {heads} separate runs)")


if __name__ == "__main__":
    main()
