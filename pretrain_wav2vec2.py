"""wav2vec 2.0 pre-training (Baevski et al. 2020, arXiv 2006.11477) on music.

The encoder sees span-masked audio; at each masked frame it must pick out the Gumbel-quantised conv features of that
frame (the positive) from 100 quantised frames of the same clip (the negatives). Reference: fairseq
fairseq/models/wav2vec/wav2vec2.py, fairseq/criterions/wav2vec_criterion.py, fairseq/modules/gumbel_vector_quantizer.py
and examples/wav2vec/config/pretraining/wav2vec2_base_librispeech.yaml (paraphrased in spec/pretrain.md §6).

Single process:   python pretrain_wav2vec2.py --train_tsv=data/music/train.tsv
Quickstart (CPU): see config/quickstart_wav2vec2.py
One node, 8 GPUs: torchrun --standalone --nproc_per_node=8 pretrain_wav2vec2.py --train_tsv=...
Two nodes:        torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
                      --rdzv_id=wav2vec2 pretrain_wav2vec2.py ...     (the same command on both nodes)
A run resumes from the newest checkpoint in out_dir; SIGTERM saves one and exits.
Publish with the quantiser: save_hf(load_pretrained(CKPT), "folder", **load_wav2vec2_heads(CKPT)) (model.py).
"""
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
from model import BASE_CONV_LAYERS, Encoder, EncoderConfig, GumbelQuantizer, span_mask

# -----------------------------------------------------------------------------------------------------------------
# Hyperparameters: the wav2vec 2.0 base recipe (95M encoder, mask 0.65 / span 10, quantiser 2 groups x 320 codewords,
# 100 negatives from the same clip, cosine logits at temperature 0.1, InfoNCE + 0.1 x diversity + 10 x feature
# penalty, Adam(W) 5e-4, 32k warm-up then linear decay to 0 at 400k updates, no clipping, raw waveform).
# data
train_tsv = "data/music/train.tsv"  # fairseq manifest: root line, then rel_path<TAB>num_samples
sample_rate = 16000  # Hz the audio is read and the encoder run at (24000 for MERT-like models: 75 Hz frames); the
#                      manifest counts samples at it (data/manifest.py --sample-rate) and checkpoints record it
crop_seconds = 15.625  # fairseq max_sample_size 250,000 samples; batches are cut to their shortest clip
min_seconds = 2.0  # fairseq min_sample_size 32,000: shorter clips are left out (with a warning)
batch_size = 5  # clips per micro-batch per rank (fairseq packs 1.4M samples = 87.5 s per GPU)
grad_accum = 72  # micro-batches per update over ALL ranks, divided by the world size (nanoGPT's convention), so
#                  the default update is 72 x 5 x 15.6 s = 93.75 min of audio on any number of GPUs (w2v2: 93.3)
group_by_length = True  # batch clips of similar length (every clip is cut to the batch's shortest)
num_workers = 4
skip_bad_audio = False  # False: an unreadable clip stops the run; True: log it and use another clip
# model (EncoderConfig.wav2vec2_base: GroupNorm in conv 0, one k=128 weight-normed positional conv, raw waveform)
conv_channels = 512  # channels of the 7 conv front-end layers (base: 512; the quickstart uses fewer on CPU)
layers = 12
dim = 768
heads = 12
ffn = 3072
dropout = 0.1
attention_dropout = 0.1
dropout_input = 0.1  # on the projected features, before masking
dropout_features = 0.1  # on the quantiser's input (the LayerNorm'ed conv features)
layerdrop = 0.05
feature_grad_mult = 0.1  # the conv front end learns 10x slower (fairseq GradMultiply)
# objective (wav2vec2.py, wav2vec_criterion.py, gumbel_vector_quantizer.py)
final_dim = 256  # the space of the contrast: project_q and final_proj outputs; also the codebook width
latent_groups = 2  # codebooks; a code is one codeword per group
latent_vars = 320  # codewords per group
latent_temp = (2.0, 0.5, 0.999995)  # Gumbel temperature: max(start * decay^update, end) (reaches 0.5 at ~277k)
num_negatives = 100  # drawn with replacement from the other masked frames of the same clip
logit_temp = 0.1
diversity_weight = 0.1  # x (G*V - prob perplexity) / (G*V)
feature_pen_weight = 10.0  # x mean square of the raw conv features
mask_prob = 0.65  # fairseq semantics: expected span starts x mask_length per frame, not the masked fraction
mask_length = 10  # in encoder frames (20 ms at 16 kHz, 13.3 ms at 24 kHz), as fairseq
min_masks = 2
# optimisation
learning_rate = 5e-4
warmup_steps = 32_000
max_steps = 400_000
betas = (0.9, 0.98)
adam_eps = 1e-6
weight_decay = 0.01
grad_clip = 0.0  # wav2vec 2.0 base: none (0 = no clipping)
max_nonfinite_in_row = 10  # consecutive non-finite losses (skipped updates) before the run stops
# continued pre-training
init_from = ""  # continued pre-training: start the encoder (and the head, where its shapes match) from this
#                 checkpoint (ours, a Hugging Face folder or a fairseq .pt); its architecture replaces the model
#                 settings above, whose dropouts, layerdrop and feature_grad_mult apply; optimiser, schedule fresh
# system
out_dir = "out/wav2vec2"
resume = True  # continue from the newest checkpoint in out_dir when there is one
seed = 1337
device = "auto"  # auto | cuda | cpu
dtype = "bfloat16"  # autocast dtype on GPU (bfloat16 | float32); CPU runs in float32; quantiser logits are fp32
compile = False  # torch.compile the model
log_interval = 100
ckpt_interval = 5000
keep_last = 3
stop_at_step = 0  # save and exit after this many updates (0 = run to max_steps); the schedule still ends at max_steps
tensorboard = False  # also write scalars to out_dir/tb (needs the tensorboard package)
peak_flops = 0.0  # peak FLOP/s of one device for MFU when the GPU is not in training.PEAK_BF16_FLOPS
# -----------------------------------------------------------------------------------------------------------------

