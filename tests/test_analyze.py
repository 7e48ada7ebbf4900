"""analyze.py: codeword statistics against hand-computed values and scikit-learn, PWCCA against a hand-built case,
the eigenvalue definition of CCA and its invariances, both sub-commands end to end on a tiny wav2vec 2.0 checkpoint
and an NSynth-layout fixture, and the one-line errors."""
import csv
import dataclasses
import json
import math
import os

import numpy as np
import pytest
import soundfile as sf
import torch

import analyze
from data.audio import load_audio
from model import (Encoder, EncoderConfig, GumbelQuantizer, codeword_indices, load_pretrained, load_quantizer,
                   save_hf)

SR = 16000


# ---------------------------------------------------------------------------------------------- codeword statistics

def test_codeword_statistics_by_hand():
    # codeword 5: label 0 twice; codeword 7: label 0 once, label 1 twice; codeword 9: label 2 once
    labels, codes = np.array([0, 0, 0, 1, 1, 2]), np.array([5, 5, 7, 7, 7, 9])
    table, label_values, code_values = analyze.contingency(labels, codes)
    assert table.tolist() == [[2, 1, 0], [0, 2, 0], [0, 0, 1]]
    assert label_values.tolist() == [0, 1, 2] and code_values.tolist() == [5, 7, 9]
    s = analyze.codeword_statistics(table)
    # H(label) = H(code) = H(1/2, 1/3, 1/6) = 2/3 ln 2 + 1/2 ln 3;
    # I = 2/6 ln 2 + 1/6 ln(2/3) + 2/6 ln 2 + 1/6 ln 6 = ln 2
    h = 2 / 3 * math.log(2) + 0.5 * math.log(3)
    assert s["label_entropy_nats"] == pytest.approx(h) and s["code_entropy_nats"] == pytest.approx(h)
    assert s["mi_nats"] == pytest.approx(math.log(2))
    assert s["nmi"] == pytest.approx(math.log(2) / h)  # arithmetic mean of two equal entropies
    assert s["purity"] == pytest.approx(5 / 6)  # codeword 5: 2 of 2, codeword 7: 2 of 3, codeword 9: 1 of 1
    assert s["codewords_used"] == 3 and s["frames"] == 6
    assert s["code_perplexity"] == pytest.approx(math.exp(h))
    # the normalisation is the arithmetic mean of unequal entropies too: one codeword per frame
    s = analyze.codeword_statistics(analyze.contingency(np.array([0, 0, 1, 1]), np.arange(4))[0])
    assert s["mi_nats"] == pytest.approx(math.log(2))
    assert s["nmi"] == pytest.approx(math.log(2) / ((math.log(2) + math.log(4)) / 2))
    assert s["purity"] == 1.0


def test_nmi_and_purity_match_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for n, L, K in ((50, 3, 7), (400, 11, 40), (1000, 48, 300), (30, 1, 5), (30, 4, 1)):
        labels = rng.integers(0, L, n)
        codes = (labels * 7 + rng.integers(0, 3, n)) % K if K > 1 else np.zeros(n, dtype=int)
        s = analyze.codeword_statistics(analyze.contingency(labels, codes)[0])
        assert s["nmi"] == pytest.approx(metrics.normalized_mutual_info_score(labels, codes), abs=1e-12)
        assert s["mi_nats"] == pytest.approx(metrics.mutual_info_score(labels, codes), abs=1e-12)
        cont = metrics.cluster.contingency_matrix(labels, codes)
        assert s["purity"] == pytest.approx(cont.max(0).sum() / n)
    # both constant: a perfect match, as scikit-learn
    s = analyze.codeword_statistics(analyze.contingency(np.zeros(5), np.full(5, 3))[0])
    assert s["nmi"] == 1.0 == metrics.normalized_mutual_info_score(np.zeros(5), np.full(5, 3))


