"""Probe a frozen encoder on MIR tasks, following the MARBLE v1 protocol behind the Music2Vec / MusicHuBERT papers.

    python probe.py --task nsynth_pitch --model out/ckpt.pt --data-root ~/data/nsynth
    python probe.py --task gtzan_genre --model facebook-hubert-base-ls960/ --data-root ~/data/gtzan --sweep
    python probe.py --task nsynth_pitch,nsynth_instr --model out/ckpt.pt random --data-root synth/nsynth
    python probe.py --task emo --model out/ckpt.pt --data-root ~/data/emo --save-heads heads/
    python probe.py predict --heads heads/ --model out/ckpt.pt song.mp3 other.wav
    python probe.py --task all --model out/ckpt.pt --data-root ~/data          # every data set found; Table 1
    python probe.py report runs/probe_results.jsonl other/probe_results.jsonl --out runs/compare
    python probe.py --task nsynth_pitch --mode ft2 --model out/ckpt.pt --data-root ~/data/nsynth   # probing/finetune.py

1. Extract (probing/features.py): every clip is z-normalised once, cut into the task's windows, run through the frozen
   encoder, and each of the layers+1 hidden states is mean-pooled per window. The rows go into a memory-mapped
   float16 feature store per (data set, model, extraction settings) that later runs reuse; an interrupted
   extraction resumes where it stopped.
2. Train (probing/clips.py; heads: probing/heads.py): a softmax-weighted sum of the hidden states into an MLP (512 hidden units, dropout
   0.2), Adam, batches of 64 clips (all windows of each), ReduceLROnPlateau, early stopping on the validation metric;
   the best-validation weights are tested. At evaluation the logits of a clip's windows are averaged (as MARBLE).
3. --sweep trains the benchmark's whole grid (6 lrs x {weighted, each state}) as one set of heads, one batched matmul
   per layer group, and reports the test score of the validation-best cell.
The beat tasks take the frame-level path beside this one (probing/frames.py): 50 Hz frame rows, the same heads applied
per frame, madmom's DBN. One JSON line per (task, model) is appended to --results, and a readable line is printed.
--save-heads keeps the chosen head; `probe.py predict` applies saved heads to new audio. `--task all` runs every task
whose data set is in its folder under --data-root and ends with the paper's Table 1 and a layer-weight plot per
model; `probe.py report` builds that table from results lines (probing/report.py). Metrics: probing/metrics.py.
Every task (reader, windows, metrics, Table-1 columns) is defined in probing/tasks.py. This file is the command line;
what it runs lives in the probing/ package, which never imports it. Reference: docs/probe.md.
"""
import argparse
import datetime
import os
import sys

import torch

from model import EncoderConfig
from probing import clips, finetune, frames, predict, report, runs
from probing.clips import BATCH_SIZE
from probing.features import default_workers
from probing.models import MODEL_CONFIGS, load_model
from probing.runs import SWEEP_LRS, append_record, task_extraction
from probing.tasks import TASKS, available_tasks, task_data, task_root

# ------------------------------------------------------------------------------------------------------------------
# defaults (MARBLE v1: benchmark/tasks/*/*_base_config.yaml and the MARBLE paper, Appendix A)
# defaults (MARBLE v1: benchmark/tasks/*/*_base_config.yaml and the MARBLE paper, Appendix A)
SEED = 1234  # MARBLE's pl.seed_everything
RESULTS = "runs/probe_results.jsonl"
CACHE_DIR = "runs/probe_features"


def run(task_name, model_spec, encoder, tag, args, log=print):
    """One (task, model, seed) run: the task's listing, then the path that scores it (clip-level, frames, or
    fine-tuning); returns the results record."""
    task, listing = task_data(task_name, args.data_root, args.max_clips, log)
    if task.kind == "beat":  # frame features, beat decoding: probing/frames.py
        return frames.run(task_name, task, listing, model_spec, encoder, tag, args, log)
    if args.mode != "frozen":  # the wav2vec 2.0 paper's fe / ft1 / ft2: probing/finetune.py
        return finetune.run(task_name, task, listing, task_extraction(task, args, encoder.cfg.sample_rate), model_spec, encoder, tag, args,
                            log)
    return clips.run(task_name, task, listing, model_spec, encoder, tag, args, log)


