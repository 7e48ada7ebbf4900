"""Music2Vec pre-training: data2vec 1.0 (Baevski et al. 2022, arXiv 2202.03555) on music (Li et al. 2022,
arXiv 2212.02508; Ma et al. 2023, arXiv 2307.05161).

A student encoder sees span-masked audio and regresses, at the masked frames, the average of the top-K layers of an
EMA teacher that sees the same clip unmasked. Reference: fairseq examples/data2vec/models/data2vec_audio.py and
examples/data2vec/config/audio/pretraining/base_librispeech.yaml (paraphrased in spec/pretrain.md §3).

Single process:   python pretrain_music2vec.py --train_tsv=data/music/train.tsv
Quickstart (CPU): python data/synth.py synth --hours 0.5 && python pretrain_music2vec.py config/quickstart_music2vec.py
One node, 8 GPUs: torchrun --standalone --nproc_per_node=8 pretrain_music2vec.py --train_tsv=...
Two nodes:        torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
                      --rdzv_id=music2vec pretrain_music2vec.py ...     (the same command on both nodes)
A run resumes from the newest checkpoint in out_dir; SIGTERM saves one and exits.
"""
import copy
import dataclasses
import math
import os
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import training
from model import BASE_CONV_LAYERS, Encoder, EncoderConfig, span_mask

# -----------------------------------------------------------------------------------------------------------------
# Hyperparameters: the paper's vanilla Music2Vec (95M data2vec-audio encoder, 30 s clips, mask 0.65 / span 10,
# target = mean of the teacher's top-8 layers, 400k updates) on the data2vec 1.0 audio base recipe (L2 regression of
# instance-normalised FFN outputs, EMA 0.999 -> 0.9999 over 30k updates, Adam(W) 5e-4, tri-stage 3/90/7 %).
# The ablations of the paper's Table 3 are one override away: --mask_length, --mask_prob, --top_k_layers=12,
# --crop_seconds=5, --max_steps; --loss_beta > 0 switches to smooth L1.
# data
train_tsv = "data/music/train.tsv"  # fairseq manifest: root line, then rel_path<TAB>num_samples
sample_rate = 16000  # Hz the audio is read and the encoder run at (24000 for MERT-like models: 75 Hz frames); the
#                      manifest counts samples at it (data/manifest.py --sample-rate) and checkpoints record it
crop_seconds = 30.0  # Music2Vec: 30 s of context (data2vec speech: 20 s); batches are cut to their shortest clip
min_seconds = 2.0  # fairseq min_sample_size 32,000: shorter clips are left out (with a warning)
crop_seconds_min = 0.0  # > 0: cut each micro-batch to a length drawn uniformly from [crop_seconds_min,
#                         crop_seconds] (not in fairseq, see cut_to_random_length)
splice_prob = 0.0  # > 0: this share of the clips gets its tail from the next clip of the micro-batch, at a random
#                    point (not in fairseq, see splice_clips)
pad_batches = False  # False: cut every clip of a batch to the shortest (fairseq); True: zero-pad to the longest
waveform_norm = "file"  # file: zero mean, unit variance with each FILE's statistics, before cropping (fairseq);
#                         clip: with each crop's own (what the encoder does at inference)
file_stats_tsv = ""  # cache of the whole-file statistics, one line per manifest line, computed once (by all ranks
#                      and loader workers together) and reused; "" = next to the manifest (train.stats.tsv)
batch_size = 4  # clips per micro-batch per rank
grad_accum = 32  # micro-batches per update over ALL ranks, divided by the world size (nanoGPT's convention): the
#                  default update is 32 x 4 x 30 s = 64 min of audio on any number of GPUs (data2vec base: 63 min)
group_by_length = True  # batch clips of similar length
num_workers = 4
skip_bad_audio = False  # False: an unreadable clip stops the run; True: log it and use another clip
# model (EncoderConfig.data2vec_base: LayerNorm convs, 5 x k19 positional convs, waveform normalisation)
layers = 12
dim = 768
heads = 12
ffn = 3072
conv_channels = 512  # channels of the 7 conv front-end layers (base: 512; the CPU quickstart uses fewer)
dropout = 0.1
attention_dropout = 0.1
layerdrop = 0.05
pos_conv_kernel = 19  # data2vec: 5 convolutions of kernel 19, which see +-45 frames (0.9 s) around each frame
pos_conv_depth = 5
feature_grad_mult = 1.0  # scales the gradient into the conv front end (data2vec: 1.0; 0 freezes it at its init)
# objective (data2vec_audio.py, base_librispeech.yaml)
mask_prob = 0.65  # fairseq semantics: expected span starts x mask_length per frame, not the masked fraction
mask_length = 10  # in encoder frames (20 ms at 16 kHz, 13.3 ms at 24 kHz), as fairseq
min_masks = 1
top_k_layers = 8  # targets = mean of the teacher's top-K layers (Music2Vec ablation: 12 = all layers)
instance_norm_target_layer = True  # data2vec speech: normalise each layer's channels over the clip's frames
layer_norm_target_layer = False  # data2vec NLP/vision: parameter-free LayerNorm of each layer's frames (after the
#                                  instance norm when both are on, as fairseq)
center_targets = False  # subtract from every target the micro-batch's mean target at its position in the crop
loss_beta = 0.0  # 0 = squared error, as released; > 0 = smooth L1 with this beta
ema_decay_start = 0.999
ema_decay_end = 0.9999
ema_anneal_steps = 30_000  # the decay rises linearly over these updates, then is held
ema_pos_conv = False  # False: the teacher copies the student's positional convs at every update (data2vec
#                       ema_layers_only); True: it averages them like its other parameters
ema_transformer_only = True  # data2vec: the teacher is the transformer alone, fed the student's conv features;
#                              False: it is an EMA of the whole encoder (conv front end too) and reads the waveform
collapse_check_after = -1  # first checked update; -1 = the end of the lr warm-up, at most data2vec's 5000
min_target_std = 0.1  # data2vec min_target_var (a standard deviation despite the name)
min_pred_std = 0.01  # data2vec min_pred_var
max_pos_share = 0.5  # position collapse: most of the target (or prediction) variance explained by frame index
# Measured (README, Music2Vec): content at init has target shares of 0.05-0.07 (synthetic corpus) and the prediction
# share starts near 0; the collapsing quick-start recipe went 0.21 (update 100) -> 0.31 -> 0.55 -> 0.77 -> 0.95 and
# real songs reach 0.99. Recipes still above 0.5 at their end (target or prediction) all lost to random init on the
# note probes; 0.5 stops those within ~10 updates of the jump and leaves runs whose shares stayed below 0.45.
# optimisation
learning_rate = 5e-4
max_steps = 400_000
warmup_frac = 0.03  # tri-stage: linear warm-up from 1 % of the peak, hold, exponential decay to 1 %
hold_frac = 0.90
decay_frac = 0.07
betas = (0.9, 0.98)
adam_eps = 1e-6
weight_decay = 0.01
grad_clip = 0.0  # data2vec: none (0 = no clipping)
max_nonfinite_in_row = 10  # consecutive non-finite losses (skipped updates) before the run stops
# continued pre-training
init_from = ""  # continued pre-training: start the encoder (and the head, where its shapes match) from this
#                 checkpoint (ours, a Hugging Face folder or a fairseq .pt); its architecture replaces the model
#                 settings above, whose dropouts, layerdrop and feature_grad_mult apply; optimiser, schedule fresh
# system
out_dir = "out/music2vec"
resume = True  # continue from the newest checkpoint in out_dir when there is one
seed = 1337
device = "auto"  # auto | cuda | cpu
dtype = "bfloat16"  # autocast dtype on GPU (bfloat16 | float32); CPU runs in float32; the teacher is kept in float32
compile = False  # torch.compile the student
log_interval = 100
ckpt_interval = 5000
keep_last = 3
stop_at_step = 0  # save and exit after this many updates (0 = run to max_steps); the schedule still ends at max_steps
tensorboard = False  # also write scalars to out_dir/tb (needs the tensorboard package)
peak_flops = 0.0  # peak FLOP/s of one device for MFU when the GPU is not in training.PEAK_BF16_FLOPS
# -----------------------------------------------------------------------------------------------------------------


