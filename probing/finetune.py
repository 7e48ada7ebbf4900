"""probe.py --mode fe|ft1|ft2: the evaluation of the wav2vec 2.0-on-music paper (Ragano, Benetos & Hines 2022),
for any encoder probe.py loads, on the clip-level tasks of probe.py's part 1.

    python probe.py --task nsynth_pitch,nsynth_instr --mode ft2 --model out/ckpt.pt --data-root ~/data/nsynth
    python probe.py --task nsynth_pitch --mode fe --model out/ckpt.pt random --data-root synth/nsynth
    python probe.py --task gtzan_genre --mode ft1 --model out/ckpt.pt --data-root ~/data/gtzan --save-model ft/

The head is the paper's: the time-mean of the last transformer layer (over a window's valid frames) into one linear
layer. What trains:
    fe   the linear layer only, Adam lr 1e-3; the encoder is a frozen feature extractor (eval mode, no gradient)
    ft2  the transformer side (feature LayerNorm and projection, positional conv, layers) and the head; the conv front
         end is frozen (fairseq's fine-tuning default, feature_grad_mult 0)
    ft1  everything; the conv front end at the full gradient (feature_grad_mult 1, not pre-training's 0.1)
Fine-tuning is Adam (torch defaults, no weight decay, constant lr) with lr 1e-5 for the pre-trained weights and 1e-4
for the head. Every mode stops once the validation loss has not fallen for 10 epochs (or at --epochs, by default the
task's cap: 50 for NSynth, 100 otherwise) and tests the weights of the lowest validation loss.

What is the same as the frozen probe, read from the same code: the task definitions and readers (probing.tasks.TASKS, passed
in by probe.py), the windows of a clip (probing.features.clip_windows: each clip z-normalised ONCE, then cut, and the
encoder called with normalize=False, so a data2vec encoder does not renormalise each window), a training batch of
--batch-size items with all their windows (each window a row with its clip's label; probing.clips.loss_fn averaged over
rows), logits averaged over a clip's windows at evaluation (probing.clips.clip_average), the metrics (probing.metrics), the
splits less the unusable clips (probing.runs.usable_splits) and the results line (probing.runs.result_record, with the fine-tuning
fields added; probing.runs.append_record). What differs: no feature store; the
encoder runs on audio every step (decoded audio is kept in memory up to AUDIO_CACHE_BYTES, then re-read), a batch
goes through the encoder in pieces of at most --batch-seconds of (padded) audio whose gradients add up to the whole
batch's (accumulation), bf16 autocast on CUDA, and the validation loss (of clip-level logits) decides the epoch.

Regularisation while fine-tuning (ft1, ft2): fairseq's wav2vec 2.0 fine-tuning recipe (Wav2Vec2AsrConfig defaults
and examples/wav2vec/config/finetuning/base_100h.yaml / base_960h.yaml): dropout 0 (residual and after the
positional conv), attention dropout 0, dropout on the projected features 0, activation dropout 0.1 (inside the FFN),
LayerDrop 0.1. Pre-training's own values (0.1 / 0.1 / 0.1 / 0 / 0.05) are not used. fairseq's fine-tuning also masks
time spans and channels (SpecAugment-like, mask_prob 0.5-0.65); the paper describes no masking and none is done, so
the mask embedding is unused and stays as it is. In fe the encoder has no dropout at all (it is a frozen feature
extractor, as in the frozen probe). Edit REGULARISATION below to change this; the results line records it.

Refused, with one line each: frame-level tasks (beat tracking: no time-mean head), gs_key (scored per song by
ensembles of window outputs chosen on validation, not per item) and the MTG-Jamendo tasks (whole tracks, 3,764 h:
every epoch would run the encoder forward and backward over all of it); the frozen probe covers them.
"""
import dataclasses
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from data.audio import AudioError
from model import Encoder
from probing import runs
from probing.clips import clip_average, loss_fn
from probing.features import AUDIO_WORKERS, _read_windows, describe_windows, prefetch
from probing.metrics import split_metrics
from training import NonFiniteGuard, NonFiniteLossError, autocast_context

