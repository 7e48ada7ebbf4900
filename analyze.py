"""The two analyses of the wav2vec 2.0-on-music paper (Ragano, Benetos & Hines 2022, "Learning music representations
with wav2vec 2.0", arXiv 2210.15310), for the encoders model.load_pretrained takes.

    python analyze.py codebook --model CKPT --data-root NSYNTH [--split test] [--out DIR] [--compare]
    python analyze.py layers --model CKPT [CKPT ...] --manifest TSV [--out DIR]

codebook: which codewords of a wav2vec 2.0 model's quantiser the frames of NSynth notes pick, against the notes'
pitch and instrument family (the paper's Figures 1-2). For each quantiser group and for the joint code (one
codeword per group): a labels x codewords heat map, codeword purity, normalised mutual information and the number of
codewords used, with their chance level (labels shuffled across notes). --compare runs a random-init model of the
same architecture beside it. Writes codebook_pitch.png, codebook_instrument.png, codebook.json, codebook.csv and
codebook_codewords.csv (one row per codeword).

layers: projection-weighted CCA (PWCCA, Morcos et al. 2018, arXiv 1806.05759) between the conv front end's output
and every transformer layer, over the frames of 4 s from the middle of each clip of a manifest, one line per model
(the paper's Figure 3: pre-trained vs fine-tuned). Writes layers.png and layers.csv.

Choices (README, "Analyses"): codebook counts only the frames of a note within --active-db (40 dB) of its loudest
frame (--frames all counts every frame); NMI is MI / arithmetic mean of the two entropies (scikit-learn's default);
layers compares the LayerNorm'ed conv features (512-d, before the projection to the transformer's width) and keeps,
per side, the leading directions holding 99% of the variance before the CCA (--keep).
"""
import argparse
import csv
import json
import math
import os
import sys

import numpy as np
import torch

from data.audio import SAMPLE_RATE, AudioError, audio_info, load_audio
from data.downstream import NSYNTH_FAMILIES, DataSetError, read_nsynth
from data.manifest import ManifestError, read_manifest
from model import Encoder, GumbelQuantizer, codeword_indices, load_pretrained, load_quantizer, receptive_field

LABELS = ("pitch", "instrument")  # the NSynth labels codewords are compared with
SHUFFLES = 5  # label permutations across notes for the chance level of NMI and purity


# ------------------------------------------------------------------------------------------------------------------
# codeword statistics

