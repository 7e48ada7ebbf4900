"""Probe a frozen encoder on MIR tasks, following the MARBLE v1 protocol behind the Music2Vec / MusicHuBERT papers.

    python probe.py --task nsynth_pitch --model out/ckpt.pt --data-root ~/data/nsynth
    python probe.py --task gtzan_genre --model facebook-hubert-base-ls960/ --data-root ~/data/gtzan --sweep
    python probe.py --task nsynth_pitch,nsynth_instr --model out/ckpt.pt random --data-root synth/nsynth
    python probe.py --task emo --model out/ckpt.pt --data-root ~/data/emo --save-heads heads/
    python probe.py predict --heads heads/ --model out/ckpt.pt song.mp3 other.wav
    python probe.py --task all --model out/ckpt.pt --data-root ~/data          # every data set found; Table 1
    python probe.py report runs/probe_results.jsonl other/probe_results.jsonl --out runs/compare
    python probe.py --task nsynth_pitch --mode ft2 --model out/ckpt.pt --data-root ~/data/nsynth   # probe_finetune.py

1. Extract (probe_features.py): every clip is z-normalised once, cut into the task's windows, run through the frozen
   encoder, and each of the layers+1 hidden states is mean-pooled per window. The rows go into a memory-mapped
   float16 feature store per (data set, model, extraction settings) that later runs reuse; an interrupted
   extraction resumes where it stopped.
2. Train: a softmax-weighted sum of the hidden states into an MLP (512 hidden units, dropout 0.2), Adam, batches of
   64 clips (all windows of each), ReduceLROnPlateau, early stopping on the validation metric; the best-validation
   weights are tested. At evaluation the logits of a clip's windows are averaged (MARBLE averages logits).
3. --sweep trains the benchmark's whole grid (6 lrs x {weighted, each state}) as one set of heads, one batched matmul
   per layer group, and reports the test score of the validation-best cell.
One JSON line per (task, model) is appended to --results, and a readable line is printed. --save-heads keeps the
chosen head; `probe.py predict` applies saved heads to new audio. `--task all` runs every task whose data set is in
its folder under --data-root and ends with the paper's Table 1 and a layer-weight plot per model; `probe.py report`
builds that table from results lines (probe_report.py). Metrics: probe_metrics.py.
Protocol facts and where MARBLE's code differs from the papers: ../shared/spec/probe.md (summarised in README).
"""
import argparse
import dataclasses
import glob
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

import probe_finetune
import probe_frames
from data import beats, downstream
from data.audio import AudioError
from model import Encoder, EncoderConfig, load_pretrained
from probe_metrics import ENSEMBLES, key_metrics, monitored, split_metrics
from probe_metrics import (accuracy, macro_average_precision, macro_roc_auc, monitor_scores,  # noqa: F401
                           r2_per_dim, task_metrics)  # (probe.<metric> still names them, as before the move)
import probe_report
from probe_features import (Extraction, FeatureStore, Rows, StoreError, cache_key, clip_windows, extract,
                            pooled_hidden_states, rows_of, store_path)

# ------------------------------------------------------------------------------------------------------------------
# defaults (MARBLE v1: benchmark/tasks/*/*_base_config.yaml and the MARBLE paper, Appendix A)
SEED = 1234  # MARBLE's pl.seed_everything
BATCH_SIZE = 64  # clips per training step (MARBLE stacks all windows of each clip in the batch)
HIDDEN = 512
DROPOUT = 0.2
LR_FACTOR = 0.5  # ReduceLROnPlateau factor
SWEEP_LRS = (5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2)
RESULTS = "runs/probe_results.jsonl"
CACHE_DIR = "runs/probe_features"
FEATURES_ON_DEVICE_BYTES = 8 << 30  # a feature store up to this size is copied to the GPU once for training
HEAD_FORMAT = 1


@dataclass
class Task:
    reader: Callable  # data root -> downstream.Listing
    kind: str  # multiclass | multilabel | regression
    num_classes: int
    metrics: tuple  # reported on test; the first is the monitored (validation) metric
    epochs: int
    patience: int  # early stopping, on the monitored validation metric
    plateau_patience: int  # ReduceLROnPlateau
    lr: float = 1e-3
    features: str = ""  # feature-store name: tasks over the same audio (and the same extraction) share one
    extraction: Extraction = Extraction()  # how a clip becomes windows (default: MARBLE's 30 s windows)
    item: str = "clip"  # what one train/eval item is: a clip (its windows' logits averaged), or each "window"
    score: Optional[Callable] = None  # (outputs, split, names, valid) -> metrics, when items are not what is scored
    table: tuple = ()  # the metrics in the Table-1 layout (default: all of `metrics`)
    folder: str = ""  # the data set's folder under `--task all --data-root ROOT` (default: `features`)


# VocalSet: MARBLE's preprocess trims leading silence, cuts 2.993 s chunks at 44.1 kHz (remainder dropped) and writes
# each chunk as its own file, z-normalised: every chunk is a train/valid/test item and accuracy is per chunk.
VOCALSET = Extraction(window=3.0, normalize="window", trim="leading_silence", cut="vocalset",
                      cut_rate=downstream.VOCALSET_RATE)