HEADS = ("quantizer", "project_q", "final_proj")  # saved beside the encoder under these names (model.load_wav2vec2_heads)


def gumbel_temperature(step, schedule=None):
    """Gumbel-softmax temperature for update `step` (0-based): max(start * decay^step, end) (fairseq
    GumbelVectorQuantizer.set_num_updates; the first update runs at `start`)."""
    start, end, decay = latent_temp if schedule is None else schedule
    return max(start * decay ** step, end)


def sample_negatives(batch, masked, num, generator):
    """Negatives for each of the `masked` masked frames of each clip: B x M x num indices into the same clip's
    masked frames, uniform with replacement over the OTHER M - 1 (fairseq sample_negatives: draw from M - 1 values,
    shift those at or above the frame's own index up by one). Drawn from `generator`, on its device."""
    if masked < 2:
        raise ValueError(f"{masked} masked frame(s) per clip: negatives need at least 2 (longer clips or mask_prob)")
    idx = torch.randint(0, masked - 1, (batch, masked, num), generator=generator, device=generator.device)
    return idx + (idx >= torch.arange(masked, device=idx.device)[None, :, None])


def contrastive_logits(context, targets, codes, negatives, temperature):
    """context, targets: B x M x D (the transformer's prediction and the quantised target of every masked frame);
    codes: B x M x G; negatives: B x M x K -> B x M x (1 + K): cosine(context, [positive, negatives]) / temperature.
    A negative with the positive's code is the same vector: it gets -inf (fairseq: neg_is_pos)."""
    # every masked prediction against every masked target of its clip (M x M), then gather: no B x M x K x D copy;
    # in fp32 under autocast too (fairseq: cosine_similarity of .float() tensors)
    with torch.autocast(context.device.type, enabled=False):
        sim = F.normalize(context.float(), dim=-1, eps=1e-8) @ F.normalize(targets.float(), dim=-1, eps=1e-8).mT
    positive = sim.diagonal(dim1=1, dim2=2)[..., None]
    negative = sim.gather(2, negatives)
    same_code = (codes[:, :, None, :] == codes[:, None, :, :]).all(-1).gather(2, negatives)
    return torch.cat([positive, negative.masked_fill(same_code, float("-inf"))], -1) / temperature