def entropy(counts):
    """Entropy (nats) of a histogram."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def contingency(labels, codes):
    """Frame counts per (label, codeword) over the labels and codewords that occur: (table L x K, label values,
    codeword values), both value lists sorted."""
    label_values, li = np.unique(labels, return_inverse=True)
    code_values, ci = np.unique(codes, return_inverse=True)
    table = np.bincount(li.ravel() * len(code_values) + ci.ravel(), minlength=len(label_values) * len(code_values))
    return table.reshape(len(label_values), len(code_values)), label_values, code_values


def codeword_statistics(table):
    """Statistics of a labels x codewords count table.
    nmi: I(label; codeword) / ((H(label) + H(codeword)) / 2), the arithmetic-mean normalisation (scikit-learn's
    default average_method; Strehl & Ghosh's geometric mean and the max give other numbers), 1.0 when both are
    constant (as scikit-learn). purity: the share of frames whose codeword's most frequent label is their own (the
    frame-weighted mean of per-codeword purity). Entropies and MI in nats."""
    table = np.asarray(table)
    n = float(table.sum())
    rows, cols = table.sum(1).astype(np.float64), table.sum(0).astype(np.float64)
    h_label, h_code = entropy(rows), entropy(cols)
    li, ci = np.nonzero(table)
    c = table[li, ci].astype(np.float64)
    mi = max(0.0, float((c / n * (np.log(c) + math.log(n) - np.log(rows[li]) - np.log(cols[ci]))).sum()))
    if (rows > 0).sum() <= 1 and (cols > 0).sum() <= 1:
        nmi = 1.0  # both constant: a perfect match (scikit-learn's convention)
    else:
        nmi = mi / ((h_label + h_code) / 2) if mi > 0 else 0.0
    return {"frames": int(n), "codewords_used": int((cols > 0).sum()), "code_perplexity": math.exp(h_code),
            "nmi": nmi, "purity": float(table.max(0).sum() / n), "mi_nats": mi, "label_entropy_nats": h_label,
            "code_entropy_nats": h_code}


def label_statistics(note_labels, notes, codes, shuffles):
    """codeword_statistics of one code kind against one label over the counted frames (notes: the note of each
    frame, codes: its codeword), with the chance level from `shuffles` (permutations of the notes): nmi_shuffled and
    purity_shuffled (means over the permutations) and nmi_adjusted = (MI - E[MI]) / ((H(label) + H(codeword)) / 2 -
    E[MI]), the adjusted mutual information's form (Vinh et al. 2010) with the expectation taken by moving whole
    notes' labels rather than single frames: the frames of a note share its label and mostly its codewords, so many
    codewords (the joint code) buy a high NMI by chance alone; 0 at that chance level, 1 for a perfect match.
    Returns (statistics, table, label values, codeword values)."""
    table, label_values, code_values = contingency(note_labels[notes], codes)
    stats = codeword_statistics(table)
    chance = [codeword_statistics(contingency(note_labels[p][notes], codes)[0]) for p in shuffles]
    expected = float(np.mean([c["mi_nats"] for c in chance]))
    top = (stats["label_entropy_nats"] + stats["code_entropy_nats"]) / 2 - expected
    stats["nmi_shuffled"] = float(np.mean([c["nmi"] for c in chance]))
    stats["purity_shuffled"] = float(np.mean([c["purity"] for c in chance]))
    stats["nmi_adjusted"] = (stats["mi_nats"] - expected) / top if top > 0 else 0.0
    return stats, table, label_values, code_values


def joint_codes(codes, codewords):
    """frames x groups codeword indices -> one index per frame, c_0 * V^(G-1) + ... + c_(G-1) (V = codewords)."""
    joint = np.zeros(len(codes), dtype=np.int64)
    for g in range(codes.shape[1]):
        joint = joint * codewords + codes[:, g]
    return joint


def code_name(kind, code, codewords, groups):
    """A codeword's name in the CSV: its index in a group, or g0:g1 for the joint code."""
    if kind != "joint":
        return str(int(code))
    parts = []
    for _ in range(groups):
        parts.append(int(code) % codewords)
        code = int(code) // codewords
    return ":".join(str(p) for p in reversed(parts))


# ------------------------------------------------------------------------------------------------------------------
# which frames count

def frame_levels_db(wav, num_frames, conv_layers):
    """Level of each encoder frame in dB relative to the clip's loudest frame: the RMS of the samples the frame sees
    (frame t: samples [t * hop, t * hop + field)). -inf where a frame (or the whole clip) is digital silence."""
    field, hop = receptive_field(conv_layers)
    x = torch.as_tensor(np.asarray(wav), dtype=torch.float64)
    rms = x.unfold(0, field, hop)[:num_frames].pow(2).mean(1).sqrt()
    peak = float(rms.max()) if len(rms) else 0.0
    if peak <= 0:
        return np.full(len(rms), -np.inf)
    with np.errstate(divide="ignore"):
        return 20 * np.log10(rms.numpy() / peak)


# ------------------------------------------------------------------------------------------------------------------
# models

MODEL_EXPECTED = ("one of our checkpoints (.pt), or a Hugging Face hubert / wav2vec2 / data2vec-audio folder "
                  "(config.json + model.safetensors or pytorch_model.bin)")


def one_line(e):
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) < 600 else msg[:600] + " ..."


def load_encoder(path):
    """model.load_pretrained, with whatever is wrong with the file or folder as one line."""
    if not os.path.exists(path):
        raise SystemExit(f"error: --model {path}: no such file or folder; expected {MODEL_EXPECTED}")
    try:
        return load_pretrained(path)
    except Exception as e:  # torch.load's unpickling / zip errors, unsupported configs, mismatched weights
        msg = one_line(e)
        if not msg.startswith(path.rstrip("/")):
            msg = f"{path}: {type(e).__name__}: {msg}; expected {MODEL_EXPECTED}"
        raise SystemExit(f"error: --model {msg}") from None


def load_codebook_model(path):
    """(encoder, quantiser) of a wav2vec 2.0 model; a model without a quantiser ends the run with one line."""
    encoder = load_encoder(path)
    try:
        quantizer = load_quantizer(path)
    except Exception as e:
        raise SystemExit(f"error: --model {path}: codebook needs a wav2vec 2.0 model with its quantiser (our "
                         f"pretrain_wav2vec2.py checkpoints, Hugging Face Wav2Vec2ForPreTraining folders): "
                         f"{one_line(e)}") from None
    if quantizer.in_dim != encoder.cfg.conv_layers[-1][0]:
        raise SystemExit(f"error: --model {path}: the quantiser reads {quantizer.in_dim}-d features, the conv front "
                         f"end gives {encoder.cfg.conv_layers[-1][0]}")
    return encoder, quantizer


