"""Annotator reliability without gold labels: the Dawid-Skene model, fitted by EM.

Dawid & Skene (1979), "Maximum Likelihood Estimation of Observer Error-Rates Using the EM
Algorithm", https://doi.org/10.2307/2346806.

The model. Item ``n`` has a hidden true class ``z_n`` in ``{0..C-1}`` drawn from the prior ``pi``;
annotator ``a`` who labels it reports class ``l`` with probability ``theta_a[z_n, l]`` (row = true
class, column = reported class; each row sums to 1), independently of the other annotators.

EM, from an initial posterior ``T`` (the annotators' vote shares per item):

- M-step: ``pi_c = (sum_n T_nc + s) / (N + C s)`` and
  ``theta_a[c, l] = (sum_{n labelled l by a} T_nc + s) / (sum_{n labelled by a} T_nc + C s)``,
  with ``s`` a pseudo-count (``smoothing``; 0 gives the maximum-likelihood updates of the paper).
- E-step: ``T_nc = pi_c prod_a theta_a[c, l_an] / sum_k pi_k prod_a theta_a[k, l_an]`` over the
  annotators ``a`` who labelled item ``n``; the log-likelihood is ``sum_n log sum_k pi_k prod_a ...``.

An annotator's **reliability** is the chance they report the true class of a random item,
``sum_c pi_c theta_a[c, c]``. Pairwise preferences use the classes ``"0"`` (the pair's first
response is better), ``"1"`` (the second is) and ``"tie"``; a ranking of K responses is reduced to
its C(K, 2) pairwise preferences (see :func:`heed.feedback.aggregate.preference_items`), which the
model treats as independent items.

Only items with at least ``min_labels`` labels are used to fit ``pi`` and ``theta`` (an item seen by
one annotator says nothing about that annotator's errors but would pull the fit towards agreeing
with them); every item then gets its posterior from the fitted parameters. An annotator who shares
no item with another gets the mean confusion matrix of the fitted annotators and reliability ``nan``.

Shapes in the array helpers: ``N`` items, ``A`` annotators, ``C`` classes; ``labels`` is an int
array ``(A, N)`` holding the reported class index, or ``-1`` where the annotator did not label the item.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

MISSING = -1


def vote_shares(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Initial posterior: each item's share of votes per class, ``(N, C)``; uniform for an unlabelled item.

    Args:
        labels: ``(A, N)`` class indices, ``-1`` where missing.
    """
    counts = np.zeros((labels.shape[1], num_classes))
    for row in labels:
        seen = row != MISSING
        np.add.at(counts, (np.nonzero(seen)[0], row[seen]), 1.0)
    total = counts.sum(axis=1, keepdims=True)
    return np.where(total > 0, counts / np.maximum(total, 1.0), 1.0 / num_classes)


