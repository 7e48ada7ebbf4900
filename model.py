"""The encoder shared by MusicHuBERT, Music2Vec, wav2vec 2.0 and the probe.

One hand-written network: a 7-layer conv front end (16 kHz -> 50 Hz), a feature projection, a convolutional
positional embedding and a transformer. `EncoderConfig` covers the three base recipes (spec pretrain.md §0-1):
  - HuBERT / wav2vec 2.0: GroupNorm in conv 0 only, one k=128 weight-normed positional conv, raw waveform;
  - data2vec 1.0 / Music2Vec: LayerNorm in every conv, five k=19 positional convs with parameter-free LayerNorm,
    per-clip waveform normalisation.
It loads and writes Hugging Face model folders (`load_pretrained`, `save_hf`) and gives the same hidden states as
`transformers` (tests/test_model.py). Objectives (heads, losses, EMA teachers) live in the pretrain scripts; the one
exception is wav2vec 2.0's quantiser (`GumbelQuantizer`, `load_quantizer`, `codeword_indices`), whose codes are read
by analysis code without the training script.
"""
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import fairseq_format
from triton_ops.attention import attention

BASE_CONV_LAYERS = ((512, 10, 5),) + ((512, 3, 2),) * 4 + ((512, 2, 2),) * 2


@dataclass
class EncoderConfig:
    family: str = "hubert"  # hubert | wav2vec2 | data2vec-audio: the HF model_type save_hf writes
    conv_layers: tuple = BASE_CONV_LAYERS  # (channels, kernel, stride) per conv; no padding (fairseq conv_feature_layers)
    conv_bias: bool = False
    extractor_mode: str = "group"  # "group": GroupNorm in conv 0 only (HuBERT, w2v2); "layer": LayerNorm in every conv
    normalize_waveform: bool = False  # data2vec: zero-mean unit-variance per clip before the convs
    feature_grad_mult: float = 0.1  # scales the gradient into the conv front end (fairseq GradMultiply); 0 = frozen
    feature_proj_layer_norm: bool = True  # LayerNorm(512) before the projection (HF hubert's feat_proj_layer_norm)
    dim: int = 768
    layers: int = 12
    heads: int = 12
    ffn: int = 3072
    layer_norm_first: bool = False  # pre-LN ("stable layer norm") variant of the large checkpoints
    pos_conv_kernel: int = 128
    pos_conv_depth: int = 1  # 1: one weight-normed conv (HuBERT/w2v2); >1: plain convs + LayerNorm each (data2vec)
    pos_conv_groups: int = 16
    dropout: float = 0.1  # residual and post-positional-conv dropout
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    dropout_input: float = 0.1  # on the projected features, before masking
    dropout_features: float = 0.1  # on the wav2vec 2.0 quantizer's input (pretrain_wav2vec2.py; not in Encoder)
    layerdrop: float = 0.05
    layer_norm_eps: float = 1e-5
    # True: padded batches give exactly the hidden states of each clip alone (GroupNorm statistics over valid frames,
    # padded frames zeroed before every positional conv). False: transformers' batch behaviour, which lets padding
    # leak into GroupNorm statistics and into data2vec's stacked positional convs.
    padding_exact: bool = True
    # the rate the encoder's input is sampled at; every consumer (probe, analyze, fine-tuning, the pre-training data)
    # resamples to it. The conv stack's stride (320) makes it 50 Hz frames at 16 kHz, 75 Hz at 24 kHz (MERT-v1)
    sample_rate: int = 16000

    @classmethod
    def hubert_base(cls, **overrides):
        return cls(**overrides)

    @classmethod
    def wav2vec2_base(cls, **overrides):
        return cls(**{"family": "wav2vec2", **overrides})

    @classmethod
    def data2vec_base(cls, **overrides):
        base = dict(family="data2vec-audio", extractor_mode="layer", normalize_waveform=True, feature_grad_mult=1.0,
                    pos_conv_kernel=19, pos_conv_depth=5, dropout_input=0.0, dropout_features=0.0)
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"EncoderConfig: unknown fields {unknown}")
        d = dict(d)
        if "conv_layers" in d:
            d["conv_layers"] = tuple(tuple(int(v) for v in layer) for layer in d["conv_layers"])
        return cls(**d)

    def __post_init__(self):
        if self.extractor_mode not in ("group", "layer"):
            raise ValueError(f"extractor_mode must be 'group' or 'layer', got {self.extractor_mode!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if not (isinstance(self.sample_rate, int) and self.sample_rate > 0):
            raise ValueError(f"sample_rate must be a positive integer (Hz), got {self.sample_rate!r}")

    @property
    def frame_rate(self):
        """Encoder frames per second: the sample rate over the conv stack's total stride."""
        return self.sample_rate / receptive_field(self.conv_layers)[1]


@dataclass
class EncoderOutput:
    hidden_states: List[torch.Tensor]  # layers+1 tensors B x T x dim: transformer input, then each layer's output
    padding_mask: Optional[torch.Tensor]  # B x T, True = padded frame; None when no lengths were given
    frame_lengths: torch.Tensor  # B valid frames per clip
    conv_features: torch.Tensor  # B x T x C raw conv front-end output (feature penalty, w2v2 quantizer)
    ffn: Optional[List[torch.Tensor]] = None  # per layer, the FFN output before the residual (data2vec targets)
    last_hidden_state: Optional[torch.Tensor] = None  # pre-LN: the final LayerNorm of the last layer; post-LN: it


class GradMultiply(torch.autograd.Function):
    """Identity forward, gradient scaled by `scale` (fairseq: the conv front end learns 10x slower in HuBERT)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def conv_out_lengths(lengths, conv_layers):
    """Valid output length after unpadded convs: L <- floor((L - k) / s) + 1 per layer (works on ints and tensors)."""
    for _, k, s in conv_layers:
        lengths = (lengths - k) // s + 1
    return lengths


def masked_group_norm(x, valid, weight, bias, eps):
    """GroupNorm with one group per channel, statistics over the valid time steps only. x: B x C x L, valid: B x L."""
    m = valid[:, None, :].to(x.dtype)
    n = m.sum(-1, keepdim=True).clamp_min(1)
    mean = (x * m).sum(-1, keepdim=True) / n
    var = (((x - mean) * m) ** 2).sum(-1, keepdim=True) / n
    return (x - mean) * torch.rsqrt(var + eps) * weight[None, :, None] + bias[None, :, None]


class ConvLayer(nn.Module):
    def __init__(self, c_in, c_out, kernel, stride, bias, norm):
        super().__init__()
        self.kernel, self.stride = kernel, stride
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride=stride, bias=bias)
        nn.init.kaiming_normal_(self.conv.weight)
        # "group" = fairseq's Fp32GroupNorm(C, C): each channel normalised over time; "layer": over channels per frame
        self.norm_kind = norm
        self.norm = nn.GroupNorm(c_out, c_out) if norm == "group" else nn.LayerNorm(c_out) if norm == "layer" else None


def receptive_field(conv_layers):
    """(receptive field, stride) in samples of a stack of unpadded convs' output frames: 400 and 320 for fairseq's
    conv_feature_layers (every model here), so frame j sees samples [320 j, 320 j + 400) of its input."""
    field, stride = 1, 1
    for _, kernel, s in conv_layers:
        field += (kernel - 1) * stride
        stride *= s
    return field, stride


class FeatureExtractor(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        layers, c_in = [], 1
        for i, (c, k, s) in enumerate(cfg.conv_layers):
            norm = "layer" if cfg.extractor_mode == "layer" else ("group" if i == 0 else None)
            layers.append(ConvLayer(c_in, c, k, s, cfg.conv_bias, norm))
            c_in = c
        self.conv_layers = nn.ModuleList(layers)

    def forward(self, wav, lengths=None, exact=True):
        x = wav[:, None, :]
        for layer in self.conv_layers:
            x = layer.conv(x)
            if lengths is not None:
                lengths = (lengths - layer.kernel) // layer.stride + 1
            if layer.norm_kind == "group":  # computed in fp32 as fairseq's Fp32GroupNorm
                n = layer.norm
                if exact and lengths is not None:
                    valid = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]
                    y = masked_group_norm(x.float(), valid, n.weight.float(), n.bias.float(), n.eps)
                else:
                    y = F.group_norm(x.float(), n.num_groups, n.weight.float(), n.bias.float(), n.eps)
                x = y.type_as(x)
            elif layer.norm_kind == "layer":
                n = layer.norm
                x = F.layer_norm(x.transpose(1, 2).float(), n.normalized_shape, n.weight.float(), n.bias.float(),
                                 n.eps).transpose(1, 2).type_as(x)
            x = F.gelu(x)
        return x  # B x C x T


class PosConvLayer(nn.Module):
    """One positional conv. weight_norm=True: HuBERT/w2v2's single weight-normed conv (one gain per kernel tap,
    W = g * v / ||v|| with the norm over output and input channels, torch weight_norm dim=2)."""

    def __init__(self, dim, kernel, groups, weight_norm):
        super().__init__()
        self.kernel, self.groups, self.weight_norm = kernel, groups, weight_norm
        shape = (dim, dim // groups, kernel)
        if weight_norm:
            v = torch.randn(shape) * math.sqrt(4.0 / (kernel * dim))  # fairseq make_conv_pos init
            self.weight_v = nn.Parameter(v)
            self.weight_g = nn.Parameter(v.norm(dim=(0, 1), keepdim=True))
        else:
            conv = nn.Conv1d(dim, dim, kernel, groups=groups)  # data2vec keeps PyTorch's default init
            self.weight = nn.Parameter(conv.weight.detach().clone())
        self.bias = nn.Parameter(torch.zeros(dim))
        if not weight_norm:
            self.bias.data.copy_(conv.bias.detach())

    def forward(self, x):  # B x C x T
        # v * (g / ||v||): autograd then keeps only the K gains, not a second full-size weight
        w = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(0, 1), keepdim=True)) if self.weight_norm \
            else self.weight
        y = F.conv1d(x, w, self.bias, padding=self.kernel // 2, groups=self.groups)
        if self.kernel % 2 == 0:  # SamePad: an even kernel with padding k/2 gives T+1 outputs
            y = y[:, :, :-1]
        if not self.weight_norm:  # data2vec: parameter-free LayerNorm over channels after each conv
            y = F.layer_norm(y.transpose(1, 2), (y.shape[1],)).transpose(1, 2)
        return F.gelu(y)


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.attention_dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.dim, cfg.dim) for _ in range(4))

    def forward(self, x, lengths):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = attention(q, k, v, lengths, self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class TransformerLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm_first = cfg.layer_norm_first
        self.dropout, self.activation_dropout = cfg.dropout, cfg.activation_dropout
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.dim, cfg.ffn)
        self.fc2 = nn.Linear(cfg.ffn, cfg.dim)
        self.final_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)

    def feed_forward(self, x):
        return self.fc2(F.dropout(F.gelu(self.fc1(x)), self.activation_dropout, self.training))

    def forward(self, x, lengths):
        drop = lambda t: F.dropout(t, self.dropout, self.training)
        if self.layer_norm_first:
            x = x + drop(self.attn(self.attn_norm(x), lengths))
            f = self.feed_forward(self.final_norm(x))
            return x + drop(f), f
        x = self.attn_norm(x + drop(self.attn(x, lengths)))
        f = self.feed_forward(x)  # data2vec's target: the FFN output before dropout, residual and final LayerNorm
        return self.final_norm(x + drop(f)), f


class Transformer(nn.Module):
    """Positional conv + encoder LayerNorm + layers: the part data2vec's EMA teacher copies."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.pos_conv = nn.ModuleList(PosConvLayer(cfg.dim, cfg.pos_conv_kernel, cfg.pos_conv_groups,
                                                   cfg.pos_conv_depth == 1)
                                      for _ in range(cfg.pos_conv_depth))
        self.layer_norm = nn.LayerNorm(cfg.dim, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList(TransformerLayer(cfg) for _ in range(cfg.layers))
        # LayerDrop draws come from their own generator: seeded alike on every rank, all ranks skip the same layers
        self.layerdrop_rng = torch.Generator().manual_seed(0)
        for module in self.layers.modules():  # fairseq init_bert_params
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def positional(self, x, padding_mask):
        y = x.transpose(1, 2)
        keep = None if padding_mask is None else (~padding_mask)[:, None, :].to(y.dtype)
        for i, conv in enumerate(self.pos_conv):
            if keep is not None and (i == 0 or self.cfg.padding_exact):  # zero padding, as if the clip were alone
                y = y * keep
            y = conv(y)
        return y.transpose(1, 2)

    def forward(self, x, padding_mask=None, ffn_outputs=False):
        cfg = self.cfg
        lengths = None
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
            lengths = (~padding_mask).sum(1)
        x = x + self.positional(x, padding_mask)
        if not cfg.layer_norm_first:
            x = self.layer_norm(x)
        x = F.dropout(x, cfg.dropout, self.training)
        hidden, ffn = [x], []
        skip = (torch.rand(len(self.layers), generator=self.layerdrop_rng) < cfg.layerdrop).tolist() \
            if self.training and cfg.layerdrop > 0 else [False] * len(self.layers)
        for layer, skipped in zip(self.layers, skip):
            if skipped:
                f = None
            else:
                x, f = layer(x, lengths)
            hidden.append(x)
            ffn.append(f)
        return hidden, (ffn if ffn_outputs else None)

    def output(self, top):
        """The encoder's output from the last layer's: pre-LN adds its final LayerNorm (fairseq TransformerEncoder
        with no layer cut; what the objectives' heads read), post-LN has none after the layers."""
        return self.layer_norm(top) if self.cfg.layer_norm_first else top


def normalize_waveform(wav, lengths=None, eps=1e-5):
    """Zero mean, unit variance per clip (data2vec's F.layer_norm(wav, wav.shape)), over its valid samples only;
    padded samples come out 0."""
    if lengths is None:
        return F.layer_norm(wav.float(), wav.shape[-1:], eps=eps).type_as(wav)
    valid = torch.arange(wav.shape[1], device=wav.device)[None, :] < lengths.to(wav.device)[:, None]
    m = valid.to(torch.float32)
    n = lengths.to(wav.device)[:, None].to(torch.float32).clamp_min(1)
    mean = (wav.float() * m).sum(1, keepdim=True) / n
    var = (((wav.float() - mean) * m) ** 2).sum(1, keepdim=True) / n
    return (((wav.float() - mean) * torch.rsqrt(var + eps)) * m).type_as(wav)


class Encoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.conv_layers[-1][0]
        self.feature_extractor = FeatureExtractor(cfg)
        self.feature_norm = nn.LayerNorm(c, eps=cfg.layer_norm_eps) if cfg.feature_proj_layer_norm else None
        self.feature_proj = nn.Linear(c, cfg.dim)
        self.mask_emb = nn.Parameter(torch.rand(cfg.dim))  # fairseq: uniform_() init
        self.transformer = Transformer(cfg)

    def num_frames(self, num_samples):
        return conv_out_lengths(num_samples, self.cfg.conv_layers)

    def embed(self, wav, lengths=None, normalize=None):
        """Waveform -> projected features (B x T x dim, before dropout and masking), padding mask, conv features.
        normalize: None follows cfg.normalize_waveform; False for callers that normalised with other statistics
        (the probe: once per whole clip before windowing; pre-training: whole-file statistics, as fairseq)."""
        cfg = self.cfg
        if lengths is not None:
            lengths = lengths.to(wav.device)
        if cfg.normalize_waveform if normalize is None else normalize:
            wav = normalize_waveform(wav, lengths)
        if cfg.feature_grad_mult > 0:
            conv = self.feature_extractor(wav, lengths, cfg.padding_exact)
            if cfg.feature_grad_mult != 1.0 and torch.is_grad_enabled():
                conv = GradMultiply.apply(conv, cfg.feature_grad_mult)
        else:
            with torch.no_grad():
                conv = self.feature_extractor(wav, lengths, cfg.padding_exact)
        conv = conv.transpose(1, 2)  # B x T x C
        padding_mask = None
        if lengths is not None:
            frames = self.num_frames(lengths)
            padding_mask = torch.arange(conv.shape[1], device=conv.device)[None, :] >= frames[:, None]
        x = self.feature_norm(conv) if self.feature_norm is not None else conv
        return self.feature_proj(x), padding_mask, conv

    def forward(self, wav, lengths=None, mask=None, ffn_outputs=False, normalize=None):
        """wav: B x N at 16 kHz; lengths: B valid samples (None = all valid); mask: B x T bool frames to replace by
        the learned mask embedding (after input dropout, before the positional conv, as fairseq); normalize: see
        embed."""
        x, padding_mask, conv = self.embed(wav, lengths, normalize)
        x = F.dropout(x, self.cfg.dropout_input, self.training)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)
        hidden, ffn = self.transformer(x, padding_mask, ffn_outputs)
        B, T = x.shape[:2]
        frames = (~padding_mask).sum(1) if padding_mask is not None else torch.full((B,), T, device=x.device)
        # pre-LN keeps the final LayerNorm out of hidden_states, as transformers >= 5 does (4.x put it in the last one)
        last = self.transformer.output(hidden[-1])
        return EncoderOutput(hidden, padding_mask, frames, conv, ffn, last)