# ------------------------------------------------------------------------------------------------------------------
# the paper's recipe
MODES = ("fe", "ft1", "ft2")
FE_LR = 1e-3  # fe: the linear layer alone
HEAD_LR = 1e-4  # ft1 / ft2: the linear layer
ENCODER_LR = 1e-5  # ft1 / ft2: the pre-trained weights
PATIENCE = 10  # epochs without a lower validation loss before stopping (all modes)
REGULARISATION = dict(dropout=0.0, attention_dropout=0.0, dropout_input=0.0, activation_dropout=0.1, layerdrop=0.1)
MICRO_SECONDS = {"cuda": 128.0, "cpu": 32.0}  # default --batch-seconds: padded audio per forward/backward piece
AUDIO_CACHE_BYTES = 2 << 30  # decoded windows (float32) kept in memory across epochs, first come; the rest re-read
FE_POOLED_ONCE = True  # fe: each window's pooled features computed once, not every epoch (the same numbers)
MAX_NONFINITE_IN_ROW = 10

REFUSED = {  # task -> why fine-tuning does not run it (one line)
    "gs_key": "scored per song by ensembles of its 30 s windows chosen on validation, not per item; use the frozen "
              "probe",
    "mtg": "whole tracks (3,764 h over the four subsets): every epoch would run the encoder forward and backward "
           "over all of it; use the frozen probe",
    "beat": "frame-level beat tracking has no time-mean head; use the frozen probe",
}


def refusal(task_name, task):
    """Why --mode fe|ft1|ft2 does not run this task (one line), or None."""
    if task.kind == "beat":
        return REFUSED["beat"]
    if task.score is not None or task_name == "gs_key":
        return REFUSED["gs_key"]
    if task.features == "mtg":
        return REFUSED["mtg"]
    return None


def add_arguments(p):
    """probe.py's command-line flags for the fine-tuning modes."""
    p.add_argument("--mode", default="frozen", choices=("frozen",) + MODES,
                   help="frozen: the MARBLE probe on frozen features (default); the wav2vec 2.0 paper's head (time "
                        "mean of the last layer -> linear) with fe: only the head trains, ft2: the head and the "
                        "transformer side train, the conv front end stays frozen, ft1: everything trains, the conv "
                        "front end included (probing/finetune.py)")
    p.add_argument("--encoder-lr", type=float, default=None,
                   help=f"ft1/ft2: Adam lr of the pre-trained weights (default {ENCODER_LR:g}); --lr sets the head's "
                        f"(default fe {FE_LR:g}, ft1/ft2 {HEAD_LR:g})")
    p.add_argument("--save-model", default=None, metavar="DIR",
                   help="fe/ft1/ft2: write the best fine-tuned encoder with its head to DIR/<task>-<mode>.pt "
                        "(model.load_pretrained loads it)")


def check_args(p, args, tasks, log=print):
    """Validates the fine-tuning flags after probe.py's own; with --task all, leaves out (one line each) the tasks
    fine-tuning does not run."""
    if args.mode == "frozen":
        for flag in ("encoder_lr", "save_model"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag.replace('_', '-')} is for --mode fe, ft1 or ft2")
        return
    if args.sweep or args.save_heads or args.layers != "all":
        p.error(f"--mode {args.mode}: the paper's head reads the last layer with one lr; --sweep, --layers and "
                "--save-heads are the frozen probe's (use --save-model)")
    if args.save_model and (len(args.model) > 1 or len(args.seeds) > 1):
        p.error("--save-model keeps one fine-tuned model per task: give one --model and one --seed")
    if args.mode == "fe" and args.encoder_lr is not None:
        p.error("--encoder-lr: in --mode fe the encoder does not train")
    for name in list(args.tasks):
        why = refusal(name, tasks[name])
        if why is None:
            continue
        if not args.all:
            p.error(f"--mode {args.mode} --task {name}: not fine-tuned: {why}")
        log(f"skip {name}: --mode {args.mode}: {why}")
        args.tasks.remove(name)
    if args.batch_seconds is None:
        args.batch_seconds = MICRO_SECONDS["cuda" if args.device.startswith("cuda") else "cpu"]


