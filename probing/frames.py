"""probe.py's frame-level path: beat tracking on frozen frame features (tasks `gtzan_beat` and `beat`).

    python probe.py --task gtzan_beat --model out/ckpt.pt --data-root ~/data/gtzan
    python probe.py --task beat --model out/ckpt.pt --data-root ~/data/ballroom --sweep

It sits beside the clip-level path (probe.py, probing/features.py) and shares its heads, optimiser and schedule
(probing/heads.py), feature store, and the steps of a run (probe.py: task grid, extraction, results line), but its rows
are 20 ms frames instead of pooled windows, a training item is a random 10 s crop of a track, and a track is scored
by decoding its whole activation with madmom's DBN.

1. Frames (extract_frames). A track is read at the model's rate (16 kHz; MERT-v1 24 kHz, 75 Hz frames), z-normalised once (as every probe clip), and run through the
   frozen encoder in windows of 30 s, each padded by half the conv front end's receptive field on both sides (real
   audio where the track has it, zeros at its ends), so that frame j is centred on j / 50 s and a track of L samples
   has exactly L // 320 + 1 frames: the frame of a beat at t is round(50 t), for features and labels alike. One row
   per frame [states, dim] goes into a FeatureStore (float16 memmap), a track's rows window by window, its index
   line last, so an interrupted extraction resumes at the first unfinished track and memory holds one window.
   Disk: 2 bytes x states x dim x 50 per second; GTZAN (929 tracks, 13 x 768) is 27.9 GB, one state (--layers K)
   2.1 GB; the run says what it needs and stops before extracting if the disk has less.
2. Train. The probe head (probing/heads.py) applied to every frame, with ONE output and BCE-with-logits (beat_loss),
   on batches of 64 tracks, each a random 10 s crop (500 frames) drawn anew every epoch; frames within one of a beat
   are positive in training (MARBLE's +-1); Adam, ReduceLROnPlateau and early stopping per head (HeadSchedule).
   --sweep trains the lr x layer grid together on the same crops, reading the one store: the encoder runs once.
3. Score. Valid and test tracks are whole: sigmoid(logits) of every frame -> DBNBeatTrackingProcessor(fps=50),
   madmom's defaults otherwise -> beat times, matched to the annotated beats (not the frame-quantised ones) by
   mir_eval. Four figures (BEAT_METRICS): f_70ms and f_20ms, MARBLE's F (mir_eval.util.match_events, counts summed
   over the split, no trim; the published GTZAN beat numbers, 70 ms in the code); track_f_70ms and track_f_20ms,
   the field's standard (mir_eval.beat.f_measure per track after its 5 s trim_beats, averaged over tracks).
   f_70ms is the headline and the monitored validation metric.
"""
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import mir_eval
import numpy as np
import torch
import torch.nn.functional as F
from madmom.features.beats import DBNBeatTrackingProcessor

from data.audio import SAMPLE_RATE, AudioError, audio_info
from model import receptive_field
from probing import runs
from probing.features import (DTYPE, Rows, StoreError, cache_key, decode_ahead, encode,
                              extract_units, header_seconds, ranks, read_16k, rows_of, store_path, unit_budget,
                              znorm_)
from probing.heads import HIDDEN, HeadAdam, HeadSchedule, ProbeHeads, grid_results, validation_best

BEAT_METRICS = ("f_70ms", "f_20ms", "track_f_70ms", "track_f_20ms")  # the first is the headline and the monitor
BEAT_TABLE = ("f_70ms", "track_f_70ms")  # the Table-1 columns (probing/report.py): the headline and the standard
TOLERANCES = {"70ms": 0.07, "20ms": 0.02}  # MARBLE's code: 70 ms; the papers' text: 20 ms
CROP_SECONDS = 10.0  # MARBLE v1: a random 10 s crop of each training track per epoch
NEIGHBOURS = 1  # training labels: frames within 1 of a beat's frame are positive too (MARBLE v1's CE variant)
INPUT_BYTES = 128 << 20  # float32 feature rows per forward pass
ACTIVATION_BYTES = 512 << 20  # heads x rows x 512 float32 hidden units per forward pass
DECODE_FRAMES = 4_000_000  # activations gathered before they are decoded (16 MB)
POOL_MIN_FRAMES = 300_000  # below this much to decode (~5 s of DBN), worker processes are not worth starting