# ------------------------------------------------------------------------------------------------------------------
# wav2vec 2.0's product quantiser: trained by pretrain_wav2vec2.py, its codes read by analysis code.

class GumbelQuantizer(nn.Module):
    """wav2vec 2.0's Gumbel-softmax product quantiser (fairseq GumbelVectorQuantizer with combine_groups=False and a
    one-layer weight_proj; spec pretrain.md §6). `groups` codebooks of `codewords` entries, each dim/groups wide: a
    frame picks one entry per group and their concatenation is its quantised vector (base: 2 x 320 entries of 128
    dims, 102,400 possible codes). The input is the encoder's LayerNorm'ed conv features, i.e.
    `encoder.feature_norm(out.conv_features)` (fairseq `unmasked_features`).

    forward(x) in training mode: hard Gumbel-softmax at `temperature` with the straight-through gradient (the
    forward value is the chosen codewords, up to float rounding; the gradient is that of the soft sample). In eval
    mode: the argmax codeword per group. Returns (quantized ... x dim, codes ... x groups (long), logits ... x
    groups x codewords (fp32)). `codevectors` is groups x codewords x dim/groups (fairseq `vars` and HF
    `quantizer.codevectors` hold the same numbers as 1 x groups*codewords x dim/groups)."""

    def __init__(self, in_dim=512, groups=2, codewords=320, dim=256):
        super().__init__()
        if dim % groups:
            raise ValueError(f"quantizer dim {dim} is not divisible by groups {groups}")
        self.in_dim, self.groups, self.codewords, self.dim = in_dim, groups, codewords, dim
        self.weight_proj = nn.Linear(in_dim, groups * codewords)
        nn.init.normal_(self.weight_proj.weight, mean=0.0, std=1.0)  # fairseq: N(0, 1), bias 0
        nn.init.zeros_(self.weight_proj.bias)
        self.codevectors = nn.Parameter(torch.rand(groups, codewords, dim // groups))  # fairseq `vars`: uniform_

    def config(self):
        return {"in_dim": self.in_dim, "groups": self.groups, "codewords": self.codewords, "dim": self.dim}

    def logits(self, x):
        """... x in_dim -> ... x groups x codewords, in fp32 even under autocast (bf16 logits of std ~20 would
        flip codes)."""
        with torch.autocast(x.device.type, enabled=False):
            return self.weight_proj(x.float()).unflatten(-1, (self.groups, self.codewords))

    @torch.no_grad()
    def codes(self, x):
        """The argmax codeword of every group: ... x in_dim -> ... x groups (long)."""
        return self.logits(x).argmax(-1)

    def lookup(self, codes):
        """Quantised vectors of given codes: ... x groups (long) -> ... x dim."""
        return torch.stack([self.codevectors[g][codes[..., g]] for g in range(self.groups)], -2).flatten(-2)

    def forward(self, x, temperature=2.0, generator=None):
        logits = self.logits(x)
        if self.training:
            # F.gumbel_softmax(hard=True), with the noise drawn from `generator`
            gumbel = -torch.empty_like(logits).exponential_(generator=generator).log()
            soft = ((logits + gumbel) / temperature).softmax(-1)
            codes = soft.argmax(-1)
            onehot = F.one_hot(codes, self.codewords).to(soft.dtype) - soft.detach() + soft  # straight-through
        else:
            codes = logits.argmax(-1)
            onehot = F.one_hot(codes, self.codewords).to(logits.dtype)
        # one matmul per group instead of fairseq's (frames x 640 x 128) broadcast product: same value and gradient
        quantized = torch.einsum("...gv,gvd->...gd", onehot, self.codevectors.to(onehot.dtype)).flatten(-2)
        return quantized, codes, logits

    @staticmethod
    def perplexities(logits):
        """(code perplexity, prob perplexity) of a batch of frames (logits: ... x groups x codewords), summed over
        groups as fairseq: exp(entropy) of the batch's argmax-code histogram, and of its averaged softmax (the
        differentiable one, in the diversity loss). Both lie in [groups, groups x codewords]. fairseq's
        log(p + 1e-7) keeps the gradient finite where an average probability underflows to 0."""
        logits = logits.reshape(-1, *logits.shape[-2:]).float()
        with torch.no_grad():
            hard = F.one_hot(logits.argmax(-1), logits.shape[-1]).float().mean(0)
            code_ppl = torch.exp(-(hard * torch.log(hard + 1e-7)).sum(-1)).sum()
        avg = logits.softmax(-1).mean(0)
        prob_ppl = torch.exp(-(avg * torch.log(avg + 1e-7)).sum(-1)).sum()
        return code_ppl, prob_ppl


def codeword_indices(encoder, quantizer, wav, lengths=None):
    """The quantiser's codes of every frame of a batch: B x T x groups (long) and the padding mask (None without
    lengths). Runs only the conv front end (the quantiser's input does not depend on the transformer)."""
    with torch.no_grad():
        _, padding_mask, conv = encoder.embed(wav, lengths)
        features = encoder.feature_norm(conv) if encoder.feature_norm is not None else conv
        return quantizer.codes(features), padding_mask


# ------------------------------------------------------------------------------------------------------------------
# Span masking (fairseq data_utils.compute_mask_indices, mask_type static, no_overlap False), vectorised in torch.

def _distinct_uniform(n, k, rand, scratch, allowed=None, allowed_count=None):
    """Per row b, k[b] distinct integers drawn uniformly from [0, n[b]) (a uniform random k-subset, as numpy's
    choice without replacement) or, given the B x W bool table `allowed` (W > max n; row sums `allowed_count`),
    from the allowed ones among them. Each row draws with replacement and keeps the first k[b] distinct allowed
    values in draw order: sequential sampling without replacement, so by symmetry every k-subset is equally likely.
    Every row draws M = max over rows of 1.25 k n / (allowed count) + 16 values (about k per row instead of n); if a
    row still falls short, all draw twice as many. `scratch`: an int32 buffer of at least B x W elements (B x (max
    n + 1) without `allowed`), overwritten. Returns (values, keep), both B x M: the subsets are values[keep]."""
    B, device = k.shape[0], k.device
    c = allowed_count if allowed is not None else n
    M = int((k * n / c.clamp_min(1)).max()) * 5 // 4 + 16
    width = allowed.shape[1] if allowed is not None else int(n.max()) + 1
    offset = torch.arange(0, B * width, width, device=device)[:, None]
    value = (rand(B, M) * n[:, None]).long()
    while True:
        slot = torch.arange(value.shape[1], device=device, dtype=torch.int32).expand_as(value)
        # a slot is new if it is its value's first slot (amin over slots: deterministic on GPUs too)
        owner = scratch[:B * width].fill_(value.shape[1])
        owner.scatter_reduce_(0, (value + offset).view(-1), slot.reshape(-1), "amin")
        first = owner.view(B, width).gather(1, value) == slot
        if allowed is not None:
            first &= allowed.gather(1, value)
        seen = first.cumsum(1)  # distinct allowed values among the row's slots so far
        if bool((seen[:, -1] >= k).all()):
            return value, first & (seen <= k[:, None])
        value = torch.cat([value, (rand(B, value.shape[1]) * n[:, None]).long()], 1)  # rare: draw twice as many


def span_mask(shape, mask_prob, mask_length, min_masks=2, lengths=None, same_count=True, generator=None,
              device=None):
    """B x T bool mask of spans, with the reference semantics (spec pretrain.md §2):
    per row, num_spans = max(min_masks, floor(mask_prob * T_valid / mask_length + U[0,1))); starts are distinct,
    uniform in [0, T_valid - mask_length) (in [0, num_spans + 1) when that range is not larger than num_spans);
    each start covers mask_length frames; overlaps are allowed; frames past T_valid are never masked.
    same_count=True (fairseq's require_same_masks): every row is randomly thinned, frame by frame, to the batch's
    smallest masked count. same_count=False: the per-row mode for padded batches (no thinning, so a short clip
    does not collapse the masked fraction of the long ones). Reproducible from `generator`."""
    B, T = shape
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    if B == 0 or T == 0:
        return torch.zeros(B, T, dtype=torch.bool, device=device)
    rand = lambda *s: torch.rand(*s, generator=generator, device=device)
    sz = torch.full((B,), T, device=device, dtype=torch.long) if lengths is None else lengths.to(device).long()
    num = (sz * (mask_prob / mask_length) + rand(B)).long().clamp_min(min_masks)  # floor: both terms >= 0
    span_range = sz - mask_length
    span_range = torch.where(span_range <= num, num + 1, span_range)  # fairseq: min_len <- sz - num - 1
    W = T + 1  # one column more than the frames: see below
    buf = torch.empty(B * max(W, int(span_range.max()) + 1) + 1, dtype=torch.int32, device=device)  # scratch
    start, keep = _distinct_uniform(span_range, num, rand, buf)
    # +1 where a span starts, -1 where it ends (both clipped to the row's length; draws not kept add 0): the running
    # sum counts the spans covering each frame. It never exceeds mask_length, so int16 does on CPU (half the memory
    # traffic of int32). Column T is never covered.
    small = torch.int16 if torch.device(device).type == "cpu" and mask_length < 2 ** 15 else torch.int32
    step = keep.to(small)
    cover = buf.view(small)[:B * W].zero_().view(B, W)
    cover.scatter_add_(1, torch.minimum(start, sz[:, None]), step)
    cover.scatter_add_(1, torch.minimum(start + mask_length, sz[:, None]), -step)
    mask = cover.cumsum_(1).bool()  # (.bool(): much faster than > 0 on CPU)
    if same_count and B > 1:  # unmask random frames until every row has the batch's smallest count
        counts = mask.count_nonzero(1)
        extra = counts - counts.min()
        if int(extra.max()) > 0:  # a uniform subset of each row's masked frames, drawn among [0, T_valid)
            frame, keep = _distinct_uniform(sz, extra, rand, buf, allowed=mask, allowed_count=counts)
            row = torch.arange(0, B * W, W, device=device)[:, None]  # draws not kept unmask column T
            mask.view(-1).index_fill_(0, (row + torch.where(keep, frame, T)).view(-1), False)
    return mask[:, :T]


# ------------------------------------------------------------------------------------------------------------------
# Checkpoints: ours and Hugging Face folders (hubert, wav2vec2, data2vec-audio).

def _hf_name(name, cfg):
    """Our parameter name -> transformers' name (spec pretrain.md §7)."""
    rules = [
        (r"^feature_extractor\.conv_layers\.(\d+)\.norm\.", r"feature_extractor.conv_layers.\1.layer_norm."),
        (r"^feature_norm\.", "feature_projection.layer_norm."),
        (r"^feature_proj\.", "feature_projection.projection."),
        (r"^mask_emb$", "masked_spec_embed"),
        (r"^transformer\.pos_conv\.0\.weight_g$", "encoder.pos_conv_embed.conv.parametrizations.weight.original0"),
        (r"^transformer\.pos_conv\.0\.weight_v$", "encoder.pos_conv_embed.conv.parametrizations.weight.original1"),
        (r"^transformer\.pos_conv\.(\d+)\.(weight|bias)$",
         r"encoder.pos_conv_embed.conv.\2" if cfg.pos_conv_depth == 1 else r"encoder.pos_conv_embed.layers.\1.conv.\2"),
        (r"^transformer\.layer_norm\.", "encoder.layer_norm."),
        (r"^transformer\.layers\.(\d+)\.attn\.", r"encoder.layers.\1.attention."),
        (r"^transformer\.layers\.(\d+)\.attn_norm\.", r"encoder.layers.\1.layer_norm."),
        (r"^transformer\.layers\.(\d+)\.fc1\.", r"encoder.layers.\1.feed_forward.intermediate_dense."),
        (r"^transformer\.layers\.(\d+)\.fc2\.", r"encoder.layers.\1.feed_forward.output_dense."),
        (r"^transformer\.layers\.(\d+)\.final_norm\.", r"encoder.layers.\1.final_layer_norm."),
    ]
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, name)
        if n:
            return new
    return name  # feature_extractor.conv_layers.N.conv.* is spelt the same


# Heads that public folders carry beside the encoder; loading the encoder ignores them by name (and says so).
_HF_HEADS = ("quantizer.", "project_q.", "project_hid.", "lm_head.", "projector.", "classifier.", "layer_weights",
             "final_proj.", "label_embs_concat")
_HF_PREFIXES = ("wav2vec2.", "hubert.", "data2vec_audio.")


# MERT's folders (m-a-p/MERT-v1-95M, -330M; older configs spell it music_hubert) are HuBERT's layout under HuBERT's
# weight names, plus these fields (MERTConfig): the two that change the network are refused, attention_relax is not
# (dividing the logits by c, subtracting the row max and multiplying by c again is the identity for the softmax: an
# fp16 guard), and sample_rate sets the input rate (24 kHz -> 75 Hz frames from the same conv stack).
MERT_TYPES = ("mert_model", "music_hubert")
MERT_REFUSED = (("feature_extractor_cqt", "336 CQT bins concatenated to the conv features; upstream computes that CQT "
                                          "at 50 Hz against 75 Hz conv frames; MERT's released checkpoints have it "
                                          "false"),
                ("deepnorm", "residuals scaled by (2N)^(1/4); MERT's released checkpoints have it false"))


def config_from_hf(hf, normalize_waveform=None, sample_rate=None):
    """EncoderConfig from a transformers config.json dict (hubert, wav2vec2, data2vec-audio; MERT's mert_model /
    music_hubert as the HuBERT it is). sample_rate: the preprocessor's sampling_rate, where the folder has one."""
    kind = hf.get("model_type")
    if kind in MERT_TYPES:
        for field, what in MERT_REFUSED:
            if hf.get(field, False):
                raise ValueError(f"{field}=true ({what}) is not supported")
        kind = "hubert"
    if kind not in ("hubert", "wav2vec2", "data2vec-audio"):
        raise ValueError(f"model_type {kind!r} is not supported (expected hubert, wav2vec2, data2vec-audio, or "
                         f"MERT's {' / '.join(MERT_TYPES)})")
    rate = hf.get("sample_rate")
    if rate is not None and sample_rate is not None and int(rate) != int(sample_rate):
        raise ValueError(f"config.json says sample_rate {rate}, preprocessor_config.json sampling_rate "
                         f"{sample_rate}: which one the model was trained at is unclear")
    rate = int(rate or sample_rate or 16000)
    for key, want in (("hidden_act", "gelu"), ("feat_extract_activation", "gelu")):
        if hf.get(key, want) != want:
            raise ValueError(f"{key}={hf[key]!r} is not supported (only {want!r})")
    if hf.get("conv_pos_batch_norm", False):
        raise ValueError("conv_pos_batch_norm=true is not supported")
    d2v = kind == "data2vec-audio"
    convs = tuple(zip(hf["conv_dim"], hf["conv_kernel"], hf["conv_stride"]))
    return EncoderConfig(
        family=kind, conv_layers=tuple(tuple(int(v) for v in c) for c in convs), conv_bias=hf.get("conv_bias", False),
        extractor_mode="layer" if d2v else {"group": "group", "layer": "layer"}[hf.get("feat_extract_norm", "group")],
        normalize_waveform=d2v if normalize_waveform is None else normalize_waveform,
        feature_grad_mult=1.0 if d2v else 0.1,
        feature_proj_layer_norm=hf.get("feat_proj_layer_norm", True) if kind == "hubert" else True,
        dim=hf["hidden_size"], layers=hf["num_hidden_layers"], heads=hf["num_attention_heads"],
        ffn=hf["intermediate_size"], layer_norm_first=bool(hf.get("do_stable_layer_norm", False)) and not d2v,
        pos_conv_kernel=hf["conv_pos_kernel_size"] if d2v else hf["num_conv_pos_embeddings"],
        pos_conv_depth=hf["num_conv_pos_embeddings"] if d2v else 1,
        pos_conv_groups=hf["num_conv_pos_embedding_groups"],
        dropout=hf.get("hidden_dropout", 0.1), attention_dropout=hf.get("attention_dropout", 0.1),
        activation_dropout=hf.get("activation_dropout", 0.0), dropout_input=hf.get("feat_proj_dropout", 0.0),
        layerdrop=hf.get("layerdrop", 0.0), layer_norm_eps=hf.get("layer_norm_eps", 1e-5), sample_rate=rate)


def _read_hf_weights(folder):
    st, pt = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.exists(st):
        from safetensors.torch import load_file
        return load_file(st)
    if os.path.exists(pt):
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin (sharded folders are not supported)")


def load_pretrained(path, map_location="cpu"):
    """An Encoder (eval mode, fp32) from one of our checkpoints or a Hugging Face model folder. Every weight must
    map to a parameter and every parameter must be given; otherwise the error lists the names."""
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"{path}: a Hugging Face model folder needs config.json")
        with open(cfg_path) as f:
            hf = json.load(f)
        normalize, rate = None, None
        pre = os.path.join(path, "preprocessor_config.json")
        if os.path.exists(pre):  # the feature extractor's do_normalize and rate are what the checkpoint is used with
            with open(pre) as f:
                pre = json.load(f)
            normalize, rate = bool(pre.get("do_normalize", False)), pre.get("sampling_rate")
        try:
            cfg = config_from_hf(hf, normalize, rate)
        except ValueError as e:
            raise ValueError(f"{cfg_path}: {e}") from None
        encoder = Encoder(cfg)
        ours = {_hf_name(n, cfg): n for n in encoder.state_dict()}
        state, ignored, unknown = {}, [], []
        for name, tensor in _read_hf_weights(path).items():
            name = name.replace(".weight_g", ".parametrizations.weight.original0").replace(
                ".weight_v", ".parametrizations.weight.original1")
            for prefix in _HF_PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix):]
            if name in ours:
                state[ours[name]] = tensor.float()
            elif name.startswith(_HF_HEADS):
                ignored.append(name)
            else:
                unknown.append(name)
        if ignored:
            print(f"load_pretrained: {path}: ignoring {len(ignored)} head weights ({', '.join(sorted(ignored)[:4])}...)")
        if "mask_emb" not in state and "masked_spec_embed" not in unknown:
            # folders fine-tuned without time masking carry no mask embedding; it only matters for pre-training
            print(f"load_pretrained: {path}: no masked_spec_embed, the mask embedding stays randomly initialised")
            state["mask_emb"] = encoder.mask_emb.detach().clone()
        source = f"{path}/model weights"
    else:
        ckpt = fairseq_format.load_file(path)
        if fairseq_format.is_fairseq(ckpt):
            encoder, state, unknown = _from_fairseq(ckpt, path)
            source = path
        elif not isinstance(ckpt, dict) or "encoder" not in ckpt or "encoder_config" not in ckpt:
            raise ValueError(f"{path}: not one of our checkpoints (needs 'encoder_config' and 'encoder' keys), "
                             "not a fairseq checkpoint ('model' and 'cfg' or 'args' keys) and not a Hugging Face "
                             "folder")
        else:
            cfg = EncoderConfig.from_dict(ckpt["encoder_config"])
            encoder = Encoder(cfg)
            state, unknown, source = ckpt["encoder"], [], path
    missing = sorted(set(encoder.state_dict()) - set(state))
    unknown = sorted(unknown + [n for n in state if n not in encoder.state_dict()])
    if missing or unknown:
        raise ValueError(f"{source}: weights do not match the encoder; unknown names: {unknown or 'none'}; "
                         f"missing names: {missing or 'none'}")
    for name, tensor in state.items():
        want = encoder.state_dict()[name].shape
        if tensor.shape != want:
            raise ValueError(f"{source}: {name} has shape {tuple(tensor.shape)}, the config gives {tuple(want)}")
    encoder.load_state_dict(state)
    return encoder.to(map_location).eval()


