"""Memory and decoding cost of probe.py's beat tracking (probing/frames.py), on CPU.

    python bench/probe_beat.py --memory 110,330     # RssAnon while a base-size beat head trains from frame stores
    python bench/probe_beat.py --decode 200         # madmom's DBN on 30 s activations: ms per track, one core

1. --memory: for each size (tracks of 1,502 frames x 13 x 768, float16: 30 MB a track, GTZAN's shape), a fresh
   process writes a random frame store under --dir (kept for later runs), then trains one head for one epoch (random
   10 s crops, batches of 64 tracks) and scores 20 valid and 20 test tracks with the DBN; it prints RssAnon (private
   memory, /proc/self/status) before, and its peak during, sampled every 10 ms. Flat across sizes means the store
   is read through the memmap, not loaded.
2. --decode: the per-epoch validation cost, which grows with heads x valid tracks (a GTZAN sweep: 84 x 197).
"""
import argparse
import os
import subprocess
import sys
import threading
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import probing.features as pf  # noqa: E402
import probing.frames as pfr  # noqa: E402

FRAMES, STATES, DIM, EVAL_TRACKS = 1502, 13, 768, 20


def rss_anon_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon"):
                return int(line.split()[1]) / 1024


def memory_one(tracks, folder):
    path = os.path.join(folder, f"frames_{tracks}")
    key = dict(bench="probe_beat", tracks=tracks)
    if not os.path.exists(os.path.join(path, "index.jsonl")):
        store = pf.FeatureStore(path, key, (STATES, DIM), write=True)
        block = np.random.default_rng(0).standard_normal((FRAMES, STATES, DIM)).astype(np.float16)
        for i in range(tracks):
            store.write_part(block)
            store.commit(f"t{i}")
        store.close()
    store = pf.FeatureStore(path, key)
    clips = [types.SimpleNamespace(key=f"t{i}", label=np.arange(0.3, 30, 0.5)) for i in range(tracks)]
    n = tracks - 2 * EVAL_TRACKS
    data = dict(train=pfr.beat_split(store, clips[:n], 50.0),
                valid=pfr.beat_split(store, clips[n:n + EVAL_TRACKS], 50.0),
                test=pfr.beat_split(store, clips[n + EVAL_TRACKS:], 50.0))
    labels = pfr.train_labels(store.rows, data["train"], 50.0)
    rows = pf.Rows(store, "cpu", 0)
    task = types.SimpleNamespace(patience=20, plateau_patience=6)
    before = rss_anon_mib()
    peak, done = [before], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_mib())
            time.sleep(0.01)

    th = threading.Thread(target=watch)
    th.start()
    t0 = time.time()
    pfr.train_beat_heads(task, rows, data, labels, ["all"], [1e-3], 1, 0, "cpu", 50.0, pfr.Decoder(workers=1),
                         log=lambda *a: None)
    done.set()
    th.join()
    print(f"{tracks} tracks ({os.path.getsize(store.data_path) / 1e9:.1f} GB store): RssAnon {before:.0f} MiB before, "
          f"peak {peak[0]:.0f} MiB during one epoch + scoring (+{peak[0] - before:.0f} MiB); {time.time() - t0:.0f} s")


def decode(tracks):
    rng = np.random.default_rng(0)
    acts = []
    for _ in range(tracks):
        act = np.clip(0.05 + 0.1 * rng.standard_normal(1501), 0, 1).astype(np.float32)
        act[rng.integers(5, 30)::int(rng.integers(18, 35))] = 0.8
        acts.append(act)
    pfr.decode_beats(acts[0], 50.0)
    t0 = time.perf_counter()
    for a in acts:
        pfr.decode_beats(a, 50.0)
    ms = 1000 * (time.perf_counter() - t0) / tracks
    print(f"DBN: {ms:.1f} ms per 30 s track on one core; a GTZAN sweep's first validation (84 heads x 197 tracks): "
          f"{84 * 197 * ms / 1000:.0f} CPU-s")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", default=None, help="comma-separated store sizes in tracks, e.g. 110,330")
    p.add_argument("--decode", type=int, default=None, help="tracks to decode")
    p.add_argument("--dir", default="runs/bench_probe_beat", help="where the generated stores go")
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: one size, this process
    args = p.parse_args()
    if args.one:
        return memory_one(args.one, args.dir)
    if args.memory:
        for n in [int(v) for v in args.memory.split(",")]:
            subprocess.run([sys.executable, __file__, "--one", str(n), "--dir", args.dir], check=True)
    if args.decode:
        decode(args.decode)


if __name__ == "__main__":
    main()
