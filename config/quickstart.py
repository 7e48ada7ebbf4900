# MusicHuBERT quickstart: a small model on the synthetic corpus, about 5 minutes on one CPU thread (quickstart.sh
# runs it beside the Music2Vec quick start, one thread each).
#   [ -f synth/train.tsv ] || python data/synth.py synth --hours 0.5 --nsynth 200
#   python data/manifest.py synth/audio synth/nsynth/nsynth-train/audio --out synth/pretrain.tsv
#   python kmeans.py features --manifest synth/pretrain.tsv --out synth/mfcc
#   python kmeans.py fit synth/mfcc --k 500 --out synth/km.pt
#   python kmeans.py label synth/mfcc --km synth/km.pt --out synth/labels
#   python pretrain_musichubert.py config/quickstart.py
# HuBERT's base recipe at a small size. Measured: CE on the masked frames 5.8 (step 50) -> 3.5-3.6 after 800
# updates, masked accuracy 0.35-0.43; the K=500 labels' entropy is 5.7 nats, so this is context, not label
# frequencies. Over 3 pre-training seeds it beats random init of its architecture on nsynth_pitch in every seed and
# on nsynth_instr on average only (README, Quick start, with what else was tried: a frozen conv front end and scored
# unmasked frames lift pitch, not the worst instrument seed). K=500 (MusicHuBERT's K) rather than 100 is what made
# instrument beat random init at all. A peak lr of 5e-3 instead of 1e-3 left the loss at the labels' entropy and
# collapsed the upper layers (their clip means stopped varying).
train_tsv = "synth/pretrain.tsv"
label_dir = "synth/labels"
out_dir = "out/quickstart_musichubert"
crop_seconds = 4.0
batch_size = 8
grad_accum = 1
num_workers = 1
# a narrow conv front end: at 512 channels it alone costs ~5 GFLOP per second of audio
conv_channels = 32
layers = 3
dim = 128
heads = 4
ffn = 384
final_dim = 64
layerdrop = 0.0
learning_rate = 1e-3
warmup_steps = 80
max_steps = 800
log_interval = 50
ckpt_interval = 400
