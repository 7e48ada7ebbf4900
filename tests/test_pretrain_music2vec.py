"""Tests for pretrain_music2vec.py: EMA teacher, targets, loss, collapse guard, training, DDP and resume."""
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pretrain_music2vec as m2v


# ---------------------------------------------------------------------------------------------------- EMA teacher

def test_ema_decay_schedule_by_hand():
    # linear 0.999 -> 0.9999 over 30k updates, then held
    assert m2v.ema_decay_at(0) == pytest.approx(0.999, abs=1e-12)
    assert m2v.ema_decay_at(15_000) == pytest.approx(0.99945, abs=1e-12)
    assert m2v.ema_decay_at(3_000) == pytest.approx(0.999 + 0.1 * 0.0009, abs=1e-12)
    assert m2v.ema_decay_at(30_000) == 0.9999
    assert m2v.ema_decay_at(400_000) == 0.9999
    assert m2v.ema_decay_at(5, start=0.5, end=0.9, anneal_steps=10) == pytest.approx(0.7)


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.pos_conv = nn.Conv1d(4, 4, 3, padding=1)
        self.layer_norm = nn.LayerNorm(4)
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.register_buffer("counter", torch.zeros(1))


def test_ema_update_by_hand():
    torch.manual_seed(0)
    student = TinyTransformer()
    teacher = m2v.make_teacher(student)
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    start = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():  # the optimizer moves the student
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student.counter.fill_(7)
    copied = m2v.copied_param_names(student)
    assert copied == {"pos_conv.weight", "pos_conv.bias"}
    decay = 0.9
    m2v.ema_update(teacher, student, decay, copied)
    s = student.state_dict()
    for name, value in teacher.state_dict().items():
        if name.startswith("pos_conv") or name == "counter":
            expected = s[name]
        else:
            expected = decay * start[name] + (1 - decay) * s[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-7, msg=name)


def test_ema_teacher_stays_float32_with_bf16_student():
    student = TinyTransformer()
    teacher = m2v.make_teacher(student)
    student = student.to(torch.bfloat16)
    m2v.ema_update(teacher, student, 0.5, set())
    assert all(p.dtype == torch.float32 for p in teacher.parameters())


# -------------------------------------------------------------------------------------------------------- targets

def targets_by_hand(ffn, lengths, top_k):
    """Loop over clips and layers: cut each clip to its length, F.instance_norm, average the top-K layers."""
    B, T, C = ffn[0].shape
    out = torch.zeros(B, T, C)
    for b in range(B):
        n = int(lengths[b])
        acc = torch.zeros(n, C)
        for layer in range(len(ffn) - top_k, len(ffn)):
            clip = ffn[layer][b, :n].t()[None]  # 1 x C x n
            acc += F.instance_norm(clip.double(), eps=1e-5)[0].t().float()
        out[b, :n] = acc / top_k
    return out


@pytest.mark.parametrize("top_k", [1, 3, 4])
def test_targets_match_loop_over_layers_with_padding(top_k):
    torch.manual_seed(1)
    B, T, C, L = 3, 17, 8, 4
    lengths = torch.tensor([17, 11, 5])
    padding_mask = torch.arange(T)[None, :] >= lengths[:, None]
    ffn = [torch.randn(B, T, C) * (i + 1) + i for i in range(L)]
    for f in ffn:  # garbage in the padded frames must not leak into the statistics
        f[padding_mask] = 1e4
    got = m2v.build_targets(ffn, padding_mask, top_k)
    torch.testing.assert_close(got, targets_by_hand(ffn, lengths, top_k), rtol=1e-5, atol=1e-5)
    assert (got[padding_mask] == 0).all()


def test_targets_without_padding_equal_instance_norm():
    torch.manual_seed(2)
    ffn = [torch.randn(2, 9, 5) for _ in range(3)]
    got = m2v.build_targets(ffn, None, 2)
    ref = sum(F.instance_norm(f.transpose(1, 2)).transpose(1, 2) for f in ffn[1:]) / 2
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="top_k_layers=4"):
        m2v.build_targets(ffn, None, 4)