# ------------------------------------------------------------------------------------------------------------------
# the model: encoder + the paper's head

class FineTuneModel(nn.Module):
    """encoder -> time mean of the last layer's output over each window's valid frames -> Linear(dim, outputs)."""

    def __init__(self, encoder, num_outputs):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.cfg.dim, num_outputs)
        self.pooled_input = False  # fe trains on pooled features computed once (FeatureReader): forward = head

    def pooled(self, wav, lengths=None):
        """B x N waveforms (normalised already: the probe's once-per-clip rule) -> B x dim."""
        out = self.encoder(wav, lengths=lengths, normalize=False)
        h = out.last_hidden_state
        if out.padding_mask is None:
            return h.mean(1)
        valid = (~out.padding_mask).to(h.dtype)[..., None]
        return (h * valid).sum(1) / valid.sum(1)

    def forward(self, wav, lengths=None):
        return self.head(wav if self.pooled_input else self.pooled(wav, lengths))


def prepare(encoder, num_outputs, mode, seed):
    """A FineTuneModel around a COPY of `encoder` (the caller's, e.g. reused for the next task, stays untouched),
    configured for `mode`: REGULARISATION in ft1/ft2, the conv front end frozen in ft2 (feature_grad_mult 0: it runs
    without autograd), trained at the full gradient in ft1; every encoder weight frozen in fe. The mask embedding
    (pre-training's masked frames) is never used here and never trained. The head is nn.Linear's default init,
    drawn under `seed`."""
    cfg = encoder.cfg
    if mode == "fe":
        ft_cfg = cfg
    else:
        ft_cfg = dataclasses.replace(cfg, **REGULARISATION, feature_grad_mult=0.0 if mode == "ft2" else 1.0)
    copy = Encoder(ft_cfg)
    copy.load_state_dict(encoder.state_dict())
    copy.transformer.layerdrop_rng.manual_seed(seed)
    torch.manual_seed(seed)
    model = FineTuneModel(copy, num_outputs)
    for name, p in copy.named_parameters():
        p.requires_grad_(mode == "ft1" or (mode == "ft2" and not name.startswith("feature_extractor.")))
    copy.mask_emb.requires_grad_(False)
    return model


def param_groups(model, mode, head_lr, encoder_lr):
    encoder = [p for p in model.encoder.parameters() if p.requires_grad]
    groups = [dict(params=list(model.head.parameters()), lr=head_lr)]
    if encoder:
        groups.append(dict(params=encoder, lr=encoder_lr))
    return groups


# ------------------------------------------------------------------------------------------------------------------
# data: items (a clip with all its windows, or one window for item="window" tasks) read from audio every epoch

@dataclass
class Items:
    """One split: item i is window `window[i]` of clips[i] (-1: all of its windows), label y[i]."""
    clips: list
    window: np.ndarray
    y: torch.Tensor

    def __len__(self):
        return len(self.clips)


class AudioReader:
    """Windows of a clip (probing.features.clip_windows, the probe's normalisation and cut), decoded once at the start
    (which also finds the unusable clips) and kept in memory up to AUDIO_CACHE_BYTES; clips beyond that are decoded
    again when a batch needs them."""

    def __init__(self, ext, cache_bytes=AUDIO_CACHE_BYTES):
        self.ext, self.cache_bytes, self.cached_bytes = ext, cache_bytes, 0
        self.cache, self.count = {}, {}

    def scan(self, clips):
        """{clip key: reason} for the clips that cannot be used; counts the windows of the others."""
        failed = {}
        todo = [c for c in dict((c.key, c) for c in clips).values() if c.key not in self.count]
        for clip, (windows, error) in prefetch(lambda c: _read_windows(c.path, self.ext), todo, AUDIO_WORKERS):
            if error is None and not windows:
                error = f"{clip.path}: too short for one window ({describe_windows(self.ext)})"
            if error is not None:
                failed[clip.key] = error
                continue
            self.count[clip.key] = len(windows)
            size = sum(w.nbytes for w in windows)
            if self.cached_bytes + size <= self.cache_bytes:
                self.cache[clip.key] = [np.array(w) for w in windows]  # own copies, not views of the whole clip
                self.cached_bytes += size
        return failed

    def windows(self, clip):
        if clip.key in self.cache:
            return self.cache[clip.key]
        windows, error = _read_windows(clip.path, self.ext)
        if error is not None or len(windows) != self.count[clip.key]:
            raise AudioError(error or f"{clip.path}: now gives {len(windows)} windows, {self.count[clip.key]} when "
                             "the run started (was the file replaced?)")
        return windows


