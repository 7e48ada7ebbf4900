"""Probe a frozen encoder on MIR tasks, following the MARBLE v1 protocol behind the Music2Vec / MusicHuBERT papers.

    python probe.py --task nsynth_pitch --model out/ckpt.pt --data-root ~/data/nsynth
    python probe.py --task gtzan_genre --model facebook-hubert-base-ls960/ --data-root ~/data/gtzan --sweep
    python probe.py --task nsynth_pitch,nsynth_instr --model out/ckpt.pt random --data-root synth/nsynth

1. Extract: every clip is z-normalised, cut into the task's windows, run through the frozen encoder, and each of the
   layers+1 hidden states is mean-pooled per window. One .npy per clip ([windows, layers+1, dim]) goes into a cache
   per (data set, model) that later runs reuse; an interrupted extraction resumes where it stopped.
2. Train: a softmax-weighted sum of the hidden states into an MLP (512 hidden units, dropout 0.2), Adam, batch 64
   windows, ReduceLROnPlateau, early stopping on the validation metric; the best-validation weights are tested. At
   evaluation the logits of a clip's windows are averaged (MARBLE averages logits, not embeddings).
3. --sweep trains the benchmark's whole grid (6 lrs x {weighted, each layer}) as one batch of heads and reports the
   test score of the validation-best cell.
One JSON line per (task, model) is appended to --results, and a readable line is printed.
Protocol facts and where MARBLE's code differs from the papers: ../shared/spec/probe.md (summarised in README).
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import rankdata
from tqdm import tqdm

from data import downstream
from data.audio import SAMPLE_RATE, AudioError, load_audio
from model import Encoder, EncoderConfig, load_pretrained

# ------------------------------------------------------------------------------------------------------------------
# defaults (MARBLE v1: benchmark/tasks/*/*_base_config.yaml and the MARBLE paper, Appendix A)
SEED = 1234  # MARBLE's pl.seed_everything
BATCH_SIZE = 64
HIDDEN = 512
DROPOUT = 0.2
LR_FACTOR = 0.5  # ReduceLROnPlateau factor
SWEEP_LRS = (5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2)
RESULTS = "runs/probe_results.jsonl"
CACHE_DIR = "runs/probe_features"
AUDIO_WORKERS = 4  # threads decoding and resampling audio ahead of the encoder
FEATURES_ON_DEVICE_BYTES = 8 << 30  # cached features up to this size are moved to the GPU once for training


@dataclass
class Task:
    reader: Callable  # data root -> list of downstream.Clip
    kind: str  # multiclass | multilabel | regression
    num_classes: int
    metrics: tuple  # reported on test; the first is the monitored (validation) metric
    epochs: int
    patience: int  # early stopping, on the monitored validation metric
    plateau_patience: int  # ReduceLROnPlateau
    lr: float = 1e-3
    window: float = 30.0  # seconds per window; Music2Vec configs use 30 s non-overlapping windows everywhere
    min_last: float = 1.0  # a shorter last window is dropped (MARBLE: < 1 s)
    window_norm: bool = False  # z-normalise each window instead of the whole clip (VocalSet's preprocess)
    trim_leading_silence: bool = False  # VocalSet's preprocess runs sox-style VAD first
    features: str = ""  # cache name: tasks over the same clips and windows share extracted features


TASKS = {
    "nsynth_instr": Task(lambda root: downstream.read_nsynth(root, "instrument"), "multiclass", 11, ("acc",),
                         epochs=50, patience=10, plateau_patience=3, features="nsynth"),
    "nsynth_pitch": Task(lambda root: downstream.read_nsynth(root, "pitch"), "multiclass", 128, ("acc",),
                         epochs=50, patience=10, plateau_patience=3, features="nsynth"),
    "gtzan_genre": Task(downstream.read_gtzan, "multiclass", 10, ("acc",),
                        epochs=100, patience=20, plateau_patience=6, lr=5e-3, features="gtzan"),
    "emo": Task(downstream.read_emo, "regression", 2, ("r2", "arousal_r2", "valence_r2"),
                epochs=100, patience=20, plateau_patience=5, features="emo"),
    # VocalSet: MARBLE cuts 3 s chunks (remainder dropped) and z-normalises each chunk before extraction
    "vocalset_tech": Task(lambda root: downstream.read_vocalset(root, "technique"), "multiclass", 10, ("acc",),
                          epochs=100, patience=10, plateau_patience=5, window=3.0, min_last=3.0, window_norm=True,
                          trim_leading_silence=True, features="vocalset"),
    "vocalset_singer": Task(lambda root: downstream.read_vocalset(root, "singer"), "multiclass", 20, ("acc",),
                            epochs=100, patience=20, plateau_patience=5, window=3.0, min_last=3.0, window_norm=True,
                            trim_leading_silence=True, features="vocalset"),
    "mtt": Task(downstream.read_mtt, "multilabel", 50, ("roc_auc", "ap"),
                epochs=100, patience=10, plateau_patience=3, features="mtt"),
}

# a small random encoder for tests and smoke runs (extraction in milliseconds on CPU)
TINY = dict(conv_layers=((64, 10, 5),) + ((64, 3, 2),) * 4 + ((64, 2, 2),) * 2, dim=64, layers=2, heads=2, ffn=128,
            pos_conv_kernel=16, pos_conv_groups=4)
MODEL_CONFIGS = {
    "hubert_base": EncoderConfig.hubert_base, "wav2vec2_base": EncoderConfig.wav2vec2_base,
    "data2vec_base": EncoderConfig.data2vec_base, "tiny": lambda: EncoderConfig.hubert_base(**TINY),
}


# ------------------------------------------------------------------------------------------------------------------
# metrics (torchmetrics in MARBLE; these equal sklearn's accuracy_score, roc_auc_score / average_precision_score
# with average="macro", and r2_score per output)

def accuracy(scores, y):
    return float((np.asarray(scores).argmax(1) == np.asarray(y)).mean())


def _usable_columns(y):
    """Labels with both positives and negatives in `y`: AUC and AP are undefined for the others, which are left out
    of the macro average (sklearn raises; torchmetrics warns and scores them 0)."""
    pos = y.sum(0)
    return np.flatnonzero((pos > 0) & (pos < len(y)))


def macro_roc_auc(scores, y):
    """Mann-Whitney form of the AUC per label, ties counted half (average ranks), then the mean over labels."""
    scores, y = np.asarray(scores, np.float64), np.asarray(y) > 0.5
    cols = _usable_columns(y)
    if len(cols) == 0:
        return float("nan")
    s, t = scores[:, cols], y[:, cols]
    ranks = rankdata(s, axis=0)
    n_pos = t.sum(0)
    n_neg = len(t) - n_pos
    auc = ((ranks * t).sum(0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return float(auc.mean())


def average_precision(scores, y):
    """Sum over distinct score thresholds (high to low) of (recall step) x precision at that threshold, as sklearn."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], y[order].astype(np.float64)
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp = np.cumsum(t)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall_step = np.diff(np.r_[0.0, tp]) / t.sum()
    return float((recall_step * precision).sum())


