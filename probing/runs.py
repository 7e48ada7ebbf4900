"""The steps of one (task, model) run that the probe's three paths share (clip-level: probing/clips.py; frames:
probing/frames.py; fine-tuning: probing/finetune.py): the head grid, extraction into the feature store, the splits
less the clips extraction left out, the results line, and saved heads."""
import dataclasses
import json
import os
import sys
import time
from dataclasses import asdict

import torch

from data.audio import SAMPLE_RATE
from probing.features import FeatureStore, StoreError, ranks
from probing.heads import ProbeHeads, validation_best

SWEEP_LRS = (5e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2)

FEATURES_ON_DEVICE_BYTES = 8 << 30  # a feature store up to this size is copied to the GPU once for training

HEAD_FORMAT = 1

SPLITS = ("train", "valid", "test")


def task_extraction(task, args, sample_rate=SAMPLE_RATE):
    """The task's extraction at the model's sample rate with --window / --crop applied (each changes the cache
    key)."""
    ext = dataclasses.replace(task.extraction, sample_rate=int(sample_rate))
    if getattr(args, "no_normalize", False):
        ext = dataclasses.replace(ext, normalize="none")
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


class OtherRank(Exception):
    """Raised on the ranks other than 0 once their share of a task's extraction is in: rank 0 trains the heads and
    writes the results (probe.py goes on with the next task)."""


def extract_or_exit(task_name, extract_fn, ext, clips, encoder, path, key, args, log):
    """Runs probing.features.extract or probing.frames.extract_frames into the store at `path`; returns (the store,
    {clip key: reason} of the clips left out, seconds). A store that is not what it should be ends the run. Under
    torchrun every rank extracts its share, and only rank 0 goes on (the others raise OtherRank)."""
    t0 = time.time()
    try:
        failed = extract_fn(ext, clips, encoder, path, key, args.device, args.batch_seconds, log,
                            workers=getattr(args, "workers", 0))
        if ranks()[0] != 0:
            raise OtherRank(task_name)
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


# ------------------------------------------------------------------------------------------------------------------
# saved heads (applied to new audio by probing/predict.py)

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
