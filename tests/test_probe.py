"""probe.py: metrics against hand-computed values, the batched heads against torch's own optimiser, the sweep's
choice of cell, and for each of the seven tasks a tiny fixture in the data set's real on-disk layout run end to end
through the command line (extraction with a tiny random encoder -> training -> metrics -> results line)."""
import csv
import sys
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

import probe
from model import Encoder
from probing import features, models, runs, tasks
import probing.clips as pc
import probing.heads as ph
import probing.metrics as probe_metrics
import probing.report as probe_report
from data import downstream

SR = 16000


def tone(freq, seconds, sr, harmonics=1, seed=0):
    """A harmonic tone with a little noise: distinct frequencies / harmonic counts give separable features even
    through a random encoder."""
    t = np.arange(int(seconds * sr)) / sr
    x = sum(np.sin(2 * np.pi * freq * k * t) / k for k in range(1, harmonics + 1))
    x = x + 0.01 * np.random.default_rng(seed).standard_normal(len(t))
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def run_cli(tmp_path, task, root, *extra):
    results = tmp_path / "results.jsonl"
    argv = ["--task", task, "--model", "random", "--model-config", "tiny", "--data-root", str(root),
            "--cache-dir", str(tmp_path / "cache"), "--results", str(results), "--device", "cpu", *extra]
    records = probe.main(argv)
    lines = [json.loads(line) for line in open(results)]
    return records[task, "random", probe.SEED], lines


# ------------------------------------------------------------------------------------------------------------------
# metrics, each against a value worked out by hand

def test_accuracy():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert probe_metrics.accuracy(scores, [0, 1, 1, 1]) == 0.75


def test_macro_roc_auc_by_hand():
    # label 0: positives score 0.9, 0.4; negatives 0.5, 0.1 -> pairs (0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1) = 3/4
    # label 1: positive 0.3; negatives 0.3 (tie = 1/2), 0.2, 0.8 -> (0.5 + 1 + 0) / 3 = 1/2
    scores = np.array([[0.9, 0.3], [0.5, 0.3], [0.4, 0.2], [0.1, 0.8]])
    y = np.array([[1, 1], [0, 0], [1, 0], [0, 0]])
    assert probe_metrics.macro_roc_auc(scores, y) == pytest.approx((0.75 + 0.5) / 2)


def test_macro_roc_auc_skips_labels_without_both_classes():
    scores = np.array([[0.9, 0.3], [0.1, 0.2]])
    y = np.array([[1, 1], [0, 1]])  # label 1 has no negatives: undefined, left out
    assert probe_metrics.macro_roc_auc(scores, y) == 1.0


def test_macro_average_precision_by_hand():
    # label 0, ranked 0.9(+) 0.5(-) 0.4(+) 0.1(-): AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    # label 1, ranked 0.8(-) 0.3(+) 0.3(-) 0.2(-): the tie is one threshold: precision 1/3 at recall 1 -> 1/3
    scores = np.array([[0.9, 0.3], [0.5, 0.3], [0.4, 0.2], [0.1, 0.8]])
    y = np.array([[1, 1], [0, 0], [1, 0], [0, 0]])
    assert probe_metrics.macro_average_precision(scores, y) == pytest.approx((5 / 6 + 1 / 3) / 2)


def test_metrics_match_sklearn_on_random_data():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    y = (rng.random((200, 7)) < 0.3).astype(int)
    scores = np.round(rng.random((200, 7)) + y * 0.3, 2)  # rounding makes ties
    assert probe_metrics.macro_roc_auc(scores, y) == pytest.approx(sk.roc_auc_score(y, scores, average="macro"))
    assert probe_metrics.macro_average_precision(scores, y) == pytest.approx(
        sk.average_precision_score(y, scores, average="macro"))


def test_r2_by_hand():
    # dim 0: y = 1,2,3 (mean 2, SS_tot 2), pred 1,2,4 (SS_res 1) -> 0.5; dim 1: perfect -> 1
    y = np.array([[1.0, 0.0], [2.0, 1.0], [3.0, 5.0]])
    pred = np.array([[1.0, 0.0], [2.0, 1.0], [4.0, 5.0]])
    r2 = probe_metrics.r2_per_dim(pred, y)
    assert r2 == pytest.approx([0.5, 1.0])
    m = probe_metrics.task_metrics("regression", pred, y, ("r2", "arousal_r2", "valence_r2"))
    assert m == pytest.approx({"r2": 0.75, "arousal_r2": 0.5, "valence_r2": 1.0})


# ------------------------------------------------------------------------------------------------------------------
# the heads

def in_memory(splits):
    """{split: (X [rows, S, D], windows per item, y)} -> (rows function, {split: SplitData}) over one row array,
    the way train_heads reads a feature store."""
    Xs, data, offset = [], {}, 0
    for split, (X, counts, y) in splits.items():
        counts = np.asarray(counts, dtype=np.int64)
        data[split] = pc.SplitData(offset + np.cumsum(counts) - counts, counts, y)
        Xs.append(X)
        offset += len(X)
    X = torch.cat(Xs)
    return (lambda r: X[torch.as_tensor(r)]), data


def _features(n_clips, states, dim, classes, informative, seed, windows=2):
    """`windows` windows per clip (or a list of counts); the class is added to the states in `informative` (the same
    class centers for every split), the other states are noise."""
    y = torch.arange(n_clips) % classes
    counts = np.full(n_clips, windows) if np.isscalar(windows) else np.asarray(windows)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    X = torch.randn(int(counts.sum()), states, dim, generator=torch.Generator().manual_seed(seed))
    owner = torch.from_numpy(np.repeat(np.arange(n_clips), counts))
    for s in informative:
        X[:, s] += centers[y[owner]]
    return X, counts, y


