"""probing/features.py: windows as MARBLE cuts them, one waveform normalisation per clip, the cache key, the feature
store (resume, errors) and the memory of head training on a large store."""
import dataclasses
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.signal import resample_poly

import probe
from probing import models, runs, tasks
import probing.clips as pc
import probing.features as pf
from data import downstream
from model import Encoder, EncoderConfig

SR = 16000


def tone(freq, seconds, sr, harmonics=1, seed=0):
    t = np.arange(int(seconds * sr)) / sr
    x = sum(np.sin(2 * np.pi * freq * k * t) / k for k in range(1, harmonics + 1))
    x = x + 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def write(path, x, sr=SR):
    sf.write(path, x, sr, subtype="FLOAT")
    return str(path)


def tiny_encoder(seed=0, **overrides):
    torch.manual_seed(seed)
    return Encoder(EncoderConfig.hubert_base(**{**models.TINY, **overrides})).eval()


# ------------------------------------------------------------------------------------------------------------------
# windows

def test_windows_follow_marble(tmp_path):
    wav = np.random.default_rng(0).standard_normal(int(61.5 * SR)).astype(np.float32) * 0.1 + 0.05
    path = write(tmp_path / "a.wav", wav)
    w = pf.clip_windows(path, pf.Extraction())
    assert [len(x) for x in w] == [30 * SR, 30 * SR, int(1.5 * SR)]  # last window >= 1 s is kept as it is
    whole = np.concatenate(w)  # z-normalised over the whole clip, before cutting
    assert abs(whole.mean()) < 1e-3 and abs(whole.std() - 1) < 1e-3
    np.testing.assert_allclose(whole, (wav - wav.mean()) / np.sqrt(wav.var() + 1e-7), atol=1e-4)
    short = write(tmp_path / "b.wav", wav[: int(60.5 * SR)])
    assert len(pf.clip_windows(short, pf.Extraction())) == 2  # a 0.5 s last window is dropped


def test_emo_windows_paper_and_music2vec_config(tmp_path):
    """Point 4: EMO defaults to 5 s windows over the first 30 s (paper text, MARBLE's EMO base config); --window 30
    --crop 0 is MARBLE's Music2Vec config: 30 s + 15 s over the 45 s clip."""
    wav = tone(220, 45.0, SR, harmonics=3)
    wav[: 10 * SR] *= 0.1
    path = write(tmp_path / "emo.wav", wav)
    ext = tasks.TASKS["emo"].extraction
    w = pf.clip_windows(path, ext)
    assert [len(x) for x in w] == [5 * SR] * 6
    whole = np.concatenate(w)  # the 30 s crop is normalised as one clip
    assert abs(whole.std() - 1) < 1e-3 and w[0].std() < 0.2
    args = probe.parse_args(["--task", "emo", "--model", "random", "--data-root", "x", "--window", "30", "--crop",
                             "0"])
    m2v = runs.task_extraction(tasks.TASKS["emo"], args)
    assert (m2v.window, m2v.crop) == (30.0, None)
    assert [len(x) for x in pf.clip_windows(path, m2v)] == [30 * SR, 15 * SR]


def test_vocalset_chunks_follow_marble(tmp_path):
    """Point 1: chunks of sr // 1000 * 3000 = 132,000 samples at 44.1 kHz, cut while the rest is strictly longer
    than a chunk (so exactly one chunk's length gives none), each resampled to 16 kHz alone and z-normalised."""
    chunk = downstream.VOCALSET_CHUNK
    assert chunk == 132000
    for n, want in ((chunk, 0), (chunk + 1, 1), (2 * chunk, 1), (2 * chunk + 1, 2), (3 * chunk + 500, 3)):
        assert len(pf.vocalset_chunks(np.zeros(n), 44100, 3.0)) == want
    voice = tone(300, 6.4, 44100, harmonics=3) * np.linspace(0.2, 1, int(6.4 * 44100), dtype=np.float32)
    path = write(tmp_path / "v.wav", np.r_[np.zeros(int(0.3 * 44100), np.float32), voice], sr=44100)
    w = pf.clip_windows(path, tasks.VOCALSET)
    trimmed = pf.trim_leading_silence(pf.load_audio(path, sr=44100), frame=882)
    assert len(voice) <= len(trimmed) < len(voice) + 882
    assert len(w) == 2 and all(len(x) == 47892 for x in w)  # ceil(132000 * 160 / 441)
    for i, x in enumerate(w):
        ref = resample_poly(trimmed[i * chunk:(i + 1) * chunk], 160, 441)
        np.testing.assert_allclose(x, (ref - ref.mean()) / np.sqrt(ref.var() + 1e-7), atol=1e-4)


