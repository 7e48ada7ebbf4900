"""Shared training machinery: overrides, schedules, checkpoints, RNG, guards, FLOP count."""
import json
import math
import os
import random
import re
import signal
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch

import training


def _defaults():
    return {"lr": 5e-4, "steps": 100, "name": "run", "use_tb": False, "betas": (0.9, 0.98), "label_dir": None,
            "math": math, "_private": 1, "NUM_SPECIAL": 4}


def test_configure_cli_types_and_file(tmp_path):
    g = _defaults()
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nsteps = 7\nlr = 1\n")
    over = training.configure(g, [str(cfg), "--name=runs/x", "--use_tb=true", "--betas=[0.8,0.9]",
                                  "--label_dir=/tmp/l", "--steps=9"], verbose=False)
    assert g["steps"] == 9 and over["steps"] == 9  # command line after the file wins
    assert g["lr"] == 1.0 and isinstance(g["lr"], float)  # int accepted for float, converted
    assert g["name"] == "runs/x" and g["use_tb"] is True and g["betas"] == (0.8, 0.9)
    assert g["label_dir"] == "/tmp/l"


@pytest.mark.parametrize("argv,needle", [
    (["--stepz=3"], "unknown key 'stepz'"),
    (["--steps=3.5"], "steps must be int"),
    (["--use_tb=1"], "use_tb must be bool"),
    (["--lr=abc"], "cannot parse"),
    (["--steps"], "expected --key=value"),
    (["--_private=2"], "unknown key"),
    (["--NUM_SPECIAL=2"], "unknown key"),
    (["nonexistent.py"], "not a file"),
])
def test_configure_errors_are_one_line(argv, needle):
    with pytest.raises(training.ConfigError) as e:
        training.configure(_defaults(), argv, verbose=False)
    msg = str(e.value.code)
    assert needle in msg and "\n" not in msg


def test_configure_file_unknown_key_names_file(tmp_path):
    cfg = tmp_path / "bad.py"
    cfg.write_text("stepz = 3\n")
    with pytest.raises(training.ConfigError) as e:
        training.configure(_defaults(), [str(cfg)], verbose=False)
    assert "bad.py" in str(e.value.code) and "stepz" in str(e.value.code)


def test_polynomial_decay_lr():
    f = lambda s: training.polynomial_decay_lr(s, 1.0, warmup_steps=10, total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.5) and f(110) == 0.0 and f(500) == 0.0
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_tri_stage_lr():
    f = lambda s: training.tri_stage_lr(s, 1.0, total_steps=1000)  # 30 warm-up, 900 hold, 70 decay
    assert f(0) == pytest.approx(0.01) and f(15) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(30) == 1.0 and f(929) == 1.0
    assert f(930 + 35) == pytest.approx(0.1)  # half way through an exponential decay 1 -> 0.01
    assert f(1000) == pytest.approx(0.01) and f(5000) == pytest.approx(0.01)


def test_checkpoint_atomic_keep_last_and_latest(tmp_path):
    for step in (5, 10, 15, 20):
        training.save_checkpoint({"step": step, "w": torch.full((3,), float(step))}, str(tmp_path), step, keep_last=2)
    names = sorted(os.listdir(tmp_path))
    assert names == ["ckpt_00000015.pt", "ckpt_00000020.pt"]  # no temporary files left behind
    latest = training.latest_checkpoint(str(tmp_path))
    assert latest.endswith("ckpt_00000020.pt")
    assert training.load_checkpoint(latest)["w"].tolist() == [20.0] * 3
    (tmp_path / "ckpt_00000099.pt.tmp123").write_bytes(b"partial")  # a crash mid-write is ignored
    assert training.latest_checkpoint(str(tmp_path)) == latest
    assert training.latest_checkpoint(str(tmp_path / "missing")) is None


def test_rng_state_roundtrip():
    state = training.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    training.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_stop_signal_on_sigterm():
    old = signal.getsignal(signal.SIGTERM)
    try:
        stop = training.StopSignal()
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop()
        stop.restore()
        assert signal.getsignal(signal.SIGTERM) is old
    finally:
        signal.signal(signal.SIGTERM, old)


def _sleep_forever(_):
    time.sleep(3600)


def test_stop_signal_leaves_forked_workers_killable():
    """A Pool forked while the handler is installed must still die on terminate() (SIGTERM): a worker that only set
    a flag hung the test suite in the Pool's exit until CI's time ran out."""
    import multiprocessing
    old = signal.getsignal(signal.SIGTERM)
    try:
        stop = training.StopSignal()
        pool = multiprocessing.get_context("fork").Pool(1)
        pool.map_async(_sleep_forever, [0])
        time.sleep(0.5)
        workers = [w.pid for w in pool._pool]
        closer = threading.Thread(target=pool.terminate, daemon=True)
        closer.start()
        closer.join(timeout=20)
        hung = closer.is_alive()
        if hung:  # free the test run, then fail
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            closer.join()
        assert not hung, "Pool.terminate() did not stop a worker forked under StopSignal"
        assert not stop.requested
    finally:
        signal.signal(signal.SIGTERM, old)