def test_head_adam_matches_torch_adam():
    """A 2 x 2 grid (two layer choices x two lrs) takes the same steps as four separate heads, each its own
    tensors under torch.optim.Adam: the batched optimiser is exactly Adam, per head."""
    gen = torch.Generator().manual_seed(0)
    heads = ph.ProbeHeads(["all", 1], 2, 3, 8, 4, gen)
    lrs = [1e-2, 3e-3]
    opt = ph.HeadAdam(heads, torch.tensor(lrs).expand(2, 2))
    refs = {(c, k): {n: v.clone().requires_grad_(True) for n, v in heads.head_state(c, k).items()
                     if n != "layer_weights"} for c in range(2) for k in range(2)}
    ref_opts = {ck: torch.optim.Adam(list(r.values()), lr=lrs[ck[1]]) for ck, r in refs.items()}
    x = torch.randn(16, 3, 8, generator=gen)
    y = torch.randint(0, 4, (16,), generator=gen)
    heads.eval()  # no dropout, so both sides compute the same function
    for _ in range(5):
        for p in heads.parameters():
            p.grad = None
        pc.loss_fn("multiclass", heads(x).flatten(0, 1), y).backward()
        opt.step()
        for (c, k), r in refs.items():
            mixed = x[:, 1] if c == 1 else torch.einsum("s,bsd->bd", r["layer_logits"].softmax(-1), x)
            out = torch.relu(mixed @ r["w1"] + r["b1"]) @ r["w2"] + r["b2"]
            ref_opts[c, k].zero_grad()
            torch.nn.functional.cross_entropy(out, y).backward()
            ref_opts[c, k].step()
    for (c, k), r in refs.items():
        got = heads.head_state(c, k)
        for n, v in r.items():
            torch.testing.assert_close(got[n], v.detach(), atol=1e-6, rtol=1e-5)


def test_clip_average_averages_logits_per_clip():
    out = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]]])  # 1 head, 3 windows
    rows = torch.tensor([0, 0, 1])
    torch.testing.assert_close(pc.clip_average(out, rows, 2), torch.tensor([[[2.0, 1.0], [5.0, 5.0]]]))


def test_sweep_cells_equal_separately_trained_heads():
    """Point 10: every cell of a sweep is the head that a run with that one (layers, lr) trains under the same
    seed, to 1e-5: the same init, batches and dropout masks; plateau cuts and early stops per head (patience 2
    makes several heads stop at different epochs)."""
    task = tasks.Task(reader=None, kind="multiclass", num_classes=4, metrics=("acc",), epochs=12, patience=2,
                      plateau_patience=1)
    rows, data = in_memory({"train": _features(48, 4, 16, 4, (1, 2), seed=0, windows=[1, 2, 3] * 16),
                            "valid": _features(24, 4, 16, 4, (2,), seed=1), "test": _features(24, 4, 16, 4, (1,),
                                                                                             seed=2)})
    choices, lrs = ["transformer", 0, 1, 2, 3], [1e-4, 3e-3, 3e-2]
    sweep, heads = pc.train_heads(task, rows, data, choices, lrs, task.epochs, 7, "cpu", log=lambda *a: None,
                                     batch_size=8)
    assert len({r["best_epoch"] for r in sweep}) > 2  # heads stopped at different epochs
    for r in sweep:
        (alone,), one = pc.train_heads(task, rows, data, [r["layers"]], [r["lr"]], task.epochs, 7, "cpu",
                                          log=lambda *a: None, batch_size=8)
        assert alone["best_epoch"] == r["best_epoch"] and alone["best_valid"] == pytest.approx(r["best_valid"])
        assert alone["test"] == pytest.approx(r["test"]) and alone["valid"] == pytest.approx(r["valid"])
        assert alone["layer_weights"] == pytest.approx(r["layer_weights"], abs=1e-5)
        a, b = one.head_state(0, 0), heads.head_state(*r["cell"])
        for name in a:
            torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)


def test_sweep_reports_the_test_score_of_the_validation_best_cell():
    """Train: states 1 and 2 carry the class; valid: only state 2; test: only state 1. So the validation-best
    cell (state 2) tests near chance while the state-1 cells test well: the report must be the former's test
    score, not the best test score in the grid."""
    task = tasks.Task(reader=None, kind="multiclass", num_classes=4, metrics=("acc",), epochs=15, patience=5,
                      plateau_patience=2)
    rows, data = in_memory({"train": _features(64, 3, 16, 4, (1, 2), seed=0),
                            "valid": _features(40, 3, 16, 4, (2,), seed=1), "test": _features(40, 3, 16, 4, (1,),
                                                                                             seed=2)})
    results, _ = pc.train_heads(task, rows, data, [0, 1, 2], [1e-4, 1e-2], task.epochs, 0, "cpu",
                                   log=lambda *a: None)
    assert [(r["layers"], r["lr"]) for r in results] == [(c, lr) for lr in (1e-4, 1e-2) for c in (0, 1, 2)]
    chosen = ph.validation_best(results)
    assert chosen["layers"] == 2 and chosen["best_valid"] > 0.9
    assert chosen["best_valid"] == max(r["best_valid"] for r in results)
    assert chosen["valid"]["acc"] == pytest.approx(chosen["best_valid"])  # restored best weights
    assert chosen["test"]["acc"] < 0.5
    assert max(r["test"]["acc"] for r in results if r["layers"] == 1) > 0.9
    # ties go to the first cell in grid order
    tied = [dict(best_valid=0.5, name="a"), dict(best_valid=0.7, name="b"), dict(best_valid=0.7, name="c")]
    assert ph.validation_best(tied)["name"] == "b"


