"""Benchmark kmeans.py's fit against scikit-learn's MiniBatchKMeans with fairseq's learn_kmeans.py settings and against
faiss-cpu's k-means, in one process, on the same features: 39-d MFCC of the synthetic corpus.

    python bench/kmeans.py [--out /tmp/kmbench] [--hours 0.62] [--k 500 2000] [--threads 2] [--sklearn-n-init 20]

Renders the corpus with data/synth.py and dumps MFCC with `kmeans.py features` (both skipped when already there),
then for each K prints wall time and inertia (mean squared distance per frame, all methods scored by the same code on
all frames) and the ratios. "ours @ faiss inertia" is the time at which our Lloyd passes first reached faiss's
inertia (from fit's per-pass log), i.e. the time at equal inertia.
"""
import argparse
import json
import os
import sys

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--out", default="/tmp/kmbench", help="corpus, features and results.json go here")
p.add_argument("--hours", type=float, default=0.62, help="synthetic corpus size (0.62 h = 75 clips, 225k frames)")
p.add_argument("--k", type=int, nargs="+", default=[500, 2000])
p.add_argument("--threads", type=int, default=2)
p.add_argument("--sklearn-n-init", type=int, default=20, help="fairseq uses 20")
p.add_argument("--faiss-niter", type=int, default=25, help="faiss.Kmeans default")
p.add_argument("--tol", type=float, nargs="+", default=[1e-3, 1e-4], help="our fit's stopping tolerances; the "
               "first is the default run that the ratios use")
p.add_argument("--skip-sklearn", action="store_true")
args = p.parse_args()
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # before numpy/torch/faiss load BLAS
    os.environ[var] = str(args.threads)

import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kmeans  # noqa: E402

torch.set_num_threads(args.threads)


def inertia_of(x, centroids):
    """Mean squared distance of every frame to its nearest centroid: the one score for every method."""
    c = torch.as_tensor(np.asarray(centroids, dtype=np.float32))
    total = 0.0
    for a in range(0, len(x), 65536):
        total += kmeans.assign_blocked(torch.from_numpy(x[a:a + 65536]), c)[1].double().sum().item()
    return total / len(x)


def run_ours(x, k, tol):
    history = []
    t = time.time()
    result = kmeans.fit_kmeans(x, k, seed=0, tol=tol, history=history)
    return time.time() - t, result["centroids"].numpy(), {"iterations": result["iterations"], "history": history}


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


def main():
    synth, feat = os.path.join(args.out, "synth"), os.path.join(args.out, "feat")
    manifest = os.path.join(synth, "train.tsv")
    if not os.path.exists(manifest):
        from data.synth import write_corpus
        write_corpus(synth, args.hours, valid_percent=0.0, workers=args.threads)
    t = time.time()
    kmeans.dump_features(manifest, feat, workers=1)
    print(f"features: {time.time() - t:.1f} s", flush=True)
    x = np.load(os.path.join(feat, "train_0_1.npy"))
    print(f"{x.shape[0]} frames x {x.shape[1]} dims, {args.threads} threads, torch {torch.__version__}", flush=True)
    if x.shape[0] < 200_000:
        print("warning: fewer than 200k frames; raise --hours", flush=True)

    results = {}
    for k in args.k:
        rows = {}
        methods = [("ours", lambda x, k: run_ours(x, k, args.tol[0]))]
        methods += [(f"ours tol={t:g}", lambda x, k, t=t: run_ours(x, k, t)) for t in args.tol[1:]]
        methods += [("faiss", run_faiss)] + ([] if args.skip_sklearn else [("sklearn", run_sklearn)])
        for name, fn in methods:
            print(f"--- K={k}: {name}", flush=True)
            seconds, centroids, extra = fn(x, k)
            rows[name] = dict(seconds=seconds, inertia=inertia_of(x, centroids), **extra)
            print(f"K={k} {name}: {seconds:.1f} s, inertia {rows[name]['inertia']:.3f}", flush=True)
        ours = rows["ours"]
        for name in rows:
            if not name.startswith("ours"):
                reached = [s for s, v in ours["history"] if v <= rows[name]["inertia"]]
                ours[f"seconds_to_{name}_inertia"] = reached[0] if reached else None
        results[k] = rows

    print(f"\n{x.shape[0]} frames x {x.shape[1]}-d MFCC, {args.threads} threads")
    print(f"{'K':>5} {'method':<28} {'seconds':>9} {'inertia':>10}  ratios")
    for k, rows in results.items():
        ours = rows["ours"]
        for name in [n for n in rows if n.startswith("ours")]:
            r = rows[name]
            label = "ours tol=%g" % args.tol[0] if name == "ours" else name
            print(f"{k:>5} {label:<28} {r['seconds']:9.1f} {r['inertia']:10.3f}  {r['iterations']} passes"
                  + "".join(f"; {m}/this time {rows[m]['seconds'] / r['seconds']:.2f}" for m in ("faiss", "sklearn")
                            if m in rows))
        for name, label in (("faiss", "faiss niter=%d" % args.faiss_niter),
                            ("sklearn", "sklearn MiniBatch n_init=%d" % args.sklearn_n_init)):
            if name not in rows:
                continue
            r, at = rows[name], ours[f"seconds_to_{name}_inertia"]
            print(f"{k:>5} {label:<28} {r['seconds']:9.1f} {r['inertia']:10.3f}  "
                  f"{name}/ours time {r['seconds'] / ours['seconds']:.2f} (ours/{name} inertia "
                  f"{ours['inertia'] / r['inertia']:.3f}); ours reached {name}'s inertia after "
                  + (f"{at:.1f} s: {name}/ours time at equal inertia {r['seconds'] / at:.1f}" if at else "never"))
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({str(k): v for k, v in results.items()}, fh, indent=1)
    print(f"wrote {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
