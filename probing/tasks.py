"""Every probe task, defined in one place: its reader (data/), how a clip becomes windows, its kind and outputs,
its metrics (the first is the monitored validation value), early stopping, and its Table-1 name and columns. Adding
a task touches this file (and its test); the paths (probing/clips.py, frames.py, finetune.py) and the report read
everything from here. Also: which clips of a listing are used, and where `--task all` looks for each data set."""
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from data import beats, downstream
from probing import frames
from probing.features import Extraction
from probing.metrics import ENSEMBLES, key_metrics
from probing.runs import SPLITS


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
    name: str = ""  # its column in Table 1 (the paper's data set name; default: the task's key)


# VocalSet: MARBLE's preprocess trims leading silence, cuts 2.993 s chunks at 44.1 kHz (remainder dropped) and writes
# each chunk as its own file, z-normalised: every chunk is a train/valid/test item and accuracy is per chunk.
VOCALSET = Extraction(window=3.0, normalize="window", trim="leading_silence", cut="vocalset",
                      cut_rate=downstream.VOCALSET_RATE)
TASKS = {
    "nsynth_instr": Task(lambda root: downstream.read_nsynth(root, "instrument"), "multiclass", 11, ("acc",),
                         epochs=50, patience=10, plateau_patience=3, features="nsynth", name="NSynthI"),
    "nsynth_pitch": Task(lambda root: downstream.read_nsynth(root, "pitch"), "multiclass", 128, ("acc",),
                         epochs=50, patience=10, plateau_patience=3, features="nsynth", name="NSynthP"),
    "gtzan_genre": Task(downstream.read_gtzan, "multiclass", 10, ("acc",),
                        epochs=100, patience=20, plateau_patience=6, lr=5e-3, features="gtzan", name="GTZAN"),
    # EMO: 5 s windows over the first 30 s, as the paper's text and MARBLE's base config (EMO_base_config.yaml);
    # MARBLE's Music2Vec config uses 30 s windows over the whole 45 s clip: --window 30 --crop 0
    "emo": Task(downstream.read_emo, "regression", 2, ("r2", "arousal_r2", "valence_r2"),
                epochs=100, patience=20, plateau_patience=5, features="emo", extraction=Extraction(window=5.0,
                                                                                                  crop=30.0),
                table=("valence_r2", "arousal_r2"), name="EMO"),
    "vocalset_tech": Task(lambda root: downstream.read_vocalset(root, "technique"), "multiclass", 10, ("acc",),
                          epochs=100, patience=10, plateau_patience=5, features="vocalset", extraction=VOCALSET,
                          item="window", name="VocalSetT"),
    "vocalset_singer": Task(lambda root: downstream.read_vocalset(root, "singer"), "multiclass", 20, ("acc",),
                            epochs=100, patience=20, plateau_patience=5, features="vocalset", extraction=VOCALSET,
                            item="window", name="VocalSetS"),
    # GiantSteps: MARBLE cuts each track into 30 s files (a partial last one dropped; whole within 0.1 s, as it
    # measures tracks by ffprobe's container duration, which counts the mp3's encoder delay and padding, ~50 ms),
    # each z-normalised on its own; every window is a training item, and songs are ensembled at evaluation
    "gs_key": Task(downstream.read_giantsteps, "multiclass", 24, ("weighted", "acc", "clip_acc") + tuple(
        f"weighted_{s}" for s in ENSEMBLES), epochs=100, patience=20, plateau_patience=5, features="giantsteps",
        extraction=Extraction(window=30.0, min_last=29.9, normalize="window"), item="window", score=key_metrics,
        table=("weighted",), name="GS"),
    # MTG-Jamendo: full tracks in 30 s windows, one feature store for the four subsets (MARBLE's Music2Vec config
    # probes genre on layer 7 only; here every task starts from the same --layers)
    **{f"mtg_{name}": Task(lambda root, subset=subset: downstream.read_mtg(root, subset), "multilabel", n,
                           ("roc_auc", "ap"), epochs=100, patience=10, plateau_patience=3, features="mtg",
                           name=column)
       for name, subset, n, column in (("instrument", "instrument", 40, "MTGInstrument"),
                                       ("moodtheme", "moodtheme", 56, "MTGMood"), ("genre", "genre", 87, "MTGGenre"),
                                       ("top50", "top50tags", 50, "MTGTop50"))},
    "mtt": Task(downstream.read_mtt, "multilabel", 50, ("roc_auc", "ap"),
                epochs=100, patience=10, plateau_patience=3, features="mtt", name="MTT"),
    # beat tracking: the frame-level path (probing/frames.py); MARBLE's GTZANBT_base_config.yaml: lr 1e-3, 100
    # epochs, early stopping 20, plateau 6, monitor valid_beat_f. Table 1 shows MARBLE's F at 70 ms (the headline,
    # as published) and the field's per-track F (mir_eval.beat.f_measure, 5 s trim)
    **{name: Task(reader, "beat", 1, frames.BEAT_METRICS, epochs=100, patience=20, plateau_patience=6,
                  features=features, extraction=frames.FRAMES, item="track", table=frames.BEAT_TABLE, name=column)
       for name, reader, features, column in (("gtzan_beat", beats.read_gtzan_beat, "gtzan", "GTZANBT"),
                                              ("beat", beats.read_beat_folder, "beat", "Beat"))},
}

# The paper's Table 1, left to right (Task.name is its column name); tasks not listed follow in the order they appear.
TABLE_ORDER = ["mtt", "gs_key", "gtzan_genre", "emo", "nsynth_instr", "nsynth_pitch", "vocalset_tech",
               "vocalset_singer", "gtzan_beat", "mtg_instrument", "mtg_moodtheme", "mtg_genre", "mtg_top50", "beat"]
TABLE_NAMES = {key: task.name or key for key, task in TASKS.items()}


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
    """Where --task all looks for a task's data set: ROOT/<folder> (docs/probe.md, "All tasks")."""
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