# ----------------------------------------------------------------------------------------------------------- loss

def test_regression_loss_by_hand():
    pred = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]])
    target = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    # L2: (1 + 4) / sqrt(4), (0.25) / 2
    torch.testing.assert_close(m2v.regression_loss(pred, target, 0.0), torch.tensor([2.5, 0.125]))
    # smooth L1, beta 1: |d| >= 1 -> |d| - 0.5, else 0.5 d^2 / beta: (0.5 + 1.5) / 2, (0.125) / 2
    torch.testing.assert_close(m2v.regression_loss(pred, target, 1.0), torch.tensor([1.0, 0.0625]))


def test_channel_std_matches_torch_std_over_summed_parts():
    y = torch.randn(50, 6) * torch.arange(1, 7)
    expected = float(torch.sqrt(y.double().var(0) + 1e-6).mean())
    assert m2v.channel_std(m2v.std_stats(y)) == pytest.approx(expected, rel=1e-9)
    # micro-batches and ranks add their statistics
    parts = m2v.std_stats(y[:20]) + m2v.std_stats(y[20:45]) + m2v.std_stats(y[45:])
    assert m2v.channel_std(parts) == pytest.approx(expected, rel=1e-9)


def test_collapse_guard(monkeypatch):
    monkeypatch.setattr(m2v, "collapse_check_after", 100)
    m2v.check_collapse(99, 0.0, 0.0)  # warm-up: not checked
    m2v.check_collapse(100, 0.5, 0.5)
    with pytest.raises(m2v.CollapseError, match="collapse: target std 0.0500"):
        m2v.check_collapse(100, 0.05, 0.5)
    with pytest.raises(m2v.CollapseError, match="prediction std 0.0010"):
        m2v.check_collapse(100, 0.5, 0.001)


# ------------------------------------------------------------------------- the real encoder: teacher and padding

def tiny_config(**overrides):
    from model import EncoderConfig
    conv = ((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2
    return EncoderConfig.data2vec_base(layers=3, dim=32, heads=2, ffn=64, conv_layers=conv, **overrides)


def test_teacher_copies_pos_conv_and_averages_the_rest():
    from model import Encoder
    torch.manual_seed(3)
    enc = Encoder(tiny_config())
    teacher = m2v.make_teacher(enc.transformer)
    copied = m2v.copied_param_names(enc.transformer)
    assert copied == {f"pos_conv.{i}.{w}" for i in range(5) for w in ("weight", "bias")}
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.1)
    m2v.ema_update(teacher, enc.transformer, 0.99, copied)
    for name, value in teacher.state_dict().items():
        s = enc.transformer.state_dict()[name]
        expected = s if name in copied else 0.99 * before[name] + 0.01 * s
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)
    # the conv front end and the projection are not part of the teacher (shared with the student)
    assert not any(n.startswith(("feature_", "mask_emb")) for n in teacher.state_dict())


def test_targets_of_a_padded_batch_equal_each_clip_alone():
    """Through the real teacher: padding changes neither the FFN outputs of the valid frames nor the instance-norm
    statistics, so each clip's targets are those it gets on its own."""
    from model import Encoder
    torch.manual_seed(4)
    enc = Encoder(tiny_config()).eval()
    teacher = m2v.make_teacher(enc.transformer)
    lengths = torch.tensor([16000, 9000, 5200])
    wav = torch.randn(3, 16000) * (torch.arange(16000) < lengths[:, None])
    wav[1, 9000:] = 3.0  # garbage past the end must not matter
    with torch.no_grad():
        x, padding_mask, _ = enc.embed(wav, lengths)
        _, ffn = teacher(x, padding_mask, ffn_outputs=True)
        batch_targets = m2v.build_targets(ffn, padding_mask, 2)
        for b in range(3):
            xb, _, _ = enc.embed(wav[b:b + 1, :lengths[b]])
            _, ffn_b = teacher(xb, None, ffn_outputs=True)
            alone = m2v.build_targets(ffn_b, None, 2)[0]
            n = alone.shape[0]
            assert int((~padding_mask[b]).sum()) == n
            torch.testing.assert_close(batch_targets[b, :n], alone, rtol=1e-4, atol=1e-4)
            assert (batch_targets[b, n:] == 0).all()