def test_weighted_head_learns_to_weight_the_informative_state():
    task = tasks.Task(reader=None, kind="multiclass", num_classes=4, metrics=("acc",), epochs=8, patience=8,
                      plateau_patience=5)
    rows, data = in_memory({s: _features(n, 3, 16, 4, (2,), seed=i)
                            for i, (s, n) in enumerate([("train", 128), ("valid", 40), ("test", 40)])})
    (r,), _ = pc.train_heads(task, rows, data, ["all"], [1e-2], task.epochs, 0, "cpu", log=lambda *a: None,
                                batch_size=4)
    init = ph.ProbeHeads(["all"], 1, 3, 16, 4, torch.Generator().manual_seed(0)).layer_weights()[0, 0]
    assert r["test"]["acc"] > 0.9
    assert r["layer_weights"][2] > 2 * float(init[2].detach())  # the softmax weight moved onto the informative state


def test_batches_are_clips_with_all_their_windows():
    """Point 3: a training step takes `batch_size` clips and every window of each (MARBLE's train_collate_fn), so an
    epoch has ceil(clips / batch_size) steps whatever the windows per clip; evaluation averages per clip."""
    task = tasks.Task(reader=None, kind="multiclass", num_classes=4, metrics=("acc",), epochs=1, patience=1,
                      plateau_patience=1)
    counts = [1, 4, 2, 9, 3] * 8  # 40 clips, 152 windows
    read, data = in_memory({"train": _features(40, 3, 8, 4, (1,), seed=0, windows=counts),
                            "valid": _features(8, 3, 8, 4, (1,), seed=1), "test": _features(8, 3, 8, 4, (1,), seed=2)})
    calls = []

    def rows(r):
        calls.append(np.asarray(r).copy())
        return read(r)

    pc.train_heads(task, rows, data, ["all"], [1e-3], 1, 0, "cpu", log=lambda *a: None, batch_size=16)
    tr = data["train"]
    spans = {int(s): int(c) for s, c in zip(tr.starts, tr.counts)}
    steps = [c for c in calls[1:] if c.max() < tr.starts[-1] + tr.counts[-1]][:3]  # calls[0] reads the shape
    assert len(steps) == 3  # ceil(40 / 16) steps
    clips_per_step = []
    for r in steps:
        i, clips = 0, 0
        while i < len(r):  # each batch is a run of whole clips: a clip's first row, then all its rows in order
            n = spans[int(r[i])]
            np.testing.assert_array_equal(r[i:i + n], np.arange(r[i], r[i] + n))
            i, clips = i + n, clips + 1
        clips_per_step.append(clips)
    assert clips_per_step == [16, 16, 8]
    np.testing.assert_array_equal(np.sort(np.concatenate(steps)), np.arange(sum(counts)))  # every window once
    # the clip-level outputs are the mean of the clip's window outputs
    heads = ph.ProbeHeads(["all"], 1, 3, 8, 4, torch.Generator().manual_seed(0))
    out = pc.evaluate(heads, read, tr)
    with torch.no_grad():
        for i in (0, 3, 7):
            r = np.arange(tr.starts[i], tr.starts[i] + tr.counts[i])
            torch.testing.assert_close(out[0, i], heads(read(r))[0, 0].mean(0))


def test_monitor_scores_equal_per_head_metrics():
    rng = np.random.default_rng(0)
    out = rng.standard_normal((5, 30, 6))
    y_ml = (rng.random((30, 6)) < 0.4).astype(np.float32)
    y_mc = rng.integers(0, 6, 30)
    y_r = rng.standard_normal((30, 2))
    for h in range(5):
        assert probe_metrics.monitor_scores("multilabel", "roc_auc", out, y_ml)[h] == pytest.approx(
            probe_metrics.macro_roc_auc(out[h], y_ml))
        assert probe_metrics.monitor_scores("multiclass", "acc", out, y_mc)[h] == probe_metrics.accuracy(out[h], y_mc)
        assert probe_metrics.monitor_scores("regression", "r2", out[:, :, :2], y_r)[h] == pytest.approx(
            probe_metrics.task_metrics("regression", out[h, :, :2], y_r, ("r2",))["r2"])


def test_group_shuffle_split_matches_sklearn():
    ms = pytest.importorskip("sklearn.model_selection")
    groups = np.repeat(np.arange(23), 3)[:-2]
    np.random.seed(42617)
    sk_tr, sk_te = next(ms.GroupShuffleSplit(n_splits=1, test_size=0.4).split(groups, groups=groups))
    sk2_tr, sk2_te = next(ms.GroupShuffleSplit(n_splits=1, test_size=0.2).split(groups, groups=groups))
    rng = np.random.RandomState(42617)
    tr, te = downstream.group_shuffle_split(groups, 0.4, rng)
    tr2, te2 = downstream.group_shuffle_split(groups, 0.2, rng)  # the same stream continues, as in MARBLE
    assert sorted(tr) == sorted(sk_tr) and sorted(te) == sorted(sk_te)
    assert sorted(tr2) == sorted(sk2_tr) and sorted(te2) == sorted(sk2_te)


def test_gtzan_split_lists_are_the_benchmarks():
    counts = {}
    for split in ("train", "valid", "test"):
        with open(os.path.join(downstream.SPLITS_DIR, "gtzan", f"{split}_filtered.txt")) as f:
            counts[split] = len([line for line in f if line.strip()])
    assert counts == {"train": 443, "valid": 197, "test": 290}  # Kereliuk et al. 2015, fault-filtered


def test_emo_artist_split_is_jukemirs():
    # sha1 of the normalised name, mod 10; "The Beatles!" and "the   beatles" normalise to the same artist
    assert downstream.emo_artist_split("The Beatles!") == downstream.emo_artist_split("the   beatles")
    h = int(__import__("hashlib").sha1(b"the beatles").hexdigest(), 16) % 10
    assert downstream.emo_artist_split("The Beatles") == ("train" if h < 8 else "valid")


