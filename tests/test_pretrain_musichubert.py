"""MusicHuBERT pre-training end to end on a tiny synthetic corpus: learning, DDP equivalence, exact resume, errors.

The corpus (2 s clips) and its MFCC k-means labels are made once per module with data/synth.py and kmeans.py.
Training runs in-process (the script's globals are reset by reloading the module) except the torchrun test.
"""
import importlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 20
TINY = dict(conv_channels=32, layers=2, dim=32, heads=2, ffn=64, final_dim=16, batch_size=4, grad_accum=1,
            crop_seconds=2.0, min_seconds=1.0, num_workers=0, log_interval=1, ckpt_interval=1000, warmup_steps=2,
            learning_rate=2e-3, group_by_length=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data.synth import write_corpus
    import kmeans
    root = tmp_path_factory.mktemp("hubert_corpus")
    write_corpus(str(root / "synth"), hours=24 * 2.0 / 3600, clip_seconds=2.0, seed=0, valid_percent=0.0,
                 workers=1, progress=False)
    tsv = str(root / "synth" / "train.tsv")
    kmeans.main(["features", "--manifest", tsv, "--out", str(root / "mfcc"), "--workers", "0"])
    kmeans.main(["fit", str(root / "mfcc"), "--k", str(K), "--out", str(root / "km.pt"), "--seed", "0"])
    kmeans.main(["label", str(root / "mfcc"), "--km", str(root / "km.pt"), "--out", str(root / "labels")])
    return {"root": root, "tsv": tsv, "labels": str(root / "labels")}


def run(corpus, out_dir, patch=None, **overrides):
    """Run pretrain_musichubert.main() in this process with TINY + overrides; returns the module (its globals).
    patch(module) is called after the module is reloaded (fresh globals), before main()."""
    import pretrain_musichubert as script
    script = importlib.reload(script)  # fresh hyperparameter globals
    if patch is not None:
        patch(script)
    args = {**TINY, "train_tsv": corpus["tsv"], "label_dir": corpus["labels"], "out_dir": str(out_dir),
            "dropout": 0.0, "attention_dropout": 0.0, "dropout_input": 0.0, "layerdrop": 0.0, **overrides}
    old = sys.argv
    sys.argv = ["pretrain_musichubert.py"] + [f"--{k}={v}" for k, v in args.items()]
    try:
        script.main()
    finally:
        sys.argv = old
    return script


def read_log(out_dir):
    """step -> metrics (the last entry per step: a resumed run re-logs nothing it already logged, but be safe)."""
    rows = {}
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            rows[r["step"]] = r
    return rows


def final_params(out_dir):
    import training
    ckpt = training.load_checkpoint(training.latest_checkpoint(str(out_dir)))
    return {**{"encoder." + k: v for k, v in ckpt["encoder"].items()},
            **{"final_proj." + k: v for k, v in ckpt["final_proj"].items()}, "label_embs": ckpt["label_embs"]}


# ---------------------------------------------------------------------------------------------------------------
# pieces

def test_align_labels_100hz_and_50hz():
    from pretrain_musichubert import align_labels
    labels = torch.arange(10)[None]  # 100 Hz: frame t takes label 2t
    assert align_labels(labels, 5, 100.0).tolist() == [[0, 2, 4, 6, 8]]
    assert align_labels(labels, 7, 100.0).tolist() == [[0, 2, 4, 6, 8]]  # too few labels: frames trimmed to 10/2
    assert align_labels(labels, 4, 50.0).tolist() == [[0, 1, 2, 3]]
    # whole-file snip-edges MFCC (1 + (N-400)//160 labels) vs conv frames (1 + (N-400)//320): fairseq's test
    # `ratio * frames > labels` drops the last frame when (N - 400) % 320 < 160, though its label exists
    for n, dropped in ((16000, 0), (32123, 1), (250000, 1), (250300, 0)):
        mfcc, conv = 1 + (n - 400) // 160, 1 + (n - 400) // 320
        assert align_labels(torch.zeros(1, mfcc), conv, 100.0).shape[1] == conv - dropped


def test_head_loss_matches_reference_formula():
    """CE over cosine logits / 0.1 against (K + 4) label embeddings, summed over masked frames; accuracy by argmax."""
    import pretrain_musichubert as script
    from model import EncoderConfig
    torch.manual_seed(0)
    cfg = EncoderConfig.hubert_base(conv_layers=((16, 10, 5),) + ((16, 3, 2),) * 4 + ((16, 2, 2),) * 2, layers=1,
                                    dim=16, heads=2, ffn=32, dropout=0.0, attention_dropout=0.0, dropout_input=0.0,
                                    layerdrop=0.0)
    model = script.MusicHubert(cfg, num_classes=5).eval()
    assert model.label_embs.shape == (5 + 4, script.final_dim)
    wav = torch.randn(2, 3200)
    T = model.encoder.num_frames(3200)
    targets = torch.randint(0, 5, (2, T))
    targets[1, -3:] = -1  # no label: never scored
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[:, 2:6] = True
    mask[1, -3:] = True
    ce_sum, correct, pen, ce_u = model(wav, targets, mask)
    assert float(ce_u) == 0.0  # not computed at pred_nomask_weight 0
    out = model.encoder(wav, mask=mask)
    sel = mask & (targets >= 0)
    proj = model.final_proj(out.hidden_states[-1][sel])
    cos = torch.nn.functional.cosine_similarity(proj[:, None, :], model.label_embs[None], dim=-1) / 0.1
    ref = torch.nn.functional.cross_entropy(cos, targets[sel] + 4, reduction="sum")
    torch.testing.assert_close(ce_sum, ref, rtol=1e-5, atol=1e-5)
    assert int(correct) == int((cos.argmax(-1) == targets[sel] + 4).sum())
    torch.testing.assert_close(pen, out.conv_features.pow(2).mean())

    # pred_nomask_weight > 0: the same CE over the unmasked labelled frames comes back apart (the loss adds it x the
    # weight); the masked CE and the accuracy do not change
    unsel = ~mask & (targets >= 0)
    proj_u = model.final_proj(out.hidden_states[-1][unsel])
    cos_u = torch.nn.functional.cosine_similarity(proj_u[:, None, :], model.label_embs[None], dim=-1) / 0.1
    ref_u = torch.nn.functional.cross_entropy(cos_u, targets[unsel] + 4, reduction="sum")
    old = script.pred_nomask_weight
    try:
        script.pred_nomask_weight = 0.5
        ce_w, correct_w, _, ce_u = model(wav, targets, mask)
    finally:
        script.pred_nomask_weight = old
    torch.testing.assert_close(ce_w, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce_u, ref_u, rtol=1e-5, atol=1e-5)
    assert int(correct_w) == int(correct)


def test_masks_do_not_depend_on_world_size():
    import pretrain_musichubert as script
    a = script.mask_for((4, 99), step=3, global_micro=1)
    assert torch.equal(a, script.mask_for((4, 99), step=3, global_micro=1))
    assert not torch.equal(a, script.mask_for((4, 99), step=4, global_micro=1))
    assert (a.sum(1) == a.sum(1)[0]).all() and a.sum() > 0  # same_count, as fairseq's require_same_masks


# ---------------------------------------------------------------------------------------------------------------
# training runs

@pytest.mark.slow
def test_loss_falls_and_accuracy_beats_chance(corpus, tmp_path):
    run(corpus, tmp_path, max_steps=60, dim=64, ffn=128, batch_size=8, learning_rate=5e-3, warmup_steps=5)
    log = read_log(tmp_path)
    first = np.mean([log[s]["ce"] for s in range(1, 11)])
    last = np.mean([log[s]["ce"] for s in range(51, 61)])
    acc_first = np.mean([log[s]["acc"] for s in range(1, 11)])
    acc = np.mean([log[s]["acc"] for s in range(51, 61)])
    # majority-class rate of the (50 Hz) labels: a model that only learnt the label frequencies gets about this
    with open(os.path.join(corpus["labels"], "train.km")) as f:
        ids = np.concatenate([np.array(line.split(), dtype=int)[::2] for line in f])
    majority = np.bincount(ids).max() / len(ids)
    print(f"CE {first:.3f} -> {last:.3f}; accuracy {acc_first:.3f} -> {acc:.3f} (chance {1 / K:.3f}, "
          f"majority class {majority:.3f})")
    assert last < first - 0.4
    assert acc > acc_first + 0.05 and acc > 3.0 / K and acc > majority + 0.03
    # the logged label-frequency baseline is that majority rate, measured on the scored (masked) frames
    acc_base = np.mean([log[s]["acc_base"] for s in range(1, 61)])
    assert abs(acc_base - majority) < 0.03 and acc > np.mean([log[s]["acc_base"] for s in range(51, 61)]) + 0.03


def test_unmasked_frames_scored_when_weighted(corpus, tmp_path):
    """pred_nomask_weight=1 (the quick start's): the unmasked frames' CE is logged, falls, and is in the loss."""
    run(corpus, tmp_path, max_steps=40, dim=64, ffn=128, batch_size=8, learning_rate=5e-3, warmup_steps=5,
        pred_nomask_weight=1.0)
    log = read_log(tmp_path)
    first = np.mean([log[s]["ce_nomask"] for s in range(1, 11)])
    last = np.mean([log[s]["ce_nomask"] for s in range(31, 41)])
    assert last < first - 0.3, (first, last)
    # loss = (masked CE sum + unmasked CE sum) / masked frames + 10 x penalty: above the masked part alone
    assert all(log[s]["loss"] > log[s]["ce"] + 10 * log[s]["pen"] + 0.1 for s in range(1, 41))


def test_kill_and_resume_gives_identical_losses(corpus, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = dict(max_steps=6, dropout=0.1, layerdrop=0.2, dropout_input=0.1)  # every RNG the loop draws from
    run(corpus, full, **common)
    run(corpus, part, stop_at_step=3, **common)  # the "kill": save at step 3 and exit
    assert training_steps(part) == [3]
    run(corpus, part, **common)  # resumes from ckpt_00000003.pt
    a, b = read_log(full), read_log(part)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in range(1, 7):
        assert a[s]["loss"] == b[s]["loss"] and a[s]["acc"] == b[s]["acc"], s
    pa, pb = final_params(full), final_params(part)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def training_steps(out_dir):
    import training
    return [int(os.path.basename(p)[5:13]) for p in training.list_checkpoints(str(out_dir))]


def test_sigterm_saves_and_exits(corpus, tmp_path):
    """SIGTERM mid-run: the loop saves a checkpoint at the next step boundary and returns cleanly."""
    import signal
    import training
    old = signal.getsignal(signal.SIGTERM)
    original = training.polynomial_decay_lr
    calls = []

    def lr_then_signal(step, *a, **k):  # send the signal during step 2
        calls.append(step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(step, *a, **k)

    training.polynomial_decay_lr = lr_then_signal
    try:
        run(corpus, tmp_path, max_steps=50)
    finally:
        training.polynomial_decay_lr = original
        signal.signal(signal.SIGTERM, old)
    assert training_steps(tmp_path) == [3] and max(calls) == 2


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(corpus, tmp_path):
    """torchrun with 2 CPU ranks x 1 micro-batch == 1 process x 2 micro-batches (same global batch): same masks,
    same loss normalisation (global masked-frame count), hence the same parameters up to float rounding."""
    steps = 4
    args = {**TINY, "train_tsv": corpus["tsv"], "label_dir": corpus["labels"], "max_steps": steps, "grad_accum": 2,
            "dropout": 0.0, "attention_dropout": 0.0, "dropout_input": 0.0, "layerdrop": 0.0}
    run(corpus, tmp_path / "single", **{k: v for k, v in args.items() if k not in ("train_tsv", "label_dir")})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "pretrain_musichubert.py")] + [f"--{k}={v}" for k, v in args.items()] + \
          [f"--out_dir={tmp_path / 'ddp'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_log(tmp_path / "single"), read_log(tmp_path / "ddp")
    for s in range(1, steps + 1):
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-5), s
        assert a[s]["clips/s"] > 0 and b[s]["acc"] == pytest.approx(a[s]["acc"], abs=0.02)
    pa, pb = final_params(tmp_path / "single"), final_params(tmp_path / "ddp")
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5, msg=k)