def ema_decay_at(step, start=None, end=None, anneal_steps=None):
    """EMA decay after `step` optimizer updates: linear from `start` to `end` over `anneal_steps`, then held
    (data2vec `get_annealed_rate`: end - (end - start) * (1 - step / anneal_steps))."""
    start = ema_decay_start if start is None else start
    end = ema_decay_end if end is None else end
    anneal_steps = ema_anneal_steps if anneal_steps is None else anneal_steps
    if step >= anneal_steps:
        return end
    return end - (end - start) * (1.0 - step / anneal_steps)


def make_teacher(transformer):
    """The EMA teacher: a float32 copy of the student's transformer (pos conv stack + encoder LayerNorm + layers).
    data2vec `ema_transformer_only`: the conv front end and projection are shared, not copied. (Given the whole
    Encoder instead, it copies that: ema_transformer_only=False.)"""
    teacher = copy.deepcopy(transformer).float().eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def copied_param_names(transformer):
    """Parameters the teacher copies from the student instead of averaging: the positional convolution
    (data2vec `ema_layers_only` adds every `pos_conv.*` key to the EMA's skip_keys)."""
    return {name for name, _ in transformer.named_parameters() if "pos_conv" in name}


@torch.no_grad()
def ema_update(teacher, student, decay, copied=()):
    """theta_t <- decay * theta_t + (1 - decay) * theta_s for every parameter, except names in `copied`, which are
    copied; buffers are copied (fairseq EMAModule.step). The teacher stays float32 whatever the student's dtype."""
    student_params = dict(student.named_parameters())
    averaged_t, averaged_s = [], []
    for name, p_t in teacher.named_parameters():
        p_s = student_params[name].detach().float()
        if name in copied:
            p_t.copy_(p_s)
        else:
            averaged_t.append(p_t)
            averaged_s.append(p_s)
    if averaged_t:  # one fused kernel per op instead of two launches per tensor (~200 tensors at base size)
        torch._foreach_mul_(averaged_t, decay)
        torch._foreach_add_(averaged_t, averaged_s, alpha=1.0 - decay)
    student_buffers = dict(student.named_buffers())
    for name, b_t in teacher.named_buffers():
        b_t.copy_(student_buffers[name])


