"""MERT's Hugging Face folders without remote code, and the probe at the model's own rate (24 kHz, 75 Hz frames).

The folders are built here, with no download, from the published fields (../shared/spec/mert_fairseq.md §2):
config.json as MERT-v1's (`model_type: mert_model`, `sample_rate: 24000`, `feature_extractor_cqt: false`,
`deepnorm: false`, `attention_relax`; 330M: `do_stable_layer_norm: true`, `attention_relax: 32`; every other field
with MERTConfig's defaults, which are HubertConfig's), preprocessor_config.json as theirs
(`Wav2Vec2FeatureExtractor`, `sampling_rate: 24000`, `do_normalize: true`), and the weights in `pytorch_model.bin`
under HuBERT's transformers names with the old weight-norm spelling (weight_g / weight_v) of 2023's torch. The sizes
are tiny; the layout is theirs. transformers' HubertModel with the same weights is the reference (test-only).
"""
import json
import os

import numpy as np
import pytest
import torch

import probe
from model import load_pretrained, save_hf
from probing import features as pf
from test_probe import write_nsynth
from test_probe_beat import make_beat_folder

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


def mert_folder(folder, large=False, **config):
    """A MERT-v1-95M-like (large: 330M-like, pre-LN) folder; returns (the transformers reference model, folder)."""
    torch.manual_seed(3 if large else 2)
    hf_cfg = transformers.HubertConfig(**TINY, do_stable_layer_norm=large,
                                       feat_extract_norm="layer" if large else "group")
    model = transformers.HubertModel(hf_cfg).eval()
    with torch.no_grad():  # non-trivial norms, so a swapped name cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    os.makedirs(folder, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        k = k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                               "weight_v")
        state[k] = v.clone()
    torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    cfg = {k: v for k, v in hf_cfg.to_dict().items() if not k.startswith("_")}
    cfg.update(model_type="mert_model", architectures=["MERTModel"], sample_rate=24000,
               auto_map={"AutoConfig": "configuration_MERT.MERTConfig", "AutoModel": "modeling_MERT.MERTModel"},
               feature_extractor_cqt=False, feature_extractor_cqt_bins=336, deepnorm=False,
               attention_relax=32.0 if large else -1.0)
    cfg.update(config)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
                   "padding_side": "right", "padding_value": 0, "return_attention_mask": True,
                   "sampling_rate": 24000}, f)
    return model, str(folder)


def music(seconds, rate, seed=0):
    t = np.arange(int(seconds * rate)) / rate
    x = np.sin(2 * np.pi * 330 * t) + 0.5 * np.sin(2 * np.pi * 495 * t)
    x += 0.05 * np.random.default_rng(seed).standard_normal(len(t))
    return torch.from_numpy(x.astype(np.float32))[None]


@pytest.mark.parametrize("large", [False, True], ids=["95M-like", "330M-like"])
def test_mert_folder_loads_at_24k_and_matches_transformers(tmp_path, large):
    model, folder = mert_folder(tmp_path / "mert", large=large)
    enc = load_pretrained(folder)
    assert enc.cfg.sample_rate == 24000 and enc.cfg.frame_rate == 75.0
    assert enc.cfg.layer_norm_first == large and enc.cfg.normalize_waveform  # the folder's do_normalize
    wav = music(2.0, 24000)
    with torch.no_grad():
        ours = enc(wav, normalize=False).hidden_states
        theirs = model(wav, output_hidden_states=True).hidden_states
    assert ours[0].shape[1] == (48000 - 400) // 320 + 1 == 149  # 75 Hz frames from the same conv stack
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("field", ["feature_extractor_cqt", "deepnorm"])
def test_mert_network_changes_are_refused_in_one_line(tmp_path, field):
    _, folder = mert_folder(tmp_path / "mert", **{field: True})
    with pytest.raises(ValueError) as e:
        load_pretrained(folder)
    msg = str(e.value)
    assert "\n" not in msg and field in msg and "config.json" in msg


def test_older_music_hubert_spelling_loads(tmp_path):
    _, folder = mert_folder(tmp_path / "mert", model_type="music_hubert")
    assert load_pretrained(folder).cfg.sample_rate == 24000


