"""Readers for the downstream (probing) data sets, as they are distributed.

Each reader takes the folder a user unpacked the data set into and returns a `Listing`: the `Clip`s (audio file,
the split it belongs to, its label) and the label names, reproducing the splits and label derivations of the MARBLE
v1 benchmark (the code behind the Music2Vec / MusicHuBERT probing numbers). Nothing is converted on disk: where
MARBLE runs a preprocess script first (MTT, EMO, VocalSet) the same derivation happens here in memory.

A missing folder or metadata file raises DataSetError with one line: what was expected where, and where the data
set is published. The benchmark's published split lists ship in data/splits/.
"""
import csv
import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

SPLITS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "splits")


class DataSetError(Exception):
    """The data set on disk is not laid out as distributed; str(err) names the path and what was expected."""


@dataclass
class Clip:
    key: str  # path relative to the data root: the clip's name in results and in the feature cache
    path: str  # absolute audio path
    split: str  # train | valid | test
    label: Any  # int (multiclass) or float32 vector (multilabel, regression)


@dataclass
class Listing:
    """What a reader returns: the clips, and what their labels mean (kept with a saved probe head)."""
    clips: list  # of Clip
    labels: list  # the name of each class / tag / regression output, in label order
    target_mean: Any = None  # regression: the targets were z-scored with this mean and std (per output), so a
    target_std: Any = None  # prediction maps back to the annotation scale as y * std + mean


def _need(path, what, source):
    if not os.path.exists(path):
        raise DataSetError(f"{path}: not found; expected {what}. The data set is published at {source}")
    return path


def _clip(root, rel, split, label):
    return Clip(rel, os.path.join(root, rel), split, label)


# ------------------------------------------------------------------------------------------------------------------
# NSynth (Engel et al. 2017): nsynth-{train,valid,test}/examples.json + audio/<note_str>.wav, the official split.

NSYNTH_SOURCE = "https://magenta.tensorflow.org/datasets/nsynth (nsynth-{train,valid,test}.jsonwav.tar.gz)"
NSYNTH_FAMILIES = ["bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed", "string",
                   "synth_lead", "vocal"]


def read_nsynth(root, target, splits=("train", "valid", "test")):
    """target: "instrument" (11 families, MARBLE's order) or "pitch" (MIDI pitch 0..127 as the class).
    MARBLE uses pitch - 1 as the class; the shift changes no accuracy and would make MIDI 0 negative, so we don't.
    splits: the folders read (analyze.py reads one split; the probe needs all three)."""
    clips = []
    for split in splits:
        folder = os.path.join(root, f"nsynth-{split}")
        meta_path = _need(os.path.join(folder, "examples.json"), f"NSynth's nsynth-{split}/examples.json",
                          NSYNTH_SOURCE)
        with open(meta_path) as f:
            try:
                examples = json.load(f)
            except json.JSONDecodeError as e:
                raise DataSetError(f"{meta_path}: not valid JSON ({e})") from None
        for note_str in sorted(examples):
            ex = examples[note_str]
            where = f"{meta_path}: entry {note_str!r}"
            if target == "instrument":
                family = ex.get("instrument_family_str")
                if family not in NSYNTH_FAMILIES:
                    raise DataSetError(f"{where}: instrument_family_str {family!r} is not one of {NSYNTH_FAMILIES}")
                label = NSYNTH_FAMILIES.index(family)
            else:
                pitch = ex.get("pitch")
                if not isinstance(pitch, int) or not 0 <= pitch <= 127:
                    raise DataSetError(f"{where}: pitch {pitch!r} is not a MIDI number 0..127")
                label = pitch
            clips.append(_clip(root, f"nsynth-{split}/audio/{note_str}.wav", split, label))
    return Listing(clips, NSYNTH_FAMILIES if target == "instrument" else [f"midi {p}" for p in range(128)])


