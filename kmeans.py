"""HuBERT k-means labels in one script: dump features, fit k-means, write .km label files.

Replaces fairseq's examples/hubert/simple_kmeans (dump_mfcc_feature.py, dump_hubert_feature.py, learn_kmeans.py,
dump_km_label.py) and keeps its file formats, so fairseq-made features and labels work here and vice versa:

    python kmeans.py features --manifest data/train.tsv --out feats/mfcc                  # 100 Hz, 39-d MFCC
    python kmeans.py features --manifest data/train.tsv --out feats/l6 --model ckpt.pt --layer 6   # 50 Hz hidden
    python kmeans.py features --manifest data/train24k.tsv --out feats/mfcc24k --sample-rate 24000  # 100 Hz again
    python kmeans.py fit feats/mfcc --k 500 --out km.pt --percent 0.1
    python kmeans.py label feats/mfcc --km km.pt --out labels/

Files (fairseq's): {FEATDIR}/{split}_{rank}_{nshard}.npy (T_total x D float32, all utterances of the shard
concatenated) + .len (frames per utterance, one per line); {LABDIR}/{split}_{rank}_{nshard}.km and {split}.km (one
line of space-separated cluster ids per utterance, manifest order) + dict.km.txt. Ours adds {split}_{rank}_{nshard}.json
describing the features (kind, layer, label rate, sample rate) so that km.pt can record what it was fitted on.

Sample rates: the audio is read at the manifest's rate (--sample-rate for MFCC, default 16000; a model's own rate for
its hidden states), whose sample counts the manifest must hold (data/manifest.py --sample-rate). MFCC windows stay in
milliseconds (25 ms window, 10 ms hop: 400 / 160 samples at 16 kHz, 600 / 240 at 24 kHz with a 1024-point FFT, as
Kaldi's round_to_power_of_two), so MFCC labels are 100 Hz at any rate; hidden-state labels come at the encoder's frame
rate (50 Hz at 16 kHz, 75 Hz at 24 kHz). pretrain_musichubert.py's label_rate is that rate.
"""
import argparse
import glob
import json
import math
import os
import re
import struct
import sys
import time

import numpy as np
import torch

from triton_ops.kmeans import assign_and_sum, assign_nearest

SAMPLE_RATE = 16000
# fairseq dump_hubert_feature.py: max_chunk=1,600,000 samples (100 s); longer files are encoded chunk by chunk
MAX_CHUNK_SAMPLES = 1_600_000


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# MFCC, Kaldi-compatible (compute-mfcc-feats / torchaudio.compliance.kaldi.mfcc) with the options fairseq's
# dump_mfcc_feature.py uses: 25 ms povey window, 10 ms hop, snip_edges, dither 0, DC removal, pre-emphasis 0.97,
# 512-point FFT, 23 mel bins on [20 Hz, Nyquist], log, DCT-II (orthonormal), lifter 22, C0 kept (use_energy=False).

FRAME_LENGTH = 400  # 25 ms at 16 kHz
FRAME_SHIFT = 160  # 10 ms -> 100 Hz labels
FFT_SIZE = 512  # round_to_power_of_two(400)
FRAME_LENGTH_MS, FRAME_SHIFT_MS = 25.0, 10.0  # at other rates the windows stay in ms (Kaldi)
NUM_MEL_BINS = 23
LOW_FREQ = 20.0
PREEMPHASIS = 0.97
CEPSTRAL_LIFTER = 22.0


def mfcc_frame_sizes(sample_rate=SAMPLE_RATE):
    """(window, hop, FFT size) in samples at `sample_rate`: Kaldi's int(rate * ms / 1000) and round_to_power_of_two
    (400, 160, 512 at 16 kHz; 600, 240, 1024 at 24 kHz)."""
    length = int(sample_rate * FRAME_LENGTH_MS / 1000)
    shift = int(sample_rate * FRAME_SHIFT_MS / 1000)
    return length, shift, 1 << (length - 1).bit_length()


def mel_scale(freq):
    return 1127.0 * torch.log(1.0 + freq / 700.0)  # Kaldi's MelScale (natural log, HTK constants)