def test_student_predicts_only_masked_frames_and_teacher_gets_unmasked_input():
    from model import Encoder
    torch.manual_seed(5)
    student = m2v.Music2VecStudent(Encoder(tiny_config(dropout=0.0, attention_dropout=0.0, layerdrop=0.0)))
    wav = torch.randn(2, 8000)
    T = student.encoder.num_frames(8000)
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, 3:9] = True
    mask[1, 10:14] = True
    pred, teacher_input, padding_mask = student(wav, None, mask)
    assert pred.shape == (10, 32) and padding_mask is None and not teacher_input.requires_grad
    x, _, _ = student.encoder.embed(wav)
    torch.testing.assert_close(teacher_input, x)  # unmasked
    masked_x = torch.where(mask[..., None], student.encoder.mask_emb, x)
    hidden, _ = student.encoder.transformer(masked_x, None)
    torch.testing.assert_close(pred, student.final_proj(hidden[-1][mask]))


# ------------------------------------------------------------------------------------ the script, end to end

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--layers=2", "--dim=32", "--heads=2", "--ffn=64", "--conv_channels=32", "--top_k_layers=2",
        "--crop_seconds=1.0", "--batch_size=2", "--grad_accum=2", "--num_workers=0", "--log_interval=1",
        "--learning_rate=2e-3", "--device=cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data.synth import write_corpus
    out = tmp_path_factory.mktemp("synth")
    write_corpus(str(out), 16 * 2 / 3600, clip_seconds=2.0, seed=0, valid_percent=0, workers=1, progress=False)
    return str(out / "train.tsv")


@pytest.fixture(scope="module")
def mixed_corpus(tmp_path_factory):
    """Clips of 1.5-3.5 s (tones in noise), so that padded batches really hold padding."""
    import soundfile as sf
    out = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    lines = [str(out)]
    for i in range(8):
        n = int(16000 * rng.uniform(1.5, 3.5))
        t = np.arange(n) / 16000
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 800) * t) + 0.05 * rng.standard_normal(n)
        sf.write(str(out / f"{i}.wav"), x.astype(np.float32), 16000)
        lines.append(f"{i}.wav\t{n}")
    (out / "train.tsv").write_text("\n".join(lines) + "\n")
    return str(out / "train.tsv")