class FeatureReader:
    """fe: the encoder is frozen and in eval mode, so a window's pooled last layer is the same every epoch; it is
    computed once per window (held in memory: 4 bytes x dim per window, 0.9 GB for all of NSynth at 768 dims) and
    the head trains on these, exactly as if the encoder ran every step (FE_POOLED_ONCE = False does that)."""

    def __init__(self, reader, model, clips, budget, device, autocast, batch_size):
        self.count, self.cache, self.cached_bytes = reader.count, {}, 0
        clips = list(dict((c.key, c) for c in clips).values())
        items = Items(clips, np.full(len(clips), -1), torch.zeros(len(clips)))  # every window of each clip
        model.eval()
        with torch.no_grad():
            for idx, windows, owner in batches(reader, items, np.arange(len(items)), batch_size):
                pooled = torch.cat([pooled_windows(model, windows[a:b], device, autocast).cpu()
                                    for a, b in pieces([len(w) for w in windows], budget)]).numpy()
                for j, i in enumerate(idx):
                    self.cache[items.clips[i].key] = list(pooled[(owner == j).numpy()])

    def windows(self, clip):
        return self.cache[clip.key]


def make_items(clips, reader, item, kind):
    if item == "window":
        pairs = [(c, w) for c in clips for w in range(reader.count[c.key])]
    else:
        pairs = [(c, -1) for c in clips]
    labels = [c.label for c, _ in pairs]
    y = torch.tensor(labels, dtype=torch.long) if kind == "multiclass" else torch.tensor(np.stack(labels))
    return Items([c for c, _ in pairs], np.array([w for _, w in pairs], dtype=np.int64), y)


def item_windows(reader, items, i):
    ws = reader.windows(items.clips[i])
    return ws if items.window[i] < 0 else [ws[items.window[i]]]


def batches(reader, items, order, batch_size):
    """(item indices, windows, owner: position in the batch of each window's item), batch after batch, decoded on
    AUDIO_WORKERS threads ahead of the encoder."""
    idx, windows, owner = [], [], []
    for i, ws in prefetch(lambda i: item_windows(reader, items, i), order, AUDIO_WORKERS):
        owner += [len(idx)] * len(ws)
        idx.append(i)
        windows += ws
        if len(idx) == batch_size:
            yield np.array(idx), windows, torch.tensor(owner)
            idx, windows, owner = [], [], []
    if idx:
        yield np.array(idx), windows, torch.tensor(owner)


def pieces(lengths, budget):
    """Consecutive [start, end) runs of windows whose padded size (count x longest) stays within `budget` samples;
    a window longer than the budget is a piece alone."""
    out, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        if i > start and max(longest, n) * (i - start + 1) > budget:
            out.append((start, i))
            start, longest = i, 0
        longest = max(longest, n)
    out.append((start, len(lengths)))
    return out


def padded(windows, device):
    """A list of 1-D windows -> (B x longest zero-padded batch, lengths or None when all are equal) on `device`."""
    lengths = torch.tensor([len(w) for w in windows])
    wav = torch.zeros(len(windows), int(lengths.max()))
    for i, w in enumerate(windows):
        wav[i, :len(w)] = torch.from_numpy(w)
    equal = bool((lengths == lengths[0]).all())
    return wav.to(device), None if equal else lengths.to(device)


def window_logits(model, windows, device, autocast):
    """Logits (float32, N x outputs) of a list of 1-D windows, padded into one batch (valid frames only pooled);
    with model.pooled_input, the windows are pooled features (FeatureReader) and only the head runs."""
    with autocast:
        logits = model(*padded(windows, device))
    return logits.float()


def pooled_windows(model, windows, device, autocast):
    with autocast:
        return model.pooled(*padded(windows, device)).float()


