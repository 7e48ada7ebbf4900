"""Training-step time of Music2Vec (data2vec 1.0) and wav2vec 2.0 against MusicHuBERT at the same encoder size and
batch.

    python bench/step.py [--clips 2 --seconds 5 --steps 3 --threads 2 --layers 12 --dim 768 --heads 12 --ffn 3072
                          --conv_channels 512]

One step = what each pre-training script does per update with one micro-batch: masks, forward, loss, backward,
AdamW step, for Music2Vec the EMA teacher's forward on the unmasked features and the teacher update, for wav2vec 2.0
the Gumbel quantiser, 100 negatives per masked frame and the diversity loss. Each objective uses its own base encoder
(HuBERT and wav2vec 2.0: GroupNorm convs, one k=128 positional conv; data2vec: LayerNorm convs, five k=19 positional
convs) at the same size. LayerDrop is off (it makes step times random); dropout stays on.
The objectives alternate step by step so that a busy machine slows both alike; wall and CPU seconds are reported.
Also printed: the forward cost alone (student, and student + teacher), the data2vec paper's "about 2x" claim.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import pretrain_music2vec as m2v  # noqa: E402
import pretrain_musichubert as hub  # noqa: E402
import pretrain_wav2vec2 as w2v  # noqa: E402
import training  # noqa: E402
from model import BASE_CONV_LAYERS, Encoder, EncoderConfig, span_mask  # noqa: E402


def make_music2vec(size, device):
    student = m2v.Music2VecStudent(Encoder(EncoderConfig.data2vec_base(layerdrop=0.0, **size))).to(device).train()
    teacher = m2v.make_teacher(student.encoder.transformer)
    copied = m2v.copied_param_names(student.encoder.transformer)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    top_k = min(8, size["layers"])

    def forward(wav, mask):
        pred, teacher_input, padding_mask = student(wav, None, mask)
        with torch.no_grad():
            _, ffn = teacher(teacher_input, padding_mask, ffn_outputs=True)
        target = m2v.build_targets(ffn, padding_mask, top_k)[mask]
        return m2v.regression_loss(pred, target, 0.0).mean()

    def step(wav, mask):
        forward(wav, mask).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        m2v.ema_update(teacher, student.encoder.transformer, 0.999, copied)

    def forward_only(wav, mask, with_teacher):
        with torch.no_grad():
            if with_teacher:
                forward(wav, mask)
            else:
                student(wav, None, mask)

    return student, step, forward_only


def make_musichubert(size, device, num_classes=500):
    model = hub.MusicHubert(EncoderConfig.hubert_base(layerdrop=0.0, **size), num_classes).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)

    def step(wav, mask, targets):
        ce_sum, _, pen = model(wav, targets, mask)
        (ce_sum / mask.sum().clamp_min(1) + hub.feature_pen_weight * pen).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hub.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward_only(wav, mask, targets):
        with torch.no_grad():
            model(wav, targets, mask)

    return model, step, forward_only


def make_wav2vec2(size, device):
    model = w2v.Wav2Vec2Pretraining(EncoderConfig.wav2vec2_base(layerdrop=0.0, **size)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)

    def step(wav, mask):
        noise = training.step_generator(0, 0, 0, 1, device=device)
        ce_sum, _, _, prob_ppl, pen = model(wav, mask, 2.0, noise)
        n = mask.sum().clamp_min(1)
        (ce_sum / n + w2v.diversity_weight * w2v.diversity_loss(prob_ppl) + w2v.feature_pen_weight * pen).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward_only(wav, mask):
        with torch.no_grad():
            model(wav, mask, 2.0, training.step_generator(0, 0, 0, 1, device=device))

    return model, step, forward_only


def timed(fn, sync):
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def encoder_args(ap, clips, seconds, steps, threads, layers, dim, heads, ffn, conv_channels):
    """The arguments every step benchmark takes (batch, thread count, encoder size, device), with its defaults."""
    ap.add_argument("--clips", type=int, default=clips)
    ap.add_argument("--seconds", type=float, default=seconds)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--threads", type=int, default=threads)
    ap.add_argument("--layers", type=int, default=layers)
    ap.add_argument("--dim", type=int, default=dim)
    ap.add_argument("--heads", type=int, default=heads)
    ap.add_argument("--ffn", type=int, default=ffn)
    ap.add_argument("--conv_channels", type=int, default=conv_channels, help="conv front-end channels")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def setup(args):
    """Threads and seed set; returns (device, sync, encoder size overrides, a random batch)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    size = dict(layers=args.layers, dim=args.dim, heads=args.heads, ffn=args.ffn,
                conv_layers=tuple((args.conv_channels, k, s) for _, k, s in BASE_CONV_LAYERS))
    return device, sync, size, torch.randn(args.clips, int(args.seconds * 16000), device=device)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    encoder_args(ap, clips=2, seconds=5.0, steps=3, threads=2, layers=12, dim=768, heads=12, ffn=3072,
                 conv_channels=512)
    args = ap.parse_args()
    device, sync, size, wav = setup(args)
    d2v_model, d2v_step, d2v_forward = make_music2vec(size, device)
    hub_model, hub_step, hub_forward = make_musichubert(size, device)
    w2v_model, w2v_step, w2v_forward = make_wav2vec2(size, device)
    T = d2v_model.encoder.num_frames(wav.shape[1])
    g = torch.Generator().manual_seed(0)
    d2v_mask = span_mask((args.clips, T), 0.65, 10, min_masks=1, generator=g).to(device)
    hub_mask = span_mask((args.clips, T), 0.8, 10, min_masks=2, generator=g).to(device)
    w2v_mask = span_mask((args.clips, T), 0.65, 10, min_masks=2, generator=g).to(device)
    targets = torch.randint(0, 500, (args.clips, T), generator=g).to(device)

    runs = {
        "music2vec step": lambda: d2v_step(wav, d2v_mask),
        "musichubert step": lambda: hub_step(wav, hub_mask, targets),
        "wav2vec2 step": lambda: w2v_step(wav, w2v_mask),
        "music2vec student forward": lambda: d2v_forward(wav, d2v_mask, False),
        "music2vec student+teacher forward": lambda: d2v_forward(wav, d2v_mask, True),
        "musichubert forward": lambda: hub_forward(wav, hub_mask, targets),
        "wav2vec2 forward": lambda: w2v_forward(wav, w2v_mask),
    }
    for fn in runs.values():  # warm-up (allocator, first-call overheads)
        fn()
    times = {name: [] for name in runs}
    for _ in range(args.steps):  # interleaved, so that load from other processes hits every measurement alike
        for name, fn in runs.items():
            times[name].append(timed(fn, sync))
    n_params = sum(p.numel() for p in d2v_model.encoder.parameters()) / 1e6
    where = f"CPU, {args.threads} threads" if device == "cpu" else torch.cuda.get_device_name(device)
    print(f"encoder {args.layers} x {args.dim} (ffn {args.ffn}, conv {args.conv_channels}, {n_params:.1f}M "
          f"params), "
          f"{args.clips} clips x "
          f"{args.seconds:g} s, fp32, {where}, median of {args.steps}")
    med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    for name, (wall, cpu) in med.items():
        print(f"  {name:36s} {wall * 1000:9.1f} ms wall {cpu * 1000:9.1f} ms cpu")
    for label, a, b in (("step: music2vec / musichubert", "music2vec step", "musichubert step"),
                        ("step: wav2vec2 / musichubert", "wav2vec2 step", "musichubert step"),
                        ("forward: wav2vec2 / musichubert", "wav2vec2 forward", "musichubert forward"),
                        ("forward: student+teacher / student", "music2vec student+teacher forward",
                         "music2vec student forward")):
        print(f"  {label:36s} {med[a][0] / med[b][0]:9.2f} x wall {med[a][1] / med[b][1]:9.2f} x cpu")


if __name__ == "__main__":
    main()