def test_config_and_preprocessor_rates_that_disagree_stop(tmp_path):
    _, folder = mert_folder(tmp_path / "mert", sample_rate=16000)  # the preprocessor still says 24000
    with pytest.raises(ValueError, match="sample_rate 16000.*sampling_rate 24000"):
        load_pretrained(folder)


def test_save_hf_round_trip_at_24k(tmp_path):
    """save_hf of a 24 kHz encoder -> transformers HubertModel -> our loader: the same hidden states (1e-4), the
    rate kept in config.json and preprocessor_config.json."""
    _, folder = mert_folder(tmp_path / "mert")
    enc = load_pretrained(folder)
    save_hf(enc, tmp_path / "ours")
    assert json.load(open(tmp_path / "ours" / "preprocessor_config.json"))["sampling_rate"] == 24000
    hf = transformers.AutoModel.from_pretrained(tmp_path / "ours").eval()
    again = load_pretrained(str(tmp_path / "ours"))
    assert again.cfg.sample_rate == 24000
    wav = music(1.5, 24000, seed=1)
    with torch.no_grad():
        theirs = hf(wav, output_hidden_states=True).hidden_states
        for ours in (enc(wav, normalize=False).hidden_states, again(wav, normalize=False).hidden_states):
            assert max((a - b).abs().max().item() for a, b in zip(ours, theirs)) < 1e-4


def run_probe(tmp_path, task, root, model, name, *extra):
    results = tmp_path / f"{name}.jsonl"
    probe.main(["--task", task, "--model", model, "--data-root", str(root), "--cache-dir", str(tmp_path / name),
                "--results", str(results), "--device", "cpu", "--epochs", "2", "--workers", "0", *extra])
    meta = next((tmp_path / name).glob("**/meta.json"))
    return json.loads(open(results).readline()), pf.FeatureStore(str(meta.parent))


def test_probe_runs_a_mert_folder_at_24k_end_to_end(tmp_path):
    """NSynth's 16 kHz notes are resampled to the model's 24 kHz; the store's key says so, and differs from the one
    the same weights get at 16 kHz."""
    _, folder = mert_folder(tmp_path / "mert")
    _, folder16 = mert_folder(tmp_path / "mert16", sample_rate=16000)
    with open(os.path.join(folder16, "preprocessor_config.json")) as f:
        pre = json.load(f)
    with open(os.path.join(folder16, "preprocessor_config.json"), "w") as f:
        json.dump({**pre, "sampling_rate": 16000}, f)
    write_nsynth(tmp_path / "nsynth", per_split=(8, 4, 4))
    record, store = run_probe(tmp_path, "nsynth_pitch", tmp_path / "nsynth", folder, "c24")
    record16, store16 = run_probe(tmp_path, "nsynth_pitch", tmp_path / "nsynth", folder16, "c16")
    assert store.key["sample_rate"] == 24000 and store16.key["sample_rate"] == 16000
    assert record["extraction"]["sample_rate"] == 24000 and record["clips"] == {"train": 8, "valid": 4, "test": 4}
    assert store.array().shape == store16.array().shape == (16, 3, 32)
    assert not np.array_equal(store.array(), store16.array())
    # --no-normalize: the audio as MERT was trained on it, in a store of its own
    raw, store_raw = run_probe(tmp_path, "nsynth_pitch", tmp_path / "nsynth", folder, "raw", "--no-normalize")
    assert store_raw.key["normalize"] == "none" and store.key["normalize"] == "clip"
    assert not np.array_equal(store_raw.array(), store.array())


def test_beat_frames_of_a_24k_model_sit_at_75hz(tmp_path):
    _, folder = mert_folder(tmp_path / "mert")
    make_beat_folder(tmp_path / "beats", 6, seconds=7.0)
    record, store = run_probe(tmp_path, "beat", tmp_path / "beats", folder, "b24")
    assert record["fps"] == 75.0
    n = 7 * 24000
    assert {rows for _, rows in store.index.values()} == {n // 320 + 1}  # a track of L samples: L // 320 + 1 frames