def row_loss(kind, logits, y):
    """The frozen probe's loss (probing.clips.loss_fn: MARBLE's cross entropy, BCE with logits, MSE), the mean over the rows
    of N x outputs logits."""
    return loss_fn(kind, logits[None], y if kind == "multiclass" else y.to(logits.dtype))


def accumulate(model, kind, windows, y_rows, budget, device, autocast):
    """Forward and backward over one batch in pieces of at most `budget` padded samples; each piece's summed row
    loss is divided by the batch's row count, so the gradients add up to those of the whole batch's mean loss.
    Returns that mean loss (a float)."""
    total, rows = 0.0, len(windows)
    for a, b in pieces([len(w) for w in windows], budget):
        logits = window_logits(model, windows[a:b], device, autocast)
        loss = row_loss(kind, logits, y_rows[a:b].to(device)) * ((b - a) / rows)
        loss.backward()
        total += float(loss.detach())
    return total


@torch.no_grad()
def evaluate(model, reader, items, kind, budget, device, autocast, batch_size):
    """Item-level logits (float32, CPU, items x outputs: each the mean of its windows' logits, MARBLE's rule) and
    their mean loss against the items' labels."""
    model.eval()
    out = torch.empty(len(items), model.head.out_features)
    for idx, windows, owner in batches(reader, items, np.arange(len(items)), batch_size):
        logits = torch.cat([window_logits(model, windows[a:b], device, autocast).cpu()
                            for a, b in pieces([len(w) for w in windows], budget)])
        out[torch.from_numpy(idx)] = clip_average(logits[None], owner, len(idx))[0]
    return out, float(row_loss(kind, out, items.y))


class LossPlateau:
    """Early stopping on the validation loss: an epoch improves when its loss is strictly below the best so far
    (a NaN never does); stop once `patience` epochs in a row have not (as Lightning's EarlyStopping, mode min)."""

    def __init__(self, patience):
        self.patience, self.best, self.best_epoch, self.since = patience, float("inf"), 0, 0

    def update(self, loss, epoch):
        """Returns whether `loss` (of 1-based `epoch`) is the new best."""
        if loss < self.best:
            self.best, self.best_epoch, self.since = loss, epoch, 0
            return True
        self.since += 1
        return False

    @property
    def stop(self):
        return self.since >= self.patience


def train(model, mode, task, reader, data, *, epochs, batch_size, budget, head_lr, encoder_lr, seed, device,
          log=print):
    """Trains until the validation loss has not fallen for PATIENCE epochs (or `epochs`), then loads the weights of
    the best epoch. Returns {best_epoch, epochs, valid_loss, stopped, history}."""
    model.to(device)
    autocast = autocast_context(device, "bfloat16")
    if mode == "fe" and FE_POOLED_ONCE:
        t0 = time.time()
        reader = FeatureReader(reader, model, [c for d in data.values() for c in d.clips], budget, device, autocast,
                               batch_size)
        log(f"fe: pooled the last layer of every window once ({time.time() - t0:.1f}s)")
        model.pooled_input = True
    try:
        return _train(model, mode, task, reader, data, epochs, batch_size, budget, head_lr, encoder_lr, seed,
                      device, autocast, log)
    finally:
        model.pooled_input = False


