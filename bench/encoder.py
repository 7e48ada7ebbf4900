"""Forward+backward time and peak memory of our base encoder against transformers' HubertModel (same config).

    python bench/encoder.py [--clips 2 --seconds 10 --steps 3 --threads 2]

Each model runs in its own subprocess. Memory is reported two ways: the bytes of the distinct tensors autograd
saves for the backward pass (the activation memory that dominates training; exact and repeatable), and the process's
peak RSS (model, gradients, allocator slack included). Training mode with dropout/LayerDrop off, fp32, CPU.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(impl, clips, seconds, steps, threads):
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sys.path.insert(0, ROOT)
    wav = torch.randn(clips, int(seconds * 16000))
    if impl == "ours":
        from model import Encoder, EncoderConfig
        model = Encoder(EncoderConfig.hubert_base(dropout=0.0, attention_dropout=0.0, dropout_input=0.0,
                                                  layerdrop=0.0)).train()
        loss_of = lambda: model(wav).hidden_states[-1].pow(2).mean()
    else:
        import transformers
        config = transformers.HubertConfig(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                                           feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0)
        model = transformers.HubertModel(config).train()
        loss_of = lambda: model(wav).last_hidden_state.pow(2).mean()

    def step():
        model.zero_grad(set_to_none=True)
        loss_of().backward()

    saved = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.device)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of()
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activation = sum(n for (ptr, _), n in saved.items() if ptr not in params)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = (time.perf_counter() - t) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": elapsed, "activation_bytes": activation, "peak_bytes": peak}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.clips, args.seconds, args.steps, args.threads)))
        return
    results = {}
    for impl in ("transformers", "ours"):  # each in a fresh process
        cmd = [sys.executable, __file__, "--child", impl, "--clips", str(args.clips), "--seconds", str(args.seconds),
               "--steps", str(args.steps), "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[impl] = json.loads(out.strip().splitlines()[-1])
    print(f"base encoder (95M), {args.clips} clips x {args.seconds:g} s, fp32, forward+backward, "
          f"CPU {args.threads} threads, mean of {args.steps} steps")
    for impl, r in results.items():
        print(f"  {impl:13s} {r['seconds']:7.2f} s/step   saved activations {r['activation_bytes'] / 2**20:8.0f} MiB"
              f"   peak RSS {r['peak_bytes'] / 2**20:8.0f} MiB")
    o, h = results["ours"], results["transformers"]
    print(f"  ratio ours/transformers: time {o['seconds'] / h['seconds']:.2f}, "
          f"activation memory {o['activation_bytes'] / h['activation_bytes']:.2f}, "
          f"peak RSS {o['peak_bytes'] / h['peak_bytes']:.2f} (targets <= 1.0)")


if __name__ == "__main__":
    main()