def _from_fairseq(ckpt, path):
    """(Encoder, its state, unknown names) of a fairseq HuBERT / wav2vec 2.0 / data2vec-audio checkpoint."""
    fields, family, _ = fairseq_format.encoder_config(ckpt, path)
    encoder = Encoder(EncoderConfig(**fields))
    state, heads, unknown = fairseq_format.encoder_weights(ckpt, path)
    if heads:
        print(f"load_pretrained: {path}: skipping {len(heads)} pre-training head weights "
              f"({', '.join(sorted({h.split('.')[0] for h in heads}))})")
    dim, conv_dim = encoder.cfg.dim, encoder.cfg.conv_layers[-1][0]
    if "feature_proj.weight" not in state and dim == conv_dim:  # fairseq has no post_extract_proj when the sizes
        state["feature_proj.weight"] = torch.eye(dim)  # agree: the identity is exactly that
        state["feature_proj.bias"] = torch.zeros(dim)
    return encoder, state, unknown


def load_fairseq_heads(path, map_location="cpu"):
    """The pre-training heads of a fairseq checkpoint, under our scripts' names where they have one:
    HuBERT {"final_proj": Linear, "label_embs": Tensor (classes incl. fairseq's 4 specials x final_dim)};
    data2vec-audio {"final_proj": Linear} (the regression head; the EMA teacher is not loaded: it restarts as a copy);
    wav2vec 2.0 {"quantizer": GumbelQuantizer, "project_q": Linear, "project_hid": Linear (fairseq final_proj)}."""
    ckpt = fairseq_format.load_file(path)
    if not fairseq_format.is_fairseq(ckpt):
        raise ValueError(f"{path}: not a fairseq checkpoint ('model' and 'cfg' or 'args' keys)")
    _, family, _ = fairseq_format.encoder_config(ckpt, path)
    w = fairseq_format.head_weights(ckpt)

    def linear(prefix):
        if f"{prefix}.weight" not in w:
            return None
        lin = nn.Linear(w[f"{prefix}.weight"].shape[1], w[f"{prefix}.weight"].shape[0])
        lin.load_state_dict({"weight": w[f"{prefix}.weight"], "bias": w[f"{prefix}.bias"]})
        return lin.to(map_location).eval()
    heads = {}
    if family == "hubert":
        if "label_embs_concat" in w:
            heads["label_embs"] = w["label_embs_concat"].to(map_location)
        if linear("final_proj") is not None:
            heads["final_proj"] = linear("final_proj")
    elif family == "data2vec-audio" and linear("final_proj") is not None:  # the regression head (dim -> dim)
        heads["final_proj"] = linear("final_proj")
    elif family == "wav2vec2" and "quantizer.vars" in w:
        groups, codewords = fairseq_format.quantizer_fields(ckpt, path)
        book = w["quantizer.vars"]  # 1 x groups*codewords x dim/groups
        quantizer = GumbelQuantizer(w["quantizer.weight_proj.weight"].shape[1], groups, codewords,
                                    book.shape[-1] * groups)
        quantizer.load_state_dict({"codevectors": book.reshape(groups, codewords, -1),
                                   "weight_proj.weight": w["quantizer.weight_proj.weight"],
                                   "weight_proj.bias": w["quantizer.weight_proj.bias"]})
        heads = {"quantizer": quantizer.to(map_location).eval(), "project_q": linear("project_q"),
                 "project_hid": linear("final_proj")}
    return heads