def macro_average_precision(scores, y):
    scores, y = np.asarray(scores, np.float64), np.asarray(y) > 0.5
    cols = _usable_columns(y)
    if len(cols) == 0:
        return float("nan")
    return float(np.mean([average_precision(scores[:, c], y[:, c]) for c in cols]))


def r2_per_dim(pred, y):
    pred, y = np.asarray(pred, np.float64), np.asarray(y, np.float64)
    ss_res = ((y - pred) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    return 1.0 - ss_res / ss_tot


def task_metrics(kind, outputs, y, names):
    """outputs: clip-level logits (or regression outputs) N x C."""
    out = {}
    if kind == "multiclass":
        out["acc"] = accuracy(outputs, y)
    elif kind == "multilabel":
        if "roc_auc" in names:
            out["roc_auc"] = macro_roc_auc(outputs, y)
        if "ap" in names:  # AP is slow-ish: only computed when asked for (test), not every validation epoch
            out["ap"] = macro_average_precision(outputs, y)
    else:
        r2 = r2_per_dim(outputs, y)
        out.update(r2=float(r2.mean()), arousal_r2=float(r2[0]), valence_r2=float(r2[1]))
    return {k: out[k] for k in names}


# ------------------------------------------------------------------------------------------------------------------
# models

def model_tag(spec, cfg, seed):
    """Cache key of a model: a new checkpoint (other size or mtime) gets a new cache."""
    if spec == "random":
        h = hashlib.sha1(json.dumps(asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]
        return f"random-{h}-seed{seed}"
    path = os.path.abspath(spec)
    files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path))
    h = hashlib.sha1()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    name = os.path.basename(path.rstrip("/")).replace(".", "_") or "model"
    return f"{name}-{h.hexdigest()[:10]}"