def instance_norm_valid(x, valid, eps=1e-5):
    """Normalise every channel of every clip over its valid frames (x: B x T x C, valid: B x T bool), in float32.
    Equals F.instance_norm on each clip cut to its length; padded frames neither enter the statistics nor leave
    the function non-zero. (fairseq normalises over the padded length too; with padding that leaks.)"""
    x = x.float()
    w = valid.to(x.dtype)[:, :, None]  # B x T x 1
    count = w.sum(1, keepdim=True).clamp_min(1.0)
    mean = (x * w).sum(1, keepdim=True) / count
    var = (((x - mean) * w) ** 2).sum(1, keepdim=True) / count  # biased, as F.instance_norm
    return (x - mean) * torch.rsqrt(var + eps) * w


def build_targets(ffn_outputs, padding_mask, top_k, instance_norm=True, layer_norm=False):
    """data2vec targets: each of the top-K teacher layers' FFN outputs (before the residual and the layer's final
    LayerNorm), instance-normalised over time per clip (instance_norm_target_layer, data2vec's choice for speech)
    and/or layer-normalised per frame without parameters (layer_norm_target_layer, its choice for NLP and vision),
    then averaged. ffn_outputs: list (one per layer) of B x T x C; padding_mask: B x T bool (True = padded) or
    None. Returns B x T x C float32 (zero at padding)."""
    if not 1 <= top_k <= len(ffn_outputs):
        raise ValueError(f"top_k_layers={top_k} but the teacher has {len(ffn_outputs)} layers")
    first = ffn_outputs[0]
    valid = (torch.ones(first.shape[:2], dtype=torch.bool, device=first.device) if padding_mask is None
             else ~padding_mask)
    target = None
    for layer_out in ffn_outputs[-top_k:]:
        y = instance_norm_valid(layer_out, valid) if instance_norm else layer_out.float() * valid[:, :, None]
        if layer_norm:
            y = F.layer_norm(y, y.shape[-1:]) * valid[:, :, None]
        target = y if target is None else target + y
    return target / top_k


def center_by_position(target, valid, max_frames):
    """target minus the mean over the micro-batch's clips of the targets at the same position key (position_keys):
    what frame position alone predicts is taken out of the targets, so that it cannot be learnt from them."""
    keys = position_keys(valid, valid.sum(1), max_frames)
    rows = target[valid]
    count, sums = key_sums(rows, keys, 2 * max_frames)
    out = torch.zeros_like(target)
    out[valid] = rows - (sums / count.clamp_min(1)[:, None])[keys]
    return out


def regression_loss(pred, target, beta):
    """Per-frame data2vec loss (pred, target: M x C): squared error summed over channels (beta = 0, as released) or
    smooth L1 with that beta, scaled by 1/sqrt(C) (data2vec `loss_scale=None`)."""
    pred, target = pred.float(), target.float()
    if beta == 0:
        per_dim = F.mse_loss(pred, target, reduction="none")
    else:
        per_dim = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    return per_dim.sum(-1) / math.sqrt(pred.shape[-1])


def std_stats(y):
    """[rows, per-channel sums, per-channel sums of squares] (float64) of y (M x C): summed over micro-batches and
    ranks, they give channel_std of the whole global batch."""
    y = y.detach().double().reshape(-1, y.shape[-1])
    return torch.cat([y.new_tensor([y.shape[0]]), y.sum(0), (y * y).sum(0)])


def channel_std(stats):
    """Standard deviation of each channel over the rows, averaged over channels: what data2vec logs as
    target_var / pred_var and checks for collapse (sqrt(unbiased var + 1e-6), mean over channels)."""
    C = (stats.shape[0] - 1) // 2
    n, s, ss = stats[0], stats[1:1 + C], stats[1 + C:]
    var = (ss - s * s / n.clamp_min(1.0)) / (n - 1).clamp_min(1.0)
    return float(torch.sqrt(var.clamp_min(0.0) + 1e-6).mean())


