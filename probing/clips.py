"""The clip-level probe: heads trained on pooled window rows of the feature store, a clip scored by the mean of its
windows' logits (MARBLE), and one clip-level (task, model) run."""
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from probing.features import Rows, cache_key, extract, rows_of, store_path
from probing.heads import HeadAdam, HeadSchedule, ProbeHeads, grid_results, validation_best
from probing.metrics import monitored, split_metrics
from probing.runs import (FEATURES_ON_DEVICE_BYTES, extract_or_exit, head_grid, result_record, save_head,
                          task_extraction, usable_splits, write_result)

BATCH_SIZE = 64  # clips per training step (MARBLE stacks all windows of each clip in the batch)


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
    """Trains the grid layer_choices x lrs together. rows: a probing.features.Rows (or any rows -> float32 tensor);
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


def run(task_name, task, listing, model_spec, encoder, tag, args, log=print):
    """One clip-level (task, model, seed) run from its listing on: extraction into the store (or the stored rows),
    the heads, the results line (and --save-heads)."""
    ext = task_extraction(task, args, encoder.cfg.sample_rate)
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