# ------------------------------------------------------------------------------------------------------------------
# GTZAN genre (Tzanetakis & Cook 2002) with the fault-filtered, artist-disjoint split of Kereliuk, Sturm & Larsen
# 2015 (lists from coreyker/dnn-mgr, identical to jongpillee/music_dataset_split/GTZAN_split).

GTZAN_SOURCE = ("https://www.kaggle.com/datasets/andradaolteanu/gtzan-dataset-music-genre-classification "
                "(Data/genres_original, renamed or linked as genres/)")
GTZAN_GENRES = ["blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock"]
GTZAN_CORRUPT = {"jazz/jazz.00054.wav"}  # unreadable in the Kaggle copy; MARBLE drops it from train (443 -> 442)


def read_gtzan(root):
    # the original tarball unpacks to genres/; the Kaggle copy to Data/genres_original/
    folders = [f for f in ("genres", "genres_original", "Data/genres_original") if os.path.isdir(os.path.join(root, f))]
    genres = folders[0] if folders else _need(os.path.join(root, "genres"), "GTZAN's genres/<genre>/<genre>.000NN.wav"
                                              " (or the Kaggle copy's Data/genres_original/)", GTZAN_SOURCE)
    clips = []
    for split in ("train", "valid", "test"):
        list_path = os.path.join(SPLITS_DIR, "gtzan", f"{split}_filtered.txt")
        with open(list_path) as f:
            for line_no, line in enumerate(f, 1):
                rel = line.strip()
                if not rel or rel in GTZAN_CORRUPT:
                    continue
                genre = rel.split("/")[0]
                if genre not in GTZAN_GENRES:
                    raise DataSetError(f"{list_path}:{line_no}: genre {genre!r} is not one of {GTZAN_GENRES}")
                clips.append(_clip(root, f"{genres}/{rel}", split, GTZAN_GENRES.index(genre)))
    return Listing(clips, GTZAN_GENRES)


# ------------------------------------------------------------------------------------------------------------------
# EMOMusic (Soleymani et al. 2013): clips_45seconds/<song_id>.mp3 + songs_info.csv + static_annotations.csv.
# Split and targets as Jukemir (Castellon et al. 2021), which MARBLE copies.

EMO_SOURCE = "https://cvml.unige.ch/databases/emoMusic/ (clips_45sec.tar.gz, annotations.tar.gz)"


def _read_csv_rows(path):
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    # the distributed CSVs have ", " separators in places: strip keys and values
    return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in rows]


def _emo_annotation(root, name):
    for folder in (root, os.path.join(root, "annotations")):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise DataSetError(f"{os.path.join(root, name)}: not found (nor under annotations/); expected EMOMusic's "
                       f"{name} from annotations.tar.gz. The data set is published at {EMO_SOURCE}")


def emo_artist_split(artist):
    """Jukemir: the artist name reduced to lowercase ASCII letters and single spaces, sha1 mod 10: 8 of 10 buckets
    go to train, 2 to valid, so one artist never spans both."""
    name = "".join(c for c in artist.lower() if ord(c) < 128 and (c.isalpha() or c.isspace()))
    name = " ".join(name.split())
    bucket = int(hashlib.sha1(name.encode("utf-8")).hexdigest(), 16) % 10
    return "train" if bucket < 8 else "valid"


