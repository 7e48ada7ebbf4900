"""wav2vec 2.0 pre-training: the quantiser, negatives, contrastive loss, training on a tiny synthetic corpus, DDP
equivalence, exact resume, and the Wav2Vec2ForPreTraining round trip.

Training runs in-process (the script's globals are reset by reloading the module) except the torchrun test.
"""
import importlib
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pretrain_wav2vec2 as w2v
from model import (Encoder, EncoderConfig, GumbelQuantizer, codeword_indices, load_pretrained, load_quantizer,
                   load_wav2vec2_heads, save_hf, span_mask)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------- quantiser

def test_quantizer_shapes_and_codes():
    torch.manual_seed(0)
    q = GumbelQuantizer(in_dim=16, groups=2, codewords=8, dim=12)
    assert q.codevectors.shape == (2, 8, 6) and q.weight_proj.weight.shape == (16, 16)
    x = torch.randn(3, 5, 16)
    quantized, codes, logits = q(x, 2.0, torch.Generator().manual_seed(1))  # training mode: Gumbel
    assert quantized.shape == (3, 5, 12) and codes.shape == (3, 5, 2) and codes.dtype == torch.long
    assert logits.shape == (3, 5, 2, 8) and logits.dtype == torch.float32
    # the forward value is exactly the chosen codewords, concatenated over groups (up to the straight-through's
    # hard - soft + soft rounding)
    torch.testing.assert_close(quantized, q.lookup(codes), rtol=0, atol=1e-6)
    torch.testing.assert_close(q.lookup(codes)[1, 2], torch.cat([q.codevectors[0, codes[1, 2, 0]],
                                                                 q.codevectors[1, codes[1, 2, 1]]]))
    q.eval()  # eval: the argmax code, no noise
    quantized, codes, logits = q(x)
    assert torch.equal(codes, logits.argmax(-1)) and torch.equal(codes, q.codes(x))
    assert torch.equal(quantized, q.lookup(codes))
    with pytest.raises(ValueError, match="not divisible"):
        GumbelQuantizer(16, 3, 8, 10)


