"""The encoder against transformers (the numerical reference), checkpoint loading/saving, and span masking."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from bench.masking import span_mask_numpy_loop
from model import Encoder, EncoderConfig, _distinct_uniform, load_pretrained, save_hf, span_mask

transformers = pytest.importorskip("transformers")

SHORT_CONVS = dict(conv_dim=(24, 24, 24), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2))  # 20x down-sampling
BASE_CONVS = dict(conv_dim=(16,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2))

# Two random small configurations per public family: (HF config class, kwargs)
HF_CASES = {
    "hubert-a": ("HubertConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, num_conv_pos_embeddings=16,
                                      num_conv_pos_embedding_groups=4, **BASE_CONVS)),
    "hubert-b": ("HubertConfig", dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                      intermediate_size=96, num_conv_pos_embeddings=12,
                                      num_conv_pos_embedding_groups=8, conv_bias=True, **SHORT_CONVS)),
    "wav2vec2-postln-a": ("Wav2Vec2Config", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=64, num_conv_pos_embeddings=16,
                                                 num_conv_pos_embedding_groups=4, **BASE_CONVS)),
    "wav2vec2-postln-b": ("Wav2Vec2Config", dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=2,
                                                 intermediate_size=80, num_conv_pos_embeddings=10,
                                                 num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
                                                 **SHORT_CONVS)),
    "wav2vec2-preln-a": ("Wav2Vec2Config", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                intermediate_size=64, num_conv_pos_embeddings=16,
                                                num_conv_pos_embedding_groups=4, do_stable_layer_norm=True,
                                                feat_extract_norm="layer", **BASE_CONVS)),
    "wav2vec2-preln-b": ("Wav2Vec2Config", dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                                intermediate_size=96, num_conv_pos_embeddings=12,
                                                num_conv_pos_embedding_groups=8, do_stable_layer_norm=True,
                                                conv_bias=True, feat_extract_norm="layer", **SHORT_CONVS)),
    "data2vec-a": ("Data2VecAudioConfig", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=64, num_conv_pos_embeddings=5,
                                               conv_pos_kernel_size=5, num_conv_pos_embedding_groups=4,
                                               **BASE_CONVS)),
    "data2vec-b": ("Data2VecAudioConfig", dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                               intermediate_size=96, num_conv_pos_embeddings=3,
                                               conv_pos_kernel_size=7, num_conv_pos_embedding_groups=8,
                                               **SHORT_CONVS)),
}
LENGTHS = [8000, 5600, 3130]  # three clips of different lengths in one padded batch


def hf_model(case, tmp_path):
    """A randomly initialised transformers model (eval), saved to a folder; returns (model, folder)."""
    cls_name, kwargs = HF_CASES[case]
    torch.manual_seed(hash(case) % 1000)
    config = getattr(transformers, cls_name)(**kwargs)
    model = transformers.AutoModel.from_config(config).eval()
    with torch.no_grad():  # make LayerNorm/GroupNorm affine parameters non-trivial so their mapping is tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path / case
    model.save_pretrained(folder)
    return model, str(folder)


def padded_batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    wav = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        wav[i, :n] = torch.randn(n, generator=g) * 0.1 + torch.sin(torch.arange(n) * (0.01 + 0.02 * i))
    return wav, torch.tensor(lengths)


def hf_hidden(model, wav, attention_mask=None):
    with torch.no_grad():
        out = model(wav, attention_mask=attention_mask, output_hidden_states=True)
    return out.hidden_states + (out.last_hidden_state,)


def states(out):
    """Our hidden states plus the encoder output, in transformers' order (hidden_states..., last_hidden_state)."""
    return out.hidden_states + [out.last_hidden_state]