def test_chance_level_moves_whole_notes():
    """Codewords private to each note (none shared with another note) say nothing about the label beyond which note
    a frame is in: their NMI is well above 0 on its own, the adjusted NMI is about 0. Codewords that follow the
    label score high either way."""
    rng = np.random.default_rng(0)
    notes = np.repeat(np.arange(60), 40)  # 60 notes x 40 frames
    note_labels = rng.integers(0, 6, 60)
    shuffles = [rng.permutation(60) for _ in range(analyze.SHUFFLES)]
    private = notes * 4 + rng.integers(0, 4, len(notes))  # each note its own 4 codewords
    s = analyze.label_statistics(note_labels, notes, private, shuffles)[0]
    assert s["nmi"] > 0.3 and s["nmi_shuffled"] == pytest.approx(s["nmi"], abs=0.05)
    assert abs(s["nmi_adjusted"]) < 0.05 and s["purity"] == 1.0
    follow = note_labels[notes] * 2 + rng.integers(0, 2, len(notes))  # 2 codewords per label
    s, table, label_values, code_values = analyze.label_statistics(note_labels, notes, follow, shuffles)
    assert s["purity"] == 1.0 and s["nmi_adjusted"] > 0.75 and s["nmi_shuffled"] < 0.2 < s["nmi"] - 0.5
    assert table.sum() == len(notes) and len(code_values) == 12
    # by hand: the adjusted NMI is (MI - E[MI]) / (mean entropy - E[MI]), E over the permutations
    expected = np.mean([analyze.codeword_statistics(analyze.contingency(note_labels[p][notes], follow)[0])["mi_nats"]
                        for p in shuffles])
    mean_h = (s["label_entropy_nats"] + s["code_entropy_nats"]) / 2
    assert s["nmi_adjusted"] == pytest.approx((s["mi_nats"] - expected) / (mean_h - expected))


def test_joint_codes_and_names():
    codes = np.array([[0, 0], [0, 7], [3, 1], [7, 7]])
    joint = analyze.joint_codes(codes, 8)
    assert joint.tolist() == [0, 7, 25, 63]
    assert [analyze.code_name("joint", j, 8, 2) for j in joint] == ["0:0", "0:7", "3:1", "7:7"]
    assert analyze.code_name("group 1", 5, 8, 2) == "5"
    three = np.array([[1, 2, 3]])
    assert analyze.joint_codes(three, 10).tolist() == [123]
    assert analyze.code_name("joint", 123, 10, 3) == "1:2:3"


