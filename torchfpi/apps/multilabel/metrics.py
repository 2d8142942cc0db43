"""Example-based F1 and threshold selection for multi-label prediction."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch

#: thresholds searched on the validation split (probabilities).
DEFAULT_THRESHOLDS: Tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 15))


def example_f1(pred: torch.Tensor, target: torch.Tensor, zero_division: float = 0.0) -> torch.Tensor:
    """Per-example F1, 2 |ŷ ∩ y| / (|ŷ| + |y|), of binary predictions.

    The mean of the result is the "example-based F1" of the multi-label literature (SPEN, DVN,
    the FPI paper) and equals scikit-learn's ``f1_score(y, ŷ, average="samples",
    zero_division=zero_division)``.

    Args:
        pred: ``(N, L)`` predictions in {0, 1} (bool or float).
        target: ``(N, L)`` ground truth in {0, 1}.
        zero_division: the score of an example with neither predicted nor true labels.

    Returns:
        ``(N,)`` float64 per-example F1.

    Raises:
        ValueError: if the shapes differ or are not 2-D.
    """
    if pred.dim() != 2 or pred.shape != target.shape:
        raise ValueError(
            f"example_f1: expected pred and target of the same (N, L) shape, got "
            f"{tuple(pred.shape)} and {tuple(target.shape)}"
        )
    p = pred.to(torch.float64)
    t = target.to(torch.float64)
    inter = (p * t).sum(1)
    denom = p.sum(1) + t.sum(1)
    f1 = torch.where(denom > 0, 2 * inter / denom.clamp_min(1.0), torch.full_like(denom, zero_division))
    return f1


def mean_example_f1(prob: torch.Tensor, target: torch.Tensor, threshold: float, zero_division: float = 0.0) -> float:
    """Mean example-based F1 (a fraction in [0, 1]) of ``prob >= threshold``:
    scikit-learn's ``f1_score(target, prob >= threshold, average="samples")``.

    scikit-learn does the job (measured on a Bibtex-sized validation split, 740 x 159, 14
    thresholds, 2 CPU cores: about as fast as the torch form, 0.2 s per search, and equal to it
    to 1e-15); :func:`example_f1` stays for the per-example values, which scikit-learn does not return.

    Example:
        >>> mean_example_f1(torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([[1, 0], [1, 1]]), 0.5)
        0.8333333333333333
    """
    import warnings

    from sklearn.metrics import f1_score

    if prob.dim() != 2 or prob.shape != target.shape:
        raise ValueError(f"mean_example_f1: expected prob and target of the same (N, L) shape, got "
                         f"{tuple(prob.shape)} and {tuple(target.shape)}")
    with warnings.catch_warnings():  # zero_division is passed: no "ill-defined" warning is due
        warnings.simplefilter("ignore", category=UserWarning)
        return float(f1_score(target.cpu().numpy().astype(bool), (prob >= threshold).cpu().numpy(),
                              average="samples", zero_division=zero_division))


def best_threshold(
    prob: torch.Tensor, target: torch.Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> Tuple[float, float]:
    """The threshold of ``thresholds`` with the highest mean example F1 on ``(prob, target)``.

    Use it on the validation split only. Ties go to the smaller threshold.

    Returns:
        ``(threshold, f1)`` with ``f1`` a fraction in [0, 1].
    """
    best = (float(thresholds[0]), -1.0)
    for th in thresholds:
        f1 = mean_example_f1(prob, target, float(th))
        if f1 > best[1]:
            best = (float(th), f1)
    return best
