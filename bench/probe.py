"""Speed and memory of probe.py's two stages, on whatever device is there (CPU unless CUDA is available).

    python bench/probe.py --threads 1                   # extraction throughput; one head vs the 84-head sweep
    python bench/probe.py --threads 1 --skip-extraction --clips 512 --windows 9 --rounds 3
    python bench/probe.py --memory 10000,100000         # RssAnon during head training on generated stores

1. Extraction: the frozen encoder (random init, the given architecture) over 30 s windows (GTZAN / MTT / MTG) and
   4 s notes (NSynth), batched as probe.py batches them; clips/s and audio-seconds/s, audio decoding excluded.
2. Heads: one epoch (training and validation) of a single head against one epoch of the --sweep grid (6 lrs x
   {weighted, each state}) on a generated feature store read as probe.py reads it (memmap, batches of 64 clips), in
   alternating rounds, each epoch timed as (3 epochs - 1 epoch) / 2 so set-up and the final test pass cancel;
   medians, their ratio, and the ratio of the two's training arithmetic (the floor where compute is the bound).
3. --memory: for each store size (windows), a fresh process writes a random store and trains one head for one
   epoch from it; prints RssAnon (private memory, /proc/self/status) before and its peak during training.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import Encoder  # noqa: E402
from probing import models, runs, tasks  # noqa: E402
import probing.clips as pc  # noqa: E402
import probing.heads as probe_heads  # noqa: E402
import probing.features as pf  # noqa: E402


def bench_extraction(encoder, device, seconds, clips, per_batch):
    rng = np.random.default_rng(0)
    windows = [rng.standard_normal(int(seconds * 16000)).astype(np.float32) for _ in range(clips)]
    pf.pooled_hidden_states(encoder, windows[:1], device)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(0, clips, per_batch):
        pf.pooled_hidden_states(encoder, windows[s:s + per_batch], device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return clips / dt, clips * seconds / dt


def random_store(folder, n_clips, windows, states, dim, seed=0):
    """A feature store of n_clips clips of `windows` random rows each, written as extraction writes it."""
    key = pf.cache_key(f"bench-{n_clips}x{windows}", pf.Extraction())
    store = pf.FeatureStore(folder, key, (states, dim), write=True)
    rng = np.random.default_rng(seed)
    step = max(1, (64 << 20) // (windows * states * dim * 4))  # about 64 MB of float32 per append
    for c0 in range(0, n_clips, step):
        store.append([(f"clip{c}", rng.standard_normal((windows, states, dim), dtype=np.float32))
                      for c in range(c0, min(n_clips, c0 + step))])
    store.close()
    return pf.FeatureStore(folder, key)


def splits(store, n_train, n_eval, classes, seed=0):
    rng = np.random.default_rng(seed)
    bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_eval),
              "test": (n_train + n_eval, n_train + 2 * n_eval)}
    return {s: pc.SplitData(*store.item_rows([f"clip{c}" for c in range(a, b)])[:2],
                               torch.from_numpy(rng.integers(0, classes, b - a)))
            for s, (a, b) in bounds.items()}


def head_flops(rows, states, dim, classes, weighted, single):
    """Multiply-adds x 2 of one training pass over `rows` rows: forward, weight gradients, and the gradient into the
    mixed input for weighted heads (single-state heads need none: their input is data)."""
    first, second = rows * dim * probing.heads.HIDDEN, rows * probing.heads.HIDDEN * classes
    mix = rows * states * dim
    return 2 * (weighted * (3 * first + 3 * second + 2 * mix) + single * (2 * first + 3 * second))


def bench_heads(args, device):
    states, dim, classes = args.states, args.dim, 10
    n_eval = max(16, args.clips // 8)
    with tempfile.TemporaryDirectory() as tmp:
        store = random_store(tmp, args.clips + 2 * n_eval, args.windows, states, dim)
        data = splits(store, args.clips, n_eval, classes)
        rows = pf.Rows(store, device, runs.FEATURES_ON_DEVICE_BYTES)
        task = tasks.Task(reader=None, kind="multiclass", num_classes=classes, metrics=("acc",), epochs=3,
                          patience=100, plateau_patience=100)
        grids = {"one head": (["all"], [1e-3]), "sweep": (["all"] + list(range(states)), list(runs.SWEEP_LRS))}
        times = {name: [] for name in grids}

        def seconds(choices, lrs, epochs):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            pc.train_heads(task, rows, data, choices, lrs, epochs, 0, device, log=lambda *a: None)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        seconds(["all"], [1e-3], 1)  # warm-up
        for r in range(args.rounds):
            for name in (grids if r % 2 == 0 else reversed(list(grids))):  # alternate which runs first
                # one epoch (training + validation) = 3 epochs - 1 epoch, over 2: set-up and the final test pass cancel
                times[name].append((seconds(*grids[name], 3) - seconds(*grids[name], 1)) / 2)
    train_rows = args.clips * args.windows
    flops = {"one head": head_flops(train_rows, states, dim, classes, 1, 0),
             "sweep": head_flops(train_rows, states, dim, classes, 6, 6 * states)}
    return {n: float(np.median(t)) for n, t in times.items()}, times, flops


def memory_child(windows, per_clip, states, dim):
    """Runs in a fresh process: write a store, train one head for one epoch, report RssAnon (MiB)."""
    def rss():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024
    n_clips = windows // per_clip
    with tempfile.TemporaryDirectory() as tmp:
        store = random_store(tmp, n_clips, per_clip, states, dim)
        n_eval = min(1000, n_clips // 10)
        data = splits(store, n_clips - 2 * n_eval, n_eval, 50)
        rows = pf.Rows(store, "cpu", 0)
        task = tasks.Task(reader=None, kind="multiclass", num_classes=50,
                          metrics=("acc",), epochs=1, patience=1, plateau_patience=1)
        before, peak = rss(), [0.0]

        def sampled(r):
            peak[0] = max(peak[0], rss())
            return rows(r)

        t0 = time.perf_counter()
        pc.train_heads(task, sampled, data, ["all"], [1e-3], 1, 0, "cpu", log=lambda *a: None)
        peak[0] = max(peak[0], rss())
        print(json.dumps(dict(windows=store.rows, clips=n_clips, store_mib=round(store.rows * store.row_bytes / 2**20),
                              float32_mib=round(store.rows * store.row_bytes * 2 / 2**20),
                              rss_anon_before_mib=round(before, 1), rss_anon_peak_mib=round(peak[0], 1),
                              seconds=round(time.perf_counter() - t0, 1))))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="hubert_base", choices=sorted(models.MODEL_CONFIGS))
    p.add_argument("--clips", type=int, default=512, help="training clips for the head benchmark (30 s clips for "
                   "extraction: --extract-clips)")
    p.add_argument("--windows", type=int, default=1, help="windows per clip in the head benchmark (MTG: ~9)")
    p.add_argument("--states", type=int, default=13)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of one head / sweep (medians)")
    p.add_argument("--extract-clips", type=int, default=4, help="30 s clips to time (4 s notes: 4x as many)")
    p.add_argument("--batch", type=int, default=2, help="30 s windows per encoder call (notes: 8x as many)")
    p.add_argument("--skip-extraction", action="store_true")
    p.add_argument("--memory", default=None, help="comma-separated store sizes in windows, e.g. 10000,100000")
    p.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--per-clip", type=int, default=10, help="--memory: windows per clip")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args.memory_child, args.per_clip, args.states, args.dim)
    if args.memory:
        print(f"RssAnon during one epoch of one head, {args.states} x {args.dim} rows, {args.per_clip} windows a clip")
        for n in [int(v) for v in args.memory.split(",")]:
            out = subprocess.run([sys.executable, __file__, "--memory-child", str(n), "--per-clip", str(args.per_clip),
                                  "--states", str(args.states), "--dim", str(args.dim),
                                  "--threads", str(args.threads or 1)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{r['windows']:>8d} windows ({r['store_mib']} MiB float16 on disk, {r['float32_mib']} MiB as "
                  f"float32): RssAnon {r['rss_anon_before_mib']:.0f} MiB before training, peak "
                  f"{r['rss_anon_peak_mib']:.0f} MiB (+{r['rss_anon_peak_mib'] - r['rss_anon_before_mib']:.0f}); "
                  f"{r['seconds']} s")
        return
    cpu = f"CPU, {torch.get_num_threads()} threads"
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu
    if not args.skip_extraction:
        torch.manual_seed(0)
        encoder = Encoder(models.MODEL_CONFIGS[args.config]()).eval().to(args.device)
        cfg = encoder.cfg
        print(f"{args.config} encoder ({cfg.layers} layers, dim {cfg.dim}) on {where}")
        for seconds, clips, per_batch in ((30.0, args.extract_clips, args.batch),
                                          (4.0, 4 * args.extract_clips, 8 * args.batch)):
            cps, aps = bench_extraction(encoder, args.device, seconds, clips, per_batch)
            print(f"extraction, {seconds:>4g} s clips, {per_batch:2d} per batch: {cps:7.2f} clips/s  "
                  f"{aps:8.1f} audio-s/s")
        args.states, args.dim = cfg.layers + 1, cfg.dim
    med, times, flops = bench_heads(args, args.device)
    t1, tg = med["one head"], med["sweep"]
    heads = 6 * (args.states + 1)
    print(f"heads on {where}, one epoch over {args.clips} clips x {args.windows} windows ({args.states} x {args.dim} "
          f"features, float16 memmap), medians of {args.rounds} alternating rounds: one head {t1:.2f} s, the "
          f"{heads}-head sweep {tg:.2f} s = {tg / t1:.1f}x one head (arithmetic: "
          f"{flops['sweep'] / flops['one head']:.0f}x; {heads} separate runs: {heads}x); sweep at "
          f"{flops['sweep'] / tg / 1e9:.0f} GFLOP/s of training matmuls")
    print("rounds:", {n: [round(x, 2) for x in t] for n, t in times.items()})


if __name__ == "__main__":
    main()
