"""Nearest-centroid assignment for k-means (fairseq's dump_km_label / Lloyd's assignment step).

`assign_nearest(x, centroids)` returns (labels, squared distances) without materialising more than a chunk of the
N x K distance matrix. The Triton kernel plugs in here.
"""
import torch


def assign_nearest_reference(x, centroids, chunk=16384):
    """x: N x D, centroids: K x D -> (labels int64 N, squared distance float32 N), in chunks of points."""
    x = x.float()
    c = centroids.float()
    c_sq = (c * c).sum(1)
    labels = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dists = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        d = torch.addmm(c_sq[None, :], xs, c.t(), alpha=-2.0)  # ||c||^2 - 2 x.c
        m, i = d.min(1)
        labels[s:s + chunk] = i
        dists[s:s + chunk] = (m + (xs * xs).sum(1)).clamp_min_(0)
    return labels, dists


def assign_nearest(x, centroids):
    return assign_nearest_reference(x, centroids)


def cluster_sums(x, labels, k):
    """Per-cluster sums (K x D, float32) and counts (K, int64) for the Lloyd update."""
    sums = torch.zeros(k, x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, labels, x.float())
    counts = torch.bincount(labels, minlength=k)
    return sums, counts
