"""gs_key: the GiantSteps readers (filter, sharps as flats, Jukemir's artist split with its two hops), the 30 s windows
normalised one by one, the four song-level ensembles and the choice of ensemble on validation (hand-computed), and
the task end to end through the command line on a fixture in the two repositories' layout."""
import json
import os
import shutil

import mir_eval
import numpy as np
import pytest
import soundfile as sf
import torch

import probe
from probing import tasks
import probing.clips as pc
import probing.metrics as pm
from data import downstream
from probing.features import Extraction, clip_windows

META_HEADER = ["ID", "ARTIST", "SONG TITLE", "MIX", "LABEL", "BP GENRE", "BP BPM", "BP KEY"]
# (id, ARTIST, MANUAL KEY, C). Jukemir's buckets (sha1 of the lowercased name mod 116, >= 100 valid): "Artist 0"
# 112 and "Artist 2" 102 are valid, the other names below are train. Row order matters for the two hops.
MTG_KEY_TRACKS = [
    (201, "Artist 9, Artist 11", "C major", 1),   # low confidence: left out (but its artists are in the split)
    (202, "Artist 11, Artist 13", "A minor", 2),  # second hop: Artist 13 -> Artist 11 -> valid
    (203, "Artist 13, Artist 0", "C major", 2),   # Artist 0 is valid -> Artist 13 valid on the first pass
    (204, "Artist 9", "A minor", 2),             # third hop (via 201) is never taken: train
    (205, "Artist 11", "C major", 2),            # valid through its own artist
    (206, "Artist 2", "C# minor", 2),            # valid by hash; sharp -> Db minor
    (207, "Artist 1", "C major", 2),
    (208, "Artist 3", "A minor", 2),
    (209, "Artist 5", "C# minor", 2),
    (210, "Artist 7", "Eb major", 2),
    (211, "Artist 1, Artist 3", "Eb major", 2),
    (212, "Artist 5", "G minor / C# minor", 2),  # two keys: left out
    (213, "Artist 7", "-", 0),                   # no key
    (214, "Artist 4", "A minor", 2),
    (215, "Artist 6", "C major", 2),
    (216, "Artist 8", "Db minor", 2),
]
EXPECTED_SPLIT = {202: "valid", 203: "valid", 204: "train", 205: "valid", 206: "valid", 207: "train", 208: "train",
                  209: "train", 210: "train", 211: "train", 214: "train", 215: "train", 216: "train"}
TEST_TRACKS = [(301, "C major"), (302, "A minor"), (303, "Db minor"), (304, "Eb major"), (305, "A minor"),
               (306, "C major")]
FREQ = {"C major": 262.0, "A minor": 440.0, "Db minor": 139.0, "Eb major": 311.0}


