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
2. Train (heads: probe_heads.py): a softmax-weighted sum of the hidden states into an MLP (512 hidden units, dropout
   0.2), Adam, batches of 64 clips (all windows of each), ReduceLROnPlateau, early stopping on the validation metric;
   the best-validation weights are tested. At evaluation the logits of a clip's windows are averaged (as MARBLE).
3. --sweep trains the benchmark's whole grid (6 lrs x {weighted, each state}) as one set of heads, one batched matmul
   per layer group, and reports the test score of the validation-best cell.
The beat tasks take the frame-level path beside this one (probe_frames.py): 50 Hz frame rows, the same heads applied
per frame, madmom's DBN. One JSON line per (task, model) is appended to --results, and a readable line is printed.
--save-heads keeps the chosen head; `probe.py predict` applies saved heads to new audio. `--task all` runs every task
whose data set is in its folder under --data-root and ends with the paper's Table 1 and a layer-weight plot per
model; `probe.py report` builds that table from results lines (probe_report.py). Metrics: probe_metrics.py.
Protocol facts and where MARBLE's code differs from the papers: ../shared/spec/probe.md (summarised in README).
"""
import argparse
import dataclasses
import glob
import hashlib
import json
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
import probe_report
from data import beats, downstream
from data.audio import AudioError
from model import Encoder, EncoderConfig, load_pretrained
from probe_features import (Extraction, FeatureStore, Rows, StoreError, cache_key, clip_windows, extract,
                            pooled_hidden_states, rows_of, store_path)
from probe_heads import HeadAdam, HeadSchedule, ProbeHeads, grid_results, validation_best
from probe_metrics import ENSEMBLES, key_metrics, monitored, split_metrics

# ------------------------------------------------------------------------------------------------------------------
# defaults (MARBLE v1: benchmark/tasks/*/*_base_config.yaml and the MARBLE paper, Appendix A)
SEED = 1234  # MARBLE's pl.seed_everything
BATCH_SIZE = 64  # clips per training step (MARBLE stacks all windows of each clip in the batch)
SWEEP_LRS = (5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2)
RESULTS = "runs/probe_results.jsonl"
CACHE_DIR = "runs/probe_features"
FEATURES_ON_DEVICE_BYTES = 8 << 30  # a feature store up to this size is copied to the GPU once for training
HEAD_FORMAT = 1
SPLITS = ("train", "valid", "test")


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
    # epochs, early stopping 20, plateau 6, monitor valid_beat_f. Table 1 shows MARBLE's F at 70 ms (the headline,
    # as published) and the field's per-track F (mir_eval.beat.f_measure, 5 s trim)
    **{name: Task(reader, "beat", 1, probe_frames.BEAT_METRICS, epochs=100, patience=20, plateau_patience=6,
                  features=features, extraction=probe_frames.FRAMES, item="track", table=probe_frames.BEAT_TABLE)
       for name, reader, features in (("gtzan_beat", beats.read_gtzan_beat, "gtzan"),
                                      ("beat", beats.read_beat_folder, "beat"))},
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
        return f"random-{cfg.family}-{h}-seed{seed}"  # the family names the row of a report
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
# clip-level training (the heads, their optimiser and schedule: probe_heads.py)

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
    loops), the best validation score, its epoch, and valid/test metrics at the best weights (HeadSchedule: MARBLE's
    plateau, early stopping and checkpoint per head)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    train, valid = data["train"], data["valid"]
    num_states, dim = rows(rows_of(train.starts[:1], train.counts[:1])).shape[1:]
    C, K = len(layer_choices), len(lrs)
    heads = ProbeHeads(layer_choices, K, num_states, dim, task.num_classes, gen).to(device)
    opt = HeadAdam(heads, torch.tensor(lrs, dtype=torch.float32, device=device).expand(C, K))
    sched = HeadSchedule(heads, opt, task.patience, task.plateau_patience, task.metrics[0], log)
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
        if not sched.step(epoch, monitored(task, evaluate(heads, rows, valid).numpy(), valid)):
            break
    sched.restore()
    valid_out, test_out = evaluate(heads, rows, valid), evaluate(heads, rows, data["test"])

    def metrics_of(h):
        v = split_metrics(task, valid_out[h].numpy(), valid)
        return v, split_metrics(task, test_out[h].numpy(), data["test"], valid=v)

    return grid_results(layer_choices, lrs, heads, sched, metrics_of), heads


# ------------------------------------------------------------------------------------------------------------------
# saved heads and prediction on new audio

def save_head(folder, task_name, task, listing, ext, spec, tag, encoder, seed, heads, r, state=None, **extra):
    """<folder>/<task>.pt: the chosen head (r: validation_best) with everything predict needs to apply it to new
    audio. state: the head's tensors if not heads.head_state of r's cell (the beat path's, over all states)."""
    os.makedirs(folder, exist_ok=True)
    blob = dict(format=HEAD_FORMAT, task=task_name, kind=task.kind, item=task.item, labels=list(listing.labels),
                target_mean=listing.target_mean, target_std=listing.target_std, extraction=asdict(ext),
                model=spec, model_tag=tag, encoder_config=asdict(encoder.cfg), seed=seed,
                layers=r["layers"], lr=r["lr"], head=state or heads.head_state(*r["cell"]), valid=r["valid"],
                test=r["test"], **extra)
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
    for split in SPLITS:
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
        source = (beats.SOURCES if task.kind == "beat" else downstream.SOURCES).get(task.features)
        raise downstream.DataSetError(
            f"{missing[0]}: audio file not found ({len(missing)} of {len(clips)} clips missing); is --data-root the "
            f"folder the data set was unpacked into?" + (f" It is published at {source}" if source else ""))
    for split in SPLITS:
        if not any(c.split == split for c in clips):
            raise downstream.DataSetError(f"no {split} clips found under {data_root}")
    if len(listing.labels) != task.num_classes:  # MTG's tag lists come from the split files
        task = dataclasses.replace(task, num_classes=len(listing.labels))
    return task, dataclasses.replace(listing, clips=clips)


def task_data(task_name, data_root, max_clips, log=print):
    try:
        task, listing = load_task(task_name, data_root, max_clips)
    except downstream.DataSetError as e:
        sys.exit(f"{task_name}: {e}")
    for note in getattr(listing, "notes", []):  # what a reader left out, and why (the .beats folders)
        log(f"{task_name}: {note}")
    return task, listing


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


def head_grid(task, args, num_states):
    """(layer choices, lrs) of the heads to train: with --sweep MARBLE's grid, its 6 lrs x {the weighted cell, each
    state} (the weighted cell follows --layers: the paper's 13 states or MARBLE's code's 12 layers), else one head."""
    if args.sweep:
        return [args.layers] + list(range(num_states)), list(SWEEP_LRS)
    choice = args.layers if args.layers in ("all", "transformer") else int(args.layers)
    if isinstance(choice, int) and not 0 <= choice < num_states:
        sys.exit(f"--layers {choice}: the model has hidden states 0..{num_states - 1}")
    return [choice], [args.lr or task.lr]


def extract_or_exit(task_name, extract_fn, ext, clips, encoder, path, key, args, log):
    """Runs probe_features.extract or probe_frames.extract_frames into the store at `path`; returns (the store,
    {clip key: reason} of the clips left out, seconds). A store that is not what it should be ends the run."""
    t0 = time.time()
    try:
        failed = extract_fn(ext, clips, encoder, path, key, args.device, args.batch_seconds, log)
        store = FeatureStore(path, key)
    except StoreError as e:
        sys.exit(f"{task_name}: {e}")
    return store, failed, time.time() - t0


def usable_splits(task_name, clips, failed, log, what="clips"):
    """{split: its clips} less those extraction left out (each named in the log); a split with none left ends it."""
    if failed:
        log(f"{task_name}: {len(failed)} of {len(clips)} {what} could not be used and are left out:")
        for reason in failed.values():
            log(f"  {reason}")
    splits = {s: [c for c in clips if c.split == s and c.key not in failed] for s in SPLITS}
    for split, part in splits.items():
        if not part:
            sys.exit(f"{task_name}: every {split} {what[:-1]} failed (see above)")
    return splits


def result_record(task_name, task, spec, tag, args, results, splits, ext, failed, seconds, **counts):
    """The JSON line of one (task, model, seed) run: the test metrics of the validation-best cell, how it was chosen,
    what went in (counts: windows / frames per split ...), the Table-1 columns, and with --sweep the whole grid."""
    r = validation_best(results)
    record = dict(task=task_name, model=spec, model_tag=tag, metrics=r["test"], valid=r["valid"], layers=r["layers"],
                  lr=r["lr"], best_epoch=r["best_epoch"], layer_weights=r["layer_weights"], sweep=bool(args.sweep),
                  heads=len(results), seed=args.seed, clips={s: len(part) for s, part in splits.items()}, **counts,
                  item=task.item, extraction=asdict(ext), skipped=sorted(failed.values()),
                  seconds={k: round(v, 2) for k, v in seconds.items()}, table=list(task.table or task.metrics))
    if args.sweep:
        record["grid"] = [dict(layers=x["layers"], lr=x["lr"], valid=x["best_valid"], test=x["test"])
                          for x in results]
    return record


def append_record(record, results):
    """One JSON line appended to the results file (its folder made if needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(results)), exist_ok=True)
    with open(results, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_result(record, results, task, args, log):
    """Appends the record to --results and prints the run's line."""
    append_record(record, args.results)
    r, sec = validation_best(results), record["seconds"]
    shown = "  ".join(f"{k} {v:.4f}" for k, v in r["test"].items())
    log(f"{record['task']}  {record['model']}  test {shown}  (valid {task.metrics[0]} {r['best_valid']:.4f}, layers "
        f"{r['layers']}, lr {r['lr']:g}, epoch {r['best_epoch']}; extract {sec['extract']:.1f}s, train "
        f"{sec['train']:.1f}s for {len(results)} head{'s' if len(results) > 1 else ''})")
    return record


def run(task_name, model_spec, encoder, tag, args, log=print):
    task, listing = task_data(task_name, args.data_root, args.max_clips, log)
    if task.kind == "beat":  # frame features, beat decoding: probe_frames.py
        return probe_frames.run(task_name, task, listing, model_spec, encoder, tag, args, log)
    if args.mode != "frozen":  # the wav2vec 2.0 paper's fe / ft1 / ft2: probe_finetune.py
        return probe_finetune.run(task_name, task, listing, task_extraction(task, args), model_spec, encoder, tag,
                                  args, log)
    ext = task_extraction(task, args)
    key = cache_key(tag, ext)
    path = store_path(args.cache_dir, task.features or task_name, key)
    store, failed, extract_s = extract_or_exit(task_name, extract, ext, listing.clips, encoder, path, key, args, log)
    splits = usable_splits(task_name, listing.clips, failed, log)
    data = {split: split_data(store, part, task) for split, part in splits.items()}
    rows = Rows(store, args.device, FEATURES_ON_DEVICE_BYTES)
    choices, lrs = head_grid(task, args, store.row_shape[0])
    t0 = time.time()
    results, heads = train_heads(task, rows, data, choices, lrs, args.epochs or task.epochs, args.seed, args.device,
                                 log, args.batch_size)
    record = result_record(task_name, task, model_spec, tag, args, results, splits, ext, failed,
                           dict(extract=extract_s, train=time.time() - t0),
                           windows={s: int(d.counts.sum()) for s, d in data.items()},
                           items={s: len(d) for s, d in data.items()})
    if args.save_heads:
        record["head_file"] = save_head(args.save_heads, task_name, task, listing, ext, model_spec, tag, encoder,
                                        args.seed, heads, validation_best(results))
    return write_result(record, results, task, args, log)


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
