"""probe.py's metrics: MARBLE's (torchmetrics) on item-level outputs, and the GiantSteps key ensembles.

Each equals its reference: accuracy_score; roc_auc_score / average_precision_score with average="macro"; r2_score per
output; mir_eval.key.weighted_score for keys. Scores may carry a leading head axis: [heads, N, C].

A task scores a split with `split_metrics(task, outputs, split)`: by its kind (multiclass, multilabel, regression),
or by its own `task.score(outputs, split, names, valid)` when the unit scored is not the item (GiantSteps scores
songs, each the ensemble of its 30 s windows). `valid` is the same head's validation metrics, given when the test
split is scored, for metrics whose test figure depends on a choice made on validation.
"""
import functools

import numpy as np
from scipy.stats import rankdata

from data.downstream import GS_CLASSES

def _scalar(x):
    return float(x) if np.ndim(x) == 0 else x


def accuracy(scores, y):
    return _scalar((np.asarray(scores).argmax(-1) == np.asarray(y)).mean(-1))


def _usable_columns(y):
    """Labels with both positives and negatives in `y`: AUC and AP are undefined for the others, which are left out
    of the macro average (sklearn raises; torchmetrics warns and scores them 0)."""
    pos = y.sum(0)
    return np.flatnonzero((pos > 0) & (pos < len(y)))


def macro_roc_auc(scores, y):
    """Mann-Whitney form of the AUC per label, ties counted half (average ranks), then the mean over labels."""
    scores, y = np.asarray(scores, np.float64), np.asarray(y) > 0.5
    cols = _usable_columns(y)
    if len(cols) == 0:
        return _scalar(np.full(scores.shape[:-2], np.nan))
    t = y[:, cols]
    ranks = rankdata(scores[..., cols], axis=-2)
    n_pos = t.sum(0)
    n_neg = len(t) - n_pos
    auc = ((ranks * t).sum(-2) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return _scalar(auc.mean(-1))


def average_precision(scores, y):
    """Sum over distinct score thresholds (high to low) of (recall step) x precision at that threshold, as sklearn."""
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], y[order].astype(np.float64)
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp = np.cumsum(t)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall_step = np.diff(np.r_[0.0, tp]) / t.sum()
    return float((recall_step * precision).sum())


def macro_average_precision(scores, y):
    scores, y = np.asarray(scores, np.float64), np.asarray(y) > 0.5
    cols = _usable_columns(y)
    if len(cols) == 0:
        return float("nan")
    return float(np.mean([average_precision(scores[:, c], y[:, c]) for c in cols]))


def r2_per_dim(pred, y):
    pred, y = np.asarray(pred, np.float64), np.asarray(y, np.float64)
    ss_res = ((y - pred) ** 2).sum(-2)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    return 1.0 - ss_res / ss_tot


def task_metrics(kind, outputs, y, names):
    """outputs: clip-level logits (or regression outputs) N x C of one head."""
    out = {}
    if kind == "multiclass":
        out["acc"] = accuracy(outputs, y)
    elif kind == "multilabel":
        if "roc_auc" in names:
            out["roc_auc"] = macro_roc_auc(outputs, y)
        if "ap" in names:  # AP is slow-ish: only computed when asked for (test), not every validation epoch
            out["ap"] = macro_average_precision(outputs, y)
    else:
        r2 = r2_per_dim(outputs, y)
        out.update(r2=float(r2.mean()), arousal_r2=float(r2[0]), valence_r2=float(r2[1]))
    return {k: out[k] for k in names}


def monitor_scores(kind, metric, outputs, y):
    """The monitored validation metric of every head at once: outputs H x N x C -> H scores."""
    if metric == "acc":
        return accuracy(outputs, y)
    if metric == "roc_auc":  # 8 heads at a time: ranks of a sweep's 84 heads on MTG's 11k tracks x 87 tags are 0.6 GB
        return np.concatenate([np.atleast_1d(macro_roc_auc(outputs[i:i + 8], y)) for i in range(0, len(outputs), 8)])
    if metric == "r2":
        return r2_per_dim(outputs, y).mean(-1)
    return np.array([task_metrics(kind, o, y, (metric,))[metric] for o in outputs])