def assert_valid_frames_close(ours, theirs, frames, atol=1e-4):
    assert len(ours) == len(theirs)
    for layer, (a, b) in enumerate(zip(ours, theirs)):
        for i, t in enumerate(frames):
            err = (a[i, :t] - b[i, :t]).abs().max().item()
            assert err < atol, f"hidden state {layer}, clip {i}: max abs error {err:.2e}"


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_hidden_states_match_transformers_on_padded_batch(case, tmp_path):
    """transformers' batch semantics (padding_exact=False): equal within 1e-4 on every valid frame."""
    model, folder = hf_model(case, tmp_path)
    enc = load_pretrained(folder)
    enc.cfg.padding_exact = False
    enc.cfg.normalize_waveform = False  # HF leaves waveform normalisation to its feature extractor
    wav, lengths = padded_batch(LENGTHS)
    attention_mask = (torch.arange(wav.shape[1])[None, :] < lengths[:, None]).long()
    with torch.no_grad():
        out = enc(wav, lengths)
    theirs = hf_hidden(model, wav, attention_mask)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert out.frame_lengths.tolist() == [enc.num_frames(n) for n in LENGTHS]
    assert_valid_frames_close(states(out), theirs, out.frame_lengths.tolist())


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_padded_clip_equals_clip_alone(case, tmp_path):
    """padding_exact=True (default): each clip of a padded batch gives transformers' hidden states of the clip alone."""
    model, folder = hf_model(case, tmp_path)
    enc = load_pretrained(folder)
    enc.cfg.normalize_waveform = False
    wav, lengths = padded_batch(LENGTHS, seed=1)
    with torch.no_grad():
        out = enc(wav, lengths)
    for i, n in enumerate(LENGTHS):
        alone = hf_hidden(model, wav[i:i + 1, :n])
        t = enc.num_frames(n)
        assert_valid_frames_close([h[i:i + 1] for h in states(out)], alone, [t])