def load_model(spec, random_cfg, seed):
    """(encoder in eval mode, cache tag). spec: "random" (random init from random_cfg under `seed`) or anything
    model.load_pretrained accepts (our checkpoint, a Hugging Face folder)."""
    if spec == "random":
        torch.manual_seed(seed)
        return Encoder(random_cfg).eval(), model_tag(spec, random_cfg, seed)
    if not os.path.exists(spec):
        sys.exit(f"--model {spec}: no such file or folder (give one of our checkpoints, a Hugging Face model folder, "
                 "or 'random')")
    enc = load_pretrained(spec)
    return enc, model_tag(spec, enc.cfg, seed)


# ------------------------------------------------------------------------------------------------------------------
# extraction

def znorm(x):
    # Wav2Vec2FeatureExtractor(do_normalize=True), which MARBLE applies to every file: (x - mean) / sqrt(var + 1e-7)
    return ((x - x.mean()) / np.sqrt(x.var() + 1e-7)).astype(np.float32)


def trim_leading_silence(x, frame=320, floor_db=-40.0):
    """Drops the 20 ms frames before the first one within `floor_db` of the loudest frame. A stand-in for the sox
    VAD (torchaudio.functional.vad) that MARBLE runs on VocalSet, which trims leading silence only."""
    n = len(x) // frame
    if n == 0:
        return x
    rms = np.sqrt((x[: n * frame].reshape(n, frame) ** 2).mean(1))
    loud = np.flatnonzero(rms >= rms.max() * 10 ** (floor_db / 20))
    return x[loud[0] * frame:]


def clip_windows(wav, task):
    """MARBLE's extraction: z-normalise the whole clip, then non-overlapping windows; a last window shorter than
    task.min_last is dropped, a longer one is kept at its own length."""
    if task.trim_leading_silence:
        wav = trim_leading_silence(wav)
    if not task.window_norm:
        wav = znorm(wav)
    size, keep = int(round(task.window * SAMPLE_RATE)), int(round(task.min_last * SAMPLE_RATE))
    windows = [wav[s:s + size] for s in range(0, len(wav), size)]
    windows = [w for w in windows if len(w) >= keep]
    return [znorm(w) for w in windows] if task.window_norm else windows


@torch.no_grad()
def pooled_hidden_states(encoder, windows, device):
    """Windows (list of 1-D float32 arrays) -> [windows, layers+1, dim]: every hidden state mean-pooled over the
    window's valid frames. Equal-length windows go through unpadded."""
    lengths = torch.tensor([len(w) for w in windows])
    wav = torch.zeros(len(windows), int(lengths.max()))
    for i, w in enumerate(windows):
        wav[i, :len(w)] = torch.from_numpy(w)
    equal = bool((lengths == lengths[0]).all())
    out = encoder(wav.to(device), lengths=None if equal else lengths.to(device))
    h = torch.stack(out.hidden_states, 1)  # B x S x T x D
    if out.padding_mask is None:
        return h.mean(2).float().cpu()
    valid = (~out.padding_mask).to(h.dtype)[:, None, :, None]
    return ((h * valid).sum(2) / valid.sum(2)).float().cpu()


def _read_windows(clip, task):
    try:
        return clip_windows(load_audio(clip.path), task), None
    except AudioError as e:
        return None, str(e)