def split_metrics(task, outputs, split, names=None, valid=None):
    """The metrics `names` (default: the task's) of one head's item-level outputs [N, C] on a split (SplitData)."""
    names = tuple(names or task.metrics)
    if task.score is not None:
        return task.score(outputs, split, names, valid)
    return task_metrics(task.kind, outputs, split.y.numpy(), names)


def monitored(task, outputs, split):
    """The monitored metric (the task's first) of every head: outputs [H, N, C] -> [H]."""
    metric = task.metrics[0]
    if task.score is not None:
        return np.array([task.score(o, split, (metric,))[metric] for o in outputs])
    return monitor_scores(task.kind, metric, outputs, split.y.numpy())


# ------------------------------------------------------------------------------------------------------------------
# GiantSteps key (MARBLE's tasks/GS, after Jukemir): each 30 s window is scored by the head, the windows of a song are
# ensembled four ways, each ensemble is scored with mir_eval's weighted score averaged over songs, and the strategy
# best on validation gives the test figure (MARBLE's test_ensemble_score_val-select).

KEY_CLASSES = GS_CLASSES  # C major, Db major, ..., B major, C minor, ..., B minor: MARBLE's class order
ENSEMBLES = ("vote", "max", "gmean", "mean")  # MARBLE's order; on equal scores the first wins, as its loop


@functools.lru_cache(maxsize=None)
def key_weights():
    """[24, 24]: mir_eval.key.weighted_score(reference, estimate) for every pair of classes (1 same key, 0.5 a fifth
    above in the same mode, 0.3 relative, 0.2 parallel, else 0; not symmetric)."""
    import mir_eval
    return np.array([[mir_eval.key.weighted_score(r, e) for e in KEY_CLASSES] for r in KEY_CLASSES])


def song_predictions(logits, owner, n_songs):
    """Window logits [W, C] and each window's song [W] -> {strategy: predicted class per song [n_songs]}.
    vote: the most frequent window argmax (the smallest class on ties, as scipy.stats.mode); max: argmax of the
    per-class maximum logit; gmean: argmax of the mean logit (the geometric mean of the softmax, up to a constant);
    mean: argmax of the mean softmax."""
    logits = np.asarray(logits, np.float64)
    W, C = logits.shape
    votes = np.zeros((n_songs, C))
    np.add.at(votes, (owner, logits.argmax(-1)), 1)
    top = np.full((n_songs, C), -np.inf)
    np.maximum.at(top, owner, logits)
    sums = np.zeros((n_songs, C))
    np.add.at(sums, owner, logits)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    probs = np.zeros((n_songs, C))
    np.add.at(probs, owner, p / p.sum(-1, keepdims=True))
    return {"vote": votes.argmax(-1), "max": top.argmax(-1), "gmean": sums.argmax(-1), "mean": probs.argmax(-1)}


def key_metrics(outputs, split, names, valid=None):
    """One head's window logits on a split -> weighted (the ensemble chosen on validation: the best one when this
    is the validation split, else the best in `valid`), acc (song accuracy of that ensemble), clip_acc (accuracy of
    single windows) and weighted_<strategy> for each ensemble."""
    outputs, y = np.asarray(outputs), split.y.numpy()
    owner = np.asarray(split.owner)
    n_songs = int(owner.max()) + 1
    song_y = np.zeros(n_songs, np.int64)
    song_y[owner] = y
    preds = song_predictions(outputs, owner, n_songs)
    out = {"clip_acc": float((outputs.argmax(-1) == y).mean())}
    for s in ENSEMBLES:
        out[f"weighted_{s}"] = float(key_weights()[song_y, preds[s]].mean())
        out[f"acc_{s}"] = float((preds[s] == song_y).mean())
    chooser = out if valid is None else valid
    best = max(ENSEMBLES, key=lambda s: chooser[f"weighted_{s}"])  # max keeps the first of equal scores
    out["weighted"], out["acc"] = out[f"weighted_{best}"], out[f"acc_{best}"]
    return {k: out[k] for k in names}