def test_waveform_normalisation_is_per_clip_over_valid_samples():
    cfg = EncoderConfig.data2vec_base(layers=1, dim=32, heads=2, ffn=64, pos_conv_groups=4,
                                      conv_layers=((16, 10, 5), (16, 3, 2)))
    enc = Encoder(cfg).eval()
    wav, lengths = padded_batch([4000, 2500])
    with torch.no_grad():
        batch = enc(wav, lengths).hidden_states[-1]
        alone = enc(wav[1:, :2500]).hidden_states[-1]
        scaled = enc(3.0 * wav[1:, :2500] + 0.5).hidden_states[-1]  # invariant to gain and offset
    t = enc.num_frames(2500)
    torch.testing.assert_close(batch[1, :t], alone[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(scaled, alone, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("factory,family", [(EncoderConfig.hubert_base, "hubert"),
                                            (EncoderConfig.wav2vec2_base, "wav2vec2"),
                                            (EncoderConfig.data2vec_base, "data2vec-audio")])
def test_save_hf_round_trips_through_automodel(factory, family, tmp_path):
    torch.manual_seed(0)
    cfg = factory(layers=2, dim=32, heads=2, ffn=64, pos_conv_groups=4,
                  pos_conv_kernel=16 if family != "data2vec-audio" else 5,
                  conv_layers=((16, 10, 5), (16, 3, 2), (16, 2, 2)))
    enc = Encoder(cfg).eval()
    save_hf(enc, tmp_path / "hf")
    model = transformers.AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert model.config.model_type == family
    wav, lengths = padded_batch([6000, 4100])
    if cfg.normalize_waveform:  # what HF's feature extractor would do before the model
        wav = torch.stack([torch.cat([torch.nn.functional.layer_norm(w[:n], (n,)), w[n:] * 0])
                           for w, n in zip(wav, lengths.tolist())])
    with torch.no_grad():
        ours = states(enc(wav, lengths))
    for i, n in enumerate(lengths.tolist()):
        alone = hf_hidden(model, wav[i:i + 1, :n])
        assert_valid_frames_close([h[i:i + 1] for h in ours], alone, [enc.num_frames(n)])
    # and back: the folder loads into an identical encoder
    again = load_pretrained(str(tmp_path / "hf"))
    assert again.cfg.normalize_waveform == cfg.normalize_waveform
    for (name, a), b in zip(enc.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_legacy_weight_norm_spelling_and_prefix(tmp_path):
    """Hub checkpoints spell weight norm weight_g/weight_v and wrap the backbone (wav2vec2.*) with heads."""
    from safetensors.torch import load_file, save_file
    model, folder = hf_model("wav2vec2-postln-a", tmp_path)
    state = load_file(os.path.join(folder, "model.safetensors"))
    legacy = {}
    for k, v in state.items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                                "weight_v")
        legacy["wav2vec2." + k] = v
    legacy["quantizer.codevectors"] = torch.zeros(1, 8, 4)
    save_file(legacy, os.path.join(folder, "model.safetensors"))
    enc = load_pretrained(folder)
    wav, _ = padded_batch([4000])
    with torch.no_grad():
        assert_valid_frames_close(states(enc(wav)), hf_hidden(model, wav), [enc.num_frames(4000)])


def test_unknown_or_missing_names_are_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    _, folder = hf_model("hubert-a", tmp_path)
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    state["encoder.layers.0.mystery.weight"] = torch.zeros(3)
    del state["encoder.layer_norm.bias"]
    save_file(state, path)
    with pytest.raises(ValueError) as err:
        load_pretrained(folder)
    assert "encoder.layers.0.mystery.weight" in str(err.value) and "transformer.layer_norm.bias" in str(err.value)


def test_our_checkpoint_round_trip_and_bad_checkpoint(tmp_path):
    cfg = EncoderConfig.hubert_base(layers=1, dim=32, heads=2, ffn=64, pos_conv_groups=4, pos_conv_kernel=8,
                                    conv_layers=((16, 10, 5),))
    enc = Encoder(cfg)
    torch.save({"encoder_config": dataclasses.asdict(cfg), "encoder": enc.state_dict(), "step": 3},
               tmp_path / "ckpt.pt")
    again = load_pretrained(str(tmp_path / "ckpt.pt"))
    assert again.cfg == cfg
    wav, _ = padded_batch([3000])
    with torch.no_grad():
        torch.testing.assert_close(again(wav).hidden_states[-1], enc.eval()(wav).hidden_states[-1])
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt"):
        load_pretrained(str(tmp_path / "other.pt"))


def test_base_parameter_counts_match_the_reference():
    """spec pretrain.md §1.6: HF HubertModel 94,371,712; Data2VecAudioModel 93,164,288 (mask embedding included)."""
    count = lambda cfg: sum(p.numel() for p in Encoder(cfg).parameters())
    assert count(EncoderConfig.hubert_base()) == 94_371_712
    assert count(EncoderConfig.data2vec_base()) == 93_164_288


def test_feature_grad_mult_scales_only_the_conv_gradient():
    torch.manual_seed(0)
    cfg = EncoderConfig.hubert_base(layers=1, dim=32, heads=2, ffn=64, pos_conv_groups=4, pos_conv_kernel=8,
                                    conv_layers=((16, 10, 5), (16, 3, 2)), dropout=0.0, attention_dropout=0.0,
                                    dropout_input=0.0, layerdrop=0.0, feature_grad_mult=1.0)
    wav, _ = padded_batch([3000])
    grads = []
    for mult in (1.0, 0.1):
        torch.manual_seed(0)
        enc = Encoder(dataclasses.replace(cfg, feature_grad_mult=mult))
        enc(wav).hidden_states[-1].pow(2).sum().backward()
        grads.append((enc.feature_extractor.conv_layers[0].conv.weight.grad, enc.feature_proj.weight.grad))
    torch.testing.assert_close(grads[1][0], 0.1 * grads[0][0])
    torch.testing.assert_close(grads[1][1], grads[0][1])


def test_ffn_outputs_are_the_pre_residual_feed_forward():
    torch.manual_seed(0)
    cfg = EncoderConfig.data2vec_base(layers=2, dim=32, heads=2, ffn=64, pos_conv_groups=4,
                                      conv_layers=((16, 10, 5), (16, 3, 2)))
    enc = Encoder(cfg).eval()
    wav, _ = padded_batch([3000])
    with torch.no_grad():
        out = enc(wav, ffn_outputs=True)
        layer = enc.transformer.layers[1]
        x = out.hidden_states[1]
        h = layer.attn_norm(x + layer.attn(x, None))
        f = layer.fc2(torch.nn.functional.gelu(layer.fc1(h)))
    torch.testing.assert_close(out.ffn[1], f)
    torch.testing.assert_close(out.hidden_states[2], layer.final_norm(h + f))


# ---------------------------------------------------------------------------------------------------------------
# span_mask against the per-row reference loop (bench/masking.py), statistically

def test_span_mask_matches_reference_statistics():
    B, T, p, L = 64, 1000, 0.65, 10
    ours = torch.stack([span_mask((B, T), p, L, generator=torch.Generator().manual_seed(s)) for s in range(8)])
    ref = np.stack([span_mask_numpy_loop((B, T), p, L, rng=np.random.default_rng(s)) for s in range(8)])
    frac_ours, frac_ref = ours.float().mean().item(), ref.mean()
    assert abs(frac_ours - frac_ref) < 0.02, (frac_ours, frac_ref)
    assert 0.40 < frac_ours < 0.50  # spec §2: about 45% at T=999
    # same_count: every row of a batch has exactly the same number of masked frames
    assert (ours.sum(-1) == ours.sum(-1)[:, :1]).all()


def test_span_mask_per_row_mode_span_lengths_and_counts():
    B, T, p, L = 256, 300, 0.65, 10
    ours = span_mask((B, T), p, L, same_count=False, generator=torch.Generator().manual_seed(0))
    ref = span_mask_numpy_loop((B, T), p, L, same_count=False, rng=np.random.default_rng(0))
    # untrimmed masks consist of runs of at least L frames (overlapping spans merge)
    for row in ours[:32]:
        padded = np.concatenate([[0], row.numpy().astype(int), [0]])
        edges = np.flatnonzero(np.diff(padded))
        assert ((edges[1::2] - edges[::2]) >= L).all()
    # per-row masked counts follow the reference's distribution
    c_ours, c_ref = ours.sum(1).float(), ref.sum(1)
    assert abs(c_ours.mean().item() - c_ref.mean()) < 0.03 * T
    assert abs(c_ours.std().item() - c_ref.std()) < 0.3 * c_ref.std() + 2


def test_span_mask_short_rows_min_masks_and_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([500, 300, 100, 500])
    trimmed = span_mask((4, 500), 0.65, 10, lengths=lengths, generator=g)
    per_row = span_mask((4, 500), 0.65, 10, lengths=lengths, same_count=False, generator=g)
    pos = torch.arange(500)[None, :]
    assert not (trimmed & (pos >= lengths[:, None])).any() and not (per_row & (pos >= lengths[:, None])).any()
    assert len(set(trimmed.sum(1).tolist())) == 1  # the reference collapses every row to the shortest one's count
    assert per_row[0].float().mean() > 0.3  # per-row mode keeps the long rows' fraction
    # min_masks applies and the start range shrinks to [0, T - num - 1) for rows shorter than the span:
    # 2 distinct starts in [0, 9) of a 12-frame row cover at least 5 frames (starts 7 and 8)
    tiny = span_mask((300, 12), 0.01, 10, min_masks=2, same_count=False, generator=g)
    ref = span_mask_numpy_loop((300, 12), 0.01, 10, min_masks=2, same_count=False, rng=np.random.default_rng(0))
    assert tiny.sum(1).min() >= 5
    assert abs(tiny.sum(1).float().mean().item() - ref.sum(1).mean()) < 0.5
    few = span_mask((2, 100), 0.0, 10, min_masks=1, same_count=False, generator=g)
    assert (few.sum(1) == 10).all()


def _subset_frequencies(n, k, allowed=None, rows=30000, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.rand(*s, generator=g)
    nn, kk = torch.full((rows,), n), torch.full((rows,), k)
    table = None if allowed is None else torch.tensor(allowed + [False])[None, :].expand(rows, n + 1).contiguous()
    count = None if table is None else table.sum(1)
    value, keep = _distinct_uniform(nn, kk, rand, torch.empty(rows * (n + 1), dtype=torch.int32), table, count)
    assert (keep.sum(1) == k).all()
    subsets = [tuple(sorted(v[m].tolist())) for v, m in zip(value, keep)]
    assert all(len(set(s)) == k for s in subsets)
    return subsets


@pytest.mark.parametrize("n,k,allowed", [
    (6, 3, None),  # 20 subsets
    (9, 2, [True, False, True, True, False, True, True, False, True]),  # only allowed values, C(6, 2) = 15 subsets
    (5, 4, None),  # k close to n: the first pool falls short, so the doubling path runs too
])
def test_distinct_uniform_draws_every_subset_equally_often(n, k, allowed):
    import itertools
    import math
    subsets = _subset_frequencies(n, k, allowed)
    pool = range(n) if allowed is None else [v for v in range(n) if allowed[v]]
    expected = list(itertools.combinations(pool, k))
    counts = {s: 0 for s in expected}
    for s in subsets:
        counts[s] += 1  # a KeyError here is a disallowed value
    # chi-square against uniform, df = len - 1 (<= 19): 60 is far past the 0.9999 quantile (~ 47)
    e = len(subsets) / len(expected)
    chi2 = sum((c - e) ** 2 / e for c in counts.values())
    assert chi2 < 60, (chi2, counts)
    assert math.isclose(sum(counts.values()), len(subsets))


def test_span_mask_reproducible_from_generator():
    a = span_mask((16, 700), 0.8, 10, generator=torch.Generator().manual_seed(123))
    b = span_mask((16, 700), 0.8, 10, generator=torch.Generator().manual_seed(123))
    c = span_mask((16, 700), 0.8, 10, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b) and not torch.equal(a, c)