def write_giantsteps(root, seconds=6.5, shared_audio=False, test_repo="giantsteps-key-dataset"):
    """The two GitHub repositories as cloned (annotations as distributed: TSVs with LF, .key files without a
    newline), each with audio/<id>.LOFI.mp3 as its audio_dl.sh writes them, or MARBLE's one audio/ folder beside
    them. Tracks of one key share one recording (8 kHz mp3 keeps the fixture fast). Returns {id: audio path}."""
    mtg, test = root / "giantsteps-mtg-key-dataset", root / test_repo
    (mtg / "annotations").mkdir(parents=True)
    (test / "annotations" / "key").mkdir(parents=True)
    with open(mtg / "annotations" / "annotations.txt", "w") as f:
        f.write("ID\tMANUAL KEY\tC\n" + "".join(f"{i}\t{k}\t{c}\n" for i, _, k, c in MTG_KEY_TRACKS))
    with open(mtg / "annotations" / "beatport_metadata.txt", "w", encoding="utf-8") as f:
        f.write("\t".join(META_HEADER) + "\n" + "".join(
            f"{i}\t{a}\tSong {i}\tOriginal Mix\tLabel\tTechno\t128\tC major\n" for i, a, _, _ in MTG_KEY_TRACKS))
    for i, key in TEST_TRACKS:
        (test / "annotations" / "key" / f"{i}.LOFI.key").write_text(key)
    recordings, paths = {}, {}
    for folder, tracks in ((mtg, [(i, k) for i, _, k, _ in MTG_KEY_TRACKS]), (test, TEST_TRACKS)):
        for i, key in tracks:
            key = key.replace("C#", "Db")
            audio_dir = (root if shared_audio else folder) / "audio"
            audio_dir.mkdir(exist_ok=True)
            path = audio_dir / f"{i}.LOFI.mp3"
            if key not in FREQ:
                continue  # left-out tracks need no audio
            if key not in recordings:
                t = np.arange(int(seconds * 8000)) / 8000
                x = sum(np.sin(2 * np.pi * FREQ[key] * h * t) / h for h in (1, 2, 3)).astype(np.float32)
                sf.write(path, 0.3 * x / np.abs(x).max(), 8000, format="MP3")
                recordings[key] = path
            else:
                shutil.copy(recordings[key], path)
            paths[i] = path
    return paths


def test_reader_filter_flats_and_artist_split(tmp_path):
    write_giantsteps(tmp_path, test_repo="giantsteps-key-dataset-c8cb8aad2cb53f165be51ea099d0dc75c64a844f")
    listing = downstream.read_giantsteps(str(tmp_path))
    assert listing.labels[:2] == ["C major", "Db major"] and listing.labels[12] == "C minor"
    assert len(listing.labels) == 24
    assert listing.labels == pm.KEY_CLASSES
    by_id = {int(os.path.basename(c.key).split(".")[0]): c for c in listing.clips}
    got = {i: c.split for i, c in by_id.items() if c.split != "test"}
    assert got == EXPECTED_SPLIT  # C == 2 and one key only; collaborators of valid artists valid, two hops
    assert by_id[206].label == listing.labels.index("Db minor") and by_id[216].label == by_id[206].label
    assert {i for i, c in by_id.items() if c.split == "test"} == {i for i, _ in TEST_TRACKS}
    assert by_id[303].label == listing.labels.index("Db minor")  # a .key file without a newline
    # the clip keys are the files' paths under the root, in the repositories the annotations came from
    assert by_id[207].key == "giantsteps-mtg-key-dataset/audio/207.LOFI.mp3"
    assert by_id[301].key.startswith("giantsteps-key-dataset-c8cb8aad")  # a GitHub archive's folder name


def test_reader_finds_marbles_shared_audio_folder(tmp_path):
    write_giantsteps(tmp_path, shared_audio=True)
    clips = downstream.read_giantsteps(str(tmp_path)).clips
    assert all(c.key.startswith("audio/") and os.path.isfile(c.path) for c in clips)


def test_reader_names_the_bad_line(tmp_path):
    write_giantsteps(tmp_path)
    path = tmp_path / "giantsteps-mtg-key-dataset" / "annotations" / "annotations.txt"
    good = path.read_text()
    path.write_text(good.replace("208\tA minor\t2", "208\tH minor\t2"))
    with pytest.raises(downstream.DataSetError, match=r"annotations.txt:9: key 'H minor'"):
        downstream.read_giantsteps(str(tmp_path))
    path.write_text(good)
    shutil.rmtree(tmp_path / "giantsteps-key-dataset")
    with pytest.raises(downstream.DataSetError, match="giantsteps-key-dataset"):
        downstream.read_giantsteps(str(tmp_path))


