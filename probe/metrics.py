"""Per-depth metrics of the knowledge probe, on last-token states and logit-lens ranks.

Category geometry uses mean-centred states: a language model's residual stream shares a
large common direction, which makes every raw cosine distance small and hides the
category structure; removing the mean (of the training fold, for the classifier) is the
usual fix and uses no labels.
"""
from __future__ import annotations

import math

import torch


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def category_separation(x: torch.Tensor, labels: torch.Tensor) -> float:
    """x (N, d), labels (N,) int -> mean between-category minus mean within-category cosine
    distance (1 - cos) over pairs of distinct prompts, after centring. 0 for no structure.

    From per-category sums of unit vectors, O(N d): sum_{i,j} cos = |sum u|^2."""
    u = _unit(x.double() - x.double().mean(0))
    C = int(labels.max()) + 1
    sums = torch.zeros(C, u.shape[1], dtype=u.dtype).index_add_(0, labels, u)     # (C, d)
    n = torch.bincount(labels, minlength=C).double()
    total, per_cat = u.sum(0).pow(2).sum(), sums.pow(2).sum(1).sum()
    self_pairs = u.pow(2).sum()
    within_pairs = (n * (n - 1)).sum()
    between_pairs = n.sum() ** 2 - n.pow(2).sum()
    if within_pairs == 0 or between_pairs == 0:
        return float("nan")
    within_cos = (per_cat - self_pairs) / within_pairs
    between_cos = (total - per_cat) / between_pairs
    return float((1 - between_cos) - (1 - within_cos))


def stratified_folds(labels: torch.Tensor, folds: int, seed: int = 0) -> torch.Tensor:
    """(N,) fold index: each category's prompts shuffled (seeded) and dealt round-robin."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty_like(labels)
    for c in labels.unique():
        idx = (labels == c).nonzero()[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)]
        fold[idx] = torch.arange(len(idx)) % folds
    return fold


def nearest_centroid_accuracy(x: torch.Tensor, labels: torch.Tensor, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated accuracy of a cosine nearest-centroid classifier: centroids (of
    centred unit vectors) from the other folds, each prompt given its nearest category.
    Chance is 1 / (number of categories); a category seen only in the test fold is a miss."""
    fold = stratified_folds(labels, folds, seed)
    C = int(labels.max()) + 1
    x = x.double()
    correct = 0
    for f in range(folds):
        test, train = fold == f, fold != f
        if not test.any():
            continue
        mu = x[train].mean(0)
        u_tr, u_te = _unit(x[train] - mu), _unit(x[test] - mu)
        cent = torch.zeros(C, x.shape[1], dtype=x.dtype).index_add_(0, labels[train], u_tr)
        seen = torch.bincount(labels[train], minlength=C) > 0
        sim = u_te @ _unit(cent).T                                                     # (n_test, C)
        sim[:, ~seen] = -math.inf
        correct += int((sim.argmax(1) == labels[test]).sum())
    return correct / len(labels)


def first_entry(rank: torch.Tensor, k: int) -> torch.Tensor:
    """rank (S, N) -> (N,) first depth where the answer is in the top-k, -1 where never."""
    hit = rank < k
    first = hit.int().argmax(0)
    return torch.where(hit.any(0), first, torch.full_like(first, -1))


def lens_curves(rank: torch.Tensor, logprob: torch.Tensor, k: int) -> dict[str, list[float]]:
    """Per depth: share with the answer in the top-k / top-1, mean probability, median rank."""
    return {
        f"top{k}_rate": (rank < k).double().mean(1).tolist(),
        "top1_rate": (rank == 0).double().mean(1).tolist(),
        "answer_prob": logprob.double().exp().mean(1).tolist(),
        "answer_logprob": logprob.double().mean(1).tolist(),
        "median_rank": rank.double().median(1).values.tolist(),
    }


def layer_table(states: torch.Tensor, rank: torch.Tensor, logprob: torch.Tensor, labels: torch.Tensor,
                k: int = 10, folds: int = 5, seed: int = 0) -> list[dict]:
    """One row per depth (layer -1 = embedding, layer i = after block i): category
    separation, nearest-centroid accuracy, lens curves, and how many prompts' answers
    enter the top-k for the first time at that depth."""
    S = states.shape[0]
    curves = lens_curves(rank, logprob, k)
    entries = torch.bincount(first_entry(rank, k) + 1, minlength=S + 1)[1:]          # drop "never"
    rows = []
    for s in range(S):
        row = {"layer": s - 1,
               "category_separation": category_separation(states[s], labels),
               "category_accuracy": nearest_centroid_accuracy(states[s], labels, folds, seed)}
        row.update({name: vals[s] for name, vals in curves.items()})
        row[f"first_top{k}"] = int(entries[s])
        rows.append(row)
    return rows
