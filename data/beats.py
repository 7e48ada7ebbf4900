"""Readers for the beat-tracking data sets of probe.py (the frame-level path, probing/frames.py).

Each reader returns a `BeatListing` whose clips carry their reference beat times (seconds, float64, increasing) as
the label, plus notes (files left out, and why) that the run prints.

- GTZAN-Rhythm v2 (Marchand & Peeters 2015) on the GTZAN audio, with the fault-filtered split of gtzan_genre.
- Any folder in the `.beats` convention (Ballroom, Hainsworth, SMC, ... as madmom and most beat trackers read them):
  `<name>.{wav,flac,ogg,mp3}` and `<name>.beats` anywhere under the root, matched by name.
"""
import json
import os
from dataclasses import dataclass, field

import numpy as np

from data.audio import AUDIO_EXTENSIONS
from data.downstream import GTZAN_SOURCE, Clip, DataSetError, Listing, read_gtzan

GTZAN_RHYTHM_SOURCE = ("http://anasynth.ircam.fr/home/media/GTZAN-rhythm/ "
                       "(GTZAN-Rhythm_v2_ismir2015_lbd_2015-10-28.tar.gz, unpacked under the data root)")
# where the tarball's jams/ folder may sit under the data root: as unpacked, MARBLE's metadata_dir, or renamed
GTZAN_RHYTHM_DIRS = ("GTZAN-Rhythm_v2_ismir2015_lbd/jams", "GTZAN-Rhythm_v2_ismir2015_lbd", "GTZAN-Rhythm/jams",
                     "jams")
BEATS_SOURCE = ("your own folder: <name>.wav|flac|ogg|mp3 with <name>.beats (one beat a line: time in seconds, "
                "optionally a tab and the beat's position in the bar), optional train.txt / valid.txt / test.txt")
SOURCES = {"gtzan": f"{GTZAN_SOURCE}; beats: {GTZAN_RHYTHM_SOURCE}", "beat": BEATS_SOURCE}
SPLIT_SEED = 1234  # the 70/15/15 split of a folder without split lists: fixed, so every probe seed sees one split
SPLIT_FRACTIONS = (0.70, 0.15, 0.15)


@dataclass
class BeatListing(Listing):
    notes: list = field(default_factory=list)  # one line per thing left out, printed by the run


def _check_times(times, where):
    times = np.asarray(times, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(times) | (times < 0))
    if len(bad):
        raise DataSetError(f"{where}: beat {bad[0] + 1} has time {times[bad[0]]!r}; expected seconds >= 0")
    back = np.flatnonzero(np.diff(times) < 0)
    if len(back):
        raise DataSetError(f"{where}: beat {back[0] + 2} at {times[back[0] + 1]} s comes before the one above it "
                           f"({times[back[0]]} s); beat times must increase")
    return times


# ------------------------------------------------------------------------------------------------------------------
# GTZAN-Rhythm v2: one JAMS per track, <genre>.000NN.wav.jams. The beats are the annotation of namespace "beat"
# whose sandbox says annotation_type "beat" (the same namespace also holds the downbeats, annotation_type
# "downbeat"). JAMS is JSON: read with json, no jams package.

def jams_beat_times(path):
    """The beat times of one GTZAN-Rhythm JAMS file."""
    try:
        with open(path, encoding="utf-8") as f:
            jam = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataSetError(f"{path}: not a readable JAMS (JSON) file ({e})") from None
    annotations = jam.get("annotations") if isinstance(jam, dict) else None
    if not isinstance(annotations, list):
        raise DataSetError(f"{path}: no 'annotations' list; expected a JAMS file")
    for i, a in enumerate(annotations):
        if not isinstance(a, dict) or a.get("namespace") != "beat":
            continue
        sandbox = a.get("sandbox") or {}
        if sandbox.get("annotation_type") != "beat":
            continue
        data, where = a.get("data"), f"{path}: annotations[{i}]"
        if isinstance(data, list):  # JAMS >= 0.3: a list of observations {time, duration, value, confidence}
            try:
                times = [float(obs["time"]) for obs in data]
            except (TypeError, KeyError, ValueError):
                raise DataSetError(f"{where}: data must be observations with a numeric 'time'") from None
        elif isinstance(data, dict) and "time" in data:  # JAMS 0.2: columns
            col = data["time"]
            col = [col[k] for k in sorted(col, key=int)] if isinstance(col, dict) else col
            try:
                times = [float(t) for t in col]
            except (TypeError, ValueError):
                raise DataSetError(f"{where}: data.time must be numbers") from None
        else:
            raise DataSetError(f"{where}: no beat observations in 'data'")
        return _check_times(times, where)
    raise DataSetError(f"{path}: no annotation with namespace 'beat' and sandbox.annotation_type 'beat'")