def read_emo(root):
    """Targets [arousal, valence] (the code's order), z-scored with the mean and population std of the MediaEval
    "development" songs (train + valid together, before they are split), as Jukemir."""
    _need(os.path.join(root, "clips_45seconds"), "EMOMusic's clips_45seconds/<song_id>.mp3", EMO_SOURCE)
    info_path, static_path = _emo_annotation(root, "songs_info.csv"), _emo_annotation(root, "static_annotations.csv")
    songs = {}
    for line_no, row in enumerate(_read_csv_rows(info_path), 2):
        try:
            song_id = int(row["song_id"])
            dev = row["Mediaeval 2013 set"] != "evaluation"
            artist = row["Artist"]
        except (KeyError, ValueError) as e:
            raise DataSetError(f"{info_path}:{line_no}: needs song_id, Artist and 'Mediaeval 2013 set' ({e})") from None
        songs[song_id] = {"split": emo_artist_split(artist) if dev else "test"}
    for line_no, row in enumerate(_read_csv_rows(static_path), 2):
        try:
            song_id = int(row["song_id"])
            y = [float(row["mean_arousal"]), float(row["mean_valence"])]
        except (KeyError, ValueError) as e:
            raise DataSetError(f"{static_path}:{line_no}: needs song_id, mean_arousal, mean_valence ({e})") from None
        if song_id not in songs:
            raise DataSetError(f"{static_path}:{line_no}: song_id {song_id} is not in {info_path}")
        songs[song_id]["y"] = y
    missing = [s for s, m in songs.items() if "y" not in m]
    if missing:
        raise DataSetError(f"{static_path}: no annotation for song_id {missing[0]} (and {len(missing) - 1} more)")
    dev_y = np.array([m["y"] for m in songs.values() if m["split"] != "test"], dtype=np.float64)
    mean, std = dev_y.mean(0), dev_y.std(0)  # np.std: population std, as Jukemir
    clips = [_clip(root, f"clips_45seconds/{s}.mp3", m["split"], ((np.array(m["y"]) - mean) / std).astype(np.float32))
             for s, m in sorted(songs.items())]
    return Listing(clips, ["arousal", "valence"], mean.tolist(), std.tolist())


# ------------------------------------------------------------------------------------------------------------------
# VocalSet 1.1 (Wilkins et al. 2018): FULL/<singer>/<context>/<technique>/<file>.wav.
# MARBLE (tasks/VocalSet/preprocess.py) flattens the 17 technique folders, fixes 28 file names, drops 5 files, cuts
# 3 s chunks and splits with sklearn's GroupShuffleSplit under np.random.seed(42617), grouping by the file's index
# inside its technique folder. We redo the same listing and the same random draws here (no files are written): a
# Clip is a recording; probe.py cuts it into MARBLE's chunks and makes each chunk its own item, as MARBLE's chunk
# files are. The group draw is the same either way: it permutes the distinct file ids, whatever the rows per id.

VOCALSET_SOURCE = "https://zenodo.org/record/1203819 (VocalSet11.zip, unpacked so that FULL/ is under the root)"
VOCALSET_SINGERS = [f"f{i}" for i in range(1, 10)] + [f"m{i}" for i in range(1, 12)]
VOCALSET_TECHNIQUES = ["belt", "breathy", "inhaled", "lip_trill", "spoken", "straight", "trill", "trillo", "vibrato",
                       "vocal_fry"]  # the 10 classes of the technique task (Yamamoto et al.), in MARBLE's order
VOCALSET_ALL_FOLDERS = VOCALSET_TECHNIQUES + ["fast_forte", "fast_piano", "forte", "messa", "pp", "slow_forte",
                                              "slow_piano"]
VOCALSET_TEST_SINGERS = {"f2", "f8", "m3", "m5", "m10"}  # technique task only
# MARBLE's name fixes (technique folder, name as shipped -> name with the singer prefix) and deletions.
VOCALSET_RENAMES = {
    ("lip_trill", "lip_trill_arps.wav"): "f2_lip_trill_arps.wav",
    ("lip_trill", "scales_lip_trill.wav"): "m3_scales_lip_trill.wav",
    ("straight", "row_straight.wav"): "m8_row_straight.wav",
    ("vocal_fry", "scales_vocal_fry.wav"): "f2_scales_vocal_fry.wav",
    ("fast_forte", "arps_fast_piano_c.wav"): "f9_arps_fast_piano_c.wav",
    ("fast_piano", "fast_piano_arps_f.wav"): "f2_fast_piano_arps_f.wav",
    ("fast_piano", "arps_c_fast_piano.wav"): "m3_arps_c_fast_piano.wav",
    ("fast_piano", "scales_fast_piano_f.wav"): "f3_scales_fast_piano_f.wav",
    **{("straight", f"{kind}_straight_{v}.wav"): f"f4_{kind}_straight_{v}.wav"
       for kind in ("arpeggios", "scales") for v in "aeiou"},
    **{("fast_piano", f"scales_{k}_fast_piano_{v}.wav"): f"m10_scales_{k}_fast_piano_{v}.wav"
       for k in "cf" for v in "aeiou"},
}
VOCALSET_DELETED = {("vibrato", n) for n in ("f2_scales_vibrato_a(1).wav", "caro_vibrato.wav", "dona_vibrato.wav",
                                             "row_vibrato.wav", "slow_vibrato_arps.wav")}