def test_trim_leading_silence():
    voice = tone(200, 2.0, SR)
    x = np.r_[np.zeros(int(0.5 * SR), np.float32), voice]
    trimmed = pf.trim_leading_silence(x)
    assert len(voice) <= len(trimmed) < len(voice) + 320  # cut to within one 20 ms frame of the onset
    assert len(pf.trim_leading_silence(voice)) == len(voice)


def test_pooled_hidden_states_equal_each_window_alone():
    enc = tiny_encoder()
    rng = np.random.default_rng(0)
    windows = [rng.standard_normal(n).astype(np.float32) for n in (16000, 9000, 12345)]
    batched = pf.pooled_hidden_states(enc, windows, "cpu")
    for i, w in enumerate(windows):
        alone = pf.pooled_hidden_states(enc, [w], "cpu")
        torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-4, rtol=1e-4)
    assert batched.shape == (3, enc.cfg.layers + 1, enc.cfg.dim)


def test_one_normalisation_per_clip_even_for_normalising_encoders(tmp_path):
    """Point 2: MARBLE z-normalises the whole clip once, then cuts windows. An encoder whose config normalises its
    input (data2vec, or a HF folder with do_normalize) must not renormalise each window there: a clip whose first
    half is 60 dB quieter (a quiet intro) keeps a quiet first window, and its features are those of the
    clip-normalised audio. (The conv front end's norms make features nearly scale-invariant, so the difference
    shows in near-silent windows, where the norms' eps takes over.)"""
    torch.manual_seed(0)
    enc = Encoder(EncoderConfig.data2vec_base(**models.TINY)).eval()
    assert enc.cfg.normalize_waveform
    x = tone(330, 2.0, SR, harmonics=4)
    x[:SR] *= 1e-3
    path = write(tmp_path / "clip.wav", x)
    ext = pf.Extraction(window=1.0)
    w = pf.clip_windows(path, ext)
    assert len(w) == 2 and w[0].std() < 0.01 * w[1].std()  # normalised as a whole: the quiet half stays quiet
    key = pf.cache_key("d2v", ext)
    clip = downstream.Clip("clip.wav", path, "train", 0)
    assert pf.extract(ext, [clip], enc, str(tmp_path / "store"), key, "cpu", 60) == {}
    stored = torch.from_numpy(np.array(pf.FeatureStore(str(tmp_path / "store"), key).array())).float()

    def pooled(window, normalize):
        with torch.no_grad():
            out = enc(torch.from_numpy(window)[None], normalize=normalize)
        return torch.stack(out.hidden_states, 1).mean(2)[0]

    once = torch.stack([pooled(v, False) for v in w])
    renormalised = torch.stack([pooled(v, None) for v in w])  # the encoder's own per-window normalisation
    torch.testing.assert_close(stored, once, atol=2e-2, rtol=2e-3)  # float16 storage
    assert (stored[0] - renormalised[0]).abs().max() > 0.2  # 0.42 of features up to 4.2
    assert (stored[0] - renormalised[0]).abs().max() > 50 * (stored[0] - once[0]).abs().max()


# ------------------------------------------------------------------------------------------------------------------
# cache key and store

