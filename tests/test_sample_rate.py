"""Pre-training at the model's own sample rate (24 kHz, as MERT-v1: 75 Hz frames): manifests counted at the rate,
MFCC at the rate, HuBERT labels aligned at 75 Hz, a 24 kHz run of each objective that resumes exactly, and
checkpoints of another rate refused in one line.

The corpus is data/synth.py's 16 kHz songs with a manifest counted at 24 kHz (data/manifest.py --sample-rate 24000):
every stage then reads them resampled to 24 kHz, as it would real files at 44.1 kHz.
"""
import importlib
import json
import os
import sys

import numpy as np
import pytest
import torch

import kmeans
from data.dataset import AudioClips, LabelError, load_labels
from data.manifest import ManifestError, build_manifest, check_sample_counts, read_manifest
from model import EncoderConfig

RATE = 24000
K = 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """16 kHz songs; manifests at 16 and 24 kHz (both train.tsv, in their own folders); 100 Hz MFCC k-means labels
    computed at 24 kHz."""
    from data.synth import write_corpus
    root = tmp_path_factory.mktemp("corpus24k")
    write_corpus(str(root / "synth"), hours=24 * 2.0 / 3600, clip_seconds=2.0, seed=0, valid_percent=0.0,
                 workers=1, progress=False)
    tsv24 = str(root / "m24" / "train.tsv")
    build_manifest(str(root / "synth" / "audio"), tsv24, workers=1, progress=False, sample_rate=RATE)
    kmeans.main(["features", "--manifest", tsv24, "--out", str(root / "mfcc"), "--workers", "0",
                 "--sample-rate", str(RATE)])
    kmeans.main(["fit", str(root / "mfcc"), "--k", str(K), "--out", str(root / "km.pt"), "--seed", "0"])
    kmeans.main(["label", str(root / "mfcc"), "--km", str(root / "km.pt"), "--out", str(root / "labels")])
    return {"root": root, "tsv": tsv24, "tsv16": str(root / "synth" / "train.tsv"), "labels": str(root / "labels"),
            "mfcc": str(root / "mfcc")}


def run_script(name, argv):
    """main() of a pretrain script in this process, its globals fresh (reloaded before and after)."""
    script = importlib.import_module(name)
    script = importlib.reload(script)
    old = sys.argv
    sys.argv = [name + ".py"] + argv
    try:
        script.main()
    finally:
        sys.argv = old
        importlib.reload(script)


def args(d):
    return [f"--{k}={v}" for k, v in d.items()]


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_state(out_dir):
    import training
    return training.load_checkpoint(training.latest_checkpoint(str(out_dir)))


def tensors(state, parts):
    return {f"{p}.{k}": v for p in parts for k, v in (state[p].items() if isinstance(state[p], dict)
                                                       else [("", state[p])])}


def assert_same_run(full, part, parts):
    """The resumed run logged the same figures and ended with the same weights and optimiser moments."""
    a, b = read_log(full), read_log(part)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    volatile = ("clips/s", "audio_h/s", "mfu")
    for ra, rb in zip(a, b):  # compared as JSON text: a NaN figure (not yet measured) equals itself
        assert json.dumps({k: v for k, v in ra.items() if k not in volatile}) == json.dumps(
            {k: v for k, v in rb.items() if k not in volatile})
    sa, sb = final_state(full), final_state(part)
    assert sa["step"] == sb["step"] == 6
    ta, tb = tensors(sa, parts), tensors(sb, parts)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), "weights differ"
    for ma, mb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert torch.equal(ma["exp_avg_sq"], mb["exp_avg_sq"])
    return sb


def assert_24k_checkpoint(state, out_dir):
    """encoder_config says 24 kHz, its frames are 75 Hz, and load_pretrained gives a 24 kHz encoder."""
    from model import load_pretrained
    import training
    assert state["encoder_config"]["sample_rate"] == RATE
    enc = load_pretrained(training.latest_checkpoint(str(out_dir)))
    assert enc.cfg.sample_rate == RATE and enc.cfg.frame_rate == 75.0
    assert enc.num_frames(2 * RATE) == 149  # 2 s of 24 kHz audio: 1 + (48000 - 400) // 320 frames


# ------------------------------------------------------------------------------------------------ data pieces