def test_missing_data_set_is_one_clear_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        run_cli(tmp_path, "nsynth_pitch", tmp_path / "nowhere")
    msg = str(e.value)
    assert "nsynth-train/examples.json" in msg and "magenta" in msg and "\n" not in msg


# ------------------------------------------------------------------------------------------------------------------
# the seven tasks end to end, each on a fixture in the real layout

def write_nsynth(root, per_split=(32, 12, 12)):
    families = ["bass", "guitar", "organ", "string"]
    pitches = [40, 52, 64, 76]
    for split, n in zip(("train", "valid", "test"), per_split):
        meta = {}
        for i in range(n):
            fam, pitch = families[i % 4], pitches[(i // 4) % 4]
            note_str = f"{fam}_acoustic_{i:03d}-{pitch:03d}-100"
            meta[note_str] = dict(note=i, note_str=note_str, instrument=i, instrument_str=f"{fam}_acoustic_{i:03d}",
                                  instrument_family=downstream.NSYNTH_FAMILIES.index(fam), instrument_family_str=fam,
                                  instrument_source=0, instrument_source_str="acoustic", pitch=pitch, velocity=100,
                                  sample_rate=16000, qualities=[0] * 10, qualities_str=[])
            audio = tone(440 * 2 ** ((pitch - 69) / 12), 4.0, SR, harmonics=1 + 2 * (i % 4), seed=i)
            os.makedirs(root / f"nsynth-{split}" / "audio", exist_ok=True)
            sf.write(root / f"nsynth-{split}" / "audio" / f"{note_str}.wav", audio, SR, subtype="PCM_16")
        with open(root / f"nsynth-{split}" / "examples.json", "w") as f:
            json.dump(meta, f)


@pytest.mark.parametrize("task", ["nsynth_pitch", "nsynth_instr"])
def test_nsynth_end_to_end(tmp_path, task):
    write_nsynth(tmp_path / "nsynth")
    # 32 training notes: small batches and a high lr give the head enough steps to learn in a few epochs
    record, lines = run_cli(tmp_path, task, tmp_path / "nsynth", "--epochs", "15", "--batch-size", "8", "--lr", "1e-2")
    assert record["clips"] == {"train": 32, "valid": 12, "test": 12}
    assert record["windows"] == record["clips"]  # a 4 s note is one window
    assert lines[-1]["task"] == task and lines[-1]["metrics"] == record["metrics"]
    # four well separated pitches / timbres: far above chance (0.25) even through a random encoder
    assert record["metrics"]["acc"] >= 0.75
    assert record["layers"] == "all" and len(record["layer_weights"]) == 3


def store_dirs(tmp_path):
    return sorted(p.parent for p in (tmp_path / "cache").rglob("meta.json"))


def test_feature_store_is_reused_and_resumable(tmp_path):
    """Point 7: one memory-mapped float16 array of rows per feature set and a per-clip index; tasks over the same
    notes share it; a run killed mid-write (rows on disk past the last index line, half an index line) resumes
    with only the unindexed clips and ends with the same rows as an uninterrupted extraction."""
    write_nsynth(tmp_path / "nsynth", per_split=(8, 4, 4))
    first, _ = run_cli(tmp_path, "nsynth_pitch", tmp_path / "nsynth", "--epochs", "2")
    (store,) = store_dirs(tmp_path)
    assert sorted(p.name for p in store.iterdir()) == [".lock", "features.f16", "index.jsonl", "meta.json"]
    fs = features.FeatureStore(str(store))
    assert len(fs.index) == 16 and fs.rows == 16 and fs.row_shape == (3, 64)  # tiny: 2 layers + 1, 64 dims
    assert os.path.getsize(store / "features.f16") == 16 * 3 * 64 * 2  # float16
    reference = np.array(fs.array())
    stamp = (store / "features.f16").stat().st_mtime_ns
    second, _ = run_cli(tmp_path, "nsynth_instr", tmp_path / "nsynth", "--epochs", "2")  # shares the store
    assert store_dirs(tmp_path) == [store] and (store / "features.f16").stat().st_mtime_ns == stamp
    # interrupt: the last 5 clips' index lines lost, half a line written, and rows of an uncommitted batch on disk
    lines = (store / "index.jsonl").read_text().splitlines(keepends=True)
    (store / "index.jsonl").write_text("".join(lines[:11]) + lines[11][:9])
    with open(store / "features.f16", "r+b") as f:
        f.truncate(14 * 3 * 64 * 2)
        f.seek(0, 2)
        f.write(b"\x00\x01" * 100)
    third, _ = run_cli(tmp_path, "nsynth_pitch", tmp_path / "nsynth", "--epochs", "2")
    fs = features.FeatureStore(str(store))
    assert fs.rows == 16 and list(fs.index) == [json.loads(x)["key"] for x in lines[:11]] + list(fs.index)[11:]
    again = np.array(fs.array())
    for k, (start, n) in fs.index.items():  # the same rows per clip as before the interruption
        old_start, _ = [(json.loads(x)["start"], 0) for x in lines if json.loads(x)["key"] == k][0]
        np.testing.assert_allclose(again[start:start + n], reference[old_start:old_start + n], atol=1e-3)
    # deterministic given --seed: the same run twice gives the same numbers
    assert third["metrics"] == first["metrics"] and third["layer_weights"] == first["layer_weights"]
    # layer choices: MARBLE's 12 transformer layers (state 0 gets no weight) and one state alone
    marble, _ = run_cli(tmp_path, "nsynth_pitch", tmp_path / "nsynth", "--epochs", "1", "--layers", "transformer")
    assert marble["layer_weights"][0] == 0 and sum(marble["layer_weights"]) == pytest.approx(1, abs=1e-3)
    single, _ = run_cli(tmp_path, "nsynth_pitch", tmp_path / "nsynth", "--epochs", "1", "--layers", "1")
    assert single["layer_weights"] == [0, 1, 0] and single["layers"] == 1


def test_cache_key_settings_reextract(tmp_path):
    """Point 6 through the command line: the same settings reuse the store; another window re-extracts into a new
    one (and its meta.json names the setting); the old store is left as it was."""
    write_nsynth(tmp_path / "nsynth", per_split=(4, 2, 2))
    run_cli(tmp_path, "nsynth_pitch", tmp_path / "nsynth", "--epochs", "1")
    run_cli(tmp_path, "nsynth_pitch", tmp_path / "nsynth", "--epochs", "1")
    (store,) = store_dirs(tmp_path)
    record, _ = run_cli(tmp_path, "nsynth_pitch", tmp_path / "nsynth", "--epochs", "1", "--window", "1.5")
    assert len(store_dirs(tmp_path)) == 2
    new = [d for d in store_dirs(tmp_path) if d != store][0]
    assert json.loads((new / "meta.json").read_text())["key"]["window"] == 1.5
    assert record["windows"]["train"] == 4 * 3 and record["items"]["train"] == 4  # 4 s notes: 1.5 + 1.5 + 1.0 s
    assert features.FeatureStore(str(store)).rows == 8


def test_unreadable_clip_is_reported_with_its_path(tmp_path, capsys):
    write_nsynth(tmp_path / "nsynth", per_split=(8, 4, 4))
    bad = next((tmp_path / "nsynth" / "nsynth-train" / "audio").iterdir())
    bad.write_bytes(b"not audio")
    record, _ = run_cli(tmp_path, "nsynth_pitch", tmp_path / "nsynth", "--epochs", "1")
    assert record["clips"]["train"] == 7
    assert len(record["skipped"]) == 1 and str(bad) in record["skipped"][0]
    assert str(bad) in capsys.readouterr().out


def test_gtzan_end_to_end(tmp_path):
    root = tmp_path / "gtzan"
    (root / "genres").mkdir(parents=True)
    clips = tasks.select_clips(downstream.read_gtzan(str(root)).clips, 20)
    for i, c in enumerate(clips):  # GTZAN: 22,050 Hz mono 16-bit wav
        g = downstream.GTZAN_GENRES.index(c.key.split("/")[1])
        os.makedirs(os.path.dirname(c.path), exist_ok=True)
        sf.write(c.path, tone(110 * 2 ** (g / 4), 1.5, 22050, harmonics=2, seed=i), 22050, subtype="PCM_16")
    record, _ = run_cli(tmp_path, "gtzan_genre", root, "--max-clips", "20", "--epochs", "20")
    assert record["clips"] == {"train": 20, "valid": 20, "test": 20}
    assert "genres/jazz/jazz.00054.wav" not in [c.key for c in downstream.read_gtzan(str(root)).clips]
    assert record["lr"] == 5e-3  # GTZAN's base config
    assert 0.0 <= record["metrics"]["acc"] <= 1.0


def test_emo_end_to_end(tmp_path):
    root = tmp_path / "emo"
    (root / "clips_45seconds").mkdir(parents=True)
    artists = [f"Artist {chr(65 + i)}" for i in range(12)]
    rows, static = [], []
    for song in range(2, 38):
        artist = artists[song % 12]
        evaluation = song % 5 == 0
        arousal = 1 + 8 * ((song * 7) % 11) / 10  # 1..9 scale like the real annotations
        valence = 1 + 8 * ((song * 3) % 7) / 6
        rows.append([song, f"{song}.mp3", artist, f"Song {song}", "0.00", "0.45",
                     "evaluation" if evaluation else "development"])
        static.append([song, arousal, 0.5, valence, 0.5])
        # loudness follows arousal, brightness follows valence: 45 s clips would be slow, 2.5 s keep the layout
        audio = tone(100 + 40 * valence, 2.5, 44100, harmonics=1 + int(arousal) // 3, seed=song) * (arousal / 9)
        sf.write(root / "clips_45seconds" / f"{song}.mp3", np.stack([audio, audio], 1), 44100, format="MP3")
    with open(root / "songs_info.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["song_id", "file_name", "Artist", "Song title", "start of the segment (min.sec)",
                    "end of the segment (min.sec)", "Mediaeval 2013 set"])
        w.writerows(rows)
    with open(root / "static_annotations.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["song_id", " mean_arousal", " std_arousal", " mean_valence", " std_valence"])
        w.writerows(static)
    listing = downstream.read_emo(str(root))
    clips = listing.clips
    dev = np.stack([c.label for c in clips if c.split != "test"])
    np.testing.assert_allclose(dev.mean(0), 0, atol=1e-6)  # z-scored on the development songs
    np.testing.assert_allclose(dev.std(0), 1, atol=1e-5)
    assert {c.split for c in clips} == {"train", "valid", "test"}
    assert sum(c.split == "test" for c in clips) == sum(r[6] == "evaluation" for r in rows)
    by_artist = {}
    for c, r in zip(clips, rows):
        by_artist.setdefault(r[2], set()).add(c.split)
    assert all(len(s - {"test"}) <= 1 for s in by_artist.values())  # an artist never spans train and valid
    record, _ = run_cli(tmp_path, "emo", root, "--epochs", "20")
    assert (record["extraction"]["window"], record["extraction"]["crop"]) == (5.0, 30.0)  # paper / base config
    assert listing.labels == ["arousal", "valence"] and len(listing.target_mean) == 2
    assert set(record["metrics"]) == {"r2", "arousal_r2", "valence_r2"}
    assert record["metrics"]["r2"] == pytest.approx(
        (record["metrics"]["arousal_r2"] + record["metrics"]["valence_r2"]) / 2)
    assert record["metrics"]["r2"] > -5


def write_vocalset(root):
    """VocalSet's FULL/<singer>/<context>/<technique>/<file>.wav at 44.1 kHz: 20 singers x 3 techniques with 0.3 s
    of leading silence (trimmed) and 3.4, 6.4 or 9.4 s of voice (1, 2 or 3 chunks of 132,000 samples), one of
    MARBLE's renamed files and one file too short for a chunk. Returns {relative path: chunks}."""
    chunks = {}
    for si, singer in enumerate(downstream.VOCALSET_SINGERS):
        for ti, tech in enumerate(["belt", "breathy", "vibrato"]):
            folder = root / "FULL" / singer / "arpeggios" / tech
            folder.mkdir(parents=True)
            n = 1 + (si + ti) % 3
            voice = tone(150 + 15 * si, 0.4 + 3.0 * n, 44100, harmonics=1 + 3 * ti, seed=si * 10 + ti)
            sf.write(folder / f"{singer}_arpeggios_{tech}_a.wav", np.r_[np.zeros(int(0.3 * 44100), np.float32),
                                                                         voice], 44100, subtype="PCM_16")
            chunks[f"FULL/{singer}/arpeggios/{tech}/{singer}_arpeggios_{tech}_a.wav"] = n
    # one of MARBLE's renames: f4's straight arpeggios ship without the singer prefix
    folder = root / "FULL" / "f4" / "arpeggios" / "straight"
    folder.mkdir(parents=True)
    sf.write(folder / "arpeggios_straight_a.wav", tone(300, 3.4, 44100, seed=99), 44100, subtype="PCM_16")
    chunks["FULL/f4/arpeggios/straight/arpeggios_straight_a.wav"] = 1
    sf.write(folder / "too_short.wav", tone(300, 2.0, 44100, seed=98), 44100, subtype="PCM_16")  # no 3 s chunk
    return chunks


def test_vocalset_end_to_end(tmp_path):
    root = tmp_path / "vocalset"
    chunks = write_vocalset(root)
    rows = {r[4]: r for r in downstream.vocalset_files(str(root))}
    assert rows["FULL/f4/arpeggios/straight/arpeggios_straight_a.wav"][2] == "f4"
    tech = downstream.read_vocalset(str(root), "technique").clips
    assert {c.split for c in tech if c.key.split("/")[1] in downstream.VOCALSET_TEST_SINGERS} == {"test"}
    assert {c.split for c in tech} == {"train", "valid", "test"}
    assert not any("too_short" in c.key for c in tech)
    singer = downstream.read_vocalset(str(root), "singer")
    assert len(singer.clips) == len(tech) and singer.labels == downstream.VOCALSET_SINGERS
    assert all(c.label == downstream.VOCALSET_SINGERS.index(c.key.split("/")[1]) for c in singer.clips)

    # Point 1: MARBLE writes every 2.993 s chunk as its own file, so a chunk is one train/valid/test item and
    # accuracy (and early stopping) is per chunk, not per recording
    for task, clips in (("vocalset_tech", tech), ("vocalset_singer", singer.clips)):
        record, _ = run_cli(tmp_path, task, root, "--epochs", "10")
        for split in ("train", "valid", "test"):
            part = [c.key for c in clips if c.split == split]
            assert record["clips"][split] == len(part)
            assert record["items"][split] == record["windows"][split] == sum(chunks[k] for k in part)
        assert sum(record["items"].values()) > sum(record["clips"].values())
        correct = record["metrics"]["acc"] * record["items"]["test"]
        assert correct == pytest.approx(round(correct))  # a fraction of chunks


def test_mtt_end_to_end(tmp_path):
    root = tmp_path / "mtt"
    tags = [f"tag{i:02d}" for i in range(60)]  # the real file has 188 tag columns; the top 50 are kept
    rng = np.random.default_rng(0)
    header = ["clip_id"] + tags + ["mp3_path"]
    rows = []
    for i in range(48):
        hexdir = "0123456789abcdef"[i % 16]
        path = f"{hexdir}/artist_{i}-album-01-track_{i}-0-29.mp3"
        y = (rng.random(60) < np.linspace(0.6, 0.02, 60)).astype(int)
        y[i % 3] = 1  # three tags the audio carries
        rows.append([str(i)] + [str(v) for v in y] + [path])
        os.makedirs(root / "mp3" / hexdir, exist_ok=True)
        sf.write(root / "mp3" / path, tone(200 * (1 + i % 3), 1.5, 16000, seed=i), 16000, format="MP3")
    with open(root / "annotations_final.csv", "w") as f:
        for r in [header] + rows:
            f.write("\t".join(f'"{v}"' for v in r) + "\n")  # the real file quotes every field
    listing = downstream.read_mtt(str(root))
    clips = listing.clips
    counts = {s: sum(c.split == s for c in clips) for s in ("train", "valid", "test")}
    assert counts == {"train": 36, "valid": 3, "test": 9}  # 0-b / c / d-f
    assert clips[0].label.shape == (50,)
    # labels are the 50 most frequent tag columns, most frequent first
    table = np.array([[int(v) for v in r[1:-1]] for r in rows])
    top = sorted(range(60), key=lambda j: (-table[:, j].sum(), j))[:50]
    assert listing.labels == [tags[j] for j in top]  # the tag names, in label order
    np.testing.assert_array_equal(np.stack([c.label for c in clips]), table[:, top])
    assert clips[5].key == "mp3/" + rows[5][-1] and clips[5].split == "train"  # hex digit 5
    record, _ = run_cli(tmp_path, "mtt", root, "--epochs", "10")
    assert set(record["metrics"]) == {"roc_auc", "ap"}
    assert 0.0 <= record["metrics"]["roc_auc"] <= 1.0 and 0.0 <= record["metrics"]["ap"] <= 1.0


def test_sweep_through_the_cli(tmp_path):
    """Point 5: the sweep's weighted cell follows --layers: 'all' (13 states, the paper) by default, 'transformer'
    (MARBLE's code: state 0 left out) on request; the single states are always 0..layers."""
    write_nsynth(tmp_path / "nsynth", per_split=(16, 8, 8))
    record, _ = run_cli(tmp_path, "nsynth_pitch", tmp_path / "nsynth", "--epochs", "3", "--sweep")
    assert record["heads"] == len(runs.SWEEP_LRS) * 4  # tiny encoder: {all, 0, 1, 2} x 6 lrs
    best = max(record["grid"], key=lambda g: g["valid"])
    assert record["valid"]["acc"] == best["valid"] and record["metrics"] == best["test"]
    assert {g["layers"] for g in record["grid"]} == {"all", 0, 1, 2}
    marble, _ = run_cli(tmp_path, "nsynth_pitch", tmp_path / "nsynth", "--epochs", "3", "--sweep", "--layers",
                        "transformer", "--save-heads", str(tmp_path / "heads"))
    assert {g["layers"] for g in marble["grid"]} == {"transformer", 0, 1, 2} and marble["heads"] == 24
    saved = torch.load(tmp_path / "heads" / "nsynth_pitch.pt", weights_only=False)
    assert (saved["layers"], saved["lr"]) == (marble["layers"], marble["lr"])  # the grid's best cell is kept
    with pytest.raises(SystemExit):
        probe.parse_args(["--task", "mtt", "--model", "random", "--data-root", "x", "--sweep", "--layers", "3"])


def test_saved_heads_predict_new_audio(tmp_path, capsys):
    """Point 8: --save-heads writes the chosen head with its layer weights, task, label names and normalisation;
    `probe.py predict` applies it to audio files: its scores are the trained head's on the same clips."""
    write_nsynth(tmp_path / "nsynth")
    heads_dir = tmp_path / "heads"
    record, _ = run_cli(tmp_path, "nsynth_pitch", tmp_path / "nsynth", "--epochs", "15", "--batch-size", "8", "--lr",
                        "1e-2", "--save-heads", str(heads_dir))
    assert record["head_file"] == str(heads_dir / "nsynth_pitch.pt")
    saved = torch.load(heads_dir / "nsynth_pitch.pt", weights_only=False)
    assert saved["task"] == "nsynth_pitch" and saved["labels"][64] == "midi 64" and len(saved["labels"]) == 128
    assert saved["extraction"] == dict(record["extraction"]) and saved["extraction"]["normalize"] == "clip"
    assert saved["head"]["layer_weights"].tolist() == pytest.approx(record["layer_weights"], abs=1e-4)
    assert saved["test"] == record["metrics"] and saved["model_tag"] == record["model_tag"]
    test_clips = [c for c in downstream.read_nsynth(str(tmp_path / "nsynth"), "pitch").clips if c.split == "test"]
    capsys.readouterr()
    out = probe.main(["predict", "--heads", str(heads_dir), "--model", "random", "--device", "cpu",
                      *[c.path for c in test_clips]])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(out) == len(lines) == len(test_clips)
    assert lines[0].startswith(test_clips[0].path + "\tnsynth_pitch\tmidi ")
    top = [max(o["scores"], key=o["scores"].get) for o in out]
    acc = np.mean([t == f"midi {c.label}" for t, c in zip(top, test_clips)])
    assert acc == pytest.approx(record["metrics"]["acc"])  # the same head on the same notes
    assert all(sum(o["scores"].values()) <= 1 + 1e-6 and len(o["scores"]) == 5 for o in out)


def test_predict_regression_on_the_annotation_scale(tmp_path, capsys):
    """A regression head (EMO) prints its outputs back on the annotation's scale (targets were z-scored on the
    development songs) under the label names."""
    listing = downstream.Listing([], ["arousal", "valence"], [5.0, 4.0], [2.0, 1.0])
    task = tasks.TASKS["emo"]
    heads = ph.ProbeHeads(["all"], 1, 3, 64, 2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        heads.mix_w2.zero_()
        heads.mix_b2.copy_(torch.tensor([1.0, -2.0]))  # z-scores 1 and -2 -> 7.0 and 2.0
    enc = Encoder(models.MODEL_CONFIGS["tiny"]())
    r = dict(cell=(0, 0), layers="all", lr=1e-3, valid={}, test={})
    runs.save_head(str(tmp_path / "h"), "emo", task, listing, task.extraction, "random", "tag", enc, 3, heads, r)
    path = tmp_path / "song.wav"
    sf.write(path, tone(200, 12.0, SR), SR)
    (o,) = probe.main(["predict", "--heads", str(tmp_path / "h" / "emo.pt"), "--model", "random", str(path)])
    assert o["scores"] == pytest.approx({"arousal": 7.0, "valence": 2.0}) and o["windows"] == 3  # 5 + 5 + 2 s
    assert "arousal 7.000  valence 2.000" in capsys.readouterr().out


@pytest.mark.parametrize("make, expect", [
    (lambda p: p.write_bytes(b"not a checkpoint"), "expected one of our checkpoints"),
    (lambda p: torch.save({"model": {}}, p), "not one of our checkpoints"),
    (lambda p: torch.save({"encoder_config": {"dim": 64, "bogus": 1}, "encoder": {}}, p), "unknown fields"),
    (lambda p: (p.mkdir(), (p / "model.safetensors").write_bytes(b"")), "needs config.json"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{not json")), "config.json is not valid JSON"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text('{"model_type": "bert"}')), "not supported"),
])
def test_bad_model_is_one_line(tmp_path, make, expect):
    """Point 9: a broken checkpoint or model folder ends the run with one line naming the path and what was
    expected, before any data is read."""
    bad = tmp_path / "model"
    make(bad)
    with pytest.raises(SystemExit) as e:
        probe.main(["--task", "nsynth_pitch", "--model", str(bad), "--data-root", str(tmp_path)])
    msg = str(e.value.code)
    assert msg.startswith(f"--model {bad}: ") and expect in msg and "\n" not in msg and "Traceback" not in msg


def test_checkpoint_against_random_side_by_side(tmp_path, capsys):
    """The quick start's comparison: one of our checkpoints and `random` (same architecture, fixed seed) on the
    same task, printed side by side; the checkpoint's cache tag changes when the file changes."""
    from dataclasses import asdict
    write_nsynth(tmp_path / "nsynth", per_split=(8, 4, 4))
    torch.manual_seed(5)
    enc = Encoder(models.MODEL_CONFIGS["tiny"]())
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"encoder_config": asdict(enc.cfg), "encoder": enc.state_dict(), "step": 10}, ckpt)
    results = tmp_path / "results.jsonl"
    records = probe.main(["--task", "nsynth_pitch", "--model", str(ckpt), "random", "--data-root",
                          str(tmp_path / "nsynth"), "--cache-dir", str(tmp_path / "cache"), "--results", str(results),
                          "--epochs", "2"])
    out = capsys.readouterr().out
    table = out[out.index("\ntask"):]
    assert str(ckpt) in table and "random" in table and "nsynth_pitch" in table
    a, b = records["nsynth_pitch", str(ckpt), probe.SEED], records["nsynth_pitch", "random", probe.SEED]
    assert a["model_tag"] != b["model_tag"] and b["model_tag"].startswith(f"random-{enc.cfg.family}-")
    # random took the checkpoint's architecture: same number of hidden states in the head
    assert len(a["layer_weights"]) == len(b["layer_weights"]) == enc.cfg.layers + 1
    tag = a["model_tag"]
    torch.save({"encoder_config": asdict(enc.cfg), "encoder": enc.state_dict(), "step": 20}, ckpt)
    os.utime(ckpt, ns=(1, 1))
    assert models.model_tag(str(ckpt), enc.cfg, 0) != tag


def test_several_seeds_give_mean_and_sd(tmp_path, capsys):
    """--seed 3,4: each seed trains its own head and draws its own random encoder; the table shows mean ± sd."""
    write_nsynth(tmp_path / "nsynth", per_split=(8, 4, 4))
    records = probe.main(["--task", "nsynth_pitch", "--model", "random", "--model-config", "tiny", "--data-root",
                          str(tmp_path / "nsynth"), "--cache-dir", str(tmp_path / "cache"), "--results",
                          str(tmp_path / "results.jsonl"), "--epochs", "2", "--seed", "3,4"])
    assert sorted(records) == [("nsynth_pitch", "random", 3), ("nsynth_pitch", "random", 4)]
    r3, r4 = records["nsynth_pitch", "random", 3], records["nsynth_pitch", "random", 4]
    assert r3["seed"] == 3 and r4["seed"] == 4 and r3["model_tag"] != r4["model_tag"]  # two random encoders
    lines = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert [line["seed"] for line in lines] == [3, 4]
    out = capsys.readouterr().out
    accs = [r3["metrics"]["acc"], r4["metrics"]["acc"]]
    assert "mean ± sd over seeds 3,4" in out
    assert f"{np.mean(accs):.4f} ± {np.std(accs, ddof=1):.4f}" in out.splitlines()[-1]
    with pytest.raises(SystemExit):
        probe.parse_args(["--task", "nsynth_pitch", "--model", "random", "--data-root", "x", "--seed", "3,3"])



def test_task_all_goes_on_after_a_failed_task(tmp_path, monkeypatch, capsys):
    """--task all: a task that exits (here nsynth_instr, as the beat tasks' disk check does) is one line on screen
    and one record in the results file; the other task is scored, Table 1 and its CSV are written, and the exit
    status is 1."""
    write_nsynth(tmp_path / "root" / "nsynth", per_split=(8, 4, 4))
    real_run = probe.run

    def run(task_name, *a):
        if task_name == "nsynth_instr":
            sys.exit("not enough disk space\n  for the store")
        return real_run(task_name, *a)

    monkeypatch.setattr(probe, "run", run)
    results = tmp_path / "runs" / "results.jsonl"
    with pytest.raises(SystemExit) as e:
        probe.main(["--task", "all", "--model", "random", "--model-config", "tiny", "--data-root",
                    str(tmp_path / "root"), "--cache-dir", str(tmp_path / "cache"), "--results", str(results),
                    "--epochs", "1", "--device", "cpu"])
    assert e.value.code == 1
    lines = [json.loads(line) for line in open(results)]
    assert [(r["task"], r.get("failed")) for r in lines] == [("nsynth_instr", "not enough disk space for the store"),
                                                             ("nsynth_pitch", None)]
    out = capsys.readouterr().out
    assert "nsynth_instr  random  FAILED: not enough disk space for the store" in out
    assert "NSynthP" in out and "1 task run failed: nsynth_instr" in out
    (table,) = list((tmp_path / "runs").glob("*/table.csv"))
    assert table.read_text().splitlines()[0] == "model,model_tag,seed,nsynth_pitch/acc"  # only what ran
    assert (table.parent / "table.md").exists()
    assert [r["task"] for r in probe_report.load_results([str(results)])] == ["nsynth_pitch"]  # failed lines skipped
