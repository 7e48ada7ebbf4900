"""The Table-1 report: layout and values from results lines (tasks in the paper's order, each with the metrics it
names, seeds as mean ± sd, the last line of a re-run winning), the CSV and the layer-weight plot; `--task all` on
fixtures in the conventional folders (skipping the missing data sets with one line each) and `probe.py report`
putting two models side by side."""
import csv
import json

import numpy as np
import pytest

import probe
from model import Encoder
from probing import models, tasks
import probing.report as probe_report
from test_probe import write_nsynth
from test_probe_beat import make_beat_folder, make_gtzan
from test_probe_gs import write_giantsteps
from test_probe_mtg import write_mtg


def rec(task, metrics, model="ckpt.pt", tag="ckpt_pt-0123456789", seed=1234, table=None, states=13, layers="all"):
    w = np.random.default_rng(abs(hash((task, seed))) % 2 ** 32).random(states)
    r = dict(task=task, model=model, model_tag=tag, seed=seed, metrics=metrics, layers=layers,
             layer_weights=list(w / w.sum()))
    if table is not None:
        r["table"] = table
    return r


def test_table1_layout_and_values():
    records = [
        rec("nsynth_pitch", {"acc": 0.774}),
        rec("emo", {"r2": 0.5, "arousal_r2": 0.665, "valence_r2": 0.421}, table=["valence_r2", "arousal_r2"]),
        rec("mtt", {"roc_auc": 0.9, "ap": 0.3}),  # superseded by the re-run below
        rec("gs_key", {"weighted": 0.147, "acc": 0.1, "clip_acc": 0.1}, table=["weighted"]),
        # a task that names its own metrics and columns (the beat tasks: MARBLE's F at 70 ms, the headline, and the
        # field's per-track F with its 5 s trim)
        rec("gtzan_beat", {"f_70ms": 0.886, "f_20ms": 0.5, "track_f_70ms": 0.85, "track_f_20ms": 0.45},
            table=["f_70ms", "track_f_70ms"]),
        rec("new_task", {"score": 0.25}),  # not in the paper: after the paper's columns
        rec("mtt", {"roc_auc": 0.902, "ap": 0.377}),
        rec("nsynth_pitch", {"acc": 0.2}, model="random", tag="random-abcd1234-seed1", seed=1),
        rec("nsynth_pitch", {"acc": 0.3}, model="random", tag="random-abcd1234-seed2", seed=2),
    ]
    text = probe_report.table1(records)
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == ["Dataset", "MTT", "", "GS", "EMO", "", "NSynthP", "GTZANBT", "", "new_task"]
    assert lines[2] == ["Metrics", "ROC", "AP", "AccW", "R2V", "R2A", "Acc", "F70", "F70/track", "score"]
    assert lines[3] == ["ckpt.pt", "90.2", "37.7", "14.7", "42.1", "66.5", "77.4", "88.6", "85.0", "25.0"]
    # two seeds of one random architecture are one row: mean ± sd (x 100)
    assert lines[4][0] == "random" and lines[4][6] == f"25.0 ± {100 * np.std([0.2, 0.3], ddof=1):.1f}"
    assert lines[4][1] == "-" and "mean ± sd over seeds" in text


