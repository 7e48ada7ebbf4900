#!/usr/bin/env bash
# The Quick start's main job, on the CPU: a synthetic music corpus, MFCC k-means labels, a small MusicHuBERT
# (config/quickstart.py) and a small Music2Vec (config/quickstart_music2vec.py), then probing both against random
# encoders of their architectures on NSynth-style notes, in one table.
set -euo pipefail
cd "$(dirname "$0")"
[ -f synth/train.tsv ] || python data/synth.py synth --hours 0.5 --nsynth 200
# Pre-training audio: the songs plus the note set's training notes, unlabelled (without isolated notes and their
# silent tails the model never meets what the probe feeds it). The probe's valid and test notes, played by held-out
# instruments, stay unseen.
python data/manifest.py synth/audio synth/nsynth/nsynth-train/audio --out synth/pretrain.tsv
python kmeans.py features --manifest synth/pretrain.tsv --out synth/mfcc
python kmeans.py fit synth/mfcc --k 500 --out synth/km.pt
python kmeans.py label synth/mfcc --km synth/km.pt --out synth/labels
python pretrain_musichubert.py config/quickstart.py
python pretrain_music2vec.py config/quickstart_music2vec.py
# five probe seeds per model; `random` takes the architecture of the model before it and a new init per seed
rm -f out/quickstart/probe.jsonl
for ckpt in $(ls out/quickstart_musichubert/ckpt_*.pt | tail -n 1) $(ls out/quickstart_music2vec/ckpt_*.pt | tail -n 1); do
    python probe.py --task nsynth_pitch,nsynth_instr --model "$ckpt" random --data-root synth/nsynth \
        --batch-size 16 --seed 1,2,3,4,5 --results out/quickstart/probe.jsonl
done
python probe.py report out/quickstart/probe.jsonl
