"""kmeans.py: Kaldi-compatible MFCC, deltas, k-means fit, and fairseq-format feature / label files."""
import math
import os

import numpy as np
import pytest
import soundfile as sf
import torch

import kmeans


def tone_clip(n, freq, seed, sr=16000):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.2 * np.sin(2 * np.pi * 2.7 * freq * t)
            + 0.02 * rng.standard_normal(n)).astype(np.float32)


def kaldi_native_mfcc(wav, num_ceps):
    """k2-fsa's kaldi-native-fbank (a C++ port of Kaldi's feature code) with the options of fairseq's call
    torchaudio.compliance.kaldi.mfcc(wav, sample_frequency=16000, use_energy=False): the other defaults coincide."""
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.MfccOptions()
    opts.frame_opts.samp_freq = 16000
    opts.frame_opts.dither = 0.0  # torchaudio's default (Kaldi's is 1.0)
    opts.frame_opts.frame_length_ms = 25
    opts.frame_opts.frame_shift_ms = 10
    opts.frame_opts.preemph_coeff = 0.97
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.window_type = "povey"
    opts.frame_opts.round_to_power_of_two = True
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = 23
    opts.mel_opts.low_freq = 20
    opts.mel_opts.high_freq = 0  # Nyquist
    opts.num_ceps = num_ceps
    opts.use_energy = False
    opts.raw_energy = True
    opts.cepstral_lifter = 22
    m = knf.OnlineMfcc(opts)
    m.accept_waveform(16000, wav.tolist())
    m.input_finished()
    return np.stack([np.asarray(m.get_frame(i)) for i in range(m.num_frames_ready)])


@pytest.mark.parametrize("num_ceps", [13, 20])
def test_mfcc_matches_kaldi_native_fbank(num_ceps):
    # tones + noise, a silent stretch (exercises the log floor) and a loud burst; odd length exercises snip_edges
    wav = np.concatenate([tone_clip(12345, 330.0, 0), np.zeros(2000, np.float32),
                          0.9 * np.sign(tone_clip(3001, 1234.0, 1))])
    ref = kaldi_native_mfcc(wav, num_ceps)
    ours = kmeans.mfcc(torch.from_numpy(wav), num_ceps).numpy()
    assert ours.shape == ref.shape == (1 + (len(wav) - 400) // 160, num_ceps)
    # float32 FFTs on both sides; values reach ~60, observed max difference ~1e-4
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-3)
    # and batching changes nothing
    batch = kmeans.mfcc(torch.from_numpy(np.stack([wav, wav[::-1].copy()])), num_ceps)
    np.testing.assert_allclose(batch[0].numpy(), ours, rtol=0, atol=1e-5)


def test_deltas_by_hand():
    # one feature over 5 frames, x = t^2; window 5 (N=2), edges replicated: padded = 0 0 | 0 1 4 9 16 | 16 16
    # delta[t] = (1 (x[t+1] - x[t-1]) + 2 (x[t+2] - x[t-2])) / 10
    x = torch.tensor([0.0, 1.0, 4.0, 9.0, 16.0])[:, None]
    expected = [(1 * (1 - 0) + 2 * (4 - 0)) / 10, (1 * (4 - 0) + 2 * (9 - 0)) / 10, (1 * (9 - 1) + 2 * (16 - 0)) / 10,
                (1 * (16 - 4) + 2 * (16 - 1)) / 10, (1 * (16 - 9) + 2 * (16 - 4)) / 10]
    np.testing.assert_allclose(kmeans.deltas(x)[:, 0].numpy(), expected, rtol=1e-6)
    f = kmeans.mfcc_features(torch.from_numpy(tone_clip(8000, 440.0, 2)), 60)
    c = kmeans.mfcc(torch.from_numpy(tone_clip(8000, 440.0, 2)), 20)
    assert f.shape == (1 + (8000 - 400) // 160, 60)
    np.testing.assert_allclose(f[:, :20], c)
    np.testing.assert_allclose(f[:, 40:], kmeans.deltas(kmeans.deltas(c)), atol=1e-5)


def planted(n_per=400, k=6, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, dim)).astype(np.float32) * 10
    x = np.concatenate([c + 0.5 * rng.standard_normal((n_per, dim)).astype(np.float32) for c in centers])
    return x, centers, np.repeat(np.arange(k), n_per)