# ---------------------------------------------------------------------------------------------------------------
# bad data

def _copy_labels(corpus, tmp_path):
    d = tmp_path / "labels"
    shutil.copytree(corpus["labels"], d)
    return d


def _run_error(corpus, tmp_path, **overrides):
    with pytest.raises(SystemExit) as e:
        run(corpus, tmp_path / "out", **{"max_steps": 2, **overrides})
    return str(e.value.code)


def test_label_file_with_missing_line_stops_before_training(corpus, tmp_path):
    d = _copy_labels(corpus, tmp_path)
    lines = (d / "train.km").read_text().splitlines(keepends=True)
    (d / "train.km").write_text("".join(lines[:-1]))
    msg = _run_error(corpus, tmp_path, label_dir=str(d))
    assert "train.km" in msg and f"{len(lines) - 1} label lines" in msg and "manifest" in msg
    assert not (tmp_path / "out" / "log.jsonl").exists()


def test_label_line_too_short_names_the_line(corpus, tmp_path):
    d = _copy_labels(corpus, tmp_path)
    lines = (d / "train.km").read_text().splitlines()
    lines[4] = " ".join(lines[4].split()[:-15])  # 0.15 s short at 100 Hz: beyond the 0.1 s tolerance
    (d / "train.km").write_text("\n".join(lines) + "\n")
    msg = _run_error(corpus, tmp_path, label_dir=str(d))
    assert "train.km:5:" in msg


