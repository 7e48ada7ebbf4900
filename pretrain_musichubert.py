"""MusicHuBERT pre-training: HuBERT (Hsu et al. 2021, arXiv 2106.07447) on music (Ma et al. 2023, arXiv 2307.05161).

The encoder sees span-masked audio and predicts, at the masked frames, the k-means cluster id of each 20 ms frame
(iteration 1: clusters of MFCC features; iteration 2: clusters of a trained model's hidden states). Reference:
fairseq fairseq/models/hubert/hubert.py, fairseq/criterions/hubert_criterion.py and
examples/hubert/config/pretrain/hubert_base_librispeech.yaml (paraphrased in spec/pretrain.md §4).

Labels first (kmeans.py), then:
Single process:   python pretrain_musichubert.py --train_tsv=data/music/train.tsv --label_dir=labels/mfcc
Quickstart (CPU): see config/quickstart.py
One node, 8 GPUs: torchrun --standalone --nproc_per_node=8 pretrain_musichubert.py --train_tsv=... --label_dir=...
Two nodes:        torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
                      --rdzv_id=musichubert pretrain_musichubert.py ...     (the same command on both nodes)
Iteration 2:      python pretrain_musichubert.py --iteration2_from=out/iter1/ckpt_00400000.pt --out_dir=out/iter2 ...
                  (dumps layer-6 features of that model, fits k-means, writes labels at its frame rate, then trains)
At 24 kHz:        python pretrain_musichubert.py --sample_rate=24000 --train_tsv=data/music24k/train.tsv ...
                  (a manifest counted at 24 kHz: data/manifest.py --sample-rate 24000; 75 Hz frames)
A run resumes from the newest checkpoint in out_dir; SIGTERM saves one and exits.
"""
import dataclasses
import math
import os
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import training
from model import Encoder, EncoderConfig, span_mask

# -----------------------------------------------------------------------------------------------------------------
# Hyperparameters: the HuBERT base recipe (95M encoder, mask 0.8 / span 10, 256-d cosine logits at temperature 0.1,
# loss on masked frames + 10 x feature penalty, Adam(W) 5e-4, 32k warm-up then linear decay, clip 10, 400k updates)
# as in MusicHuBERT. The label set is made by kmeans.py and K is read from dict.km.txt. MusicHuBERT's text uses K=500
# clusters of 39-d MFCC at 100 Hz for iteration 1 and K=2000 for iteration 2 (iteration2_clusters); its Table 2 also
# labels a row "k=2000 MFCC dim=39", so the README's commands follow the text (K=500 for MFCC).
# data
train_tsv = "data/music/train.tsv"  # fairseq manifest: root line, then rel_path<TAB>num_samples
label_dir = ""  # holds {split}.km (one line per manifest line) and dict.km.txt; "" = the manifest's folder
sample_rate = 16000  # Hz the audio is read and the encoder run at (24000 for MERT-like models: 75 Hz frames); the
#                      manifest counts samples at it (data/manifest.py --sample-rate) and checkpoints record it
label_rate = 100.0  # Hz of the labels: 100 for MFCC at any sample_rate (10 ms hop, iteration 1), the encoder's
#                     frame rate for its features (iteration 2: 50 at 16 kHz, 75 at 24 kHz)
crop_seconds = 15.625  # fairseq max_sample_size 250,000 samples; batches are cut to their shortest clip
min_seconds = 2.0  # fairseq min_sample_size 32,000: shorter clips are left out (with a warning)
batch_size = 5  # clips per micro-batch per rank (fairseq packs 1.4M samples = 87.5 s per GPU)
grad_accum = 32  # micro-batches per update over ALL ranks, divided by the world size (nanoGPT's convention), so
#                  the default update is 32 x 5 x 15.6 s = 41.7 min of audio on any number of GPUs (HuBERT: 46.7)
group_by_length = True  # batch clips of similar length (every clip is cut to the batch's shortest)
num_workers = 4
skip_bad_audio = False  # False: an unreadable clip stops the run; True: log it and use another clip
# model
conv_channels = 512  # channels of the 7 conv front-end layers (base: 512; the quickstart uses fewer on CPU)
layers = 12
dim = 768
heads = 12
ffn = 3072
dropout = 0.1
attention_dropout = 0.1
dropout_input = 0.1
layerdrop = 0.05
feature_grad_mult = 0.1  # the conv front end learns 10x slower (fairseq GradMultiply)
# objective (hubert.py / hubert_criterion.py)
final_dim = 256
logit_temp = 0.1
pred_nomask_weight = 0.0  # fairseq: weight of the CE on the UNmasked frames (HuBERT base: 0, only masked frames count)
mask_prob = 0.8  # fairseq semantics: expected span starts x mask_length per frame, not the masked fraction
mask_length = 10  # in encoder frames (20 ms at 16 kHz, 13.3 ms at 24 kHz), as fairseq
min_masks = 2
feature_pen_weight = 10.0
# optimisation
learning_rate = 5e-4
warmup_steps = 32_000
max_steps = 400_000
betas = (0.9, 0.98)
adam_eps = 1e-6
weight_decay = 0.01
grad_clip = 10.0  # 0 = no clipping
max_nonfinite_in_row = 10  # consecutive non-finite losses (skipped updates) before the run stops
# system
out_dir = "out/musichubert"
resume = True  # continue from the newest checkpoint in out_dir when there is one
seed = 1337
device = "auto"  # auto | cuda | cpu
dtype = "bfloat16"  # autocast dtype on GPU (bfloat16 | float16 | float32); CPU runs in float32
compile = False  # torch.compile the model
log_interval = 100
ckpt_interval = 5000
keep_last = 3
stop_at_step = 0  # save and exit after this many updates (0 = run to max_steps); the schedule still ends at max_steps
tensorboard = False  # also write scalars to out_dir/tb (needs the tensorboard package)
peak_flops = 0.0  # peak FLOP/s of one device for MFU when the GPU is not in training.PEAK_BF16_FLOPS
# continued pre-training
init_from = ""  # continued pre-training: start the encoder (and the head, where its shapes match) from this
#                 checkpoint (ours, a Hugging Face folder or a fairseq .pt); its architecture replaces the model
#                 settings above, whose dropouts, layerdrop and feature_grad_mult apply; optimiser, schedule fresh
# iteration 2 (HuBERT: labels from a trained model's hidden states)
iteration2_from = ""  # checkpoint of the iteration-1 model; "" = train on the labels in label_dir
iteration2_layer = 6  # hidden_states index: 6 = output of transformer layer 6 (HuBERT base iteration 2)
iteration2_clusters = 2000  # MusicHuBERT: K=2000 on the first model's features
iteration2_percent = 0.1  # fraction of clips the k-means is fitted on (fairseq --percent 0.1)
# -----------------------------------------------------------------------------------------------------------------

