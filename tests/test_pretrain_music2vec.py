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


def test_collapse_guard():
    m2v.check_collapse(99, 0.0, 0.0, start=100)  # warm-up: not checked
    m2v.check_collapse(100, 0.5, 0.5, start=100)
    with pytest.raises(m2v.CollapseError, match="collapse: target std 0.0500"):
        m2v.check_collapse(100, 0.05, 0.5, start=100)
    with pytest.raises(m2v.CollapseError, match="prediction std 0.0010"):
        m2v.check_collapse(100, 0.5, 0.001, start=100)


# ------------------------------------------------------------------------------------------ position monitor

def position_share_by_hand(y, t):
    """Loop over frame indices: epsilon^2 = (SS_between - (G - 1) SS_within / (N - G)) / SS_total."""
    y = y.double()
    mu = y.mean(0)
    total = ((y - mu) ** 2).sum()
    groups = [y[t == k] for k in sorted(set(t.tolist()))]
    between = sum(len(g) * ((g.mean(0) - mu) ** 2).sum() for g in groups)
    within = total - between
    N, G = len(y), len(groups)
    return float((between - (G - 1) * within / (N - G)) / total)


def shares(y, valid=None, max_frames=64):
    valid = torch.ones(y.shape[:2], dtype=torch.bool) if valid is None else valid
    return m2v.position_share(m2v.position_sums(y[valid], valid.nonzero()[:, 1], max_frames), max_frames)


def test_position_share_by_hand_and_summed_over_parts():
    torch.manual_seed(6)
    B, T, C = 5, 23, 7
    y = torch.randn(B, T, C) + 0.7 * torch.randn(1, T, C)  # some position pattern, some content
    valid = torch.rand(B, T) < 0.6  # ragged, like the masked frames of the predictions
    rows, t = y[valid], valid.nonzero()[:, 1]
    expected = position_share_by_hand(rows, t)
    assert 0.1 < expected < 0.9
    assert shares(y, valid, max_frames=30) == pytest.approx(expected, rel=1e-9)
    # micro-batches (and ranks) add their sums
    parts = sum(m2v.position_sums(y[i:i + 1][valid[i:i + 1]], valid[i:i + 1].nonzero()[:, 1], 30) for i in range(B))
    assert m2v.position_share(parts, 30) == pytest.approx(expected, rel=1e-9)


def test_position_share_sees_planted_position_and_not_content():
    torch.manual_seed(7)
    B, T, C = 4, 149, 16
    position_only = torch.randn(1, T, C).expand(B, T, C)  # every clip's target is the same function of the frame
    assert shares(position_only, max_frames=160) == pytest.approx(1.0, abs=1e-9)
    # independent content: ~0 whatever the batch size (the uncorrected share would be ~1/B = 0.25 here)
    assert abs(shares(torch.randn(B, T, C), max_frames=160)) < 0.03
    assert abs(shares(torch.randn(64, T, C), max_frames=160)) < 0.01
    # instance-normalised like the targets: equal parts of position and content give about one half
    mix = F.instance_norm((position_only + torch.randn(B, T, C)).transpose(1, 2)).transpose(1, 2)
    assert 0.4 < shares(mix, max_frames=160) < 0.6


def test_position_keys_count_from_the_nearer_end():
    selected = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0, 0]], dtype=torch.bool)
    lengths = torch.tensor([5, 7, 5])
    keys = m2v.position_keys(selected, lengths, max_frames=10)
    # 5 frames: 0 1 2 | 11 10 (3rd frame is the middle, counted from the start); 7 frames: 0 1 2 3 | 12 11 10
    assert keys.tolist() == [0, 1, 2, 11, 10, 0, 1, 2, 3, 12, 11, 10, 1, 11, 10]
    # crops of varying length: a pattern tied to both ends (as the positional convs' zero padding makes) is all
    # position when counted from the nearer end, and mostly invisible to the index from the start
    torch.manual_seed(8)
    C, max_frames = 8, 40
    edge = torch.randn(2, 6, C)  # patterns of the first and last 6 frames
    rows, valid = torch.zeros(16, max_frames, C), torch.zeros(16, max_frames, dtype=torch.bool)
    for i, n in enumerate(torch.randint(20, max_frames + 1, (16,)).tolist()):
        rows[i, :6], rows[i, n - 6:n], valid[i, :n] = edge[0], edge[1], True
    rows = rows + 0.01 * torch.randn_like(rows)
    lengths = valid.sum(1)
    by_end = m2v.position_share(m2v.position_sums(rows[valid], m2v.position_keys(valid, lengths, max_frames),
                                                  2 * max_frames), 2 * max_frames)
    by_start = m2v.position_share(m2v.position_sums(rows[valid], valid.nonzero()[:, 1], max_frames), max_frames)
    assert by_end > 0.99 and by_start < 0.7