def config_to_hf(cfg):
    """transformers config.json dict for an EncoderConfig."""
    d2v = cfg.family == "data2vec-audio"
    if d2v != (cfg.pos_conv_depth > 1) or (d2v and cfg.extractor_mode != "layer"):
        raise ValueError(f"family {cfg.family!r} does not fit pos_conv_depth={cfg.pos_conv_depth}, "
                         f"extractor_mode={cfg.extractor_mode!r}")
    if d2v and not cfg.feature_proj_layer_norm:
        raise ValueError("data2vec-audio always has the feature-projection LayerNorm")
    if cfg.family == "wav2vec2" and not cfg.feature_proj_layer_norm:
        raise ValueError("wav2vec2 always has the feature-projection LayerNorm; use family='hubert'")
    hf = dict(
        model_type=cfg.family,
        architectures=[{"hubert": "HubertModel", "wav2vec2": "Wav2Vec2Model",
                        "data2vec-audio": "Data2VecAudioModel"}[cfg.family]],
        conv_dim=[c for c, _, _ in cfg.conv_layers], conv_kernel=[k for _, k, _ in cfg.conv_layers],
        conv_stride=[s for _, _, s in cfg.conv_layers], num_feat_extract_layers=len(cfg.conv_layers),
        conv_bias=cfg.conv_bias, feat_extract_activation="gelu", hidden_act="gelu",
        hidden_size=cfg.dim, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        intermediate_size=cfg.ffn, layer_norm_eps=cfg.layer_norm_eps, num_conv_pos_embedding_groups=cfg.pos_conv_groups,
        hidden_dropout=cfg.dropout, attention_dropout=cfg.attention_dropout,
        activation_dropout=cfg.activation_dropout, feat_proj_dropout=cfg.dropout_input, layerdrop=cfg.layerdrop,
        sample_rate=cfg.sample_rate)  # not a transformers field (it keeps it as an attribute): MERT's spelling
    if d2v:
        hf.update(num_conv_pos_embeddings=cfg.pos_conv_depth, conv_pos_kernel_size=cfg.pos_conv_kernel)
    else:
        hf.update(num_conv_pos_embeddings=cfg.pos_conv_kernel, feat_extract_norm=cfg.extractor_mode,
                  do_stable_layer_norm=cfg.layer_norm_first)
        if cfg.family == "hubert":
            hf["feat_proj_layer_norm"] = cfg.feature_proj_layer_norm
    return hf