@dataclass(frozen=True)
class FrameExtraction:
    """How a track becomes frame rows. Every field is part of the cache key."""
    window: float = 30.0  # seconds of audio per encoder call (MARBLE decodes 30 s valid/test clips in one piece)
    min_last: float = 1.0  # a last window shorter than this joins the one before it (no frame is ever dropped)
    crop: Optional[float] = None  # only the first `crop` seconds
    normalize: str = "clip"  # z-normalise the whole track once, as probing.features.clip_windows; "none": as it is
    pooling: str = "frames"  # one row per frame: nothing is pooled
    states: Optional[tuple] = None  # the hidden states stored: None all, else e.g. (7,) for --layers 7
    sample_rate: int = SAMPLE_RATE  # the model's rate (frames at sample_rate / stride: 50 Hz, MERT-v1's 75 Hz)

    def __post_init__(self):
        if not self.window > 0 or (self.crop is not None and not self.crop > 0):
            raise ValueError(f"FrameExtraction: window {self.window} and crop {self.crop} must be positive seconds")


FRAMES = FrameExtraction()


# ------------------------------------------------------------------------------------------------------------------
# frames

def track_windows(num_samples, ext, stride):
    """[(start, stop)] sample ranges covering the track: `window` seconds each (a multiple of the stride), a last
    one shorter than `min_last` joined to the one before."""
    size = max(1, int(round(ext.window * ext.sample_rate / stride))) * stride
    starts = list(range(0, num_samples, size)) or [0]
    if len(starts) > 1 and num_samples - starts[-1] < ext.min_last * ext.sample_rate:
        starts.pop()
    return [(a, starts[i + 1] if i + 1 < len(starts) else num_samples) for i, a in enumerate(starts)]


