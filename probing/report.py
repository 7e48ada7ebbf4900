"""Tables and plots from probe.py's results lines: the paper's Table 1 (models x task metrics), a CSV of the same,
and a heat map per model of the learned layer weights (tasks x hidden states).

    python probe.py report runs/probe_results.jsonl other/probe_results.jsonl --out runs/compare

Everything here reads the JSON lines that runs append (one per task, model and seed), so nothing is re-run. A task
names the metrics it shows in the table (the `table` field of its line, else all its metrics), so a task added later
needs no change here. Runs append: of several lines for the same (model, task, seed), the last one counts.
"""
import argparse
import csv
import json
import os
import re
import sys

import numpy as np

from probing.tasks import TABLE_NAMES, TABLE_ORDER  # the paper's Table 1, left to right, and its column names

METRIC_NAMES = dict(roc_auc="ROC", ap="AP", acc="Acc", weighted="AccW", r2="R2", valence_r2="R2V",
                    arousal_r2="R2A", f_70ms="F70", f_20ms="F20", track_f_70ms="F70/track",
                    track_f_20ms="F20/track")


def load_results(paths):
    """The records of JSON-lines files, in order; a line that is not a results record stops with file:line."""
    records = []
    for path in paths:
        try:
            f = open(path)
        except OSError as e:
            sys.exit(f"{path}: cannot read results ({e.strerror})")
        with f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"{path}:{line_no}: not a JSON line ({e.msg}); expected probe.py's results lines")
                if isinstance(r, dict) and "failed" in r:  # a task that stopped (--task all): nothing to tabulate
                    continue
                if not isinstance(r, dict) or not {"task", "model", "model_tag", "metrics"} <= set(r):
                    sys.exit(f"{path}:{line_no}: not a probe.py results record (needs task, model, model_tag, "
                             "metrics)")
                records.append(r)
    return records


def row_key(r):
    """One table row per model and evaluation mode: its tag, without the seed of a random encoder (seeds of one
    architecture are one row, averaged), with the mode of a fine-tuning run (probe.py --mode fe|ft1|ft2)."""
    tag = re.sub(r"-seed-?\d+$", "", r["model_tag"])
    return tag if r.get("mode", "frozen") == "frozen" else f"{tag}-{r['mode']}"


def model_label(r):
    """The --model given, with the mode of a fine-tuning run: `out/ckpt.pt [ft2]`."""
    return r["model"] if r.get("mode", "frozen") == "frozen" else f"{r['model']} [{r['mode']}]"


def latest(records):
    """{row key: {task: {seed: record}}} keeping the last line of each (row, task, seed), rows in first-seen order."""
    rows = {}
    for r in records:
        rows.setdefault(row_key(r), {}).setdefault(r["task"], {})[r.get("seed")] = r
    return rows


def row_labels(records):
    """{row key: label}: the --model given, with the tag where two rows would read the same."""
    first = {}
    for r in records:
        first.setdefault(row_key(r), model_label(r))
    counts = {}
    for label in first.values():
        counts[label] = counts.get(label, 0) + 1
    return {k: label if counts[label] == 1 else f"{label} ({k})" for k, label in first.items()}


def columns(records):
    """[(task, metric)] in Table-1 order."""
    shown = {}
    for r in records:
        shown.setdefault(r["task"], [m for m in (r.get("table") or r["metrics"]) if m in r["metrics"]])
    order = [t for t in TABLE_ORDER if t in shown] + [t for t in shown if t not in TABLE_ORDER]
    return [(t, m) for t in order for m in shown[t]]


def _cell(values):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"


def table1(records):
    """The paper's Table 1 as aligned markdown: a Dataset row (task names), a Metrics row, then one row per model;
    values x 100 (accuracy, ROC-AUC, AP, R2, F as in the paper), mean ± sd where several seeds ran."""
    cols = columns(records)
    rows, labels = latest(records), row_labels(records)
    header = ["Dataset"] + [TABLE_NAMES.get(t, t) if i == 0 or cols[i - 1][0] != t else "" for i, (t, _) in
                            enumerate(cols)]
    lines = [header, ["Metrics"] + [METRIC_NAMES.get(m, m) for _, m in cols]]
    for key, tasks in rows.items():
        lines.append([labels[key]] + [_cell([r["metrics"][m] for r in tasks.get(t, {}).values()
                                             if r["metrics"].get(m) is not None]) for t, m in cols])
    width = [max(len(line[i]) for line in lines) for i in range(len(header))]
    fmt = lambda line: "| " + " | ".join(c.ljust(w) for c, w in zip(line, width)) + " |"
    out = [fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in width) + "|"] + [fmt(line) for line in lines[1:]]
    seeds = any(len(runs) > 1 for tasks in rows.values() for runs in tasks.values())
    note = "values x 100" + ("; mean ± sd over seeds" if seeds else "")
    return "\n".join(out) + f"\n\n{note}\n"