def position_keys(selected, lengths, max_frames):
    """Where each selected frame (B x T bool: the valid or the masked frames) sits in its crop of lengths[b] frames,
    as a key in [0, 2 * max_frames): its index counted from the start in the first half of the crop, max_frames +
    its index counted from the end in the second half. The positional convs' zero padding marks both ends of a crop,
    so with crops of varying length a pattern tied to the end lines up only when counted from the end; with crops
    of one length the keys are just the frame indices. Keys follow selected.nonzero() order (that of x[selected])."""
    b, t = selected.nonzero().unbind(1)
    n = lengths[b]
    return torch.where(t < (n + 1) // 2, t, max_frames + (n - 1 - t))


def position_sums(rows, keys, num_keys):
    """What position_share needs from some rows (M x C) with position keys (M), as one float64 vector [rows per key
    (num_keys), sum per key (num_keys x C), sum of squares] that micro-batches and ranks add."""
    rows = rows.detach().double()
    count, sums = key_sums(rows, keys, num_keys)
    return torch.cat([count, sums.flatten(), (rows * rows).sum().reshape(1)])


def key_sums(rows, keys, num_keys):
    """(rows per key, sum of the rows per key: num_keys x C), in the rows' dtype."""
    count = torch.bincount(keys, minlength=num_keys).to(rows.dtype)
    return count, torch.zeros(num_keys, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, keys, rows)


def position_share(stats, num_keys):
    """Share of the variance of the rows (summed over channels) explained by the frame index alone: the variance
    between the per-frame means over the total, with the between-frame part corrected for the sampling noise of
    the means (epsilon^2 of a one-way ANOVA: SS_between - (G - 1) * SS_within / (N - G)). Without the correction a
    batch of B independent clips would show a share near 1/B with no position pattern at all (0.25 for the quick
    start's 4 clips); with it, content gives ~0 at any batch size and a pure position pattern gives 1.
    stats: position_sums summed over micro-batches and ranks. NaN when there are too few rows to tell."""
    n = stats[:num_keys]
    C = (stats.numel() - 1) // num_keys - 1
    sums = stats[num_keys:num_keys * (C + 1)].view(num_keys, C)
    N, G = n.sum(), (n > 0).sum()
    if N - G < 1:
        return float("nan")
    grand = (sums.sum(0) ** 2).sum() / N
    total = stats[-1] - grand
    used = n > 0
    between = ((sums[used] ** 2).sum(1) / n[used]).sum() - grand
    within = total - between
    if total <= 0:
        return float("nan")
    return float(((between - (G - 1) * within / (N - G)) / total).clamp(0.0, 1.0))


def monitor_sums(full_target, pred, mask, padding_mask, max_frames):
    """The position monitor's sums for one micro-batch, from tensors the step has anyway: the targets (B x T x C) at
    every valid frame, the predictions (M x C) at the masked ones. Micro-batches and ranks add them."""
    valid = torch.ones_like(mask) if padding_mask is None else ~padding_mask
    frames = valid.sum(1)
    return torch.cat([position_sums(full_target[valid], position_keys(valid, frames, max_frames), 2 * max_frames),
                      position_sums(pred, position_keys(mask, frames, max_frames), 2 * max_frames)])


def monitor_shares(sums, max_frames):
    """(target_pos_share, pred_pos_share) from monitor_sums added over the global batch."""
    half = sums.numel() // 2
    return position_share(sums[:half], 2 * max_frames), position_share(sums[half:], 2 * max_frames)


class CollapseError(RuntimeError):
    pass


def collapse_check_start(warmup_steps):
    """The first update the collapse checks look at: collapse_check_after, or when it is negative the end of the
    learning-rate warm-up, at most 5000 (data2vec's value), so that the base recipe keeps the reference's 5k and a
    300-update run is checked too."""
    return collapse_check_after if collapse_check_after >= 0 else min(5000, warmup_steps)


def check_collapse(step, target_std, pred_std, start):
    """Stop with a clear message when the representation has collapsed (data2vec's min_target_var/min_pred_var,
    checked only from update `start`). Every rank sees the same global figures."""
    if step < start:
        return
    if target_std < min_target_std or pred_std < min_pred_std:
        raise CollapseError(
            f"step {step}: representation collapse: target std {target_std:.4f} (min {min_target_std}), "
            f"prediction std {pred_std:.4f} (min {min_pred_std}). Lower the learning rate or the EMA decay, or "
            f"resume from an earlier checkpoint; thresholds: --min_target_std / --min_pred_std.")


def check_position_collapse(step, target_share, pred_share, start):
    """Stop when frame position alone explains more than max_pos_share of the targets' or the predictions'
    variance: the teacher then encodes where a frame sits in the crop, not what it holds, and the student learns
    to copy that. data2vec's std checks cannot see it, because instance normalisation keeps the target std near 1."""
    if step < start or max_pos_share >= 1.0:
        return
    shares = [s for s in (target_share, pred_share) if not math.isnan(s)]
    if shares and max(shares) > max_pos_share:
        raise CollapseError(
            f"step {step}: position collapse: frame position explains {target_share:.3f} of the target variance "
            f"and {pred_share:.3f} of the predictions' (max {max_pos_share}); the teacher encodes where a frame sits "
            f"in the crop, not what it holds. Vary the crop length (crop_seconds_min), lengthen the warm-up or "
            f"lower the learning rate; threshold: --max_pos_share.")


class Music2VecStudent(nn.Module):
    """The trained part: the encoder and the regression head (data2vec `final_proj`, Linear dim -> dim).
    forward returns the predictions at the masked frames and, for the teacher, the unmasked projected features."""

    def __init__(self, encoder, normalize=None):
        super().__init__()
        self.encoder = encoder
        self.final_proj = nn.Linear(encoder.cfg.dim, encoder.cfg.dim)
        self.normalize = normalize  # None: the encoder's per-clip normalisation; False: the data is normalised

    def forward(self, wav, lengths, mask):
        x, padding_mask, _ = self.encoder.embed(wav, lengths, normalize=self.normalize)
        teacher_input = x.detach()  # data2vec `pre_encoder_features`: before dropout_input and masking
        x = F.dropout(x, self.encoder.cfg.dropout_input, self.training)
        x = torch.where(mask[:, :, None], self.encoder.mask_emb.to(x.dtype), x)
        hidden_states, _ = self.encoder.transformer(x, padding_mask)
        pred = self.final_proj(self.encoder.transformer.output(hidden_states[-1])[mask])  # pre-LN: + final LN
        return pred, teacher_input, padding_mask


def mask_for(batch_shape, frame_lengths, step, global_micro):
    """The span mask of one micro-batch, a pure function of (seed, update, global micro-batch index, shape): the
    same on any number of ranks and after a resume (rank r's m-th micro-batch of an update has global index
    m * world_size + r, which is the batch ClipBatchSampler gives it). Padded batches mask each row on its own
    (same_count=False), otherwise the shortest clip would set the masked count of every row (spec §2)."""
    g = training.step_generator(seed, step, global_micro)
    return span_mask(batch_shape, mask_prob, mask_length, min_masks=min_masks, lengths=frame_lengths,
                     same_count=frame_lengths is None, generator=g)


def cut_to_random_length(wav, lengths, step, global_micro):
    """The micro-batch cut to a length drawn uniformly from [crop_seconds_min, its length] seconds, a pure function of
    (seed, update, global micro-batch) like the masks. Not in fairseq: there, songs longer than the crop give every
    batch the same length, so every frame index sits at the same distance from the crop's ends, where the
    positional convs' zero padding leaves a pattern that no content moves; varying the length is one way to keep
    the teacher's targets from becoming that pattern (see the position monitor)."""
    n = wav.shape[1]
    low = min(n, int(round(crop_seconds_min * sample_rate)))
    cut = int(torch.randint(low, n + 1, (1,), generator=training.step_generator(seed, step, global_micro, 1)))
    return wav[:, :cut], None if lengths is None else lengths.clamp(max=cut)


def splice_clips(wav, lengths, step, global_micro):
    """Each clip, with probability splice_prob, continues from a random point in [1/4, 3/4] of its length with the
    next clip of the micro-batch (its own is kept when the batch holds one clip). Not in fairseq. Instance norm over
    time takes from data2vec's targets whatever is constant in a clip: for an isolated sustained note that is its
    pitch and timbre, leaving the envelope and the crop's edges. A spliced clip changes note (song) in the middle,
    so its targets change with its content and the student must know what sounds where."""
    b, n = wav.shape
    if b < 2 or splice_prob <= 0:
        return wav, lengths
    g = training.step_generator(seed, step, global_micro, 2)
    chosen = torch.rand(b, generator=g) < splice_prob
    n_valid = torch.full((b,), n) if lengths is None else lengths.cpu()
    n_common = torch.minimum(n_valid, n_valid.roll(-1))
    cut = (n_common * (0.25 + 0.5 * torch.rand(b, generator=g))).long()
    out = wav.clone()
    for i in torch.nonzero(chosen).flatten().tolist():
        j = (i + 1) % b
        out[i, cut[i]:n_common[i]] = wav[j, cut[i]:n_common[i]]
        if lengths is not None:
            out[i, n_common[i]:] = 0
    new_lengths = None if lengths is None else torch.where(chosen, n_common, n_valid).to(lengths)
    return out, new_lengths


def training_flops_per_clip(cfg, num_samples):
    """Student forward + backward (~3x its forward) plus the teacher's forward, which skips the conv front end and
    projection (shared with the student)."""
    full = training.encoder_flops(cfg, num_samples)
    front_end = training.encoder_flops(dataclasses.replace(cfg, layers=0, pos_conv_kernel=0), num_samples)
    return 3 * full + (full - front_end)


def main():
    training.configure(globals())
    info = training.setup_distributed(device)
    master = info.is_master
    if grad_accum % info.world_size:
        raise SystemExit(f"error: grad_accum={grad_accum} must be a multiple of the world size {info.world_size}")
    if not 1 <= top_k_layers <= layers:
        raise SystemExit(f"error: top_k_layers={top_k_layers} must be between 1 and layers={layers}")
    if not 0 <= crop_seconds_min <= crop_seconds:
        raise SystemExit(f"error: crop_seconds_min={crop_seconds_min} must be between 0 and "
                         f"crop_seconds={crop_seconds}")
    if waveform_norm not in ("file", "clip"):
        raise SystemExit(f"error: waveform_norm={waveform_norm!r}: use file (whole-file statistics) or clip")
    accum = grad_accum // info.world_size
    use_cuda = info.device.startswith("cuda")
    autocast = training.autocast_context(info.device, dtype)

    # --- data: everything that can be wrong with it fails here, before the first update ---
    from data.audio import AudioError
    from data.dataset import (AudioClips, ClipBatchSampler, collate_crop, collate_pad, default_stats_path,
                              make_loader, whole_file_stats)
    from data.manifest import ManifestError, check_sample_counts, read_manifest
    try:
        manifest = read_manifest(train_tsv)
        check_sample_counts(train_tsv, *manifest, sample_rate)
        file_stats = errors = None
        if waveform_norm == "file":
            def all_gather(obj):
                out = [None] * info.world_size
                dist.all_gather_object(out, obj)
                return out
            file_stats, errors = whole_file_stats(manifest, file_stats_tsv or default_stats_path(train_tsv),
                                                  max(1, num_workers), info.rank, info.world_size,
                                                  all_gather if info.ddp else None, progress=master,
                                                  sample_rate=sample_rate)
            if errors and not skip_bad_audio:
                first = errors[min(errors)]
                raise SystemExit(f"error: {len(errors)} file(s) of {train_tsv} cannot be decoded, e.g. {first}\n"
                                 f"set skip_bad_audio=True to leave them out, or fix the manifest")
        dataset = AudioClips(manifest, crop_seconds, min_seconds, skip_bad_audio=skip_bad_audio, seed=seed,
                             file_stats=file_stats, file_stats_errors=errors, sample_rate=sample_rate)
    except (OSError, ManifestError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    sampler = ClipBatchSampler(dataset.lengths, batch_size, num_replicas=info.world_size, rank=info.rank, seed=seed,
                               group_by_length=group_by_length)
    loader = make_loader(dataset, sampler, collate_pad if pad_batches else collate_crop, num_workers=num_workers,
                         seed=seed)

    # --- student, teacher, optimizer ---
    conv_layers = tuple((conv_channels, k, s) for _, k, s in BASE_CONV_LAYERS)
    enc_cfg = EncoderConfig.data2vec_base(layers=layers, dim=dim, heads=heads, ffn=ffn, conv_layers=conv_layers,
                                          pos_conv_kernel=pos_conv_kernel, pos_conv_depth=pos_conv_depth,
                                          dropout=dropout, attention_dropout=attention_dropout, layerdrop=layerdrop,
                                          feature_grad_mult=feature_grad_mult, sample_rate=sample_rate)
    torch.manual_seed(seed)  # the same initial student on every rank: each rank's teacher is a copy of it
    # the checkpoint's encoder keeps normalize_waveform=True: loaded for inference it normalises each clip itself
    init = training.init_from_checkpoint(init_from, sample_rate, dropout=dropout, attention_dropout=attention_dropout,
                                         layerdrop=layerdrop,
                                         feature_grad_mult=feature_grad_mult) if init_from else None
    if init:
        enc_cfg = init[0]
    model = Music2VecStudent(Encoder(enc_cfg), normalize=False if waveform_norm == "file" else None).to(info.device)
    if init:  # before the teacher is copied from the student; a resume below replaces all of it
        model.encoder.load_state_dict(init[1])
        training.load_matching(model.final_proj, init[2].get("final_proj", {}), "final_proj", init_from,
                               print if info.is_master else (lambda *_: None))
    # data2vec creates the teacher as a copy of the initial student (first set_num_updates call)
    ema_source = model.encoder.transformer if ema_transformer_only else model.encoder
    teacher = make_teacher(ema_source)
    torch.manual_seed(seed + info.rank)  # dropout differs per rank; masks and crops do not depend on it
    copied = set() if ema_pos_conv else copied_param_names(ema_source)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=betas, eps=adam_eps,
                                  weight_decay=weight_decay)  # fairseq Adam: decoupled decay on every parameter
    step, epoch, batch_in_epoch = 0, 0, 0
    guard = training.NonFiniteGuard(max_nonfinite_in_row)
    ckpt_path = training.latest_checkpoint(out_dir) if resume else None
    ckpt = None
    if ckpt_path:
        ckpt = training.load_checkpoint(ckpt_path)
        training.check_sample_rate(ckpt_path, training.checkpoint_sample_rate(ckpt["encoder_config"]), sample_rate)
        model.encoder.load_state_dict(ckpt["encoder"])
        model.final_proj.load_state_dict(ckpt["final_proj"])
        teacher.load_state_dict(ckpt["teacher"])
        optimizer.load_state_dict(ckpt["optimizer"])
        guard.load_state_dict(ckpt["nonfinite"])
        step, epoch = ckpt["step"], ckpt["data"]["epoch"]
        # batches are counted over all ranks, so a resume on another number of ranks starts at the right place
        batch_in_epoch = ckpt["data"]["global_batches_in_epoch"] // info.world_size
        if master:
            print(f"resuming from {ckpt_path} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    n_params = sum(p.numel() for p in model.encoder.parameters())
    if master:
        print(f"encoder {n_params / 1e6:.2f}M parameters, targets = mean of the top {top_k_layers} of "
              f"{enc_cfg.layers} "
              f"teacher layers, {len(dataset)} clips, {info.world_size} rank(s) x {accum} micro-batches x "
              f"{batch_size} clips per update")
    raw_model = model
    if compile:
        model = torch.compile(model)
    if info.ddp:
        # The teacher stays outside DDP: its updates are identical on every rank. LayerDrop draws are shared by all
        # ranks (model.py) but skipped layers get no gradient, hence find_unused_parameters.
        model = DDP(model, device_ids=[info.local_rank] if use_cuda else None,
                    find_unused_parameters=layerdrop > 0)

    # --- the loop ---
    stop = training.StopSignal()
    peak = training.peak_flops_per_s(info.device, peak_flops)
    peak_total = peak * info.world_size if peak else None
    meter = training.Throughput()
    interval = torch.zeros(2, dtype=torch.float64)  # loss sum, masked frames since the last log line
    from tqdm import tqdm
    progress = tqdm(total=max_steps, initial=step, disable=not master, dynamic_ncols=True, unit="step")
    os.makedirs(out_dir, exist_ok=True)
    logger = training.TrainLogger(master, os.path.join(out_dir, "tb") if tensorboard else None, progress.write,
                                  jsonl_path=os.path.join(out_dir, "log.jsonl"))

    stream = training.BatchStream(loader, sampler, dataset, epoch, batch_in_epoch)
    if ckpt is not None:  # after the loader iterator: creating it draws from torch's RNG, as it did in the first run
        training.set_rank_rng_state(ckpt["rng"], info)
        raw_model.encoder.transformer.layerdrop_rng.set_state(ckpt["layerdrop_rng"])
        ckpt = None

    saved_step = step if ckpt_path else -1
    check_from = collapse_check_start(int(warmup_frac * max_steps))
    # the position monitor groups frames by their index in the crop: room for the longest crop
    max_frames = int(raw_model.encoder.num_frames(int(round(crop_seconds * sample_rate))))
    target_share = pred_share = float("nan")
    pos_stats = torch.zeros(2 * (2 * max_frames * (1 + enc_cfg.dim) + 1), dtype=torch.float64, device=info.device)

    def save():
        nonlocal saved_step
        if saved_step == step:
            return
        saved_step = step
        rng = training.gather_rng_states(info)
        if master:
            state = {"encoder_config": dataclasses.asdict(enc_cfg), "encoder": raw_model.encoder.state_dict(),
                     "final_proj": raw_model.final_proj.state_dict(), "teacher": teacher.state_dict(),
                     "optimizer": optimizer.state_dict(), "step": step, "rng": rng,
                     "layerdrop_rng": raw_model.encoder.transformer.layerdrop_rng.get_state(),
                     "data": stream.position(info.world_size),
                     "nonfinite": guard.state_dict(), "config": training.config_snapshot(globals())}
            path = training.save_checkpoint(state, out_dir, step, keep_last)
            progress.write(f"saved {path}")
        if info.ddp:
            dist.barrier()

    model.train()
    try:
        while step < max_steps:
            if stop.should_stop(info) or (stop_at_step and step >= stop_at_step):
                if stop.requested and master:
                    progress.write(f"SIGTERM: saving at step {step} and exiting")
                save()
                break
            lr = training.tri_stage_lr(step, learning_rate, max_steps, warmup_frac, hold_frac, decay_frac)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # the micro-batches of this update with their masks, so that the loss can be normalised by the masked
            # frames of the whole global batch before the first backward (fairseq's sample_size)
            micro = []
            for m in range(accum):
                batch = stream.next()
                wav, lengths = batch["wav"], batch["lengths"]
                if crop_seconds_min > 0:
                    wav, lengths = cut_to_random_length(wav, lengths, step, m * info.world_size + info.rank)
                wav, lengths = splice_clips(wav, lengths, step, m * info.world_size + info.rank)
                frames = None if lengths is None else raw_model.encoder.num_frames(lengths)
                mask = mask_for((wav.shape[0], raw_model.encoder.num_frames(wav.shape[1])), frames, step,
                                m * info.world_size + info.rank)
                micro.append((wav, lengths, mask))
            masked = sum(int(mk.sum()) for _, _, mk in micro)
            global_masked = training.all_reduce_sum(torch.tensor([float(masked)], dtype=torch.float64,
                                                                 device=info.device)).item()

            # loss sum, masked frames, clips, samples, training FLOPs; then target and prediction std statistics
            stats = torch.zeros(5 + 2 * (1 + 2 * enc_cfg.dim), dtype=torch.float64, device=info.device)
            # the position monitor's sums (targets at every valid frame, predictions at the masked ones) are added
            # up over the updates between two log lines and reduced over ranks on the logged update
            watch = (step + 1) % log_interval == 0 or step + 1 == max_steps
            stats[1:5] = torch.tensor([float(masked), sum(w.shape[0] for w, _, _ in micro),
                                       sum(w.numel() for w, _, _ in micro),
                                       sum(w.shape[0] * training_flops_per_clip(enc_cfg, w.shape[1])
                                           for w, _, _ in micro)], dtype=torch.float64)
            for m, (wav, lengths, mask) in enumerate(micro):
                wav, mask = wav.to(info.device, non_blocking=True), mask.to(info.device, non_blocking=True)
                sync = nullcontext() if (not info.ddp or m == accum - 1) else model.no_sync()
                with sync:
                    with autocast:
                        pred, teacher_input, padding_mask = model(wav, lengths, mask)
                        with torch.no_grad():  # data2vec: the teacher sees the unmasked features, in eval mode
                            if ema_transformer_only:
                                _, ffn_out = teacher(teacher_input, padding_mask, ffn_outputs=True)
                            else:
                                ffn_out = teacher(wav, lengths, ffn_outputs=True, normalize=raw_model.normalize).ffn
                    full_target = build_targets(ffn_out, padding_mask, top_k_layers, instance_norm_target_layer,
                                                layer_norm_target_layer)
                    # the monitor reads the teacher's targets as they come (before any centering)
                    teacher_target = full_target
                    if center_targets:
                        full_target = center_by_position(
                            full_target, torch.ones_like(mask) if padding_mask is None else ~padding_mask,
                            max_frames)
                    target = full_target[mask]
                    loss_sum = regression_loss(pred, target, loss_beta).sum()
                    # fairseq: regression sum / global sample_size; DDP averages over ranks, hence world_size
                    (loss_sum * (info.world_size / max(global_masked, 1.0))).backward()
                stats[0] += loss_sum.detach().double()
                stats[5:] += torch.cat([std_stats(target), std_stats(pred)])
                pos_stats += monitor_sums(teacher_target, pred, mask, padding_mask, max_frames)
            stats = training.all_reduce_sum(stats).cpu()
            split = 6 + 2 * enc_cfg.dim
            target_std, pred_std = channel_std(stats[5:split]), channel_std(stats[split:])
            if watch:
                target_share, pred_share = monitor_shares(training.all_reduce_sum(pos_stats).cpu(), max_frames)
                pos_stats.zero_()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
            finite = math.isfinite(stats[0].item()) and bool(torch.isfinite(grad_norm))
            applied = guard.ok(finite, step)
            if applied:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            decay = ema_decay_at(step)
            if applied:  # data2vec: one EMA step per optimizer update, after it
                ema_update(teacher, raw_model.encoder.transformer if ema_transformer_only else raw_model.encoder,
                           decay, copied)
            progress.update(1)
            if finite:
                interval += stats[:2]
            meter.add(int(stats[2]), int(stats[3]), float(stats[4]))

            if step % log_interval == 0 or step == max_steps:
                metrics = {"loss": interval[0].item() / max(interval[1].item(), 1.0), "target_std": target_std,
                           "pred_std": pred_std, "target_pos_share": target_share, "pred_pos_share": pred_share,
                           "ema": decay, "lr": lr, "grad_norm": float(grad_norm)}
                metrics.update(meter.read(peak_total, sample_rate))
                metrics["skipped"] = guard.total
                logger.log(step, metrics)
                interval.zero_()
            if finite:  # after the log line, so that the figures that stop a run are in the log
                check_collapse(step, target_std, pred_std, check_from)
                if watch:
                    check_position_collapse(step, target_share, pred_share, check_from)
            if step % ckpt_interval == 0 or step == max_steps:
                save()
    except AudioError as e:
        raise training.audio_error_exit(e, out_dir) from None
    except CollapseError as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        progress.close()
        logger.close()
        stop.restore()
    training.cleanup_distributed(info)


if __name__ == "__main__":
    main()
