"""mtg_*: the split-0 TSVs as distributed (CRLF, tags from the sixth column, PATH -> audio-low/NN/ID.low.mp3), the tag
vocabularies by first appearance over train, validation, test, full tracks in 30 s windows with logits averaged per
track, the four tasks sharing one feature store, the task end to end through the command line, and memory that does
not grow with a 10-minute track beyond its decoded audio."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

import probe
from probing import tasks
from data import downstream
from data.audio import load_audio
from probing.features import read_16k

HEADER = "TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_tsv(path, rows):
    """rows: [(track number, [tags])] -> a split file as distributed: tab-separated, CRLF line ends, the tags
    tab-separated from the sixth column on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [HEADER] + [f"track_{n:07d}\tartist_{n % 7:06d}\talbum_{n % 11:06d}\t{n % 100:02d}/{n}.mp3\t{200.5 + n}\t"
                        + "\t".join(tags) for n, tags in rows]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())


# the tracks' tags; the audio of a track carries its first tag (a tone per tag), the others are decoration
INSTRUMENTS = {"instrument---voice": 220.0, "instrument---synthesizer": 330.0, "instrument---guitar": 495.0,
               "instrument---piano": 742.0}
GENRES = {"genre---rock": 220.0, "genre---electronic": 330.0, "genre---pop": 495.0}


def write_mtg(root, seconds=lambda n: 2.0 + n % 3, sr=8000):
    """<root>/mtg-jamendo-dataset/data/splits/split-0/ and <root>/audio-low/NN/<n>.low.mp3 (MARBLE's layout). The
    instrument subset has 24 tracks (12 / 6 / 6), genre 18 of the same tracks plus 3 of its own. Returns the
    {track number: seconds} written."""
    splits = root / "mtg-jamendo-dataset" / "data" / "splits" / "split-0"
    names = list(INSTRUMENTS)
    inst = {s: [(n, [names[n % 4], names[(n + 1) % 4]] if n % 2 else [names[n % 4]]) for n in r]
            for s, r in (("train", range(100, 112)), ("validation", range(112, 118)), ("test", range(118, 124)))}
    gnames = list(GENRES)
    genre = {s: [(n, [gnames[n % 3]]) for n in r]
             for s, r in (("train", list(range(100, 112, 2)) + [130, 131, 132]), ("validation", range(112, 118)),
                          ("test", range(118, 124)))}
    for subset, rows in (("instrument", inst), ("genre", genre), ("moodtheme", genre), ("top50tags", genre)):
        for s, r in rows.items():
            write_tsv(splits / f"autotagging_{subset}-{s}.tsv", r)
    written = {}
    for rows, freqs in ((inst, INSTRUMENTS), (genre, GENRES)):
        for r in rows.values():
            for n, tags in r:
                if n in written:
                    continue
                path = root / "audio-low" / f"{n % 100:02d}" / f"{n}.low.mp3"
                path.parent.mkdir(parents=True, exist_ok=True)
                t = np.arange(int(seconds(n) * sr)) / sr
                x = np.sin(2 * np.pi * freqs[tags[0]] * t) + 0.3 * np.sin(2 * np.pi * 2.01 * freqs[tags[0]] * t)
                sf.write(path, (0.3 * x / np.abs(x).max()).astype(np.float32), sr, format="MP3")
                written[n] = seconds(n)
    return written


