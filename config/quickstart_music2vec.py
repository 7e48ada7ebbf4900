# Music2Vec on the synthetic corpus with 2 CPU cores: a small encoder whose loss falls within a few minutes.
#   [ -f synth/train.tsv ] || python data/synth.py synth --hours 0.5
#   python pretrain_music2vec.py config/quickstart_music2vec.py
# The recipe is the base one (data2vec 1.0 targets and masking, EMA teacher, tri-stage schedule); only sizes and
# time scales shrink: 4 layers of 256 (targets = top 3), 64-channel convs, 3 s crops, and an EMA that anneals
# 0.99 -> 0.999 over the run so the teacher moves within 300 updates (0.999 would leave it near its random init).
train_tsv = "synth/train.tsv"
out_dir = "out/quickstart_music2vec"
device = "cpu"
crop_seconds = 3.0
batch_size = 4
grad_accum = 1
num_workers = 1
layers = 4
dim = 256
heads = 4
ffn = 1024
conv_channels = 64
top_k_layers = 3
learning_rate = 1e-3
max_steps = 300
ema_decay_start = 0.99
ema_decay_end = 0.999
ema_anneal_steps = 300
log_interval = 10
ckpt_interval = 300