def test_gumbel_straight_through_matches_fairseq_formula():
    """Values and gradients equal fairseq's F.gumbel_softmax(hard=True) followed by its broadcast product with the
    codebook, given the same noise (generator=None draws from torch's global RNG, as F.gumbel_softmax does)."""
    torch.manual_seed(0)
    q = GumbelQuantizer(in_dim=10, groups=2, codewords=6, dim=8)
    x = torch.randn(7, 10, requires_grad=True)
    w = torch.randn(7, 8)
    torch.manual_seed(3)
    quantized, codes, _ = q(x, 1.5)
    (quantized * w).sum().backward()
    ours = [x.grad.clone(), q.weight_proj.weight.grad.clone(), q.codevectors.grad.clone()]
    x.grad = None
    q.zero_grad()
    torch.manual_seed(3)
    logits = q.weight_proj(x).view(7 * 2, 6)
    onehot = F.gumbel_softmax(logits, tau=1.5, hard=True).view(7, 12)
    ref = (onehot.unsqueeze(-1) * q.codevectors.view(1, 12, 4)).view(7, 2, 6, 4).sum(-2).view(7, 8)
    (ref * w).sum().backward()
    torch.testing.assert_close(quantized, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(codes.view(-1), onehot.view(14, 6).argmax(-1))
    for a, b in zip(ours, [x.grad, q.weight_proj.weight.grad, q.codevectors.grad]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # the gradient reaches the logits (through the soft sample) and only the chosen codewords
    assert ours[0].abs().sum() > 0 and ours[1].abs().sum() > 0
    chosen = torch.zeros(2, 6, dtype=torch.bool)
    chosen[0, codes[:, 0]] = True
    chosen[1, codes[:, 1]] = True
    assert (ours[2][~chosen] == 0).all() and (ours[2][chosen].abs().sum(-1) > 0).all()


def test_gumbel_noise_comes_from_the_generator():
    q = GumbelQuantizer(8, 2, 16, 8)
    x = torch.randn(50, 8) * 0.01  # small logits: the noise decides
    a = q(x, 2.0, torch.Generator().manual_seed(5))[1]
    assert torch.equal(a, q(x, 2.0, torch.Generator().manual_seed(5))[1])
    assert not torch.equal(a, q(x, 2.0, torch.Generator().manual_seed(6))[1])


def test_temperature_schedule():
    assert w2v.gumbel_temperature(0) == 2.0
    assert w2v.gumbel_temperature(1) == pytest.approx(2 * 0.999995, rel=1e-12)
    assert w2v.gumbel_temperature(100_000) == pytest.approx(2 * math.exp(100_000 * math.log(0.999995)), rel=1e-9)
    # 2 * 0.999995^s = 0.5 at s = ln(4) / -ln(0.999995) = 277,258.2: held at 0.5 from there on
    assert w2v.gumbel_temperature(277_258) > 0.5 and w2v.gumbel_temperature(277_259) == 0.5
    assert w2v.gumbel_temperature(400_000) == 0.5
    assert w2v.gumbel_temperature(10, schedule=(1.0, 0.1, 0.5)) == 0.1
    assert w2v.gumbel_temperature(2, schedule=(1.0, 0.1, 0.5)) == 0.25


def test_perplexities_by_hand():
    big = 100.0  # softmax of 100 x one-hot is one-hot to 1e-43
    onehot = lambda codes: F.one_hot(torch.tensor(codes), 4).float() * big
    # 4 frames, 2 groups of 4 codewords: group 0 uses 4 codes once each (ppl 4), group 1 two codes twice (ppl 2)
    logits = torch.stack([onehot([0, 1, 2, 3]), onehot([0, 0, 1, 1])], 1)
    code_ppl, prob_ppl = GumbelQuantizer.perplexities(logits)
    assert code_ppl.item() == pytest.approx(6.0, rel=1e-5) and prob_ppl.item() == pytest.approx(6.0, rel=1e-5)
    # equal logits: the argmax is codeword 0 everywhere (ppl 1 per group), the softmax is uniform (4 per group)
    code_ppl, prob_ppl = GumbelQuantizer.perplexities(torch.zeros(5, 2, 4))
    assert code_ppl.item() == pytest.approx(2.0, rel=1e-5) and prob_ppl.item() == pytest.approx(8.0, rel=1e-5)
    # softmax [1/2, 1/2, 0, 0] in group 0 and [1/4] x 4 in group 1 on every frame: 2 + 4
    row = torch.tensor([[0.0, 0.0, -math.inf, -math.inf], [0.0, 0.0, 0.0, 0.0]])
    assert GumbelQuantizer.perplexities(row.expand(3, 2, 4))[1].item() == pytest.approx(6.0, rel=1e-5)
    # the diversity loss: 0 when every codeword is used equally, (GV - G) / GV for one codeword per group
    assert w2v.diversity_loss(torch.tensor(640.0)).item() == 0.0
    assert w2v.diversity_loss(torch.tensor(2.0)).item() == pytest.approx(638 / 640)


# -------------------------------------------------------------------------------------------------- negatives

def test_negatives_are_other_masked_frames_of_the_same_clip():
    g = torch.Generator().manual_seed(0)
    mask = span_mask((3, 120), 0.65, 10, min_masks=2, same_count=True, generator=g)
    M = int(mask[0].sum())
    assert (mask.sum(1) == M).all()
    neg = w2v.sample_negatives(3, M, 100, g)
    assert neg.shape == (3, M, 100) and neg.min() >= 0 and neg.max() < M
    assert not (neg == torch.arange(M)[None, :, None]).any()  # never the positive itself
    for b in range(3):  # back to frame positions: masked frames of clip b, never the frame being predicted
        frames = mask[b].nonzero()[:, 0]
        picked = frames[neg[b]]
        assert mask[b, picked].all() and not (picked == frames[:, None]).any()
    # uniform over the M - 1 others
    counts = torch.bincount(w2v.sample_negatives(1, 5, 40_000, g)[0, 2], minlength=5).float() / 40_000
    assert counts[2] == 0 and torch.allclose(counts[[0, 1, 3, 4]], torch.full((4,), 0.25), atol=0.01)
    with pytest.raises(ValueError, match="at least 2"):
        w2v.sample_negatives(2, 1, 10, g)


def test_contrastive_logits_and_info_nce_by_hand():
    context = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    targets = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]])
    codes = torch.tensor([[[0, 0], [1, 0], [0, 0]]])  # frames 0 and 2 share a code: they are negatives of nothing
    negatives = torch.tensor([[[1, 2], [0, 2], [0, 1]]])
    logits = w2v.contrastive_logits(context, targets, codes, negatives, 0.1)
    r = 1 / math.sqrt(2)
    inf = math.inf
    expected = torch.tensor([[[10.0, 0.0, -inf], [10.0, 0.0, 0.0], [-10 * r, -inf, 10 * r]]])
    torch.testing.assert_close(logits, expected)
    loss, correct = w2v.info_nce(logits)
    by_hand = math.log(1 + math.exp(-10)) + math.log(1 + 2 * math.exp(-10)) + math.log(1 + math.exp(20 * r))
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert int(correct) == 2
    # equal logits everywhere do not count as correct (fairseq: argmax and argmin both at 0)
    assert int(w2v.info_nce(torch.zeros(4, 3))[1]) == 0


