# Music2Vec on the synthetic corpus with 2 CPU cores: a small encoder, about 5 minutes of pre-training on one thread
# (quickstart.sh runs it beside the MusicHuBERT quick start, one thread each).
#   [ -f synth/pretrain.tsv ] || bash quickstart.sh   (or: python data/synth.py synth --hours 0.5 --nsynth 200, then
#   python data/manifest.py synth/audio synth/nsynth/nsynth-train/audio --out synth/pretrain.tsv)
#   # the songs' manifest lines ten times, then the training notes: about three crops in four come from songs
#   (head -n 1 synth/pretrain.tsv; for i in $(seq 10); do grep '^audio/' synth/pretrain.tsv; done; \
#    grep '^nsynth/' synth/pretrain.tsv) > synth/pretrain_songs10.tsv
#   python pretrain_music2vec.py config/quickstart_music2vec.py
# The base recipe (data2vec 1.0 targets and masking, EMA teacher, tri-stage schedule) at a small size: 4 layers of
# 128 (targets = top 3), 32-channel convs, 4 x 3 s crops, 2000 updates, on the same audio as the MusicHuBERT quick
# start (the songs plus the note set's training notes). What the README's Music2Vec tables found a small run needs,
# each a deviation from data2vec with its reason:
# - the EMA anneals 0.999 -> 0.9999 over the run (at 0.99 -> 0.999 the teacher follows the student into
#   frame-position targets: the position monitor stops that run near update 120);
# - the conv front end stays at its random init (feature_grad_mult = 0): trained at this lr it loses the pitch
#   detail a random LayerNorm conv stack keeps;
# - positional convs of kernel 5, not 19: data2vec's 5 convs of kernel 19 see +-45 frames, most of a 3 s crop, and
#   the zero padding at the crop's edges becomes the targets; kernel 5 sees +-10 frames;
# - spliced clips (splice_prob, not in fairseq): instance norm over time removes what is constant in a clip, which
#   for a held note is its pitch and timbre, so half the clips continue with the next clip's tail;
# - songs drawn 10 x as often as notes (the manifest above): songs teach pitch, notes teach instrument, and with
#   uniform draws 77 % of the crops would be notes.
# Measured (3 pre-training seeds x 5 probe seeds; README, Quick start): beats random init of this architecture on
# both nsynth_pitch and nsynth_instr, with target / prediction position shares below 0.1 throughout.
train_tsv = "synth/pretrain_songs10.tsv"
out_dir = "out/quickstart_music2vec"
device = "cpu"
crop_seconds = 3.0
batch_size = 4
grad_accum = 1
num_workers = 1
layers = 4
dim = 128
heads = 4
ffn = 512
conv_channels = 32
pos_conv_kernel = 5
top_k_layers = 3
feature_grad_mult = 0.0
splice_prob = 0.5
learning_rate = 1e-3
max_steps = 2000
ema_decay_start = 0.999
ema_decay_end = 0.9999
ema_anneal_steps = 2000
log_interval = 50
ckpt_interval = 1000