def load_wav2vec2_heads(path, map_location="cpu"):
    """wav2vec 2.0's pre-training heads from one of our pretrain_wav2vec2.py checkpoints or a Hugging Face
    Wav2Vec2ForPreTraining folder: {"quantizer": GumbelQuantizer, "project_q": Linear(dim -> final_dim),
    "project_hid": Linear(encoder dim -> final_dim)} (project_hid is fairseq's and our script's `final_proj`),
    fp32, eval mode. Pass them to save_hf(encoder, folder, **heads) to publish a checkpoint with its heads."""
    if os.path.isdir(path):
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        weights = {k[len("wav2vec2."):] if k.startswith("wav2vec2.") else k: v
                   for k, v in _read_hf_weights(path).items()}
        if "quantizer.codevectors" not in weights:
            raise ValueError(f"{path}: no quantizer weights (quantizer.codevectors): not a Wav2Vec2ForPreTraining "
                             f"folder")
        groups, codewords = hf.get("num_codevector_groups", 2), hf.get("num_codevectors_per_group", 320)
        book = weights["quantizer.codevectors"]
        quantizer = GumbelQuantizer(hf["conv_dim"][-1], groups, codewords, book.shape[-1] * groups)
        quantizer.load_state_dict({"codevectors": book.reshape(groups, codewords, -1),
                                   "weight_proj.weight": weights["quantizer.weight_proj.weight"],
                                   "weight_proj.bias": weights["quantizer.weight_proj.bias"]})
        heads = {"quantizer": quantizer}
        for name in ("project_q", "project_hid"):
            w = weights[f"{name}.weight"]
            heads[name] = nn.Linear(w.shape[1], w.shape[0])
            heads[name].load_state_dict({"weight": w, "bias": weights[f"{name}.bias"]})
    else:
        ckpt = fairseq_format.load_file(path)
        if fairseq_format.is_fairseq(ckpt):
            heads = load_fairseq_heads(path, map_location)
            if "quantizer" not in heads:
                raise ValueError(f"{path}: a fairseq checkpoint without a wav2vec 2.0 quantizer (quantizer.vars)")
            return heads
        if not isinstance(ckpt, dict) or "quantizer" not in ckpt or "quantizer_config" not in ckpt:
            raise ValueError(f"{path}: no wav2vec 2.0 quantizer in this checkpoint (needs 'quantizer' and "
                             f"'quantizer_config' keys, as pretrain_wav2vec2.py writes)")
        quantizer = GumbelQuantizer(**ckpt["quantizer_config"])
        quantizer.load_state_dict(ckpt["quantizer"])
        heads = {"quantizer": quantizer}
        for name, key in (("project_q", "project_q"), ("project_hid", "final_proj")):
            w = ckpt[key]["weight"]
            heads[name] = nn.Linear(w.shape[1], w.shape[0])
            heads[name].load_state_dict(ckpt[key])
    return {k: m.float().to(map_location).eval() for k, m in heads.items()}


