"""Cost of Music2Vec's position-collapse monitor against the training step it watches.

    python bench/position_monitor.py [--clips 4 --seconds 3 --steps 5 --threads 1 --layers 4 --dim 128 --heads 4
                                      --ffn 512 --conv_channels 32 --log_interval 50]

At every update pretrain_music2vec.py adds, per micro-batch, the monitor's sums (monitor_sums: the targets at every
valid frame and the predictions at the masked ones, grouped by position in the crop) to a buffer; on a logged
update it turns the buffer into the two shares (monitor_shares) and clears it. This times both against one training
step (bench/step.py's Music2Vec step: masks, student and teacher forward, loss, backward, AdamW, EMA update) on the
same batch, alternating them so that load from other processes hits all alike, and prints the cost per update
(sums + 1/log_interval of the shares). The defaults are the quick start's sizes and log interval; --layers 12 --dim 768
--heads 12 --ffn 3072 --conv_channels 512 --seconds 30 gives the base model's (the monitor's buffer then has 2 x 1499 positions x 769).
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import pretrain_music2vec as m2v  # noqa: E402
from bench.step import encoder_args, make_music2vec, setup, timed  # noqa: E402
from model import span_mask  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    encoder_args(ap, clips=4, seconds=3.0, steps=5, threads=1, layers=4, dim=128, heads=4, ffn=512, conv_channels=32)
    ap.add_argument("--top_k", type=int, default=3)
    ap.add_argument("--log_interval", type=int, default=50)
    args = ap.parse_args()
    device, sync, size, wav = setup(args)
    student, step, _ = make_music2vec(size, device)
    T = student.encoder.num_frames(wav.shape[1])
    mask = span_mask((args.clips, T), 0.65, 10, min_masks=1, generator=torch.Generator().manual_seed(0)).to(device)
    max_frames = T
    with torch.no_grad():  # the tensors the monitor reads: the step computes them anyway
        teacher = m2v.make_teacher(student.encoder.transformer)
        pred, teacher_input, padding_mask = student(wav, None, mask)
        _, ffn = teacher(teacher_input, padding_mask, ffn_outputs=True)
        full_target = m2v.build_targets(ffn, padding_mask, min(args.top_k, args.layers))

    sums = torch.zeros(2 * (2 * max_frames * (1 + args.dim) + 1), dtype=torch.float64, device=device)

    def add_sums():
        sums.add_(m2v.monitor_sums(full_target, pred, mask, padding_mask, max_frames))

    def shares():
        m2v.monitor_shares(sums.cpu(), max_frames)
        sums.zero_()

    runs = {"training step": lambda: step(wav, mask), "monitor sums": add_sums, "monitor shares": shares}
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(args.steps):
        for name, fn in runs.items():
            times[name].append(timed(fn, sync))
    med = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    where = f"CPU, {args.threads} thread(s)" if device == "cpu" else torch.cuda.get_device_name(device)
    print(f"encoder {args.layers} x {args.dim} (ffn {args.ffn}, conv {args.conv_channels}), {args.clips} clips x "
          f"{args.seconds:g} s ({T} frames), {where}, median of {args.steps}")
    for name, (wall, cpu) in med.items():
        print(f"  {name:16s} {wall * 1000:9.2f} ms wall {cpu * 1000:9.2f} ms cpu")
    per_update = [med["monitor sums"][i] + med["monitor shares"][i] / args.log_interval for i in (0, 1)]
    print(f"  {'monitor / step, per update (log_interval ' + str(args.log_interval) + ')':44s} "
          f"{100 * per_update[0] / med['training step'][0]:7.3f} % wall "
          f"{100 * per_update[1] / med['training step'][1]:7.3f} % cpu")


if __name__ == "__main__":
    main()
