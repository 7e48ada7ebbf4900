"""Is probe.py's extraction at its bound? Audio-hours per hour of (a) decoding alone with the same --workers
processes, (b) the encoder alone on audio decoded beforehand, (c) extraction end to end (probing.features.extract:
decoding processes feeding the encoder, rows into a feature store), in one run, on generated mp3 and wav files.

    python bench/probe_extract.py [--formats mp3,wav --clips 16 --seconds 30 --config tiny --workers N --device cpu]

Goal: (c) >= 0.9 x min(a, b): the encoder never waits for audio when the decoders can keep up, and the decoders
are not slowed by the process that runs the encoder. On a CPU-only machine the encoder and the decoders share the
same cores, so (c) falls below min(a, b) by what they take from each other; on a GPU they do not.
The mp3s are 44.1 kHz stereo (MTG-Jamendo's audio-low, GiantSteps' previews), decoded, mixed to mono and resampled
to 16 kHz; the wavs are 16 kHz mono (NSynth), where decoding is nearly free.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.audio import SAMPLE_RATE  # noqa: E402
from data.downstream import Clip  # noqa: E402
from model import Encoder  # noqa: E402
from probing import features as pf  # noqa: E402
from probing.models import MODEL_CONFIGS  # noqa: E402


def make_clips(folder, fmt, n, seconds):
    """n files of `seconds` of a few tones over noise, different in each."""
    sr, channels = (44100, 2) if fmt == "mp3" else (SAMPLE_RATE, 1)
    clips = []
    for i in range(n):
        rng = np.random.default_rng(i)
        t = np.arange(int(seconds * sr)) / sr
        x = sum(0.1 * np.sin(2 * np.pi * f * t) for f in rng.uniform(80, 2000, 4)) + 0.05 * rng.standard_normal(len(t))
        x = np.stack([x, np.roll(x, 7)], 1)[:, :channels].astype(np.float32)
        path = os.path.join(folder, f"{fmt}{i:03d}.{fmt}")
        sf.write(path, x, sr, **({"format": "MP3"} if fmt == "mp3" else {"subtype": "PCM_16"}))
        clips.append(Clip(key=os.path.basename(path), path=path, split="train", label=0))
    return clips


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def decode_only(clips, ext, workers):
    import functools
    t0 = time.perf_counter()
    windows = [w for _, (ws, err) in pf.decode_ahead(functools.partial(pf._read_windows, ext=ext), clips, workers)
               for w in ws]
    return time.perf_counter() - t0, windows


def encoder_only(encoder, windows, device, batch_seconds):
    budget, calls, call = batch_seconds * SAMPLE_RATE, [], []
    for w in windows:
        if call and sum(len(x) for x in call) + len(w) > budget:
            calls.append(call)
            call = []
        call.append(w)
    calls.append(call)
    pf.pooled_hidden_states(encoder, calls[0], device)  # warm-up (kernels, allocator)
    sync(device)
    t0 = time.perf_counter()
    for c in calls:
        pf.pooled_hidden_states(encoder, c, device)
    sync(device)
    return time.perf_counter() - t0


def end_to_end(encoder, clips, ext, device, batch_seconds, workers, folder):
    key = pf.cache_key("bench", ext)
    path = os.path.join(folder, f"store-{time.monotonic_ns()}")
    t0 = time.perf_counter()
    failed = pf.extract(ext, clips, encoder, path, key, device, batch_seconds, log=lambda *a: None, workers=workers)
    sync(device)
    assert not failed, failed
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", default="mp3,wav")
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--seconds", type=float, default=30.0, help="seconds per clip (one 30 s window each)")
    p.add_argument("--config", default=None, choices=sorted(MODEL_CONFIGS),
                   help="encoder architecture, random weights (default: hubert_base on a GPU, tiny on the CPU)")
    p.add_argument("--workers", type=int, default=pf.default_workers(), help="decoding processes (probe.py's default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-seconds", type=float, default=None, help="default: probe.py's (240 GPU, 60 CPU)")
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    config = args.config or ("hubert_base" if gpu else "tiny")
    batch_seconds = args.batch_seconds or (240.0 if gpu else 60.0)
    torch.manual_seed(0)
    encoder = Encoder(MODEL_CONFIGS[config]()).eval().to(args.device)
    ext = pf.Extraction(window=30.0)
    print(f"{config} on {args.device} ({torch.get_num_threads()} torch threads), {args.workers} decoding processes, "
          f"{args.clips} clips of {args.seconds:g} s, batches of {batch_seconds:g} s")
    with tempfile.TemporaryDirectory() as folder:
        for fmt in args.formats.split(","):
            clips = make_clips(folder, fmt, args.clips, args.seconds)
            hours = args.clips * args.seconds / 3600
            decode_only(clips[:args.workers], ext, args.workers)  # starts the processes
            t_a, windows = decode_only(clips, ext, args.workers)
            t_b = encoder_only(encoder, windows, args.device, batch_seconds)
            t_c = end_to_end(encoder, clips, ext, args.device, batch_seconds, args.workers, folder)
            t_t = end_to_end(encoder, clips, ext, args.device, batch_seconds, 0, folder)
            a, b, c, t = (hours / (x / 3600) for x in (t_a, t_b, t_c, t_t))
            print(f"{fmt}: audio-hours per hour  (a) decoding {a:,.0f}  (b) encoder {b:,.0f}  (c) end to end "
                  f"{c:,.0f}   c / min(a, b) = {c / min(a, b):.2f}   (peer: end to end on {pf.AUDIO_WORKERS} "
                  f"decoding threads, --workers 0: {t:,.0f}, c / that = {c / t:.2f})")


if __name__ == "__main__":
    main()