TASKS = {
    "nsynth_instr": Task(lambda root: downstream.read_nsynth(root, "instrument"), "multiclass", 11, ("acc",),
                         epochs=50, patience=10, plateau_patience=3, features="nsynth"),
    "nsynth_pitch": Task(lambda root: downstream.read_nsynth(root, "pitch"), "multiclass", 128, ("acc",),
                         epochs=50, patience=10, plateau_patience=3, features="nsynth"),
    "gtzan_genre": Task(downstream.read_gtzan, "multiclass", 10, ("acc",),
                        epochs=100, patience=20, plateau_patience=6, lr=5e-3, features="gtzan"),
    # EMO: 5 s windows over the first 30 s, as the paper's text and MARBLE's base config (EMO_base_config.yaml);
    # MARBLE's Music2Vec config uses 30 s windows over the whole 45 s clip: --window 30 --crop 0
    "emo": Task(downstream.read_emo, "regression", 2, ("r2", "arousal_r2", "valence_r2"),
                epochs=100, patience=20, plateau_patience=5, features="emo", extraction=Extraction(window=5.0,
                                                                                                  crop=30.0),
                table=("valence_r2", "arousal_r2")),
    "vocalset_tech": Task(lambda root: downstream.read_vocalset(root, "technique"), "multiclass", 10, ("acc",),
                          epochs=100, patience=10, plateau_patience=5, features="vocalset", extraction=VOCALSET,
                          item="window"),
    "vocalset_singer": Task(lambda root: downstream.read_vocalset(root, "singer"), "multiclass", 20, ("acc",),
                            epochs=100, patience=20, plateau_patience=5, features="vocalset", extraction=VOCALSET,
                            item="window"),
    # GiantSteps: MARBLE cuts each track into 30 s files (a partial last one dropped; whole within 0.1 s, as it
    # measures tracks by ffprobe's container duration, which counts the mp3's encoder delay and padding, ~50 ms),
    # each z-normalised on its own; every window is a training item, and songs are ensembled at evaluation
    "gs_key": Task(downstream.read_giantsteps, "multiclass", 24, ("weighted", "acc", "clip_acc") + tuple(
        f"weighted_{s}" for s in ENSEMBLES), epochs=100, patience=20, plateau_patience=5, features="giantsteps",
        extraction=Extraction(window=30.0, min_last=29.9, normalize="window"), item="window", score=key_metrics,
        table=("weighted",)),
    # MTG-Jamendo: full tracks in 30 s windows, one feature store for the four subsets (MARBLE's Music2Vec config
    # probes genre on layer 7 only; here every task starts from the same --layers)
    **{f"mtg_{name}": Task(lambda root, subset=subset: downstream.read_mtg(root, subset), "multilabel", n,
                           ("roc_auc", "ap"), epochs=100, patience=10, plateau_patience=3, features="mtg")
       for name, subset, n in (("instrument", "instrument", 40), ("moodtheme", "moodtheme", 56),
                               ("genre", "genre", 87), ("top50", "top50tags", 50))},
    "mtt": Task(downstream.read_mtt, "multilabel", 50, ("roc_auc", "ap"),
                epochs=100, patience=10, plateau_patience=3, features="mtt"),
    # beat tracking: the frame-level path (probe_frames.py); MARBLE's GTZANBT_base_config.yaml: lr 1e-3, 100
    # epochs, early stopping 20, plateau 6, monitor valid_beat_f
    "gtzan_beat": Task(beats.read_gtzan_beat, "beat", 1, probe_frames.BEAT_METRICS, epochs=100, patience=20,
                       plateau_patience=6, features="gtzan", extraction=probe_frames.FRAMES, item="track"),
    "beat": Task(beats.read_beat_folder, "beat", 1, probe_frames.BEAT_METRICS, epochs=100, patience=20,
                 plateau_patience=6, features="beat", extraction=probe_frames.FRAMES, item="track"),
}

# a small random encoder for tests and smoke runs (extraction in milliseconds on CPU)
TINY = dict(conv_layers=((64, 10, 5),) + ((64, 3, 2),) * 4 + ((64, 2, 2),) * 2, dim=64, layers=2, heads=2, ffn=128,
            pos_conv_kernel=16, pos_conv_groups=4)
MODEL_CONFIGS = {
    "hubert_base": EncoderConfig.hubert_base, "wav2vec2_base": EncoderConfig.wav2vec2_base,
    "data2vec_base": EncoderConfig.data2vec_base, "tiny": lambda: EncoderConfig.hubert_base(**TINY),
}


# ------------------------------------------------------------------------------------------------------------------
# models

def model_tag(spec, cfg, seed):
    """Name of a model in the cache key: a new checkpoint (other size or mtime) gets a new feature store."""
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


MODEL_EXPECTED = ("one of our checkpoints (a .pt with 'encoder_config' and 'encoder'), a Hugging Face hubert / "
                  "wav2vec2 / data2vec-audio folder (config.json + model.safetensors or pytorch_model.bin), or "
                  "'random'")


def load_model(spec, random_cfg, seed):
    """(encoder in eval mode, cache tag). spec: "random" (random init from random_cfg under `seed`) or anything
    model.load_pretrained accepts. Whatever is wrong with a file or folder ends the run with one line."""
    if spec == "random":
        torch.manual_seed(seed)
        return Encoder(random_cfg).eval(), model_tag(spec, random_cfg, seed)
    if not os.path.exists(spec):
        sys.exit(f"--model {spec}: no such file or folder; expected {MODEL_EXPECTED}")
    for name in ("config.json", "preprocessor_config.json") if os.path.isdir(spec) else ():
        try:
            if os.path.exists(os.path.join(spec, name)):
                with open(os.path.join(spec, name)) as f:
                    json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            sys.exit(f"--model {spec}: {os.path.join(spec, name)} is not valid JSON ({e})")
    try:
        enc = load_pretrained(spec)
    except Exception as e:  # torch.load's unpickling/zip errors, unsupported configs, mismatched weights
        msg = " ".join(str(e).split()) or type(e).__name__
        if not (isinstance(e, (ValueError, FileNotFoundError)) and msg.startswith(spec.rstrip("/"))):
            msg = f"{type(e).__name__}: {msg}; expected {MODEL_EXPECTED}"  # not one of load_pretrained's own lines
        sys.exit(f"--model {spec}: " + (msg if len(msg) < 800 else msg[:800] + " ..."))
    return enc, model_tag(spec, enc.cfg, seed)