def test_label_rate_mismatch_is_an_error(corpus, tmp_path):
    msg = _run_error(corpus, tmp_path, label_rate=50.0)  # 100 Hz labels declared as 50 Hz
    assert "train.km:1:" in msg and "label_rate" in msg


def test_label_beyond_dictionary_names_the_line(corpus, tmp_path):
    d = _copy_labels(corpus, tmp_path)
    lines = (d / "train.km").read_text().splitlines()
    ids = lines[2].split()
    ids[7] = str(K + 3)
    lines[2] = " ".join(ids)
    (d / "train.km").write_text("\n".join(lines) + "\n")
    msg = _run_error(corpus, tmp_path, label_dir=str(d))
    assert "train.km:3:" in msg and "dict.km.txt" in msg


def _corrupt_corpus(corpus, tmp_path):
    """A copy of the manifest whose 3rd clip is not audio."""
    root = tmp_path / "bad"
    shutil.copytree(corpus["root"] / "synth" / "audio", root / "audio")
    lines = open(corpus["tsv"]).read().splitlines()
    lines[0] = str(root)
    (root / "train.tsv").write_text("\n".join(lines) + "\n")
    bad = lines[3].split("\t")[0]
    (root / bad).write_bytes(b"this is not a wav file" * 100)
    return str(root / "train.tsv"), bad


