#!/usr/bin/env bash
# The Quick start's main job, on the CPU in about 10 minutes: a synthetic music corpus, MFCC k-means labels,
# a small MusicHuBERT (config/quickstart.py), then probing it against a random encoder on NSynth-style notes.
set -euo pipefail
cd "$(dirname "$0")"
[ -f synth/train.tsv ] || python data/synth.py synth --hours 0.5 --nsynth 200
python kmeans.py features --manifest synth/train.tsv --out synth/mfcc
python kmeans.py fit synth/mfcc --k 100 --out synth/km.pt
python kmeans.py label synth/mfcc --km synth/km.pt --out synth/labels
python pretrain_musichubert.py config/quickstart.py
ckpt=$(ls out/quickstart_musichubert/ckpt_*.pt | tail -n 1)
python probe.py --task nsynth_pitch,nsynth_instr --model "$ckpt" random --data-root synth/nsynth --batch-size 16