# ------------------------------------------------------------------------------------------------------------------
# probe heads: a grid of C layer choices x K learning rates, every head (weighted sum over states -> Linear -> ReLU
# -> Dropout -> Linear) trained together on the same batches. Heads are grouped by layer choice so that each group
# is one batched matmul: the K heads of a single state share their input, one GEMM over [D, K * 512] for all.

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
    """Parameters, with C split into Cw weighted choices and Cs single states, K learning rates each:
        mix_logits [Cw, K, S], mix_w1 [Cw, K, D, 512], mix_b1 [Cw, K, 1, 512], mix_w2 [Cw, K, 512, N],
        mix_b2 [Cw, K, 1, N]; one_w1 [Cs, D, K, 512], one_b1 [Cs, 1, K, 512], one_w2 [Cs, K, 512, N],
        one_b2 [Cs, K, 1, N].
    one_w1 keeps K next to the hidden units, so [D, K * 512] is a plain matrix. Every head starts from the same draw
    (the one a single head gets from the same generator), as every cell of MARBLE's sweep is a run seeded alike."""
    K_AXIS = dict(mix_logits=1, mix_w1=1, mix_b1=1, mix_w2=1, mix_b2=1, one_w1=2, one_b1=2, one_w2=1, one_b2=1)

    def __init__(self, layer_choices, num_lrs, num_states, dim, num_classes, generator):
        super().__init__()
        self.choices, K = list(layer_choices), num_lrs
        mix = [i for i, c in enumerate(self.choices) if c in ("all", "transformer")]
        one = [i for i, c in enumerate(self.choices) if c not in ("all", "transformer")]
        self.mix_idx, self.one_idx = torch.tensor(mix, dtype=torch.long), torch.tensor(one, dtype=torch.long)
        self.register_buffer("allowed", torch.stack([layer_choice_mask(self.choices[i], num_states) for i in mix])
                             if mix else torch.zeros(0, num_states, dtype=torch.bool))
        self.register_buffer("states", torch.tensor([int(self.choices[i]) for i in one], dtype=torch.long))
        self.register_buffer("order", torch.argsort(torch.tensor(mix + one, dtype=torch.long)))  # -> user order

        def uniform(*shape, fan_in):  # nn.Linear's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1 / math.sqrt(fan_in)
            return torch.empty(*shape).uniform_(-bound, bound, generator=generator)

        # MARBLE initialises the layer weights with randn (softmax over them); single-state heads have none
        logits = torch.randn(num_states, generator=generator)
        w1, b1 = uniform(dim, HIDDEN, fan_in=dim), uniform(HIDDEN, fan_in=dim)
        w2, b2 = uniform(HIDDEN, num_classes, fan_in=HIDDEN), uniform(num_classes, fan_in=HIDDEN)
        P = lambda t: torch.nn.Parameter(t.contiguous())
        Cw, Cs = len(mix), len(one)
        self.mix_logits = P(logits.expand(Cw, K, -1))
        self.mix_w1, self.mix_b1 = P(w1.expand(Cw, K, -1, -1)), P(b1.expand(Cw, K, 1, -1))
        self.mix_w2, self.mix_b2 = P(w2.expand(Cw, K, -1, -1)), P(b2.expand(Cw, K, 1, -1))
        self.one_w1, self.one_b1 = P(w1[None, :, None].expand(Cs, -1, K, -1)), P(b1.expand(Cs, 1, K, -1))
        self.one_w2, self.one_b2 = P(w2.expand(Cs, K, -1, -1)), P(b2.expand(Cs, K, 1, -1))

    @property
    def num_heads(self):
        return len(self.choices) * self.mix_w2.shape[1]

    def per_param(self, t):
        """t: one value per head, C x K in user order -> {parameter name: t broadcastable against it}."""
        out = {}
        for name, p in self.named_parameters():
            g = t[self.mix_idx.to(t.device)] if name.startswith("mix_") else t[self.one_idx.to(t.device)]
            shape = [1] * p.dim()
            shape[0], shape[self.K_AXIS[name]] = g.shape[0], g.shape[1]
            out[name] = g.reshape(shape)
        return out

    def mix_weights(self):
        """Cw x K x S: the softmax weights of the weighted heads over their allowed states."""
        return self.mix_logits.masked_fill(~self.allowed[:, None], float("-inf")).softmax(-1)

    def layer_weights(self):
        """C x K x S: the softmax weights of weighted heads, one-hot for single-state heads."""
        mixed = self.mix_weights()
        K, S = self.mix_logits.shape[1:]
        one = F.one_hot(self.states, S).to(mixed.dtype)[:, None].expand(-1, K, -1)
        return torch.cat([mixed, one])[self.order]

    def forward(self, x):  # x: B x S x D -> C x K x B x N (user order)
        B = x.shape[0]
        noise = None
        if self.training:  # one dropout mask per step, shared by all heads (as cells seeded alike would draw)
            noise = torch.empty(B, HIDDEN, device=x.device).bernoulli_(1 - DROPOUT).div_(1 - DROPOUT)
        outs = []
        if len(self.mix_idx):  # each weighted head mixes the states its own way, then its own MLP
            Cw, K = self.mix_logits.shape[:2]
            mixed = torch.einsum("hs,bsd->hbd", self.mix_weights().flatten(0, 1), x)
            h = torch.relu(torch.baddbmm(self.mix_b1.flatten(0, 1), mixed, self.mix_w1.flatten(0, 1)))
            if noise is not None:
                h = h * noise
            outs.append(torch.baddbmm(self.mix_b2.flatten(0, 1), h, self.mix_w2.flatten(0, 1)).view(Cw, K, B, -1))
        if len(self.one_idx):  # the K heads of a state share its input: one GEMM per state, batched over states
            Cs, D, K, Hd = self.one_w1.shape
            xs = x.transpose(0, 1)[self.states]  # Cs x B x D; no gradient flows into the data
            h = torch.relu(torch.baddbmm(self.one_b1.view(Cs, 1, K * Hd), xs, self.one_w1.view(Cs, D, K * Hd)))
            h = h.view(Cs, B, K, Hd)
            if noise is not None:
                h = h * noise[:, None]
            outs.append(torch.einsum("cbkh,ckhn->ckbn", h, self.one_w2) + self.one_b2)
        return torch.cat(outs)[self.order] if len(outs) > 1 else outs[0]

    def _where(self, c):
        c = int(c)
        if c in self.mix_idx.tolist():
            return "mix", self.mix_idx.tolist().index(c)
        return "one", self.one_idx.tolist().index(c)

    def head_state(self, c, k):
        """Head (choice c, lr k) as plain tensors: layer_weights [S], w1 [D, 512], b1, w2 [512, N], b2."""
        group, i = self._where(c)
        lw = self.layer_weights()[c, k]
        if group == "mix":
            t = dict(layer_logits=self.mix_logits[i, k], w1=self.mix_w1[i, k], b1=self.mix_b1[i, k, 0],
                     w2=self.mix_w2[i, k], b2=self.mix_b2[i, k, 0])
        else:
            t = dict(w1=self.one_w1[i, :, k], b1=self.one_b1[i, 0, k], w2=self.one_w2[i, k], b2=self.one_b2[i, k, 0])
        return {"layer_weights": lw.detach().cpu().clone(), **{n: v.detach().cpu().clone() for n, v in t.items()}}

    @torch.no_grad()
    def load_head_state(self, c, k, state):
        group, i = self._where(c)
        if group == "mix":
            self.mix_logits[i, k] = state["layer_logits"]
            self.mix_w1[i, k], self.mix_b1[i, k, 0] = state["w1"], state["b1"]
            self.mix_w2[i, k], self.mix_b2[i, k, 0] = state["w2"], state["b2"]
        else:
            self.one_w1[i, :, k], self.one_b1[i, 0, k] = state["w1"], state["b1"]
            self.one_w2[i, k], self.one_b2[i, k, 0] = state["w2"], state["b2"]