def info_nce(logits):
    """Cross-entropy with the positive at index 0, summed over frames, and the frames it is scored highest at
    (fairseq's `correct`: argmax 0, not counting rows where every logit is equal)."""
    logits = logits.reshape(-1, logits.shape[-1])
    loss = F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.long), reduction="sum")
    correct = ((logits.argmax(-1) == 0) & (logits.argmin(-1) != 0)).sum()
    return loss, correct


class Wav2Vec2Pretraining(nn.Module):
    """Encoder + wav2vec 2.0 heads: the quantiser (model.GumbelQuantizer), project_q (quantised targets) and
    final_proj (the transformer's predictions; HF calls it project_hid). forward(wav, mask, temperature, generator)
    -> (InfoNCE summed over masked frames, correct, code perplexity, prob perplexity, feature penalty).
    mask: B x T with the same count per row (fairseq require_same_masks); `generator` draws the Gumbel noise and
    the negatives."""

    def __init__(self, encoder_cfg):
        super().__init__()
        self.encoder = Encoder(encoder_cfg)
        self.quantizer = GumbelQuantizer(encoder_cfg.conv_layers[-1][0], latent_groups, latent_vars, final_dim)
        self.project_q = nn.Linear(final_dim, final_dim)
        self.final_proj = nn.Linear(encoder_cfg.dim, final_dim)

    def forward(self, wav, mask, temperature, generator):
        enc = self.encoder
        x, _, conv = enc.embed(wav)  # conv: raw conv features, B x T x C, gradient scaled by feature_grad_mult
        feature_pen = conv.float().pow(2).mean()
        x = F.dropout(x, enc.cfg.dropout_input, self.training)
        x = torch.where(mask[..., None], enc.mask_emb.to(x.dtype), x)
        hidden, _ = enc.transformer(x, None)
        B, M = mask.shape[0], int(mask[0].sum())
        context = self.final_proj(enc.transformer.output(hidden[-1])[mask]).view(B, M, -1)  # pre-LN: + final LN
        # targets: the UNMASKED LayerNorm'ed conv features of the masked frames, after dropout_features, quantised
        y = F.dropout(enc.feature_norm(conv[mask]), enc.cfg.dropout_features, self.training)
        quantized, codes, code_logits = self.quantizer(y, temperature, generator)
        targets = self.project_q(quantized).view(B, M, -1)
        negatives = sample_negatives(B, M, num_negatives, generator)
        logits = contrastive_logits(context, targets, codes.view(B, M, -1), negatives, logit_temp)
        loss, correct = info_nce(logits)
        code_ppl, prob_ppl = GumbelQuantizer.perplexities(code_logits)  # over this micro-batch's masked frames
        return loss, correct, code_ppl, prob_ppl, feature_pen


def diversity_loss(prob_ppl):
    """(G*V - prob perplexity) / (G*V): 0 when the batch's averaged softmax uses every codeword equally."""
    num = latent_groups * latent_vars
    return (num - prob_ppl) / num


def mask_for(batch_shape, step, global_micro):
    """The span mask of one micro-batch, a pure function of (seed, update, global micro-batch index, shape): the
    same on any number of ranks and after a resume."""
    g = training.step_generator(seed, step, global_micro)
    return span_mask(batch_shape, mask_prob, mask_length, min_masks=min_masks, same_count=True, generator=g)


