"""fairseq checkpoints read without fairseq (fairseq_format.py, model.load_pretrained), against fixtures fairseq
itself wrote (tests/fixtures/fairseq/make.py, fairseq 0.12 via fairseq-fixed 0.12.3.1): hidden states of HuBERT
(post-LN and pre-LN), wav2vec 2.0 and data2vec-audio, the three formats of the file (cfg dict, legacy args
Namespace, pickled DictConfig), the criterion terms of all three objectives on a fixed batch, mask, labels and
negatives, the refusals, continued pre-training (init_from) and the probe on a fairseq checkpoint."""
import argparse
import io
import json
import os
import sys

import pytest
import torch

import fairseq_format
import training
from model import load_fairseq_heads, load_pretrained, load_wav2vec2_heads

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "fairseq")
MODELS = ["hubert_tiny", "hubert_tiny_preln", "wav2vec2_tiny", "data2vec_tiny"]


def fixture(name):
    return os.path.join(HERE, f"{name}.pt")


def ref(name):
    return torch.load(os.path.join(HERE, f"{name}.ref.pt"), weights_only=False)


def rel(a, b):
    return abs(float(a) - float(b)) / max(abs(float(b)), 1e-12)


@pytest.mark.parametrize("name,file", [(m, m) for m in MODELS] + [("hubert_tiny", "hubert_tiny_dictconfig"),
                                                                    ("wav2vec2_tiny", "wav2vec2_tiny_legacy_args")])
def test_hidden_states_match_fairseq(name, file):
    r = ref(name)
    enc = load_pretrained(fixture(file))
    with torch.no_grad():
        out = enc(r["wav"])
    assert len(out.hidden_states) == r["layers"].shape[0] + 1
    for i in range(r["layers"].shape[0]):
        torch.testing.assert_close(out.hidden_states[i + 1], r["layers"][i], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.last_hidden_state, r["last"], atol=1e-4, rtol=0)


def test_config_fields_from_the_checkpoint():
    cfg = load_pretrained(fixture("hubert_tiny_preln")).cfg
    assert (cfg.family, cfg.extractor_mode, cfg.layer_norm_first, cfg.conv_bias, cfg.normalize_waveform) == \
        ("hubert", "layer", True, True, True)
    assert cfg.conv_layers == ((32, 10, 5),) + ((32, 3, 2),) * 4 + ((32, 2, 2),) * 2
    assert (cfg.dim, cfg.layers, cfg.heads, cfg.ffn, cfg.pos_conv_kernel, cfg.pos_conv_groups) == (48, 3, 4, 96, 16, 4)
    d2v = load_pretrained(fixture("data2vec_tiny")).cfg
    # data2vec: pos_conv_depth convs of kernel max(3, conv_pos // depth) = 15 // 3
    assert (d2v.family, d2v.pos_conv_depth, d2v.pos_conv_kernel, d2v.normalize_waveform) == \
        ("data2vec-audio", 3, 5, True)
    assert load_pretrained(fixture("wav2vec2_tiny_legacy_args")).cfg == load_pretrained(fixture("wav2vec2_tiny")).cfg


def test_heads_are_skipped_and_listed(capsys):
    load_pretrained(fixture("hubert_tiny"))
    out = capsys.readouterr().out
    assert "skipping 3 pre-training head weights (final_proj, label_embs_concat)" in out
    load_pretrained(fixture("wav2vec2_tiny"))
    assert "(final_proj, project_q, quantizer)" in capsys.readouterr().out


# --- what is refused, in one line ----------------------------------------------------------------------------------

def rewrite(tmp_path, name, model=None, weights=None, args=False):
    ckpt = torch.load(fixture(name), weights_only=False)
    if model:
        ckpt["cfg"]["model"].update(model)
    if weights:
        weights(ckpt["model"])
    if args:
        flat = {**ckpt["cfg"]["task"], **ckpt["cfg"]["model"], "arch": ckpt["cfg"]["model"]["_name"]}
        ckpt = {"args": argparse.Namespace(**flat), "model": ckpt["model"]}
    path = tmp_path / "x.pt"
    torch.save(ckpt, path)
    return str(path)


@pytest.mark.parametrize("field,value", [("conv_pos_batch_norm", True), ("pos_enc_type", "rope"),
                                         ("layer_type", "conformer"), ("activation_fn", "relu")])
def test_unimplemented_field_is_refused_in_one_line(tmp_path, field, value):
    path = rewrite(tmp_path, "hubert_tiny", model={field: value})
    with pytest.raises(ValueError) as e:
        load_pretrained(path)
    msg = str(e.value)
    assert msg.startswith(path) and f"{field}={value!r}" in msg and "not supported" in msg and "\n" not in msg


def test_refused_field_in_legacy_args(tmp_path):
    path = rewrite(tmp_path, "hubert_tiny", model={"conv_pos_batch_norm": True}, args=True)
    with pytest.raises(ValueError, match="conv_pos_batch_norm=True"):
        load_pretrained(path)