# fairseq's Dictionary prepends <s>, <pad>, </s>, <unk>: cluster k is class k + 4 and the four specials, never
# targets, still sit in the softmax denominator. Kept so that losses and label embeddings match the reference.
NUM_SPECIAL_SYMBOLS = 4


class MusicHubert(nn.Module):
    """Encoder + HuBERT prediction head. forward(wav, targets, mask) -> (CE summed over the scored frames,
    number of correct argmax predictions, feature penalty, CE summed over the unmasked labelled frames).
    targets: B x T cluster ids aligned to the encoder's frames (-1 = no label); mask: B x T frames replaced by the
    mask embedding. Scored = masked and labelled
    (fairseq pred_masked_weight 1). The unmasked frames' CE is computed only when pred_nomask_weight > 0 (else 0);
    the loss adds it with that weight, and the accuracy stays the masked frames'."""

    def __init__(self, encoder_cfg, num_classes):
        super().__init__()
        self.encoder = Encoder(encoder_cfg)
        self.final_proj = nn.Linear(encoder_cfg.dim, final_dim)
        self.label_embs = nn.Parameter(torch.rand(num_classes + NUM_SPECIAL_SYMBOLS, final_dim))  # fairseq: uniform_

    def forward(self, wav, targets, mask):
        enc = self.encoder
        x, _, conv = enc.embed(wav)
        T = targets.shape[1]  # fewer than the conv frames when the labels are short (align_labels trims)
        x, conv = x[:, :T], conv[:, :T]
        feature_pen = conv.float().pow(2).mean()  # fairseq: on the raw conv output, before the LayerNorm
        x = F.dropout(x, enc.cfg.dropout_input, self.training)
        x = torch.where(mask[..., None], enc.mask_emb.to(x.dtype), x)
        hidden, _ = enc.transformer(x, None)
        scored = mask & (targets >= 0)
        top = enc.transformer.output(hidden[-1])  # pre-LN: with the final LayerNorm, as fairseq
        logits, target = self.logits(top, targets, scored)
        ce_sum = F.cross_entropy(logits, target, reduction="sum")
        correct = (logits.argmax(-1) == target).sum()
        ce_nomask_sum = ce_sum.new_zeros(())
        if pred_nomask_weight > 0:  # the unmasked frames, scored only when they are weighted (fairseq)
            logits_u, target_u = self.logits(top, targets, ~mask & (targets >= 0))
            ce_nomask_sum = F.cross_entropy(logits_u, target_u, reduction="sum")
        return ce_sum, correct, feature_pen, ce_nomask_sum

    def logits(self, top, targets, frames):
        """Cosine similarity of the chosen frames' projections with every label embedding (fairseq
        compute_logits), over the temperature; and their target indices."""
        proj = self.final_proj(top[frames]).float()
        logits = F.normalize(proj, dim=-1, eps=1e-8) @ F.normalize(self.label_embs.float(), dim=-1, eps=1e-8).t()
        return logits / logit_temp, targets[frames] + NUM_SPECIAL_SYMBOLS


