"""probe.py --mode fe|ft1|ft2 (probing/finetune.py): which weights each mode trains, early stopping on the validation
loss at a known epoch with the best epoch's weights tested, gradient accumulation equal to one batch, fe's features
equal to the frozen probe's last state (the once-per-clip normalisation), clip logits averaged over windows, and the
command line end to end on a tiny NSynth fixture (results line with its mode, the report's separate rows, a saved
model that load_pretrained loads and that reproduces the test accuracy)."""
import dataclasses
import json
import os
from dataclasses import asdict

import numpy as np
import pytest
import soundfile as sf
import torch

import probe
from probing import models, tasks
import probing.features as pf
import probing.finetune as ft
from data import downstream
from model import Encoder, EncoderConfig, load_pretrained
from test_probe import tone, write_nsynth, write_vocalset

SR = 16000


def tiny_encoder(seed=0, **overrides):
    torch.manual_seed(seed)
    return Encoder(EncoderConfig.hubert_base(**{**models.TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def nsynth(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft") / "nsynth"
    write_nsynth(root, per_split=(8, 4, 4))
    return root


def nsynth_data(root, task_name="nsynth_instr"):
    task = tasks.TASKS[task_name]
    listing = task.reader(str(root))
    reader = ft.AudioReader(task.extraction)
    assert reader.scan(listing.clips) == {}
    data = {s: ft.make_items([c for c in listing.clips if c.split == s], reader, task.item, task.kind)
            for s in ("train", "valid", "test")}
    return task, reader, data


def fit(model, mode, task, reader, data, epochs=1, **kw):
    args = dict(epochs=epochs, batch_size=2, budget=8 * SR, head_lr=ft.FE_LR if mode == "fe" else ft.HEAD_LR,
                encoder_lr=ft.ENCODER_LR, seed=0, device="cpu", log=lambda *a: None)
    return ft.train(model, mode, task, reader, data, **{**args, **kw})


# ------------------------------------------------------------------------------------------------------------------
# what each mode trains

@pytest.mark.parametrize("mode", ["fe", "ft2", "ft1"])
def test_each_mode_trains_its_own_weights(nsynth, mode):
    """ft1: every weight of the encoder and the head moves; ft2: the conv front end stays, the rest moves; fe: only
    the head moves. The mask embedding (pre-training's masked frames) is unused without masking in all three. The
    caller's encoder is never modified (probe.py reuses it for the next task)."""
    task, reader, data = nsynth_data(nsynth)
    enc = tiny_encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    model = ft.prepare(enc, task.num_classes, mode, seed=0)
    head0 = {k: v.clone() for k, v in model.head.state_dict().items()}
    fit(model, mode, task, reader, data)  # 4 steps
    after = model.encoder.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    conv = {k for k in before if k.startswith("feature_extractor.")}
    assert conv and "mask_emb" not in moved
    rest = set(before) - conv - {"mask_emb"}
    if mode == "fe":
        assert moved == set()
    elif mode == "ft2":
        assert moved == rest
    else:
        assert moved == conv | rest
    assert all(not torch.equal(head0[k], v) for k, v in model.head.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())


def test_modes_configure_the_encoder():
    enc = tiny_encoder(dropout=0.1, attention_dropout=0.1, layerdrop=0.05, activation_dropout=0.0)
    fe, ft2, ft1 = (ft.prepare(enc, 3, m, seed=0).encoder.cfg for m in ("fe", "ft2", "ft1"))
    assert fe == enc.cfg  # a frozen feature extractor: run in eval mode, its config untouched
    for cfg in (ft2, ft1):
        assert {k: getattr(cfg, k) for k in ft.REGULARISATION} == ft.REGULARISATION
    assert (ft2.feature_grad_mult, ft1.feature_grad_mult) == (0.0, 1.0)
    # ft2's conv front end is frozen twice over (no autograd through it, no optimiser entry): each pinned here, as the
    # training test above passes while either one holds
    names = {n for n, _ in enc.named_parameters()}
    conv = {n for n in names if n.startswith("feature_extractor.")}
    for mode, want in (("fe", set()), ("ft2", names - conv - {"mask_emb"}), ("ft1", names - {"mask_emb"})):
        model = ft.prepare(enc, 3, mode, seed=0)
        assert {n for n, p in model.encoder.named_parameters() if p.requires_grad} == want
        assert all(p.requires_grad for p in model.head.parameters())


def test_optimiser_learning_rates():
    enc = tiny_encoder()
    for mode, want in (("fe", [1e-3]), ("ft2", [1e-4, 1e-5]), ("ft1", [1e-4, 1e-5])):
        model = ft.prepare(enc, 3, mode, seed=0)
        groups = ft.param_groups(model, mode, ft.FE_LR if mode == "fe" else ft.HEAD_LR, ft.ENCODER_LR)
        assert [g["lr"] for g in groups] == want
        assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------------------------------------------------------
# early stopping

def test_loss_plateau_by_hand():
    p = ft.LossPlateau(patience=3)
    seq = [5.0, 4.0, 4.0, float("nan"), 3.9, 4.5, 3.9, 4.0]  # equal is not lower; NaN never is
    stops = []
    for e, loss in enumerate(seq, 1):
        p.update(loss, e)
        stops.append(p.stop)
    assert p.best == 3.9 and p.best_epoch == 5
    assert stops == [False, False, False, False, False, False, False, True]  # epochs 6, 7, 8 did not improve


def test_training_stops_at_the_known_epoch_and_tests_the_best_weights(nsynth, monkeypatch):
    """Validation losses scripted by hand: the best (3.0) is at epoch 4 (a later 3.0 is not lower), so training
    must stop after epoch 14, the tenth epoch in a row without a lower loss, and end with epoch 4's weights."""
    task, reader, data = nsynth_data(nsynth)
    losses = [5.0, 4.0, 4.5, 3.0, 3.0, 3.5, 3.1, 3.2, 3.3, 3.4, 3.0, 3.05, 3.9, 3.2] + [0.1] * 10
    snapshots = []
    real = ft.evaluate

    def scripted(model, reader_, items, *a, **kw):
        out, _ = real(model, reader_, items, *a, **kw)
        snapshots.append(model.head.weight.detach().clone())
        return out, losses[len(snapshots) - 1]

    monkeypatch.setattr(ft, "evaluate", scripted)
    model = ft.prepare(tiny_encoder(), task.num_classes, "fe", seed=0)
    result = fit(model, "fe", task, reader, data, epochs=50)
    assert (result["best_epoch"], result["epochs"], result["stopped"]) == (4, 14, "early")
    assert [h["valid_loss"] for h in result["history"]] == losses[:14]
    assert len(snapshots) == 14 and not torch.equal(snapshots[3], snapshots[13])
    assert torch.equal(model.head.weight, snapshots[3])


def test_epoch_cap(nsynth):
    task, reader, data = nsynth_data(nsynth)
    model = ft.prepare(tiny_encoder(), task.num_classes, "fe", seed=0)
    result = fit(model, "fe", task, reader, data, epochs=2)
    assert result["epochs"] == 2 and result["stopped"] == "max_epochs"


# ------------------------------------------------------------------------------------------------------------------
# batches, pieces, features

def test_accumulated_pieces_give_the_whole_batch_gradient():
    """A batch of windows of different lengths, in one piece or one window per piece: the same gradient (dropout
    off; padded windows give exactly their own states, so pooling over valid frames sees no padding)."""
    model = ft.prepare(tiny_encoder(), 5, "ft1", seed=0)
    model.eval()
    rng = np.random.default_rng(0)
    windows = [rng.standard_normal(n).astype(np.float32) for n in (16000, 9000, 12345, 16000)]
    y = torch.tensor([0, 3, 1, 4])
    grads = []
    for budget in (10 ** 9, 1):
        model.zero_grad()
        loss = ft.accumulate(model, "multiclass", windows, y, budget, "cpu", ft.autocast_context("cpu", "float32"))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert ft.pieces([len(w) for w in windows], 1) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert ft.pieces([len(w) for w in windows], 3 * 16000) == [(0, 3), (3, 4)]  # 3 x 16000 padded, then the 4th
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == len(list(model.parameters())) - 1  # all but mask_emb
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        logits = ft.window_logits(model, windows, "cpu", ft.autocast_context("cpu", "float32"))
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)


def test_fe_features_are_the_frozen_probes_last_state(tmp_path):
    """fe's head reads exactly what the frozen probe stores as the last hidden state: the same windows (the clip
    z-normalised once, then cut) through an encoder that does not renormalise each window, even one configured to
    normalise its input (data2vec); mean over valid frames only."""
    cfg = EncoderConfig.data2vec_base(**models.TINY)
    torch.manual_seed(0)
    enc = Encoder(cfg).eval()
    wav = tone(330, 12.5, SR, harmonics=3)
    wav[: 5 * SR] = 0.05 * wav[: 5 * SR] + 0.2  # a quiet start off zero: per-window statistics differ from the
    # clip's (the LayerNorm'ed convs ignore scale, not an offset)
    path = tmp_path / "clip.wav"
    sf.write(path, wav, SR, subtype="FLOAT")
    ext = pf.Extraction(window=5.0)
    windows = pf.clip_windows(str(path), ext)
    assert [len(w) for w in windows] == [5 * SR, 5 * SR, int(2.5 * SR)]
    frozen = pf.pooled_hidden_states(enc, windows, "cpu")[:, -1]
    model = ft.prepare(enc, 4, "fe", seed=0).eval()
    lengths = torch.tensor([len(w) for w in windows])
    batch = torch.zeros(3, 5 * SR)
    for i, w in enumerate(windows):
        batch[i, :len(w)] = torch.from_numpy(w)
    with torch.no_grad():
        pooled = model.pooled(batch, lengths)
        renormalised = enc(torch.from_numpy(windows[0])[None]).last_hidden_state.mean(1)[0]
    torch.testing.assert_close(pooled, frozen, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(renormalised, frozen[0], atol=1e-2)  # what the once-per-clip rule avoids


def test_clip_logits_are_the_mean_of_their_windows(tmp_path):
    """A clip's windows are its rows (each with the clip's label); evaluation averages their logits, as the frozen
    probe; item="window" tasks (VocalSet) make every window an item."""
    ext = pf.Extraction(window=1.0)
    clips = []
    for i, seconds in enumerate((3.0, 1.0, 2.5)):
        path = tmp_path / f"{i}.wav"
        sf.write(path, tone(200 + 100 * i, seconds, SR, seed=i), SR, subtype="FLOAT")
        clips.append(downstream.Clip(f"{i}.wav", str(path), "valid", i))
    reader = ft.AudioReader(ext)
    assert reader.scan(clips) == {} and reader.count == {"0.wav": 3, "1.wav": 1, "2.wav": 2}  # 0.5 s left out
    model = ft.prepare(tiny_encoder(), 3, "fe", seed=0)
    autocast = ft.autocast_context("cpu", "float32")
    items = ft.make_items(clips, reader, "clip", "multiclass")
    out, loss = ft.evaluate(model, reader, items, "multiclass", 10 ** 9, "cpu", autocast, batch_size=2)
    for i, c in enumerate(clips):
        want = ft.window_logits(model, reader.windows(c), "cpu", autocast).mean(0)
        torch.testing.assert_close(out[i], want, rtol=1e-4, atol=1e-5)
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(out, torch.tensor([0, 1, 2]))))
    per_window = ft.make_items(clips, reader, "window", "multiclass")
    assert len(per_window) == 6 and per_window.y.tolist() == [0, 0, 0, 1, 2, 2]
    assert list(per_window.window) == [0, 1, 2, 0, 0, 1]
    batches = list(ft.batches(reader, items, np.arange(3), 2))
    assert [len(w) for _, w, _ in batches] == [4, 2] and batches[0][2].tolist() == [0, 0, 0, 1]


def test_audio_beyond_the_memory_budget_is_read_again(tmp_path):
    ext = pf.Extraction(window=1.0)
    clips = []
    for i in range(3):
        path = tmp_path / f"{i}.wav"
        sf.write(path, tone(200 + 50 * i, 2.0, SR, seed=i), SR, subtype="FLOAT")
        clips.append(downstream.Clip(f"{i}.wav", str(path), "train", i))
    reader = ft.AudioReader(ext, cache_bytes=2 * 2 * SR * 4)  # two clips of two 1 s float32 windows
    reader.scan(clips)
    assert set(reader.cache) == {"0.wav", "1.wav"}
    again = reader.windows(clips[2])
    for a, b in zip(again, pf.clip_windows(clips[2].path, ext)):
        np.testing.assert_array_equal(a, b)
    os.remove(clips[2].path)
    with pytest.raises(ft.AudioError, match="2.wav"):
        reader.windows(clips[2])


# ------------------------------------------------------------------------------------------------------------------
# the command line

def tiny_checkpoint(path):
    enc = tiny_encoder(seed=3)
    torch.save(dict(encoder_config=asdict(enc.cfg), encoder=enc.state_dict()), path)
    return enc


def test_cli_end_to_end_with_saved_model_and_report(tmp_path, capsys):
    root = tmp_path / "nsynth"
    write_nsynth(root, per_split=(16, 8, 8))
    ckpt = tmp_path / "tiny.pt"
    enc = tiny_checkpoint(ckpt)
    results = tmp_path / "results.jsonl"
    common = ["--task", "nsynth_instr", "--model", str(ckpt), "--data-root", str(root), "--results", str(results),
              "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]
    rec = probe.main(common + ["--mode", "ft2", "--epochs", "2", "--batch-size", "4", "--save-model",
                               str(tmp_path / "models")])[("nsynth_instr", str(ckpt), probe.SEED)]
    probe.main(common + ["--epochs", "2", "--batch-size", "4"])  # the frozen probe on the same model
    lines = [json.loads(x) for x in open(results)]
    assert [x.get("mode", "frozen") for x in lines] == ["ft2", "frozen"]
    assert lines[0]["metrics"] == rec["metrics"] and rec["mode"] == "ft2" and rec["layers"] == "last"
    assert rec["lr"] == 1e-4 and rec["encoder_lr"] == 1e-5 and rec["epochs"] == 2 and rec["max_epochs"] == 2
    assert rec["clips"] == {"train": 16, "valid": 8, "test": 8} and rec["regularisation"] == ft.REGULARISATION
    assert len(rec["history"]) == 2 and rec["seconds"]["cpu"] > 0

    # the saved model: load_pretrained reads it; ft2 left the conv front end as it was and moved the rest
    saved = load_pretrained(rec["model_file"])
    assert rec["model_file"].endswith("nsynth_instr-ft2.pt") and saved.cfg == enc.cfg
    for k, v in saved.state_dict().items():
        assert torch.equal(v, enc.state_dict()[k]) == (k.startswith("feature_extractor.") or k == "mask_emb"), k
    blob = torch.load(rec["model_file"], weights_only=False)
    assert blob["mode"] == "ft2" and blob["labels"] == downstream.NSYNTH_FAMILIES
    # the encoder and head saved reproduce the run's test accuracy
    model = ft.FineTuneModel(saved, len(blob["labels"]))
    model.head.load_state_dict(blob["head"])
    test = [c for c in tasks.TASKS["nsynth_instr"].reader(str(root)).clips if c.split == "test"]
    with torch.no_grad():
        logits = torch.stack([model(torch.from_numpy(pf.clip_windows(c.path, pf.Extraction())[0])[None])[0]
                              for c in test])
    acc = float((logits.argmax(1) == torch.tensor([c.label for c in test])).float().mean())
    assert acc == pytest.approx(rec["metrics"]["acc"])

    # probe.py report: the frozen and the fine-tuned run of one model are two rows
    capsys.readouterr()
    text = probe.main(["report", str(results), "--out", str(tmp_path / "report")])
    rows = [line for line in text.splitlines() if str(ckpt) in line]
    assert len(rows) == 2 and sum("[ft2]" in r for r in rows) == 1
    table = [line.split(",")[0] for line in open(tmp_path / "report" / "table.csv")][1:]
    assert sorted(table) == sorted([str(ckpt), f"{ckpt} [ft2]"])


def test_cli_vocalset_items_are_chunks(tmp_path):
    """An item="window" task fine-tunes on every 2.993 s chunk as its own item (MARBLE's VocalSet files), as the
    frozen probe counts them; an unusable file is left out with its path, as the frozen probe does."""
    root = tmp_path / "vocalset"
    chunks = write_vocalset(root)
    results = tmp_path / "r.jsonl"
    rec = probe.main(["--task", "vocalset_tech", "--mode", "ft1", "--model", "random", "--model-config", "tiny",
                      "--data-root", str(root), "--epochs", "1", "--results", str(results), "--device", "cpu"])[
        ("vocalset_tech", "random", probe.SEED)]
    clips = downstream.read_vocalset(str(root), "technique").clips
    for split in ("train", "valid", "test"):
        part = [c.key for c in clips if c.split == split and "too_short" not in c.key]
        assert rec["items"][split] == rec["windows"][split] == sum(chunks[k] for k in part)
    assert rec["item"] == "window" and rec["epochs"] == 1
    correct = rec["metrics"]["acc"] * rec["items"]["test"]
    assert correct == pytest.approx(round(correct))


def test_cli_refuses_what_fine_tuning_does_not_run(tmp_path, capsys):
    """A task fine-tuning does not run is refused with its reason in one line (usage aside); --task all leaves those
    out (one line each) and keeps part 1's clip tasks; frozen-probe flags are refused in the fine-tuning modes."""
    base = ["--model", "random", "--data-root", str(tmp_path)]
    for task, words in (("gs_key", "per song"), ("mtg_genre", "3,764 h"), ("gtzan_beat", "frame-level")):
        with pytest.raises(SystemExit):
            probe.parse_args(["--task", task, "--mode", "ft1"] + base)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"error: --mode ft1 --task {task}: not fine-tuned: " in err and words in err
    for extra in (["--mode", "ft1", "--sweep"], ["--mode", "fe", "--layers", "3"], ["--save-model", "x"],
                  ["--mode", "fe", "--encoder-lr", "1e-4"], ["--mode", "ft2", "--save-heads", "x"]):
        with pytest.raises(SystemExit):
            probe.parse_args(["--task", "nsynth_pitch"] + extra + base)
    capsys.readouterr()
    args = probe.parse_args(["--task", "all", "--mode", "fe"] + base)
    assert set(args.tasks) == {"nsynth_instr", "nsynth_pitch", "gtzan_genre", "emo", "vocalset_tech",
                               "vocalset_singer", "mtt"}
    skips = capsys.readouterr().out.splitlines()
    assert len(skips) == len(tasks.TASKS) - 7 and all(s.startswith("skip ") for s in skips)
    assert args.batch_seconds == ft.MICRO_SECONDS["cpu"]
    assert probe.parse_args(["--task", "nsynth_pitch"] + base).batch_seconds == 60.0  # frozen: as before


def test_refusal_messages_are_one_line():
    for task, words in (("gs_key", "per song"), ("mtg_genre", "3,764 h"), ("gtzan_beat", "frame-level")):
        why = ft.refusal(task, tasks.TASKS[task])
        assert words in why and "\n" not in why
    assert all(ft.refusal(t, tasks.TASKS[t]) is None for t in ("nsynth_pitch", "emo", "vocalset_tech", "mtt"))


def test_fe_pooled_once_equals_the_encoder_every_step(nsynth, monkeypatch):
    """fe computes each window's pooled features once (the encoder is frozen and in eval mode): the head it trains is
    the one trained with the encoder run on the audio of every step."""
    task, reader, data = nsynth_data(nsynth)
    heads = []
    for once in (True, False):
        monkeypatch.setattr(ft, "FE_POOLED_ONCE", once)
        model = ft.prepare(tiny_encoder(), task.num_classes, "fe", seed=0)
        result = fit(model, "fe", task, reader, data, epochs=3)
        assert not model.pooled_input
        heads.append((model.head.weight.detach().clone(), result["history"]))
    torch.testing.assert_close(heads[0][0], heads[1][0], rtol=1e-4, atol=1e-6)
    for a, b in zip(heads[0][1], heads[1][1]):
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-5)