def _train(model, mode, task, reader, data, epochs, batch_size, budget, head_lr, encoder_lr, seed, device, autocast,
           log):
    opt = torch.optim.Adam(param_groups(model, mode, head_lr, encoder_lr))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    best = {n: p.detach().clone() for n, p in trainable}
    plateau, guard = LossPlateau(PATIENCE), NonFiniteGuard(MAX_NONFINITE_IN_ROW)
    gen = torch.Generator().manual_seed(seed)
    train_items, history, stopped = data["train"], [], "max_epochs"
    monitor = task.metrics[0]
    for epoch in range(1, epochs + 1):
        t0 = time.time()
        model.train()
        if mode == "fe":
            model.encoder.eval()  # a frozen feature extractor: no dropout, as the frozen probe
        order = torch.randperm(len(train_items), generator=gen).numpy()
        losses, weights = [], []
        for step, (idx, windows, owner) in enumerate(batches(reader, train_items, order, batch_size)):
            y_rows = train_items.y[torch.from_numpy(idx)][owner]
            for p in model.parameters():
                p.grad = None
            loss = accumulate(model, task.kind, windows, y_rows, budget, device, autocast)
            if guard.ok(np.isfinite(loss), step=f"{step} of epoch {epoch}"):
                opt.step()
                losses.append(loss)
                weights.append(len(windows))
        valid_out, valid_loss = evaluate(model, reader, data["valid"], task.kind, budget, device, autocast,
                                         batch_size)
        score = split_metrics(task, valid_out.numpy(), data["valid"], (monitor,))[monitor]
        improved = plateau.update(valid_loss, epoch)
        if improved:
            best = {n: p.detach().clone() for n, p in trainable}
        train_loss = float(np.average(losses, weights=weights)) if losses else float("nan")
        history.append(dict(epoch=epoch, train_loss=train_loss, valid_loss=valid_loss, **{f"valid_{monitor}": score}))
        log(f"epoch {epoch:3d}  train loss {train_loss:.4f}  valid loss {valid_loss:.4f}  valid {monitor} "
            f"{score:.4f}  best loss {plateau.best:.4f} at epoch {plateau.best_epoch}"
            f"{'' if improved else f' ({plateau.since}/{PATIENCE})'}  {time.time() - t0:.1f}s")
        if plateau.stop:
            stopped = "early"
            break
    with torch.no_grad():
        params = dict(model.named_parameters())
        for n, t in best.items():
            params[n].copy_(t)
    return dict(best_epoch=plateau.best_epoch, epochs=len(history), valid_loss=plateau.best, stopped=stopped,
                history=history)


def count(params):
    return sum(p.numel() for p in params)


def describe(model, mode, head_lr, encoder_lr):
    enc = list(model.encoder.parameters())
    on = [p for p in enc if p.requires_grad]
    conv = count(model.encoder.feature_extractor.parameters())
    n_out = model.head.out_features
    what = {"fe": "the encoder is frozen", "ft2": f"conv front end frozen ({conv / 1e6:.2f}M)",
            "ft1": "conv front end at the full gradient"}[mode]
    lrs = f"Adam lr {head_lr:g}" if mode == "fe" else f"Adam lr {encoder_lr:g} (encoder) / {head_lr:g} (head)"
    reg = ("no dropout (frozen encoder in eval mode)" if mode == "fe" else
           ", ".join(f"{k} {v:g}" for k, v in REGULARISATION.items()) + " (fairseq's fine-tuning)")
    return (f"trains {count(on) / 1e6:.2f}M of {count(enc) / 1e6:.2f}M encoder parameters ({what}) + head "
            f"{model.head.in_features}x{n_out}; {lrs}; {reg}")


# ------------------------------------------------------------------------------------------------------------------
# one (task, model) run, called by probe.py (run)