def _prefetch(fn, items, workers):
    """fn over items in order on a thread pool, at most 4 * workers ahead (audio decoding overlaps the encoder)."""
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for item in items:
            pending.append((item, pool.submit(fn, item)))
            if len(pending) >= 4 * workers:
                it, fut = pending.popleft()
                yield it, fut.result()
        while pending:
            it, fut = pending.popleft()
            yield it, fut.result()


def cache_path(cache, clip):
    return os.path.join(cache, clip.key + ".npy")


def extract(task, clips, encoder, cache, device, batch_seconds):
    """Writes one .npy per clip under `cache` (skipping clips already there) and returns {clip key: reason} for the
    clips that could not be used. Each file is written to a temporary name and renamed, so an interrupted run never
    leaves a truncated file behind."""
    todo = [c for c in clips if not os.path.exists(cache_path(cache, c))]
    failed = {}
    if not todo:
        return failed
    encoder = encoder.to(device)
    budget = batch_seconds * SAMPLE_RATE
    batch, batch_samples = [], 0

    def flush():
        windows = [w for _, ws in batch for w in ws]
        pooled, i = [], 0
        while i < len(windows):  # a long track's windows are split over several encoder calls
            j, n = i + 1, len(windows[i])
            while j < len(windows) and n + len(windows[j]) <= budget:
                n, j = n + len(windows[j]), j + 1
            pooled.append(pooled_hidden_states(encoder, windows[i:j], device).numpy())
            i = j
        pooled = np.concatenate(pooled)
        start = 0
        for clip, ws in batch:
            path = cache_path(cache, clip)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path[:-4] + f".tmp{os.getpid()}.npy"
            np.save(tmp, pooled[start:start + len(ws)])
            os.replace(tmp, path)
            start += len(ws)
        batch.clear()

    bar = tqdm(total=len(todo), desc=f"extract -> {cache}", unit="clip")
    for clip, (windows, error) in _prefetch(lambda c: _read_windows(c, task), todo, AUDIO_WORKERS):
        if error is None and not windows:
            error = f"{clip.path}: shorter than {task.min_last:g} s, no window to extract"
        if error is not None:
            failed[clip.key] = error
        else:
            n = sum(len(w) for w in windows)
            if batch and batch_samples + n > budget:
                flush()
                batch_samples = 0
            batch.append((clip, windows))
            batch_samples += n
        bar.update(1)
    if batch:
        flush()
    bar.close()
    return failed


def load_features(clips, cache):
    """Stacks the cached windows: X [rows, layers+1, dim] float32, clip index of each row."""
    arrays = [np.load(cache_path(cache, c)) for c in clips]
    rows = np.concatenate([np.full(len(a), i) for i, a in enumerate(arrays)])
    return torch.from_numpy(np.concatenate(arrays)), torch.from_numpy(rows)


# ------------------------------------------------------------------------------------------------------------------
# probe heads: H independent heads (weighted sum over states -> Linear -> ReLU -> Dropout -> Linear), stacked along a
# leading head axis so the sweep's whole grid trains in one pass over the data

def layer_choice_mask(choice, num_states):
    """Which hidden states a head mixes. "all": all layers+1 (the Music2Vec/MusicHuBERT paper); "transformer":
    1..layers (MARBLE's code drops the transformer input, state 0); an int: that state alone."""
    mask = torch.zeros(num_states, dtype=torch.bool)
    if choice == "all":
        mask[:] = True
    elif choice == "transformer":
        mask[1:] = True
    else:
        mask[int(choice)] = True
    return mask