def test_split_files_and_vocabulary_order(tmp_path):
    """Tags are read from column 6 on (CRLF stripped); the vocabulary is built by first appearance over the train,
    then the validation, then the test file (MARBLE's class2id), not alphabetically."""
    splits = tmp_path / "mtg-jamendo-dataset" / "data" / "splits" / "split-0"
    write_tsv(splits / "autotagging_moodtheme-train.tsv", [(1, ["mood/theme---happy", "mood/theme---film"]),
                                                           (2, ["mood/theme---calm"])])
    write_tsv(splits / "autotagging_moodtheme-validation.tsv", [(3, ["mood/theme---film", "mood/theme---dark"])])
    write_tsv(splits / "autotagging_moodtheme-test.tsv", [(4, ["mood/theme---action"]), (5, ["mood/theme---calm"])])
    listing = downstream.read_mtg(str(tmp_path), "moodtheme")
    assert listing.labels == ["mood/theme---happy", "mood/theme---film", "mood/theme---calm", "mood/theme---dark",
                              "mood/theme---action"]
    clips = listing.clips
    assert [c.split for c in clips] == ["train", "train", "valid", "test", "test"]
    assert clips[0].key == "audio-low/01/1.low.mp3" and clips[0].path == str(tmp_path / "audio-low/01/1.low.mp3")
    np.testing.assert_array_equal(clips[2].label, [0, 1, 0, 1, 0])
    assert clips[2].label.dtype == np.float32 and not any("\r" in t for t in listing.labels)
    (tmp_path / "audio").mkdir()  # only the full-quality download: audio/NN/<id>.mp3
    assert downstream.read_mtg(str(tmp_path), "moodtheme").clips[0].key == "audio/01/1.mp3"


def test_split_file_errors_name_the_line(tmp_path):
    splits = tmp_path / "data" / "splits" / "split-0"  # the repository clone itself as the root also works
    write_tsv(splits / "autotagging_genre-train.tsv", [(1, ["genre---rock"])])
    write_tsv(splits / "autotagging_genre-validation.tsv", [(2, [])])  # a track without tags
    write_tsv(splits / "autotagging_genre-test.tsv", [(3, ["genre---pop"])])
    with pytest.raises(downstream.DataSetError, match=r"autotagging_genre-validation.tsv:2: expected .* at least one"):
        downstream.read_mtg(str(tmp_path), "genre")
    (splits / "autotagging_genre-validation.tsv").write_text("ID,PATH,TAGS\n")
    with pytest.raises(downstream.DataSetError, match=r"validation.tsv:1: expected the header TRACK_ID"):
        downstream.read_mtg(str(tmp_path), "genre")
    with pytest.raises(downstream.DataSetError, match="mtg-jamendo-dataset"):
        downstream.read_mtg(str(tmp_path / "elsewhere"), "genre")


def test_read_16k_equals_load_audio(tmp_path):
    """The block-wise resampler gives load_audio's samples exactly (whole file and a crop), at several rates."""
    rng = np.random.default_rng(0)
    for sr in (44100, 22050, 48000, 16000):
        x = (0.1 * rng.standard_normal((int(sr * 7.3), 2))).astype(np.float32)
        sf.write(tmp_path / "x.wav", x, sr, subtype="FLOAT")
        np.testing.assert_array_equal(read_16k(tmp_path / "x.wav", block_seconds=1.7), load_audio(tmp_path / "x.wav"))
        np.testing.assert_array_equal(read_16k(tmp_path / "x.wav", frames=50001, block_seconds=0.9),
                                      load_audio(tmp_path / "x.wav", frames=50001))