def test_unmappable_and_missing_weights_are_listed(tmp_path):
    def edit(sd):
        sd["encoder.layers.0.extra_adapter.weight"] = torch.zeros(3)
        del sd["encoder.layers.2.fc2.bias"]
    path = rewrite(tmp_path, "hubert_tiny", weights=edit)
    with pytest.raises(ValueError) as e:
        load_pretrained(path)
    assert "encoder.layers.0.extra_adapter.weight" in str(e.value)
    assert "transformer.layers.2.fc2.bias" in str(e.value)


def test_unknown_pickled_class_is_one_line(tmp_path):
    # a cfg holding an object of a package that is not installed: the pickle names `fairseq_gone.Thing`
    src = fixture("hubert_tiny")
    ckpt = torch.load(src, weights_only=False)

    class Thing:
        pass
    Thing.__module__, Thing.__qualname__ = "fairseq_gone", "Thing"
    sys.modules["fairseq_gone"] = type(sys)("fairseq_gone")
    sys.modules["fairseq_gone"].Thing = Thing
    try:
        ckpt["cfg"]["model"]["encoder_layers"] = Thing()
        path = tmp_path / "odd.pt"
        torch.save(ckpt, path)
    finally:
        del sys.modules["fairseq_gone"]
    with pytest.raises(ValueError) as e:
        load_pretrained(str(path))
    msg = str(e.value)
    assert "fairseq_gone.Thing" in msg and "cfg.model.encoder_layers" in msg and "\n" not in msg


def test_fine_tuned_and_other_models_are_refused(tmp_path):
    path = rewrite(tmp_path, "wav2vec2_tiny", model={"_name": "wav2vec_ctc", "w2v_path": "/x/wav2vec_small.pt"})
    with pytest.raises(ValueError, match="fine-tuned fairseq model"):
        load_pretrained(path)
    path = rewrite(tmp_path, "wav2vec2_tiny", model={"_name": "transformer_lm"})
    with pytest.raises(ValueError, match="'transformer_lm' is not supported"):
        load_pretrained(path)


def test_conv_feature_layers_is_not_evaluated(tmp_path):
    path = rewrite(tmp_path, "hubert_tiny", model={"conv_feature_layers": "__import__('os').getcwd()"})
    with pytest.raises(ValueError, match="conv_feature_layers"):
        load_pretrained(path)


# --- the three objectives' terms against fairseq's criterion -------------------------------------------------------

@pytest.mark.parametrize("name", ["hubert_tiny", "hubert_tiny_preln"])
def test_hubert_loss_terms_match_fairseq(name, monkeypatch):
    import pretrain_musichubert as ph
    monkeypatch.setattr(ph, "final_dim", 16)  # the fixture's; restored after the test (other tests read the module)
    r = ref(name)
    cfg, state, heads = training.init_from_checkpoint(fixture(name), dropout=0.0, attention_dropout=0.0,
                                                      dropout_input=0.0, layerdrop=0.0)
    model = ph.MusicHubert(cfg, 10)  # 10 clusters + fairseq's 4 specials = label_embs_concat's rows
    model.encoder.load_state_dict(state)
    assert training.load_matching(model.final_proj, heads["final_proj"], "final_proj", name, lambda *_: None)
    model.label_embs.data.copy_(heads["label_embs"])
    model.eval()
    with torch.no_grad():
        ce_sum, correct, pen, _ = model(r["wav"], r["targets"], r["mask"])
    n = int(r["mask"].sum())
    assert n == r["sample_size"] == r["count"]
    assert rel(ce_sum, r["ce_masked"]) < 1e-5
    assert rel(pen, r["features_pen"]) < 1e-5
    assert int(correct) == r["correct"]
    loss = ce_sum + ph.feature_pen_weight * pen * n  # the script's loss before its 1 / sample_size
    assert rel(loss, r["loss"]) < 1e-5


def test_wav2vec2_loss_terms_match_fairseq(monkeypatch):
    import pretrain_wav2vec2 as pw
    for key, value in dict(final_dim=16, latent_vars=8, latent_groups=2, num_negatives=5).items():
        monkeypatch.setattr(pw, key, value)  # the fixture's sizes; restored after the test
    r = ref("wav2vec2_tiny")
    cfg, state, heads = training.init_from_checkpoint(fixture("wav2vec2_tiny"), dropout=0.0, attention_dropout=0.0,
                                                      dropout_input=0.0, layerdrop=0.0, dropout_features=0.0)
    model = pw.Wav2Vec2Pretraining(cfg)
    model.encoder.load_state_dict(state)
    for part in ("quantizer", "project_q", "final_proj"):
        getattr(model, part).load_state_dict(heads[part])
    model.eval()  # fairseq's eval quantiser: the argmax code
    B, M = r["mask"].shape[0], int(r["mask"][0].sum())
    # fairseq's negatives: B x (M * K) indices into the batch's masked frames, offset by b * M; ours: B x M x K
    negs = (r["negatives"] - torch.arange(B)[:, None] * M).view(B, M, -1)
    monkeypatch.setattr(pw, "sample_negatives", lambda *a, **k: negs)
    with torch.no_grad():
        loss, correct, code_ppl, prob_ppl, pen = model(r["wav"], r["mask"], 2.0, torch.Generator())
    n = r["sample_size"]
    assert rel(loss, r["contrastive"]) < 1e-5 and int(correct) == r["correct"]
    assert rel(prob_ppl, r["prob_perplexity"]) < 1e-5 and rel(code_ppl, r["code_perplexity"]) < 1e-5
    assert rel(pw.diversity_loss(prob_ppl), r["diversity"]) < 1e-5
    assert rel(pen, r["features_pen"]) < 1e-5
    total = loss + 0.1 * pw.diversity_loss(prob_ppl) * n + 10.0 * pen * n  # fairseq loss_weights [0.1, 10]
    assert rel(total, r["loss"]) < 1e-5