class ProbeHeads(torch.nn.Module):
    def __init__(self, layer_choices, num_states, dim, num_classes, generator):
        super().__init__()
        H = len(layer_choices)
        self.register_buffer("allowed", torch.stack([layer_choice_mask(c, num_states) for c in layer_choices]))

        def uniform(*shape, fan_in):  # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1 / math.sqrt(fan_in)
            return torch.nn.Parameter(torch.empty(*shape).uniform_(-bound, bound, generator=generator))

        # MARBLE initialises the layer weights with randn (softmax over them); single-state heads get weight 1
        self.layer_logits = torch.nn.Parameter(torch.randn(H, num_states, generator=generator))
        self.w1, self.b1 = uniform(H, dim, HIDDEN, fan_in=dim), uniform(H, 1, HIDDEN, fan_in=dim)
        self.w2, self.b2 = uniform(H, HIDDEN, num_classes, fan_in=HIDDEN), uniform(H, 1, num_classes, fan_in=HIDDEN)

    def layer_weights(self):
        return self.layer_logits.masked_fill(~self.allowed, float("-inf")).softmax(-1)  # H x S

    def forward(self, x):  # x: B x S x D -> H x B x C
        mixed = torch.einsum("hs,bsd->hbd", self.layer_weights(), x)
        hidden = F.dropout(torch.relu(torch.baddbmm(self.b1, mixed, self.w1)), DROPOUT, self.training)
        return torch.baddbmm(self.b2, hidden, self.w2)


class HeadAdam:
    """torch.optim.Adam (weight decay 0) on stacked heads, with one learning rate per head, so that every head of
    the grid keeps its own lr and its own ReduceLROnPlateau schedule. Same arithmetic as torch's single-tensor Adam."""

    def __init__(self, params, lrs, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.lr, self.betas, self.eps, self.t = list(params), lrs.clone(), betas, eps, 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(bc2)).add_(self.eps)
            step_size = (self.lr / bc1).view(-1, *[1] * (p.dim() - 1))
            p.sub_(step_size * m / denom)


def clip_average(outputs, rows, num_clips):
    """H x R x C window outputs -> H x N x C clip outputs: the mean over each clip's windows (MARBLE's scatter_mean
    of logits, before any softmax or sigmoid)."""
    H, R, C = outputs.shape
    sums = torch.zeros(H, num_clips, C, dtype=outputs.dtype).index_add_(1, rows, outputs)
    counts = torch.bincount(rows, minlength=num_clips).clamp_min(1).to(outputs.dtype)
    return sums / counts[None, :, None]


