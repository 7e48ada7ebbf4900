"""`probe.py predict`: heads saved with --save-heads applied to new audio files."""
import argparse
import glob
import json
import os
import sys

import numpy as np
import torch

from data.audio import AudioError
from model import EncoderConfig
from probing import frames
from probing.features import Extraction, clip_windows, pooled_hidden_states
from probing.models import load_model
from probing.runs import load_head


def describe_scores(blob, logits, top):
    """Item-level logits [N] -> [(label, value)], best first: softmax (multiclass), sigmoid (multilabel), or the
    regression outputs on the annotation's own scale."""
    labels = blob["labels"]
    if blob["kind"] == "regression":
        y = logits.numpy().astype(np.float64)
        if blob["target_std"] is not None:
            y = y * np.asarray(blob["target_std"]) + np.asarray(blob["target_mean"])
        return [(labels[i], float(y[i])) for i in range(len(labels))]
    p = (logits.softmax(-1) if blob["kind"] == "multiclass" else logits.sigmoid()).numpy()
    return [(labels[i], float(p[i])) for i in np.argsort(-p, kind="stable")[:top]]


def predict_main(argv):
    p = argparse.ArgumentParser(prog="probe.py predict", description="Apply heads saved with --save-heads to audio "
                                "files: one line per (file, head) with the top labels (or regression outputs).")
    p.add_argument("--heads", required=True, help="a folder of <task>.pt heads, or one such file")
    p.add_argument("--model", required=True, help="the encoder the heads were trained on (or 'random': the saved "
                   "random encoder's config and seed)")
    p.add_argument("audio", nargs="+")
    p.add_argument("--top", type=int, default=5, help="labels shown per line (multiclass / multilabel)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    files = sorted(glob.glob(os.path.join(args.heads, "*.pt"))) if os.path.isdir(args.heads) else [args.heads]
    if not files or not os.path.exists(files[0]):
        sys.exit(f"--heads {args.heads}: no saved heads (<task>.pt) found")
    loaded = [load_head(f) for f in files]
    encoders, out, failures = {}, [], 0
    for path in args.audio:
        windows = {}
        for (blob, heads), file in zip(loaded, files):
            cfg = EncoderConfig.from_dict(blob["encoder_config"])
            mkey = (args.model, blob["seed"] if args.model == "random" else None)
            if mkey not in encoders:
                enc, tag = load_model(args.model, cfg, blob["seed"])
                encoders[mkey] = enc.to(args.device)
                if tag != blob["model_tag"]:
                    print(f"note: {file} was trained on features of {blob['model']} ({blob['model_tag']}); "
                          f"--model {args.model} is {tag}", file=sys.stderr)
            enc = encoders[mkey]
            if (enc.cfg.layers + 1, enc.cfg.dim) != (len(blob["head"]["layer_weights"]), blob["head"]["w1"].shape[0]):
                sys.exit(f"{file}: trained on {len(blob['head']['layer_weights'])} hidden states of "
                         f"{blob['head']['w1'].shape[0]} dims; --model {args.model} gives {enc.cfg.layers + 1} "
                         f"of {enc.cfg.dim}")
            if blob["kind"] == "beat":  # a frame-level head: the file's beat times (probing/frames.py)
                try:
                    times = frames.predict_beats(enc, heads, blob, path, args.device)
                except AudioError as e:
                    print(f"{e}", file=sys.stderr)
                    failures += 1
                    break
                out.append(dict(file=path, task=blob["task"], beats=[round(float(t), 3) for t in times]))
                print(json.dumps(out[-1]) if args.json else
                      f"{path}\t{blob['task']}\t{len(times)} beats: " + " ".join(f"{t:.2f}" for t in times))
                continue
            ext = Extraction(**{**blob["extraction"], "sample_rate": enc.cfg.sample_rate})
            try:
                if ext not in windows:
                    windows[ext] = clip_windows(path, ext)
            except AudioError as e:
                print(f"{e}", file=sys.stderr)
                failures += 1
                break
            if not windows[ext]:
                print(f"{path}: too short for {blob['task']}'s windows", file=sys.stderr)
                continue
            x = pooled_hidden_states(enc, windows[ext], args.device).to(args.device)
            with torch.no_grad():
                logits = heads.to(args.device)(x)[0, 0].mean(0).float().cpu()  # logits averaged over the windows
            scores = describe_scores(blob, logits, args.top)
            out.append(dict(file=path, task=blob["task"], scores=dict(scores), windows=len(windows[ext])))
            if args.json:
                print(json.dumps(out[-1]))
            else:
                print(f"{path}\t{blob['task']}\t" + "  ".join(f"{name} {v:.3f}" for name, v in scores))
    if failures:
        sys.exit(f"{failures} of {len(args.audio)} files could not be read (see above)")
    return out