def kaldi_mel_banks(num_bins=NUM_MEL_BINS, fft_size=FFT_SIZE, sample_rate=SAMPLE_RATE, low_freq=LOW_FREQ):
    """(fft_size//2 + 1) x num_bins triangular filters, equally spaced in mel (Kaldi MelBanks, no VTLN).
    Kaldi builds them over the fft_size//2 bins below Nyquist; the Nyquist bin gets weight 0."""
    high_freq = sample_rate / 2
    mel_low, mel_high = mel_scale(torch.tensor(low_freq, dtype=torch.float64)), mel_scale(
        torch.tensor(high_freq, dtype=torch.float64))
    delta = (mel_high - mel_low) / (num_bins + 1)
    i = torch.arange(num_bins, dtype=torch.float64)[:, None]
    left, center, right = mel_low + i * delta, mel_low + (i + 1) * delta, mel_low + (i + 2) * delta
    mel = mel_scale(torch.arange(fft_size // 2, dtype=torch.float64) * (sample_rate / fft_size))[None, :]
    up, down = (mel - left) / (center - left), (right - mel) / (right - center)
    banks = torch.clamp(torch.minimum(up, down), min=0.0)  # num_bins x fft_size//2
    banks = torch.cat([banks, torch.zeros(num_bins, 1, dtype=torch.float64)], 1)
    return banks.t().float()


def kaldi_dct(num_ceps, num_bins=NUM_MEL_BINS):
    """num_bins x num_ceps orthonormal DCT-II (Kaldi ComputeDctMatrix: row 0 = sqrt(1/N), others sqrt(2/N) cos)."""
    n = torch.arange(num_bins, dtype=torch.float64)[:, None]
    k = torch.arange(num_ceps, dtype=torch.float64)[None, :]
    dct = math.sqrt(2.0 / num_bins) * torch.cos(math.pi / num_bins * (n + 0.5) * k)
    dct[:, 0] = math.sqrt(1.0 / num_bins)
    return dct.float()


def kaldi_lifter(num_ceps, q=CEPSTRAL_LIFTER):
    i = torch.arange(num_ceps, dtype=torch.float64)
    return (1.0 + 0.5 * q * torch.sin(math.pi * i / q)).float()


def mfcc(wav, num_ceps=13, sample_rate=SAMPLE_RATE):
    """wav: B x N (or N) float at sample_rate, values as read (fairseq does not rescale) -> B x T x num_ceps float32,
    T = 1 + (N - window) // hop (snip_edges; window 25 ms, hop 10 ms: 400 / 160 samples at 16 kHz)."""
    length, shift, fft_size = mfcc_frame_sizes(sample_rate)
    squeeze = wav.dim() == 1
    wav = wav[None] if squeeze else wav
    if wav.shape[-1] < length:
        out = wav.new_zeros(wav.shape[0], 0, num_ceps)
        return out[0] if squeeze else out
    frames = wav.float().unfold(-1, length, shift)  # B x T x window
    frames = frames - frames.mean(-1, keepdim=True)  # remove_dc_offset
    # Kaldi pre-emphasis inside each frame; the first sample is emphasised against itself
    previous = torch.cat([frames[..., :1], frames[..., :-1]], -1)
    frames = frames - PREEMPHASIS * previous
    povey = torch.hann_window(length, periodic=False, dtype=torch.float64, device=wav.device).pow(0.85)
    frames = frames * povey.float()
    spectrum = torch.fft.rfft(frames, n=fft_size)
    power = spectrum.real.square() + spectrum.imag.square()  # B x T x (fft_size // 2 + 1)
    mel = power @ kaldi_mel_banks(fft_size=fft_size, sample_rate=sample_rate).to(wav.device)
    log_mel = mel.clamp_min(torch.finfo(torch.float32).eps).log()  # Kaldi floors at FLT_EPSILON before the log
    ceps = log_mel @ kaldi_dct(num_ceps).to(wav.device)
    ceps = ceps * kaldi_lifter(num_ceps).to(wav.device)
    return ceps[0] if squeeze else ceps


def deltas(x, n=2):
    """Regression deltas along time of B x T x D (or T x D): sum_k k (x[t+k] - x[t-k]) / (2 sum_k k^2), edges
    replicated -- torchaudio.functional.compute_deltas(win_length=5), which fairseq applies to MFCC and again to Δ."""
    squeeze = x.dim() == 2
    x = x[None] if squeeze else x
    T = x.shape[1]
    padded = torch.cat([x[:, :1].expand(-1, n, -1), x, x[:, -1:].expand(-1, n, -1)], 1)
    out = sum(k * (padded[:, n + k:n + k + T] - padded[:, n - k:n - k + T]) for k in range(1, n + 1))
    out = out / (n * (n + 1) * (2 * n + 1) / 3)
    return out[0] if squeeze else out


def mfcc_features(wav, dims=39, sample_rate=SAMPLE_RATE):
    """fairseq dump_mfcc_feature.py: [MFCC, Δ, ΔΔ] -> B x T x dims (39 = 13 cepstra, 60 = 20 cepstra), no CMVN."""
    if dims % 3:
        raise ValueError(f"MFCC feature dims must be 3 x num_ceps (39 or 60), got {dims}")
    c = mfcc(wav, num_ceps=dims // 3, sample_rate=sample_rate)
    d = deltas(c)
    return torch.cat([c, d, deltas(d)], -1)


# ---------------------------------------------------------------------------------------------------------------------
# Feature files: fairseq's {split}_{rank}_{nshard}.npy/.len, written to .tmp files and renamed when complete.

NPY_HEADER_BYTES = 128


def npy_header(rows, dim):
    """A fixed-size .npy v1.0 header, so the data can be streamed first and the row count filled in at the end."""
    text = "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }" % (rows, dim)
    text = text.ljust(NPY_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin1")


def shard_range(num_utts, rank, nshard):
    """fairseq's shard rule: shard r covers manifest lines [round(n r / nshard), round(n (r + 1) / nshard))."""
    if not 0 <= rank < nshard:
        raise ValueError(f"--rank {rank} is not in [0, --nshard {nshard})")
    return round(num_utts * rank / nshard), round(num_utts * (rank + 1) / nshard)


def shard_name(split, rank, nshard):
    return f"{split}_{rank}_{nshard}"


class ShardAudio(torch.utils.data.Dataset):
    """Loads one manifest entry per item in DataLoader workers; bad audio comes back as an error string."""

    def __init__(self, root, entries, sample_rate=SAMPLE_RATE):
        self.root, self.entries, self.sample_rate = root, entries, sample_rate
        self.min_samples = mfcc_frame_sizes(sample_rate)[0]

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        from data.audio import AudioError, load_audio
        path = os.path.join(self.root, self.entries[i][0])
        try:
            return i, path, torch.from_numpy(load_audio(path, sr=self.sample_rate, min_samples=self.min_samples)), None
        except (AudioError, OSError, RuntimeError, ValueError) as e:
            return i, path, None, str(e) if path in str(e) else f"{path}: {e}"


class HiddenFeatures:
    """enc(wav).hidden_states[layer] for any checkpoint load_pretrained accepts; layer 6 = output of transformer layer
    6, like fairseq's extract_features(output_layer=6). Files over 100 s are encoded in 100 s chunks (fairseq)."""

    def __init__(self, path, layer, device):
        from model import load_pretrained
        self.encoder = load_pretrained(path).to(device).eval()
        num_layers = self.encoder.cfg.layers
        if not 0 <= layer <= num_layers:
            raise ValueError(f"--layer {layer} is out of range for {path}: it has {num_layers} layers (0 = input)")
        self.layer, self.dim = layer, self.encoder.cfg.dim
        if not self.encoder.cfg.layer_norm_first:
            # layers above `layer` cannot change hidden_states[layer]: drop them (fairseq stops at output_layer too).
            # Not for pre-LN models, whose last hidden state has the final LayerNorm applied.
            self.encoder.transformer.layers = self.encoder.transformer.layers[:layer]

    @torch.inference_mode()
    def __call__(self, wav):  # B x N (equal lengths) -> B x T x dim
        pieces = []
        for start in range(0, wav.shape[1], MAX_CHUNK_SAMPLES):
            chunk = wav[:, start:start + MAX_CHUNK_SAMPLES]
            if chunk.shape[1] < FRAME_LENGTH:  # a tail shorter than the conv receptive field has no frame
                continue
            pieces.append(self.encoder(chunk).hidden_states[self.layer].float())
        return torch.cat(pieces, 1)


def dump_features(manifest, out_dir, nshard=1, rank=0, mfcc_dims=39, model=None, layer=6, device=None,
                  batch_samples=4_800_000, workers=2, skip_bad_audio=False, overwrite=False, sample_rate=None):
    """Writes {out_dir}/{split}_{rank}_{nshard}.npy/.len/.json for shard `rank` of the manifest; returns the .npy path.
    sample_rate: the manifest's (its counts are checked against a few headers); MFCC is computed at it (default
    16000), hidden states at the model's own rate, which it must equal when given.

    Utterances are batched when consecutive ones have the same length (typical for fixed-length music clips), so the
    result is exactly the per-utterance one: no padding enters MFCC framing or HuBERT's GroupNorm front end."""
    from data.manifest import ManifestError, check_sample_counts, read_manifest
    from tqdm import tqdm

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root, entries = read_manifest(manifest)
    split = os.path.splitext(os.path.basename(manifest))[0]
    start, stop = shard_range(len(entries), rank, nshard)
    name = os.path.join(out_dir, shard_name(split, rank, nshard))
    if not overwrite and all(os.path.exists(name + ext) for ext in (".npy", ".len", ".json")):
        log(f"{name}.npy exists, skipping (pass --overwrite to redo it)")
        return name + ".npy"
    os.makedirs(out_dir, exist_ok=True)
    if model is not None:  # its rate is the one the audio must be read at
        extract = HiddenFeatures(model, layer, device)
        if sample_rate is not None and sample_rate != extract.encoder.cfg.sample_rate:
            raise SystemExit(f"error: {model} runs at {extract.encoder.cfg.sample_rate} Hz but --sample-rate is "
                             f"{sample_rate}; give the manifest and rate the model was trained at")
        sample_rate = extract.encoder.cfg.sample_rate
    sample_rate = sample_rate or SAMPLE_RATE
    try:
        check_sample_counts(manifest, root, entries, sample_rate)
    except ManifestError as e:
        raise SystemExit(f"error: {e}") from None

    if model is None:
        extract, dim = (lambda w: mfcc_features(w, mfcc_dims, sample_rate)), mfcc_dims
        meta = {"kind": f"mfcc{mfcc_dims}", "layer": None, "model": None, "label_rate": 100}
    else:
        dim = extract.dim
        frame_rate = extract.encoder.cfg.frame_rate
        meta = {"kind": "hidden", "layer": layer, "model": os.path.abspath(model),
                "label_rate": int(frame_rate) if frame_rate == int(frame_rate) else frame_rate}
    meta.update(manifest=os.path.abspath(manifest), split=split, rank=rank, nshard=nshard, dim=dim,
                first_line=start, num_utterances=stop - start)
    if sample_rate != SAMPLE_RATE:  # 16 kHz features' .json stay as they were
        meta["sample_rate"] = sample_rate

    loader = torch.utils.data.DataLoader(ShardAudio(root, entries[start:stop], sample_rate), batch_size=None,
                                         shuffle=False, num_workers=workers, prefetch_factor=8 if workers else None)
    lengths, skipped, total_frames = [], [], 0
    with open(name + ".npy.tmp", "wb") as npy:
        npy.write(npy_header(0, dim))  # rewritten with the real row count below

        def flush(batch):  # batch: list of equal-length waveforms, in manifest order
            nonlocal total_frames
            feats = extract(torch.stack(batch).to(device))
            for f in feats.cpu().numpy().astype(np.float32, copy=False):
                npy.write(np.ascontiguousarray(f).tobytes())
                lengths.append(f.shape[0])
                total_frames += f.shape[0]

        batch = []
        for i, path, wav, error in tqdm(loader, total=stop - start, desc=f"features {split} {rank}/{nshard}",
                                        unit="utt", dynamic_ncols=True):
            if error is not None:
                if not skip_bad_audio:
                    raise SystemExit(f"error: {error} (manifest {manifest}, line {start + i + 2}); "
                                     "pass --skip-bad-audio to write an empty entry for it and go on")
                # keep the line: .len gets 0 and .km an empty line, so line i still belongs to manifest entry i
                if batch:
                    flush(batch)
                    batch = []
                log(f"skipping {error} (manifest line {start + i + 2}): 0 frames written for it")
                skipped.append(start + i + 2)
                lengths.append(0)
                continue
            expected = entries[start + i][1]
            if abs(len(wav) - expected) > FRAME_SHIFT * sample_rate // SAMPLE_RATE:  # 10 ms, as fairseq warns
                log(f"warning: {path} has {len(wav)} samples, manifest line {start + i + 2} says {expected}")
            if batch and (len(wav) != len(batch[0]) or (len(batch) + 1) * len(wav) > batch_samples
                          or len(wav) > MAX_CHUNK_SAMPLES):
                flush(batch)
                batch = []
            batch.append(wav)
        if batch:
            flush(batch)
        npy.seek(0)
        npy.write(npy_header(total_frames, dim))
    with open(name + ".len.tmp", "w") as f:
        f.writelines(f"{n}\n" for n in lengths)
    meta.update(num_frames=total_frames, skipped_lines=skipped)
    with open(name + ".json.tmp", "w") as f:
        json.dump(meta, f, indent=1)
    for ext in (".npy", ".len", ".json"):
        os.replace(name + ext + ".tmp", name + ext)
    log(f"wrote {name}.npy: {len(lengths)} utterances, {total_frames} frames x {dim}"
        + (f", {len(skipped)} unreadable (lines {skipped[:10]})" if skipped else ""))
    return name + ".npy"


# ---------------------------------------------------------------------------------------------------------------------
# Reading a split's shards back: memory-mapped, so fit and label never need the features in RAM.

def find_shards(feat_dir, split=None):
    """-> (split, [shard base paths in rank order]); errors if a split has missing ranks or the split is ambiguous."""
    found = {}
    for path in glob.glob(os.path.join(feat_dir, "*.npy")):
        m = re.fullmatch(r"(.+)_(\d+)_(\d+)\.npy", os.path.basename(path))
        if m:
            found.setdefault(m.group(1), {}).setdefault(int(m.group(3)), set()).add(int(m.group(2)))
    if split is None:
        if not found:
            raise SystemExit(f"error: no {{split}}_{{rank}}_{{nshard}}.npy feature shards in {feat_dir}")
        if len(found) > 1:
            raise SystemExit(f"error: {feat_dir} holds feature shards of splits {sorted(found)}; name one with --split")
        split = next(iter(found))
    if split not in found:
        raise SystemExit(f"error: no feature shards of split '{split}' in {feat_dir} (found: {sorted(found)})")
    if len(found[split]) != 1:
        raise SystemExit(f"error: {feat_dir} mixes shardings of '{split}' (nshard = {sorted(found[split])})")
    nshard, ranks = next(iter(found[split].items()))
    missing = sorted(set(range(nshard)) - ranks)
    if missing:
        raise SystemExit(f"error: {feat_dir}: split '{split}' with nshard={nshard} is missing rank(s) {missing}")
    return split, [os.path.join(feat_dir, shard_name(split, r, nshard)) for r in range(nshard)]


def open_shard(base):
    """-> (memmap T_total x D float32, lengths int64 array, meta dict or {} for fairseq-made features)."""
    feats = np.load(base + ".npy", mmap_mode="r")
    if feats.ndim != 2:
        raise SystemExit(f"error: {base}.npy has shape {feats.shape}, expected (frames, dims)")
    if not os.path.exists(base + ".len"):
        raise SystemExit(f"error: {base}.len is missing (it gives the frames per utterance of {base}.npy)")
    with open(base + ".len") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lengths = []
    for n, line in enumerate(lines, 1):
        if not line.strip().isdigit():
            raise SystemExit(f"error: {base}.len line {n}: expected a frame count, found {line!r}")
        lengths.append(int(line))
    lengths = np.array(lengths, dtype=np.int64)
    if lengths.sum() != feats.shape[0]:
        raise SystemExit(f"error: {base}.len sums to {lengths.sum()} frames but {base}.npy has {feats.shape[0]} rows")
    meta = {}
    if os.path.exists(base + ".json"):
        with open(base + ".json") as f:
            meta = json.load(f)
    return feats, lengths, meta


class FeatureSet:
    """The frames of a split (optionally a --percent sample of its utterances) as row ranges of memory-mapped shards.
    Points are numbered 0..num_points-1 across the ranges, so ranks can take contiguous slices of them."""

    def __init__(self, feat_dir, split=None, percent=-1.0, seed=0):
        self.split, bases = find_shards(feat_dir, split)
        self.arrays, self.segments, self.meta = [], [], None
        rng = np.random.default_rng(seed)
        for s, base in enumerate(bases):
            feats, lengths, meta = open_shard(base)
            if self.arrays and feats.shape[1] != self.arrays[0].shape[1]:
                raise SystemExit(f"error: {base}.npy has {feats.shape[1]} dims, shard 0 has {self.arrays[0].shape[1]}")
            keep = {k: meta.get(k) for k in ("kind", "layer", "model", "label_rate")} if meta else None
            if s and keep != self.meta:
                raise SystemExit(f"error: {base}.json describes features {keep}, shard 0 has {self.meta}")
            self.meta = keep
            self.arrays.append(feats)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            if 0 < percent < 1:  # fairseq learn_kmeans: ceil(p n) utterances of each shard, without replacement
                utts = np.sort(rng.choice(len(lengths), int(math.ceil(percent * len(lengths))), replace=False))
            else:
                utts = np.arange(len(lengths))
            for u in utts:
                a, b = int(offsets[u]), int(offsets[u + 1])
                if b == a:
                    continue
                if self.segments and self.segments[-1][0] == s and self.segments[-1][2] == a:
                    self.segments[-1][2] = b  # merge neighbouring utterances into one contiguous read
                else:
                    self.segments.append([s, a, b])
        self.dim = self.arrays[0].shape[1]
        self.meta = self.meta or {"kind": "unknown", "layer": None, "model": None, "label_rate": None}
        sizes = np.array([b - a for _, a, b in self.segments], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.num_points = int(self.offsets[-1])

    def chunks(self, rows, start=0, stop=None):
        """Yields float32 numpy arrays of up to `rows` consecutive points covering points [start, stop)."""
        stop = self.num_points if stop is None else stop
        pending, pending_rows = [], 0
        seg = int(np.searchsorted(self.offsets, start, side="right") - 1)
        pos = start
        while pos < stop:
            s, a, _ = self.segments[seg]
            seg_end = min(int(self.offsets[seg + 1]), stop)
            take = min(seg_end - pos, rows - pending_rows)
            lo = a + pos - int(self.offsets[seg])
            pending.append(self.arrays[s][lo:lo + take])
            pending_rows += take
            pos += take
            if pos == int(self.offsets[seg + 1]):
                seg += 1
            if pending_rows == rows:
                yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                pending, pending_rows = [], 0
        if pending:
            yield pending[0] if len(pending) == 1 else np.concatenate(pending)

    def gather(self, points):
        """Rows of the given sorted point numbers, as one float32 array."""
        seg = np.searchsorted(self.offsets, points, side="right") - 1
        out = np.empty((len(points), self.dim), dtype=np.float32)
        seg_shard = np.array([s for s, _, _ in self.segments])[seg]
        rows = np.array([a for _, a, _ in self.segments])[seg] + points - self.offsets[seg]
        for s in np.unique(seg_shard):
            sel = seg_shard == s
            out[sel] = self.arrays[s][rows[sel]]
        return out


# ---------------------------------------------------------------------------------------------------------------------
# k-means: greedy k-means++ on a subsample, Lloyd passes on a larger sample (warm-up), then Lloyd passes streamed
# over all the shards.

# sklearn's MiniBatchKMeans initialises on 30k points (15 per cluster at K=2000); Lloyd passes over all points do the
# rest, and at K=2000 each k-means++ point costs about a pass's worth of time per 100 points per cluster
INIT_POINTS_PER_CLUSTER = 16
INIT_POINTS_MIN = 20_000
INIT_POINTS_MAX = 100_000

# Warm-up: Lloyd passes on a sample of 256 points per cluster (faiss's max_points_per_centroid) before the passes over
# all points. Real-music MFCC converges slowly: on 831k frames at K=500, Lloyd from k-means++ takes 15 full passes to
# reach the 1e-3 tolerance; after a warm-up on a 128k sample to the same tolerance (~14 passes at 1/6.5 the cost),
# 6 full passes reach it, at the same inertia (713.5 vs 713.2 per frame). Skipped when the data holds fewer than
# twice the sample's points; the sample is capped at 1 GiB per rank (K=2000 on 768-d features: 512k points = 1.5 GB).
# Bounds-based skipping (Hamerly, Elkan) was measured on the same data and does not pay: some centroids move 5-10x
# the median distance every pass, so Hamerly's lower bounds fail for 90-99% of the points per pass, and 50 groups of
# bounds (Yinyang-style) still leave 57-97% of the points to a full distance row. See README, kmeans.py.
WARM_POINTS_PER_CLUSTER = 256
WARM_MAX_BYTES = 1 << 30


def kmeans_plus_plus(x, k, generator, trials=None):
    """Greedy k-means++ (Arthur & Vassilvitskii 2007, with sklearn's 2 + ln k candidates per step, keeping the one
    that lowers the potential most). x: N x D on the compute device -> k x D. `generator` lives on x's device."""
    n = x.shape[0]
    if n < k:
        raise SystemExit(f"error: {n} points for k={k} clusters; lower --k or add data")
    trials = trials or 2 + int(math.log(k))
    x_sq = (x * x).sum(1)
    xt = x.t().contiguous()  # candidates x points distance blocks come out row-major: cheap row sums
    first = int(torch.randint(n, (1,), generator=generator, device=x.device))
    centers = [first]
    closest = assign_nearest(x, x[first:first + 1])[1]  # D^2: squared distance to the nearest chosen centre
    # one trials x N buffer for every step, updated in place (fresh blocks per step cost 1.2-2x the time on CPU)
    d = torch.empty(trials, n, dtype=x.dtype, device=x.device)
    potential = torch.empty(trials, dtype=x.dtype, device=x.device)
    for _ in range(1, k):
        cand = torch.multinomial(closest if closest.sum() > 0 else torch.ones_like(closest), trials,
                                 replacement=True, generator=generator)
        torch.addmm(x_sq[None, :], x[cand], xt, alpha=-2.0, out=d)
        d.add_(x_sq[cand][:, None]).clamp_min_(0)
        torch.minimum(d, closest[None, :], out=d)  # trials x N: the D^2 each candidate would leave
        torch.sum(d, 1, out=potential)
        best = int(potential.argmin())
        closest.copy_(d[best])
        centers.append(int(cand[best]))
    return x[centers].clone()


def fit_kmeans(features, k, max_iter=100, tol=1e-3, seed=0, init_points=None, chunk_rows=65_536, device=None,
               verbose=True, init=None, history=None, warm_points=None):
    """Lloyd's k-means over a FeatureSet (or an N x D array). Returns dict(centroids K x D float32 cpu, inertia =
    mean squared distance per point of those centroids, iterations = passes over all points, warm_iterations,
    num_points).

    k-means++ on `init_points` random points (default: 16 per cluster, within [20k, 100k]) or the given `init`
    (K x D); then Lloyd passes on `warm_points` random points (default 256 per cluster; 0 = none) until a pass
    improves their inertia by less than `tol`; then Lloyd passes over all points until the same holds for all of
    them. Each pass reads the points once (kernels' assign_and_sum per chunk: exact nearest centroids and the sums of
    the update). Under torchrun every rank takes a contiguous slice of the points (and of the warm-up sample) and
    sums/counts/inertia are all-reduced. A cluster left empty is re-seeded with the points farthest from their
    centroid in that pass. `history`, a list, receives (seconds since the start, inertia of all points) per full
    pass."""
    if isinstance(features, (np.ndarray, torch.Tensor)):
        features = ArrayPoints(np.asarray(features, dtype=np.float32))
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = features.num_points
    if n < k:
        raise SystemExit(f"error: {n} points for k={k} clusters; lower --k or add data")
    say = (lambda m: log(m)) if verbose and rank == 0 else (lambda m: None)

    # Initialisation on rank 0, broadcast to the others
    t0 = start = time.time()
    if rank > 0:
        centroids = torch.zeros(k, features.dim, device=device)
    elif init is None:
        rng = np.random.default_rng(seed)
        size = init_points or min(max(INIT_POINTS_PER_CLUSTER * k, INIT_POINTS_MIN), INIT_POINTS_MAX)
        sub = np.sort(rng.choice(n, min(n, max(size, k)), replace=False))
        x_init = torch.from_numpy(features.gather(sub)).to(device)
        centroids = kmeans_plus_plus(x_init, k, torch.Generator(device=device).manual_seed(seed)).float()
        del x_init
        say(f"k-means++ init: k={k} from {len(sub)} of {n} points x {features.dim} dims, {time.time() - t0:.1f} s")
    else:
        centroids = torch.as_tensor(init, dtype=torch.float32).to(device).clone()
    if distributed:
        torch.distributed.broadcast(centroids, 0)

    # Warm-up on a sample; every rank draws the same sample and keeps its contiguous share of it
    size = WARM_POINTS_PER_CLUSTER * k if warm_points is None else warm_points
    size = min(size, WARM_MAX_BYTES // (4 * features.dim) * world)
    warm_it = 0
    if size > 0 and 2 * size <= n:
        sample = np.sort(np.random.default_rng([seed, 1]).choice(n, size, replace=False))
        xs = points_tensor(features.gather(sample[size * rank // world:size * (rank + 1) // world]), device)
        say(f"warm-up on {size} of {n} points")
        centroids, _, warm_it = lloyd(lambda: (xs[a:a + chunk_rows] for a in range(0, xs.shape[0], chunk_rows)),
                                      size, centroids, max_iter, tol, distributed, say, "warm-up pass")
        del xs

    lo, hi = n * rank // world, n * (rank + 1) // world
    centroids, inertia, it = lloyd(
        lambda: (points_tensor(c, device) for c in features.chunks(chunk_rows, lo, hi)), n, centroids, max_iter, tol,
        distributed, say, "pass", history, start)
    return {"centroids": centroids.cpu(), "inertia": inertia, "iterations": it, "warm_iterations": warm_it,
            "num_points": n}


def lloyd(chunks, n, centroids, max_iter, tol, distributed, say, name, history=None, start=None):
    """Lloyd passes over the points chunks() yields (this rank's share of n points, as tensors on the centroids'
    device) until a pass improves the inertia by less than tol, or max_iter passes. Returns (centroids, inertia,
    passes); the centroids are those the returned inertia was measured for (the last pass's update is not applied)."""
    k, dim = centroids.shape
    device = centroids.device
    previous, inertia, it = None, None, 0
    for it in range(1, max_iter + 1):
        t0 = time.time()
        sums = torch.zeros(k, dim, dtype=torch.float64, device=device)
        counts = torch.zeros(k, dtype=torch.int64, device=device)
        total = torch.zeros(1, dtype=torch.float64, device=device)
        far_d = torch.empty(0, device=device)
        far_x = torch.empty(0, dim, device=device)
        for x in chunks():
            _, dist, s, c = assign_and_sum(x, centroids)
            sums += s
            counts += c
            total += dist.double().sum()
            # keep the k farthest points seen so far as re-seeding candidates for empty clusters
            top = dist.topk(min(k, dist.numel())).indices
            far_d = torch.cat([far_d, dist[top]])
            far_x = torch.cat([far_x, x[top].float()])
            if far_d.numel() > k:
                top = far_d.topk(k).indices
                far_d, far_x = far_d[top], far_x[top]
        if distributed:
            for t in (sums, counts, total):
                torch.distributed.all_reduce(t)
            far_d, far_x = all_gather_padded(far_d, far_x, k)
        inertia = total.item() / n
        if history is not None:
            history.append((time.time() - start, inertia))
        change = (previous - inertia) / max(inertia, 1e-30) if previous is not None else float("inf")
        empty = int((counts == 0).sum())
        say(f"{name} {it:3d}: inertia {inertia:.6g} per point, rel change {change:.2e}, empty clusters {empty}, "
            f"{time.time() - t0:.2f} s")
        # stop before updating, so the stored centroids are exactly the ones the reported inertia belongs to
        if change < tol or it == max_iter:
            break
        previous = inertia
        new = (sums / counts.clamp_min(1)[:, None].double()).float()
        if empty:
            order = far_d.argsort(descending=True)[:empty]  # distinct points, farthest first
            new[counts == 0] = far_x[order]
        centroids = new
    return centroids, inertia, it


def all_gather_padded(d, x, k):
    """Gathers every rank's re-seeding candidates (each rank holds at most k) and keeps the global k farthest."""
    world = torch.distributed.get_world_size()
    pad = k - d.numel()
    d = torch.cat([d, d.new_full((pad,), -1.0)])
    x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    ds, xs = [torch.empty_like(d) for _ in range(world)], [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(ds, d)
    torch.distributed.all_gather(xs, x)
    d, x = torch.cat(ds), torch.cat(xs)
    top = d.topk(k).indices
    return d[top], x[top]


def points_tensor(chunk, device):
    """A float32 tensor of a numpy chunk; memory-mapped (read-only) rows are copied, which is the disk read anyway."""
    if not chunk.flags.writeable or not chunk.flags.c_contiguous or chunk.dtype != np.float32:
        chunk = np.array(chunk, dtype=np.float32, order="C")
    return torch.from_numpy(chunk).to(device, non_blocking=True)


class ArrayPoints:
    """An in-memory N x D array with FeatureSet's reading interface (for tests and the benchmark)."""

    def __init__(self, x):
        self.x, self.num_points, self.dim = x, x.shape[0], x.shape[1]

    def chunks(self, rows, start=0, stop=None):
        stop = self.num_points if stop is None else stop
        for a in range(start, stop, rows):
            yield self.x[a:min(a + rows, stop)]

    def gather(self, points):
        return self.x[points]


def save_kmeans(path, result, features, percent=-1.0, seed=0):
    """km.pt: fit_kmeans' centroids (K x D) and inertia, plus what they were fitted on (features.meta: kind, layer,
    model, label_rate)."""
    k, dim = result["centroids"].shape
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"  # written whole, then renamed: an interrupted save leaves no half-written km.pt
    torch.save({"centroids": result["centroids"], "k": k, "dim": dim, "features": features.meta,
                "inertia": result["inertia"], "iterations": result["iterations"], "num_points": result["num_points"],
                "percent": percent, "seed": seed, "split": features.split}, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------------
# Labels

def load_centroids(path):
    """km.pt from `fit` -> (K x D float32 tensor, metadata dict); also reads fairseq's joblib-pickled sklearn model."""
    if path.endswith(".pt"):
        km = torch.load(path, map_location="cpu", weights_only=True)
        if "centroids" not in km:
            raise SystemExit(f"error: {path} has no 'centroids' (keys: {sorted(km)}); is it a kmeans.py fit output?")
        return km["centroids"].float(), km
    import joblib  # fairseq learn_kmeans.py saves sklearn's MiniBatchKMeans with joblib.dump
    model = joblib.load(path)
    centers = torch.from_numpy(np.asarray(model.cluster_centers_, dtype=np.float32))
    return centers, {"k": centers.shape[0], "dim": centers.shape[1], "features": None}


def write_labels(feat_dir, km_path, out_dir, split=None, chunk_rows=65_536, device=None):
    """Writes {out_dir}/{split}_{rank}_{nshard}.km per shard, {split}.km (all shards in rank order = manifest order)
    and dict.km.txt. Returns the path of {split}.km."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    centroids, km = load_centroids(km_path)
    centroids = centroids.to(device)
    split, bases = find_shards(feat_dir, split)
    os.makedirs(out_dir, exist_ok=True)
    shard_files = []
    for base in bases:
        feats, lengths, meta = open_shard(base)
        if feats.shape[1] != centroids.shape[1]:
            raise SystemExit(f"error: {base}.npy has {feats.shape[1]}-d features, {km_path} has "
                             f"{centroids.shape[1]}-d centroids")
        fitted_on = km.get("features") or {}
        if meta and fitted_on.get("kind") not in (None, "unknown") and (
                meta.get("kind"), meta.get("layer")) != (fitted_on.get("kind"), fitted_on.get("layer")):
            raise SystemExit(f"error: {base}.npy holds {meta.get('kind')} features (layer {meta.get('layer')}) but "
                             f"{km_path} was fitted on {fitted_on.get('kind')} (layer {fitted_on.get('layer')})")
        labels = torch.cat([assign_nearest(points_tensor(c, device), centroids)[0].cpu()
                            for c in (feats[a:a + chunk_rows] for a in range(0, feats.shape[0], chunk_rows))]
                           or [torch.empty(0, dtype=torch.long)]).numpy()
        out = os.path.join(out_dir, os.path.basename(base) + ".km")
        with open(out + ".tmp", "w") as f:
            for u in np.split(labels, np.cumsum(lengths)[:-1]):
                f.write(" ".join(map(str, u.tolist())) + "\n")  # an unreadable (skipped) utterance: empty line
        os.replace(out + ".tmp", out)
        shard_files.append(out)
        log(f"wrote {out}: {len(lengths)} utterances, {len(labels)} labels")
    joined = os.path.join(out_dir, f"{split}.km")
    with open(joined + ".tmp", "w") as f:
        for path in shard_files:
            with open(path) as g:
                f.write(g.read())
    os.replace(joined + ".tmp", joined)
    with open(os.path.join(out_dir, "dict.km.txt"), "w") as f:  # fairseq Dictionary format, dummy counts
        f.writelines(f"{i} 1\n" for i in range(centroids.shape[0]))
    log(f"wrote {joined} and dict.km.txt (k={centroids.shape[0]})")
    return joined


# ---------------------------------------------------------------------------------------------------------------------
# Command line

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("features", help="dump 100 Hz MFCC or encoder features (50 Hz at 16 kHz, 75 Hz at 24 kHz) "
                                        "of one manifest shard")
    f.add_argument("--manifest", required=True, help="fairseq .tsv: root line, then rel_path<TAB>num_samples")
    f.add_argument("--out", required=True, help="feature directory")
    f.add_argument("--mfcc-dims", type=int, default=39, choices=(39, 60), help="13 or 20 cepstra + Δ + ΔΔ")
    f.add_argument("--model", help="checkpoint or Hugging Face folder: dump its hidden states instead of MFCC")
    f.add_argument("--layer", type=int, default=6, help="hidden_states index (6 = output of transformer layer 6)")
    f.add_argument("--nshard", type=int, default=1)
    f.add_argument("--rank", type=int, default=0)
    f.add_argument("--device", help="default: cuda when available")
    f.add_argument("--batch-samples", type=int, default=4_800_000, help="max samples per batch of equal-length clips")
    f.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="audio loading processes")
    f.add_argument("--skip-bad-audio", action="store_true",
                   help="write 0 frames (an empty .km line) for unreadable files instead of stopping")
    f.add_argument("--overwrite", action="store_true", help="redo a shard whose files already exist")
    f.add_argument("--sample-rate", type=int, default=None,
                   help="the rate the manifest counts samples at and MFCC is computed at (default 16000; with "
                        "--model: the model's rate, which this must equal)")

    t = sub.add_parser("fit", help="fit k-means on a feature directory (run under torchrun to split the work)")
    t.add_argument("feat_dir")
    t.add_argument("--k", type=int, required=True)
    t.add_argument("--out", required=True, help="km.pt")
    t.add_argument("--split", help="which split's shards, when the directory holds several")
    t.add_argument("--percent", type=float, default=-1.0, help="fraction of utterances per shard (fairseq: 0.1)")
    t.add_argument("--max-iter", type=int, default=100)
    t.add_argument("--tol", type=float, default=1e-3,
                   help="stop when a pass improves inertia by less than this fraction (1e-4: ~0.5%% lower inertia "
                        "for ~2.5x the passes)")
    t.add_argument("--init-points", type=int, default=None,
                   help=f"subsample size for k-means++ (default {INIT_POINTS_PER_CLUSTER} x k within "
                        f"[{INIT_POINTS_MIN}, {INIT_POINTS_MAX}])")
    t.add_argument("--warm-points", type=int, default=None,
                   help=f"Lloyd passes on this many random points before the passes over all of them (default "
                        f"{WARM_POINTS_PER_CLUSTER} x k; 0 = none)")
    t.add_argument("--chunk-rows", type=int, default=65_536, help="points per streamed chunk")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device")

    lab = sub.add_parser("label", help="write .km label files and dict.km.txt")
    lab.add_argument("feat_dir")
    lab.add_argument("--km", required=True, help="km.pt from fit (or fairseq's joblib k-means model)")
    lab.add_argument("--out", required=True, help="label directory")
    lab.add_argument("--split")
    lab.add_argument("--device")
    args = p.parse_args(argv)

    if args.command == "features":
        dump_features(args.manifest, args.out, args.nshard, args.rank, args.mfcc_dims, args.model, args.layer,
                      args.device, args.batch_samples, args.workers, args.skip_bad_audio, args.overwrite,
                      args.sample_rate)
    elif args.command == "fit":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        device = args.device
        if world > 1:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            torch.distributed.init_process_group(backend)
            if torch.cuda.is_available():
                device = device or f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                torch.cuda.set_device(torch.device(device))
        features = FeatureSet(args.feat_dir, args.split, args.percent, args.seed)
        result = fit_kmeans(features, args.k, args.max_iter, args.tol, args.seed, args.init_points, args.chunk_rows,
                            device, warm_points=args.warm_points)
        if world == 1 or torch.distributed.get_rank() == 0:
            save_kmeans(args.out, result, features, args.percent, args.seed)
            log(f"saved {args.out}: k={args.k}, inertia {result['inertia']:.6g} per point after "
                f"{result['iterations']} iterations on {result['num_points']} points ({features.meta['kind']} "
                f"features, label rate {features.meta['label_rate']} Hz)")
        if world > 1:
            torch.distributed.destroy_process_group()
    else:
        write_labels(args.feat_dir, args.km, args.out, args.split, device=args.device)


if __name__ == "__main__":
    main()