def test_position_collapse_guard(monkeypatch):
    monkeypatch.setattr(m2v, "max_pos_share", 0.5)
    m2v.check_position_collapse(9, 0.99, 0.99, start=10)  # before the first checked update
    m2v.check_position_collapse(10, 0.3, 0.49, start=10)
    m2v.check_position_collapse(10, float("nan"), float("nan"), start=10)  # too few rows to tell: no verdict
    with pytest.raises(m2v.CollapseError, match=r"position collapse: frame position explains 0.900 of the target"):
        m2v.check_position_collapse(10, 0.9, 0.1, start=10)
    with pytest.raises(m2v.CollapseError, match=r"and 0.600 of the predictions"):
        m2v.check_position_collapse(10, float("nan"), 0.6, start=10)
    monkeypatch.setattr(m2v, "max_pos_share", 1.0)  # 1.0 switches it off
    m2v.check_position_collapse(10, 1.0, 1.0, start=10)


def test_collapse_checks_start_after_the_warm_up(monkeypatch):
    monkeypatch.setattr(m2v, "collapse_check_after", -1)
    assert m2v.collapse_check_start(12_000) == 5000  # the base recipe keeps data2vec's 5k
    assert m2v.collapse_check_start(30) == 30  # a small run is checked from the end of its warm-up
    monkeypatch.setattr(m2v, "collapse_check_after", 7)
    assert m2v.collapse_check_start(12_000) == 7


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
# dropout and LayerDrop on (the defaults). This tiny high-lr recipe falls into position collapse within its 10
# updates (target share ~0.6 by step 7: the loss falls but not from learning content), so the monitor is off here;
# these runs test the machinery (loss bookkeeping, DDP, resume), not what is learnt.
STRAIGHT = TINY + [f"--max_steps={STEPS}", "--ckpt_interval=100", "--max_pos_share=1.0"]


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


def test_position_share_of_real_content_at_init_is_low(corpus):
    """The synthetic corpus through a randomly initialised encoder and its teacher: the targets are content."""
    from data.dataset import AudioClips, collate_crop
    from model import Encoder
    torch.manual_seed(9)
    student = m2v.Music2VecStudent(Encoder(tiny_config())).eval()
    teacher = m2v.make_teacher(student.encoder.transformer)
    clips = AudioClips(corpus, crop_seconds=1.0, seed=0)
    wav = collate_crop([clips[i] for i in range(8)])["wav"]
    T = student.encoder.num_frames(wav.shape[1])
    mask = m2v.span_mask((8, T), 0.65, 10, min_masks=1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pred, teacher_input, padding_mask = student(wav, None, mask)
        _, ffn = teacher(teacher_input, padding_mask, ffn_outputs=True)
        target = m2v.build_targets(ffn, padding_mask, 2)
    target_share, pred_share = m2v.monitor_shares(m2v.monitor_sums(target, pred, mask, None, T), T)
    # (an untrained student's predictions at masked frames, which all start from the same mask embedding, lean on
    # the positional convs more than the targets do; training moves them to content within a few updates)
    assert target_share < 0.2 and pred_share < m2v.max_pos_share, (target_share, pred_share)


@pytest.mark.slow
def test_position_shares_are_logged(straight_run):
    out, out_dir = straight_run
    import json
    rows = [json.loads(line) for line in open(os.path.join(out_dir, "log.jsonl"))]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in ("target_pos_share", "pred_pos_share"))
    assert rows[0]["target_pos_share"] < 0.3  # the first update: content, not position
    assert logged(out, "target_pos_share") and logged(out, "pred_pos_share")  # on the log line too


@pytest.mark.slow
def test_silence_trips_the_position_monitor(tmp_path):
    """Planted position-only targets, end to end: on silent clips the encoder's input is the same at every frame,
    so all the teachers' targets carry is the positional convs' edge pattern, which instance normalisation scales
    back to unit variance. The run must stop at its first checked update with a one-line error."""
    import soundfile as sf
    lines = [str(tmp_path)]
    for i in range(4):
        sf.write(str(tmp_path / f"{i}.wav"), np.zeros(32000, dtype=np.float32), 16000)
        lines.append(f"{i}.wav\t32000")
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_music2vec.py"), *TINY,
                           f"--train_tsv={tmp_path / 'train.tsv'}", f"--out_dir={tmp_path / 'out'}", "--max_steps=5",
                           "--collapse_check_after=1"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert re.search(r"error: step 1: position collapse: frame position explains (0\.9[0-9]+|1\.000) of the target "
                     r"variance",
                     done.stderr), done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    # the figures that stopped it are in the log
    import json
    row = json.loads(open(tmp_path / "out" / "log.jsonl").readline())
    assert row["step"] == 1 and row["target_pos_share"] > 0.9


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