def test_nonfinite_guard():
    g = training.NonFiniteGuard(max_in_row=3)
    assert g.ok(True) and not g.ok(False) and not g.ok(False) and g.ok(True)
    assert g.total == 2 and g.in_row == 0
    g.ok(False), g.ok(False)
    with pytest.raises(training.NonFiniteLossError, match="3 non-finite losses in a row"):
        g.ok(False, step=7)


def test_encoder_flops_hand_count():
    # 1-layer, 8-dim toy with a single conv (2 -> ... ) counted by hand.
    cfg = types.SimpleNamespace(dim=8, layers=1, ffn=16, conv_layers=((4, 4, 2),), pos_conv_kernel=3,
                                pos_conv_groups=2, pos_conv_depth=1)
    n = 10  # conv frames: (10 - 4) // 2 + 1 = 4
    T = 4
    expect = (2 * 1 * 4 * 4 * T  # conv
              + 2 * 4 * 8 * T  # projection 4 -> 8
              + 2 * 8 * 4 * 3 * T  # pos conv, 8 / 2 input channels per group
              + 2 * 4 * 8 * 8 * T + 2 * 2 * T * T * 8 + 2 * 2 * 8 * 16 * T)  # qkvo, scores + AV, FFN
    assert training.encoder_flops(cfg, n) == expect
    base = types.SimpleNamespace(dim=768, layers=12, ffn=3072)
    # ~95M parameters, 2 FLOPs per parameter per frame is the transformer's floor; the conv stack adds ~1/3
    assert 13e9 < training.encoder_flops(base, 16000) < 17e9


def test_logger_format():
    line = training.TrainLogger.format(3, {"loss": 1.23456, "lr": 5e-4, "mfu": None, "skipped": 2})
    assert line == "step 3 | loss 1.235 | lr 5.000e-04 | mfu n/a | skipped 2"


SCRIPTS = ["pretrain_musichubert.py", "pretrain_music2vec.py", "pretrain_wav2vec2.py"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args):
    import subprocess
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_hyperparameter_with_its_default_and_comment(script, tmp_path):
    # the defaults as a fresh process has them (other tests' configure() calls change this process's copy)
    r = run_script("-c", f"import json, training, {script[:-3]} as m; "
                   "print(json.dumps({k: repr(v) for k, v in training.config_snapshot(vars(m)).items()}))")
    defaults = json.loads(r.stdout)
    out_dir = tmp_path / "never"
    r = run_script(script, f"--out_dir={out_dir}", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"usage: python {script} [config/FILE.py ...] [--key=value ...]")
    lines = r.stdout.splitlines()
    assert len(defaults) > 20
    for key, value in defaults.items():
        assert f"  --{key}={value}" in r.stdout, key
    with open(os.path.join(ROOT, script)) as f:  # the comment beside a global, and its group heading above it
        source = f.read().splitlines()

    def shown_comment(key):  # the help's text beside --key=..., over its wrapped lines, whitespace normalised
        item = next(n for n, line in enumerate(lines) if line.startswith(f"  --{key}="))
        end = next((n for n in range(item + 1, len(lines)) if not lines[n].startswith(" " * 30)), len(lines))
        words = lines[item].split()[1:] + " ".join(lines[item + 1:end]).split()
        return item, " ".join(words)

    i = next(i for i, line in enumerate(source) if line.startswith("learning_rate = "))
    i = next(j for j in range(i, len(source)) if re.match(r"^[a-z_]+ = [^#]*  # ", source[j]))  # one with a comment
    key, comment = source[i].split(" = ")[0], source[i].split("  # ", 1)[1].strip()
    item, shown = shown_comment(key)
    assert comment and shown == " ".join(comment.split())
    heading = next(line[1:].strip() for line in reversed(source[:i]) if line.startswith("# ") and len(line) < 60)
    assert heading in lines[:item] and lines.index(heading) < item
    # a comment continued on the next line (a comment-only line aligned with it) is shown whole, beside its key
    g = next(i for i, line in enumerate(source) if line.startswith("grad_accum = "))
    assert re.match(r"^#\s{8,}\S", source[g + 1])
    comment = source[g].split("  # ", 1)[1] + " " + source[g + 1][1:]
    assert shown_comment("grad_accum")[1] == " ".join(comment.split())
    assert max(len(line) for line in lines) <= 120  # wrapped
    assert not out_dir.exists()  # --help does nothing else


def test_unknown_key_names_the_nearest_and_help():
    r = run_script("pretrain_musichubert.py", "--lerning_rate=1e-3")
    assert r.returncode != 0
    assert "unknown key 'lerning_rate' (did you mean 'learning_rate'?)" in r.stderr
    assert "python pretrain_musichubert.py --help lists them" in r.stderr


def test_short_help_with_other_args_only_prints_help(tmp_path):
    r = run_script("pretrain_wav2vec2.py", "config/quickstart.py", f"--out_dir={tmp_path / 'x'}", "-h")
    assert r.returncode == 0, r.stderr
    assert r.stdout == run_script("pretrain_wav2vec2.py", "--help").stdout
    assert "  --learning_rate=" in r.stdout and not (tmp_path / "x").exists()