def test_bad_audio_is_an_error_by_default(corpus, tmp_path):
    tsv, bad = _corrupt_corpus(corpus, tmp_path)
    msg = _run_error(corpus, tmp_path, train_tsv=tsv, max_steps=8)
    assert bad in msg and "skip_bad_audio" in msg


def test_bad_audio_skipped_when_asked(corpus, tmp_path, caplog):
    tsv, bad = _corrupt_corpus(corpus, tmp_path)
    run(corpus, tmp_path / "out", train_tsv=tsv, max_steps=8, skip_bad_audio=True)
    assert sorted(read_log(tmp_path / "out")) == list(range(1, 9))
    assert any(bad in r.getMessage() for r in caplog.records)


def test_config_errors_are_one_line(corpus, tmp_path):
    assert "unknown key 'mask_prop'" in _run_error(corpus, tmp_path, mask_prop=0.5)
    assert "mask_length must be int" in _run_error(corpus, tmp_path, mask_length=2.5)


def test_nonfinite_loss_skips_update_then_stops(corpus, tmp_path):
    def nan_on_calls(bad):
        def patch(script):
            forward, calls = script.MusicHubert.forward, [0]

            def patched(self, *a):
                calls[0] += 1
                ce, correct, pen, ce_u = forward(self, *a)
                return (ce * float("nan"), correct, pen, ce_u) if calls[0] in bad else (ce, correct, pen, ce_u)
            script.MusicHubert.forward = patched
        return patch

    # one bad step: skipped and counted, training goes on
    run(corpus, tmp_path / "one", patch=nan_on_calls({2}), max_steps=4)
    log = read_log(tmp_path / "one")
    assert [log[s]["skipped"] for s in (1, 2, 3, 4)] == [0, 1, 1, 1]
    assert all(np.isfinite(log[s]["loss"]) for s in (1, 3, 4))
    # every step bad: the run stops after max_nonfinite_in_row in a row, with a message
    with pytest.raises(SystemExit) as e:
        run(corpus, tmp_path / "all", patch=nan_on_calls(set(range(1, 100))), max_steps=20, max_nonfinite_in_row=3)
    assert "3 non-finite losses in a row" in str(e.value.code)


def test_iteration2_in_one_command(corpus, tmp_path):
    """Features of a trained checkpoint's layer -> k-means -> 50 Hz labels -> training, from one invocation."""
    run(corpus, tmp_path / "iter1", max_steps=2)
    import training
    ckpt = training.latest_checkpoint(str(tmp_path / "iter1"))
    script = run(corpus, tmp_path / "iter2", max_steps=2, iteration2_from=ckpt, iteration2_layer=1,
                 iteration2_clusters=8, iteration2_percent=0.5)
    labels = tmp_path / "iter2" / "iteration2" / "labels"
    lines = (labels / "train.km").read_text().splitlines()
    assert len(lines) == 24 and all(len(line.split()) == 99 for line in lines)  # 2 s clips at 50 Hz
    assert len((labels / "dict.km.txt").read_text().splitlines()) == 8
    final = training.load_checkpoint(training.latest_checkpoint(str(tmp_path / "iter2")))
    assert final["num_classes"] == 8 and final["label_rate"] == 50.0 and final["step"] == 2
    assert script.label_rate == 50.0