class HeadAdam:
    """torch.optim.Adam (weight decay 0) on the stacked heads, with one learning rate per head (lr: C x K), so that
    every head of the grid keeps its own lr and its own ReduceLROnPlateau schedule. Same arithmetic as torch's
    single-tensor Adam."""

    def __init__(self, heads, lrs, betas=(0.9, 0.999), eps=1e-8):
        self.heads, self.lr, self.betas, self.eps, self.t = heads, lrs.clone(), betas, eps, 0
        self.params = dict(heads.named_parameters())
        self.m = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in self.params.items()}
        # one scratch buffer for the update, reused by every parameter: the sweep's weights are 84 x 768 x 512, and
        # a fresh temporary of that size costs more (new pages) than the arithmetic on it
        scratch = torch.empty(max(p.numel() for p in self.params.values()), device=lrs.device)
        self.scratch = {n: scratch[:p.numel()].view(p.shape) for n, p in self.params.items()}

    @torch.no_grad()
    def step(self):
        self.t += 1
        b1, b2 = self.betas
        bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        # lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) computed as (m / (sqrt(v) + eps * sqrt(bc2))) * lr * sqrt(bc2)/bc1
        steps = self.heads.per_param(self.lr * (math.sqrt(bc2) / bc1))
        for n, p in self.params.items():
            if p.grad is None or p.numel() == 0:
                continue
            m, v, u = self.m[n], self.v[n], self.scratch[n]
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            torch.sqrt(v, out=u).add_(self.eps * math.sqrt(bc2))
            torch.div(m, u, out=u).mul_(steps[n])
            p.sub_(u)


def clip_average(outputs, rows, num_clips):
    """H x R x C window outputs -> H x N x C clip outputs: the mean over each clip's windows (MARBLE's scatter_mean
    of logits, before any softmax or sigmoid)."""
    H, R, C = outputs.shape
    sums = torch.zeros(H, num_clips, C, dtype=outputs.dtype).index_add_(1, rows, outputs)
    counts = torch.bincount(rows, minlength=num_clips).clamp_min(1).to(outputs.dtype)
    return sums / counts[None, :, None]


@dataclass
class SplitData:
    """One split of one task: item i is rows starts[i] .. starts[i] + counts[i] - 1 of the store, label y[i], from
    clip owner[i] of the split (items are windows of clips for item="window" tasks)."""
    starts: np.ndarray
    counts: np.ndarray
    y: torch.Tensor
    owner: Optional[np.ndarray] = None

    def __len__(self):
        return len(self.starts)


def split_data(store, clips, task):
    starts, counts, owner = store.item_rows([c.key for c in clips], task.item)
    labels = [clips[i].label for i in owner]
    y = torch.tensor(labels, dtype=torch.long) if task.kind == "multiclass" else torch.tensor(np.stack(labels))
    return SplitData(starts, counts, y, owner)


