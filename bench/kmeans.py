"""Benchmark kmeans.py's fit against scikit-learn's MiniBatchKMeans with fairseq's learn_kmeans.py settings and against
faiss-cpu's k-means, in one process, on the same features.

    python bench/kmeans.py --features /work/data/kmeans_real/mfcc --k 500 --threads 1 --rounds 3   # real music
    python bench/kmeans.py [--out /tmp/kmbench] [--hours 0.62] [--k 500 2000] [--threads 1]        # synthetic corpus

--features takes a `kmeans.py features` folder (e.g. MFCC of real recordings: see README, kmeans.py). Without it the
synthetic corpus is rendered with data/synth.py and its MFCC dumped (both skipped when already there). For each K
the methods run in alternating rounds (ours, faiss, sklearn, ours, ...) and the table gives median wall times,
inertia (mean squared distance per frame, every method scored by the same code on all frames; deterministic given
the seeds, so equal across rounds) and the ratios. "ours reached X's inertia after t s" is when our fit's per-pass
log (passes over all points) first reached X's inertia: the time at equal inertia. The machine's load average is
printed at the start and the end: on a shared machine compare the ratios, not the seconds.
"""
import argparse
import json
import os
import sys

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--features", help="a kmeans.py features folder to cluster (default: the synthetic corpus's MFCC)")
p.add_argument("--out", default="/tmp/kmbench", help="synthetic corpus, its features and results.json go here")
p.add_argument("--hours", type=float, default=0.62, help="synthetic corpus size (0.62 h = 75 clips, 225k frames)")
p.add_argument("--k", type=int, nargs="+", default=[500, 2000])
p.add_argument("--threads", type=int, default=1)
p.add_argument("--rounds", type=int, default=1, help="alternating rounds per method; medians are reported")
p.add_argument("--sklearn-n-init", type=int, default=20, help="fairseq uses 20")
p.add_argument("--faiss-niter", type=int, default=25, help="faiss.Kmeans default")
p.add_argument("--tol", type=float, nargs="+", default=[1e-3], help="our fit's stopping tolerances; the first is "
               "the default run that the ratios use (add 1e-4 to see a longer run)")
p.add_argument("--skip-sklearn", action="store_true")
p.add_argument("--skip-faiss", action="store_true")
args = p.parse_args()
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # before numpy/torch/faiss load BLAS
    os.environ[var] = str(args.threads)

import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kmeans  # noqa: E402

torch.set_num_threads(args.threads)


def load_average():
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "unknown"


def inertia_of(x, centroids):
    """Mean squared distance of every frame to its nearest centroid: the one score for every method."""
    c = torch.as_tensor(np.asarray(centroids, dtype=np.float32))
    total = 0.0
    for a in range(0, len(x), 65536):
        total += kmeans.assign_nearest(torch.from_numpy(x[a:a + 65536]), c)[1].double().sum().item()
    return total / len(x)


def run_ours(x, k, tol):
    history = []
    t = time.time()
    result = kmeans.fit_kmeans(x, k, seed=0, tol=tol, history=history, verbose=False)
    return time.time() - t, result["centroids"].numpy(), {
        "iterations": result["iterations"], "warm_iterations": result["warm_iterations"], "history": history}


def run_faiss(x, k):
    import faiss
    faiss.omp_set_num_threads(args.threads)
    km = faiss.Kmeans(x.shape[1], k, niter=args.faiss_niter, seed=0)  # default: <= 256 points per centroid
    t = time.time()
    km.train(x)
    return time.time() - t, km.centroids, {"niter": args.faiss_niter, "points_used": min(len(x), 256 * k)}


def run_sklearn(x, k):
    from sklearn.cluster import MiniBatchKMeans
    # fairseq examples/hubert/simple_kmeans/learn_kmeans.py, verbatim settings
    km = MiniBatchKMeans(n_clusters=k, init="k-means++", max_iter=100, batch_size=10000, tol=0.0,
                         max_no_improvement=100, n_init=args.sklearn_n_init, reassignment_ratio=0.0, init_size=None,
                         compute_labels=False, verbose=0, random_state=0)
    t = time.time()
    km.fit(x)
    return time.time() - t, km.cluster_centers_, {"n_init": args.sklearn_n_init, "steps": int(km.n_steps_)}


def load_features():
    if args.features:
        fs = kmeans.FeatureSet(args.features)
        return np.concatenate(list(fs.chunks(1 << 20))), f"{args.features} ({fs.meta['kind']})"
    synth, feat = os.path.join(args.out, "synth"), os.path.join(args.out, "feat")
    manifest = os.path.join(synth, "train.tsv")
    if not os.path.exists(manifest):
        from data.synth import write_corpus
        write_corpus(synth, args.hours, valid_percent=0.0, workers=args.threads)
    t = time.time()
    kmeans.dump_features(manifest, feat, workers=1)
    print(f"features: {time.time() - t:.1f} s", flush=True)
    return np.load(os.path.join(feat, "train_0_1.npy")), "synthetic corpus MFCC"


def main():
    x, source = load_features()
    print(f"{source}: {x.shape[0]} frames x {x.shape[1]} dims, {args.threads} threads, torch {torch.__version__}, "
          f"load average at start {load_average()}", flush=True)
    if x.shape[0] < 200_000:
        print("warning: fewer than 200k frames; raise --hours", flush=True)

    results = {}
    for k in args.k:
        methods = [("ours", lambda x, k: run_ours(x, k, args.tol[0]))]
        methods += [(f"ours tol={t:g}", lambda x, k, t=t: run_ours(x, k, t)) for t in args.tol[1:]]
        methods += [] if args.skip_faiss else [("faiss", run_faiss)]
        methods += [] if args.skip_sklearn else [("sklearn", run_sklearn)]
        runs = {name: [] for name, _ in methods}
        for r in range(args.rounds):
            for name, fn in methods:
                seconds, centroids, extra = fn(x, k)
                runs[name].append(dict(seconds=seconds, centroids=centroids, **extra))
                print(f"K={k} round {r + 1} {name}: {seconds:.1f} s (load {load_average()})", flush=True)
        rows = {}
        for name, rs in runs.items():
            rows[name] = {key: v for key, v in rs[0].items() if key not in ("seconds", "centroids")}
            rows[name].update(seconds=statistics.median(r["seconds"] for r in rs),
                              all_seconds=[round(r["seconds"], 2) for r in rs],
                              inertia=inertia_of(x, rs[0]["centroids"]))
        ours = rows["ours"]
        for name in rows:
            if not name.startswith("ours"):
                reached = []
                for r in runs["ours"]:
                    at = [s for s, v in r["history"] if v <= rows[name]["inertia"]]
                    reached.append(at[0] if at else None)
                ok = [s for s in reached if s is not None]
                ours[f"seconds_to_{name}_inertia"] = statistics.median(ok) if len(ok) == len(reached) else None
        results[k] = rows

    print(f"\n{source}: {x.shape[0]} frames x {x.shape[1]} dims, {args.threads} threads, {args.rounds} rounds "
          f"(medians); load average at the end {load_average()}")
    print(f"{'K':>5} {'method':<28} {'seconds':>9} {'inertia':>10}  ratios")
    for k, rows in results.items():
        ours = rows["ours"]
        for name in [n for n in rows if n.startswith("ours")]:
            r = rows[name]
            label = "ours tol=%g" % args.tol[0] if name == "ours" else name
            print(f"{k:>5} {label:<28} {r['seconds']:9.1f} {r['inertia']:10.3f}  {r['warm_iterations']} warm-up + "
                  f"{r['iterations']} passes" + "".join(f"; {m}/this time {rows[m]['seconds'] / r['seconds']:.2f}"
                                                        for m in ("faiss", "sklearn") if m in rows))
        for name, label in (("faiss", "faiss niter=%d" % args.faiss_niter),
                            ("sklearn", "sklearn MiniBatch n_init=%d" % args.sklearn_n_init)):
            if name not in rows:
                continue
            r, at = rows[name], ours[f"seconds_to_{name}_inertia"]
            # the ratio within each round (the two runs minutes apart, not the whole benchmark), median over rounds
            per_round = statistics.median(a / b for a, b in zip(r["all_seconds"], ours["all_seconds"]))
            print(f"{k:>5} {label:<28} {r['seconds']:9.1f} {r['inertia']:10.3f}  "
                  f"{name}/ours time {r['seconds'] / ours['seconds']:.2f} (median of per-round ratios "
                  f"{per_round:.2f}; ours/{name} inertia {ours['inertia'] / r['inertia']:.4f}); ours reached "
                  f"{name}'s inertia after "
                  + (f"{at:.1f} s: {name}/ours time at equal inertia {r['seconds'] / at:.1f}" if at else "never"))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({str(k): v for k, v in results.items()}, fh, indent=1)
    print(f"wrote {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