def test_windows_are_whole_30s_pieces_each_normalised(tmp_path):
    """MARBLE cuts each track into 30 s files (ffmpeg), drops a partial last one, and the extractor z-normalises
    each file: a quiet first half and a loud second half both come out with unit variance."""
    sr = 16000
    x = np.r_[0.01 * np.random.default_rng(0).standard_normal(30 * sr),
              0.5 * np.random.default_rng(1).standard_normal(45 * sr)].astype(np.float32)  # 75 s
    sf.write(tmp_path / "t.wav", x, sr, subtype="FLOAT")
    ext = tasks.TASKS["gs_key"].extraction
    windows = clip_windows(str(tmp_path / "t.wav"), ext)
    assert [len(w) for w in windows] == [30 * sr, 30 * sr]  # 75 s: two windows, the 15 s rest dropped
    for w in windows:
        # unit variance but for the 1e-7 added to it
        assert abs(float(w.mean())) < 1e-5 and float(w.std()) == pytest.approx(1.0, abs=1e-3)
    whole = clip_windows(str(tmp_path / "t.wav"), Extraction())  # normalised once per clip, as the other tasks
    assert float(whole[0].std()) < 0.1 and len(whole) == 3
    # whole within 0.1 s: MARBLE measures a track by ffprobe's duration, which counts the mp3's delay and padding
    for seconds, n in ((59.95, 2), (59.85, 1)):
        sf.write(tmp_path / "u.wav", x[:int(seconds * sr)], sr, subtype="FLOAT")
        assert len(clip_windows(str(tmp_path / "u.wav"), ext)) == n


def test_weighted_score_table_is_mir_evals():
    W = pm.key_weights()
    i = pm.KEY_CLASSES.index
    assert W[i("C major"), i("G major")] == 0.5 and W[i("C major"), i("A minor")] == 0.3
    assert W[i("C major"), i("C minor")] == 0.2 and W[i("A minor"), i("E minor")] == 0.5
    assert W[i("C major"), i("F major")] == 0.0  # a fourth above: the score is not symmetric
    assert W[i("Gb minor"), i("Db minor")] == mir_eval.key.weighted_score("Gb minor", "Db minor") == 0.5
    assert np.all(np.diag(W) == 1.0)


def logits_for(rows):
    """[(class name, value), ...] per window -> [W, 24] logits, -10 elsewhere."""
    out = np.full((len(rows), 24), -10.0)
    for w, row in enumerate(rows):
        for name, v in row:
            out[w, pm.KEY_CLASSES.index(name)] = v
    return out


def split_of(song_keys, owner):
    y = torch.tensor([pm.KEY_CLASSES.index(song_keys[o]) for o in owner])
    return pc.SplitData(np.arange(len(owner)), np.ones(len(owner), np.int64), y, np.asarray(owner))