def m_step(
    posterior: np.ndarray, labels: np.ndarray, smoothing: float, swap: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Class prior and confusion matrices from the current posterior.

    ``pi_c = (sum_n T_nc + s) / (N + C s)``;
    ``theta_a[c, l] = (n_a[c, l] + s) / (sum_l' n_a[c, l'] + C s)`` with the soft counts
    ``n_a[c, l] = sum_{n: l_an = l} T_nc``. With ``swap`` (a permutation ``sigma`` of the classes under
    which every annotator is assumed to behave alike, ``theta[sigma c, sigma l] = theta[c, l]``) the
    counts are pooled first: ``n_a[c, l] <- (n_a[c, l] + n_a[sigma c, sigma l]) / 2``.
    A row with no mass and ``s = 0`` (no item of that class seen by ``a``) is uniform.

    Args:
        posterior: ``T``, shape ``(N, C)``, rows summing to 1.
        labels: ``(A, N)`` class indices, ``-1`` where missing.
        smoothing: the pseudo-count ``s >= 0``.
        swap: ``sigma`` as a list, ``swap[c]`` = the class ``c`` maps to; ``None`` for no constraint.

    Returns:
        ``prior`` of shape ``(C,)`` and ``confusion`` of shape ``(A, C, C)`` (true class, reported class).
    """
    n_items, n_classes = posterior.shape
    prior = (posterior.sum(axis=0) + smoothing) / (n_items + n_classes * smoothing)
    confusion = np.empty((labels.shape[0], n_classes, n_classes))
    for a, row in enumerate(labels):
        seen = row != MISSING
        onehot = np.zeros((int(seen.sum()), n_classes))  # (N_a, C)
        onehot[np.arange(onehot.shape[0]), row[seen]] = 1.0
        counts = posterior[seen].T @ onehot  # (C true, C reported)
        if swap is not None:
            counts = 0.5 * (counts + counts[np.ix_(swap, swap)])
        counts = counts + smoothing
        total = counts.sum(axis=1, keepdims=True)
        confusion[a] = np.where(total > 0, counts / np.where(total > 0, total, 1.0), 1.0 / n_classes)
    return prior, confusion


def e_step(prior: np.ndarray, confusion: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
    """Posterior of every item's true class, and the log-likelihood of the labels.

    ``T_nc ∝ pi_c prod_{a labelled n} theta_a[c, l_an]``, computed in log space; a zero probability
    gives a zero posterior (never ``nan``).

    Args:
        prior: ``(C,)``; confusion: ``(A, C, C)``; labels: ``(A, N)`` class indices, ``-1`` where missing.

    Returns:
        ``posterior`` of shape ``(N, C)`` and ``sum_n log p(labels of n)``.
    """
    with np.errstate(divide="ignore"):
        log_t = np.tile(np.log(prior), (labels.shape[1], 1))  # (N, C)
        log_conf = np.log(confusion)  # (A, C, C)
    for a, row in enumerate(labels):
        seen = row != MISSING
        log_t[seen] += log_conf[a][:, row[seen]].T  # (N_a, C): log theta_a[c, l_an]
    top = log_t.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    weights = np.exp(log_t - top)
    norm = weights.sum(axis=1, keepdims=True)
    return weights / norm, float((np.log(norm) + top).sum())


@dataclass(frozen=True)
class DawidSkene:
    """A fitted Dawid-Skene model (plain Python values, ready for JSON).

    ``confusion[a][c][l]``: probability that annotator ``a`` reports class ``l`` when the truth is
    ``c``; ``reliability[a] = sum_c prior[c] confusion[a][c][c]`` (``nan`` without a shared item);
    ``posterior[item][c]``: probability that the item's true class is ``classes[c]``; ``shared[a]``:
    the annotator's labels on items with ``min_labels`` or more labels (the ones the fit used).
    """

    classes: tuple[str, ...]
    prior: list[float]
    confusion: dict[str, list[list[float]]]
    reliability: dict[str, float]
    shared: dict[str, int]
    posterior: dict[Hashable, list[float]] = field(repr=False)
    iterations: int
    converged: bool
    log_likelihood: float

    def label(self, item: Hashable) -> str:
        """The most probable true class of ``item`` (the first class on an exact tie)."""
        p = self.posterior[item]
        return self.classes[max(range(len(p)), key=lambda c: (p[c], -c))]

    def summary(self) -> dict[str, object]:
        """Everything but the per-item posteriors (for stats pages)."""
        return {
            "method": "dawid-skene",
            "classes": list(self.classes),
            "prior": self.prior,
            "reliability": self.reliability,
            "shared_labels": self.shared,
            "confusion": self.confusion,
            "iterations": self.iterations,
            "converged": self.converged,
            "log_likelihood": self.log_likelihood,
        }


def dawid_skene(
    labels: Mapping[Hashable, Mapping[str, str]],
    classes: Sequence[str],
    *,
    smoothing: float = 0.01,
    max_iter: int = 500,
    tol: float = 1e-6,
    min_labels: int = 2,
    swap: Sequence[int] | None = None,
) -> DawidSkene:
    """Fit the Dawid-Skene model by EM (see the module docstring for the model and updates).

    Args:
        labels: ``{item: {annotator: class}}``; every class must be one of ``classes``.
        classes: the class names, in the order of the confusion matrices' rows and columns.
        smoothing: pseudo-count added to every prior and confusion cell (keeps rare classes finite).
        max_iter: most EM iterations (one M-step then one E-step each).
        tol: stop when the log-likelihood rises by less than ``tol`` (relative to the item count).
        min_labels: items with fewer labels are left out of the fit (their posterior still comes back).
        swap: a permutation of the class indices that leaves every annotator's behaviour unchanged
            (see :func:`m_step`); e.g. ``[1, 0, 2]`` for ("0", "1", "tie") when annotators see the
            two responses in random order.

    Returns:
        the fitted :class:`DawidSkene`; with no item to fit, ``prior`` uniform, no confusion matrices
        and each item's posterior its vote shares.
    """
    classes = tuple(classes)
    if smoothing < 0 or max_iter < 1:
        raise ValueError(f"dawid_skene: need smoothing >= 0 and max_iter >= 1, got {smoothing}, {max_iter}")
    if swap is not None and sorted(swap) != list(range(len(classes))):
        raise ValueError(f"dawid_skene: swap {list(swap)} is not a permutation of 0..{len(classes) - 1}")
    index = {c: i for i, c in enumerate(classes)}
    items = list(labels)
    annotators = sorted({a for votes in labels.values() for a in votes})
    col = {a: i for i, a in enumerate(annotators)}
    all_labels = np.full((len(annotators), len(items)), MISSING, dtype=np.int64)  # (A, N)
    for n, item in enumerate(items):
        for a, c in labels[item].items():
            if c not in index:
                raise ValueError(f"dawid_skene: item {item!r}: label {c!r} of {a!r} is not one of {classes}")
            all_labels[col[a], n] = index[c]

    # step 1: the items and annotators the fit can learn from
    fit_items = (all_labels != MISSING).sum(axis=0) >= min_labels  # (N,)
    fit_labels = all_labels[:, fit_items]
    fitted = (fit_labels != MISSING).any(axis=1)  # (A,)
    shared = {a: int((fit_labels[col[a]] != MISSING).sum()) for a in annotators}
    n_classes = len(classes)
    if not fitted.any():
        posterior = vote_shares(all_labels, n_classes)
        return DawidSkene(
            classes,
            [1.0 / n_classes] * n_classes,
            {},
            {a: math.nan for a in annotators},
            shared,
            {item: [float(x) for x in posterior[n]] for n, item in enumerate(items)},
            0,
            True,
            math.nan,
        )

    # step 2: EM from the vote shares
    sub = fit_labels[fitted]  # (A_fit, N_fit)
    posterior = vote_shares(sub, n_classes)
    loglik = -math.inf
    converged = False
    iterations = 0
    while iterations < max_iter and not converged:
        iterations += 1
        prior, confusion = m_step(posterior, sub, smoothing, swap)
        posterior, new_loglik = e_step(prior, confusion, sub)
        converged = new_loglik - loglik < tol * sub.shape[1]
        loglik = new_loglik

    # step 3: every annotator's matrix (the fitted mean for one with no shared item), every posterior
    full = np.empty((len(annotators), n_classes, n_classes))
    full[fitted] = confusion
    full[~fitted] = confusion.mean(axis=0)
    posterior_all, _ = e_step(prior, full, all_labels)
    reliability = {
        a: float(prior @ np.diag(full[col[a]])) if fitted[col[a]] else math.nan for a in annotators
    }
    return DawidSkene(
        classes,
        [float(x) for x in prior],
        {a: full[col[a]].tolist() for a in annotators if fitted[col[a]]},
        reliability,
        shared,
        {item: [float(x) for x in posterior_all[n]] for n, item in enumerate(items)},
        iterations,
        converged,
        loglik,
    )


__all__ = ["DawidSkene", "dawid_skene", "e_step", "m_step", "vote_shares"]