def align_labels(labels, num_frames, rate, sample_rate=16000, stride=320):
    """fairseq HubertModel.forward_targets: encoder frame t takes label floor(t * rate * stride / sample_rate), i.e.
    at 16 kHz (50 Hz frames) every other label at 100 Hz and each label at 50 Hz; at 24 kHz (75 Hz frames) each
    label at 75 Hz and label floor(4t / 3) at 100 Hz. When the labels are too short for the frames, the frames
    are trimmed to floor(len(labels) / ratio). labels: B x L (-1 = none) -> B x T' with T' <= num_frames."""
    ratio = rate * stride / sample_rate
    if num_frames * ratio > labels.shape[1]:
        num_frames = int(labels.shape[1] / ratio)
    index = torch.floor(torch.arange(num_frames, dtype=torch.float64) * ratio).long()
    return labels[:, index]


def mask_for(batch_shape, step, global_micro):
    """The span mask of one micro-batch, a pure function of (seed, update, global micro-batch index, shape):
    the same on any number of ranks, and identical after a resume. Rank r's m-th micro-batch of an update has
    global index m * world_size + r, which is the batch ClipBatchSampler gives it (batches[rank::world])."""
    g = training.step_generator(seed, step, global_micro)
    return span_mask(batch_shape, mask_prob, mask_length, min_masks=min_masks, same_count=True, generator=g)


def read_num_classes(dict_path):
    """K from fairseq's dict.km.txt (one `<cluster> <count>` line per cluster)."""
    if not os.path.exists(dict_path):
        raise SystemExit(f"error: {dict_path} not found (kmeans.py label writes it next to the .km file)")
    with open(dict_path) as f:
        lines = [line for line in f if line.strip()]
    for i, line in enumerate(lines, start=1):
        if len(line.split()) != 2:
            raise SystemExit(f"error: {dict_path}:{i}: expected '<cluster> <count>', found {line.strip()[:60]!r}")
    return len(lines)


def check_label_range(labels, km_path, num_classes):
    """Every id must be < K: a .km made with another k-means would otherwise index past the label embeddings."""
    for i, lab in enumerate(labels, start=1):
        if len(lab) and int(lab.max()) >= num_classes:
            raise SystemExit(f"error: {km_path}:{i}: label {int(lab.max())} but dict.km.txt has {num_classes} "
                             f"clusters (0..{num_classes - 1}); are the .km and dict.km.txt from the same k-means?")