VOCALSET_SEED = 42617
VOCALSET_RATE = 44100  # MARBLE resamples every file to 44.1 kHz (VocalSet's own rate) before cutting chunks
VOCALSET_CHUNK = VOCALSET_RATE // 1000 * 3000  # MARBLE: sr // 1000 * 3000 = 132,000 samples, 2.993 s


def group_shuffle_split(groups, test_size, rng):
    """sklearn.model_selection.GroupShuffleSplit(n_splits=1, test_size).split(groups=groups) drawing from `rng`:
    a permutation of the sorted unique groups; the first ceil(test_size * n) are test. Returns (train, test) row
    indices. Written out so the draw sequence is visible and sklearn is not needed at run time."""
    classes, group_of_row = np.unique(np.asarray(groups), return_inverse=True)
    n_test = math.ceil(test_size * len(classes))
    perm = rng.permutation(len(classes))
    test_groups, train_groups = perm[:n_test], perm[n_test:]
    return np.flatnonzero(np.isin(group_of_row, train_groups)), np.flatnonzero(np.isin(group_of_row, test_groups))


def vocalset_files(root):
    """MARBLE's flattened listing: (technique folder, corrected name, singer, file_id, relative path), where file_id
    is the index of the corrected name in its sorted technique folder."""
    full = _need(os.path.join(root, "FULL"), "VocalSet's FULL/<singer>/<context>/<technique>/<file>.wav",
                 VOCALSET_SOURCE)
    by_folder = {}
    for singer in sorted(os.listdir(full)):
        singer_dir = os.path.join(full, singer)
        if not os.path.isdir(singer_dir):
            continue
        for context in sorted(os.listdir(singer_dir)):
            context_dir = os.path.join(singer_dir, context)
            if not os.path.isdir(context_dir):
                continue
            for tech in sorted(os.listdir(context_dir)):
                tech_dir = os.path.join(context_dir, tech)
                if tech not in VOCALSET_ALL_FOLDERS or not os.path.isdir(tech_dir):
                    continue
                for name in sorted(os.listdir(tech_dir)):
                    if name in ("", ".DS_Store") or (tech, name) in VOCALSET_DELETED:
                        continue
                    fixed = VOCALSET_RENAMES.get((tech, name), name)
                    rel = f"FULL/{singer}/{context}/{tech}/{name}"
                    by_folder.setdefault(tech, []).append((fixed, singer, rel))
    if not by_folder:
        raise DataSetError(f"{full}: no <singer>/<context>/<technique>/*.wav files found. The data set is published "
                           f"at {VOCALSET_SOURCE}")
    rows = []
    for tech in sorted(by_folder):
        for file_id, (fixed, folder_singer, rel) in enumerate(sorted(by_folder[tech])):
            prefix = fixed.split("_")[0]
            # MARBLE takes the singer from the (corrected) name prefix; the folder says the same for every file we
            # know of, and is the fallback if a name has no prefix
            singer = prefix if prefix in VOCALSET_SINGERS else folder_singer
            rows.append((tech, fixed, singer, file_id, rel))
    return rows