def write_csv(path, records):
    """One row per (model, seed): model, model_tag, seed, then <task>/<metric> as the runs wrote them (fractions)."""
    cols = columns(records)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "model_tag", "seed"] + [f"{t}/{m}" for t, m in cols])
        for key, tasks in latest(records).items():
            for seed in sorted({s for runs in tasks.values() for s in runs}, key=str):
                first = next(runs[seed] for runs in tasks.values() if seed in runs)
                w.writerow([model_label(first), first["model_tag"], seed] + [
                    tasks.get(t, {}).get(seed, {}).get("metrics", {}).get(m, "") for t, m in cols])


def plot_layer_weights(records, path, title):
    """A heat map of one model's learned layer weights: a row per task (the chosen head's softmax weights over the
    hidden states, averaged over seeds; a single-state head is one-hot), a column per state."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    tasks = {}
    for r in records:
        if r.get("layer_weights"):
            tasks.setdefault(r["task"], []).append(r)
    order = [t for t in TABLE_ORDER if t in tasks] + [t for t in tasks if t not in TABLE_ORDER]
    if not order:
        return None
    states = max(len(r["layer_weights"]) for rs in tasks.values() for r in rs)
    w = np.full((len(order), states), np.nan)
    labels = []
    for i, t in enumerate(order):
        rs = tasks[t]
        w[i, :len(rs[0]["layer_weights"])] = np.mean([r["layer_weights"] for r in rs], axis=0)
        choice = {str(r.get("layers")) for r in rs}
        labels.append(f"{TABLE_NAMES.get(t, t)} ({', '.join(sorted(choice))})")
    label_in = 0.09 * max(len(s) for s in labels)  # room for the task names on the left
    fig, ax = plt.subplots(figsize=(max(6.0, label_in + 1.8 + 0.55 * states), 1.6 + 0.42 * len(order)))
    mixed = [i for i, t in enumerate(order) if any(str(r.get("layers")) in ("all", "transformer") for r in tasks[t])]
    top = float(np.nanmax(w[mixed])) if mixed else 1.0  # the colours spread the weighted heads; one-hot rows saturate
    im = ax.imshow(w, cmap="viridis", vmin=0, vmax=max(0.2, top), aspect="auto")
    for i in range(len(order)):
        for j in range(states):
            if np.isfinite(w[i, j]):
                ax.text(j, i, f"{w[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if w[i, j] > 0.6 * im.get_clim()[1] else "white")
    ax.set_xticks(range(states), [str(j) for j in range(states)])
    ax.set_yticks(range(len(order)), labels)
    ax.set_xlabel("hidden state (0: the transformer's input; 1..: its layers)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03, label="weight")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_model_files(folder, records, log=print):
    """<folder>/<model tag>/{table.md, table.csv, layer_weights.png} for each model row in `records`."""
    labels = row_labels(records)
    written = []
    for key in latest(records):
        mine = [r for r in records if row_key(r) == key]
        out = os.path.join(folder, key)
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "table.md"), "w") as f:
            f.write(table1(mine))
        write_csv(os.path.join(out, "table.csv"), mine)
        png = plot_layer_weights(mine, os.path.join(out, "layer_weights.png"), f"{labels[key]}: layer weights")
        written.append(out)
        log(f"wrote {out}/table.md, table.csv" + (", layer_weights.png" if png else ""))
    return written


def side_by_side(records, tasks, models, seeds, metrics):
    """The comparison a multi-model or multi-seed run prints: a row per (task, metric), a column per model,
    mean ± sd over seeds when there are several."""
    many = len(seeds) > 1
    cells = {}
    for (task_name, spec, _), r in records.items():
        for metric, value in r["metrics"].items():
            cells.setdefault((task_name, metric, spec), []).append(value)
    cell = lambda v: f"{np.mean(v):.4f} ± {np.std(v, ddof=1):.4f}" if many else f"{v[0]:.4f}"
    width = max(max(len(m) for m in models), 17 if many else 6) + 2
    lines = [""]
    if many:
        lines.append("mean ± sd over seeds " + ",".join(map(str, seeds)))
    lines.append("task".ljust(16) + "metric".ljust(12) + "".join(m.rjust(width) for m in models))
    for task_name in tasks:
        for metric in metrics[task_name]:
            if all((task_name, metric, m) in cells for m in models):
                lines.append(task_name.ljust(16) + metric.ljust(12) + "".join(
                    cell(cells[task_name, metric, m]).rjust(width) for m in models))
    return "\n".join(lines)


def report_main(argv):
    p = argparse.ArgumentParser(prog="probe.py report", description="Put the results lines of several runs (and "
                                "models) side by side in the layout of the paper's Table 1, without re-running.")
    p.add_argument("results", nargs="+", help="results files written by probe.py --results (JSON lines)")
    p.add_argument("--out", default=None, metavar="DIR", help="also write DIR/table.md, DIR/table.csv and "
                   "DIR/<model tag>/layer_weights.png")
    args = p.parse_args(argv)
    records = load_results(args.results)
    if not records:
        sys.exit(f"{', '.join(args.results)}: no results lines")
    text = table1(records)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(text)
        write_csv(os.path.join(args.out, "table.csv"), records)
        labels = row_labels(records)
        for key in latest(records):
            plot_layer_weights([r for r in records if row_key(r) == key],
                               os.path.join(args.out, key, "layer_weights.png"), f"{labels[key]}: layer weights")
        print(f"wrote {args.out}/table.md, table.csv and a layer_weights.png per model")
    return text
