"""Memory of probe.py's MTG-Jamendo tasks at full scale: the four split-0 subsets together hold 55,525 tracks and
~479k 30 s windows. Peer: the same run on a tenth of every split list, in its own fresh process.

    python bench/probe_mtg.py --splits ~/data/mtg/mtg-jamendo-dataset   # the real split-0 files (durations from them)
    python bench/probe_mtg.py                                           # generated files of the same sizes

Each process writes a feature store with one random row per 30 s window of every track (as extraction would: the
window count from the track's DURATION, a last window kept from 1 s), then for each of the four tasks does what
probe.py does after extraction: reads the split files, opens the store (extract() finds every track there), builds
the splits, and trains one head for one epoch with validation and test. It prints RssAnon (private memory) after the
store is written and its peak during each task, sampled every millisecond. Rows are the tiny encoder's (3 states x 64
dims): a base model's 13 x 768 only changes the store's size on disk, which is memory-mapped, not private memory.
Audio decoding is not part of this: tests/test_probe_mtg.py measures a 10-minute track.
"""
import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import Encoder  # noqa: E402
from probing import models, tasks  # noqa: E402
import probing.clips as pc  # noqa: E402
import probing.features as pf  # noqa: E402
from data import downstream  # noqa: E402

# split-0 as distributed (counted): tracks per split and tags per subset
SIZES = {"instrument": (14395, 5466, 5115, 40), "moodtheme": (9949, 3802, 4231, 56),
         "genre": (32572, 11043, 11479, 87), "top50tags": (32136, 10888, 11356, 50)}
FILES = ("train", "validation", "test")


def rss_anon():
    with open("/proc/self/status") as f:
        return int(re.search(r"RssAnon:\s+(\d+)", f.read()).group(1)) / 1024


def generated_splits(folder, fraction, seed=0):
    """Split files in the distributed format with split-0's sizes: 55,525 distinct tracks, the subsets overlapping,
    durations drawn around MTG's ~4 minutes."""
    rng = np.random.default_rng(seed)
    durations = np.clip(rng.lognormal(np.log(230), 0.45, 55525), 30, 1800).round(1)
    order = {name: rng.permutation(55525) for name in SIZES}
    for name, (*sizes, n_tags) in SIZES.items():
        start = 0
        for split, n in zip(FILES, sizes):
            rows = order[name][start:start + n][:max(1, int(n * fraction))]
            start += n
            lines = ["TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS"]
            for t in rows:
                tags = rng.choice(n_tags, size=1 + rng.integers(0, 3), replace=False)
                lines.append(f"track_{t:07d}\tartist_{t % 3565:06d}\talbum_{t % 5000:06d}\t{t % 100:02d}/{t}.mp3\t"
                             f"{durations[t]}\t" + "\t".join(f"{name}---tag{k:02d}" for k in tags))
            with open(os.path.join(folder, f"autotagging_{name}-{split}.tsv"), "w", newline="") as f:
                f.write("\r\n".join(lines) + "\r\n")


def real_splits(src, folder, fraction):
    for name in SIZES:
        for split in FILES:
            with open(os.path.join(src, f"autotagging_{name}-{split}.tsv"), newline="") as f:
                lines = f.read().split("\r\n")
            body = [line for line in lines[1:] if line]
            with open(os.path.join(folder, f"autotagging_{name}-{split}.tsv"), "w", newline="") as f:
                f.write("\r\n".join([lines[0]] + body[:max(1, int(len(body) * fraction))]) + "\r\n")


