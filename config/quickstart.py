# MusicHuBERT quickstart: a small model on the synthetic corpus, on 2 CPU cores in a few minutes.
#   [ -f synth/train.tsv ] || python data/synth.py synth --hours 0.5
#   python kmeans.py features --manifest synth/train.tsv --out synth/mfcc
#   python kmeans.py fit synth/mfcc --k 100 --out synth/km.pt
#   python kmeans.py label synth/mfcc --km synth/km.pt --out synth/labels
#   python pretrain_musichubert.py config/quickstart.py
# Measured (2 shared CPU cores): CE on the masked frames 4.58 (step 20) -> 4.20 (step 160), i.e. down to the entropy
# of the labels (4.19 nats for K=100 on 0.5 h); about 2.3 CPU-seconds per update. Learning the context beyond the
# label frequencies takes longer runs (tests/test_pretrain_musichubert.py shows it with K=20 on 2 s clips).
train_tsv = "synth/train.tsv"
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
feature_grad_mult = 1.0
learning_rate = 5e-3
warmup_steps = 50
max_steps = 200
log_interval = 20
ckpt_interval = 100
