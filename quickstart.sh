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
# Music2Vec reads the same files with the songs' lines ten times (songs teach it pitch, notes instrument; README)
(head -n 1 synth/pretrain.tsv; for i in $(seq 10); do grep '^audio/' synth/pretrain.tsv; done
 grep '^nsynth/' synth/pretrain.tsv) > synth/pretrain_songs10.tsv

# Five probe seeds per model; `random` takes the architecture of the model before it and a new init per seed.
probe() {
    python probe.py --task nsynth_pitch,nsynth_instr --model "$(ls "$1"/ckpt_*.pt | tail -n 1)" random \
        --data-root synth/nsynth --batch-size 16 --seed 1,2,3,4,5 --results "$2"
}
musichubert() {
    python kmeans.py features --manifest synth/pretrain.tsv --out synth/mfcc
    python kmeans.py fit synth/mfcc --k 500 --out synth/km.pt
    python kmeans.py label synth/mfcc --km synth/km.pt --out synth/labels
    python pretrain_musichubert.py config/quickstart.py
    probe out/quickstart_musichubert out/quickstart/musichubert.jsonl
}
music2vec() {
    python pretrain_music2vec.py config/quickstart_music2vec.py
    probe out/quickstart_music2vec out/quickstart/music2vec.jsonl
}

# The two models train side by side, each on half the cores: small models use one thread far better than two.
mkdir -p out/quickstart
rm -f out/quickstart/musichubert.jsonl out/quickstart/music2vec.jsonl
# Ctrl-C (or a failure) stops both: each job's processes, then the job itself
stop() { for p in $(jobs -p); do pkill -TERM -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done; }
trap stop EXIT
trap 'exit 130' INT TERM
threads=$(( $(nproc) / 2 > 1 ? $(nproc) / 2 : 1 ))
echo "MusicHuBERT and Music2Vec pre-train side by side ($threads thread(s) each, about 7 minutes on 2 idle cores);"
echo "follow them with: tail -f out/quickstart/musichubert.log out/quickstart/music2vec.log"
OMP_NUM_THREADS=$threads musichubert > out/quickstart/musichubert.log 2>&1 &
hubert_pid=$!
OMP_NUM_THREADS=$threads music2vec > out/quickstart/music2vec.log 2>&1 &
m2v_pid=$!
failed=0
for job in "musichubert $hubert_pid" "music2vec $m2v_pid"; do
    set -- $job
    if wait "$2"; then
        echo "$1: done"
    else
        echo "$1 failed; the end of out/quickstart/$1.log:"
        tail -n 20 "out/quickstart/$1.log" | tr '\r' '\n' | tail -n 20
        failed=1
    fi
done
[ "$failed" = 0 ] || exit 1
python probe.py report out/quickstart/musichubert.jsonl out/quickstart/music2vec.jsonl