def make_iteration2_labels(info, split):
    """HuBERT iteration 2 in one command: dump hidden states `iteration2_layer` of the iteration2_from model for
    every clip (ranks share the clips), fit k-means with iteration2_clusters on iteration2_percent of them, write
    labels at that model's frame rate (50 Hz at 16 kHz, 75 Hz at 24 kHz). Everything lands in out_dir/iteration2/
    and is reused when the run restarts. Returns (label folder, label rate).
    Disk: 768 floats x 50 Hz = 154 kB per second of audio for the features (fairseq dumps them the same way)."""
    import kmeans
    work = os.path.join(out_dir, "iteration2")
    feat_dir, lab_dir, km_path = (os.path.join(work, n) for n in ("features", "labels", "km.pt"))
    if not os.path.exists(os.path.join(lab_dir, f"{split}.km")):
        if info.is_master:
            print(f"iteration 2: layer {iteration2_layer} features of {iteration2_from} -> {feat_dir}")
        kmeans.dump_features(train_tsv, feat_dir, nshard=info.world_size, rank=info.rank, model=iteration2_from,
                             layer=iteration2_layer, device=info.device, skip_bad_audio=skip_bad_audio,
                             sample_rate=sample_rate)
        if info.ddp:
            dist.barrier()
        features = kmeans.FeatureSet(feat_dir, split, iteration2_percent, seed)
        result = kmeans.fit_kmeans(features, iteration2_clusters, seed=seed, device=info.device,
                                   verbose=info.is_master)
        if info.is_master:
            torch.save({"centroids": result["centroids"], "k": iteration2_clusters, "dim": features.dim,
                        "features": features.meta, "inertia": result["inertia"],
                        "iterations": result["iterations"], "num_points": result["num_points"],
                        "percent": iteration2_percent, "seed": seed, "split": features.split}, km_path)
            kmeans.write_labels(feat_dir, km_path, lab_dir, split, device=info.device)
        if info.ddp:
            dist.barrier()
    return lab_dir, sample_rate / 320  # the conv stack's stride: the iteration-1 model's frame rate