def main():
    training.configure(globals())
    info = training.setup_distributed(device)
    master = info.is_master
    if grad_accum % info.world_size:
        raise SystemExit(f"error: grad_accum={grad_accum} must be a multiple of the world size {info.world_size}")
    accum = grad_accum // info.world_size
    use_cuda = info.device.startswith("cuda")
    autocast = training.autocast_context(info.device, dtype)
    torch.manual_seed(seed + info.rank)  # dropout differs per rank; masks, negatives and Gumbel noise do not

    # --- data: everything that can be wrong with it fails here, before the first update ---
    from data.audio import AudioError
    from data.dataset import AudioClips, ClipBatchSampler, make_loader
    from data.manifest import ManifestError, check_sample_counts, read_manifest
    try:
        manifest = read_manifest(train_tsv)
        check_sample_counts(train_tsv, *manifest, sample_rate)
        dataset = AudioClips(manifest, crop_seconds, min_seconds, skip_bad_audio=skip_bad_audio, seed=seed,
                             sample_rate=sample_rate)
        sampler = ClipBatchSampler(dataset.lengths, batch_size, num_replicas=info.world_size, rank=info.rank,
                                   seed=seed, group_by_length=group_by_length)
    except (OSError, ManifestError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    loader = make_loader(dataset, sampler, num_workers=num_workers, seed=seed)

    # --- model, optimizer ---
    conv_layers = tuple((conv_channels, k, s) for _, k, s in BASE_CONV_LAYERS)
    enc_cfg = EncoderConfig.wav2vec2_base(conv_layers=conv_layers, layers=layers, dim=dim, heads=heads, ffn=ffn,
                                          dropout=dropout, attention_dropout=attention_dropout,
                                          dropout_input=dropout_input, dropout_features=dropout_features,
                                          layerdrop=layerdrop, feature_grad_mult=feature_grad_mult,
                                          sample_rate=sample_rate)
    init = training.init_from_checkpoint(init_from, sample_rate, dropout=dropout, attention_dropout=attention_dropout,
                                         dropout_input=dropout_input, dropout_features=dropout_features,
                                         layerdrop=layerdrop,
                                         feature_grad_mult=feature_grad_mult) if init_from else None
    if init:
        enc_cfg = dataclasses.replace(init[0], family="wav2vec2") if init[0].family == "hubert" else init[0]
    model = Wav2Vec2Pretraining(enc_cfg).to(info.device)
    if init:  # a resume below replaces all of it with its own checkpoint
        say = print if info.is_master else (lambda *_: None)
        model.encoder.load_state_dict(init[1])
        for part in ("quantizer", "project_q", "final_proj"):
            training.load_matching(getattr(model, part), init[2].get(part, {}), part, init_from, say)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=betas, eps=adam_eps,
                                  weight_decay=weight_decay)  # fairseq Adam: decoupled decay on every parameter
    step, epoch, batch_in_epoch = 0, 0, 0
    guard = training.NonFiniteGuard(max_nonfinite_in_row)
    ckpt_path = training.latest_checkpoint(out_dir) if resume else None
    ckpt = None
    if ckpt_path:
        ckpt = training.load_checkpoint(ckpt_path)
        training.check_sample_rate(ckpt_path, training.checkpoint_sample_rate(ckpt["encoder_config"]), sample_rate)
        now = {**dataclasses.asdict(enc_cfg), **model.quantizer.config()}
        # checkpoints from before EncoderConfig.sample_rate are 16 kHz
        then = {"sample_rate": 16000, **ckpt["encoder_config"], **ckpt["quantizer_config"]}
        if now != then:
            diff = {k: (v, then.get(k)) for k, v in now.items() if then.get(k) != v}
            raise SystemExit(f"error: {ckpt_path} was trained with another model (now vs checkpoint: {diff}); use a "
                             f"new out_dir, or resume=False to start over")
        model.encoder.load_state_dict(ckpt["encoder"])
        for name in HEADS:
            getattr(model, name).load_state_dict(ckpt[name])
        optimizer.load_state_dict(ckpt["optimizer"])
        guard.load_state_dict(ckpt["nonfinite"])
        step, epoch = ckpt["step"], ckpt["data"]["epoch"]
        # batches are counted over all ranks, so a resume on another number of ranks starts at the right place
        batch_in_epoch = ckpt["data"]["global_batches_in_epoch"] // info.world_size
        if master:
            print(f"resuming from {ckpt_path} at step {step} (epoch {epoch}, batch {batch_in_epoch})")
    n_params = sum(p.numel() for p in model.encoder.parameters())
    if master:
        print(f"encoder {n_params / 1e6:.2f}M parameters, quantiser {latent_groups} x {latent_vars} codewords, "
              f"{len(dataset)} clips, {info.world_size} rank(s) x {accum} micro-batches x {batch_size} clips per "
              f"update")
    raw_model = model
    if compile:
        model = torch.compile(model)
    if info.ddp:
        # LayerDrop draws are shared by all ranks (model.py), but the skipped layers get no gradient at all, which
        # plain DDP treats as an error; find_unused_parameters lets it all-reduce zeros for them.
        model = DDP(model, device_ids=[info.local_rank] if use_cuda else None,
                    find_unused_parameters=layerdrop > 0)

    # --- the loop ---
    stop = training.StopSignal()
    peak = training.peak_flops_per_s(info.device, peak_flops)
    peak_total = peak * info.world_size if peak else None
    meter = training.Throughput()
    # CE sum, diversity x frames, penalty x frames, correct, code ppl sum, prob ppl sum, masked frames, micro-batches
    interval = torch.zeros(8, dtype=torch.float64)
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
                     "quantizer_config": raw_model.quantizer.config(),
                     **{name: getattr(raw_model, name).state_dict() for name in HEADS},
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
            lr = training.polynomial_decay_lr(step, learning_rate, warmup_steps, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            temp = gumbel_temperature(step)

            # the micro-batches of this update with their masks, so that the loss can be normalised by the masked
            # frames of the whole global batch before the first backward (fairseq's sample_size)
            micro = []
            for m in range(accum):
                wav = stream.next()["wav"]
                gm = m * info.world_size + info.rank
                micro.append((wav, mask_for((wav.shape[0], raw_model.encoder.num_frames(wav.shape[1])), step, gm), gm))
            masked = sum(int(mk.sum()) for _, mk, _ in micro)
            global_masked = training.all_reduce_sum(torch.tensor([float(masked)], dtype=torch.float64,
                                                                 device=info.device)).item()

            stats = torch.zeros(11, dtype=torch.float64, device=info.device)  # interval's 8, clips, samples, FLOPs
            f64 = lambda *v: torch.tensor(v, dtype=torch.float64, device=info.device)
            for m, (wav, mask, gm) in enumerate(micro):
                n = float(mask.sum())
                clip_flops = 3 * training.encoder_flops(enc_cfg, wav.shape[1])  # forward + backward ~ 3x forward
                wav, mask = wav.to(info.device, non_blocking=True), mask.to(info.device, non_blocking=True)
                noise = training.step_generator(seed, step, gm, 1, device=info.device)  # negatives, Gumbel noise
                sync = nullcontext() if (not info.ddp or m == accum - 1) else model.no_sync()
                with sync:
                    with autocast:
                        ce_sum, correct, code_ppl, prob_ppl, pen = model(wav, mask, temp, noise)
                    div = diversity_loss(prob_ppl)
                    # fairseq: (InfoNCE sum + (0.1 div + 10 pen) x sample_size) / global sample_size; DDP averages
                    # over ranks, hence the world_size factor
                    loss = (ce_sum + (diversity_weight * div + feature_pen_weight * pen) * n) * (
                        info.world_size / max(global_masked, 1.0))
                    loss.backward()
                measured = [ce_sum, div * n, pen * n, correct, code_ppl, prob_ppl]
                stats += torch.cat([torch.stack([v.detach().double() for v in measured]),
                                    f64(n, 1, wav.shape[0], wav.numel(), wav.shape[0] * clip_flops)])
            stats = training.all_reduce_sum(stats).cpu()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
            finite = all(math.isfinite(v) for v in stats[:3].tolist()) and bool(torch.isfinite(grad_norm))
            if guard.ok(finite, step):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            if finite:
                interval += stats[:8]
            meter.add(int(stats[8]), int(stats[9]), float(stats[10]))

            if step % log_interval == 0 or step == max_steps:
                ce, div_n, pen_n, correct_n, code_sum, prob_sum, frames, micros = interval.tolist()
                frames, micros = max(frames, 1.0), max(micros, 1.0)
                metrics = {"loss": (ce + diversity_weight * div_n + feature_pen_weight * pen_n) / frames,
                           "contrastive": ce / frames, "diversity": div_n / frames, "pen": pen_n / frames,
                           "code_ppl": code_sum / micros, "prob_ppl": prob_sum / micros, "temp": temp,
                           "acc": correct_n / frames, "lr": lr, "grad_norm": float(grad_norm)}
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
