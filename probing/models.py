"""The encoders a probe runs: a checkpoint or Hugging Face folder (model.load_pretrained), or a random init of a
named architecture; and the tag that names a model in the feature store's cache key."""
import hashlib
import json
import os
import sys
from dataclasses import asdict

import torch

from model import Encoder, EncoderConfig, load_pretrained

# a small random encoder for tests and smoke runs (extraction in milliseconds on CPU)
TINY = dict(conv_layers=((64, 10, 5),) + ((64, 3, 2),) * 4 + ((64, 2, 2),) * 2, dim=64, layers=2, heads=2, ffn=128,
            pos_conv_kernel=16, pos_conv_groups=4)
MODEL_CONFIGS = {
    "hubert_base": EncoderConfig.hubert_base, "wav2vec2_base": EncoderConfig.wav2vec2_base,
    "data2vec_base": EncoderConfig.data2vec_base, "tiny": lambda: EncoderConfig.hubert_base(**TINY),
}


def model_tag(spec, cfg, seed):
    """Name of a model in the cache key: a new checkpoint (other size or mtime) gets a new feature store."""
    if spec == "random":
        h = hashlib.sha1(json.dumps(asdict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:8]
        return f"random-{cfg.family}-{h}-seed{seed}"  # the family names the row of a report
    path = os.path.abspath(spec)
    files = [path] if os.path.isfile(path) else sorted(os.path.join(path, f) for f in os.listdir(path))
    h = hashlib.sha1()
    for f in files:
        st = os.stat(f)
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    name = os.path.basename(path.rstrip("/")).replace(".", "_") or "model"
    return f"{name}-{h.hexdigest()[:10]}"


MODEL_EXPECTED = ("one of our checkpoints (a .pt with 'encoder_config' and 'encoder'), a fairseq HuBERT / wav2vec "
                  "2.0 / data2vec-audio .pt, a Hugging Face hubert / "
                  "wav2vec2 / data2vec-audio folder (config.json + model.safetensors or pytorch_model.bin), or "
                  "'random'")


def load_model(spec, random_cfg, seed):
    """(encoder in eval mode, cache tag). spec: "random" (random init from random_cfg under `seed`) or anything
    model.load_pretrained accepts. Whatever is wrong with a file or folder ends the run with one line."""
    if spec == "random":
        torch.manual_seed(seed)
        return Encoder(random_cfg).eval(), model_tag(spec, random_cfg, seed)
    if not os.path.exists(spec):
        sys.exit(f"--model {spec}: no such file or folder; expected {MODEL_EXPECTED}")
    for name in ("config.json", "preprocessor_config.json") if os.path.isdir(spec) else ():
        try:
            if os.path.exists(os.path.join(spec, name)):
                with open(os.path.join(spec, name)) as f:
                    json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            sys.exit(f"--model {spec}: {os.path.join(spec, name)} is not valid JSON ({e})")
    try:
        enc = load_pretrained(spec)
    except Exception as e:  # torch.load's unpickling/zip errors, unsupported configs, mismatched weights
        msg = " ".join(str(e).split()) or type(e).__name__
        if not (isinstance(e, (ValueError, FileNotFoundError)) and msg.startswith(spec.rstrip("/"))):
            msg = f"{type(e).__name__}: {msg}; expected {MODEL_EXPECTED}"  # not one of load_pretrained's own lines
        sys.exit(f"--model {spec}: " + (msg if len(msg) < 800 else msg[:800] + " ..."))
    return enc, model_tag(spec, enc.cfg, seed)