def main():
    global label_dir, label_rate
    training.configure(globals())
    info = training.setup_distributed(device)
    master = info.is_master
    if grad_accum % info.world_size:
        raise SystemExit(f"error: grad_accum={grad_accum} must be a multiple of the world size {info.world_size}")
    accum = grad_accum // info.world_size
    use_cuda = info.device.startswith("cuda")
    autocast = training.autocast_context(info.device, dtype)
    torch.manual_seed(seed + info.rank)  # dropout differs per rank; masks and crops do not depend on it

    # --- labels and data: everything that can be wrong with them fails here, before the first update ---
    from data.dataset import AudioClips, ClipBatchSampler, LabelError, load_labels, make_loader
    from data.manifest import ManifestError, check_sample_counts, read_manifest
    from data.audio import AudioError
    split = os.path.splitext(os.path.basename(train_tsv))[0]
    if iteration2_from:
        if os.path.abspath(os.path.dirname(iteration2_from)) == os.path.abspath(out_dir):
            raise SystemExit(f"error: out_dir {out_dir} holds the iteration-1 model; give iteration 2 its own out_dir")
        label_dir, label_rate = make_iteration2_labels(info, split)
    lab_dir = label_dir or os.path.dirname(os.path.abspath(train_tsv))
    km_path = os.path.join(lab_dir, f"{split}.km")
    try:
        manifest = read_manifest(train_tsv)
        check_sample_counts(train_tsv, *manifest, sample_rate)
        if not os.path.exists(km_path):
            raise SystemExit(f"error: label file {km_path} not found (make it with kmeans.py label; label_dir="
                             f"{label_dir!r})")
        num_classes = read_num_classes(os.path.join(lab_dir, "dict.km.txt"))
        labels = load_labels(km_path, manifest[1], label_rate, sample_rate=sample_rate)
        check_label_range(labels, km_path, num_classes)
        # the label-frequency baseline: always answering the most frequent label scores acc_base (logged next to
        # acc); a masked accuracy near it is label statistics, not context
        majority = int(np.bincount(np.concatenate([lab.astype(np.int64) for lab in labels]),
                                   minlength=num_classes).argmax())
        dataset = AudioClips(manifest, crop_seconds, min_seconds, labels=labels, label_rate=label_rate,
                             skip_bad_audio=skip_bad_audio, seed=seed, sample_rate=sample_rate)
        sampler = ClipBatchSampler(dataset.lengths, batch_size, num_replicas=info.world_size, rank=info.rank,
                                   seed=seed, group_by_length=group_by_length)
    except (OSError, ManifestError, LabelError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    loader = make_loader(dataset, sampler, num_workers=num_workers, seed=seed)

    # --- model, optimizer ---
    conv_layers = tuple((conv_channels, k, s) for _, k, s in EncoderConfig().conv_layers)
    enc_cfg = EncoderConfig.hubert_base(conv_layers=conv_layers, layers=layers, dim=dim, heads=heads, ffn=ffn,
                                        dropout=dropout, attention_dropout=attention_dropout,
                                        dropout_input=dropout_input, layerdrop=layerdrop,
                                        feature_grad_mult=feature_grad_mult, sample_rate=sample_rate)
    init = training.init_from_checkpoint(init_from, sample_rate, dropout=dropout, attention_dropout=attention_dropout,
                                         dropout_input=dropout_input, layerdrop=layerdrop,
                                         feature_grad_mult=feature_grad_mult) if init_from else None
    if init:
        enc_cfg = init[0]
    model = MusicHubert(enc_cfg, num_classes).to(info.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=betas, eps=adam_eps,
                                  weight_decay=weight_decay)  # fairseq Adam: decoupled decay on every parameter
    step, epoch, batch_in_epoch = 0, 0, 0
    guard = training.NonFiniteGuard(max_nonfinite_in_row)
    ckpt_path = training.latest_checkpoint(out_dir) if resume else None
    ckpt = None
    if ckpt_path:
        ckpt = training.load_checkpoint(ckpt_path)
        training.check_sample_rate(ckpt_path, training.checkpoint_sample_rate(ckpt["encoder_config"]), sample_rate)
        ckpt["encoder_config"].setdefault("sample_rate", 16000)  # checkpoints from before the field are 16 kHz
        if ckpt["encoder_config"] != dataclasses.asdict(enc_cfg) or ckpt["num_classes"] != num_classes:
            diff = {k: (v, ckpt["encoder_config"].get(k)) for k, v in dataclasses.asdict(enc_cfg).items()
                    if ckpt["encoder_config"].get(k) != v}
            if ckpt["num_classes"] != num_classes:
                diff["num_classes"] = (num_classes, ckpt["num_classes"])
            raise SystemExit(f"error: {ckpt_path} was trained with another model or label set "
                             f"(now vs checkpoint: {diff}); use a new out_dir, or resume=False to start over")
        model.encoder.load_state_dict(ckpt["encoder"])
        model.final_proj.load_state_dict(ckpt["final_proj"])
        model.label_embs.data.copy_(ckpt["label_embs"])
        optimizer.load_state_dict(ckpt["optimizer"])
        guard.load_state_dict(ckpt["nonfinite"])
        step, epoch = ckpt["step"], ckpt["data"]["epoch"]
        # batches are counted over all ranks, so a resume on another number of ranks starts at the right place
        batch_in_epoch = ckpt["data"]["global_batches_in_epoch"] // info.world_size
        if master:
            print(f"resuming from {ckpt_path} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    elif init:  # a fresh run from init_from (a resume reads everything from its own checkpoint)
        say = print if master else (lambda *_: None)
        model.encoder.load_state_dict(init[1])
        training.load_matching(model.final_proj, init[2].get("final_proj", {}), "final_proj", init_from, say)
        embs = init[2].get("label_embs")
        if embs is not None and tuple(embs.shape) == tuple(model.label_embs.shape):
            model.label_embs.data.copy_(embs)
            say(f"init_from: label_embs from {init_from}")
        else:
            say(f"init_from: label_embs start fresh ({init_from}: "
                f"{None if embs is None else tuple(embs.shape)}, this run: {tuple(model.label_embs.shape)})")
    n_params = sum(p.numel() for p in model.encoder.parameters())
    if master:
        print(f"encoder {n_params / 1e6:.2f}M parameters, {num_classes} clusters, {len(dataset)} clips, "
              f"{info.world_size} rank(s) x {accum} micro-batches x {batch_size} clips per update")
    raw_model = model
    if compile:
        model = torch.compile(model)
    if info.ddp:
        # LayerDrop draws are shared by all ranks (model.py), but the skipped layers get no gradient at all, which
        # plain DDP treats as an error; find_unused_parameters lets it all-reduce zeros for them (fairseq no_c10d).
        model = DDP(model, device_ids=[info.local_rank] if use_cuda else None,
                    find_unused_parameters=layerdrop > 0)

    # --- the loop ---
    stop = training.StopSignal()
    peak = training.peak_flops_per_s(info.device, peak_flops)
    peak_total = peak * info.world_size if peak else None
    meter = training.Throughput()
    interval = torch.zeros(7, dtype=torch.float64)  # CE sum, penalty x frames, correct, scored frames, majority,
    #                                                 unmasked CE sum, unmasked labelled frames
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

    def save():
        nonlocal saved_step
        if saved_step == step:
            return
        saved_step = step
        rng = training.gather_rng_states(info)
        if master:
            state = {"encoder_config": dataclasses.asdict(enc_cfg), "encoder": raw_model.encoder.state_dict(),
                     "final_proj": raw_model.final_proj.state_dict(), "label_embs": raw_model.label_embs.detach(),
                     "num_classes": num_classes, "label_rate": label_rate, "optimizer": optimizer.state_dict(),
                     "step": step, "rng": rng, "layerdrop_rng": raw_model.encoder.transformer.layerdrop_rng.get_state(),
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
            lr = training.polynomial_decay_lr(step, learning_rate, warmup_steps, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # the micro-batches of this update, with their targets and masks, so that the loss can be normalised
            # by the masked frames of the whole global batch before the first backward (fairseq's sample_size)
            micro = []
            for m in range(accum):
                batch = stream.next()
                wav = batch["wav"]
                targets = align_labels(batch["labels"], raw_model.encoder.num_frames(wav.shape[1]), label_rate,
                                       sample_rate)
                mask = mask_for(targets.shape, step, m * info.world_size + info.rank)
                micro.append((wav, targets, mask))
            scored = torch.tensor([float(sum(int((mk & (t >= 0)).sum()) for _, t, mk in micro))], dtype=torch.float64)
            global_scored = training.all_reduce_sum(scored.to(info.device)).item()

            stats = torch.zeros(10, dtype=torch.float64, device=info.device)  # CE sum, pen x frames, correct,
            # scored frames, scored frames labelled `majority`, unmasked CE sum, unmasked labelled frames, clips,
            # samples, FLOPs
            for m, (wav, targets, mask) in enumerate(micro):
                n = float((mask & (targets >= 0)).sum())
                n_majority = float((mask & (targets == majority)).sum())
                n_unmasked = float((~mask & (targets >= 0)).sum())
                clip_flops = 3 * training.encoder_flops(enc_cfg, wav.shape[1])  # forward + backward ~ 3x forward
                wav, targets, mask = (t.to(info.device, non_blocking=True) for t in (wav, targets, mask))
                sync = nullcontext() if (not info.ddp or m == accum - 1) else model.no_sync()
                with sync:
                    with autocast:
                        ce_sum, correct, pen, ce_nomask = model(wav, targets, mask)
                    # fairseq: (CE sum [+ w x unmasked CE sum] + 10 * pen * sample_size) / global sample_size, with
                    # sample_size the masked frames; DDP averages over ranks, hence the world_size factor
                    loss = (ce_sum + pred_nomask_weight * ce_nomask + feature_pen_weight * pen * n) * (
                        info.world_size / max(global_scored, 1.0))
                    loss.backward()
                stats += torch.stack([ce_sum.detach().double(), pen.detach().double() * n, correct.double(),
                                      *(torch.tensor(v, dtype=torch.float64, device=info.device) for v in
                                        (n, n_majority)), ce_nomask.detach().double(),
                                      *(torch.tensor(v, dtype=torch.float64, device=info.device) for v in
                                        (n_unmasked, wav.shape[0], wav.numel(), wav.shape[0] * clip_flops))])
            stats = training.all_reduce_sum(stats).cpu()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
            finite = all(math.isfinite(stats[i].item()) for i in (0, 1, 5)) and bool(
                torch.isfinite(grad_norm))
            if guard.ok(finite, step):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            if finite:
                interval += stats[:7]
            meter.add(int(stats[7]), int(stats[8]), float(stats[9]))

            if step % log_interval == 0 or step == max_steps:
                frames = max(interval[3].item(), 1.0)
                metrics = {"loss": (interval[0] + pred_nomask_weight * interval[5]
                                    + feature_pen_weight * interval[1]).item() / frames,
                           "ce": interval[0].item() / frames, "pen": interval[1].item() / frames,
                           "acc": interval[2].item() / frames, "acc_base": interval[4].item() / frames, "lr": lr,
                           "grad_norm": float(grad_norm)}
                if pred_nomask_weight > 0:  # CE per unmasked frame (the loss above holds it x the weight)
                    metrics["ce_nomask"] = interval[5].item() / max(interval[6].item(), 1.0)
                metrics.update(meter.read(peak_total, sample_rate))
                metrics["skipped"] = guard.total
                logger.log(step, metrics)
                interval.zero_()
            if step % ckpt_interval == 0 or step == max_steps:
                save()
    except training.NonFiniteLossError as e:
        raise SystemExit(f"error: {e}; the last good checkpoint is in {out_dir}") from None
    except AudioError as e:
        raise training.audio_error_exit(e, out_dir) from None
    finally:
        progress.close()
        logger.close()
        stop.restore()
    training.cleanup_distributed(info)


if __name__ == "__main__":
    main()