def test_receptive_field_and_frame_levels():
    base = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2
    assert analyze.receptive_field(base) == (400, 320)  # wav2vec 2.0: 25 ms windows every 20 ms
    # 0.5 s of a tone, 0.25 s of it 30 dB down, then digital silence
    t = np.arange(SR) / SR
    wav = np.sin(2 * np.pi * 440 * t)
    wav[SR // 2:3 * SR // 4] *= 10 ** (-30 / 20)
    wav[3 * SR // 4:] = 0
    frames = (SR - 400) // 320 + 1
    db = analyze.frame_levels_db(wav, frames, base)
    assert len(db) == frames == 49
    assert np.allclose(db[:20], 0, atol=0.05)  # frames 0-19 end before sample 8000
    assert np.allclose(db[26:36], -30, atol=0.1)  # frames wholly inside [8000, 12000)
    assert np.isneginf(db[38:]).all()  # frames starting at or after sample 12000
    assert np.isneginf(analyze.frame_levels_db(np.zeros(SR), frames, base)).all()


# ------------------------------------------------------------------------------------------------------- PWCCA

def orthonormal_centred(n, k, seed=0):
    """k orthonormal vectors over n frames, each of mean zero."""
    a = np.random.default_rng(seed).standard_normal((n, k))
    q, _ = np.linalg.qr(a - a.mean(0))
    return q


def test_pwcca_hand_case():
    """x = [3 u1, u1 + u2], y = [u1, 0.6 u2 + 0.8 u3, u4] (u orthonormal, centred): the canonical correlations are
    1 (u1) and 0.6 (u2). x has fewer dimensions, so it carries the weights; its canonical variates are u1 and u2,
    alpha_1 = |<u1, 3 u1>| + |<u1, u1 + u2>| = 4, alpha_2 = |<u2, 3 u1>| + |<u2, u1 + u2>| = 1, so
    PWCCA = (4 x 1 + 1 x 0.6) / 5 = 0.92 (the plain mean: 0.8)."""
    u = orthonormal_centred(200, 4)
    x = np.stack([3 * u[:, 0], u[:, 0] + u[:, 1]], 1)
    y = np.stack([u[:, 0], 0.6 * u[:, 1] + 0.8 * u[:, 2], u[:, 3]], 1)
    r = analyze.pwcca(x, y, keep=1.0)
    np.testing.assert_allclose(r["correlations"], [1.0, 0.6], atol=1e-9)
    np.testing.assert_allclose(r["weights"], [0.8, 0.2], atol=1e-9)
    assert r["pwcca"] == pytest.approx(0.92, abs=1e-9) and r["mean_cca"] == pytest.approx(0.8, abs=1e-9)
    assert (r["weighted"], r["kept_x"], r["kept_y"]) == ("x", 2, 3)
    # the other way round, the weights come from the smaller side again (now y): the same value
    back = analyze.pwcca(y, x, keep=1.0)
    assert back["weighted"] == "y" and back["pwcca"] == pytest.approx(0.92, abs=1e-9)
    # a mean added to the features changes nothing (CCA works on centred features)
    assert analyze.pwcca(x + 5.0, y - 3.0, keep=1.0)["pwcca"] == pytest.approx(0.92, abs=1e-9)


def test_pwcca_variance_threshold():
    """keep: the fewest leading directions whose variance reaches that share. x = [10 u1, 0.1 u2] puts 99.99% of its
    variance on u1: at 0.99 only u1 is kept (correlation 1 with y's u1, PWCCA 1); at 1.0 both (0.6 enters)."""
    u = orthonormal_centred(200, 3)
    x = np.stack([10 * u[:, 0], 0.1 * u[:, 1]], 1)
    y = np.stack([u[:, 0], 0.6 * u[:, 1] + 0.8 * u[:, 2]], 1)
    r = analyze.pwcca(x, y, keep=0.99)
    assert (r["kept_x"], r["kept_y"]) == (1, 2) and r["pwcca"] == pytest.approx(1.0, abs=1e-9)
    r = analyze.pwcca(x, y, keep=1.0)
    assert r["kept_x"] == 2 and r["correlations"][1] == pytest.approx(0.6, abs=1e-9)
    # directions without variance (rank deficiency) are dropped even at keep=1: a copy of a feature adds nothing
    r2 = analyze.pwcca(np.concatenate([x, x[:, :1] * 2], 1), y, keep=1.0)
    assert r2["kept_x"] == 2
    np.testing.assert_allclose(r2["correlations"], r["correlations"], atol=1e-9)


def correlated(n=3000, dx=5, dy=8, seed=1):
    rng = np.random.default_rng(seed)
    shared = rng.standard_normal((n, 4))
    x = shared @ rng.standard_normal((4, dx)) + 0.5 * rng.standard_normal((n, dx))
    y = shared @ rng.standard_normal((4, dy)) + rng.standard_normal((n, dy))
    return x, y, rng


def test_canonical_correlations_match_the_eigenvalue_definition():
    """rho_i^2 are the eigenvalues of Cxx^-1 Cxy Cyy^-1 Cyx (Hotelling), computed here without any SVD."""
    x, y, _ = correlated()
    c = np.cov(np.concatenate([x, y], 1).T, bias=True)
    cxx, cyy, cxy = c[:5, :5], c[5:, 5:], c[:5, 5:]
    eig = np.sort(np.linalg.eigvals(np.linalg.solve(cxx, cxy) @ np.linalg.solve(cyy, cxy.T)).real)[::-1]
    r = analyze.pwcca(x, y, keep=1.0)
    np.testing.assert_allclose(r["correlations"], np.sqrt(eig), atol=1e-9)
    assert r["mean_cca"] == pytest.approx(np.sqrt(eig).mean())
    assert 0 < r["pwcca"] < 1


def test_pwcca_invariances():
    x, y, rng = correlated()
    ref = analyze.pwcca(x, y, keep=1.0)
    assert ref["weighted"] == "x"
    a_y = rng.standard_normal((8, 8))  # invertible (almost surely)
    a_x = rng.standard_normal((5, 5))
    # an invertible linear map of the side the weights do not come from (y): PWCCA, correlations unchanged
    r = analyze.pwcca(x, y @ a_y, keep=1.0)
    assert r["pwcca"] == pytest.approx(ref["pwcca"], abs=1e-9)
    np.testing.assert_allclose(r["correlations"], ref["correlations"], atol=1e-9)
    # the canonical correlations are unchanged by an invertible map of either side ...
    r = analyze.pwcca(x @ a_x, y @ a_y, keep=1.0)
    np.testing.assert_allclose(r["correlations"], ref["correlations"], atol=1e-9)
    # ... but the weights are sums over the weighted side's features, so a general map of x changes PWCCA
    assert abs(r["pwcca"] - ref["pwcca"]) > 1e-4
    # a permutation, sign flips and a common scale of the weighted side leave it unchanged
    signed_perm = np.eye(5)[rng.permutation(5)] * rng.choice([-1.0, 1.0], 5)
    r = analyze.pwcca(2.5 * x @ signed_perm, y @ a_y, keep=1.0)
    assert r["pwcca"] == pytest.approx(ref["pwcca"], abs=1e-9)
    # orthogonal maps of either side leave the correlations alone at any threshold (the variances do not change)
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    a, b = analyze.pwcca(x, y, keep=0.9), analyze.pwcca(x, y @ q, keep=0.9)
    assert a["kept_y"] == b["kept_y"] < 8
    np.testing.assert_allclose(a["correlations"], b["correlations"], atol=1e-9)


def test_joint_covariance_streams_exactly():
    x, y, _ = correlated(n=500)
    acc = analyze.JointCovariance()
    for s in range(0, 500, 64):
        acc.add(torch.from_numpy(x[s:s + 64] + 1e3), torch.from_numpy(y[s:s + 64]))  # a large mean too
    want = np.cov(np.concatenate([x, y], 1).T, bias=True)
    np.testing.assert_allclose(acc.covariance().numpy(), want, atol=1e-9)
    assert acc.n == 500


# ------------------------------------------------------------------------------------------------ fixtures

TINY = dict(conv_layers=((16, 10, 5),) + ((16, 3, 2),) * 4 + ((16, 2, 2),) * 2, dim=32, layers=2, heads=2, ffn=64,
            pos_conv_kernel=16, pos_conv_groups=4)


def save_tiny_wav2vec2(path, seed=0):
    """A tiny wav2vec 2.0 model saved as pretrain_wav2vec2.py saves its checkpoints (the keys load_pretrained and
    load_wav2vec2_heads read)."""
    torch.manual_seed(seed)
    cfg = EncoderConfig.wav2vec2_base(**TINY)
    enc, q = Encoder(cfg), GumbelQuantizer(16, 2, 8, 16)
    torch.save({"encoder_config": dataclasses.asdict(cfg), "encoder": enc.state_dict(),
                "quantizer_config": q.config(), "quantizer": q.state_dict(),
                "project_q": torch.nn.Linear(16, 16).state_dict(), "final_proj": torch.nn.Linear(32, 16).state_dict(),
                "step": 0}, path)
    return str(path)


def note(midi, seconds=1.0, held=0.7, seed=0):
    """A harmonic note held `held` s, then 60 dB down (NSynth notes end in a release and near silence)."""
    t = np.arange(int(seconds * SR)) / SR
    f = 440 * 2 ** ((midi - 69) / 12)
    x = sum(np.sin(2 * np.pi * f * h * t + seed) / h for h in (1, 2, 3))
    x *= np.where(t < held, 1.0, 1e-3) * np.exp(-t)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


NOTES = [("bass_synthetic_000", "bass", 36), ("bass_synthetic_000", "bass", 43), ("guitar_acoustic_001", "guitar", 60),
         ("guitar_acoustic_001", "guitar", 67), ("flute_synthetic_002", "flute", 72), ("flute_synthetic_002", "flute", 60)]


@pytest.fixture(scope="module")
def nsynth(tmp_path_factory):
    """NSynth's layout (nsynth-test/examples.json, nsynth-test/audio/<note_str>.wav) with six 1 s notes."""
    root = tmp_path_factory.mktemp("nsynth")
    os.makedirs(root / "nsynth-test" / "audio")
    families = ["bass", "brass", "flute", "guitar", "keyboard", "mallet", "organ", "reed", "string", "synth_lead",
                "vocal"]
    examples = {}
    for i, (inst, fam, pitch) in enumerate(NOTES):
        name = f"{inst}-{pitch:03d}-100"
        examples[name] = {"note": i, "note_str": name, "instrument_str": inst, "instrument_family_str": fam,
                          "instrument_family": families.index(fam), "pitch": pitch, "velocity": 100,
                          "sample_rate": SR, "qualities": [0] * 10, "qualities_str": []}
        sf.write(root / "nsynth-test" / "audio" / f"{name}.wav", note(pitch, seed=i), SR, subtype="PCM_16")
    with open(root / "nsynth-test" / "examples.json", "w") as f:
        json.dump(examples, f)
    return root


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_wav2vec2(tmp_path_factory.mktemp("ckpt") / "w2v.pt")


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------ codebook CLI

def test_codebook_end_to_end(nsynth, tiny_ckpt, tmp_path):
    metrics = pytest.importorskip("sklearn.metrics")
    out = tmp_path / "out"
    result = analyze.main(["codebook", "--model", tiny_ckpt, "--data-root", str(nsynth), "--out", str(out),
                           "--compare", "--frames", "all", "--batch-size", "4", "--device", "cpu"])
    for name in ("codebook.json", "codebook.csv", "codebook_codewords.csv", "codebook_pitch.png",
                 "codebook_instrument.png"):
        assert (out / name).stat().st_size > 0
    assert not list(out.glob("*.tmp"))
    with open(out / "codebook_pitch.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    blob = json.load(open(out / "codebook.json"))
    assert blob == json.loads(json.dumps(result))
    assert [m["random_init"] for m in blob["models"]] == [False, True]

    # the same numbers from the codes of each note computed here, one note at a time
    enc, q = load_pretrained(tiny_ckpt), load_quantizer(tiny_ckpt)
    codes, pitch, family = [], [], []
    examples = json.load(open(nsynth / "nsynth-test" / "examples.json"))
    for name in sorted(examples):
        wav = torch.from_numpy(load_audio(nsynth / "nsynth-test" / "audio" / f"{name}.wav"))[None]
        c = codeword_indices(enc, q, wav)[0][0].numpy()
        codes.append(c)
        pitch += [examples[name]["pitch"]] * len(c)
        family += [examples[name]["instrument_family_str"]] * len(c)
    codes = np.concatenate(codes)
    assert blob["frames"] == {"rule": "all", "active_db": None, "counted": len(codes), "total": len(codes)}
    joint = codes[:, 0] * 8 + codes[:, 1]
    model = blob["models"][0]["codes"]
    for kind, c in (("group 0", codes[:, 0]), ("group 1", codes[:, 1]), ("joint", joint)):
        for label, y in (("pitch", pitch), ("instrument", family)):
            s = model[kind][label]
            assert s["nmi"] == pytest.approx(metrics.normalized_mutual_info_score(y, c), abs=1e-9)
            assert s["codewords_used"] == len(np.unique(c)) and s["frames"] == len(c)
            assert 0 <= s["nmi_shuffled"] <= 1 and 0 < s["purity_shuffled"] <= 1
    assert model["joint"]["codewords_possible"] == 64 and model["group 0"]["codewords_possible"] == 8
    rows = read_csv(out / "codebook.csv")
    assert len(rows) == 2 * 3 * 2  # models x code kinds x labels
    first = rows[0]
    assert (first["model"], first["codes"], first["label"]) == ("w2v.pt", "group 0", "pitch")
    assert float(first["nmi"]) == pytest.approx(model["group 0"]["pitch"]["nmi"], abs=1e-6)
    per_codeword = [r for r in read_csv(out / "codebook_codewords.csv") if r["model"] == "w2v.pt"]
    joint_rows = [r for r in per_codeword if r["codes"] == "joint"]
    assert len(joint_rows) == len(np.unique(joint))
    assert sum(int(r["frames"]) for r in joint_rows) == len(codes)
    r = joint_rows[0]
    g0, g1 = (int(v) for v in r["codeword"].split(":"))
    mine = (codes[:, 0] == g0) & (codes[:, 1] == g1)
    assert int(r["frames"]) == mine.sum()
    assert float(r["instrument_purity"]) == pytest.approx(
        max(np.mean(np.array(family)[mine] == f) for f in set(family)), abs=1e-6)


def test_codebook_counts_only_sounding_frames(nsynth, tiny_ckpt, tmp_path):
    """The notes fall 60 dB after 0.7 s: the default rule (40 dB) drops those frames, --active-db 80 keeps them."""
    blob = analyze.main(["codebook", "--model", tiny_ckpt, "--data-root", str(nsynth), "--out", str(tmp_path),
                         "--device", "cpu"])
    frames = blob["frames"]
    assert frames["rule"] == "active" and frames["total"] == 6 * 49
    # each note: frames ending before 0.7 s are >= -40 dB (e^-0.7 decay is 6 dB), frames starting after are -66 dB
    assert 6 * 34 <= frames["counted"] <= 6 * 35
    assert len(blob["models"]) == 1
    assert blob["models"][0]["codes"]["group 0"]["pitch"]["frames"] == frames["counted"]
    blob = analyze.main(["codebook", "--model", tiny_ckpt, "--data-root", str(nsynth), "--out", str(tmp_path),
                         "--device", "cpu", "--active-db", "80"])
    assert blob["frames"]["counted"] == 6 * 49


def test_codebook_reads_a_hugging_face_pretraining_folder(nsynth, tiny_ckpt, tmp_path):
    from model import load_wav2vec2_heads
    save_hf(load_pretrained(tiny_ckpt), tmp_path / "hf", **load_wav2vec2_heads(tiny_ckpt))
    a = analyze.main(["codebook", "--model", str(tmp_path / "hf"), "--data-root", str(nsynth), "--out",
                      str(tmp_path / "a"), "--device", "cpu"])
    b = analyze.main(["codebook", "--model", tiny_ckpt, "--data-root", str(nsynth), "--out", str(tmp_path / "b"),
                      "--device", "cpu"])
    assert a["models"][0]["codes"] == b["models"][0]["codes"]


# ------------------------------------------------------------------------------------------------ layers CLI

def test_layers_end_to_end(tiny_ckpt, tmp_path):
    """Three clips (5 s, 3 s, 6 s) batched with padding: each layer's PWCCA equals that of the frames computed here
    clip by clip (the middle 4 s; the whole 3 s clip), and every model gets layers + 1 rows."""
    audio = tmp_path / "audio"
    os.makedirs(audio)
    rng = np.random.default_rng(0)
    lengths = [5 * SR, 3 * SR, 6 * SR]
    for i, n in enumerate(lengths):
        t = np.arange(n) / SR
        x = np.sin(2 * np.pi * (200 + 50 * i) * t * (1 + 0.1 * t)) + 0.1 * rng.standard_normal(n)
        sf.write(audio / f"clip{i}.wav", (0.3 * x).astype(np.float32), SR, subtype="FLOAT")
    tsv = tmp_path / "clips.tsv"
    tsv.write_text(str(audio) + "\n" + "".join(f"clip{i}.wav\t{n}\n" for i, n in enumerate(lengths)))
    other = save_tiny_wav2vec2(tmp_path / "other.pt", seed=1)
    out = tmp_path / "out"
    rows = analyze.main(["layers", "--model", tiny_ckpt, other, "random", "--manifest", str(tsv), "--out", str(out),
                         "--keep", "1", "--batch-size", "2", "--device", "cpu"])
    assert (out / "layers.png").stat().st_size > 0
    table = read_csv(out / "layers.csv")
    assert [r["model"] for r in table] == ["w2v.pt"] * 3 + ["other.pt"] * 3 + ["random init"] * 3
    assert [int(r["layer"]) for r in table] == [0, 1, 2] * 3
    assert all(r["weighted_side"] == "conv" and 0 < float(r["pwcca"]) <= 1 for r in table)

    enc = load_pretrained(tiny_ckpt)
    refs, hidden = [], [[] for _ in range(3)]
    for i, n in enumerate(lengths):
        start = max(0, (n - 4 * SR) // 2)
        wav = torch.from_numpy(load_audio(audio / f"clip{i}.wav", start=start, frames=4 * SR))[None]
        with torch.no_grad():
            o = enc(wav)
            refs.append(enc.feature_norm(o.conv_features)[0])
            for layer, h in enumerate(o.hidden_states):
                hidden[layer].append(h[0])
    ref = torch.cat(refs)
    assert int(table[0]["frames"]) == len(ref) == 199 + 149 + 199
    for layer in range(3):
        want = analyze.pwcca(ref, torch.cat(hidden[layer]), keep=1.0)
        assert float(table[layer]["pwcca"]) == pytest.approx(want["pwcca"], abs=1e-5)
        assert float(table[layer]["mean_cca"]) == pytest.approx(want["mean_cca"], abs=1e-5)
    assert [r["pwcca"] for r in rows] == [float(r["pwcca"]) for r in table]  # returned = written
    # the projection to the transformer's width is linear: it leaves the canonical correlations as they are
    proj = analyze.main(["layers", "--model", tiny_ckpt, "--manifest", str(tsv), "--out", str(tmp_path / "p"),
                         "--keep", "1", "--conv", "projected", "--device", "cpu"])
    assert [r["mean_cca"] for r in proj] == pytest.approx([float(r["mean_cca"]) for r in table[:3]], abs=1e-5)


# ------------------------------------------------------------------------------------------------ errors

def error_of(argv):
    with pytest.raises(SystemExit) as e:
        analyze.main(argv)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_one_line_errors(nsynth, tiny_ckpt, tmp_path):
    missing = str(tmp_path / "nope.pt")
    assert missing in error_of(["codebook", "--model", missing, "--data-root", str(nsynth)])
    # an encoder without a quantiser (a MusicHuBERT checkpoint) cannot give codewords
    cfg = EncoderConfig.hubert_base(**TINY)
    hubert = tmp_path / "hubert.pt"
    torch.save({"encoder_config": dataclasses.asdict(cfg), "encoder": Encoder(cfg).state_dict()}, hubert)
    msg = error_of(["codebook", "--model", str(hubert), "--data-root", str(nsynth), "--out", str(tmp_path)])
    assert "quantiser" in msg and str(hubert) in msg
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    assert str(garbage) in error_of(["codebook", "--model", str(garbage), "--data-root", str(nsynth)])
    # data: a missing root, a split that is not there, a missing audio file
    assert "nsynth-test" in error_of(["codebook", "--model", tiny_ckpt, "--data-root", str(tmp_path / "none")])
    msg = error_of(["codebook", "--model", tiny_ckpt, "--data-root", str(nsynth), "--split", "valid",
                    "--out", str(tmp_path)])
    assert "nsynth-valid/examples.json" in msg
    broken = tmp_path / "broken"
    os.makedirs(broken / "nsynth-test" / "audio")
    examples = json.load(open(nsynth / "nsynth-test" / "examples.json"))
    with open(broken / "nsynth-test" / "examples.json", "w") as f:
        json.dump(examples, f)
    msg = error_of(["codebook", "--model", tiny_ckpt, "--data-root", str(broken), "--out", str(tmp_path)])
    assert str(broken / "nsynth-test" / "audio") in msg
    # manifests
    msg = error_of(["layers", "--model", tiny_ckpt, "--manifest", str(tmp_path / "none.tsv")])
    assert "none.tsv" in msg
    bad = tmp_path / "bad.tsv"
    bad.write_text("/root\nclip.wav\tmany\n")
    assert "bad.tsv:2" in error_of(["layers", "--model", tiny_ckpt, "--manifest", str(bad)])
    ok = tmp_path / "ok.tsv"
    ok.write_text(f"{tmp_path}\nclip.wav\t64000\n")
    assert missing in error_of(["layers", "--model", tiny_ckpt, missing, "--manifest", str(ok)])
    assert "clip.wav" in error_of(["layers", "--model", tiny_ckpt, "--manifest", str(ok), "--out", str(tmp_path)])