@torch.no_grad()
def evaluate(heads, rows, split):
    """Item-level outputs of every head, H x items x C (float32, CPU), reading the split in slices of whole items."""
    heads.eval()
    row = int(np.prod(rows(rows_of(split.starts[:1], split.counts[:1])).shape[1:]))
    cap = max(1, min((2 << 20) // row, (1 << 16) // heads.num_heads))  # rows per pass: inputs <= 8 MB as float32,
    # heads x rows x 512 activations <= 128 MB
    ends = np.cumsum(split.counts)
    out, i = None, 0
    while i < len(split):
        j = max(i + 1, int(np.searchsorted(ends, (ends[i - 1] if i else 0) + cap, side="right")))
        counts = split.counts[i:j]
        o = heads(rows(rows_of(split.starts[i:j], counts))).flatten(0, 1).float().cpu()
        owner = torch.from_numpy(np.repeat(np.arange(j - i), counts))
        if out is None:
            out = torch.empty(o.shape[0], len(split), o.shape[-1])
        out[:, i:j] = clip_average(o, owner, j - i)
        i = j
    return out


def loss_fn(kind, logits, y):
    """logits H x B x C. Per head, the mean loss over the batch's rows (CE / BCE-with-logits / MSE as MARBLE),
    summed over heads so each head's gradient is its own loss's gradient."""
    H = logits.shape[0]
    flat = logits.flatten(0, 1)
    target = y.repeat(H) if kind == "multiclass" else y.repeat(H, 1)
    if kind == "multiclass":
        return F.cross_entropy(flat, target) * H
    if kind == "multilabel":
        return F.binary_cross_entropy_with_logits(flat, target) * H
    return F.mse_loss(flat, target) * H


def train_heads(task, rows, data, layer_choices, lrs, epochs, seed, device, log=print, batch_size=BATCH_SIZE):
    """Trains the grid layer_choices x lrs together. rows: a probe_features.Rows (or any rows -> float32 tensor);
    data: {split: SplitData}. Returns (results, heads): per head in grid order (lr-major, as MARBLE's sweep script
    loops), the best validation score, its epoch, and valid/test metrics at the best weights.

    Per head, as MARBLE's Lightning callbacks: ReduceLROnPlateau (mode max, factor 0.5, threshold 1e-4 relative),
    EarlyStopping (stops after `patience` epochs without a strictly better score), ModelCheckpoint (keeps the
    first best). A stopped head keeps its best weights and gets lr 0."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    train, valid = data["train"], data["valid"]
    num_states, dim = rows(rows_of(train.starts[:1], train.counts[:1])).shape[1:]
    C, K = len(layer_choices), len(lrs)
    heads = ProbeHeads(layer_choices, K, num_states, dim, task.num_classes, gen).to(device)
    opt = HeadAdam(heads, torch.tensor(lrs, dtype=torch.float32, device=device).expand(C, K))
    H = C * K  # bookkeeping below is per head, C x K flattened (choice-major)
    monitor = task.metrics[0]
    best = torch.full((H,), float("-inf"))
    best_epoch = torch.zeros(H, dtype=torch.long)
    params = dict(heads.named_parameters())
    best_state = {k: v.detach().clone() for k, v in params.items()}
    plateau_best = torch.full((H,), float("-inf"))
    plateau_bad = torch.zeros(H, dtype=torch.long)
    since_best = torch.zeros(H, dtype=torch.long)
    active = torch.ones(H, dtype=torch.bool)
    for epoch in range(epochs):
        heads.train()
        order = torch.randperm(len(train), generator=gen).numpy()
        for s in range(0, len(order), batch_size):
            items = order[s:s + batch_size]  # a batch of clips, every window of each (MARBLE's train_collate_fn)
            counts = train.counts[items]
            x = rows(rows_of(train.starts[items], counts))
            y = train.y[torch.from_numpy(np.repeat(items, counts))].to(device)
            loss = loss_fn(task.kind, heads(x).flatten(0, 1), y)
            for p in heads.parameters():
                p.grad = None
            loss.backward()
            opt.step()
        outputs = evaluate(heads, rows, valid)
        scores = torch.as_tensor(monitored(task, outputs.numpy(), valid), dtype=torch.float32).reshape(H)
        scores = torch.nan_to_num(scores, nan=float("-inf"))
        improved = active & (scores > best)
        with torch.no_grad():
            for name, m in heads.per_param(improved.view(C, K).to(device)).items():
                torch.where(m, params[name], best_state[name], out=best_state[name])
        best = torch.where(improved, scores, best)
        best_epoch[improved] = epoch
        since_best = torch.where(improved, 0, since_best + 1)
        # ReduceLROnPlateau(mode="max", threshold_mode="rel"): better means above best * (1 + 1e-4)
        plateau_improved = scores > plateau_best * (1 + 1e-4)
        plateau_best = torch.where(plateau_improved, scores, plateau_best)
        plateau_bad = torch.where(plateau_improved, 0, plateau_bad + 1)
        cut = plateau_bad > task.plateau_patience
        plateau_bad[cut] = 0
        active &= since_best < task.patience
        lr = torch.where(cut.view(C, K).to(device), opt.lr * LR_FACTOR, opt.lr)
        opt.lr = torch.where(active.view(C, K).to(device), lr, torch.zeros_like(lr))
        if H == 1:
            log(f"epoch {epoch + 1:3d}  valid {monitor} {scores[0]:.4f}  best {best[0]:.4f}  lr {opt.lr[0, 0]:.2e}")
        elif epoch % 10 == 0 or not active.any():
            log(f"epoch {epoch + 1:3d}  {int(active.sum())}/{H} heads training  best valid {monitor} "
                f"{best.max():.4f}")
        if not active.any():
            break
    with torch.no_grad():
        for name, p in heads.named_parameters():
            p.copy_(best_state[name])
    valid_out, test_out = evaluate(heads, rows, valid), evaluate(heads, rows, data["test"])
    weights = heads.layer_weights().detach().cpu()
    results = []
    for k in range(K):
        for c in range(C):
            h = c * K + k
            valid_metrics = split_metrics(task, valid_out[h].numpy(), valid)
            results.append(dict(
                layers=layer_choices[c], lr=lrs[k], best_epoch=int(best_epoch[h]) + 1, best_valid=float(best[h]),
                valid=valid_metrics, test=split_metrics(task, test_out[h].numpy(), data["test"], valid=valid_metrics),
                layer_weights=[round(float(w), 4) for w in weights[c, k]], cell=(c, k)))
    return results, heads


def validation_best(results):
    """The reported cell: the best validation score (the first in grid order on ties), with the test score of its
    best-validation weights (MARBLE paper, Appendix A)."""
    return max(results, key=lambda r: r["best_valid"])  # max keeps the first of equal keys


# ------------------------------------------------------------------------------------------------------------------
# saved heads and prediction on new audio

def save_head(folder, task_name, task, listing, ext, spec, tag, encoder, seed, heads, r):
    """<folder>/<task>.pt: the chosen head with everything predict needs to apply it to new audio."""
    os.makedirs(folder, exist_ok=True)
    c, k = r["cell"]
    blob = dict(format=HEAD_FORMAT, task=task_name, kind=task.kind, item=task.item, labels=list(listing.labels),
                target_mean=listing.target_mean, target_std=listing.target_std, extraction=asdict(ext),
                model=spec, model_tag=tag, encoder_config=asdict(encoder.cfg), seed=seed,
                layers=r["layers"], lr=r["lr"], head=heads.head_state(c, k), valid=r["valid"], test=r["test"])
    path = os.path.join(folder, f"{task_name}.pt")
    tmp = path + f".tmp{os.getpid()}"
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


def load_head(path):
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        sys.exit(f"--heads {path}: not a saved probe head ({type(e).__name__}: {' '.join(str(e).split())})")
    if not isinstance(blob, dict) or blob.get("format") != HEAD_FORMAT or "head" not in blob:
        sys.exit(f"--heads {path}: not a saved probe head of format {HEAD_FORMAT} (written by probe.py "
                 "--save-heads)")
    st = blob["head"]
    S, (D, N) = len(st["layer_weights"]), (st["w1"].shape[0], st["w2"].shape[1])
    heads = ProbeHeads([blob["layers"]], 1, S, D, N, torch.Generator().manual_seed(0))
    heads.load_head_state(0, 0, st)
    return blob, heads.eval()


def describe_scores(blob, logits, top):
    """Item-level logits [N] -> [(label, value)], best first: softmax (multiclass), sigmoid (multilabel), or the
    regression outputs on the annotation's own scale."""
    labels = blob["labels"]
    if blob["kind"] == "regression":
        y = logits.numpy().astype(np.float64)
        if blob["target_std"] is not None:
            y = y * np.asarray(blob["target_std"]) + np.asarray(blob["target_mean"])
        return [(labels[i], float(y[i])) for i in range(len(labels))]
    p = (logits.softmax(-1) if blob["kind"] == "multiclass" else logits.sigmoid()).numpy()
    return [(labels[i], float(p[i])) for i in np.argsort(-p, kind="stable")[:top]]


def predict_main(argv):
    p = argparse.ArgumentParser(prog="probe.py predict", description="Apply heads saved with --save-heads to audio "
                                "files: one line per (file, head) with the top labels (or regression outputs).")
    p.add_argument("--heads", required=True, help="a folder of <task>.pt heads, or one such file")
    p.add_argument("--model", required=True, help="the encoder the heads were trained on (or 'random': the saved "
                   "random encoder's config and seed)")
    p.add_argument("audio", nargs="+")
    p.add_argument("--top", type=int, default=5, help="labels shown per line (multiclass / multilabel)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    files = sorted(glob.glob(os.path.join(args.heads, "*.pt"))) if os.path.isdir(args.heads) else [args.heads]
    if not files or not os.path.exists(files[0]):
        sys.exit(f"--heads {args.heads}: no saved heads (<task>.pt) found")
    loaded = [load_head(f) for f in files]
    encoders, out, failures = {}, [], 0
    for path in args.audio:
        windows = {}
        for (blob, heads), file in zip(loaded, files):
            cfg = EncoderConfig.from_dict(blob["encoder_config"])
            mkey = (args.model, blob["seed"] if args.model == "random" else None)
            if mkey not in encoders:
                enc, tag = load_model(args.model, cfg, blob["seed"])
                encoders[mkey] = enc.to(args.device)
                if tag != blob["model_tag"]:
                    print(f"note: {file} was trained on features of {blob['model']} ({blob['model_tag']}); "
                          f"--model {args.model} is {tag}", file=sys.stderr)
            enc = encoders[mkey]
            if (enc.cfg.layers + 1, enc.cfg.dim) != (len(blob["head"]["layer_weights"]), blob["head"]["w1"].shape[0]):
                sys.exit(f"{file}: trained on {len(blob['head']['layer_weights'])} hidden states of "
                         f"{blob['head']['w1'].shape[0]} dims; --model {args.model} gives {enc.cfg.layers + 1} "
                         f"of {enc.cfg.dim}")
            if blob["kind"] == "beat":  # a frame-level head: the file's beat times (probe_frames.py)
                try:
                    times = probe_frames.predict_beats(enc, heads, blob, path, args.device)
                except AudioError as e:
                    print(f"{e}", file=sys.stderr)
                    failures += 1
                    break
                out.append(dict(file=path, task=blob["task"], beats=[round(float(t), 3) for t in times]))
                print(json.dumps(out[-1]) if args.json else
                      f"{path}\t{blob['task']}\t{len(times)} beats: " + " ".join(f"{t:.2f}" for t in times))
                continue
            ext = Extraction(**blob["extraction"])
            try:
                if ext not in windows:
                    windows[ext] = clip_windows(path, ext)
            except AudioError as e:
                print(f"{e}", file=sys.stderr)
                failures += 1
                break
            if not windows[ext]:
                print(f"{path}: too short for {blob['task']}'s windows", file=sys.stderr)
                continue
            x = pooled_hidden_states(enc, windows[ext], args.device).to(args.device)
            with torch.no_grad():
                logits = heads.to(args.device)(x)[0, 0].mean(0).float().cpu()  # logits averaged over the windows
            scores = describe_scores(blob, logits, args.top)
            out.append(dict(file=path, task=blob["task"], scores=dict(scores), windows=len(windows[ext])))
            if args.json:
                print(json.dumps(out[-1]))
            else:
                print(f"{path}\t{blob['task']}\t" + "  ".join(f"{name} {v:.3f}" for name, v in scores))
    if failures:
        sys.exit(f"{failures} of {len(args.audio)} files could not be read (see above)")
    return out


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


def load_task(task_name, data_root, max_clips):
    """(task, listing) with every audio file present, or DataSetError saying what is missing where."""
    task = TASKS[task_name]
    listing = task.reader(data_root)
    clips = select_clips(listing.clips, max_clips)
    missing = [c.path for c in clips if not os.path.isfile(c.path)]
    if missing:
        source = downstream.SOURCES.get(task.features)
        raise downstream.DataSetError(
            f"{missing[0]}: audio file not found ({len(missing)} of {len(clips)} clips missing); is --data-root the "
            f"folder the data set was unpacked into?" + (f" It is published at {source}" if source else ""))
    for split in ("train", "valid", "test"):
        if not any(c.split == split for c in clips):
            raise downstream.DataSetError(f"no {split} clips found under {data_root}")
    if len(listing.labels) != task.num_classes:  # MTG's tag lists come from the split files
        task = dataclasses.replace(task, num_classes=len(listing.labels))
    return task, dataclasses.replace(listing, clips=clips)


def task_data(task_name, data_root, max_clips):
    try:
        return load_task(task_name, data_root, max_clips)
    except downstream.DataSetError as e:
        sys.exit(f"{task_name}: {e}")


def task_root(task_name, root):
    """Where --task all looks for a task's data set: ROOT/<folder> (README, "Data set folders")."""
    task = TASKS[task_name]
    return os.path.join(root, task.folder or task.features or task_name)


def available_tasks(tasks, root, max_clips, log=print):
    """--task all: the tasks whose data set is under ROOT in its conventional folder; one line for each skipped."""
    found = []
    for task_name in tasks:
        folder = task_root(task_name, root)
        if not os.path.isdir(folder):
            log(f"skip {task_name}: {folder}: no such folder")
            continue
        try:
            load_task(task_name, folder, max_clips)
        except downstream.DataSetError as e:
            log(f"skip {task_name}: {e}")
            continue
        found.append(task_name)
    return found


def task_extraction(task, args):
    """The task's extraction with --window / --crop applied (either changes the cache key)."""
    ext = task.extraction
    if args.window is not None:  # a task that keeps only whole windows (GiantSteps) still does with another length
        slack = ext.window - ext.min_last
        whole = slack < 0.5
        ext = dataclasses.replace(ext, window=args.window, min_last=args.window - slack if whole else ext.min_last)
    if args.crop is not None:
        ext = dataclasses.replace(ext, crop=args.crop or None)
    return ext


def run(task_name, model_spec, encoder, tag, args, log=print):
    if TASKS[task_name].kind == "beat":  # frame features, beat decoding: probe_frames.py
        return probe_frames.run(task_name, TASKS[task_name], model_spec, encoder, tag, args, log)
    task, listing = task_data(task_name, args.data_root, args.max_clips)
    if args.mode != "frozen":  # the wav2vec 2.0 paper's fe / ft1 / ft2: probe_finetune.py
        return probe_finetune.run(task_name, task, listing, task_extraction(task, args), model_spec, encoder, tag,
                                  args, log)
    clips = listing.clips
    ext = task_extraction(task, args)
    key = cache_key(tag, ext)
    path = store_path(args.cache_dir, task.features or task_name, key)
    t0 = time.time()
    try:
        failed = extract(ext, clips, encoder, path, key, args.device, args.batch_seconds)
        store = FeatureStore(path, key)
    except StoreError as e:
        sys.exit(f"{task_name}: {e}")
    extract_s = time.time() - t0
    if failed:
        log(f"{task_name}: {len(failed)} of {len(clips)} clips could not be used and are left out:")
        for reason in failed.values():
            log(f"  {reason}")
    data, n_clips = {}, {}
    for split in ("train", "valid", "test"):
        part = [c for c in clips if c.split == split and c.key not in failed]
        if not part:
            sys.exit(f"{task_name}: every {split} clip failed (see above)")
        data[split], n_clips[split] = split_data(store, part, task), len(part)
    rows = Rows(store, args.device, FEATURES_ON_DEVICE_BYTES)
    num_states = store.row_shape[0]
    weighted = args.layers if args.layers in ("all", "transformer") else None
    if args.sweep:  # the weighted cell follows --layers: the paper's 13 states, or MARBLE's code's 12 layers
        choices, lrs = [weighted or "all"] + list(range(num_states)), list(SWEEP_LRS)
    else:
        choice = weighted or int(args.layers)
        if isinstance(choice, int) and not 0 <= choice < num_states:
            sys.exit(f"--layers {choice}: the model has hidden states 0..{num_states - 1}")
        choices, lrs = [choice], [args.lr or task.lr]
    epochs = args.epochs or task.epochs
    t0 = time.time()
    results, heads = train_heads(task, rows, data, choices, lrs, epochs, args.seed, args.device, log,
                                 args.batch_size)
    train_s = time.time() - t0
    r = validation_best(results)
    record = dict(task=task_name, model=model_spec, model_tag=tag, metrics=r["test"], valid=r["valid"],
                  layers=r["layers"], lr=r["lr"], best_epoch=r["best_epoch"], layer_weights=r["layer_weights"],
                  sweep=bool(args.sweep), heads=len(results), seed=args.seed, clips=n_clips,
                  windows={s: int(d.counts.sum()) for s, d in data.items()},
                  items={s: len(d) for s, d in data.items()}, item=task.item, extraction=asdict(ext),
                  skipped=sorted(failed.values()), seconds=dict(extract=round(extract_s, 2), train=round(train_s, 2)),
                  table=list(task.table or task.metrics))
    if args.sweep:
        record["grid"] = [dict(layers=x["layers"], lr=x["lr"], valid=x["best_valid"], test=x["test"])
                          for x in results]
    if args.save_heads:
        record["head_file"] = save_head(args.save_heads, task_name, task, listing, ext, model_spec, tag, encoder,
                                        args.seed, heads, r)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "a") as f:
        f.write(json.dumps(record) + "\n")
    shown = "  ".join(f"{k} {v:.4f}" for k, v in r["test"].items())
    log(f"{task_name}  {model_spec}  test {shown}  (valid {task.metrics[0]} {r['best_valid']:.4f}, layers "
        f"{r['layers']}, lr {r['lr']:g}, epoch {r['best_epoch']}; extract {extract_s:.1f}s, train {train_s:.1f}s "
        f"for {len(results)} head{'s' if len(results) > 1 else ''})")
    return record


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="python probe.py predict --help: apply saved heads to audio files; "
                                       "python probe.py report --help: tabulate results lines")
    p.add_argument("--task", required=True, help=f"comma-separated, from: {', '.join(TASKS)}; or 'all': every "
                   "task whose data set is found under --data-root in its conventional folder (README)")
    p.add_argument("--model", required=True, nargs="+",
                   help="our checkpoint (.pt), a Hugging Face model folder, or 'random'; several are run in turn "
                        "and printed side by side")
    p.add_argument("--data-root", required=True, help="the folder the task's data set was unpacked into; with "
                   "--task all, the folder holding the data set folders (nsynth/, gtzan/, ...)")
    p.add_argument("--model-config", default=None, choices=sorted(MODEL_CONFIGS),
                   help="architecture of --model random (default: that of the first other --model, else "
                        "hubert_base)")
    p.add_argument("--layers", default="all",
                   help="'all' (layers+1 states, the paper), 'transformer' (the layers, MARBLE's code) or one index; "
                        "with --sweep, which weighted cell the grid has")
    p.add_argument("--lr", type=float, default=None, help="default: the task's (1e-3; GTZAN 5e-3)")
    p.add_argument("--sweep", action="store_true",
                   help=f"the benchmark grid: lr in {SWEEP_LRS} x layers in {{--layers, 0..layers}}, all at once")
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default: the task's)")
    p.add_argument("--window", type=float, default=None, help="window seconds (default: the task's; EMO 5)")
    p.add_argument("--crop", type=float, default=None,
                   help="use only the first CROP seconds of each clip, 0 for all (default: the task's; EMO 30)")
    p.add_argument("--max-clips", type=int, default=None, help="at most this many clips per split (quick runs)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help="clips per training step, with all their windows (MARBLE: 64)")
    p.add_argument("--seed", default=str(SEED),
                   help="seed of the head's init and batches and of --model random's init; a comma-separated list "
                        "runs each seed (a new random encoder each) and prints mean ± sd over them")
    p.add_argument("--save-heads", default=None, metavar="DIR",
                   help="write the chosen head of each task (with --sweep the grid's best) to DIR/<task>.pt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-seconds", type=float, default=None,
                   help="audio seconds per extraction batch (default 240 on GPU, 60 on CPU); with --mode fe/ft1/ft2 "
                        "the padded audio per forward/backward piece of a batch (default 128 on GPU, 32 on CPU)")
    p.add_argument("--cache-dir", default=CACHE_DIR)
    p.add_argument("--results", default=RESULTS, help="JSON lines appended per run; with --task all, the "
                   "Table-1 files go to <its folder>/<model tag>/ (default runs/)")
    probe_finetune.add_arguments(p)  # --mode, --encoder-lr, --save-model
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    args.all = args.tasks == ["all"]
    if args.all:
        args.tasks = list(TASKS)
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
    if args.sweep and args.layers not in ("all", "transformer"):
        p.error("--sweep trains every single state itself; --layers picks its weighted cell: all or transformer")
    if args.save_heads and (len(args.model) > 1 or len(args.seeds) > 1):
        p.error("--save-heads keeps one model's heads: give one --model and one --seed")
    if (args.window is not None and not args.window > 0) or (args.crop is not None and args.crop < 0):
        p.error("--window must be positive seconds, --crop 0 (none) or positive seconds")
    probe_finetune.check_args(p, args, TASKS)  # before the frozen probe's default --batch-seconds
    if args.batch_seconds is None:
        args.batch_seconds = 240.0 if args.device.startswith("cuda") else 60.0
    return args


def main(argv=None):
    """Runs every (model, seed, task); returns {(task, model, seed): record}. `predict ...` applies saved heads,
    `report ...` tabulates results lines (probe_report.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["predict"]:
        return predict_main(argv[1:])
    if argv[:1] == ["report"]:
        return probe_report.report_main(argv[1:])
    args = parse_args(argv)
    roots = {t: args.data_root for t in args.tasks}
    if args.all:  # each data set in its own folder under ROOT; the missing ones are skipped with one line each
        args.tasks = available_tasks(args.tasks, args.data_root, args.max_clips)
        if not args.tasks:
            sys.exit(f"--task all: no data set found under {args.data_root} (folders: see README, 'Data set "
                     "folders')")
        roots = {t: task_root(t, args.data_root) for t in args.tasks}
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
                    **{**vars(args), "seed": seed, "data_root": roots[task_name]}))
        del encoder
    if args.all:  # the paper's Table 1: printed, and per model in <results folder>/<model tag>/ with the plot
        print("\n" + probe_report.table1(list(records.values())))
        probe_report.write_model_files(os.path.dirname(os.path.abspath(args.results)), list(records.values()))
    elif len(args.model) > 1 or len(args.seeds) > 1:  # one row per task, one column per model
        print(probe_report.side_by_side(records, args.tasks, args.model, args.seeds,
                                        {t: TASKS[t].metrics for t in args.tasks}))
    return records


if __name__ == "__main__":
    main()
