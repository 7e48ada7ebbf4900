"""Cost of exact mp3 crops: load_audio (seek mp3_seek_margin early, drop the margin) against a plain seek and read
(python-soundfile; wrong after a seek, see data/audio.py) and against decoding from the file's start (exact, no seek).

    python bench/mp3_crop.py [--minutes 10 --crop 10 --crops 20 --sr 44100 --signal tone|noise]

Writes one mp3 with libsndfile's default LAME settings (a mono 440 Hz tone, the case the fault was found on, or
stereo noise) to a temporary folder, then times random crops at the file's own rate
(no resampling, so only decoding is measured) in alternating rounds, and prints ms per crop, the ratios and the
largest difference of each method from the whole-file decode.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.audio import load_audio, mp3_seek_margin  # noqa: E402


def plain_seek(path, start, frames):
    with sf.SoundFile(path) as f:
        f.seek(start)
        return f.read(frames, dtype="float32", always_2d=True).mean(axis=1)


def from_start(path, start, frames):
    return sf.read(path, frames=start + frames, dtype="float32", always_2d=True)[0][start:].mean(axis=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--crop", type=float, default=10.0, help="seconds per crop")
    p.add_argument("--crops", type=int, default=20)
    p.add_argument("--sr", type=int, default=44100)
    p.add_argument("--signal", choices=("tone", "noise"), default="tone")
    args = p.parse_args()
    sr, n = args.sr, int(args.minutes * 60 * args.sr)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "track.mp3")
        if args.signal == "tone":
            x = 0.5 * np.sin(2 * np.pi * 440 * np.arange(n) / sr)
        else:
            x = 0.3 * np.random.default_rng(0).standard_normal((n, 2))
        sf.write(path, x.astype(np.float32), sr)
        whole = sf.read(path, dtype="float32", always_2d=True)[0].mean(axis=1)
        frames = int(args.crop * sr)
        starts = np.random.default_rng(1).integers(1, len(whole) - frames, args.crops)
        methods = {"load_audio": lambda s: load_audio(path, sr=sr, start=int(s), frames=frames),
                   "plain seek": lambda s: plain_seek(path, int(s), frames),
                   "decode from start": lambda s: from_start(path, int(s), frames)}
        times = {m: 0.0 for m in methods}
        error = {m: 0.0 for m in methods}
        for s in starts:  # alternating rounds: the methods see the same load and the same file cache
            for m, fn in methods.items():
                t0 = time.perf_counter()
                y = fn(s)
                times[m] += time.perf_counter() - t0
                error[m] = max(error[m], float(np.abs(y - whole[s:s + len(y)]).max()))
    ms = {m: 1000 * t / args.crops for m, t in times.items()}
    print(f"{args.crops} random {args.crop:g} s crops of a {args.minutes:g}-minute {sr} Hz mp3 ({args.signal}) "
          f"(margin {mp3_seek_margin(sr)} samples = {mp3_seek_margin(sr) / sr:.2f} s)")
    for m in methods:
        print(f"  {m:18s} {ms[m]:7.1f} ms/crop  {ms[m] / ms['plain seek']:5.2f}x plain seek  "
              f"max |crop - whole decode| {error[m]:.1e}")


if __name__ == "__main__":
    main()