def test_recipe_options_run_and_do_what_they_say(corpus, tmp_path):
    """The recipe-search options end to end: feature_grad_mult=0 leaves the conv front end at its init while the
    transformer trains; a teacher that is an EMA of the whole encoder carries the conv front end; the others run
    (layer-norm targets, centred targets, averaged positional convs, random crop lengths) with finite losses."""
    base = TINY + [f"--train_tsv={corpus}", "--max_pos_share=1.0", "--feature_grad_mult=0.0"]
    frozen, init = str(tmp_path / "frozen"), str(tmp_path / "init")
    out = run_script(base + [f"--out_dir={frozen}", "--max_steps=3", "--ckpt_interval=3"])
    assert all(math.isfinite(v) for v in logged(out, "loss"))
    run_script(base + [f"--out_dir={init}", "--max_steps=1", "--ckpt_interval=1", "--learning_rate=0.0"])
    trained, at_init = final_state(frozen)["encoder"], final_state(init)["encoder"]  # same seed: same init
    conv = [k for k in trained if k.startswith("feature_extractor.")]
    assert conv
    for k in conv:
        assert torch.equal(trained[k], at_init[k]), f"{k} moved with feature_grad_mult=0"
    assert any(not torch.equal(trained[k], at_init[k]) for k in trained if k.startswith("transformer."))

    whole = str(tmp_path / "whole")
    out = run_script(TINY + [f"--train_tsv={corpus}", f"--out_dir={whole}", "--max_steps=3", "--ckpt_interval=3",
                             "--max_pos_share=1.0", "--ema_transformer_only=False", "--layer_norm_target_layer=True",
                             "--center_targets=True", "--ema_pos_conv=True", "--crop_seconds_min=0.5",
                             "--splice_prob=0.5", "--pos_conv_kernel=5"])
    assert all(math.isfinite(v) for v in logged(out, "loss"))
    state = final_state(whole)
    assert any(k.startswith("feature_extractor.") for k in state["teacher"])
    assert state["encoder"]["transformer.pos_conv.0.weight"].shape[-1] == 5


def test_splice_clips_by_hand(monkeypatch):
    """A chosen clip keeps its head and takes the next clip's tail from a cut in [1/4, 3/4] of the common length;
    the draws are a pure function of (seed, update, micro-batch); padded clips end at the shorter of the two."""
    monkeypatch.setattr(m2v, "splice_prob", 1.0)
    wav = torch.arange(4)[:, None].float().expand(4, 400).clone()  # clip i is the constant i
    out, lengths = m2v.splice_clips(wav, None, step=3, global_micro=1)
    assert lengths is None
    for i in range(4):
        cut = int((out[i] != i).nonzero()[0])
        assert 100 <= cut <= 300
        assert (out[i, :cut] == i).all() and (out[i, cut:] == (i + 1) % 4).all()
    again, _ = m2v.splice_clips(wav, None, step=3, global_micro=1)
    other, _ = m2v.splice_clips(wav, None, step=4, global_micro=1)
    assert torch.equal(out, again) and not torch.equal(out, other)
    # padded batch: clip 0 (300 samples) spliced with clip 1 (400) stays 300 long; clip 1 takes clip 0's tail
    # only as far as clip 0 goes
    padded = wav[:2].clone()
    padded[0, 300:] = 0
    out, lengths = m2v.splice_clips(padded, torch.tensor([300, 400]), step=0, global_micro=0)
    assert lengths.tolist() == [300, 300]
    assert (out[:, 300:] == 0).all()
    monkeypatch.setattr(m2v, "splice_prob", 0.0)
    assert m2v.splice_clips(wav, None, 0, 0)[0] is wav
    monkeypatch.setattr(m2v, "splice_prob", 0.5)  # about half the clips
    chosen = sum(int((m2v.splice_clips(wav, None, s, 0)[0] != wav).any(1).sum()) for s in range(200))
    assert 300 < chosen < 500


def test_init_from_fairseq_data2vec(corpus, tmp_path):
    """init_from=FAIRSEQ.pt: student (and so the teacher, its copy) and regression head start from a fairseq
    data2vec-audio checkpoint; the checkpoint written after 2 updates has its architecture."""
    src = os.path.join(ROOT, "tests", "fixtures", "fairseq", "data2vec_tiny.pt")
    out = tmp_path / "from_fairseq"
    said = run_script(TINY + [f"--train_tsv={corpus}", f"--out_dir={out}", f"--init_from={src}", "--max_steps=2",
                              "--max_pos_share=1.0"])
    assert f"init_from: final_proj from {src}" in said
    ckpt = final_state(str(out))
    assert (ckpt["encoder_config"]["dim"], ckpt["encoder_config"]["layers"], ckpt["step"]) == (48, 3, 2)