def random_like(encoder, quantizer, seed):
    """A random-init encoder (and quantiser) of the same architecture, in eval mode."""
    torch.manual_seed(seed)
    enc = Encoder(encoder.cfg).eval()
    return enc, (GumbelQuantizer(**quantizer.config()).eval() if quantizer is not None else None)


def model_label(path):
    """A short name for tables and legends: the file name, with its folder when the name is a generic ckpt_*."""
    path = path.rstrip("/")
    base = os.path.basename(path)
    if base.startswith(("ckpt", "model", "checkpoint")):
        return os.path.join(os.path.basename(os.path.dirname(path)), base) if os.path.dirname(path) else base
    return base


# ------------------------------------------------------------------------------------------------------------------
# atomic outputs: a run that fails part-way leaves the files of an earlier run whole

def write_atomic(path, write):
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def write_csv(path, rows, columns):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, columns)
            w.writeheader()
            w.writerows(rows)
    write_atomic(path, write)


def write_json(path, blob):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(blob, f, indent=2)
            f.write("\n")
    write_atomic(path, write)


def save_figure(fig, path, dpi):
    """PNG with a 256-colour palette: a heat map holds one colour map's 256 levels and the text's greys, and the
    palette makes its file about a third of matplotlib's RGBA one."""
    import io
    from PIL import Image  # matplotlib's own dependency
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    buf.seek(0)
    image = Image.open(buf).convert("RGB").quantize(colors=256)
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG", optimize=True))


# ------------------------------------------------------------------------------------------------------------------
# codebook

def read_notes(root, split, max_notes=None):
    """NSynth notes of one split: (clips, MIDI pitch per note, instrument family index per note)."""
    pitch = read_nsynth(root, "pitch", splits=(split,)).clips
    family = read_nsynth(root, "instrument", splits=(split,)).clips
    if not pitch:
        raise DataSetError(f"{os.path.join(root, f'nsynth-{split}', 'examples.json')}: no notes")
    if max_notes and len(pitch) > max_notes:  # evenly spread over the sorted names: every instrument keeps notes
        keep = np.linspace(0, len(pitch) - 1, max_notes).round().astype(int)
        pitch, family = [pitch[i] for i in keep], [family[i] for i in keep]
    return pitch, np.array([c.label for c in pitch]), np.array([c.label for c in family])