def test_ensembles_and_the_choice_on_validation_by_hand():
    """Each ensemble worked out by hand; the test figure is the ensemble best on validation (gmean here), not the
    one best on test (vote), as MARBLE's test_ensemble_score_val-select."""
    names = tasks.TASKS["gs_key"].metrics
    # valid song 0, C major: windows C(1) G(5) C(1): vote C 1.0, max G 0.5 (a fifth), gmean C 1.0, mean C 1.0
    # valid song 1, A minor: windows E-min(3.0)/A-min(2.9), A-min(3.5): the vote ties 1-1 and scipy.stats.mode's
    # smallest class wins: E minor (16 < 21), 0.5; max, gmean and mean give A minor, 1.0
    valid_logits = logits_for([[("C major", 1)], [("G major", 5)], [("C major", 1)],
                               [("E minor", 3.0), ("A minor", 2.9)], [("A minor", 3.5)]])
    valid = split_of(["C major", "A minor"], [0, 0, 0, 1, 1])
    preds = pm.song_predictions(valid_logits, valid.owner, 2)
    assert [pm.KEY_CLASSES[c] for c in preds["vote"]] == ["C major", "E minor"]
    assert [pm.KEY_CLASSES[c] for c in preds["max"]] == ["G major", "A minor"]
    v = pm.key_metrics(valid_logits, valid, names)
    assert (v["weighted_vote"], v["weighted_max"], v["weighted_gmean"], v["weighted_mean"]) == (0.75, 0.75, 1.0, 1.0)
    assert v["weighted"] == 1.0 and v["acc"] == 1.0 and v["clip_acc"] == pytest.approx(3 / 5)
    # test song 0, F minor: F-min(1) F-min(1) Ab-maj(20): vote F-min 1.0, max Ab 0.3, gmean Ab (0 > -8/3) 0.3,
    # mean F-min 1.0; test song 1, D major: D(1) D(1) D-min(30): vote 1.0, max 0.2, gmean 0.2, mean 1.0
    test_logits = logits_for([[("F minor", 1)], [("F minor", 1)], [("Ab major", 20)],
                              [("D major", 1)], [("D major", 1)], [("D minor", 30)]])
    test = split_of(["F minor", "D major"], [0, 0, 0, 1, 1, 1])
    t = pm.key_metrics(test_logits, test, names, valid=v)
    assert (t["weighted_vote"], t["weighted_max"], t["weighted_gmean"], t["weighted_mean"]) == pytest.approx(
        (1.0, 0.25, 0.25, 1.0))
    assert t["weighted"] == pytest.approx(0.25) and t["acc"] == 0.0  # gmean, chosen on valid (first of gmean/mean)
    assert t["clip_acc"] == pytest.approx(4 / 6)
    assert pm.key_metrics(test_logits, test, ("weighted",))["weighted"] == 1.0  # its own best would be vote
    # the monitored metric of several heads at once is each head's best ensemble on that split
    task = tasks.TASKS["gs_key"]
    assert pm.monitored(task, np.stack([valid_logits, -valid_logits]), valid)[0] == 1.0


def test_gs_key_end_to_end(tmp_path):
    """Through the command line (--window 3 keeps the fixture small: the rule is the same, whole windows only):
    every window a training item, songs ensembled; a track shorter than one window is reported and left out."""
    root = tmp_path / "giantsteps"
    paths = write_giantsteps(root)
    short = paths[306]
    os.remove(short)
    t = np.arange(int(2.0 * 8000)) / 8000
    sf.write(short, (0.3 * np.sin(2 * np.pi * 262 * t)).astype(np.float32), 8000, format="MP3")  # 2 s < 3 s
    results = tmp_path / "results.jsonl"
    records = probe.main(["--task", "gs_key", "--model", "random", "--model-config", "tiny", "--data-root",
                          str(root), "--cache-dir", str(tmp_path / "cache"), "--results", str(results), "--device",
                          "cpu", "--window", "3", "--epochs", "12", "--batch-size", "4", "--lr", "1e-2"])
    r = records["gs_key", "random", probe.SEED]
    assert r["extraction"]["window"] == 3.0 and r["extraction"]["min_last"] == pytest.approx(2.9)
    assert r["extraction"]["normalize"] == "window" and r["item"] == "window"
    assert r["clips"] == {"train": 9, "valid": 4, "test": 5}  # 306 is too short
    assert r["windows"] == r["items"] == {"train": 18, "valid": 8, "test": 10}  # 6.5 s: two whole 3 s windows
    assert len(r["skipped"]) == 1 and "306.LOFI.mp3: too short" in r["skipped"][0]
    m, v = r["metrics"], r["valid"]
    chosen = max(pm.ENSEMBLES, key=lambda s: v[f"weighted_{s}"])
    assert v["weighted"] == v[f"weighted_{chosen}"] and m["weighted"] == m[f"weighted_{chosen}"]
    songs = 5
    assert m["weighted"] * songs * 10 == pytest.approx(round(m["weighted"] * songs * 10))  # tenths per song
    assert 0.0 <= m["weighted"] <= 1.0 and r["table"] == ["weighted"]
    line = json.loads(results.read_text().splitlines()[-1])
    assert line["metrics"] == m
