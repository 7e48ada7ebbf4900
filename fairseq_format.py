"""fairseq checkpoints (`.pt`) of HuBERT, wav2vec 2.0 and data2vec-audio, read without fairseq or omegaconf.

A fairseq checkpoint is a pickled dict written by its trainer: since fairseq 0.10
`{"cfg": {"model": {...}, "task": {...}, ...}, "model": state_dict, ...}` (cfg a plain dict from
OmegaConf.to_container), before it `{"args": argparse.Namespace(...), "model": ...}` with the same field names
flattened (spec mert_fairseq.md §1). This module turns one into plain data for model.py: the EncoderConfig fields,
the encoder's weights under our names, and the pre-training heads (HuBERT's final_proj and label embeddings, wav2vec
2.0's quantiser and projections) under their fairseq names. It imports nothing of ours (model.py imports it).

The file is unpickled with torch.load(weights_only=False) — a pickle can run code, so load only files you trust —
through an unpickler that stands in for classes whose packages are not installed (fairseq's, omegaconf's): a
DictConfig/ListConfig becomes a plain dict/list; any other stand-in that ends up in the parts we read is refused in
one line naming the class.
"""
import argparse
import ast
import pickle

import torch

FAMILIES = {"hubert": "hubert", "wav2vec2": "wav2vec2", "data2vec_audio": "data2vec-audio"}
FINE_TUNED = ("wav2vec_ctc", "wav2vec_seq2seq", "hubert_ctc", "hubert_seq2seq", "data2vec_audio_ctc")

# fairseq model fields we do not implement: (field, the value that behaves as ours, what to say)
REFUSED = (
    ("conv_pos_batch_norm", False, "a BatchNorm in the positional conv"),
    ("pos_enc_type", "abs", "relative / rotary positions"),
    ("layer_type", "transformer", "conformer layers"),
    ("activation_fn", "gelu", "an activation other than GELU"),
    ("deepnorm", False, "DeepNorm residual scaling"),
    ("feature_extractor_cqt", False, "CQT features concatenated to the conv front end"),
    ("untie_final_proj", False, None),  # only the head: it is skipped anyway, so allowed (see heads())
)

# pre-training heads: loaded by heads(), never part of the encoder
HEAD_PREFIXES = ("final_proj.", "label_embs_concat", "quantizer.", "project_q.", "project_inp.", "target_glu.",
                 "_ema", "ema.", "label_embs.")


class FairseqFormatError(ValueError):
    """A fairseq checkpoint we cannot read; the message is one line naming the file."""


# --- unpickling without fairseq / omegaconf -------------------------------------------------------------------------

class _StandIn:
    """An object of a class whose module is not importable here: keeps what the pickle gave it."""
    _module = _name = ""

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    @classmethod
    def qualname(cls):
        return f"{cls._module}.{cls._name}"


_STAND_INS = {}
_IMPORTABLE = ("builtins", "collections", "argparse", "torch", "numpy", "_codecs", "copyreg", "enum", "typing",
               "pathlib", "datetime")


def _stand_in(module, name):
    key = (module, name)
    if key not in _STAND_INS:
        _STAND_INS[key] = type(name, (_StandIn,), {"_module": module, "_name": name})
    return _STAND_INS[key]


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if module.split(".")[0] in _IMPORTABLE:
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                pass
        return _stand_in(module, name)


class _PickleModule:  # what torch.load's pickle_module needs
    Unpickler = _Unpickler
    load = staticmethod(lambda f, **kw: _Unpickler(f, **kw).load())
    __name__ = "fairseq_format._PickleModule"


def _plain(obj, path, where):
    """obj with omegaconf containers as dicts/lists; another stand-in is a refusal naming its class."""
    if isinstance(obj, _StandIn):
        name = obj.qualname()
        state = obj.state if isinstance(obj.state, dict) else {}
        if name.startswith("omegaconf.") and name.endswith(("DictConfig", "ListConfig")):
            content = state.get("_content")
            if isinstance(content, dict):
                return {k: _plain(v, path, f"{where}.{k}") for k, v in content.items()}
            if isinstance(content, (list, tuple)):
                return [_plain(v, path, f"{where}[{i}]") for i, v in enumerate(content)]
            return None  # a None / missing ("???") container
        if name.startswith("omegaconf.") and name.endswith("Node"):
            return _plain(state.get("_val"), path, where)
        if obj.args and all(isinstance(a, (str, int, float, bool)) for a in obj.args) and len(obj.args) == 1:
            return obj.args[0]  # an Enum value (fairseq's ChoiceEnum fields): its value
        raise FairseqFormatError(f"{path}: {where} is a pickled {name}, which cannot be read without that package "
                                 f"(only plain values, argparse.Namespace and omegaconf containers are mapped)")
    if isinstance(obj, argparse.Namespace):
        return {k: _plain(v, path, f"{where}.{k}") for k, v in vars(obj).items()}
    if isinstance(obj, dict):
        return {k: _plain(v, path, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v, path, f"{where}[{i}]") for i, v in enumerate(obj))
    return obj


