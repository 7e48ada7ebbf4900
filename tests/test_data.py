"""Tests for data/: audio loading, manifests, labels, the pre-training pipeline and the synthetic corpora."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.signal import resample_poly

from data.audio import AudioError, audio_info, load_audio
from data.dataset import (AudioClips, ClipBatchSampler, LabelError, collate_crop, collate_pad, crop_labels,
                          default_stats_path, file_mean_std, load_labels, make_loader, read_file_stats,
                          split_by_duration, whole_file_stats)
from data.manifest import ManifestError, build_manifest, read_manifest, write_manifest
from data.synth import FAMILIES, make_instrument, midi_to_hz, render_note, write_corpus, write_nsynth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _noise(n, channels=1, seed=0):
    x = np.random.default_rng(seed).uniform(-0.5, 0.5, size=(n, channels)).astype(np.float32)
    return x[:, 0] if channels == 1 else x


# ------------------------------------------------------------------------------------------------ audio
def test_stereo_44k_loads_as_mono_16k(tmp_path):
    x = _noise(44100 * 2 + 123, channels=2)
    path = tmp_path / "stereo.wav"
    sf.write(path, x, 44100, subtype="FLOAT")
    y = load_audio(path)
    expected = resample_poly(x.mean(axis=1), 160, 441)  # 16000/44100 = 160/441
    assert y.dtype == np.float32 and y.ndim == 1
    assert len(y) == int(np.ceil((44100 * 2 + 123) * 160 / 441)) == audio_info(path)[0]
    np.testing.assert_allclose(y, expected, atol=1e-6)
    assert audio_info(path)[1:] == (44100, 2)


def test_partial_read_equals_slice_of_full_read(tmp_path):
    path = tmp_path / "a.flac"
    sf.write(path, _noise(44100 * 3, channels=2), 44100)
    full = load_audio(path)
    for start, frames in [(0, 1000), (12345, 16000), (len(full) - 500, 16000)]:
        part = load_audio(path, start=start, frames=frames)
        np.testing.assert_allclose(part, full[start:start + frames], atol=1e-6)
    assert len(load_audio(path, start=len(full) - 500, frames=16000)) == 500  # runs past the end: no padding
    with pytest.raises(AudioError, match="outside the file"):
        load_audio(path, start=len(full))


def test_16k_file_is_read_unchanged(tmp_path):
    x = _noise(20000)
    sf.write(tmp_path / "a.wav", x, 16000, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "a.wav", start=100, frames=50), x[100:150])


def test_mp3_loads(tmp_path):
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile cannot write mp3")
    t = np.arange(48000) / 48000
    sf.write(tmp_path / "a.mp3", (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 48000)
    y = load_audio(tmp_path / "a.mp3")
    assert len(y) == audio_info(tmp_path / "a.mp3")[0]
    assert 15500 < len(y) < 17500  # 1 s plus the encoder's padding
    spectrum = np.abs(np.fft.rfft(y[2000:2000 + 8000]))
    assert abs(np.argmax(spectrum) * 16000 / 8000 - 440) <= 2  # the tone survived decoding and resampling


@pytest.mark.parametrize("sr, channels, level", [(44100, 1, None), (22050, 2, 0.99)])
def test_mp3_crop_equals_slice_of_whole_decode(tmp_path, sr, channels, level):
    """After a seek, libsndfile 1.2.2 / mpg123 decode frames whose main data lies in the emptied bit reservoir as
    silence (a LAME pure tone: ~2,000 zeros, then a fade-in; at 22.05 kHz and 8 kbps, ~45 frames of it). A crop must
    still be the slice of the whole-file decode: load_audio decodes from mp3_seek_margin earlier (data/audio.py).
    mpg123's synthesis filter sums in an order that a seek can shift, so the two agree to float32 rounding (the
    largest difference measured over all MPEG rates is 2.4e-7), not always bit for bit."""
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile cannot write mp3")
    t = np.arange(sr * 8) / sr
    x = 0.5 * np.sin(2 * np.pi * 440 * t) if channels == 1 else 0.3 * np.stack(
        [np.random.default_rng(0).standard_normal(len(t)), np.sin(2 * np.pi * 330 * t)], 1)
    path = tmp_path / "a.mp3"
    sf.write(path, x.astype(np.float32), sr, **({} if level is None else dict(compression_level=level)))
    whole = sf.read(path, dtype="float32", always_2d=True)[0].mean(axis=1)
    for start in range(1, len(whole) - sr, 18401):  # many frame phases, the file's start, middle and end
        crop = load_audio(path, sr=sr, start=start, frames=sr // 2)
        np.testing.assert_allclose(crop, whole[start:start + len(crop)], rtol=0, atol=1e-6, err_msg=f"start {start}")
    full = load_audio(path)  # resampled to 16 kHz: crops of the 16 kHz signal too
    for start in (123, 40000, len(full) - 8000):
        np.testing.assert_allclose(load_audio(path, start=start, frames=16000), full[start:start + 16000], atol=1e-6)


def test_bad_files_raise_audio_error_naming_the_path(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunkjunkjunk" * 10)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    nan = tmp_path / "nan.wav"
    x = _noise(4000)
    x[100] = np.nan
    sf.write(nan, x, 16000, subtype="FLOAT")
    short = tmp_path / "short.wav"
    sf.write(short, _noise(100), 16000)
    for path, reason in [(corrupt, "unreadable or corrupt"), (empty, "empty"), (nan, "non-finite"),
                         (tmp_path / "missing.wav", "unreadable")]:
        with pytest.raises(AudioError, match=reason) as e:
            load_audio(path)
        assert str(e.value).startswith(str(path) + ":")
    with pytest.raises(AudioError, match="too short"):
        load_audio(short, min_samples=1600)
    with pytest.raises(AudioError, match="empty"):
        audio_info(empty)


# ------------------------------------------------------------------------------------------------ manifest
def test_manifest_round_trip(tmp_path):
    entries = [("a/b.wav", 32000), ("c.flac", 16001)]
    write_manifest(tmp_path / "m.tsv", "/data/root", entries)
    assert (tmp_path / "m.tsv").read_text() == "/data/root\na/b.wav\t32000\nc.flac\t16001\n"
    assert read_manifest(tmp_path / "m.tsv") == ("/data/root", entries)


@pytest.mark.parametrize("text, where, what", [
    ("", ":1:", "missing root"),
    ("/root\na.wav\t100\nb.wav\n", ":3:", "expected 2 tab-separated columns"),
    ("/root\na.wav\t100\nb.wav\t1.5e4\n", ":3:", "must be an integer"),
    ("/root\na.wav 100\n", ":2:", "found 1"),
])
def test_manifest_errors_name_file_and_line(tmp_path, text, where, what):
    path = tmp_path / "bad.tsv"
    path.write_text(text)
    with pytest.raises(ManifestError, match=what) as e:
        read_manifest(path)
    assert str(e.value).startswith(f"{path}{where}")


def _audio_dir(tmp_path):
    d = tmp_path / "audio"
    (d / "sub").mkdir(parents=True)
    sf.write(d / "one.wav", _noise(16000), 16000)
    sf.write(d / "sub" / "two.flac", _noise(44100, channels=2), 44100)
    sf.write(d / "sub" / "three.ogg", _noise(8000), 8000)
    (d / "broken.wav").write_bytes(b"not audio at all")
    (d / "notes.txt").write_text("ignored: not an audio extension")
    return d


def test_build_manifest_lists_bad_files_in_skipped(tmp_path):
    d = _audio_dir(tmp_path)
    out = str(tmp_path / "m" / "train.tsv")
    train, valid, skipped = build_manifest(str(d), out, workers=1, progress=False)
    root, entries = read_manifest(out)
    assert root == os.path.realpath(d)
    assert entries == [("one.wav", 16000), ("sub/three.ogg", 16000), ("sub/two.flac", 16000)]  # sorted
    assert valid == [] and not os.path.exists(tmp_path / "m" / "valid.tsv")
    lines = open(out + ".skipped").read().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{root}/broken.wav\t") and "corrupt" in lines[0]


def test_manifest_cli_with_valid_split(tmp_path):
    d = _audio_dir(tmp_path)
    for i in range(7):
        sf.write(d / f"extra{i}.wav", _noise(1600 * (i + 1)), 16000)
    out = tmp_path / "m" / "train.tsv"
    args = [sys.executable, "data/manifest.py", str(d), "--out", str(out), "--valid-percent", "20", "--workers", "2"]
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 unreadable files skipped" in r.stderr
    _, train = read_manifest(out)
    _, valid = read_manifest(tmp_path / "m" / "valid.tsv")
    assert len(valid) == 2 and len(train) == 8 and not set(train) & set(valid)
    assert sorted(train) == train and sorted(valid) == valid
    subprocess.run(args, cwd=REPO, capture_output=True, check=True, timeout=120)
    assert read_manifest(tmp_path / "m" / "valid.tsv")[1] == valid  # same seed, same split


def test_manifest_of_several_folders_has_their_common_root(tmp_path):
    songs, notes = tmp_path / "corpus" / "songs", tmp_path / "corpus" / "notes" / "train"
    for d, names in ((songs, ["b.wav", "a.flac"]), (notes, ["n1.wav"]), (tmp_path / "corpus" / "notes", ["x.wav"])):
        d.mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            sf.write(d / name, _noise(1600 * (i + 1)), 16000)
    out = str(tmp_path / "m.tsv")
    # notes/train lies inside notes: its file is listed once; x.wav (in notes, not given) only through notes
    build_manifest([str(songs), str(notes), str(tmp_path / "corpus" / "notes")], out, workers=1, progress=False)
    root, entries = read_manifest(out)
    assert root == os.path.realpath(tmp_path / "corpus")
    assert entries == [("notes/train/n1.wav", 1600), ("notes/x.wav", 1600), ("songs/a.flac", 3200),
                       ("songs/b.wav", 1600)]
    with pytest.raises(FileNotFoundError, match="nowhere: not a folder"):
        build_manifest([str(songs), str(tmp_path / "nowhere")], out, workers=1, progress=False)


# ------------------------------------------------------------------------------------------------ labels
def test_load_labels_checks_count_and_length(tmp_path):
    entries = [("a.wav", 32000), ("b.wav", 16000)]  # 2 s and 1 s -> 100 and 50 labels at 50 Hz
    km = tmp_path / "train.km"
    km.write_text(" ".join(["3"] * 100) + "\n" + " ".join(["7"] * 53) + "\n")  # 53: within 0.1 s = 5 labels
    labels = load_labels(km, entries, 50)
    assert [len(x) for x in labels] == [100, 53] and labels[1][0] == 7
    km.write_text(" ".join(["3"] * 100) + "\n" + " ".join(["7"] * 56) + "\n")
    with pytest.raises(LabelError, match=r"train.km:2: 56 labels for b.wav"):
        load_labels(km, entries, 50)
    with pytest.raises(LabelError, match="1 label lines but the manifest has 2"):
        km.write_text(" ".join(["3"] * 100) + "\n")
        load_labels(km, entries, 50)
    with pytest.raises(LabelError, match=r"train.km:2: labels must be space-separated integers"):
        km.write_text(" ".join(["3"] * 100) + "\n" + "1 2 x\n")
        load_labels(km, entries, 50)


def test_crop_labels_hand_computed():
    labels = np.arange(100)
    # 100 Hz labels, crop at 3200 samples (0.2 s -> label 20) for 16000 samples (100 labels), clipped to 80
    np.testing.assert_array_equal(crop_labels(labels, 3200, 16000, 100), np.arange(20, 100))
    # 50 Hz: offset 330 -> round(1.03125) = 1, length 1000 samples -> round(3.125) = 3
    np.testing.assert_array_equal(crop_labels(labels, 330, 1000, 50), [1, 2, 3])
    # offset 170 -> round(0.53125) = 1, length 480 -> round(1.5) = 2 (round half to even)
    np.testing.assert_array_equal(crop_labels(labels, 170, 480, 50), [1, 2])


# ------------------------------------------------------------------------------------------------ dataset
def _ramp_corpus(tmp_path, seconds=(3.0, 2.5, 4.0, 1.0, 2.2), label_rate=50):
    """Clips whose sample i holds i / 1e6 (float wav, exact), so a crop tells where it came from; labels = frame
    index + 1000 * clip."""
    entries = []
    for i, s in enumerate(seconds):
        n = int(s * 16000)
        sf.write(tmp_path / f"c{i}.wav", (np.arange(n) / 1e6).astype(np.float32), 16000, subtype="FLOAT")
        entries.append((f"c{i}.wav", n))
    write_manifest(tmp_path / "train.tsv", str(tmp_path), entries)
    with open(tmp_path / "train.km", "w") as f:
        for i, (_, n) in enumerate(entries):
            f.write(" ".join(str(1000 * i + j) for j in range(int(n * label_rate / 16000))) + "\n")
    return str(tmp_path / "train.tsv"), str(tmp_path / "train.km")


def _offset_of(wav_row):
    return int(round(float(wav_row[0]) * 1e6))


def test_audio_clips_crop_is_a_function_of_seed_epoch_index(tmp_path):
    tsv, km = _ramp_corpus(tmp_path)
    ds = AudioClips(tsv, crop_seconds=2.0, min_seconds=2.0, labels=km, label_rate=50, seed=3)
    assert len(ds) == 4 and ds.paths == ["c0.wav", "c1.wav", "c2.wav", "c4.wav"]  # the 1 s clip is left out
    assert ds.lengths.tolist() == [32000] * 4
    index, wav, offset, labels = ds[2]  # the 4 s clip
    assert index == 2 and len(wav) == 32000 and 0 <= offset <= 32000
    np.testing.assert_array_equal(wav.numpy(), (np.arange(offset, offset + 32000) / 1e6).astype(np.float32))
    start = int(round(offset * 50 / 16000))
    np.testing.assert_array_equal(labels.numpy(), 2000 + np.arange(start, min(200, start + 102)))  # 2 spares
    assert labels.dtype == torch.int64
    assert ds[2][2] == offset  # same epoch: same crop
    offsets = []
    for e in range(6):
        ds.set_epoch(e)
        offsets.append(ds[2][2])
    assert len(set(offsets)) > 1  # a new crop each epoch
    other = AudioClips(tsv, crop_seconds=2.0, labels=km, label_rate=50, seed=3)  # e.g. another worker
    other.set_epoch(5)
    assert other[2][2] == offsets[5]
    other.seed = 4
    assert [other[i][2] for i in range(4)] != [ds[i][2] for i in range(4)]
    whole = AudioClips(tsv, crop_seconds=None)
    assert [len(whole[i][1]) for i in range(4)] == [48000, 40000, 64000, 35200]


def test_skip_bad_audio_replaces_deterministically(tmp_path):
    tsv, _ = _ramp_corpus(tmp_path)
    (tmp_path / "c1.wav").write_bytes(b"garbage")
    with pytest.raises(AudioError, match="c1.wav"):
        AudioClips(tsv, crop_seconds=2.0)[1]
    ds = AudioClips(tsv, crop_seconds=2.0, skip_bad_audio=True)
    first = ds[1]
    assert first[0] != 1 and ds.num_bad >= 1
    assert ds[1][0] == first[0]


# ------------------------------------------------------------------------------------- whole-file normalisation
def _loud_quiet_corpus(tmp_path):
    """A 6 s file: 3 s of noise at 0.5 then 3 s at 0.01 (a chorus and a quiet intro, reversed), and two others."""
    rng = np.random.default_rng(0)
    loud_quiet = np.concatenate([0.5 * rng.standard_normal(48000), 0.01 * rng.standard_normal(48000)]) + 0.2
    sf.write(tmp_path / "a.wav", loud_quiet.astype(np.float32), 16000, subtype="FLOAT")
    sf.write(tmp_path / "b.wav", (0.1 * rng.standard_normal(40000)).astype(np.float32), 16000, subtype="FLOAT")
    # 44.1 kHz stereo: the statistics are those of what load_audio returns (mono, resampled)
    sf.write(tmp_path / "c.wav", (0.3 * rng.standard_normal((44100 * 3, 2))).astype(np.float32), 44100,
             subtype="FLOAT")
    entries = [(name, audio_info(tmp_path / name)[0]) for name in ("a.wav", "b.wav", "c.wav")]
    write_manifest(tmp_path / "train.tsv", str(tmp_path), entries)
    return str(tmp_path / "train.tsv"), loud_quiet


def test_file_mean_std_reads_blocks_and_equals_the_whole_file(tmp_path):
    tsv, _ = _loud_quiet_corpus(tmp_path)
    for name in ("a.wav", "c.wav"):
        whole = load_audio(tmp_path / name).astype(np.float64)
        mean, std = file_mean_std(tmp_path / name, block_seconds=0.7)  # several blocks, the last one short
        assert mean == pytest.approx(whole.mean(), rel=1e-9, abs=1e-12)
        assert std == pytest.approx(whole.std(), rel=1e-9)


def test_crop_of_the_quiet_half_keeps_the_whole_files_scale(tmp_path):
    tsv, loud_quiet = _loud_quiet_corpus(tmp_path)
    stats, errors = whole_file_stats(tsv, default_stats_path(tsv), progress=False)
    assert not errors and stats.shape == (3, 2)
    ds = AudioClips(tsv, crop_seconds=2.0, seed=0, file_stats=stats)
    quiet, loud = None, None
    for epoch in range(40):  # find a crop inside each half
        ds.set_epoch(epoch)
        _, wav, offset, _ = ds[0]
        if offset >= 48000:
            quiet = (wav.numpy(), offset)
        elif offset + 32000 <= 48000:
            loud = (wav.numpy(), offset)
    assert quiet is not None and loud is not None
    mean, std = loud_quiet.mean(), loud_quiet.std()
    for wav, offset in (quiet, loud):
        np.testing.assert_allclose(wav, (loud_quiet[offset:offset + 32000] - mean) / np.sqrt(std ** 2 + 1e-5),
                                   rtol=1e-4, atol=1e-5)
    # the quiet half stays quiet (per-crop normalisation would have blown it up to std 1) and the file as a whole
    # has zero mean and unit variance
    assert quiet[0].std() == pytest.approx(0.01 / std, rel=0.1) and quiet[0].std() < 0.05
    assert loud[0].std() == pytest.approx(0.5 / std, rel=0.1)
    plain = AudioClips(tsv, crop_seconds=2.0, seed=0)  # without statistics: the file's samples as they are
    plain.set_epoch(0)
    ds.set_epoch(0)
    np.testing.assert_allclose(ds[0][1].numpy(), (plain[0][1].numpy() - mean) / np.sqrt(std ** 2 + 1e-5),
                               rtol=1e-4, atol=1e-5)


def test_whole_file_stats_are_cached_resumed_and_refreshed(tmp_path, monkeypatch):
    import data.dataset as dataset
    tsv, _ = _loud_quiet_corpus(tmp_path)
    path = default_stats_path(tsv)
    assert path == str(tmp_path / "train.stats.tsv")
    computed = []
    real = dataset.file_mean_std
    monkeypatch.setattr(dataset, "file_mean_std", lambda p: computed.append(os.path.basename(p)) or real(p))
    first, _ = whole_file_stats(tsv, path, progress=False)
    assert sorted(computed) == ["a.wav", "b.wav", "c.wav"]
    assert not any(name.startswith("train.stats.tsv.") for name in os.listdir(tmp_path))  # partials merged
    lines = open(path).read().splitlines()
    assert lines[0] == str(tmp_path) and lines[1].startswith("a.wav\t96000\t")
    computed.clear()
    again, _ = whole_file_stats(tsv, path, progress=False)  # cached: nothing is decoded
    assert computed == [] and np.array_equal(first, again)
    # an interrupted pass: the stats file lost b and c; a partial file from the killed run still has c (and a
    # half-written line); a changed file (other sample count) is recomputed
    with open(path, "w") as f:
        f.write(lines[0] + "\n" + lines[1] + "\n")
    with open(path + ".part0", "w") as f:
        f.write(lines[0] + "\n" + lines[3] + "\n" + "b.wav\t400")
    resumed, _ = whole_file_stats(tsv, path, progress=False)
    assert computed == ["b.wav"] and np.array_equal(resumed, first)
    root, entries = read_manifest(tsv)
    write_manifest(tsv, root, [entries[0], ("b.wav", entries[1][1] + 1), entries[2]])
    computed.clear()
    whole_file_stats(tsv, path, progress=False)
    assert computed == ["b.wav"]
    with open(path, "a") as f:
        f.write("junk line\n")
    with pytest.raises(ValueError, match=r"train.stats.tsv:5: expected 4 tab-separated columns"):
        read_file_stats(path, root, entries)


def test_whole_file_stats_split_over_ranks(tmp_path, monkeypatch):
    """Two ranks (threads with an all_gather made of a barrier): each file is decoded once, by one rank, and both
    ranks return the same statistics."""
    import threading
    import data.dataset as dataset
    tsv, _ = _loud_quiet_corpus(tmp_path)
    assert split_by_duration([0, 1, 2], [96000, 40000, 48000], 2) == [[0], [2, 1]]
    computed = []
    real = dataset.file_mean_std
    monkeypatch.setattr(dataset, "file_mean_std", lambda p: computed.append(os.path.basename(p)) or real(p))
    slots, barrier = [None, None], threading.Barrier(2)

    def make_all_gather(rank):
        def all_gather(obj):
            barrier.wait()
            slots[rank] = obj
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out
        return all_gather

    results = [None, None]

    def rank_main(rank):
        results[rank] = whole_file_stats(tsv, default_stats_path(tsv), rank=rank, world_size=2,
                                         all_gather=make_all_gather(rank), progress=False)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None for r in results), "a rank raised: see the thread's exception above"
    assert sorted(computed) == ["a.wav", "b.wav", "c.wav"]
    assert np.array_equal(results[0][0], results[1][0]) and not np.isnan(results[0][0]).any()
    single, _ = whole_file_stats(tsv, str(tmp_path / "single.tsv"), progress=False)
    np.testing.assert_allclose(results[0][0], single, rtol=1e-12)


def test_whole_file_stats_name_unreadable_files(tmp_path):
    tsv, _ = _loud_quiet_corpus(tmp_path)
    (tmp_path / "b.wav").write_bytes(b"garbage")
    stats, errors = whole_file_stats(tsv, default_stats_path(tsv), progress=False)
    assert list(errors) == [1] and "b.wav" in errors[1] and np.isnan(stats[1]).all()
    assert "b.wav" not in open(default_stats_path(tsv)).read()  # failures are not cached: a fixed file is retried
    with pytest.raises(AudioError, match=r"b.wav: no whole-file statistics \(unreadable"):
        AudioClips(tsv, crop_seconds=1.0, file_stats=stats, file_stats_errors=errors)[1]
    skipping = AudioClips(tsv, crop_seconds=1.0, file_stats=stats, file_stats_errors=errors, skip_bad_audio=True)
    assert skipping[1][0] != 1
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if not os.access(read_only, os.W_OK):  # (root ignores permissions)
        with pytest.raises(OSError, match="cannot write whole-file statistics there"):
            whole_file_stats(tsv, str(read_only / "s.tsv"), progress=False)


def _items(ds, indices):
    return [ds[i] for i in indices]


def test_collate_crop_crops_to_shortest_with_aligned_labels(tmp_path):
    tsv, km = _ramp_corpus(tmp_path)
    ds = AudioClips(tsv, crop_seconds=3.0, labels=km, label_rate=50, seed=0)
    items = _items(ds, [0, 1, 2, 3])  # 3 s, 2.5 s, 3 s of 4 s, 2.2 s
    batch = collate_crop(items, label_rate=50)
    assert batch["wav"].shape == (4, 35200) and batch["lengths"] is None
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["labels"].shape == (4, 110)  # round(35200 * 50 / 16000)
    for row, clip in enumerate([0, 1, 2, 4]):
        start = _offset_of(batch["wav"][row])
        assert start == batch["offset"][row]
        np.testing.assert_array_equal(batch["wav"][row].numpy(),
                                      (np.arange(start, start + 35200) / 1e6).astype(np.float32))
        # fairseq: labels from round(start * 50 / 16000), 110 of them, clipped to the clip's labels
        n_labels = int(ds.num_samples[row] * 50 / 16000)
        expect = np.arange(int(round(start * 50 / 16000)), n_labels)[:110] + 1000 * clip
        got = batch["labels"][row].numpy()
        np.testing.assert_array_equal(got[:len(expect)], expect)
        assert (got[len(expect):] == -1).all()
    assert collate_crop(items, label_rate=50)["offset"].tolist() == batch["offset"].tolist()  # deterministic
    with pytest.raises(ValueError, match="label_rate"):
        collate_crop(items)


def test_collate_crop_labels_equal_a_direct_crop_of_the_file_labels():
    """Item crop then batch crop must give the labels fairseq gives for one crop at the combined offset: no
    off-by-one from rounding twice (e.g. offsets 160 + 160 at 50 Hz: round(0.5) + round(0.5) = 0 but round(1) = 1)."""
    rng = np.random.default_rng(0)
    file_labels = torch.arange(2000)  # 50 Hz labels of a 40 s file
    for trial in range(30):
        items = []
        for i in range(4):
            offset = int(rng.integers(0, 300000)) // 160 * 160 + int(rng.integers(0, 2)) * 160  # near .5 ties
            n = int(rng.integers(16000, 19000))
            wav = torch.from_numpy((np.arange(offset, offset + n) / 1e6).astype(np.float32))
            spare = file_labels[int(round(offset * 50 / 16000)):][:int(round(n * 50 / 16000)) + 2]  # as AudioClips
            items.append((i, wav, offset, spare))
        batch = collate_crop(items, label_rate=50)
        size = batch["wav"].shape[1]
        for row in range(4):
            start = int(batch["offset"][row])
            assert _offset_of(batch["wav"][row]) == start
            expect = crop_labels(file_labels.numpy(), start, size, 50)
            assert batch["labels"][row].tolist() == expect.tolist(), (trial, row)


def test_collate_pad(tmp_path):
    tsv, km = _ramp_corpus(tmp_path)
    ds = AudioClips(tsv, crop_seconds=None, labels=km, label_rate=50)
    batch = collate_pad(_items(ds, [1, 3]), label_rate=50)  # 2.5 s and 2.2 s
    assert batch["wav"].shape == (2, 40000) and batch["lengths"].tolist() == [40000, 35200]
    assert (batch["wav"][1, 35200:] == 0).all() and batch["wav"][1, 35199] > 0
    assert batch["labels"].shape == (2, 125)
    assert batch["labels"][1, :110].tolist() == list(range(4000, 4110)) and (batch["labels"][1, 110:] == -1).all()
    assert collate_pad(_items(AudioClips(tsv, crop_seconds=None), [0, 1]))["labels"] is None


# ------------------------------------------------------------------------------------------------ sampler
def _epoch(sampler, epoch, start_batch=0):
    sampler.set_epoch(epoch, start_batch)
    return list(sampler)


def test_sampler_deterministic_and_ranks_disjoint():
    n, bs, world = 103, 4, 3
    samplers = [ClipBatchSampler(n, bs, num_replicas=world, rank=r, seed=7) for r in range(world)]
    per_rank = [_epoch(s, 2) for s in samplers]
    assert [len(b) for b in per_rank] == [8, 8, 8] == [len(s) for s in samplers]  # 103 // 4 = 25 -> 8 per rank
    flat = [i for batches in per_rank for b in batches for i in b]
    assert len(flat) == len(set(flat)) == 96 and all(len(b) == bs for bs_ in per_rank for b in bs_)
    assert _epoch(ClipBatchSampler(n, bs, num_replicas=world, rank=1, seed=7), 2) == per_rank[1]
    assert _epoch(samplers[1], 3) != per_rank[1]
    assert _epoch(ClipBatchSampler(n, bs, shuffle=False), 0)[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    padded = [_epoch(ClipBatchSampler(10, 4, num_replicas=2, rank=r, drop_last=False), 0) for r in range(2)]
    assert [len(p) for p in padded] == [2, 2]  # 3 batches (last has 2 items), one repeated to even the ranks
    assert set(i for p in padded for b in p for i in b) == set(range(10))


def test_sampler_resume_skips_consumed_batches():
    s = ClipBatchSampler(50, 4, seed=1)
    full = _epoch(s, 4)
    assert _epoch(s, 4, start_batch=5) == full[5:] and len(s) == len(full) - 5
    assert _epoch(s, 5) != full and len(s) == len(full)  # the next epoch starts from its first batch


def test_sampler_group_by_length():
    lengths = np.random.default_rng(0).integers(16000, 160000, size=64)
    batches = _epoch(ClipBatchSampler(lengths, 8, group_by_length=True, seed=0), 0)
    assert sorted(i for b in batches for i in b) == list(range(64))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 0.25 * np.ptp(lengths)  # similar lengths together (random batches: ~0.75)
    assert [min(lengths[b]) for b in batches] != sorted(min(lengths[b]) for b in batches)  # batch order shuffled
    with pytest.raises(ValueError, match="lengths"):
        ClipBatchSampler(64, 8, group_by_length=True)


def test_loader_with_workers_matches_single_process(tmp_path):
    tsv, km = _ramp_corpus(tmp_path, seconds=[2.0 + 0.3 * i for i in range(8)])
    ds = AudioClips(tsv, crop_seconds=2.0, labels=km, label_rate=50, seed=1)
    sampler = ClipBatchSampler(ds.lengths, 2, seed=1)
    runs = []
    for workers in (0, 2):
        ds.set_epoch(1)
        sampler.set_epoch(1)
        runs.append([(b["index"].tolist(), b["offset"].tolist(), b["labels"].tolist())
                     for b in make_loader(ds, sampler, collate_crop, num_workers=workers, seed=1)])
    assert runs[0] == runs[1] and len(runs[0]) == 4


# ------------------------------------------------------------------------------------------------ synth
def test_synth_corpus_is_deterministic(tmp_path):
    hours = 4 * 2.0 / 3600  # four 2 s clips
    for name in ("a", "b"):
        write_corpus(str(tmp_path / name), hours, clip_seconds=2.0, seed=5, valid_percent=25, workers=2,
                     progress=False)
    write_corpus(str(tmp_path / "c"), hours, clip_seconds=2.0, seed=6, valid_percent=25, workers=2, progress=False)
    root, train = read_manifest(tmp_path / "a" / "train.tsv")
    _, valid = read_manifest(tmp_path / "a" / "valid.tsv")
    assert root == os.path.realpath(tmp_path / "a") and len(train) == 3 and len(valid) == 1
    assert all(n == 32000 for _, n in train + valid)
    for rel, _ in train + valid:
        a, b, c = ((tmp_path / d / rel).read_bytes() for d in "abc")
        assert a == b and a != c
    assert read_manifest(tmp_path / "b" / "train.tsv")[1] == train
    x, sr = sf.read(tmp_path / "a" / train[0][0])
    assert sr == 16000 and x.ndim == 1 and 0.05 < np.abs(x).max() <= 1.0 and sf.info(
        tmp_path / "a" / train[0][0]).subtype == "PCM_16"


def test_synth_cli_runs_from_repo_root(tmp_path):
    r = subprocess.run([sys.executable, "data/synth.py", str(tmp_path / "s"), "--hours", str(2 / 3600),
                        "--clip-seconds", "1", "--valid-percent", "50", "--nsynth", "3", "--workers", "1"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(read_manifest(tmp_path / "s" / "train.tsv")[1]) == 1
    assert len(json.load(open(tmp_path / "s" / "nsynth" / "nsynth-test" / "examples.json"))) == 3


def test_nsynth_examples_match_audio(tmp_path):
    write_nsynth(str(tmp_path), 40, 12, 12, seed=0, workers=2)
    fields = {"note", "note_str", "instrument", "instrument_str", "instrument_family", "instrument_family_str",
              "instrument_source", "instrument_source_str", "pitch", "velocity", "sample_rate", "qualities",
              "qualities_str"}
    instruments = {}
    for split, count in (("train", 40), ("valid", 12), ("test", 12)):
        examples = json.load(open(tmp_path / f"nsynth-{split}" / "examples.json"))
        wavs = sorted(os.listdir(tmp_path / f"nsynth-{split}" / "audio"))
        assert len(examples) == count and wavs == sorted(k + ".wav" for k in examples)
        for key, ex in examples.items():
            assert set(ex) == fields and ex["note_str"] == key
            assert key == f"{ex['instrument_str']}-{ex['pitch']:03d}-{ex['velocity']:03d}"
            assert FAMILIES[ex["instrument_family"]] == ex["instrument_family_str"]
            assert ex["instrument_str"].startswith(ex["instrument_family_str"] + "_" + ex["instrument_source_str"])
            assert 36 <= ex["pitch"] <= 84 and ex["sample_rate"] == 16000 and len(ex["qualities"]) == 10
        instruments[split] = {ex["instrument_str"] for ex in examples.values()}
        info = sf.info(tmp_path / f"nsynth-{split}" / "audio" / wavs[0])
        assert (info.frames, info.samplerate, info.channels) == (64000, 16000, 1)
    assert not instruments["train"] & (instruments["valid"] | instruments["test"])  # as in NSynth


@pytest.mark.parametrize("family", ["organ", "flute", "reed", "string", "brass"])
def test_note_pitch_is_right(family):
    """The pitch task is only learnable if notes sound at their MIDI pitch: the strongest partial of these
    harmonic families sits at f0 or a low multiple of it, and the spectrum repeats every f0."""
    rng = np.random.default_rng(1)
    inst = make_instrument(family, rng)
    midi = 57  # 220 Hz
    x = render_note(inst, midi, 2.0, 100, rng)[2000:2000 + 16000].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))  # 1 Hz bins
    peaks = np.argsort(spectrum)[-3:]
    f0 = midi_to_hz(midi)
    for p in peaks:
        assert abs(p / f0 - round(p / f0)) < 0.03 and round(p / f0) >= 1, (family, p)


def test_families_differ_in_spectrum():
    """Different families must be distinguishable: odd/even harmonic balance separates reed from string."""
    rng = np.random.default_rng(2)

    def even_odd_ratio(family):
        x = render_note(make_instrument(family, rng), 45, 2.0, 100, rng)[2000:18000].astype(np.float64)
        spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
        f0 = midi_to_hz(45)
        amp = [spec[int(round(k * f0)) - 3:int(round(k * f0)) + 4].max() for k in range(1, 9)]
        return sum(amp[1::2]) / sum(amp[0::2])

    assert even_odd_ratio("reed") < 0.5 * even_odd_ratio("string")