def test_csv_and_plot(tmp_path):
    records = [rec("mtt", {"roc_auc": 0.9, "ap": 0.3}), rec("gs_key", {"weighted": 0.5}, table=["weighted"]),
               rec("mtt", {"roc_auc": 0.8, "ap": 0.2}, seed=7), rec("beat", {"f_70ms": 0.7}, layers=5)]
    probe_report.write_csv(tmp_path / "t.csv", records)
    rows = list(csv.reader(open(tmp_path / "t.csv")))
    assert rows[0] == ["model", "model_tag", "seed", "mtt/roc_auc", "mtt/ap", "gs_key/weighted", "beat/f_70ms"]
    assert rows[1][2:] == ["1234", "0.9", "0.3", "0.5", "0.7"] and rows[2][2:] == ["7", "0.8", "0.2", "", ""]
    png = probe_report.plot_layer_weights(records, str(tmp_path / "w.png"), "ckpt")
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_task_all_and_report(tmp_path, capsys):
    """--task all over a root holding three of the conventional folders: the others are skipped with one line each
    (what is missing, where), the rest run, the table is printed and written with the plot to runs/<model tag>/;
    `report` then puts a second model's results beside the first."""
    root = tmp_path / "data"
    write_nsynth(root / "nsynth", per_split=(8, 4, 4))
    write_giantsteps(root / "giantsteps", seconds=3.5)
    write_mtg(root / "mtg")
    (root / "mtt").mkdir()  # a folder without the data set's files
    runs = tmp_path / "runs"
    common = ["--model-config", "tiny", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--epochs", "3",
              "--window", "3"]
    records = probe.main(["--task", "all", "--model", "random", "--data-root", str(root),
                          "--results", str(runs / "probe_results.jsonl")] + common)
    out = capsys.readouterr().out
    skips = {line.split(":")[0][len("skip "):]: line for line in out.splitlines() if line.startswith("skip ")}
    ran = {t for t, _, _ in records}
    assert ran == {"nsynth_instr", "nsynth_pitch", "gs_key", "mtg_instrument", "mtg_moodtheme", "mtg_genre",
                   "mtg_top50"}
    assert set(skips) == set(tasks.TASKS) - ran  # one line for each task not run
    assert skips["gtzan_genre"] == f"skip gtzan_genre: {root / 'gtzan'}: no such folder"
    assert "annotations_final.csv: not found" in skips["mtt"]  # the folder is there, the data set is not
    tag = records["gs_key", "random", probe.SEED]["model_tag"]
    folder = runs / probe_report.row_key(records["gs_key", "random", probe.SEED])
    table = (folder / "table.md").read_text()
    assert table in out  # the printed table is the written one
    assert table.splitlines()[0].split("|")[1:-1][1].strip() == "GS"  # Table-1 order: GS, NSynthI, ..., MTG
    assert "| MTGTop50" in table.splitlines()[0] and "MTT" not in table.splitlines()[0]
    rows = list(csv.reader(open(folder / "table.csv")))
    assert rows[1][:3] == ["random", tag, str(probe.SEED)]
    assert float(rows[1][rows[0].index("gs_key/weighted")]) == records["gs_key", "random", probe.SEED]["metrics"][
        "weighted"]
    assert (folder / "layer_weights.png").stat().st_size > 5000

    # a second model (one of our checkpoints) on one task, in its own results file; then the report of both
    from dataclasses import asdict
    import torch
    enc = Encoder(models.MODEL_CONFIGS["tiny"]())
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"encoder_config": asdict(enc.cfg), "encoder": enc.state_dict()}, ckpt)
    other = tmp_path / "other.jsonl"
    probe.main(["--task", "nsynth_pitch", "--model", str(ckpt), "--data-root", str(root / "nsynth"), "--results",
                str(other)] + common)
    capsys.readouterr()
    probe.main(["report", str(runs / "probe_results.jsonl"), str(other), "--out", str(tmp_path / "cmp")])
    printed = capsys.readouterr().out
    lines = [line for line in (tmp_path / "cmp" / "table.md").read_text().splitlines() if line.startswith("|")]
    assert lines[3].split("|")[1].strip() == "random" and lines[4].split("|")[1].strip() == str(ckpt)
    header = [c.strip() for c in lines[2].split("|")[1:-1]]
    pitch = header.index("Acc", header.index("Acc") + 1)  # NSynthI then NSynthP
    mine = json.loads(other.read_text().splitlines()[-1])["metrics"]["acc"]
    assert lines[4].split("|")[pitch + 1].strip() == f"{100 * mine:.1f}"
    assert lines[4].count(" - ") >= 8  # the checkpoint ran one task only
    assert "wrote" in printed and len(list((tmp_path / "cmp").rglob("layer_weights.png"))) == 2
    with pytest.raises(SystemExit, match="not a JSON line"):
        (tmp_path / "bad.jsonl").write_text('{"task": "mtt"\n')
        probe.main(["report", str(tmp_path / "bad.jsonl")])


def test_task_all_shows_the_beat_columns(tmp_path, capsys):
    """--task all over ROOT/gtzan (GTZAN audio + GTZAN-Rhythm JAMS: the genre and the beat task) and ROOT/beat (a
    .beats folder): the beat tasks declare their Table-1 columns (probing.frames.BEAT_TABLE), so the printed table and
    the CSV show MARBLE's F at 70 ms (the headline) and the per-track F, not the 20 ms figures, in the paper's order."""
    root = tmp_path / "data"
    make_gtzan(root / "gtzan", 2, seconds=4.0)
    make_beat_folder(root / "beat", 8, seconds=4.0)
    runs = tmp_path / "runs"
    records = probe.main(["--task", "all", "--model", "random", "--model-config", "tiny", "--data-root", str(root),
                          "--max-clips", "2", "--epochs", "1", "--cache-dir", str(tmp_path / "cache"), "--device",
                          "cpu", "--results", str(runs / "probe_results.jsonl")])
    out = capsys.readouterr().out
    assert {t for t, _, _ in records} == {"gtzan_genre", "gtzan_beat", "beat"}
    beat = {t: records[t, "random", probe.SEED] for t in ("gtzan_beat", "beat")}
    for r in beat.values():
        assert r["table"] == list(tasks.TASKS[r["task"]].table) == ["f_70ms", "track_f_70ms"]
        assert r["headline"] == "f_70ms" and set(r["metrics"]) == {"f_70ms", "f_20ms", "track_f_70ms",
                                                                  "track_f_20ms"}
    folder = runs / probe_report.row_key(beat["beat"])
    table = (folder / "table.md").read_text()
    assert table in out
    lines = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
             if line.startswith("|") and not line.startswith("|-")]
    assert lines[0] == ["Dataset", "GTZAN", "GTZANBT", "", "Beat", ""]
    assert lines[1] == ["Metrics", "Acc", "F70", "F70/track", "F70", "F70/track"]
    assert lines[2][2:] == [f"{100 * beat[t]['metrics'][m]:.1f}" for t in ("gtzan_beat", "beat")
                            for m in ("f_70ms", "track_f_70ms")]
    rows = list(csv.reader(open(folder / "table.csv")))
    assert rows[0][3:] == ["gtzan_genre/acc", "gtzan_beat/f_70ms", "gtzan_beat/track_f_70ms", "beat/f_70ms",
                           "beat/track_f_70ms"]