def test_contrastive_logits_equal_a_loop_over_frames():
    torch.manual_seed(1)
    B, M, D, K = 2, 6, 5, 4
    context, targets = torch.randn(B, M, D), torch.randn(B, M, D)
    codes = torch.randint(0, 3, (B, M, 2))
    neg = w2v.sample_negatives(B, M, K, torch.Generator().manual_seed(2))
    logits = w2v.contrastive_logits(context, targets, codes, neg, 0.1)
    for b in range(B):
        for m in range(M):
            cands = torch.cat([targets[b, m:m + 1], targets[b, neg[b, m]]])
            ref = F.cosine_similarity(context[b, m][None], cands, dim=-1) / 0.1
            same = torch.cat([torch.tensor([False]), (codes[b, neg[b, m]] == codes[b, m]).all(-1)])
            ref[same] = -math.inf
            torch.testing.assert_close(logits[b, m], ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- the whole model

def tiny_config(**overrides):
    conv = ((16, 10, 5),) + ((16, 3, 2),) * 4 + ((16, 2, 2),) * 2
    base = dict(layers=2, dim=32, heads=2, ffn=64, pos_conv_kernel=16, pos_conv_groups=4, conv_layers=conv,
                dropout=0.0, attention_dropout=0.0, dropout_input=0.0, dropout_features=0.0, layerdrop=0.0)
    return EncoderConfig.wav2vec2_base(**{**base, **overrides})


def test_model_forward_matches_reference_composition():
    """Eval mode (argmax codes, no dropout): the loss is InfoNCE over [positive, negatives] built by hand from the
    encoder's outputs, the quantiser's codes and the heads."""
    torch.manual_seed(2)
    model = w2v.Wav2Vec2Pretraining(tiny_config()).eval()
    wav = torch.randn(2, 16000)
    T = model.encoder.num_frames(16000)
    mask = span_mask((2, T), 0.65, 10, min_masks=2, same_count=True, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss, correct, code_ppl, prob_ppl, pen = model(wav, mask, 2.0, torch.Generator().manual_seed(7))
        out = model.encoder(wav, mask=mask)
        M = int(mask[0].sum())
        context = model.final_proj(out.hidden_states[-1])
        feats = model.encoder.feature_norm(out.conv_features)
        codes = model.quantizer.codes(feats)
        targets = model.project_q(model.quantizer.lookup(codes))
        neg = w2v.sample_negatives(2, M, w2v.num_negatives, torch.Generator().manual_seed(7))  # eval: no noise
        ref_loss, ref_correct = 0.0, 0
        for b in range(2):
            frames = mask[b].nonzero()[:, 0]
            for i, t in enumerate(frames.tolist()):
                cand_frames = torch.cat([torch.tensor([t]), frames[neg[b, i]]])
                logits = F.cosine_similarity(context[b, t][None], targets[b, cand_frames], dim=-1) / w2v.logit_temp
                same = (codes[b, cand_frames] == codes[b, t]).all(-1)
                same[0] = False
                logits[same] = -math.inf
                ref_loss += F.cross_entropy(logits[None], torch.tensor([0])).item()
                ref_correct += int(logits.argmax() == 0)
        ref_code_ppl, ref_prob_ppl = GumbelQuantizer.perplexities(model.quantizer.logits(feats[mask]))
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5)
    assert int(correct) == ref_correct
    assert code_ppl.item() == pytest.approx(ref_code_ppl.item()) and prob_ppl.item() == pytest.approx(
        ref_prob_ppl.item(), rel=1e-6)
    torch.testing.assert_close(pen, out.conv_features.pow(2).mean())


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(3)
    model = w2v.Wav2Vec2Pretraining(tiny_config(dropout=0.1, dropout_input=0.1, dropout_features=0.1)).train()
    wav = torch.randn(2, 12000)
    T = model.encoder.num_frames(12000)
    mask = span_mask((2, T), 0.65, 10, min_masks=2, same_count=True, generator=torch.Generator().manual_seed(0))
    loss, _, _, prob_ppl, pen = model(wav, mask, 2.0, torch.Generator().manual_seed(1))
    (loss + w2v.diversity_loss(prob_ppl) + pen).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------------ training runs

TINY = dict(conv_channels=32, layers=2, dim=64, heads=2, ffn=128, final_dim=32, latent_vars=32, num_negatives=20,
            batch_size=4, grad_accum=1, crop_seconds=2.0, min_seconds=1.0, num_workers=0, log_interval=1,
            ckpt_interval=1000, warmup_steps=2, learning_rate=2e-3, group_by_length=False, device="cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from data.synth import write_corpus
    root = tmp_path_factory.mktemp("w2v_corpus")
    write_corpus(str(root / "synth"), hours=24 * 2.0 / 3600, clip_seconds=2.0, seed=0, valid_percent=0.0,
                 workers=1, progress=False)
    return {"root": root, "tsv": str(root / "synth" / "train.tsv")}


def run(corpus, out_dir, **overrides):
    """pretrain_wav2vec2.main() in this process with TINY + overrides (dropouts off unless overridden)."""
    script = importlib.reload(w2v)  # fresh hyperparameter globals
    args = {**TINY, "train_tsv": corpus["tsv"], "out_dir": str(out_dir), "dropout": 0.0, "attention_dropout": 0.0,
            "dropout_input": 0.0, "dropout_features": 0.0, "layerdrop": 0.0, **overrides}
    old = sys.argv
    sys.argv = ["pretrain_wav2vec2.py"] + [f"--{k}={v}" for k, v in args.items()]
    try:
        script.main()
    finally:
        sys.argv = old
        importlib.reload(w2v)  # the defaults again, for the tests that read the module's globals


def read_log(out_dir):
    rows = {}
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            rows[r["step"]] = r
    return rows


def final_state(out_dir):
    import training
    return training.load_checkpoint(training.latest_checkpoint(str(out_dir)))


def all_params(ckpt):
    return {f"{part}.{k}": v for part in ("encoder", "quantizer", "project_q", "final_proj")
            for k, v in ckpt[part].items()}


# Learning needs a transformer of some width (at 2 x 64 the contrast stays at chance for 100+ updates) and the base
# codebook and negatives: a small codebook lets the diversity loss flatten the code distribution, and the targets
# (Gumbel samples) turn to noise.
LEARN = dict(conv_channels=32, layers=3, dim=128, heads=4, ffn=384, final_dim=256, latent_vars=320,
             num_negatives=100, batch_size=8, learning_rate=1e-3, warmup_steps=10, max_steps=100, dropout=0.1,
             dropout_input=0.1, dropout_features=0.1)
LEARN_STEPS = LEARN["max_steps"]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("w2v_learn")
    run(corpus, out, **LEARN)
    return out


@pytest.mark.slow
def test_loss_falls_on_synthetic_corpus(trained):
    log = read_log(trained)
    assert sorted(log) == list(range(1, LEARN_STEPS + 1))
    first = {k: np.mean([log[s][k] for s in range(1, 11)]) for k in ("contrastive", "acc", "loss")}
    last = {k: np.mean([log[s][k] for s in range(LEARN_STEPS - 9, LEARN_STEPS + 1)]) for k in first}
    print(f"contrastive {first['contrastive']:.3f} -> {last['contrastive']:.3f}, acc {first['acc']:.3f} -> "
          f"{last['acc']:.3f}, code_ppl {log[1]['code_ppl']:.1f} -> {log[LEARN_STEPS]['code_ppl']:.1f}")
    # chance: ln(1 + 100 negatives) = 4.62; accuracy a few % (negatives with the positive's code do not compete)
    assert first["contrastive"] > 4.5
    assert last["contrastive"] < first["contrastive"] - 0.08 and last["loss"] < first["loss"] - 0.08
    assert last["acc"] > 2 * first["acc"] and last["acc"] > 0.06
    assert all(2.0 <= log[s]["code_ppl"] <= 640.0 and 2.0 <= log[s]["prob_ppl"] <= 640.0 for s in log)
    assert log[1]["temp"] == 2.0 and log[LEARN_STEPS]["temp"] < 2.0


def test_checkpoint_loads_encoder_and_quantizer(trained):
    import training
    path = training.latest_checkpoint(str(trained))
    ckpt = training.load_checkpoint(path)
    assert ckpt["quantizer_config"] == {"in_dim": 32, "groups": 2, "codewords": 320, "dim": 256}
    assert ckpt["encoder_config"]["family"] == "wav2vec2" and not ckpt["encoder_config"]["normalize_waveform"]
    enc, q = load_pretrained(path), load_quantizer(path)
    assert not q.training and q.codevectors.shape == (2, 320, 128)
    for name, value in ckpt["quantizer"].items():
        assert torch.equal(q.state_dict()[name], value), name
    wav = torch.randn(2, 16000) * 0.1
    codes, _ = codeword_indices(enc, q, wav)
    with torch.no_grad():  # the quantiser's input: the LayerNorm'ed conv features (fairseq unmasked_features)
        conv = enc(wav).conv_features
        logits = F.linear(enc.feature_norm(conv), ckpt["quantizer"]["weight_proj.weight"],
                          ckpt["quantizer"]["weight_proj.bias"])
    assert codes.shape == (2, enc.num_frames(16000), 2)
    assert torch.equal(codes, logits.view(2, -1, 2, 320).argmax(-1))
    assert len(torch.unique(codes[..., 0])) > 1  # the trained quantiser does not map everything to one code
    with pytest.raises(ValueError, match="no wav2vec 2.0 quantizer"):
        torch.save({"encoder": {}}, str(trained / "other.pt"))
        load_quantizer(str(trained / "other.pt"))


def test_wav2vec2_for_pretraining_round_trip(trained, tmp_path):
    """save_hf with the heads -> transformers.Wav2Vec2ForPreTraining: same hidden states, same codeword indices,
    same projected targets and predictions on a clip; the folder loads back into the same quantiser."""
    transformers = pytest.importorskip("transformers")
    import training
    path = training.latest_checkpoint(str(trained))
    enc, heads = load_pretrained(path), load_wav2vec2_heads(path)
    save_hf(enc, tmp_path / "hf", **heads, extra_config={"num_negatives": 100, "diversity_loss_weight": 0.1})
    hf = transformers.Wav2Vec2ForPreTraining.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_codevectors_per_group == 320 and hf.config.proj_codevector_dim == 256
    t = torch.arange(24000) / 16000
    wav = (0.3 * torch.sin(2 * math.pi * 220 * t) * (1 + torch.sin(2 * math.pi * 3 * t)) + 0.05 * torch.randn(24000))
    wav = wav[None]
    with torch.no_grad():
        out = hf(wav, output_hidden_states=True)
        base = hf.wav2vec2(wav)
        hf_codes = hf.quantizer.weight_proj(base.extract_features).view(1, -1, 2, 320).argmax(-1)
        ours = enc(wav)
        codes, _ = codeword_indices(enc, heads["quantizer"], wav)
    assert torch.equal(codes, hf_codes)
    assert len(torch.unique(codes[0, :, 0])) > 1
    torch.testing.assert_close(ours.hidden_states[-1], out.hidden_states[-1], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        targets = heads["project_q"](heads["quantizer"].lookup(codes))
        context = heads["project_hid"](ours.hidden_states[-1])
    torch.testing.assert_close(targets, out.projected_quantized_states, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(context, out.projected_states, rtol=1e-4, atol=1e-4)
    again = load_quantizer(str(tmp_path / "hf"))
    for name, value in heads["quantizer"].state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    assert torch.equal(load_pretrained(str(tmp_path / "hf")).state_dict()["mask_emb"], enc.state_dict()["mask_emb"])
    with pytest.raises(ValueError, match="all of quantizer"):
        save_hf(enc, tmp_path / "bad", quantizer=heads["quantizer"])


def test_kill_and_resume_gives_identical_run(corpus, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    common = dict(max_steps=6, dropout=0.1, dropout_input=0.1, dropout_features=0.1, layerdrop=0.2)
    run(corpus, full, **common)
    run(corpus, part, stop_at_step=3, **common)  # the "kill": save at step 3 and exit
    assert final_state(part)["step"] == 3
    run(corpus, part, **common)  # resumes from ckpt_00000003.pt
    a, b = read_log(full), read_log(part)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in range(1, 7):
        for key in ("loss", "contrastive", "diversity", "code_ppl", "prob_ppl", "acc", "temp"):
            assert a[s][key] == b[s][key], (s, key)
    pa, pb = all_params(final_state(full)), all_params(final_state(part))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(corpus, tmp_path):
    """torchrun with 2 CPU ranks x 1 micro-batch == 1 process x 2 micro-batches: same masks, negatives and Gumbel
    noise (functions of the global micro-batch), same loss normalisation, hence the same parameters."""
    steps = 3
    args = {**TINY, "train_tsv": corpus["tsv"], "max_steps": steps, "grad_accum": 2, "dropout": 0.0,
            "attention_dropout": 0.0, "dropout_input": 0.0, "dropout_features": 0.0, "layerdrop": 0.0}
    run(corpus, tmp_path / "single", **{k: v for k, v in args.items() if k != "train_tsv"})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "pretrain_wav2vec2.py")] + [f"--{k}={v}" for k, v in args.items()] + \
          [f"--out_dir={tmp_path / 'ddp'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s) x 1 micro-batches" in proc.stdout + proc.stderr
    a, b = read_log(tmp_path / "single"), read_log(tmp_path / "ddp")
    for s in range(1, steps + 1):
        for key in ("loss", "contrastive", "diversity", "code_ppl", "prob_ppl"):
            assert a[s][key] == pytest.approx(b[s][key], rel=1e-5), (s, key)
        assert a[s]["acc"] == pytest.approx(b[s]["acc"], abs=0.01)
    pa, pb = all_params(final_state(tmp_path / "single")), all_params(final_state(tmp_path / "ddp"))
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5, msg=k)


# ------------------------------------------------------------------------------------------------------ bad input

def test_bad_audio_names_the_file(corpus, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(corpus["root"] / "synth" / "audio", root / "audio")
    lines = open(corpus["tsv"]).read().splitlines()
    lines[0] = str(root)
    (root / "train.tsv").write_text("\n".join(lines) + "\n")
    bad = lines[3].split("\t")[0]
    (root / bad).write_bytes(b"this is not a wav file" * 100)
    with pytest.raises(SystemExit) as e:
        run(corpus, tmp_path / "out", train_tsv=str(root / "train.tsv"), max_steps=8)
    assert bad in str(e.value.code) and "skip_bad_audio" in str(e.value.code)


def test_config_errors_and_resume_with_another_model(corpus, tmp_path):
    with pytest.raises(SystemExit) as e:
        run(corpus, tmp_path, latent_varz=3)
    assert "unknown key 'latent_varz'" in str(e.value.code)
    run(corpus, tmp_path, max_steps=1)
    with pytest.raises(SystemExit) as e:
        run(corpus, tmp_path, max_steps=2, latent_vars=16)
    assert "another model" in str(e.value.code) and "codewords" in str(e.value.code)


def test_init_from_fairseq_wav2vec2(corpus, tmp_path, capsys):
    """init_from=FAIRSEQ.pt: the encoder takes the fairseq model's architecture and weights, and the quantiser and
    projections load where this run's sizes match them (final_dim 16, 2 x 8 codewords); the run trains from there."""
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "fairseq", "wav2vec2_tiny.pt")
    out = tmp_path / "from_fairseq"
    run(corpus, out, init_from=src, final_dim=16, latent_vars=8, max_steps=2, num_negatives=5)
    said = capsys.readouterr().out
    for part in ("quantizer", "project_q", "final_proj"):
        assert f"init_from: {part} from {src}" in said
    import training
    ckpt = training.load_checkpoint(training.latest_checkpoint(str(out)))
    assert (ckpt["encoder_config"]["dim"], ckpt["encoder_config"]["layers"], ckpt["step"]) == (48, 3, 2)
    # a head whose size differs starts fresh, and says so
    run(corpus, tmp_path / "fresh_head", init_from=src, max_steps=1)
    assert "init_from: quantizer starts fresh" in capsys.readouterr().out