def frame_inputs(wav, ext, field, stride):
    """The encoder inputs of a track and how many frames each contributes: window [a, b) is fed as samples
    [a - field // 2, b + field - field // 2), zeros outside the track, which gives (b - a) // stride + 1 frames, frame
    j centred on sample a + stride * j. Every window but the last keeps (b - a) / stride of them (its last frame is
    the next window's first); the last keeps all. A track of L samples gets L // stride + 1 frames."""
    left = field // 2
    padded = np.concatenate([np.zeros(left, np.float32), wav, np.zeros(field - left, np.float32)])
    windows = track_windows(len(wav), ext, stride)
    return [(padded[a:b + field], (b - a) // stride + (i == len(windows) - 1)) for i, (a, b) in enumerate(windows)]


def num_frames(num_samples, stride):
    return num_samples // stride + 1


def read_track(path, ext):
    """The track at the model's rate (its first `crop` seconds), z-normalised once, as probing.features.clip_windows reads a
    clip: block-wise resampling and in-place normalisation, so a 10-minute track is held about once."""
    rate = ext.sample_rate
    wav = read_16k(path, frames=None if ext.crop is None else int(round(ext.crop * rate)), rate=rate)
    return znorm_(wav) if ext.normalize == "clip" else wav  # "none": --no-normalize


@torch.no_grad()
def frame_hidden_states(encoder, inputs, keeps, states, device):
    """Encoder inputs (1-D float32 arrays) -> per input a float32 array [keep, len(states), dim] of the chosen hidden
    states at each kept frame (the track was normalised once already: probing.features.encode)."""
    out, lengths = encode(encoder, inputs, device)
    h = torch.stack([out.hidden_states[s] for s in states], 2)  # B x T x S' x D
    frames = encoder.num_frames(lengths)
    assert bool((frames >= torch.tensor(keeps)).all()), (frames, keeps)
    return [h[i, :k].float().cpu().numpy() for i, k in enumerate(keeps)]


def stored_states(ext, encoder):
    return list(range(encoder.cfg.layers + 1)) if ext.states is None else [int(s) for s in ext.states]


def gigabytes(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_disk(path, clips, ext, stride, row_bytes, log, num_states=1):
    """Frames the clips will add (from the audio headers) against the free space under `path`: stops before a
    multi-hour extraction would fill the disk."""
    need = 0
    for c in clips:
        try:
            n = audio_info(c.path, sr=ext.sample_rate)[0]
        except AudioError:
            continue  # reported with its path when extraction reads it
        if ext.crop is not None:
            n = min(n, int(round(ext.crop * ext.sample_rate)))
        need += num_frames(n, stride) * row_bytes
    free = shutil.disk_usage(path).free
    log(f"frame features of {len(clips)} tracks: {gigabytes(need)} to write to {path} ({gigabytes(free)} free)")
    if need > free:
        smaller = (f"--layers K stores one hidden state ({gigabytes(need // num_states)}; float16 already)"
                   if num_states > 1 else "this is one hidden state, float16 already")
        raise StoreError(f"{path}: the frame features of {len(clips)} tracks need {gigabytes(need)} "
                         f"({row_bytes} bytes a frame, {ext.sample_rate / stride:g} frames a second), only {gigabytes(free)} is free; "
                         f"{smaller}, or give --cache-dir on a larger disk")


def _read_track(path, ext):
    try:
        return read_track(path, ext), None
    except AudioError as e:
        return None, str(e)


def extract_frames(ext, clips, encoder, path, key, device, batch_seconds, log=print, workers=0):
    """Extracts the clips not yet in the store at `path` (under torchrun, this rank's share: extract_units); returns
    {clip key: reason} for those that could not be used. Windows of the tracks of one unit (about `batch_seconds`
    of audio) share encoder calls of up to that much audio; a track's rows are written window by window and indexed
    once all are on disk. workers: decoding processes (0: threads)."""
    field, stride = receptive_field(encoder.cfg.conv_layers)
    states = stored_states(ext, encoder)
    budget = unit_budget(ext, encoder, batch_seconds)
    rank, world = ranks()

    def work(store, units, stored, todo, failed):
        nonlocal encoder
        if rank == 0:
            check_disk(path, todo, ext, stride, store.row_bytes, log, len(states))
        encoder = encoder.to(device)
        pending = []  # (clip, frames kept, last window of its track, encoder input), in track order

        def flush():
            outs = frame_hidden_states(encoder, [p[3] for p in pending], [p[1] for p in pending], states, device)
            for (clip, _, last, _), a in zip(pending, outs):
                if clip.key in failed or clip.key in stored or clip.key in store.index:
                    continue  # failed, or encoded again only because its unit was not complete
                peak = float(np.abs(a).max()) if a.size else 0.0
                if not np.isfinite(peak) or peak > np.finfo(DTYPE).max:
                    failed[clip.key] = (f"{clip.path}: hidden states reach {peak:.3g}, beyond float16 "
                                        f"(max {np.finfo(DTYPE).max:g}); the model's activations are not storable")
                    store.abandon()  # the rows of its earlier windows
                    continue
                store.write_part(a)
                if last:
                    store.commit(clip.key)
            pending.clear()

        unit_of = {c.key: i for i, u in enumerate(units) for c in u}
        current, t0, done = None, time.time(), 0
        for clip, (wav, error) in decode_ahead(functools.partial(_read_track, ext=ext),
                                               [c for u in units for c in u], workers):
            if pending and unit_of[clip.key] != current:
                flush()
            current = unit_of[clip.key]
            if error is not None:
                failed[clip.key] = error
                continue
            inputs = frame_inputs(wav, ext, field, stride)
            for i, (x, keep) in enumerate(inputs):
                if pending and sum(len(p[3]) for p in pending) + len(x) > budget:
                    flush()
                pending.append((clip, keep, i == len(inputs) - 1, x))
            done += 1
            if done % 100 == 0:
                log(f"  {done}/{sum(len(u) for u in units)} tracks, {time.time() - t0:.0f} s"
                    + (f" (rank {rank} of {world})" if world > 1 else ""))
        if pending:
            flush()

    return extract_units(path, key, (len(states), encoder.cfg.dim), clips, lambda cs: header_seconds(cs, ext.crop),
                         batch_seconds, work, log)


# ------------------------------------------------------------------------------------------------------------------
# labels, crops, loss

@dataclass
class BeatSplit:
    """The tracks of one split: track i is store rows starts[i] .. starts[i] + counts[i] - 1 (its frames), with its
    annotated beats that fall on one of them."""
    keys: list
    starts: np.ndarray
    counts: np.ndarray
    beats: list

    def __len__(self):
        return len(self.starts)


def beat_frames(beats, n, fps):
    """The frame of each beat, round(fps t) (MARBLE's label index), for beats that fall on one of the n frames."""
    idx = np.rint(np.asarray(beats, np.float64) * fps).astype(np.int64)
    return idx[(idx >= 0) & (idx < n)]


def frame_labels(beats, n, fps, neighbours):
    """0/1 per frame: the beats' frames and, in training, their +-neighbours."""
    y = np.zeros(n, np.float32)
    idx = beat_frames(beats, n, fps)
    for d in range(-neighbours, neighbours + 1):
        j = idx + d
        y[j[(j >= 0) & (j < n)]] = 1.0
    return y


def beat_split(store, clips, fps):
    starts, counts, _ = store.item_rows([c.key for c in clips], "clip")
    # a reference beat after the track's last frame cannot be found (GTZAN-Rhythm's reggae.00002 has some): dropped
    refs = [np.asarray(c.label, np.float64)[np.rint(np.asarray(c.label) * fps) < n] for c, n in zip(clips, counts)]
    return BeatSplit([c.key for c in clips], starts, counts, refs)


def train_labels(num_rows, split, fps):
    """Labels of every store row a training crop can read (float32 0/1, zeros elsewhere): indexed by the same row
    numbers as the features, so a crop's labels are its frames' labels by construction."""
    y = np.zeros(num_rows, np.float32)
    for s, n, b in zip(split.starts, split.counts, split.beats):
        y[s:s + n] = frame_labels(b, n, fps, NEIGHBOURS)
    return y


def crop_rows(starts, counts, crop, gen):
    """Row numbers of one random crop of `crop` frames per track (the whole track if shorter), start uniform over
    the track's frames, tracks one after the other."""
    lengths = np.minimum(counts, crop)
    offsets = (torch.rand(len(counts), generator=gen).numpy() * (counts - lengths + 1)).astype(np.int64)
    return rows_of(starts + np.minimum(offsets, counts - lengths), lengths)


def beat_loss(logits, y, total):
    """logits H x R (one beat logit per frame and head), y R. BCE-with-logits summed over the frames / `total` (the
    batch's frames, over all its passes), summed over heads: each head gets its own mean loss's gradient.

    One logit with BCE rather than MARBLE's 2-way softmax with CE: softmax([z0, z1])[1] = sigmoid(z1 - z0), so the
    two are the same model and loss, and the frame's beat probability is plainly sigmoid(logit), with no class axis
    to confuse with time (MARBLE's CE went without the permute, and its softmax ran over time)."""
    return F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="sum") / total


def rows_per_pass(num_heads, row_elems, hidden):
    return max(1, min(INPUT_BYTES // (4 * row_elems), ACTIVATION_BYTES // (4 * hidden * num_heads)))


def head_logits(heads, x):
    """[R, S, D] -> [H, R]: the single beat logit of every head at every frame."""
    return heads(x)[..., 0].flatten(0, 1)


# ------------------------------------------------------------------------------------------------------------------
# decoding and scoring

def score_estimates(ref, est, full=True):
    """One track's counts: (estimated, reference, matched at 70 ms[, matched at 20 ms, mir_eval.beat.f_measure at 70
    ms and at 20 ms after trim_beats]). match_events is the best one-to-one matching within the window."""
    matched = [len(mir_eval.util.match_events(ref, est, TOLERANCES[t])) if len(ref) and len(est) else 0
               for t in (("70ms", "20ms") if full else ("70ms",))]
    out = (len(est), len(ref), *matched)
    if full:
        with warnings.catch_warnings():  # mir_eval warns when a side is empty (the score is 0)
            warnings.simplefilter("ignore")
            r, e = mir_eval.beat.trim_beats(ref), mir_eval.beat.trim_beats(est)
            out += tuple(mir_eval.beat.f_measure(r, e, TOLERANCES[t]) for t in ("70ms", "20ms"))
    return out


def decode_beats(act, fps):
    """Beat times (s) from one track's frame activations: madmom's DBN at the frame rate, defaults otherwise."""
    return DBNBeatTrackingProcessor(fps=fps)(act)


def _score_track(job):
    """(activation [frames], reference beats, fps, full) -> score_estimates. Runs in worker processes."""
    act, ref, fps, full = job
    return score_estimates(ref, decode_beats(act, fps), full)


def micro_f(matched, estimated, reference):
    """MARBLE's beat F: precision and recall from counts summed over the split; 0 when either side has none."""
    if estimated == 0 or reference == 0:
        return 0.0
    return mir_eval.util.f_measure(matched / estimated, matched / reference)


class Decoder:
    """Runs _score_track over many (head, track) activations, in worker processes (fork: no re-import) when there is
    enough work to pay for them."""

    def __init__(self, workers=None):
        self.workers = workers or min(32, len(os.sched_getaffinity(0)))
        self.pool = None

    def map(self, jobs):
        if self.workers > 1 and sum(len(j[0]) for j in jobs) >= POOL_MIN_FRAMES:
            if self.pool is None:
                self.pool = multiprocessing.get_context("fork").Pool(self.workers)
            return self.pool.map(_score_track, jobs, chunksize=max(1, len(jobs) // (4 * self.workers)))
        return [_score_track(j) for j in jobs]

    def close(self):
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None


@torch.no_grad()
def track_logits(heads, rows, split, cap):
    """Yields (track index, H x frames logits) for every whole track of the split, in order; passes of at most
    `cap` rows, so memory holds one pass and one track's logits."""
    heads.eval()
    i = 0
    while i < len(split):
        j, total = i + 1, int(split.counts[i])
        while j < len(split) and total + split.counts[j] <= cap:
            total, j = total + int(split.counts[j]), j + 1
        r = rows_of(split.starts[i:j], split.counts[i:j])
        out = torch.cat([head_logits(heads, rows(r[a:a + cap])).float().cpu() for a in range(0, len(r), cap)], 1)
        ends = np.cumsum(split.counts[i:j])
        for t, (a, b) in enumerate(zip(ends - split.counts[i:j], ends)):
            yield i + t, out[:, a:b]
        i = j


def score_heads(heads, rows, split, fps, decoder, cap, which=None, full=True):
    """Beat scores of every head on a split: {metric: array [H]}, NaN for heads not in `which` (bool [H]). full:
    all four BEAT_METRICS, else only f_70ms (the per-epoch validation monitor)."""
    H = heads.num_heads
    which = np.ones(H, bool) if which is None else np.asarray(which, bool)
    idx = np.flatnonzero(which)
    counts = np.zeros((H, 4))  # estimated, reference, matched 70 ms, matched 20 ms
    track_f = np.zeros((H, 2))
    jobs, owners, frames = [], [], 0

    def decode():
        for h, res in zip(owners, decoder.map(jobs)):
            counts[h, :len(res[:4])] += res[:4]
            if full:
                track_f[h] += res[4:]
        jobs.clear()
        owners.clear()

    if len(idx):
        for t, logits in track_logits(heads, rows, split, cap):
            act = torch.sigmoid(logits[torch.from_numpy(idx)].double()).numpy()  # float64: no 0 for madmom's log
            for h, a in zip(idx, act):
                jobs.append((a, split.beats[t], fps, full))
                owners.append(h)
            frames += act.size
            if frames >= DECODE_FRAMES:
                decode()
                frames = 0
        decode()
    out = {m: np.full(H, np.nan) for m in (BEAT_METRICS if full else BEAT_METRICS[:1])}
    for h in idx:
        est, ref, m70, m20 = counts[h]
        out["f_70ms"][h] = micro_f(m70, est, ref)
        if full:
            out["f_20ms"][h] = micro_f(m20, est, ref)
            out["track_f_70ms"][h], out["track_f_20ms"][h] = track_f[h] / len(split)
    return out


# ------------------------------------------------------------------------------------------------------------------
# training

def train_beat_heads(task, rows, data, labels, layer_choices, lrs, epochs, seed, device, fps, decoder,
                     log=print, batch_size=64):
    """Trains the grid layer_choices x lrs together on frames (choices index the stored states). Returns (results,
    heads) as probing.clips.train_heads, with the same per-head schedule (probing.heads.HeadSchedule): per head in grid order
    (lr-major), the best validation f_70ms, its epoch, and the four figures on valid and test at the best weights."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    train, valid = data["train"], data["valid"]
    num_states, dim = rows(rows_of(train.starts[:1], np.ones(1, np.int64))).shape[1:]
    C, K = len(layer_choices), len(lrs)
    heads = ProbeHeads(layer_choices, K, num_states, dim, 1, gen).to(device)
    opt = HeadAdam(heads, torch.tensor(lrs, dtype=torch.float32, device=device).expand(C, K))
    sched = HeadSchedule(heads, opt, task.patience, task.plateau_patience, task.metrics[0], log)
    crop = int(round(CROP_SECONDS * fps))
    cap = rows_per_pass(C * K, num_states * dim, HIDDEN)
    for epoch in range(epochs):
        heads.train()
        order = torch.randperm(len(train), generator=gen).numpy()
        for s in range(0, len(order), batch_size):
            items = order[s:s + batch_size]
            r = crop_rows(train.starts[items], train.counts[items], crop, gen)
            y = torch.from_numpy(labels[r]).to(device)
            for p in heads.parameters():
                p.grad = None
            for a in range(0, len(r), cap):  # gradients of the batch accumulate over passes of <= cap frames
                beat_loss(head_logits(heads, rows(r[a:a + cap])), y[a:a + cap], len(r)).backward()
            opt.step()
        scores = score_heads(heads, rows, valid, fps, decoder, cap, which=sched.active.numpy(), full=False)
        if not sched.step(epoch, scores[BEAT_METRICS[0]]):
            break
    sched.restore()
    valid_out = score_heads(heads, rows, valid, fps, decoder, cap)
    test_out = score_heads(heads, rows, data["test"], fps, decoder, cap)
    metrics_of = lambda h: tuple({m: float(out[m][h]) for m in BEAT_METRICS} for out in (valid_out, test_out))
    return grid_results(layer_choices, lrs, heads, sched, metrics_of), heads


# ------------------------------------------------------------------------------------------------------------------
# one (task, model) run, called by probe.py (run)

def folder_store_name(root):
    """`beat` reads any folder, whose clip keys are relative to it: one store name per folder."""
    path = os.path.abspath(root)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(path.rstrip("/")))[:40] or "root"
    return f"beat-{name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def run(task_name, task, listing, model_spec, encoder, tag, args, log=print):
    """The run of a beat task, from its listing on: frames instead of windows, crops and beat decoding."""
    num_states = encoder.cfg.layers + 1
    choices, lrs = runs.head_grid(task, args, num_states)
    one = choices[0] if len(choices) == 1 and isinstance(choices[0], int) else None  # --layers K: store state K only
    ext = dataclasses.replace(runs.task_extraction(task, args, encoder.cfg.sample_rate), states=None if one is None else (one,))
    key = json.loads(json.dumps(cache_key(tag, ext)))  # as meta.json holds it (states: a list)
    features = folder_store_name(args.data_root) if task.features == "beat" else task.features
    path = store_path(args.cache_dir, features, key)
    store, failed, extract_s = runs.extract_or_exit(task_name, extract_frames, ext, listing.clips, encoder, path, key,
                                                 args, log)
    splits = runs.usable_splits(task_name, listing.clips, failed, log, what="tracks")
    _, stride = receptive_field(encoder.cfg.conv_layers)
    fps = ext.sample_rate / stride
    data = {split: beat_split(store, part, fps) for split, part in splits.items()}
    labels = train_labels(store.rows, data["train"], fps)
    stored = stored_states(ext, encoder)
    head_choices = [c if isinstance(c, str) else stored.index(c) for c in choices]
    rows = Rows(store, args.device, runs.FEATURES_ON_DEVICE_BYTES)
    decoder = Decoder()
    t0 = time.time()
    try:
        results, heads = train_beat_heads(task, rows, data, labels, head_choices, lrs, args.epochs or task.epochs,
                                          args.seed, args.device, fps, decoder, log, args.batch_size)
    finally:
        decoder.close()
    train_s = time.time() - t0
    for x in results:  # in the model's terms: state indices and weights over all its states
        x["layers"] = choices[x["cell"][0]]
        full = np.zeros(num_states)
        full[stored] = x["layer_weights"]
        x["layer_weights"] = [round(float(w), 4) for w in full]
    record = runs.result_record(task_name, task, model_spec, tag, args, results, splits, ext, failed,
                             dict(extract=extract_s, train=train_s),
                             frames={s: int(d.counts.sum()) for s, d in data.items()},
                             beats={s: int(sum(len(b) for b in d.beats)) for s, d in data.items()},
                             items={s: len(d) for s, d in data.items()}, headline=task.metrics[0], fps=fps)
    if args.save_heads:
        record["head_file"] = save_beat_head(args.save_heads, task_name, task, listing, ext, model_spec, tag, encoder,
                                             args.seed, heads, validation_best(results), stored, fps)
    return runs.write_result(record, results, task, args, log)


# ------------------------------------------------------------------------------------------------------------------
# saved beat heads and prediction

def save_beat_head(folder, task_name, task, listing, ext, spec, tag, encoder, seed, heads, r, stored, fps):
    """probing.runs.save_head with the head's layer weights spread over all the model's states (zero for those not
    stored), so that `probe.py predict` can apply it to the encoder's full hidden states."""
    state = heads.head_state(*r["cell"])
    full = torch.zeros(encoder.cfg.layers + 1)
    full[stored] = state["layer_weights"]
    state["layer_weights"] = full
    return runs.save_head(folder, task_name, task, listing, ext, spec, tag, encoder, seed, heads, r, state=state,
                              fps=fps)


@torch.no_grad()
def predict_beats(encoder, heads, blob, path, device):
    """Beat times (seconds) of one audio file under a saved beat head: the whole file, window by window."""
    ext = FrameExtraction(**{**blob["extraction"], "states": None, "sample_rate": encoder.cfg.sample_rate})
    field, stride = receptive_field(encoder.cfg.conv_layers)
    states = list(range(encoder.cfg.layers + 1))
    heads = heads.to(device).eval()
    encoder = encoder.to(device)
    logits = []
    for x, keep in frame_inputs(read_track(path, ext), ext, field, stride):
        h = frame_hidden_states(encoder, [x], [keep], states, device)[0]
        logits.append(head_logits(heads, torch.from_numpy(h).to(device))[0].float().cpu())
    return decode_beats(torch.sigmoid(torch.cat(logits).double()).numpy(), ext.sample_rate / stride)