def load_quantizer(path, map_location="cpu"):
    """The GumbelQuantizer (eval mode, fp32) of one of our pretrain_wav2vec2.py checkpoints or of a Hugging Face
    Wav2Vec2ForPreTraining folder. Codes of a clip: `codeword_indices(load_pretrained(path), load_quantizer(path),
    wav)`."""
    return load_wav2vec2_heads(path, map_location)["quantizer"]


def save_hf(encoder, folder, quantizer=None, project_q=None, project_hid=None, extra_config=None):
    """Write a Hugging Face model folder (config.json, model.safetensors, preprocessor_config.json) that
    transformers.AutoModel loads, so trained encoders can be published.

    With a wav2vec 2.0 `quantizer`, `project_q` and `project_hid` (see load_wav2vec2_heads) the folder is a
    Wav2Vec2ForPreTraining: backbone weights under `wav2vec2.`, the heads under their HF names (spec §7.3), the
    codebook as (1, groups x codewords, dim / groups). `extra_config` adds config.json fields (e.g. num_negatives,
    contrastive_logits_temperature, diversity_loss_weight: the objective's settings, which HF uses for its loss)."""
    from safetensors.torch import save_file
    cfg = encoder.cfg
    hf = config_to_hf(cfg)
    heads = (quantizer, project_q, project_hid)
    if any(h is not None for h in heads) and any(h is None for h in heads):
        raise ValueError("save_hf: give all of quantizer, project_q and project_hid, or none")
    os.makedirs(folder, exist_ok=True)
    state = {_hf_name(n, cfg): t.detach().float().cpu().contiguous() for n, t in encoder.state_dict().items()}
    if quantizer is not None:
        if cfg.family != "wav2vec2":
            raise ValueError(f"save_hf: pre-training heads need family 'wav2vec2' (Wav2Vec2ForPreTraining), "
                             f"the encoder is {cfg.family!r}")
        if quantizer.in_dim != cfg.conv_layers[-1][0] or project_q.in_features != quantizer.dim \
                or project_hid.in_features != cfg.dim or project_q.out_features != project_hid.out_features:
            raise ValueError(f"save_hf: head sizes do not fit: quantizer {quantizer.config()}, project_q "
                             f"{project_q.in_features}->{project_q.out_features}, project_hid "
                             f"{project_hid.in_features}->{project_hid.out_features}, encoder conv "
                             f"{cfg.conv_layers[-1][0]} / dim {cfg.dim}")
        state = {"wav2vec2." + k: v for k, v in state.items()}
        book = quantizer.codevectors.detach().float().cpu()
        state["quantizer.codevectors"] = book.reshape(1, -1, book.shape[-1]).contiguous()
        for prefix, module in (("quantizer.weight_proj", quantizer.weight_proj), ("project_q", project_q),
                               ("project_hid", project_hid)):
            for name, t in module.state_dict().items():
                state[f"{prefix}.{name}"] = t.detach().float().cpu().contiguous()
        hf.update(architectures=["Wav2Vec2ForPreTraining"], num_codevector_groups=quantizer.groups,
                  num_codevectors_per_group=quantizer.codewords, codevector_dim=quantizer.dim,
                  proj_codevector_dim=project_q.out_features, feat_quantizer_dropout=cfg.dropout_features)
    hf.update(extra_config or {})
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "padding_side": "right",
                   "padding_value": 0.0, "sampling_rate": cfg.sample_rate, "do_normalize": cfg.normalize_waveform,
                   "return_attention_mask": True}, f, indent=2)