def start_ranks(args):
    """Under torchrun (WORLD_SIZE > 1): joins the ranks' process group (gloo: the ranks only exchange what they
    extracted, never tensors) and puts each rank on its node's GPU LOCAL_RANK; returns this process's rank. The
    timeout is long because the other ranks wait for rank 0 while it trains a task's heads."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0
    if args.mode != "frozen":
        sys.exit(f"--mode {args.mode} under torchrun: fine-tuning runs in one process; torchrun shards the frozen "
                 "probe's extraction")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    if args.device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        args.device = f"cuda:{local}"
        torch.cuda.set_device(local)
    return torch.distributed.get_rank()


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="python probe.py predict --help: apply saved heads to audio files; "
                                       "python probe.py report --help: tabulate results lines")
    p.add_argument("--task", required=True, help=f"comma-separated, from: {', '.join(TASKS)}; or 'all': every "
                   "task whose data set is found under --data-root in its conventional folder (docs/probe.md)")
    p.add_argument("--model", required=True, nargs="+",
                   help="our checkpoint (.pt), a Hugging Face model folder, or 'random'; several are run in turn "
                        "and printed side by side")
    p.add_argument("--data-root", required=True, help="the folder the task's data set was unpacked into; with "
                   "--task all, the folder holding the data set folders (nsynth/, gtzan/, ...)")
    p.add_argument("--model-config", default=None, choices=sorted(MODEL_CONFIGS),
                   help="architecture of --model random (default: that of the first other --model, else "
                        "hubert_base)")
    p.add_argument("--layers", default="all",
                   help="'all' (layers+1 states, the paper), 'transformer' (the layers, MARBLE's code) or one index; "
                        "with --sweep, which weighted cell the grid has; for the beat tasks one index also stores "
                        "that state only (1/(layers+1) of the disk)")
    p.add_argument("--lr", type=float, default=None, help="default: the task's (1e-3; GTZAN 5e-3)")
    p.add_argument("--sweep", action="store_true",
                   help=f"the benchmark grid: lr in {SWEEP_LRS} x layers in {{--layers, 0..layers}}, all at once")
    p.add_argument("--epochs", type=int, default=None, help="max epochs (default: the task's)")
    p.add_argument("--window", type=float, default=None, help="window seconds (default: the task's; EMO 5)")
    p.add_argument("--crop", type=float, default=None,
                   help="use only the first CROP seconds of each clip, 0 for all (default: the task's; EMO 30)")
    p.add_argument("--no-normalize", action="store_true",
                   help="feed the audio as it is, not z-normalised per clip (MARBLE's protocol and MERT's "
                        "preprocessor normalise; MERT was trained on unnormalised audio); changes the cache key")
    p.add_argument("--max-clips", type=int, default=None, help="at most this many clips per split (quick runs)")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help="clips per training step, with all their windows (MARBLE: 64)")
    p.add_argument("--seed", default=str(SEED),
                   help="seed of the head's init and batches and of --model random's init; a comma-separated list "
                        "runs each seed (a new random encoder each) and prints mean ± sd over them")
    p.add_argument("--save-heads", default=None, metavar="DIR",
                   help="write the chosen head of each task (with --sweep the grid's best) to DIR/<task>.pt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-seconds", type=float, default=None,
                   help="audio seconds per extraction batch (default 240 on GPU, 60 on CPU); with --mode fe/ft1/ft2 "
                        "the padded audio per forward/backward piece of a batch (default 128 on GPU, 32 on CPU)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes decoding audio ahead of the encoder, per rank (default: the CPUs of the node "
                        "divided by torchrun's ranks on it; 0: 4 threads of the probe's own process)")
    p.add_argument("--cache-dir", default=CACHE_DIR)
    p.add_argument("--results", default=RESULTS, help="JSON lines appended per run; with --task all, the "
                   "Table-1 files go to <its folder>/<model tag>/ (default runs/)")
    finetune.add_arguments(p)  # --mode, --encoder-lr, --save-model
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    args.all = args.tasks == ["all"]
    if args.all:
        args.tasks = list(TASKS)
    try:
        args.seeds = [int(v) for v in args.seed.split(",") if v.strip()]
    except ValueError:
        p.error(f"--seed {args.seed!r}: expected an integer or a comma-separated list of them")
    if not args.seeds or len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seed {args.seed!r}: expected distinct integers")
    args.seed = args.seeds[0]
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        p.error(f"unknown task {unknown[0]!r}; tasks: {', '.join(TASKS)}")
    if args.layers not in ("all", "transformer") and not args.layers.isdigit():
        p.error(f"--layers {args.layers!r}: expected all, transformer or a state index")
    if args.sweep and args.layers not in ("all", "transformer"):
        p.error("--sweep trains every single state itself; --layers picks its weighted cell: all or transformer")
    if args.save_heads and (len(args.model) > 1 or len(args.seeds) > 1):
        p.error("--save-heads keeps one model's heads: give one --model and one --seed")
    if (args.window is not None and not args.window > 0) or (args.crop is not None and args.crop < 0):
        p.error("--window must be positive seconds, --crop 0 (none) or positive seconds")
    finetune.check_args(p, args, TASKS)  # before the frozen probe's default --batch-seconds
    if args.workers is None:
        args.workers = default_workers()
    elif args.workers < 0:
        p.error("--workers must be 0 (threads) or a number of processes")
    if args.batch_seconds is None:
        args.batch_seconds = 240.0 if args.device.startswith("cuda") else 60.0
    return args


def main(argv=None):
    """Runs every (model, seed, task); returns {(task, model, seed): record}. `predict ...` applies saved heads,
    `report ...` tabulates results lines (report.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["predict"]:
        return predict.predict_main(argv[1:])
    if argv[:1] == ["report"]:
        return report.report_main(argv[1:])
    args = parse_args(argv)
    rank = start_ranks(args)
    log = print if rank == 0 else (lambda *a, **k: None)  # rank 0 speaks for the run; the others show their bars
    roots = {t: args.data_root for t in args.tasks}
    if args.all:  # each data set in its own folder under ROOT; the missing ones are skipped with one line each
        args.tasks = available_tasks(args.tasks, args.data_root, args.max_clips)
        if not args.tasks:
            sys.exit(f"--task all: no data set found under {args.data_root} (folders: docs/probe.md, 'All "
                     "tasks')")
        roots = {t: task_root(t, args.data_root) for t in args.tasks}
    others = [m for m in args.model if m != "random"]
    records = {}
    failed = []  # (task, model, seed) of each task that stopped
    random_cfg = None
    for spec in args.model:
        if spec == "random" and random_cfg is None:
            if args.model_config:
                random_cfg = MODEL_CONFIGS[args.model_config]()
            elif others:  # the same architecture as the model it is compared with
                random_cfg = load_model(others[0], None, args.seed)[0].cfg
            else:
                random_cfg = EncoderConfig.hubert_base()
        encoder = None
        for seed in args.seeds:
            if encoder is None or spec == "random":  # a random encoder is drawn anew for each seed
                encoder, tag = load_model(spec, random_cfg, seed)
            for task_name in args.tasks:
                try:
                    records[task_name, spec, seed] = run(task_name, spec, encoder, tag, argparse.Namespace(
                        **{**vars(args), "seed": seed, "data_root": roots[task_name]}), log)
                except runs.OtherRank:  # this rank's share is in the store; rank 0 trains and reports
                    continue
                except (Exception, SystemExit) as e:  # one line and a record; the other tasks still run
                    if not args.all and len(args.tasks) == 1:
                        raise
                    if rank != 0:  # rank 0 records it
                        continue
                    reason = (str(e.code) if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}")
                    reason = " ".join(reason.split()) or type(e).__name__
                    print(f"{task_name}  {spec}  FAILED: {reason}", flush=True)
                    append_record({"task": task_name, "model": spec, "model_tag": tag, "seed": seed,
                                   "failed": reason}, args.results)
                    failed.append((task_name, spec, seed))
        del encoder
    if rank != 0:
        return records
    if args.all:  # the paper's Table 1: printed, and per model in <results folder>/<model tag>/ with the plot
        print("\n" + report.table1(list(records.values())))
        report.write_model_files(os.path.dirname(os.path.abspath(args.results)), list(records.values()))
    elif len(args.model) > 1 or len(args.seeds) > 1:  # one row per task, one column per model
        print(report.side_by_side(records, args.tasks, args.model, args.seeds,
                                        {t: TASKS[t].metrics for t in args.tasks}))
    if failed:
        print(f"{len(failed)} task run{'s' if len(failed) > 1 else ''} failed: "
              + ", ".join(f"{t} ({m}, seed {s})" for t, m, s in failed) + f"; reasons in {args.results}")
        sys.exit(1)
    return records


if __name__ == "__main__":
    main()