def note_codes(models, clips, batch_size, device, log):
    """Codes of every frame of every note for each model: per model a list (per note) of T x groups arrays, and per
    note the frame levels (dB re its loudest frame). The audio is read once for all models."""
    conv_layers = models[0][1].cfg.conv_layers
    rates = sorted({m[1].cfg.sample_rate for m in models})
    if len(rates) > 1:
        raise SystemExit(f"codes: the models run at different sample rates ({rates} Hz); compare models of one rate")
    field, _ = receptive_field(conv_layers)
    codes = [[] for _ in models]
    levels = []
    for start in range(0, len(clips), batch_size):
        rate = models[0][1].cfg.sample_rate
        wavs = [load_audio(c.path, sr=rate, min_samples=field) for c in clips[start:start + batch_size]]
        lengths = torch.tensor([len(w) for w in wavs])
        wav = torch.zeros(len(wavs), int(lengths.max()))
        for i, w in enumerate(wavs):
            wav[i, :len(w)] = torch.from_numpy(w)
        frames = models[0][1].num_frames(lengths).tolist()
        for m, (_, encoder, quantizer) in enumerate(models):
            c, _ = codeword_indices(encoder, quantizer, wav.to(device), lengths.to(device))
            codes[m].extend(c[i, :t].cpu().numpy() for i, t in enumerate(frames))
        levels.extend(frame_levels_db(w, t, conv_layers) for w, t in zip(wavs, frames))
        done = min(start + batch_size, len(clips))
        if done == len(clips) or (start // batch_size) % 20 == 0:
            log(f"  {done}/{len(clips)} notes")
    return codes, levels


def heatmap_columns(table, max_columns):
    """The codewords shown, left to right: the `max_columns` most frequent, grouped by their dominant label (in label
    order, as the paper's Figures 1-2), the purest first within a label."""
    counts = table.sum(0)
    cols = np.argsort(-counts, kind="stable")[:max_columns]
    dominant = table[:, cols].argmax(0)
    purity = table[:, cols].max(0) / counts[cols]
    return cols[np.lexsort((-counts[cols], -purity, dominant))]


def plot_codebook(path, label_kind, label_values, panels, dpi):
    """One figure per label: rows = code kinds (groups, joint), columns = models. Each panel shows P(label |
    codeword) for the codewords heatmap_columns picks, so a pure codeword is one bright cell."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nrows, ncols = len(panels), len(panels[0])
    height = 2.6 if label_kind == "instrument" else 3.2
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, height * nrows), squeeze=False,
                             constrained_layout=True)
    for r, row in enumerate(panels):
        for c, p in enumerate(row):
            ax = axes[r][c]
            table, cols = p["table"], p["columns"]
            shown = table[:, cols] / np.maximum(table[:, cols].sum(0, keepdims=True), 1)
            image = ax.imshow(shown, aspect="auto", interpolation="nearest", origin="lower", cmap="magma",
                              vmin=0, vmax=1)
            s = p["stats"]
            more = f", {len(cols)} most frequent shown" if len(cols) < s["codewords_used"] else ""
            ax.set_title(f"{p['model']}, {p['kind']}: NMI {s['nmi']:.3f} (adjusted {s['nmi_adjusted']:.3f}), "
                         f"purity {s['purity']:.2f}\n"
                         f"{s['codewords_used']} of {p['possible']} codewords used{more}", fontsize=8)
            ax.set_xticks([])
            if label_kind == "instrument":
                ax.set_yticks(range(len(label_values)))
                ax.set_yticklabels([NSYNTH_FAMILIES[v] for v in label_values], fontsize=6)
            else:
                ticks = [i for i, v in enumerate(label_values) if v % 12 == 0]
                ax.set_yticks(ticks)
                ax.set_yticklabels([f"C{label_values[i] // 12 - 1} ({label_values[i]})" for i in ticks], fontsize=6)
            if c == 0:
                ax.set_ylabel("MIDI pitch" if label_kind == "pitch" else "instrument family", fontsize=8)
            if r == nrows - 1:
                ax.set_xlabel("codewords, ordered by their most frequent label", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label=f"P({label_kind} | codeword)")
    save_figure(fig, path, dpi)
    plt.close(fig)


def codebook_main(args, log=print):
    if not os.path.isdir(args.data_root):
        raise SystemExit(f"error: --data-root {args.data_root}: no such folder; expected NSynth's layout "
                         f"(nsynth-{args.split}/examples.json and nsynth-{args.split}/audio/*.wav)")
    encoder, quantizer = load_codebook_model(args.model)
    models = [(model_label(args.model), encoder, quantizer)]
    if args.compare:
        models.append(("random init", *random_like(encoder, quantizer, args.seed)))
    for _, e, q in models:
        e.to(args.device)
        q.to(args.device)
    try:
        clips, pitch, family = read_notes(args.data_root, args.split, args.max_notes)
    except DataSetError as e:
        raise SystemExit(f"error: {e}") from None
    os.makedirs(args.out, exist_ok=True)
    log(f"codebook: {len(clips)} notes of nsynth-{args.split}, {len(models)} model(s), frames: {args.frames}"
        + (f" (within {args.active_db:g} dB of each note's loudest frame)" if args.frames == "active" else ""))
    try:
        codes, levels = note_codes(models, clips, args.batch_size, args.device, log)
    except AudioError as e:
        raise SystemExit(f"error: {e}") from None

    note_of_frame = np.concatenate([np.full(len(lv), i) for i, lv in enumerate(levels)])
    level = np.concatenate(levels)
    keep = level >= -args.active_db if args.frames == "active" else np.ones(len(level), dtype=bool)
    if not keep.any():
        raise SystemExit(f"error: no frame of the {len(clips)} notes is within {args.active_db:g} dB of its note's "
                         f"loudest frame (all silent?)")
    notes = note_of_frame[keep]
    label_of = {"pitch": pitch, "instrument": family}
    rng = np.random.default_rng(args.seed)
    shuffles = [rng.permutation(len(clips)) for _ in range(SHUFFLES)]

    groups, codewords = quantizer.groups, quantizer.codewords
    kinds = [f"group {g}" for g in range(groups)] + ["joint"]
    possible = {k: codewords for k in kinds[:-1]} | {"joint": codewords ** groups}
    result = {"command": " ".join(sys.argv), "data_root": args.data_root, "split": args.split, "notes": len(clips),
              "frames": {"rule": args.frames, "active_db": args.active_db if args.frames == "active" else None,
                         "counted": int(keep.sum()), "total": int(len(keep))},
              "nmi": "MI / ((H(label) + H(codeword)) / 2), nats; *_shuffled: mean over "
                     f"{SHUFFLES} permutations of the labels across notes (chance level); nmi_adjusted: (MI - "
                     "E[MI]) / ((H(label) + H(codeword)) / 2 - E[MI]), E over those permutations",
              "models": []}
    rows, codeword_rows = [], []
    panels = {label: [[None] * len(models) for _ in kinds] for label in LABELS}
    for m, (name, _, _) in enumerate(models):
        frame_codes = np.concatenate(codes[m])[keep]
        per_kind = {f"group {g}": frame_codes[:, g] for g in range(groups)}
        per_kind["joint"] = joint_codes(frame_codes, codewords)
        entry = {"name": name, "path": os.path.abspath(args.model) if m == 0 else None,
                 "random_init": m > 0, "seed": args.seed if m > 0 else None, "codes": {}}
        for r, kind in enumerate(kinds):
            c = per_kind[kind]
            entry["codes"][kind] = {"codewords_possible": possible[kind]}
            per_label = {}
            for label in LABELS:
                stats, table, label_values, code_values = label_statistics(label_of[label], notes, c, shuffles)
                entry["codes"][kind][label] = stats
                per_label[label] = (table, label_values, code_values)
                rows.append({"model": name, "codes": kind, "label": label, "codewords_possible": possible[kind],
                             **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in stats.items()}})
                panels[label][r][m] = {"model": name, "kind": kind, "table": table, "stats": stats,
                                       "possible": possible[kind], "label_values": label_values,
                                       "columns": heatmap_columns(table, args.max_columns)}
            # one row per codeword: how often it is used and how pure it is for each label
            code_values = per_label["pitch"][2]
            for j, code in enumerate(code_values):
                row = {"model": name, "codes": kind, "codeword": code_name(kind, code, codewords, groups)}
                for label in LABELS:
                    table, label_values, _ = per_label[label]
                    col = table[:, j]
                    top = int(col.argmax())
                    row["frames"] = int(col.sum())
                    row[f"dominant_{label}"] = (NSYNTH_FAMILIES[label_values[top]] if label == "instrument"
                                                else int(label_values[top]))
                    row[f"{label}_purity"] = round(float(col[top] / col.sum()), 6)
                codeword_rows.append(row)
        result["models"].append(entry)
        for kind in kinds:
            s = entry["codes"][kind]
            log(f"{name:>24s} {kind:>8s}: {s['pitch']['codewords_used']:6d} of {possible[kind]} codewords used; "
                + "; ".join(f"{label} NMI {s[label]['nmi']:.3f} (shuffled {s[label]['nmi_shuffled']:.3f}, adjusted "
                            f"{s[label]['nmi_adjusted']:.3f}), purity {s[label]['purity']:.3f}" for label in LABELS))

    write_json(os.path.join(args.out, "codebook.json"), result)
    columns = ["model", "codes", "label", "frames", "codewords_possible", "codewords_used", "code_perplexity", "nmi",
               "nmi_shuffled", "nmi_adjusted", "purity", "purity_shuffled", "mi_nats", "label_entropy_nats",
               "code_entropy_nats"]
    write_csv(os.path.join(args.out, "codebook.csv"), rows, columns)
    write_csv(os.path.join(args.out, "codebook_codewords.csv"), codeword_rows,
              ["model", "codes", "codeword", "frames", "dominant_pitch", "pitch_purity", "dominant_instrument",
               "instrument_purity"])
    for label in LABELS:
        plot_codebook(os.path.join(args.out, f"codebook_{label}.png"), label,
                      panels[label][0][0]["label_values"], panels[label], args.dpi)
    log(f"wrote {args.out}/codebook.json, codebook.csv, codebook_codewords.csv, codebook_pitch.png, "
        f"codebook_instrument.png")
    return result


# ------------------------------------------------------------------------------------------------------------------
# PWCCA

class JointCovariance:
    """Streaming mean and covariance of paired frames [x, y] in float64, accumulated around the first batch's mean
    (so that a large mean does not cancel the variance away)."""

    def __init__(self):
        self.n, self.shift, self.sum, self.outer = 0, None, None, None

    def add(self, x, y):
        z = torch.cat([x, y], 1).double()
        if self.shift is None:
            self.shift = z.mean(0)
            self.sum = torch.zeros_like(self.shift)
            self.outer = torch.zeros(len(self.shift), len(self.shift), dtype=torch.float64, device=z.device)
        z = z - self.shift
        self.n += len(z)
        self.sum += z.sum(0)
        self.outer += z.T @ z

    def covariance(self):
        mean = self.sum / self.n
        return self.outer / self.n - torch.outer(mean, mean)


def _kept_directions(cov, keep, tol):
    """Eigen-directions of one side kept for the CCA, largest variance first: those above tol x the largest
    eigenvalue (the numerical rank), and of those the fewest whose variance reaches `keep` of the total (SVCCA's
    SVD step; keep=1 keeps the whole rank). Returns (directions d x k, variances k)."""
    lam, vec = torch.linalg.eigh(cov)
    lam, vec = lam.flip(0), vec.flip(1)
    if not lam[0] > 0:
        raise ValueError("no variance: every frame has the same features")
    rank = int((lam > tol * lam[0]).sum())
    k = rank
    if keep < 1:
        share = lam[:rank].cumsum(0) / lam.clamp_min(0).sum()
        k = min(rank, int((share < keep - 1e-12).sum()) + 1)
    return vec[:, :k], lam[:k]


def pwcca_from_covariance(cov, dim_x, keep=0.99, tol=1e-10):
    """PWCCA of two sets of features from their joint covariance ((dim_x + dim_y) square, x first).

    1. Per side, keep the leading variance directions (_kept_directions) and whiten them: W = V_k diag(lam_k)^-1/2.
    2. CCA by SVD: the singular values of the whitened cross-covariance W_x' C_xy W_y are the canonical
       correlations rho_i (min(k_x, k_y) of them); the singular vectors give the canonical directions.
    3. Projection weighting (Morcos et al. 2018, eq. 2): on the side with fewer kept directions (x on a tie, as the
       reference), alpha_i = sum_j |<h_i, z_j>| over that side's features z_j (centred, as vectors over the frames),
       h_i its i-th canonical variate of unit norm; PWCCA = sum_i alpha_i rho_i / sum_i alpha_i. Up to a common
       factor, <h_i, z_j> is entry j of C_zz a_i = V_k diag(lam_k)^1/2 u_i, so the covariance is enough.
    The canonical correlations do not change under an invertible linear map of either side (at keep=1). PWCCA does
    not change under one of the side the weights are NOT taken from; on the weighted side only a permutation, sign
    flips and a common scale of its features leave it unchanged, since the weights are sums over those features.
    Returns {"pwcca", "mean_cca", "correlations", "weights", "weighted" ("x" | "y"), "kept_x", "kept_y"}."""
    cov = torch.as_tensor(cov, dtype=torch.float64)
    cxx, cyy, cxy = cov[:dim_x, :dim_x], cov[dim_x:, dim_x:], cov[:dim_x, dim_x:]
    vx, lx = _kept_directions(cxx, keep, tol)
    vy, ly = _kept_directions(cyy, keep, tol)
    u, rho, vt = torch.linalg.svd((vx / lx.sqrt()).T @ cxy @ (vy / ly.sqrt()), full_matrices=False)
    rho = rho.clamp(0.0, 1.0)
    if len(lx) <= len(ly):
        weighted, loadings = "x", (vx * lx.sqrt()) @ u
    else:
        weighted, loadings = "y", (vy * ly.sqrt()) @ vt.T
    alpha = loadings.abs().sum(0)
    alpha = alpha / alpha.sum()
    return {"pwcca": float((alpha * rho).sum()), "mean_cca": float(rho.mean()), "correlations": rho.numpy(),
            "weights": alpha.numpy(), "weighted": weighted, "kept_x": len(lx), "kept_y": len(ly)}


def pwcca(x, y, keep=0.99, tol=1e-10):
    """PWCCA between two feature matrices with one row per frame (frames x dim_x, frames x dim_y)."""
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"pwcca: {x.shape[0]} frames of x, {y.shape[0]} of y")
    acc = JointCovariance()
    acc.add(x, y)
    return pwcca_from_covariance(acc.covariance(), x.shape[1], keep, tol)


# ------------------------------------------------------------------------------------------------------------------
# layers

def conv_output(encoder, out, which):
    """The conv front end's output the layers are compared with: "norm" = its LayerNorm'ed features (the 512
    channels the quantiser and, through one linear map, the transformer read; HF's `extract_features`), "raw" = before
    that LayerNorm, "projected" = after the linear projection to the transformer's width."""
    conv = out.conv_features
    if which == "raw" or encoder.feature_norm is None and which == "norm":
        return conv
    normed = encoder.feature_norm(conv) if encoder.feature_norm is not None else conv
    return normed if which == "norm" else encoder.feature_proj(normed)


def middle_crops(clips, seconds, min_samples, rate=SAMPLE_RATE):
    """Per manifest clip, `seconds` from its middle (the whole clip when shorter), at the model's `rate`. The
    manifest's sample counts are 16 kHz ones (data/manifest.py's default); at another rate the header is read."""
    want = int(round(seconds * rate))
    for path, n in clips:
        n = n if rate == SAMPLE_RATE else audio_info(path, sr=rate)[0]
        yield load_audio(path, sr=rate, start=max(0, (n - want) // 2), frames=want, min_samples=min_samples)


def layer_similarity(encoder, clips, which, seconds, batch_size, device, keep, log=print):
    """PWCCA between the conv output and each of the layers+1 hidden states (0: the transformer's input) over the
    frames of the middle `seconds` of every clip: a list of pwcca_from_covariance results (with "frames")."""
    field, _ = receptive_field(encoder.cfg.conv_layers)
    accs = [JointCovariance() for _ in range(encoder.cfg.layers + 1)]
    dim_x = None
    crops = middle_crops(clips, seconds, field, encoder.cfg.sample_rate)
    done = 0
    while True:
        wavs = [w for _, w in zip(range(batch_size), crops)]
        if not wavs:
            break
        lengths = torch.tensor([len(w) for w in wavs])
        wav = torch.zeros(len(wavs), int(lengths.max()))
        for i, w in enumerate(wavs):
            wav[i, :len(w)] = torch.from_numpy(w)
        with torch.no_grad():
            out = encoder(wav.to(device), lengths.to(device))
            valid = ~out.padding_mask
            ref = conv_output(encoder, out, which)[valid]
            dim_x = ref.shape[1]
            for acc, h in zip(accs, out.hidden_states):
                acc.add(ref, h[valid])
        done += len(wavs)
        if done == len(clips) or (done // batch_size) % 20 == 0:
            log(f"  {done}/{len(clips)} clips")
    results = []
    for acc in accs:
        r = pwcca_from_covariance(acc.covariance().cpu(), dim_x, keep)
        r["frames"] = acc.n
        results.append(r)
    return results


def plot_layers(path, curves, which, keep, dpi):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.2, 3.4), constrained_layout=True)
    for label, values in curves:
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=label)
    ax.set_xlabel("transformer layer (0: its input)")
    ax.set_ylabel(f"PWCCA with the conv output ({which})")
    ax.set_title(f"Layer similarity to the conv front end (variance kept {keep:g})", fontsize=9)
    ax.set_ylim(top=min(1.0, ax.get_ylim()[1]) + 0.005)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi)
    plt.close(fig)


def layers_main(args, log=print):
    try:
        root, entries = read_manifest(args.manifest)
    except (OSError, ManifestError) as e:
        raise SystemExit(f"error: --manifest {one_line(e)}") from None
    if not entries:
        raise SystemExit(f"error: --manifest {args.manifest}: no clips")
    if args.max_clips and len(entries) > args.max_clips:
        keep = np.linspace(0, len(entries) - 1, args.max_clips).round().astype(int)
        entries = [entries[i] for i in keep]
    clips = [(os.path.join(root, rel), n) for rel, n in entries]
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.model):
        raise SystemExit(f"error: --labels has {len(labels)} names for {len(args.model)} models")
    real = [m for m in args.model if m != "random"]
    if not real:
        raise SystemExit("error: --model random needs another --model to take its architecture from")
    encoders = {m: load_encoder(m) for m in real}  # every path is checked before the first long forward pass
    os.makedirs(args.out, exist_ok=True)
    rows, curves = [], []
    for i, spec in enumerate(args.model):
        encoder = random_like(encoders[real[0]], None, args.seed)[0] if spec == "random" else encoders[spec]
        label = labels[i] if labels else ("random init" if spec == "random" else model_label(spec))
        log(f"layers: {label}: {len(clips)} clips, {args.seconds:g} s from the middle of each")
        try:
            results = layer_similarity(encoder.to(args.device), clips, args.conv, args.seconds, args.batch_size,
                                       args.device, args.keep, log)
        except AudioError as e:
            raise SystemExit(f"error: {e}") from None
        dims = max(encoder.cfg.dim, encoder.cfg.conv_layers[-1][0])
        if results[0]["frames"] < 10 * dims:
            log(f"  note: {results[0]['frames']} frames for {dims}-d features; CCA needs many more frames than "
                f"dimensions (10x is a rule of thumb), or the correlations come out too high")
        for layer, r in enumerate(results):
            rows.append({"model": label, "path": None if spec == "random" else os.path.abspath(spec), "layer": layer,
                         "pwcca": round(r["pwcca"], 6), "mean_cca": round(r["mean_cca"], 6), "frames": r["frames"],
                         "conv_dims_kept": r["kept_x"], "layer_dims_kept": r["kept_y"],
                         "weighted_side": "conv" if r["weighted"] == "x" else "layer"})
        curves.append((label, [r["pwcca"] for r in results]))
        log(f"  PWCCA by layer: " + " ".join(f"{v:.3f}" for v in curves[-1][1]))
    write_csv(os.path.join(args.out, "layers.csv"), rows, list(rows[0]))
    plot_layers(os.path.join(args.out, "layers.png"), curves, args.conv, args.keep, args.dpi)
    log(f"wrote {args.out}/layers.csv, layers.png")
    return rows