def run_script(args, nproc=1, threads=2, timeout=300, background=False):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=ROOT)
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_music2vec.py")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.join(ROOT, "pretrain_music2vec.py")]
    if background:
        return subprocess.Popen(cmd + args, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    done = subprocess.run(cmd + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def logged(output, key):
    return [float(v) for v in re.findall(rf"\| {key} ([-0-9.e+]+)", output)]


def final_state(out_dir):
    import training
    return training.load_checkpoint(training.latest_checkpoint(out_dir))


def assert_states_close(a, b, exact, what):
    for part in ("encoder", "final_proj", "teacher"):
        for name, value in a[part].items():
            if exact:
                assert torch.equal(value, b[part][name]), f"{what}: {part}.{name} differs"
            else:
                torch.testing.assert_close(value, b[part][name], rtol=1e-4, atol=2e-5, msg=f"{what}: {part}.{name}")


STEPS = 10
STRAIGHT = TINY + [f"--max_steps={STEPS}", "--ckpt_interval=100"]  # dropout and LayerDrop on (the defaults)


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory):
    """One uninterrupted run: the loss test reads its log, the resume test compares against its checkpoint."""
    out_dir = str(tmp_path_factory.mktemp("straight"))
    return run_script(STRAIGHT + [f"--train_tsv={corpus}", f"--out_dir={out_dir}"]), out_dir


@pytest.mark.slow
def test_loss_falls_on_synthetic_corpus(straight_run):
    out, out_dir = straight_run
    loss = logged(out, "loss")
    assert len(loss) == STEPS and all(math.isfinite(v) for v in loss)
    assert sum(loss[-3:]) / 3 < 0.7 * sum(loss[:3]) / 3, loss
    from model import load_pretrained
    ckpt = final_state(out_dir)
    assert ckpt["step"] == STEPS and ckpt["encoder_config"]["family"] == "data2vec-audio"
    assert set(ckpt["teacher"]) == {k[len("transformer."):] for k in ckpt["encoder"] if k.startswith("transformer.")}
    enc = load_pretrained(os.path.join(out_dir, f"ckpt_{STEPS:08d}.pt"))
    assert enc.cfg.layers == 2 and not enc.training


@pytest.mark.slow
def test_ddp_two_processes_equal_single_process(mixed_corpus, tmp_path):
    # padded batches of mixed lengths (per-clip masks and target statistics must not depend on the rank);
    # dropout and LayerDrop off: with them the two runs draw different (equally valid) random numbers
    args = TINY + [f"--train_tsv={mixed_corpus}", "--max_steps=3", "--dropout=0.0", "--attention_dropout=0.0",
                   "--layerdrop=0.0", "--pad_batches=True", "--crop_seconds=3.0", "--group_by_length=False"]
    single = run_script(args + [f"--out_dir={tmp_path / 'single'}"])
    ddp = run_script(args + [f"--out_dir={tmp_path / 'ddp'}"], nproc=2, threads=1)
    assert "2 rank(s) x 1 micro-batches" in ddp
    assert logged(single, "loss") == pytest.approx(logged(ddp, "loss"), rel=1e-4)
    assert logged(single, "target_std") == pytest.approx(logged(ddp, "target_std"), rel=1e-4)
    a, b = final_state(str(tmp_path / "single")), final_state(str(tmp_path / "ddp"))
    assert_states_close(a, b, exact=False, what="single vs DDP")
    moved = (a["teacher"]["layers.0.fc1.weight"] - a["encoder"]["transformer.layers.0.fc1.weight"]).abs().max()
    assert moved > 0  # the teacher lags the student: the comparison covers real EMA steps


@pytest.mark.slow
def test_sigterm_and_resume_equal_uninterrupted(corpus, straight_run, tmp_path):
    # dropout and LayerDrop on: resume must restore every RNG, the data position, optimizer and teacher
    args = STRAIGHT + [f"--train_tsv={corpus}", f"--out_dir={tmp_path}"]
    proc = run_script(args, background=True)
    lines = []
    for line in proc.stdout:  # SIGTERM once the first update is logged; it stops at the next step boundary
        lines.append(line)
        if "step 1 |" in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, "".join(lines) + rest
    assert "SIGTERM: saving at step" in rest
    stopped = final_state(str(tmp_path))["step"]
    assert 1 <= stopped < STEPS
    resumed = run_script(args)
    assert "resuming from" in resumed and f"at step {stopped}" in resumed
    a, b = final_state(straight_run[1]), final_state(str(tmp_path))
    assert a["step"] == b["step"] == STEPS
    assert_states_close(a, b, exact=True, what="uninterrupted vs resumed")
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])


@pytest.mark.slow
def test_collapse_stops_the_run_with_a_message(corpus, tmp_path):
    # thresholds no real run can meet: the guard must fire at the first checked update, naming the figures
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_music2vec.py"), *TINY,
                           f"--train_tsv={corpus}", f"--out_dir={tmp_path}", "--max_steps=5",
                           "--collapse_check_after=2", "--min_target_std=10.0"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert re.search(r"error: step 2: representation collapse: target std [0-9.]+ \(min 10.0\)", done.stderr), \
        done.stderr[-2000:]
    assert "Traceback" not in done.stderr