def _vocalset_has_chunk(root, rel):
    """MARBLE's file list (and so its groups) holds only files that give at least one chunk: more than 132,000
    samples at 44.1 kHz (strict). MARBLE tests the length after its VAD trimmed leading silence; here it is the
    header's length, so a file with under 3 s of sound after a silent lead-in stays in the group draw (and is then
    reported as too short at extraction)."""
    import soundfile as sf
    try:
        info = sf.info(os.path.join(root, rel))
    except Exception:
        return True  # unreadable: let extraction report it with its path
    return -(-info.frames * VOCALSET_RATE // info.samplerate) > VOCALSET_CHUNK


def read_vocalset(root, target):
    """target: "technique" (10 classes; test singers f2 f8 m3 m5 m10; train/valid by a 0.6/0.4 group split of the
    rest) or "singer" (20 classes over all 17 technique folders; group split 0.2 test, then 0.4 of the rest valid).
    Both splits come from one random stream seeded 42617, drawn in MARBLE's order (technique first)."""
    rows = [r for r in vocalset_files(root) if _vocalset_has_chunk(root, r[4])]
    rng = np.random.RandomState(VOCALSET_SEED)
    tech_rows = [r for r in rows if r[0] in VOCALSET_TECHNIQUES]
    train_val = [r for r in tech_rows if r[2] not in VOCALSET_TEST_SINGERS]
    tr, va = group_shuffle_split([r[3] for r in train_val], 0.4, rng)
    tech_split = {train_val[i][4]: "train" for i in tr}
    tech_split.update({train_val[i][4]: "valid" for i in va})
    tech_split.update({r[4]: "test" for r in tech_rows if r[2] in VOCALSET_TEST_SINGERS})
    if target == "technique":
        return Listing([_clip(root, r[4], tech_split[r[4]], VOCALSET_TECHNIQUES.index(r[0])) for r in tech_rows],
                       VOCALSET_TECHNIQUES)
    trv, te = group_shuffle_split([r[3] for r in rows], 0.2, rng)
    rest = [rows[i] for i in trv]
    tr, va = group_shuffle_split([r[3] for r in rest], 0.4, rng)
    singer_split = {rows[i][4]: "test" for i in te}
    singer_split.update({rest[i][4]: "train" for i in tr})
    singer_split.update({rest[i][4]: "valid" for i in va})
    return Listing([_clip(root, r[4], singer_split[r[4]], VOCALSET_SINGERS.index(r[2])) for r in rows],
                   VOCALSET_SINGERS)


# ------------------------------------------------------------------------------------------------------------------
# MagnaTagATune (Law et al. 2009): mp3/<hex>/<name>.mp3 + annotations_final.csv (tab-separated).
# MARBLE (tasks/MTT/preprocess.py): the 50 most frequent of the 188 tags; split by the first hex digit of the path,
# 0-b train, c valid, d-f test (the "12:1:3" split, untagged clips kept).

MTT_SOURCE = "https://mirg.city.ac.uk/codeapps/the-magnatagatune-dataset (mp3.zip.001-003, annotations_final.csv)"


def read_mtt(root, num_tags=50):
    csv_path = _need(os.path.join(root, "annotations_final.csv"), "MagnaTagATune's annotations_final.csv",
                     MTT_SOURCE)
    audio_dir = os.path.join(root, "mp3")
    _need(audio_dir, "MagnaTagATune's mp3/<0-9a-f>/<name>.mp3 (the unzipped mp3.zip.00x parts)", MTT_SOURCE)
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    header = rows[0] if rows else []
    if len(header) < 3 or header[0] != "clip_id" or header[-1] != "mp3_path":
        raise DataSetError(f"{csv_path}:1: expected a tab-separated header clip_id, <tags>, mp3_path; "
                           f"found {header[:2]}...{header[-1:]}")
    tags = header[1:-1]
    paths, values = [], []
    for line_no, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise DataSetError(f"{csv_path}:{line_no}: {len(row)} columns, the header has {len(header)}")
        try:
            values.append([int(v) for v in row[1:-1]])
        except ValueError:
            raise DataSetError(f"{csv_path}:{line_no}: tag columns must be 0/1") from None
        paths.append(row[-1])
    values = np.array(values, dtype=np.int64).reshape(len(paths), len(tags))
    # MARBLE sorts counts with np.argsort (not stable) and reverses; we break ties by column order
    top = np.argsort(-values.sum(0), kind="stable")[:num_tags]
    labels = values[:, top].astype(np.float32)
    clips = []
    for path, y in zip(paths, labels):
        first = int(path[0], 16)
        split = "train" if first < 12 else "valid" if first < 13 else "test"
        clips.append(_clip(root, f"mp3/{path}", split, y))
    return Listing(clips, [tags[j] for j in top])


# ------------------------------------------------------------------------------------------------------------------
# GiantSteps key (Knees et al. 2015; Korzeniowski & Widmer 2018): train/valid from giantsteps-mtg-key-dataset, test =
# the 604 tracks of giantsteps-key-dataset. The two GitHub repositories hold the annotations; each one's audio_dl.sh
# writes audio/<id>.LOFI.mp3 inside it (MARBLE's download puts all 2,090 mp3s in one audio/ beside them instead).
# Filter and split as Jukemir's giantsteps loader, which MARBLE's tasks/GS/preprocess.py copies.

GS_SOURCE = ("https://github.com/GiantSteps/giantsteps-key-dataset and https://github.com/GiantSteps/"
             "giantsteps-mtg-key-dataset (clone both into the root and run each one's audio_dl.sh)")
GS_TONICS = ["C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B"]
GS_CLASSES = [f"{t} major" for t in GS_TONICS] + [f"{t} minor" for t in GS_TONICS]  # MARBLE's 24 classes, in order
GS_FLATS = {"C#": "Db", "D#": "Eb", "F#": "Gb", "G#": "Ab", "A#": "Bb"}
GS_BUCKETS, GS_TRAIN_BUCKETS = 116, 100  # Jukemir: sha1(artist) mod 116, buckets < 100 train ("induces 80/20")


def _gs_repo(root, name):
    """<root>/<name>, or a GitHub archive's <name>-<commit> folder (MARBLE keeps the commit in the name)."""
    found = []
    if os.path.isdir(root):
        found = [f for f in sorted(os.listdir(root)) if f == name or f.startswith(name + "-")]
    return os.path.join(root, found[0] if found else name)


def gs_key_class(text, where):
    """"C# minor" -> the class index of "Db minor" (sharps written as flats)."""
    parts = text.split()
    if len(parts) != 2 or GS_FLATS.get(parts[0], parts[0]) not in GS_TONICS or parts[1] not in ("major", "minor"):
        raise DataSetError(f"{where}: key {text!r} is not '<tonic> major|minor' (tonic one of C C# Db ... B)")
    return GS_CLASSES.index(f"{GS_FLATS.get(parts[0], parts[0])} {parts[1]}")


def _read_tsv(path, columns, source):
    _need(path, f"a tab-separated file with columns {', '.join(columns)}", source)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows or any(c not in rows[0] for c in columns):
        raise DataSetError(f"{path}:1: expected a header with {', '.join(columns)}; found {rows[0] if rows else []}")
    header = rows[0]
    out = []
    for line_no, row in enumerate(rows[1:], 2):
        if len(row) != len(header):
            raise DataSetError(f"{path}:{line_no}: {len(row)} tab-separated fields, the header has {len(header)}")
        out.append((line_no, dict(zip(header, row))))
    return out


def gs_artist_splits(metadata):
    """Jukemir's artist split: every artist of every track (ARTIST split on ',') goes to train or valid by
    sha1(lowercased name) mod 116; then, twice over the tracks in file order, all artists of a track that has a valid
    artist become valid (collaborators of valid artists, two hops). Returns {artist: split}."""
    def artists(row):
        return [a.strip() for a in row["ARTIST"].strip().split(",")]
    split = {}
    for row in metadata:
        for a in artists(row):
            bucket = int(hashlib.sha1(a.lower().encode("utf-8")).hexdigest(), 16) % GS_BUCKETS
            split[a] = "train" if bucket < GS_TRAIN_BUCKETS else "valid"
    for _ in range(2):
        for row in metadata:
            names = artists(row)
            if any(split[a] == "valid" for a in names):
                split.update({a: "valid" for a in names})
    return split, artists


def _gs_audio(root, repo, track_id):
    """The track's mp3 under the root: in its repository's audio/ (audio_dl.sh), else in one audio/ beside the
    repositories (MARBLE's download)."""
    rel = os.path.relpath(os.path.join(repo, "audio", f"{track_id}.LOFI.mp3"), root)
    shared = os.path.join("audio", f"{track_id}.LOFI.mp3")
    if not os.path.exists(os.path.join(root, rel)) and os.path.exists(os.path.join(root, shared)):
        return shared
    return rel


def read_giantsteps(root):
    """Train/valid: giantsteps-mtg-key-dataset's tracks with confidence C == 2 and a single key (no '/'), as
    Korzeniowski & Widmer 2018 (1,159 of 1,486; Jukemir's artist split makes them 923 / 236). Test: all 604 tracks of
    giantsteps-key-dataset, keyed by annotations/key/<id>.LOFI.key. Labels: GS_CLASSES, sharps written as flats."""
    mtg = _gs_repo(root, "giantsteps-mtg-key-dataset")
    test_repo = _gs_repo(root, "giantsteps-key-dataset")
    ann_path = os.path.join(mtg, "annotations", "annotations.txt")
    meta_path = os.path.join(mtg, "annotations", "beatport_metadata.txt")
    annotations = _read_tsv(ann_path, ("ID", "MANUAL KEY", "C"), GS_SOURCE)
    metadata = _read_tsv(meta_path, ("ID", "ARTIST"), GS_SOURCE)
    artist_split, artists = gs_artist_splits([row for _, row in metadata])
    by_id = {row["ID"].strip(): row for _, row in metadata}
    clips = []
    for line_no, row in annotations:
        where = f"{ann_path}:{line_no}"
        track_id, key, conf = row["ID"].strip(), row["MANUAL KEY"].strip(), row["C"].strip()
        if not conf.isdigit():
            raise DataSetError(f"{where}: confidence C {conf!r} is not a number")
        if int(conf) != 2 or "/" in key:  # low confidence or several keys: left out, as Korzeniowski & Widmer
            continue
        if track_id not in by_id:
            raise DataSetError(f"{where}: track {track_id} has no line in {meta_path}")
        split = "valid" if any(artist_split[a] == "valid" for a in artists(by_id[track_id])) else "train"
        clips.append(_clip(root, _gs_audio(root, mtg, track_id), split, gs_key_class(key, where)))
    key_dir = _need(os.path.join(test_repo, "annotations", "key"), "giantsteps-key-dataset's annotations/key/"
                    "<id>.LOFI.key", GS_SOURCE)
    for name in sorted(os.listdir(key_dir)):
        if not name.endswith(".LOFI.key"):
            continue
        path = os.path.join(key_dir, name)
        with open(path, encoding="utf-8") as f:
            key = f.read().strip()  # one line such as "C minor", no trailing newline
        track_id = name[:-len(".LOFI.key")]
        clips.append(_clip(root, _gs_audio(root, test_repo, track_id), "test", gs_key_class(key, path)))
    return Listing(clips, GS_CLASSES)


# ------------------------------------------------------------------------------------------------------------------
# MTG-Jamendo autotagging (Bogdanov et al. 2019), split-0 as MARBLE: the repository's
# data/splits/split-0/autotagging_<subset>-{train,validation,test}.tsv and the audio-low download,
# audio-low/<NN>/<id>.low.mp3 (full tracks). MARBLE's layout: <root>/mtg-jamendo-dataset/ (the clone) and
# <root>/audio-low/.

MTG_SOURCE = ("https://github.com/MTG/mtg-jamendo-dataset (clone it into the root; audio: scripts/download/download.py "
              "--dataset raw_30s --type audio-low <root>/audio-low --unpack)")
MTG_SUBSETS = ("instrument", "moodtheme", "genre", "top50tags")
MTG_COLUMNS = ["TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION", "TAGS"]


def mtg_split_dir(root, split_set="split-0"):
    for repo in (os.path.join(root, "mtg-jamendo-dataset"), root):
        path = os.path.join(repo, "data", "splits", split_set)
        if os.path.isdir(path):
            return path
    return _need(os.path.join(root, "mtg-jamendo-dataset", "data", "splits", split_set),
                 "the mtg-jamendo-dataset repository (data/splits/split-0/autotagging_*.tsv)", MTG_SOURCE)


def read_mtg_tsv(path):
    """[(line number, PATH, [tags])]: the header TRACK_ID ARTIST_ID ALBUM_ID PATH DURATION TAGS, then one track a
    line, its tags tab-separated from the sixth column on (lines end in CRLF as distributed; either ending is read)."""
    _need(path, "an MTG-Jamendo split file (TRACK_ID, ARTIST_ID, ALBUM_ID, PATH, DURATION, TAGS...)", MTG_SOURCE)
    out = []
    with open(path, encoding="utf-8", newline="") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\r\n").split("\t")
            if line_no == 1:
                if fields != MTG_COLUMNS:
                    raise DataSetError(f"{path}:1: expected the header {' '.join(MTG_COLUMNS)} (tab-separated); "
                                       f"found {fields}")
                continue
            tags = [t.strip() for t in fields[5:] if t.strip()]
            if len(fields) < 6 or not tags or "/" not in fields[3]:
                raise DataSetError(f"{path}:{line_no}: expected TRACK_ID, ARTIST_ID, ALBUM_ID, PATH (NN/<id>.mp3), "
                                   f"DURATION and at least one tag; found {fields[:7]}")
            out.append((line_no, fields[3], tags))
    return out


def mtg_low_quality(root):
    """MARBLE reads the audio-low download; only the full-quality one (audio/) there: that one."""
    return os.path.isdir(os.path.join(root, "audio-low")) or not os.path.isdir(os.path.join(root, "audio"))


def mtg_audio(path, low=True):
    """PATH "82/382.mp3" -> "audio-low/82/382.low.mp3" (MARBLE), or "audio/82/382.mp3" (full quality)."""
    if not low:
        return "audio/" + path
    return "audio-low/" + (path[:-len(".mp3")] + ".low.mp3" if path.endswith(".mp3") else path)


def read_mtg(root, subset):
    """subset: instrument | moodtheme | genre | top50tags. Multi-hot labels over the subset's tags in order of first
    appearance over the train, then validation, then test file (MARBLE's class2id): 40 / 56 / 87 / 50 in split-0."""
    if subset not in MTG_SUBSETS:
        raise ValueError(f"MTG-Jamendo subset {subset!r}: expected one of {MTG_SUBSETS}")
    folder = mtg_split_dir(root)
    rows = {split: read_mtg_tsv(os.path.join(folder, f"autotagging_{subset}-{name}.tsv"))
            for split, name in (("train", "train"), ("valid", "validation"), ("test", "test"))}
    tags = {}
    for split in ("train", "valid", "test"):
        for _, _, track_tags in rows[split]:
            for t in track_tags:
                tags.setdefault(t, len(tags))
    clips, low = [], mtg_low_quality(root)
    for split in ("train", "valid", "test"):
        for _, path, track_tags in rows[split]:
            y = np.zeros(len(tags), np.float32)
            y[[tags[t] for t in track_tags]] = 1
            clips.append(_clip(root, mtg_audio(path, low), split, y))
    return Listing(clips, list(tags))


SOURCES = {"nsynth": NSYNTH_SOURCE, "gtzan": GTZAN_SOURCE, "emo": EMO_SOURCE, "vocalset": VOCALSET_SOURCE,
           "mtt": MTT_SOURCE, "giantsteps": GS_SOURCE, "mtg": MTG_SOURCE}
