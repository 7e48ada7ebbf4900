# wav2vec 2.0 on the synthetic corpus with 2 CPU cores: a small encoder whose contrastive loss falls within minutes.
#   [ -f synth/train.tsv ] || python data/synth.py synth --hours 0.5 --nsynth 200
#   python data/manifest.py synth/audio synth/nsynth/nsynth-train/audio --out synth/pretrain.tsv
#   python pretrain_wav2vec2.py config/quickstart_wav2vec2.py
# The base recipe with smaller sizes (3 x 128 transformer, 64-channel convs, 8 x 4 s crops, 800 updates). The
# quantiser, its temperature schedule, 100 negatives and the masking are the base ones.
# One deviation, the diversity weight: 1.0 instead of 0.1. At 0.1 the codebook contracts for the whole short run
# (code_ppl 190 -> 100 over 800 updates). That is the early phase of fairseq runs, whose perplexities sit near 20
# after 1-20k updates and only climb later. At 1.0, code use grows (code_ppl 200 -> 424) while the loss falls, and
# the probe scores about the same (README, "Quick start results").
train_tsv = "synth/pretrain.tsv"
out_dir = "out/quickstart_wav2vec2"
device = "cpu"
crop_seconds = 4.0
batch_size = 8
grad_accum = 1
num_workers = 1
conv_channels = 64
layers = 3
dim = 128
heads = 4
ffn = 384
layerdrop = 0.0
diversity_weight = 1.0
learning_rate = 1e-3
warmup_steps = 80
max_steps = 800
log_interval = 50
ckpt_interval = 400