def test_mtg_end_to_end_and_one_store_for_four_tasks(tmp_path):
    """Full tracks in 30 s windows, the last kept from 1 s (a 61.5 s track: 3 windows; 60.5 s: 2), every window a
    training row of its track and logits averaged per track at evaluation; a second subset over the same tracks
    extracts only the tracks it adds."""
    root = tmp_path / "mtg"
    lengths = {105: 61.5, 106: 60.5}
    write_mtg(root, seconds=lambda n: lengths.get(n, 2.0 + n % 3))
    results = tmp_path / "results.jsonl"
    common = ["--model", "random", "--model-config", "tiny", "--data-root", str(root), "--cache-dir",
              str(tmp_path / "cache"), "--results", str(results), "--device", "cpu", "--epochs", "15",
              "--batch-size", "4", "--lr", "1e-2"]
    r = probe.main(["--task", "mtg_instrument"] + common)["mtg_instrument", "random", probe.SEED]
    assert r["clips"] == r["items"] == {"train": 12, "valid": 6, "test": 6}
    assert r["windows"]["train"] == 12 + 2 + 1  # 61.5 s -> 30 + 30 + 1.5; 60.5 s -> 30 + 30 (0.5 s dropped)
    assert r["extraction"]["window"] == 30.0 and r["extraction"]["min_last"] == 1.0
    assert set(r["metrics"]) == {"roc_auc", "ap"} and r["table"] == ["roc_auc", "ap"]
    assert r["metrics"]["roc_auc"] > 0.75  # four tones, one per first tag
    stores = sorted(p.parent for p in (tmp_path / "cache").rglob("meta.json"))
    assert len(stores) == 1 and stores[0].parts[-3] == "mtg"
    index = [json.loads(line) for line in open(stores[0] / "index.jsonl")]
    assert len(index) == 24 and {e["key"]: e["rows"] for e in index}["audio-low/05/105.low.mp3"] == 3

    g = probe.main(["--task", "mtg_genre"] + common)["mtg_genre", "random", probe.SEED]
    index = [json.loads(line) for line in open(stores[0] / "index.jsonl")]
    assert len(index) == 27  # the genre subset's three own tracks added, the 18 shared ones reused
    assert sorted(p.parent for p in (tmp_path / "cache").rglob("meta.json")) == stores
    assert g["clips"] == {"train": 9, "valid": 6, "test": 6} and len(g["layer_weights"]) == 3
    # the tag list comes from the split files: 3 genres here (87 in split-0 as distributed)
    assert tasks.load_task("mtg_genre", str(root), None)[0].num_classes == 3


MEMORY_CHILD = r"""
import re, sys, threading, time
sys.path.insert(0, {repo!r})
import probe

def rss_anon():
    with open("/proc/self/status") as f:
        return int(re.search(r"RssAnon:\s+(\d+)", f.read()).group(1)) / 1024

peak, stop = [rss_anon()], []
def poll():
    while not stop:
        peak[0] = max(peak[0], rss_anon())
        time.sleep(0.001)
base = rss_anon()
t = threading.Thread(target=poll, daemon=True)
t.start()
probe.main(["--task", "mtg_instrument", "--model", "random", "--model-config", "tiny", "--data-root", {root!r},
            "--cache-dir", {cache!r}, "--results", {results!r}, "--device", "cpu", "--epochs", "1"])
stop.append(1)
t.join()
print("PEAK", max(peak[0], rss_anon()) - base)
"""


def peak_rss_anon_mib(root, tmp):
    code = MEMORY_CHILD.format(repo=REPO, root=str(root), cache=str(tmp / "cache"), results=str(tmp / "r.jsonl"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.split("PEAK")[-1])


@pytest.mark.slow
def test_memory_is_flat_for_a_10_minute_track(tmp_path):
    """A 10-minute track (mono mp3 at 11.025 kHz) among short ones, end to end through the command line in a fresh
    process: its peak private memory (RssAnon, sampled every ms) exceeds that of the same fixture with a 1-minute
    track by no more than the track's decoded audio (its source samples and its 16 kHz copy, float32) plus 32 MiB.
    Holding a window's frame-level states, decoding or resampling the track in float64, or sending all its windows
    through the encoder at once would each cost more."""
    peaks = {}
    for minutes in (1, 10):
        root = tmp_path / f"mtg{minutes}"
        write_mtg(root, seconds=lambda n: 60.0 * minutes if n == 101 else 2.0, sr=11025)
        peaks[minutes] = peak_rss_anon_mib(root, tmp_path / f"run{minutes}")
    decoded = 9 * 60 * (11025 + 16000) * 4 / 2 ** 20  # the 9 extra minutes, source + 16 kHz, float32: 55.7 MiB
    print(f"peak RssAnon over the baseline: 1-minute track {peaks[1]:.0f} MiB, 10-minute {peaks[10]:.0f} MiB")
    assert peaks[10] - peaks[1] <= decoded + 32, peaks