def gtzan_rhythm_dir(root):
    for d in GTZAN_RHYTHM_DIRS:
        folder = os.path.join(root, d)
        if os.path.isdir(folder) and any(n.endswith(".jams") for n in os.listdir(folder)):
            return folder
    raise DataSetError(f"{os.path.join(root, GTZAN_RHYTHM_DIRS[0])}: not found (nor {', '.join(GTZAN_RHYTHM_DIRS[1:])}"
                       f"); expected GTZAN-Rhythm v2's <genre>.000NN.wav.jams. Beats are published at "
                       f"{GTZAN_RHYTHM_SOURCE}")


def read_gtzan_beat(root):
    """GTZAN audio and split as gtzan_genre (fault-filtered lists, 442 / 197 / 290; MARBLE reads the same lists for
    beat tracking), each clip's label its GTZAN-Rhythm v2 beat times."""
    genre = read_gtzan(root)
    jams_dir = gtzan_rhythm_dir(root)
    clips = []
    for c in genre.clips:
        name = os.path.basename(c.path)
        path = os.path.join(jams_dir, name + ".jams")
        if not os.path.exists(path):
            raise DataSetError(f"{path}: not found; GTZAN-Rhythm v2 has one <genre>.000NN.wav.jams per GTZAN track. "
                               f"Published at {GTZAN_RHYTHM_SOURCE}")
        clips.append(Clip(c.key, c.path, c.split, jams_beat_times(path)))
    return BeatListing(clips, ["beat"])


# ------------------------------------------------------------------------------------------------------------------
# a folder of <name>.<audio> + <name>.beats

class BeatOrderError(DataSetError):
    """A .beats file whose times decrease: read_beat_folder leaves that track out with one line."""


def read_beats_file(path, counts=None):
    """Beat times from a .beats file: one beat a line, whitespace-separated, the first field the time in seconds
    (the rest, e.g. the beat's position in the bar, `1` or Ballroom's `9.3`, is not used). Blank lines and lines
    starting with # are skipped, and so is a time of -1 (mirdata's "no annotation" placeholder), counted in
    counts["placeholders"] when a dict is given."""
    times = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            try:
                t = float(fields[0])
            except ValueError:
                raise DataSetError(f"{path}:{line_no}: {line.strip()[:60]!r}: expected a time in seconds, optionally "
                                   "followed by the beat's position in the bar") from None
            if t == -1:
                if counts is not None:
                    counts["placeholders"] = counts.get("placeholders", 0) + 1
                continue
            times.append((t, line_no))
    t = np.array([t for t, _ in times], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(t) | (t < 0))
    if len(bad):
        raise DataSetError(f"{path}:{times[bad[0]][1]}: time {t[bad[0]]} is not a number of seconds >= 0")
    back = np.flatnonzero(np.diff(t) < 0)
    if len(back):
        raise BeatOrderError(f"{path}:{times[back[0] + 1][1]}: beat at {t[back[0] + 1]} s comes before the one above "
                           f"it ({t[back[0]]} s); beat times must increase")
    return t


def _name_of(entry):
    base = os.path.basename(entry.strip())
    stem, ext = os.path.splitext(base)
    return stem if ext.lower().lstrip(".") in AUDIO_EXTENSIONS + ("beats",) else base