def test_cache_key_covers_every_setting(tmp_path):
    """Point 6: the model, every extraction setting (window, last-window rule, crop, normalisation, trimming, cut,
    pooling), the sample rate and the format version are in the key; changing any one gives another store."""
    ext = pf.Extraction()
    key = pf.cache_key("m", ext)
    assert set(key) == {"format", "model", "sample_rate", "dtype"} | {f.name for f in dataclasses.fields(ext)}
    changed = dict(model="m2", format=pf.FORMAT_VERSION + 1, sample_rate=24000, dtype="float32", window=5.0,
                   min_last=3.0, crop=30.0, normalize="window", trim="leading_silence", cut="vocalset",
                   cut_rate=44100, pooling="max")
    assert set(changed) == set(key)
    paths = {pf.store_path("c", "f", key)}
    for field, value in changed.items():
        paths.add(pf.store_path("c", "f", {**key, field: value}))
    assert len(paths) == len(changed) + 1


def test_changed_settings_reextract(tmp_path, monkeypatch):
    enc = tiny_encoder()
    path = write(tmp_path / "a.wav", tone(220, 3.5, SR))
    clips = [downstream.Clip("a.wav", path, "train", 0)]

    def run(ext, tag="m"):
        key = pf.cache_key(tag, ext)
        where = pf.store_path(str(tmp_path / "cache"), "f", key)
        pf.extract(ext, clips, enc, where, key, "cpu", 60)
        return where, pf.FeatureStore(where, key)

    base, store = run(pf.Extraction(window=1.0))
    mtime = os.stat(os.path.join(base, "features.f16")).st_mtime_ns
    assert run(pf.Extraction(window=1.0))[0] == base  # same settings: reused, nothing written
    assert os.stat(os.path.join(base, "features.f16")).st_mtime_ns == mtime and store.rows == 3  # 0.5 s left over
    variants = [pf.Extraction(window=2.0), pf.Extraction(window=1.0, min_last=0.4),
                pf.Extraction(window=1.0, crop=2.0), pf.Extraction(window=1.0, normalize="window"),
                pf.Extraction(window=1.0, trim="leading_silence")]
    rows = []
    for ext in variants:
        where, s = run(ext)
        assert where != base
        rows.append(s.rows)
    assert rows == [2, 4, 2, 3, 3]  # 2 + 1.5 s; the 0.5 s rest kept; 2 s crop; same windows, other features
    assert run(pf.Extraction(window=1.0), tag="other model")[0] != base
    monkeypatch.setattr(pf, "FORMAT_VERSION", pf.FORMAT_VERSION + 1)
    assert run(pf.Extraction(window=1.0))[0] != base


def test_extract_splits_long_clips_over_batches(tmp_path):
    """A clip with more windows than one batch holds is cut over several encoder calls; the stored rows equal the
    windows run together, and a clip without a window is reported, not stored."""
    enc = tiny_encoder()
    ext = pf.Extraction(window=1.0, min_last=0.75)
    long_path = write(tmp_path / "long.wav", tone(300, 3.8, SR, harmonics=3))  # windows of 1, 1, 1 and 0.8 s
    short_path = write(tmp_path / "short.wav", tone(300, 0.5, SR))
    clips = [downstream.Clip("long.wav", long_path, "train", 0), downstream.Clip("short.wav", short_path, "train", 1)]
    key = pf.cache_key("m", ext)
    failed = pf.extract(ext, clips, enc, str(tmp_path / "s"), key, "cpu", batch_seconds=1.5)
    assert list(failed) == ["short.wav"] and short_path in failed["short.wav"] and "0.75 s" in failed["short.wav"]
    store = pf.FeatureStore(str(tmp_path / "s"), key)
    assert store.index == {"long.wav": (0, 4)}
    windows = pf.clip_windows(long_path, ext)
    assert [len(w) for w in windows] == [SR, SR, SR, int(0.8 * SR)]
    np.testing.assert_allclose(np.array(store.array(), np.float32),
                               pf.pooled_hidden_states(enc, windows, "cpu").numpy(), atol=2e-3, rtol=2e-3)
    starts, counts, owner = store.item_rows(["long.wav"], "window")
    assert list(starts) == [0, 1, 2, 3] and list(counts) == [1] * 4 and list(owner) == [0] * 4