def test_data2vec_regression_matches_fairseq():
    import pretrain_music2vec as pm
    r = ref("data2vec_tiny")
    cfg, state, heads = training.init_from_checkpoint(fixture("data2vec_tiny"), dropout=0.0, attention_dropout=0.0,
                                                      dropout_input=0.0, layerdrop=0.0)
    from model import Encoder
    enc = Encoder(cfg)
    enc.load_state_dict(state)
    student = pm.Music2VecStudent(enc, normalize=False)  # the fixture's clips are normalised already
    student.final_proj.load_state_dict(heads["final_proj"])
    student.eval()
    teacher = pm.make_teacher(enc.transformer)  # at step 0 the EMA teacher is the student's copy
    with torch.no_grad():
        pred, teacher_input, padding_mask = student(r["wav"], None, r["mask"])
        _, ffn = teacher(teacher_input, padding_mask, ffn_outputs=True)
        target = pm.build_targets(ffn, padding_mask, r["top_k"], instance_norm=True)[r["mask"]]
        loss = pm.regression_loss(pred, target, 0.0).sum()
    assert pred.shape[0] == r["sample_size"]
    assert rel(loss, r["regression"]) < 1e-5


# --- continued pre-training and the probe --------------------------------------------------------------------------

def test_fairseq_wav2vec2_heads_load_through_our_loader():
    heads = load_wav2vec2_heads(fixture("wav2vec2_tiny"))
    q = heads["quantizer"]
    assert (q.groups, q.codewords, q.dim) == (2, 8, 16)
    sd = torch.load(fixture("wav2vec2_tiny"), weights_only=False)["model"]
    torch.testing.assert_close(q.codevectors.reshape(1, 16, -1), sd["quantizer.vars"])
    torch.testing.assert_close(heads["project_hid"].weight, sd["final_proj.weight"])
    hub = load_fairseq_heads(fixture("hubert_tiny"))
    assert tuple(hub["label_embs"].shape) == (14, 16)


def test_init_from_fairseq_hubert_in_the_script(tmp_path, capsys):
    """pretrain_musichubert.py init_from=FAIRSEQ.pt: the run starts from its encoder and head (loss at step 0 is
    then the checkpoint's) and trains; its checkpoint has the fairseq model's architecture."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from test_pretrain_musichubert import TINY, run
    from data.synth import write_corpus
    import kmeans
    root = tmp_path / "c"
    write_corpus(str(root / "synth"), hours=8 * 2.0 / 3600, clip_seconds=2.0, seed=0, valid_percent=0.0,
                 workers=1, progress=False)
    tsv = str(root / "synth" / "train.tsv")
    kmeans.main(["features", "--manifest", tsv, "--out", str(root / "mfcc"), "--workers", "0"])
    kmeans.main(["fit", str(root / "mfcc"), "--k", "10", "--out", str(root / "km.pt"), "--seed", "0"])
    kmeans.main(["label", str(root / "mfcc"), "--km", str(root / "km.pt"), "--out", str(root / "labels")])
    corpus = {"tsv": tsv, "labels": str(root / "labels")}
    out = tmp_path / "run"
    run(corpus, out, init_from=fixture("hubert_tiny"), max_steps=2)
    said = capsys.readouterr().out
    assert "init_from: final_proj from" in said and "init_from: label_embs from" in said
    ckpt = training.load_checkpoint(training.latest_checkpoint(str(out)))
    assert ckpt["encoder_config"]["dim"] == 48 and ckpt["encoder_config"]["layers"] == 3  # not TINY's 32 x 2
    assert ckpt["step"] == 2 and TINY["dim"] == 32


def test_probe_runs_on_a_fairseq_checkpoint(tmp_path):
    import probe
    from test_probe import write_nsynth
    write_nsynth(tmp_path / "nsynth", per_split=(8, 4, 4))
    results = tmp_path / "results.jsonl"
    model = fixture("hubert_tiny")
    records = probe.main(["--task", "nsynth_pitch", "--model", model, "--data-root", str(tmp_path / "nsynth"),
                          "--cache-dir", str(tmp_path / "cache"), "--results", str(results), "--epochs", "2",
                          "--device", "cpu"])
    rec = records["nsynth_pitch", model, probe.SEED]
    assert len(rec["layer_weights"]) == 4  # 3 layers + the transformer input
    assert json.loads(open(results).read().splitlines()[-1])["model"] == model