def read_beat_folder(root):
    """Every <name>.{wav,flac,ogg,mp3} under `root` (any depth) with a <name>.beats (any depth) is a track. Split:
    train.txt / valid.txt / test.txt in the root (one name a line, with or without extension or folder), else a
    seeded 70/15/15 split of the sorted names (SPLIT_SEED, the same whatever --seed)."""
    if not os.path.isdir(root):
        raise DataSetError(f"{root}: not a folder; expected {BEATS_SOURCE}")
    audio, beats = {}, {}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            ext = ext.lower().lstrip(".")
            kind = audio if ext in AUDIO_EXTENSIONS else beats if ext == "beats" else None
            if kind is None:
                continue
            path = os.path.join(folder, name)
            if stem in kind:
                raise DataSetError(f"{path}: the name {stem!r} is also {kind[stem]}; names must be unique under "
                                   f"{root} (audio and .beats are matched by name)")
            kind[stem] = path
    names = sorted(set(audio) & set(beats))
    notes = []
    if set(audio) - set(beats):
        lone = sorted(set(audio) - set(beats))
        notes.append(f"{len(lone)} audio files have no <name>.beats and are left out (first: {audio[lone[0]]})")
    if set(beats) - set(audio):
        lone = sorted(set(beats) - set(audio))
        notes.append(f"{len(lone)} .beats files have no audio file of the same name and are left out (first: "
                     f"{beats[lone[0]]})")
    if not names:
        raise DataSetError(f"{root}: no <name>.wav|flac|ogg|mp3 with a <name>.beats found; expected {BEATS_SOURCE}")
    lists = {s: os.path.join(root, f"{s}.txt") for s in ("train", "valid", "test")}
    present = [s for s, p in lists.items() if os.path.exists(p)]
    split = {}
    if present:
        if len(present) < 3:
            missing = [lists[s] for s in lists if s not in present]
            raise DataSetError(f"{missing[0]}: not found, but {lists[present[0]]} is; give all three split lists "
                               "(train.txt, valid.txt, test.txt) or none (a seeded 70/15/15 split)")
        known = set(names)
        for s, path in lists.items():
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip() or line.lstrip().startswith("#"):
                        continue
                    name = _name_of(line)
                    if name not in known:
                        raise DataSetError(f"{path}:{line_no}: {line.strip()!r}: no audio file with a .beats of that "
                                           f"name under {root}")
                    if name in split:
                        raise DataSetError(f"{path}:{line_no}: {name!r} is already in {split[name]}.txt")
                    split[name] = s
        left = [n for n in names if n not in split]
        if left:
            notes.append(f"{len(left)} tracks are in none of train/valid/test.txt and are left out (first: {left[0]})")
    else:
        if len(names) < 3:
            raise DataSetError(f"{root}: {len(names)} tracks with beats; a train/valid/test split needs at least 3")
        n = len(names)
        n_valid = max(1, round(SPLIT_FRACTIONS[1] * n))
        n_test = max(1, round(SPLIT_FRACTIONS[2] * n))
        order = np.random.RandomState(SPLIT_SEED).permutation(n)
        for rank, i in enumerate(order):
            split[names[i]] = "valid" if rank < n_valid else "test" if rank < n_valid + n_test else "train"
    clips, counts, unordered = [], {}, []
    for name in names:
        if name in split:
            rel = os.path.relpath(audio[name], root)
            try:
                times = read_beats_file(beats[name], counts)
            except BeatOrderError as e:
                unordered.append(str(e))
                continue
            clips.append(Clip(rel, audio[name], split[name], times))
    if unordered:
        notes.append(f"{len(unordered)} .beats files have decreasing times and are left out (first: {unordered[0]})")
    if counts.get("placeholders"):
        notes.append(f"{counts['placeholders']} beat lines of -1 (no annotation) skipped")
    return BeatListing(clips, ["beat"], notes=notes)