def test_store_errors_name_the_file(tmp_path):
    key = pf.cache_key("m", pf.Extraction())
    s = pf.FeatureStore(str(tmp_path / "s"), key, (2, 4), write=True)
    s.append([("a", np.ones((3, 2, 4), np.float32)), ("b", np.ones((1, 2, 4), np.float32))])
    with pytest.raises(pf.StoreError, match="another process"):
        pf.FeatureStore(str(tmp_path / "s"), key, (2, 4), write=True)
    s.close()
    with pytest.raises(pf.StoreError, match="meta.json: written for"):
        pf.FeatureStore(str(tmp_path / "s"), pf.cache_key("other", pf.Extraction()))
    with open(tmp_path / "s" / "features.f16", "r+b") as f:
        f.truncate(10)
    with pytest.raises(pf.StoreError, match="features.f16: 10 bytes, but .*index.jsonl lists 4 rows"):
        pf.FeatureStore(str(tmp_path / "s"), key)


def test_second_writer_waits_for_the_first(tmp_path):
    """Two runs extracting the same features (say nsynth_pitch and nsynth_instr side by side): the second waits for
    the first's lock and then finds its clips already there."""
    import threading
    key = pf.cache_key("m", pf.Extraction())
    first = pf.FeatureStore(str(tmp_path / "s"), key, (2, 4), write=True)
    said, seen = [], []

    def second():
        s = pf.FeatureStore(str(tmp_path / "s"), key, (2, 4), write=True, wait=said.append)
        seen.append(dict(s.index))
        s.close()

    t = threading.Thread(target=second)
    t.start()
    t.join(0.5)
    assert t.is_alive() and said and "waiting" in said[0]
    first.append([("a", np.ones((3, 2, 4), np.float32))])
    first.close()
    t.join(10)
    assert seen == [{"a": (0, 3)}]


def rss_anon_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_head_training_memory_does_not_grow_with_windows(tmp_path):
    """Point 7: heads train from the memmap in batches; the process's private memory (RssAnon; mapped file pages
    do not count) must not grow by anything like the features' size (100k windows: 154 MB as float32)."""
    S, D, per_clip, n_clips = 3, 128, 10, 10000
    key = pf.cache_key("m", pf.Extraction())
    store = pf.FeatureStore(str(tmp_path / "s"), key, (S, D), write=True)
    rng = np.random.default_rng(0)
    for c0 in range(0, n_clips, 1000):
        store.append([(f"clip{c}", rng.standard_normal((per_clip, S, D), dtype=np.float32))
                      for c in range(c0, c0 + 1000)])
    store.close()
    store = pf.FeatureStore(str(tmp_path / "s"), key)
    assert store.rows == 100_000
    task = tasks.Task(reader=None, kind="multiclass", num_classes=4, metrics=("acc",), epochs=1, patience=1,
                      plateau_patience=1)
    split = lambda a, b: pc.SplitData(*store.item_rows([f"clip{c}" for c in range(a, b)])[:2],
                                         torch.from_numpy(rng.integers(0, 4, b - a)))
    data = {"train": split(0, 9600), "valid": split(9600, 9800), "test": split(9800, 10000)}
    rows = pf.Rows(store, "cpu", 0)
    warm = {s: pc.SplitData(d.starts[:50], d.counts[:50], d.y[:50]) for s, d in data.items()}
    pc.train_heads(task, rows, warm, ["all"], [1e-3], 1, 0, "cpu", log=lambda *a: None)  # first-use allocations
    before, peak = rss_anon_kib(), [0]

    def sampled(r):
        peak[0] = max(peak[0], rss_anon_kib())
        return rows(r)

    pc.train_heads(task, sampled, data, ["all"], [1e-3], 1, 0, "cpu", log=lambda *a: None)
    growth_mib = (max(peak[0], rss_anon_kib()) - before) / 1024
    float32_mib = store.rows * S * D * 4 / 2 ** 20
    print(f"RssAnon growth {growth_mib:.1f} MiB (float32 features {float32_mib:.0f} MiB)")
    assert growth_mib < 40, f"RssAnon grew {growth_mib:.0f} MiB during training (features: {float32_mib:.0f} MiB)"