def is_fairseq(ckpt):
    return isinstance(ckpt, dict) and "model" in ckpt and ("cfg" in ckpt or "args" in ckpt) \
        and "encoder_config" not in ckpt


def load_file(path):
    """The checkpoint dict of a `.pt` file, unpickled with stand-ins for classes that are not installed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_PickleModule)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as e:
        raise FairseqFormatError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e}); expected one of "
                                 f"our checkpoints, a fairseq checkpoint or a Hugging Face folder") from None


# --- config -----------------------------------------------------------------------------------------------------

def _fields(ckpt, path):
    """(model fields, task fields, model name) of either format."""
    cfg = ckpt.get("cfg")
    if cfg is not None:
        cfg = _plain(cfg, path, "cfg")
        model, task = cfg.get("model") or {}, cfg.get("task") or {}
        name = model.get("_name")
    else:
        args = _plain(ckpt.get("args"), path, "args")
        if not isinstance(args, dict):
            raise FairseqFormatError(f"{path}: 'args' is {type(ckpt.get('args')).__name__}, expected an "
                                     f"argparse.Namespace of the model's fields")
        model, task, name = args, args, args.get("arch") or args.get("_name")
    return model, task, name


def _conv_layers(spec, path):
    """fairseq's conv_feature_layers string, e.g. "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2", evaluated
    as the list arithmetic it is (literals, + and * only; never eval)."""
    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [value(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            a, b = value(node.left), value(node.right)
            return a + b if isinstance(node.op, ast.Add) else a * b
        raise ValueError(ast.dump(node))
    try:
        layers = value(ast.parse(spec, mode="eval").body) if isinstance(spec, str) else spec
        layers = tuple(tuple(int(v) for v in layer) for layer in layers)
        if not layers or any(len(layer) != 3 for layer in layers):
            raise ValueError("not (channels, kernel, stride) triples")
    except (SyntaxError, ValueError, TypeError) as e:
        raise FairseqFormatError(f"{path}: conv_feature_layers {spec!r} is not a list of (dim, kernel, stride) "
                                 f"({e})") from None
    return layers


def encoder_config(ckpt, path):
    """(EncoderConfig fields, family, task fields) from a fairseq checkpoint's model and task fields."""
    model, task, name = _fields(ckpt, path)
    if name in FINE_TUNED or "w2v_path" in model or "w2v_args" in model:
        raise FairseqFormatError(f"{path}: a fine-tuned fairseq model ({name}); load the pre-trained checkpoint it "
                                 f"was fine-tuned from (its w2v_path)")
    family = FAMILIES.get(name)
    if family is None:
        raise FairseqFormatError(f"{path}: fairseq model {name!r} is not supported (expected one of "
                                 f"{', '.join(FAMILIES)})")
    for field, ours, what in REFUSED:
        if what and field in model and model[field] is not None and model[field] != ours:
            raise FairseqFormatError(f"{path}: {field}={model[field]!r} ({what}) is not supported; only "
                                     f"{field}={ours!r}")
    rate = task.get("sample_rate", 16000)
    if not isinstance(rate, int) or rate <= 0:
        raise FairseqFormatError(f"{path}: task.sample_rate {rate!r} is not a rate in Hz")
    mode = model.get("extractor_mode", "default")
    if mode not in ("default", "layer_norm"):
        raise FairseqFormatError(f"{path}: extractor_mode {mode!r} is not supported (default | layer_norm)")
    d2v = family == "data2vec-audio"
    depth = int(model.get("pos_conv_depth", 1) or 1) if d2v else 1
    conv_pos = int(model.get("conv_pos", 128))
    get = lambda key, default: default if model.get(key) is None else model[key]  # noqa: E731
    fields = dict(
        family=family, conv_layers=_conv_layers(get("conv_feature_layers", "[(512, 10, 5)] + [(512, 3, 2)] * 4 + "
                                                                           "[(512,2,2)] * 2"), path),
        conv_bias=bool(get("conv_bias", False)), extractor_mode="layer" if mode == "layer_norm" else "group",
        normalize_waveform=bool(task.get("normalize", False)), feature_grad_mult=float(get("feature_grad_mult", 1.0)),
        dim=int(get("encoder_embed_dim", 768)), layers=int(get("encoder_layers", 12)),
        heads=int(get("encoder_attention_heads", 12)), ffn=int(get("encoder_ffn_embed_dim", 3072)),
        layer_norm_first=bool(get("layer_norm_first", False)),
        # data2vec: pos_conv_depth convs of kernel max(3, conv_pos // depth) (data2vec_audio.py)
        pos_conv_kernel=max(3, conv_pos // depth) if d2v and depth > 1 else conv_pos, pos_conv_depth=depth,
        pos_conv_groups=int(get("conv_pos_groups", 16)), dropout=float(get("dropout", 0.1)),
        attention_dropout=float(get("attention_dropout", 0.1)),
        activation_dropout=float(get("activation_dropout", 0.0)), dropout_input=float(get("dropout_input", 0.0)),
        dropout_features=float(get("dropout_features", 0.0)), layerdrop=float(get("encoder_layerdrop", 0.0)),
        sample_rate=rate)
    return fields, family, task


# --- weights ----------------------------------------------------------------------------------------------------

_RULES = (  # fairseq name -> ours (spec mert_fairseq.md §1)
    (r"^feature_extractor\.conv_layers\.(\d+)\.0\.(weight|bias)$", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.2\.1\.(weight|bias)$", r"feature_extractor.conv_layers.\1.norm.\2"),
    (r"^feature_extractor\.conv_layers\.(\d+)\.2\.(weight|bias)$", r"feature_extractor.conv_layers.\1.norm.\2"),
    (r"^layer_norm\.(weight|bias)$", r"feature_norm.\1"),
    (r"^post_extract_proj\.(weight|bias)$", r"feature_proj.\1"),
    (r"^mask_emb$", "mask_emb"),
    (r"^encoder\.pos_conv\.0\.(weight_g|weight_v|bias)$", r"transformer.pos_conv.0.\1"),
    (r"^encoder\.pos_conv\.0\.parametrizations\.weight\.original0$", "transformer.pos_conv.0.weight_g"),
    (r"^encoder\.pos_conv\.0\.parametrizations\.weight\.original1$", "transformer.pos_conv.0.weight_v"),
    (r"^encoder\.pos_conv\.(\d+)\.0\.(weight|bias)$", r"transformer.pos_conv.\1.\2"),  # data2vec's stack
    (r"^encoder\.layer_norm\.(weight|bias)$", r"transformer.layer_norm.\1"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.(weight|bias)$", r"transformer.layers.\1.attn.\2_proj.\3"),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", r"transformer.layers.\1.attn_norm.\2"),
    (r"^encoder\.layers\.(\d+)\.(fc1|fc2)\.(weight|bias)$", r"transformer.layers.\1.\2.\3"),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$", r"transformer.layers.\1.final_norm.\2"),
)


def encoder_weights(ckpt, path):
    """(state under our names, fairseq names skipped as pre-training heads, fairseq names that map to nothing)."""
    import re
    state, heads, unknown = {}, [], []
    for name, tensor in ckpt["model"].items():
        if name.startswith(HEAD_PREFIXES):
            heads.append(name)
            continue
        if not torch.is_tensor(tensor):
            unknown.append(name)
            continue
        for pattern, repl in _RULES:
            ours, n = re.subn(pattern, repl, name)
            if n:
                state[ours] = tensor.float()
                break
        else:
            unknown.append(name)
    return state, sorted(heads), sorted(unknown)


def head_weights(ckpt):
    """The pre-training heads' tensors under their fairseq names (final_proj.*, label_embs_concat, quantizer.*,
    project_q.*), fp32; data2vec's EMA teacher (_ema) is left out."""
    return {k: v.float() for k, v in ckpt["model"].items()
            if k.startswith(HEAD_PREFIXES) and not k.startswith(("_ema", "ema.")) and torch.is_tensor(v)}


def quantizer_fields(ckpt, path):
    """wav2vec 2.0's quantiser sizes: (groups, codewords) from latent_groups / latent_vars."""
    model, _, _ = _fields(ckpt, path)
    return int(model.get("latent_groups", 2)), int(model.get("latent_vars", 320))