def windows_of(seconds):
    """probe.py's 30 s windows over a track of this length: whole windows, and a last one from 1 s."""
    return int(seconds // 30) + (seconds % 30 >= 1)


def child(args):
    with tempfile.TemporaryDirectory() as tmp:
        splits = os.path.join(tmp, "mtg-jamendo-dataset", "data", "splits", "split-0")
        os.makedirs(splits)
        if args.splits:
            real_splits(os.path.join(args.splits, "data", "splits", "split-0"), splits, args.fraction)
        else:
            generated_splits(splits, args.fraction)
        durations = {}
        for name in SIZES:
            for split in FILES:
                path = os.path.join(splits, f"autotagging_{name}-{split}.tsv")
                with open(path, newline="") as f:
                    for line in f.read().split("\r\n")[1:]:
                        if line:
                            fields = line.split("\t")
                            durations[downstream.mtg_audio(fields[3])] = float(fields[4])
        encoder = Encoder(models.MODEL_CONFIGS["tiny"]())
        states, dim = encoder.cfg.layers + 1, encoder.cfg.dim
        ext = pf.Extraction()
        key = pf.cache_key("bench", ext)
        store_dir = os.path.join(tmp, "store")
        store = pf.FeatureStore(store_dir, key, (states, dim), write=True)
        rng = np.random.default_rng(0)
        batch = []
        for clip_key, seconds in durations.items():
            batch.append((clip_key, rng.standard_normal((max(1, windows_of(seconds)), states, dim), np.float32)))
            if len(batch) == 512:
                store.append(batch)
                batch = []
        store.append(batch)
        store.close()
        base = rss_anon()
        peak, stop = [base], []

        def poll():
            while not stop:
                peak[0] = max(peak[0], rss_anon())
                time.sleep(0.001)
        threading.Thread(target=poll, daemon=True).start()
        out = dict(tracks=len(durations), windows=int(sum(max(1, windows_of(s)) for s in durations.values())),
                   rss_anon_baseline_mib=round(base), tasks={})
        for name, task_name in (("instrument", "mtg_instrument"), ("moodtheme", "mtg_moodtheme"),
                                ("genre", "mtg_genre"), ("top50tags", "mtg_top50")):
            t0, peak[0] = time.time(), rss_anon()
            listing = downstream.read_mtg(tmp, name)
            task = dataclasses.replace(tasks.TASKS[task_name], num_classes=len(listing.labels), epochs=1)
            failed = pf.extract(ext, listing.clips, encoder, store_dir, key, "cpu", 60.0, log=lambda *a: None)
            assert not failed
            s = pf.FeatureStore(store_dir, key)
            data = {split: pc.split_data(s, [c for c in listing.clips if c.split == split], task)
                    for split in ("train", "valid", "test")}
            rows = pf.Rows(s, "cpu", 0)
            pc.train_heads(task, rows, data, ["all"], [1e-3], 1, 0, "cpu", log=lambda *a: None)
            out["tasks"][task_name] = dict(tracks=len(listing.clips), tags=len(listing.labels),
                                           windows=int(sum(d.counts.sum() for d in data.values())),
                                           rss_anon_peak_mib=round(peak[0]), seconds=round(time.time() - t0, 1))
            del listing, data, rows, s
        stop.append(1)
        print(json.dumps(out))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--splits", default=None, help="a clone of mtg-jamendo-dataset (its data/splits/split-0 is read)")
    p.add_argument("--fraction", type=float, default=None, help=argparse.SUPPRESS)  # the child's share of the lists
    args = p.parse_args()
    if args.fraction is not None:
        return child(args)
    results = {}
    for fraction in (0.1, 1.0):
        cmd = [sys.executable, __file__, "--fraction", str(fraction)] + (["--splits", args.splits] if args.splits
                                                                         else [])
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        results[fraction] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[fraction]
        print(f"{fraction:>4} of the lists: {r['tracks']} tracks, {r['windows']} windows; RssAnon baseline "
              f"{r['rss_anon_baseline_mib']} MiB; peak per task: " + ", ".join(
                  f"{t} {v['rss_anon_peak_mib']} MiB ({v['windows']} windows, {v['seconds']} s)"
                  for t, v in r["tasks"].items()))
    small, full = results[0.1], results[1.0]
    grow = max(v["rss_anon_peak_mib"] for v in full["tasks"].values()) - full["rss_anon_baseline_mib"]
    grow_small = max(v["rss_anon_peak_mib"] for v in small["tasks"].values()) - small["rss_anon_baseline_mib"]
    print(f"peak above the baseline: full lists {grow} MiB, a tenth {grow_small} MiB: ratio "
          f"{grow / max(grow_small, 1):.2f} for {full['windows'] / small['windows']:.1f}x the windows")


if __name__ == "__main__":
    main()