def test_manifest_counts_at_the_rate_and_another_rate_is_refused(corpus):
    root16, e16 = read_manifest(corpus["tsv16"])
    root24, e24 = read_manifest(corpus["tsv"])
    assert [p for p, _ in e24] == [p.split("/", 1)[1] for p, _ in e16]  # the same files (root: the audio folder)
    assert [n for _, n in e24] == [n * 3 // 2 for _, n in e16]  # 2 s: 32,000 samples at 16 kHz, 48,000 at 24 kHz
    check_sample_counts(corpus["tsv"], root24, e24, RATE)
    check_sample_counts(corpus["tsv16"], root16, e16, 16000)
    with pytest.raises(ManifestError) as e:
        check_sample_counts(corpus["tsv16"], root16, e16, RATE)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(corpus["tsv16"] + ":2: ")
    assert "48000 samples at 24000 Hz" in msg and "says 32000" in msg and "16000 Hz" in msg
    assert "--sample-rate 24000" in msg
    with pytest.raises(ManifestError, match=r"counted at about 24000 Hz"):
        check_sample_counts(corpus["tsv"], root24, e24, 16000)


def test_manifest_cli_sample_rate(corpus, tmp_path, capsys):
    from data import manifest
    out = str(tmp_path / "m.tsv")
    manifest.main([str(corpus["root"] / "synth" / "audio"), "--out", out, "--workers", "1", "--sample-rate", "24000"])
    assert read_manifest(out) == read_manifest(corpus["tsv"])
    assert "(0.01 h)" in capsys.readouterr().out  # 24 x 2 s, measured at the manifest's rate


def test_dataset_reads_and_crops_at_the_rate(corpus):
    from data.audio import load_audio
    clips = AudioClips(corpus["tsv"], crop_seconds=1.5, min_seconds=1.0, seed=0, sample_rate=RATE)
    assert clips.crop_samples == 36000 and clips.min_samples == 24000
    index, wav, offset, _ = clips[3]
    assert wav.shape == (36000,) and 0 <= offset <= 48000 - 36000
    whole = load_audio(os.path.join(clips.root, clips.paths[3]), RATE)
    assert torch.equal(wav, torch.from_numpy(whole[offset:offset + 36000]))


def test_mfcc_at_24k_matches_kaldi_native_fbank():
    """The 25 ms window and 10 ms hop stay in ms: 600 / 240 samples and a 1024-point FFT at 24 kHz (Kaldi)."""
    from test_kmeans import tone_clip
    knf = pytest.importorskip("kaldi_native_fbank")
    wav = np.concatenate([tone_clip(18517, 330.0, 0), np.zeros(3000, np.float32),
                          0.9 * np.sign(tone_clip(4501, 1234.0, 1))])
    opts = knf.MfccOptions()
    opts.frame_opts.samp_freq = RATE
    for key, value in dict(dither=0.0, frame_length_ms=25, frame_shift_ms=10, preemph_coeff=0.97,
                           remove_dc_offset=True, window_type="povey", round_to_power_of_two=True,
                           snip_edges=True).items():
        setattr(opts.frame_opts, key, value)
    opts.mel_opts.num_bins, opts.mel_opts.low_freq, opts.mel_opts.high_freq = 23, 20, 0
    opts.num_ceps, opts.use_energy, opts.raw_energy, opts.cepstral_lifter = 13, False, True, 22
    m = knf.OnlineMfcc(opts)
    m.accept_waveform(RATE, wav.tolist())
    m.input_finished()
    ref = np.stack([np.asarray(m.get_frame(i)) for i in range(m.num_frames_ready)])
    ours = kmeans.mfcc(torch.from_numpy(wav), 13, sample_rate=RATE).numpy()
    assert kmeans.mfcc_frame_sizes(RATE) == (600, 240, 1024) and kmeans.mfcc_frame_sizes(16000) == (400, 160, 512)
    assert ours.shape == ref.shape == (1 + (len(wav) - 600) // 240, 13)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-3)
    # the 16 kHz path is the one the 16 kHz reference test checks (same function, same numbers)
    assert torch.equal(kmeans.mfcc(torch.from_numpy(wav), 13), kmeans.mfcc(torch.from_numpy(wav), 13, 16000))


def test_kmeans_features_at_24k_are_100hz_mfcc(corpus, tmp_path):
    lengths = [int(n) for n in open(os.path.join(corpus["mfcc"], "train_0_1.len")).read().split()]
    assert lengths == [1 + (48000 - 600) // 240] * 24  # 198 frames in 2 s: 100 Hz
    meta = json.load(open(os.path.join(corpus["mfcc"], "train_0_1.json")))
    assert meta["sample_rate"] == RATE and meta["label_rate"] == 100
    feats = np.load(os.path.join(corpus["mfcc"], "train_0_1.npy"), mmap_mode="r")
    from data.audio import load_audio
    root, entries = read_manifest(corpus["tsv"])
    wav = torch.from_numpy(load_audio(os.path.join(root, entries[5][0]), RATE))
    np.testing.assert_allclose(feats[5 * 198:6 * 198], kmeans.mfcc_features(wav, 39, RATE).numpy(), atol=1e-5)
    # the 24 kHz manifest read at 16 kHz (the default) is refused, naming the manifest
    with pytest.raises(SystemExit) as e:
        kmeans.main(["features", "--manifest", corpus["tsv"], "--out", str(tmp_path / "f"), "--workers", "0"])
    assert str(e.value.code).startswith(f"error: {corpus['tsv']}:2: ") and "16000 Hz" in str(e.value.code)


def test_hidden_features_at_the_models_rate(corpus, tmp_path):
    """kmeans.py features --model: a 24 kHz encoder's hidden states at 75 Hz; another --sample-rate is refused."""
    import dataclasses
    from model import Encoder
    cfg = EncoderConfig.hubert_base(conv_layers=((16, 10, 5),) + ((16, 3, 2),) * 4 + ((16, 2, 2),) * 2, layers=2,
                                    dim=16, heads=2, ffn=32, sample_rate=RATE)
    ckpt = str(tmp_path / "tiny24.pt")
    torch.save({"encoder_config": dataclasses.asdict(cfg), "encoder": Encoder(cfg).state_dict()}, ckpt)
    kmeans.main(["features", "--manifest", corpus["tsv"], "--out", str(tmp_path / "h"), "--model", ckpt,
                 "--layer", "1", "--workers", "0"])
    meta = json.load(open(tmp_path / "h" / "train_0_1.json"))
    assert meta["label_rate"] == 75 and meta["sample_rate"] == RATE
    assert open(tmp_path / "h" / "train_0_1.len").read().split() == ["149"] * 24
    with pytest.raises(SystemExit, match=r"runs at 24000 Hz but --sample-rate is 16000"):
        kmeans.main(["features", "--manifest", corpus["tsv"], "--out", str(tmp_path / "h2"), "--model", ckpt,
                     "--layer", "1", "--sample-rate", "16000", "--workers", "0"])


def test_labels_at_75hz_align_with_24k_audio_and_50hz_labels_are_refused(corpus, tmp_path):
    from pretrain_musichubert import align_labels
    _, entries = read_manifest(corpus["tsv"])
    km = tmp_path / "train.km"
    rng = np.random.default_rng(0)
    km.write_text("".join(" ".join(map(str, rng.integers(0, K, n * 75 // RATE))) + "\n" for _, n in entries))
    labels = load_labels(str(km), entries, 75.0, sample_rate=RATE)
    assert [len(x) for x in labels] == [150] * 24
    with pytest.raises(LabelError) as e:
        load_labels(str(km), entries, 50.0, sample_rate=RATE)
    msg = str(e.value)
    assert msg.startswith(f"{km}:1: 150 labels for ") and "(24000 Hz audio) at 50.0 Hz need 100.0" in msg
    # 75 Hz frames take 75 Hz labels one to one, and 100 Hz labels at floor(4t / 3)
    lab = torch.arange(200)[None]
    assert align_labels(lab[:, :150], 149, 75.0, RATE).tolist() == [list(range(149))]
    assert align_labels(lab, 6, 100.0, RATE).tolist() == [[0, 1, 2, 4, 5, 6]]
    # at 16 kHz nothing changed: 100 Hz labels, every other one
    assert align_labels(lab, 4, 100.0).tolist() == align_labels(lab, 4, 100.0, 16000).tolist() == [[0, 2, 4, 6]]


# ------------------------------------------------------------------------------------------------ 24 kHz runs

HUBERT = dict(conv_channels=32, layers=2, dim=32, heads=2, ffn=64, final_dim=16, batch_size=4, grad_accum=1,
              crop_seconds=2.0, min_seconds=1.0, num_workers=0, log_interval=1, ckpt_interval=1000, warmup_steps=2,
              learning_rate=2e-3, group_by_length=False, max_steps=6, dropout=0.1, attention_dropout=0.0,
              dropout_input=0.1, layerdrop=0.2, sample_rate=RATE)


def hubert(corpus, out_dir, **overrides):
    run_script("pretrain_musichubert", args({**HUBERT, "train_tsv": corpus["tsv"], "label_dir": corpus["labels"],
                                             "out_dir": str(out_dir), **overrides}))


def test_musichubert_at_24k_resumes_exactly_and_refuses_other_rates(corpus, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    hubert(corpus, full)
    hubert(corpus, part, stop_at_step=3)
    hubert(corpus, part)
    state = assert_same_run(full, part, ("encoder", "final_proj"))
    assert torch.equal(state["label_embs"], final_state(full)["label_embs"])
    assert_24k_checkpoint(state, part)
    assert state["label_rate"] == 100.0 and state["config"]["sample_rate"] == RATE
    assert read_log(full)[-1]["acc"] > 0  # masked frames were scored against labels at 75 Hz
    # the same out_dir at 16 kHz (the 16 kHz manifest; 100 Hz labels are the same at either rate): one line
    with pytest.raises(SystemExit) as e:
        hubert(corpus, part, train_tsv=corpus["tsv16"], sample_rate=16000, max_steps=8)
    msg = str(e.value.code)
    assert "\n" not in msg and "ckpt_00000006.pt was trained at 24000 Hz but this run has sample_rate=16000" in msg
    # init_from a 24 kHz checkpoint into a 16 kHz run: one line
    import training
    with pytest.raises(SystemExit) as e:
        hubert(corpus, tmp_path / "init", train_tsv=corpus["tsv16"], sample_rate=16000,
               init_from=training.latest_checkpoint(str(full)))
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("error: init_from=") and "trained at 24000 Hz" in msg
    # the 24 kHz manifest in a run that forgets sample_rate: the manifest is refused before anything else
    with pytest.raises(SystemExit) as e:
        hubert(corpus, tmp_path / "forgot", sample_rate=16000)
    assert str(e.value.code).startswith(f"error: {corpus['tsv']}:2: ")


def test_musichubert_label_rate_50_with_75hz_labels_stops(corpus, tmp_path):
    _, entries = read_manifest(corpus["tsv"])
    labels = tmp_path / "labels75"
    labels.mkdir()
    (labels / "train.km").write_text("".join(" ".join(["1"] * (n * 75 // RATE)) + "\n" for _, n in entries))
    (labels / "dict.km.txt").write_text("".join(f"{k} 1\n" for k in range(K)))
    with pytest.raises(SystemExit) as e:
        hubert(corpus, tmp_path / "out", label_dir=str(labels), label_rate=50.0)
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith(f"error: {labels / 'train.km'}:1: ") and "need 100.0" in msg


MUSIC2VEC = dict(layers=2, dim=32, heads=2, ffn=64, conv_channels=32, top_k_layers=2, crop_seconds=1.0,
                 crop_seconds_min=0.5, batch_size=2, grad_accum=2, num_workers=0, log_interval=1,
                 learning_rate=2e-3, device="cpu", max_steps=6, ckpt_interval=100, max_pos_share=1.0,
                 sample_rate=RATE)


def test_music2vec_at_24k_resumes_exactly_and_refuses_other_rates(corpus, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = {**MUSIC2VEC, "train_tsv": corpus["tsv"], "file_stats_tsv": str(tmp_path / "stats.tsv")}
    run_script("pretrain_music2vec", args({**common, "out_dir": full}))
    run_script("pretrain_music2vec", args({**common, "out_dir": part, "stop_at_step": 3}))
    run_script("pretrain_music2vec", args({**common, "out_dir": part}))
    state = assert_same_run(full, part, ("encoder", "final_proj", "teacher"))
    assert_24k_checkpoint(state, part)
    # the whole-file statistics were taken at 24 kHz: their counts are the 24 kHz manifest's
    lines = open(tmp_path / "stats.tsv").read().split("\n")[1:-1]
    assert sorted(int(line.split("\t")[1]) for line in lines) == sorted(n for _, n in read_manifest(corpus["tsv"])[1])
    with pytest.raises(SystemExit) as e:
        run_script("pretrain_music2vec", args({**common, "out_dir": part, "train_tsv": corpus["tsv16"],
                                               "file_stats_tsv": str(tmp_path / "stats16.tsv"),
                                               "sample_rate": 16000, "max_steps": 8}))
    assert "\n" not in str(e.value.code) and "trained at 24000 Hz but this run has sample_rate=16000" in str(
        e.value.code)


W2V = dict(conv_channels=32, layers=2, dim=64, heads=2, ffn=128, final_dim=32, latent_vars=32, num_negatives=20,
           batch_size=4, grad_accum=1, crop_seconds=2.0, min_seconds=1.0, num_workers=0, log_interval=1,
           ckpt_interval=1000, warmup_steps=2, learning_rate=2e-3, group_by_length=False, device="cpu",
           max_steps=6, dropout=0.1, attention_dropout=0.0, dropout_input=0.1, dropout_features=0.1, layerdrop=0.2,
           sample_rate=RATE)


def test_wav2vec2_at_24k_resumes_exactly_and_refuses_other_rates(corpus, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = {**W2V, "train_tsv": corpus["tsv"]}
    run_script("pretrain_wav2vec2", args({**common, "out_dir": full}))
    run_script("pretrain_wav2vec2", args({**common, "out_dir": part, "stop_at_step": 3}))
    run_script("pretrain_wav2vec2", args({**common, "out_dir": part}))
    state = assert_same_run(full, part, ("encoder", "quantizer", "project_q", "final_proj"))
    assert_24k_checkpoint(state, part)
    import training
    with pytest.raises(SystemExit) as e:
        run_script("pretrain_wav2vec2", args({**common, "out_dir": tmp_path / "init", "train_tsv": corpus["tsv16"],
                                              "sample_rate": 16000,
                                              "init_from": training.latest_checkpoint(str(full))}))
    assert "\n" not in str(e.value.code) and "trained at 24000 Hz but this run has sample_rate=16000" in str(
        e.value.code)


def test_checkpoint_from_before_the_rate_field_resumes_at_16k(corpus, tmp_path):
    """A checkpoint whose encoder_config has no sample_rate (written before the field) is a 16 kHz one: a 16 kHz
    run resumes it, a 24 kHz run refuses it in one line."""
    import training
    hubert(corpus, tmp_path, train_tsv=corpus["tsv16"], sample_rate=16000, max_steps=2, stop_at_step=1)
    path = training.latest_checkpoint(str(tmp_path))
    state = training.load_checkpoint(path)
    del state["encoder_config"]["sample_rate"]
    torch.save(state, path)
    with pytest.raises(SystemExit, match=r"trained at 16000 Hz but this run has sample_rate=24000"):
        hubert(corpus, tmp_path, max_steps=2)
    hubert(corpus, tmp_path, train_tsv=corpus["tsv16"], sample_rate=16000, max_steps=2)
    assert final_state(tmp_path)["step"] == 2 and final_state(tmp_path)["encoder_config"]["sample_rate"] == 16000


@pytest.mark.parametrize("name", ["pretrain_musichubert", "pretrain_music2vec", "pretrain_wav2vec2"])
def test_every_read_is_at_the_runs_rate(corpus, tmp_path, monkeypatch, name):
    """Each objective reads its crops (and music2vec its whole-file statistics) at 24 kHz, crops of
    crop_seconds x 24000 samples."""
    import data.dataset
    reads = []
    real = data.dataset.load_audio

    def spy(path, sr=16000, start=0, frames=None, min_samples=1):
        reads.append((sr, frames))
        return real(path, sr, start=start, frames=frames, min_samples=min_samples)

    monkeypatch.setattr(data.dataset, "load_audio", spy)
    config = {"pretrain_musichubert": {**HUBERT, "label_dir": corpus["labels"]},
              "pretrain_music2vec": {**MUSIC2VEC, "file_stats_tsv": str(tmp_path / "stats.tsv")},
              "pretrain_wav2vec2": W2V}[name]
    run_script(name, args({**config, "train_tsv": corpus["tsv"], "out_dir": tmp_path / "out", "max_steps": 1,
                           "crop_seconds": 1.5}))
    assert reads and {sr for sr, _ in reads} == {RATE}
    assert 36000 in {frames for _, frames in reads}  # the crops: 1.5 s at 24 kHz


def test_labels_crop_in_step_with_24k_audio(corpus):
    """make_loader binds the dataset's rate into the collate: a batch's labels cover its audio at 100 Hz."""
    from data.dataset import ClipBatchSampler, crop_labels, make_loader
    _, entries = read_manifest(corpus["tsv"])
    labels = load_labels(os.path.join(corpus["labels"], "train.km"), entries, 100.0, sample_rate=RATE)
    clips = AudioClips(corpus["tsv"], crop_seconds=1.5, min_seconds=1.0, labels=labels, label_rate=100.0, seed=0,
                       sample_rate=RATE)
    loader = make_loader(clips, ClipBatchSampler(clips.lengths, 4, seed=0), num_workers=0)
    batch = next(iter(loader))
    assert batch["wav"].shape == (4, 36000) and batch["labels"].shape == (4, 150)  # 1.5 s: 36,000 samples, 150 labels
    for row, index, offset in zip(batch["labels"], batch["index"], batch["offset"]):
        want = crop_labels(labels[int(index)], int(offset), 36000, 100.0, RATE).astype(np.int64)
        assert row.tolist() == want.tolist()