def match_error(found, centers):
    d = ((found[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    return np.sqrt(d.min(0)).max(), d.argmin(0)


def test_kmeans_recovers_planted_clusters():
    x, centers, truth = planted()
    out = kmeans.fit_kmeans(x, 6, seed=1, chunk_rows=500, verbose=False)
    err, which = match_error(out["centroids"].numpy(), centers)
    assert err < 0.2  # the mean of 400 points of std 0.5 is within ~0.1 of the centre
    assert len(set(which.tolist())) == 6
    # inertia = mean squared distance to the centre ~ dim * 0.5^2 = 1.25
    assert 1.0 < out["inertia"] < 1.5
    labels = kmeans.assign_nearest(torch.from_numpy(x), out["centroids"])[0].numpy()
    assert (which[truth] == labels).all()
    again = kmeans.fit_kmeans(x, 6, seed=1, chunk_rows=500, verbose=False)
    assert torch.equal(again["centroids"], out["centroids"])  # deterministic given the seed


def test_empty_cluster_is_reseeded():
    x, centers, _ = planted(k=3)
    # two centroids on top of each other: the second never wins a point, so it is empty after the first pass
    init = np.stack([centers[0], centers[0], centers[1] + 0.5 * centers[2]])
    # after one update the dead centroid sits on the point that was farthest from its centroid in the first pass
    d = ((x[:, None, :] - init[None]) ** 2).sum(-1).min(1)
    one = kmeans.fit_kmeans(x, 3, init=init, max_iter=2, tol=0, chunk_rows=256, verbose=False)
    assert any(np.array_equal(c, x[d.argmax()]) for c in one["centroids"].numpy()[:2])  # whichever lost the tie
    out = kmeans.fit_kmeans(x, 3, init=init, chunk_rows=256, verbose=False)
    err, which = match_error(out["centroids"].numpy(), centers)
    assert err < 0.2 and len(set(which.tolist())) == 3


def test_warm_up_then_full_passes_reach_the_same_clusters():
    x, centers, _ = planted(n_per=1500, k=6, dim=5, seed=11)
    x = x[np.random.default_rng(2).permutation(len(x))]
    history = []
    warm = kmeans.fit_kmeans(x, 6, seed=3, chunk_rows=1000, verbose=False, warm_points=1200, history=history)
    cold = kmeans.fit_kmeans(x, 6, seed=3, chunk_rows=1000, verbose=False, warm_points=0)
    assert warm["warm_iterations"] >= 1 and cold["warm_iterations"] == 0
    assert len(history) == warm["iterations"]  # history holds the passes over all points only
    assert math.isclose(history[-1][1], warm["inertia"], rel_tol=1e-12)
    assert math.isclose(warm["inertia"], cold["inertia"], rel_tol=1e-3)
    err, which = match_error(warm["centroids"].numpy(), centers)
    assert err < 0.1 and len(set(which.tolist())) == 6
    # the returned inertia is that of the returned centroids, measured on all points
    labels, dists = kmeans.assign_nearest(torch.from_numpy(x), warm["centroids"])
    assert math.isclose(dists.double().mean().item(), warm["inertia"], rel_tol=1e-5)
    # a sample of more than half the data is pointless: no warm-up
    assert kmeans.fit_kmeans(x, 6, seed=3, verbose=False, warm_points=4501)["warm_iterations"] == 0


def test_each_pass_reads_the_points_once_through_the_fused_assign_and_sum(monkeypatch):
    x, _, _ = planted(n_per=200, k=4, dim=3, seed=4)
    calls = []
    fused = kmeans.assign_and_sum
    monkeypatch.setattr(kmeans, "assign_and_sum", lambda *a, **kw: calls.append(a[0].shape[0]) or fused(*a, **kw))
    monkeypatch.setattr(kmeans, "assign_nearest", lambda *a, **kw: pytest.fail("Lloyd pass used assign_nearest"))
    out = kmeans.fit_kmeans(x, 4, init=x[:4], chunk_rows=300, verbose=False, warm_points=0)
    assert sum(calls) == out["iterations"] * len(x)  # every point once per pass, in chunks of 300
    assert max(calls) == 300


def test_labels_are_exact_nearest_centroids_against_float64_brute_force():
    # MFCC-like: 39 dims, a large C0-like offset (|x|^2 ~ 1e3-1e4 as on real music), centroids from a fit
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((6000, 39)) * np.linspace(12, 2, 39) + np.r_[-40.0, np.zeros(38)]).astype(np.float32)
    x[::7] *= 1.5
    out = kmeans.fit_kmeans(x, 64, seed=0, verbose=False, chunk_rows=2048)
    c = out["centroids"]
    labels, dists = kmeans.assign_nearest(torch.from_numpy(x), c)
    d64 = ((torch.from_numpy(x).double()[:, None, :] - c.double()[None]) ** 2).sum(-1)
    best = d64.min(1).values
    chosen = d64.gather(1, labels[:, None]).squeeze(1)
    # a different label is allowed only on a near-tie within fp32 rounding of the distance expansion
    scale = (torch.from_numpy(x).double() ** 2).sum(1) + (c.double() ** 2).sum(1).max()
    assert ((chosen - best) <= 1e-6 * scale).all()
    mismatches = (labels != d64.argmin(1)).sum().item()
    assert mismatches <= 3
    torch.testing.assert_close(dists.double(), best, rtol=0, atol=1e-5 * scale.max().item())


def write_shards(feat_dir, split, arrays_per_shard):
    """fairseq-format shards from lists of per-utterance arrays."""
    os.makedirs(feat_dir, exist_ok=True)
    n = len(arrays_per_shard)
    for r, utts in enumerate(arrays_per_shard):
        np.save(os.path.join(feat_dir, f"{split}_{r}_{n}.npy"), np.concatenate(utts).astype(np.float32))
        with open(os.path.join(feat_dir, f"{split}_{r}_{n}.len"), "w") as f:
            f.writelines(f"{len(u)}\n" for u in utts)


def test_streamed_shards_equal_in_memory_and_percent_sampling(tmp_path):
    x, centers, _ = planted(n_per=300, k=4, dim=3, seed=3)
    x = x[np.random.default_rng(0).permutation(len(x))]
    cuts = [0, 50, 51, 300, 700, 1200]  # utterances of odd sizes spread over two shards
    utts = [x[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    write_shards(tmp_path, "train", [utts[:2], utts[2:]])
    fs = kmeans.FeatureSet(str(tmp_path))
    assert fs.num_points == 1200 and fs.dim == 3
    streamed = np.concatenate(list(fs.chunks(37)))  # chunks cross utterance and shard boundaries
    np.testing.assert_array_equal(streamed, x)
    np.testing.assert_array_equal(np.concatenate(list(fs.chunks(64, 100, 777))), x[100:777])
    np.testing.assert_array_equal(fs.gather(np.array([0, 50, 51, 1199])), x[[0, 50, 51, 1199]])
    a = kmeans.fit_kmeans(fs, 4, seed=0, chunk_rows=37, verbose=False)
    b = kmeans.fit_kmeans(x, 4, seed=0, chunk_rows=1000, verbose=False)
    np.testing.assert_allclose(a["centroids"].numpy(), b["centroids"].numpy(), atol=1e-4)
    # --percent keeps ceil(p n) whole utterances of each shard: 1 of 2, 2 of 3
    half = kmeans.FeatureSet(str(tmp_path), percent=0.5, seed=0)
    sizes = sorted(b - a for _, a, b in half.segments)
    kept = sorted(len(u) for u in utts)
    assert half.num_points == sum(sizes) and half.num_points < 1200
    assert all(any(s == sum(c) for c in _subsets(kept)) for s in sizes)


def _subsets(values):
    out = [[]]
    for v in values:
        out += [o + [v] for o in out]
    return [o for o in out if o]


def test_missing_shard_and_bad_len_are_named(tmp_path):
    write_shards(tmp_path, "train", [[np.zeros((3, 2))], [np.zeros((4, 2))], [np.zeros((5, 2))]])
    os.remove(tmp_path / "train_1_3.npy")
    with pytest.raises(SystemExit, match=r"missing rank\(s\) \[1\]"):
        kmeans.FeatureSet(str(tmp_path))
    write_shards(tmp_path, "train", [[np.zeros((3, 2))]])
    with pytest.raises(SystemExit, match=r"mixes shardings of 'train' \(nshard = \[1, 3\]\)"):
        kmeans.FeatureSet(str(tmp_path))
    write_shards(tmp_path / "one", "train", [[np.zeros((3, 2))]])
    (tmp_path / "one" / "train_0_1.len").write_text("4\n")
    with pytest.raises(SystemExit, match=r"train_0_1.len sums to 4 frames but .*train_0_1.npy has 3 rows"):
        kmeans.FeatureSet(str(tmp_path / "one"))


def write_corpus(root, lengths, bad=()):
    """wav files + a fairseq manifest; entries listed in `bad` are not audio."""
    os.makedirs(root / "audio", exist_ok=True)
    lines = [str(root / "audio")]
    for i, n in enumerate(lengths):
        if i in bad:
            (root / "audio" / f"{i}.wav").write_bytes(b"not a wav file")
        else:
            sf.write(str(root / "audio" / f"{i}.wav"), tone_clip(n, 150.0 * (1 + i % 4), i), 16000, subtype="FLOAT")
        lines.append(f"{i}.wav\t{n}")
    (root / "train.tsv").write_text("\n".join(lines) + "\n")
    return str(root / "train.tsv")


def test_features_fit_label_line_up_with_manifest(tmp_path):
    lengths = [16000, 16000, 16000, 9999, 16000, 4000, 4000]  # runs of equal lengths are batched
    manifest = write_corpus(tmp_path, lengths, bad=(4,))
    feat, lab = str(tmp_path / "feat"), str(tmp_path / "lab")
    with pytest.raises(SystemExit, match=r"4.wav.*line 6"):
        kmeans.main(["features", "--manifest", manifest, "--out", feat, "--nshard", "2", "--rank", "1",
                     "--workers", "0"])
    assert not os.path.exists(os.path.join(feat, "train_1_2.npy"))  # nothing half-written under the final name
    for rank in (0, 1):
        kmeans.main(["features", "--manifest", manifest, "--out", feat, "--nshard", "2", "--rank", str(rank),
                     "--workers", "0", "--skip-bad-audio", "--batch-samples", "32000"])
    # shard rule: round(7 * 1 / 2) = 4 -> lines [0, 4) and [4, 7)
    shard0 = np.load(os.path.join(feat, "train_0_2.npy"))
    frames = [0 if i == 4 else 1 + (n - 400) // 160 for i, n in enumerate(lengths)]
    assert open(os.path.join(feat, "train_0_2.len")).read().split() == [str(f) for f in frames[:4]]
    assert open(os.path.join(feat, "train_1_2.len")).read().split() == [str(f) for f in frames[4:]]
    # the features of utterance 3 are the MFCC of its file
    wav3 = torch.from_numpy(sf.read(str(tmp_path / "audio" / "3.wav"), dtype="float32")[0])
    np.testing.assert_allclose(shard0[sum(frames[:3]):sum(frames[:4])], kmeans.mfcc_features(wav3).numpy(),
                               atol=1e-5)

    km = str(tmp_path / "new" / "folder" / "km.pt")  # a folder that does not exist yet is made, not a crash at save
    kmeans.main(["fit", feat, "--k", "4", "--out", km])
    assert not os.path.exists(km + ".tmp")
    saved = torch.load(km, weights_only=True)
    assert saved["centroids"].shape == (4, 39) and saved["features"]["kind"] == "mfcc39"
    assert saved["features"]["label_rate"] == 100 and saved["num_points"] == sum(frames)
    kmeans.main(["label", feat, "--km", km, "--out", lab])
    lines = open(os.path.join(lab, "train.km")).read().split("\n")
    assert lines[-1] == "" and len(lines) - 1 == len(lengths)  # one line per manifest entry, same order
    assert [len(line.split()) for line in lines[:-1]] == frames  # the unreadable file has an empty line
    expected = kmeans.assign_nearest(kmeans.mfcc_features(wav3), saved["centroids"])[0].tolist()
    assert lines[3].split() == [str(v) for v in expected]
    assert open(os.path.join(lab, "dict.km.txt")).read() == "0 1\n1 1\n2 1\n3 1\n"
    assert open(os.path.join(lab, "train_0_2.km")).read() + open(os.path.join(lab, "train_1_2.km")).read() == \
        "\n".join(lines)


def test_hidden_features_of_a_tiny_encoder(tmp_path, monkeypatch):
    model = pytest.importorskip("model")
    cfg = model.EncoderConfig.hubert_base(layers=3, dim=32, heads=2, ffn=64)
    torch.manual_seed(0)
    enc = model.Encoder(cfg).eval()
    ckpt = str(tmp_path / "tiny.pt")
    import dataclasses
    torch.save({"encoder_config": dataclasses.asdict(cfg), "encoder": enc.state_dict()}, ckpt)
    lengths = [6000, 6000, 12000]  # two equal clips batched, one long clip encoded in two chunks
    manifest = write_corpus(tmp_path, lengths)
    monkeypatch.setattr(kmeans, "MAX_CHUNK_SAMPLES", 6400)  # 12000 samples -> chunks of 6400 + 5600
    kmeans.main(["features", "--manifest", manifest, "--out", str(tmp_path / "feat"), "--model", ckpt,
                 "--layer", "2", "--workers", "0"])
    feats = np.load(str(tmp_path / "feat" / "train_0_1.npy"))
    frames = [int(enc.num_frames(6000)), int(enc.num_frames(6000)),
              int(enc.num_frames(6400)) + int(enc.num_frames(5600))]
    assert open(str(tmp_path / "feat" / "train_0_1.len")).read().split() == [str(f) for f in frames]
    with torch.no_grad():
        wav = torch.from_numpy(sf.read(str(tmp_path / "audio" / "2.wav"), dtype="float32")[0])
        ref = torch.cat([enc(wav[None, :6400]).hidden_states[2][0], enc(wav[None, 6400:]).hidden_states[2][0]])
        wav0 = torch.from_numpy(sf.read(str(tmp_path / "audio" / "0.wav"), dtype="float32")[0])
        ref0 = enc(wav0[None]).hidden_states[2][0]  # alone, while kmeans.py encoded it in a batch with clip 1
    np.testing.assert_allclose(feats[-frames[-1]:], ref.numpy(), atol=1e-4)
    np.testing.assert_allclose(feats[:frames[0]], ref0.numpy(), atol=1e-4)
    meta = kmeans.FeatureSet(str(tmp_path / "feat")).meta
    assert meta["kind"] == "hidden" and meta["layer"] == 2 and meta["label_rate"] == 50


def _distributed_fit(rank, world, path, port, x, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    res = kmeans.fit_kmeans(x, 5, seed=0, chunk_rows=100, verbose=False, warm_points=300)
    if rank == 0:
        torch.save(res, out)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_distributed_fit_equals_single_process(tmp_path):
    x, _, _ = planted(n_per=200, k=5, dim=4, seed=5)
    x = x[np.random.default_rng(1).permutation(len(x))]
    out = str(tmp_path / "res.pt")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_distributed_fit, args=(2, str(tmp_path), port, x, out), nprocs=2)
    dist = torch.load(out, weights_only=False)
    single = kmeans.fit_kmeans(x, 5, seed=0, chunk_rows=100, verbose=False, warm_points=300)
    assert single["warm_iterations"] >= 1  # the warm-up sample is split over the ranks too
    assert dist["iterations"] == single["iterations"] and dist["warm_iterations"] == single["warm_iterations"]
    np.testing.assert_allclose(dist["centroids"].numpy(), single["centroids"].numpy(), atol=1e-4)
    assert math.isclose(dist["inertia"], single["inertia"], rel_tol=1e-6)


def test_label_accepts_fairseq_joblib_kmeans(tmp_path):
    """fairseq's learn_kmeans.py saves an sklearn model with joblib; `label` reads its cluster_centers_."""
    joblib = pytest.importorskip("joblib")
    cluster = pytest.importorskip("sklearn.cluster")
    x, _, _ = planted(n_per=50, k=3, dim=4, seed=7)
    write_shards(tmp_path / "feat", "valid", [[x[:70], x[70:]]])
    km = cluster.KMeans(n_clusters=3, n_init=1, random_state=0).fit(x)
    joblib.dump(km, str(tmp_path / "km.bin"))
    kmeans.main(["label", str(tmp_path / "feat"), "--km", str(tmp_path / "km.bin"), "--out", str(tmp_path / "lab")])
    lines = open(str(tmp_path / "lab" / "valid.km")).read().split("\n")
    assert [list(map(int, line.split())) for line in lines[:2]] == [km.predict(x[:70]).tolist(),
                                                                   km.predict(x[70:]).tolist()]