def run(task_name, task, listing, ext, model_spec, encoder, tag, args, log=print):
    """Fine-tunes (or, in fe, trains the head on) one task and appends the results line probe.py writes, with
    `mode` recorded. task, listing and ext come from probe.py (its TASKS, readers and --window/--crop)."""
    mode = args.mode
    cpu0, t0 = time.process_time(), time.time()
    reader = AudioReader(ext)
    failed = reader.scan(listing.clips)
    read_s = time.time() - t0
    splits = runs.usable_splits(task_name, listing.clips, failed, log)
    data = {split: make_items(part, reader, task.item, task.kind) for split, part in splits.items()}
    head_lr = args.lr or (FE_LR if mode == "fe" else HEAD_LR)
    encoder_lr = args.encoder_lr if args.encoder_lr is not None else ENCODER_LR
    epochs = args.epochs or task.epochs
    budget = int(args.batch_seconds * ext.sample_rate)
    model = prepare(encoder, task.num_classes, mode, args.seed)
    windows = {s: sum(reader.count[c.key] for c in d.clips) if task.item == "clip" else len(d) for s, d in
               data.items()}
    log(f"{task_name} --mode {mode}: {describe(model, mode, head_lr, encoder_lr)}; batches of {args.batch_size} "
        f"{task.item}s in pieces of <= {args.batch_seconds:g} s of audio; stops after {PATIENCE} epochs without a "
        f"lower validation loss, at most {epochs}; {len(data['train'])} train / {len(data['valid'])} valid / "
        f"{len(data['test'])} test items ({windows['train']} / {windows['valid']} / {windows['test']} windows); "
        f"{reader.cached_bytes / 2 ** 20:.0f} MB of audio held in memory")
    t1 = time.time()
    try:
        fit = train(model, mode, task, reader, data, epochs=epochs, batch_size=args.batch_size, budget=budget,
                    head_lr=head_lr, encoder_lr=encoder_lr, seed=args.seed, device=args.device, log=log)
    except (AudioError, NonFiniteLossError) as e:
        sys.exit(f"{task_name} --mode {mode}: {e}")
    train_s = time.time() - t1
    autocast = autocast_context(args.device, "bfloat16")
    outs = {}
    for split in ("valid", "test"):
        outs[split], _ = evaluate(model, reader, data[split], task.kind, budget, args.device, autocast,
                                  args.batch_size)
    valid = split_metrics(task, outs["valid"].numpy(), data["valid"])
    test = split_metrics(task, outs["test"].numpy(), data["test"], valid=valid)
    result = dict(layers="last", lr=head_lr, best_epoch=fit["best_epoch"], best_valid=valid[task.metrics[0]],
                  valid=valid, test=test, layer_weights=None, cell=(0, 0))
    record = runs.result_record(task_name, task, model_spec, tag, args, [result], splits, ext, failed,
                             dict(read=read_s, train=train_s, cpu=time.process_time() - cpu0), windows=windows,
                             items={s: len(d) for s, d in data.items()})
    record.update(mode=mode, encoder_lr=None if mode == "fe" else encoder_lr, epochs=fit["epochs"],
                  stopped=fit["stopped"], valid_loss=fit["valid_loss"], batch_size=args.batch_size,
                  batch_seconds=args.batch_seconds, patience=PATIENCE, max_epochs=epochs,
                  regularisation=None if mode == "fe" else dict(REGULARISATION), history=fit["history"])
    if args.save_model:
        record["model_file"] = save_model(args.save_model, task_name, mode, model, encoder.cfg, listing, ext,
                                          model_spec, tag, record)
    runs.append_record(record, args.results)
    shown = "  ".join(f"{k} {v:.4f}" for k, v in test.items())
    log(f"{task_name}  {model_spec}  --mode {mode}  test {shown}  (valid loss {fit['valid_loss']:.4f} at epoch "
        f"{fit['best_epoch']} of {fit['epochs']}, {'stopped early' if fit['stopped'] == 'early' else 'epoch cap'}; "
        f"lr {head_lr:g}" + ("" if mode == "fe" else f" / encoder {encoder_lr:g}") +
        f"; read {read_s:.1f}s, train {train_s:.1f}s, cpu {record['seconds']['cpu']:.0f}s)")
    return record


def save_model(folder, task_name, mode, model, cfg, listing, ext, spec, tag, record):
    """<folder>/<task>-<mode>.pt: the best fine-tuned encoder under the encoder's own config (its pre-training
    dropout values, so it loads as the checkpoint it came from; model.load_pretrained reads 'encoder_config' and
    'encoder'), with the head, the labels and the run's figures beside it. Written atomically."""
    os.makedirs(folder, exist_ok=True)
    blob = dict(encoder_config=asdict(cfg),
                encoder={k: v.detach().float().cpu() for k, v in model.encoder.state_dict().items()},
                head={k: v.detach().float().cpu() for k, v in model.head.state_dict().items()},
                task=task_name, mode=mode, labels=list(listing.labels), target_mean=listing.target_mean,
                target_std=listing.target_std, extraction=asdict(ext), source_model=spec, source_model_tag=tag,
                metrics=record["metrics"], valid=record["valid"], best_epoch=record["best_epoch"])
    path = os.path.join(folder, f"{task_name}-{mode}.pt")
    tmp = path + f".tmp{os.getpid()}"
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path