# ------------------------------------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__[
                                    __doc__.index("codebook:"):])
    sub = p.add_subparsers(dest="command", required=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    c = sub.add_parser("codebook", help="codeword co-occurrence with NSynth pitch and instrument (Figures 1-2)")
    c.add_argument("--model", required=True, help="a wav2vec 2.0 checkpoint with its quantiser: ours "
                   "(pretrain_wav2vec2.py) or a Hugging Face Wav2Vec2ForPreTraining folder")
    c.add_argument("--data-root", required=True, help="NSynth's folder (holding nsynth-<split>/examples.json and "
                   "audio/)")
    c.add_argument("--split", default="test", choices=("train", "valid", "test"))
    c.add_argument("--out", default="out/analyze", help="folder for the figures and tables")
    c.add_argument("--compare", action="store_true", help="also a random-init model of the same architecture")
    c.add_argument("--frames", default="active", choices=("active", "all"),
                   help="active: only frames within --active-db of their note's loudest frame (NSynth notes end "
                        "in a release and often silence); all: every frame")
    c.add_argument("--active-db", type=float, default=40.0)
    c.add_argument("--max-notes", type=int, default=None, help="at most this many notes, spread over the split")
    c.add_argument("--max-columns", type=int, default=500, help="codewords shown per heat map (the most frequent)")
    c.add_argument("--seed", type=int, default=0, help="of the random-init model and the label shuffles")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--device", default=device)
    c.add_argument("--dpi", type=int, default=100)

    l = sub.add_parser("layers", help="PWCCA of every transformer layer with the conv output (Figure 3)")
    l.add_argument("--model", required=True, nargs="+", help="checkpoints or Hugging Face folders (any objective), "
                   "one line each; 'random': a random init of the first one's architecture")
    l.add_argument("--manifest", required=True, help="fairseq .tsv manifest (root line, then path<TAB>samples)")
    l.add_argument("--labels", default=None, help="comma-separated legend names, one per --model")
    l.add_argument("--out", default="out/analyze")
    l.add_argument("--seconds", type=float, default=4.0, help="taken from the middle of each clip")
    l.add_argument("--conv", default="norm", choices=("norm", "raw", "projected"),
                   help="the conv output compared with: LayerNorm'ed (default), raw, or projected to the "
                        "transformer's width")
    l.add_argument("--keep", type=float, default=0.99, help="variance share kept per side before the CCA (1: all)")
    l.add_argument("--max-clips", type=int, default=None)
    l.add_argument("--seed", type=int, default=0, help="of --model random")
    l.add_argument("--batch-size", type=int, default=8)
    l.add_argument("--device", default=device)
    l.add_argument("--dpi", type=int, default=100)
    args = p.parse_args(argv)
    if args.command == "codebook" and args.active_db <= 0:
        p.error("--active-db must be > 0")
    if args.command == "layers" and not 0 < args.keep <= 1:
        p.error("--keep must be in (0, 1]")
    return args


def main(argv=None):
    args = parse_args(argv)
    with torch.no_grad():
        return codebook_main(args) if args.command == "codebook" else layers_main(args)


if __name__ == "__main__":
    main()