@torch.no_grad()
def predict(heads, X, rows, num_clips, device):
    heads.eval()
    chunk = max(1, (1 << 17) // heads.w1.shape[0])  # rows per pass: heads x rows x 768 activations stay ~0.5 GB
    outs = [heads(X[s:s + chunk].to(device)).float().cpu() for s in range(0, len(X), chunk)]
    return clip_average(torch.cat(outs, 1), rows, num_clips)


def loss_fn(kind, logits, y):
    """Per head, the mean loss over the batch (CE / BCE-with-logits / MSE as MARBLE), summed over heads so each
    head's gradient is its own loss's gradient."""
    H = logits.shape[0]
    flat = logits.flatten(0, 1)
    target = y.repeat(H) if kind == "multiclass" else y.repeat(H, 1)
    if kind == "multiclass":
        return F.cross_entropy(flat, target) * H
    if kind == "multilabel":
        return F.binary_cross_entropy_with_logits(flat, target) * H
    return F.mse_loss(flat, target) * H


def train_heads(task, data, layer_choices, lrs, epochs, seed, device, log=print, batch_size=BATCH_SIZE):
    """Trains one head per (layer choice, lr) pair together. data: {split: (X, rows, y)} with y per clip.
    Returns, per head, the best validation score, the epoch of it, and valid/test metrics at the best weights.

    Per head, as MARBLE's Lightning callbacks: ReduceLROnPlateau (mode max, factor 0.5, threshold 1e-4 relative),
    EarlyStopping (stops after `patience` epochs without a strictly better score), ModelCheckpoint (keeps the
    first best). A stopped head keeps its best weights and gets lr 0."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    if device != "cpu" and sum(d[0].numel() for d in data.values()) * 4 < FEATURES_ON_DEVICE_BYTES:
        data = {s: (X.to(device), rows, y) for s, (X, rows, y) in data.items()}  # no host-to-device copy per step
    Xtr, rows_tr, y_tr = data["train"]
    num_states, dim = Xtr.shape[1:]
    heads = ProbeHeads(layer_choices, num_states, dim, task.num_classes, gen).to(device)
    H = len(layer_choices)
    lr = torch.tensor(lrs, dtype=torch.float32, device=device)
    opt = HeadAdam(heads.parameters(), lr)
    y_rows = y_tr[rows_tr]  # every window is a training row carrying its clip's label
    monitor = task.metrics[0]
    best = torch.full((H,), float("-inf"))
    best_epoch = torch.zeros(H, dtype=torch.long)
    best_state = {k: v.detach().clone() for k, v in heads.state_dict().items()}
    plateau_best = torch.full((H,), float("-inf"))
    plateau_bad = torch.zeros(H, dtype=torch.long)
    since_best = torch.zeros(H, dtype=torch.long)
    active = torch.ones(H, dtype=torch.bool)
    Xv, rows_v, y_v = data["valid"]
    for epoch in range(epochs):
        heads.train()
        order = torch.randperm(len(Xtr), generator=gen)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            logits = heads(Xtr[idx].to(device))
            loss = loss_fn(task.kind, logits, y_rows[idx].to(device))
            for p in heads.parameters():
                p.grad = None
            loss.backward()
            opt.step()
        outputs = predict(heads, Xv, rows_v, len(y_v), device)
        scores = torch.tensor([task_metrics(task.kind, o.numpy(), y_v.numpy(), (monitor,))[monitor]
                               for o in outputs])
        scores = torch.nan_to_num(scores, nan=float("-inf"))
        improved = active & (scores > best)
        on_device = improved.to(device)
        for k, v in heads.state_dict().items():
            best_state[k][on_device] = v.detach()[on_device]
        best = torch.where(improved, scores, best)
        best_epoch[improved] = epoch
        since_best = torch.where(improved, 0, since_best + 1)
        # ReduceLROnPlateau(mode="max", threshold_mode="rel"): better means above best * (1 + 1e-4)
        plateau_improved = scores > plateau_best * (1 + 1e-4)
        plateau_best = torch.where(plateau_improved, scores, plateau_best)
        plateau_bad = torch.where(plateau_improved, 0, plateau_bad + 1)
        cut = (plateau_bad > task.plateau_patience).to(device)
        opt.lr = torch.where(cut, opt.lr * LR_FACTOR, opt.lr)
        plateau_bad[cut.cpu()] = 0
        active &= since_best < task.patience
        opt.lr = torch.where(active.to(device), opt.lr, torch.zeros_like(opt.lr))
        if H == 1:
            log(f"epoch {epoch + 1:3d}  valid {monitor} {scores[0]:.4f}  best {best[0]:.4f}  lr {opt.lr[0]:.2e}")
        elif epoch % 10 == 0 or not active.any():
            log(f"epoch {epoch + 1:3d}  {int(active.sum())}/{H} heads training  best valid {monitor} "
                f"{best.max():.4f}")
        if not active.any():
            break
    heads.load_state_dict(best_state)
    results = []
    valid_out = predict(heads, Xv, rows_v, len(y_v), device)
    Xt, rows_t, y_t = data["test"]
    test_out = predict(heads, Xt, rows_t, len(y_t), device)
    for h in range(H):
        results.append(dict(
            layers=layer_choices[h], lr=lrs[h], best_epoch=int(best_epoch[h]) + 1, best_valid=float(best[h]),
            valid=task_metrics(task.kind, valid_out[h].numpy(), y_v.numpy(), task.metrics),
            test=task_metrics(task.kind, test_out[h].numpy(), y_t.numpy(), task.metrics),
            layer_weights=[round(float(w), 4) for w in heads.layer_weights()[h].detach().cpu()]))
    return results


def validation_best(results):
    """The reported cell: the best validation score (the first in grid order on ties), with the test score of its
    best-validation weights (MARBLE paper, Appendix A)."""
    return max(results, key=lambda r: r["best_valid"])  # max keeps the first of equal keys


# ------------------------------------------------------------------------------------------------------------------
# one (task, model) run

def select_clips(clips, max_clips):
    """Per split, at most max_clips clips, evenly spaced through the reader's order (which is sorted by class for
    most data sets, so small selections still cover the classes)."""
    if not max_clips:
        return clips
    out = []
    for split in ("train", "valid", "test"):
        part = [c for c in clips if c.split == split]
        if len(part) > max_clips:
            part = [part[i] for i in sorted(set(np.linspace(0, len(part) - 1, max_clips).round().astype(int)))]
        out += part
    return out


def task_data(task_name, data_root, max_clips):
    task = TASKS[task_name]
    try:
        clips = select_clips(task.reader(data_root), max_clips)
    except downstream.DataSetError as e:
        sys.exit(f"{task_name}: {e}")
    missing = [c.path for c in clips if not os.path.isfile(c.path)]
    if missing:
        sys.exit(f"{task_name}: {missing[0]}: audio file not found ({len(missing)} of {len(clips)} clips missing); "
                 f"is --data-root the folder the data set was unpacked into? It is published at "
                 f"{downstream.SOURCES[task.features]}")
    for split in ("train", "valid", "test"):
        if not any(c.split == split for c in clips):
            sys.exit(f"{task_name}: no {split} clips found under {data_root}")
    return task, clips


def run(task_name, model_spec, encoder, tag, args, log=print):
    task, clips = task_data(task_name, args.data_root, args.max_clips)
    cache = os.path.join(args.cache_dir, task.features or task_name, tag)
    t0 = time.time()
    failed = extract(task, clips, encoder, cache, args.device, args.batch_seconds)
    extract_s = time.time() - t0
    if failed:
        log(f"{task_name}: {len(failed)} of {len(clips)} clips could not be used and are left out:")
        for reason in failed.values():
            log(f"  {reason}")
    data = {}
    for split in ("train", "valid", "test"):
        part = [c for c in clips if c.split == split and c.key not in failed]
        if not part:
            sys.exit(f"{task_name}: every {split} clip failed (see above)")
        X, rows = load_features(part, cache)
        y = torch.tensor(np.stack([c.label for c in part])) if task.kind != "multiclass" else \
            torch.tensor([c.label for c in part], dtype=torch.long)
        data[split] = (X, rows, y)
    num_states = data["train"][0].shape[1]
    if args.sweep:
        layer_choices = ["all"] + list(range(num_states))
        grid = [(c, lr) for lr in SWEEP_LRS for c in layer_choices]
    else:
        choice = args.layers if args.layers in ("all", "transformer") else int(args.layers)
        if isinstance(choice, int) and not 0 <= choice < num_states:
            sys.exit(f"--layers {choice}: the model has hidden states 0..{num_states - 1}")
        grid = [(choice, args.lr or task.lr)]
    epochs = args.epochs or task.epochs
    t0 = time.time()
    results = train_heads(task, data, [g[0] for g in grid], [g[1] for g in grid], epochs, args.seed, args.device,
                          log, args.batch_size)
    train_s = time.time() - t0
    r = validation_best(results)
    record = dict(task=task_name, model=model_spec, model_tag=tag, metrics=r["test"], valid=r["valid"],
                  layers=r["layers"], lr=r["lr"], best_epoch=r["best_epoch"], layer_weights=r["layer_weights"],
                  sweep=bool(args.sweep), heads=len(grid), seed=args.seed,
                  clips={s: len(data[s][2]) for s in data}, windows={s: len(data[s][0]) for s in data},
                  skipped=sorted(failed.values()), seconds=dict(extract=round(extract_s, 2), train=round(train_s, 2)))
    if args.sweep:
        record["grid"] = [dict(layers=x["layers"], lr=x["lr"], valid=x["best_valid"], test=x["test"])
                          for x in results]
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(record) + "\n")
    shown = "  ".join(f"{k} {v:.4f}" for k, v in r["test"].items())
    log(f"{task_name}  {model_spec}  test {shown}  (valid {task.metrics[0]} {r['best_valid']:.4f}, layers "
        f"{r['layers']}, lr {r['lr']:g}, epoch {r['best_epoch']}; extract {extract_s:.1f}s, train {train_s:.1f}s "
        f"for {len(grid)} head{'s' if len(grid) > 1 else ''})")
    return record


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, help=f"comma-separated, from: {', '.join(TASKS)}")
    p.add_argument("--model", required=True, nargs="+",
                   help="our checkpoint (.pt), a Hugging Face model folder, or 'random'; several are run in turn "
                        "and printed side by side")
    p.add_argument("--data-root", required=True, help="the folder the task's data set was unpacked into")
    p.add_argument("--model-config", default=None, choices=sorted(MODEL_CONFIGS),
                   help="architecture of --model random (default: that of the first other --model, else "
                        "hubert_base)")
    p.add_argument("--layers", default="all",
                   help="'all' (layers+1 states, the paper), 'transformer' (the layers, MARBLE's code) or one index")
    p.add_argument("--lr", type=float, default=None, help="default: the task's (1e-3; GTZAN 5e-3)")
    p.add_argument("--sweep", action="store_true",
                   help=f"the benchmark grid: lr in {SWEEP_LRS} x layers in {{all, 0..layers}}, all heads at once")
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default: the task's)")
    p.add_argument("--max-clips", type=int, default=None, help="at most this many clips per split (quick runs)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="windows per training step (MARBLE: 64)")
    p.add_argument("--seed", default=str(SEED),
                   help="seed of the head's init and batches and of --model random's init; a comma-separated list "
                        "runs each seed (a new random encoder each) and prints mean ± sd over them")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-seconds", type=float, default=None,
                   help="audio seconds per extraction batch (default 240 on GPU, 60 on CPU)")
    p.add_argument("--cache-dir", default=CACHE_DIR)
    p.add_argument("--results", default=RESULTS)
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    try:
        args.seeds = [int(v) for v in args.seed.split(",") if v.strip()]
    except ValueError:
        p.error(f"--seed {args.seed!r}: expected an integer or a comma-separated list of them")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seed {args.seed!r}: expected distinct integers")
    args.seed = args.seeds[0]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        p.error(f"unknown task {unknown[0]!r}; tasks: {', '.join(TASKS)}")
    if args.layers not in ("all", "transformer") and not args.layers.isdigit():
        p.error(f"--layers {args.layers!r}: expected all, transformer or a state index")
    if args.batch_seconds is None:
        args.batch_seconds = 240.0 if args.device.startswith("cuda") else 60.0
    return args


def main(argv=None):
    """Runs every (model, seed, task); returns {(task, model, seed): record}."""
    args = parse_args(argv)
    others = [m for m in args.model if m != "random"]
    records = {}
    random_cfg = None
    for spec in args.model:
        if spec == "random" and random_cfg is None:
            if args.model_config:
                random_cfg = MODEL_CONFIGS[args.model_config]()
            elif others:  # the same architecture as the model it is compared with
                random_cfg = load_model(others[0], None, args.seed)[0].cfg
            else:
                random_cfg = EncoderConfig.hubert_base()
        encoder = None
        for seed in args.seeds:
            if encoder is None or spec == "random":  # a random encoder is drawn anew for each seed
                encoder, tag = load_model(spec, random_cfg, seed)
            for task_name in args.tasks:
                records[task_name, spec, seed] = run(task_name, spec, encoder, tag, argparse.Namespace(
                    **{**vars(args), "seed": seed}))
        del encoder
    if len(args.model) > 1 or len(args.seeds) > 1:  # one row per task, one column per model
        many = len(args.seeds) > 1
        cells = {}
        for (task_name, spec, _), r in records.items():
            for metric, value in r["metrics"].items():
                cells.setdefault((task_name, metric, spec), []).append(value)
        cell = lambda v: f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f}" if many else f"{v[0]:.4f}"
        width = max(max(len(m) for m in args.model), 17 if many else 6) + 2
        print()
        if many:
            print("mean ± sd over seeds " + ",".join(map(str, args.seeds)))
        print("task".ljust(16) + "metric".ljust(12) + "".join(m.rjust(width) for m in args.model))
        for task_name in args.tasks:
            for metric in TASKS[task_name].metrics:
                print(task_name.ljust(16) + metric.ljust(12) + "".join(
                    cell(cells[task_name, metric, m]).rjust(width) for m in args.model))
    return records


if __name__ == "__main__":
    main()
