"""Summary numbers for ImageNet-C and ImageNet-P style robustness, which Noisy Student reports next to
clean accuracy: corruption error (CE), mean CE, relative mCE, flip rate and mean flip rate (mFR).

Errors are normalised by a reference model (AlexNet in the ImageNet-C paper) so corruptions that are hard
for every model do not dominate the mean. ``errors`` and ``reference`` map a corruption name to its error
at each severity (the same number of severities on both sides, in percent or in fractions, the same units
on both sides); the ratios come out in percent either way. Pure Python/tensor math, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def _check_severities(errors: Mapping[str, Sequence[float]], what: str = "errors") -> None:
    if not errors:
        raise ValueError(f"{what} is empty: need at least one corruption")
    for name, values in errors.items():
        if len(values) == 0:
            raise ValueError(f"{what}[{name!r}] has no severities")


def _check_pair(errors: Mapping, reference: Mapping, lists: bool = True) -> None:
    """Same keys on both sides and, for per-severity lists, the same number of severities."""
    if set(errors) != set(reference):
        missing, extra = sorted(set(reference) - set(errors)), sorted(set(errors) - set(reference))
        raise ValueError(f"errors and reference must have the same keys; missing from errors: {missing}, "
                         f"not in reference: {extra}")
    if not errors:
        raise ValueError("errors and reference are empty: need at least one key")
    if lists:
        _check_severities(errors)
        for name in errors:
            if len(errors[name]) != len(reference[name]):
                raise ValueError(f"{name!r} has {len(errors[name])} severities in errors but "
                                 f"{len(reference[name])} in reference")


def corruption_errors(errors: dict[str, list[float]]) -> dict[str, float]:
    """Unnormalised corruption error per corruption: the mean over its severities (same units as given),
    for tables that show each corruption next to the normalised mCE."""
    _check_severities(errors)
    return {name: sum(values) / len(values) for name, values in errors.items()}


def mce(errors: dict[str, list[float]], reference: dict[str, list[float]]) -> float:
    """Mean corruption error in percent: the mean over corruptions ``c`` of
    ``100 * sum_s E[c][s] / sum_s Ref[c][s]``; 100 means as robust as the reference, lower is better."""
    _check_pair(errors, reference)
    ratios = []
    for name in errors:
        denom = sum(reference[name])
        if denom <= 0:
            raise ValueError(f"reference errors for {name!r} sum to {denom}; cannot normalise by them")
        ratios.append(100.0 * sum(errors[name]) / denom)
    return sum(ratios) / len(ratios)


def relative_mce(errors: dict[str, list[float]], clean_error: float, reference: dict[str, list[float]],
                 reference_clean_error: float) -> float:
    """Relative mCE in percent: the mean over corruptions ``c`` of
    ``100 * sum_s (E[c][s] - clean) / sum_s (Ref[c][s] - ref_clean)``. It measures the *drop* from clean
    accuracy, so a model that is merely more accurate does not look more robust.

    A reference whose summed degradation for a corruption is zero or negative makes the ratio meaningless
    (division by zero or a sign flip), so that raises ``ValueError`` naming the corruption rather than
    returning inf or a negative number.
    """
    _check_pair(errors, reference)
    ratios = []
    for name in errors:
        denom = sum(r - reference_clean_error for r in reference[name])
        if denom <= 0:
            raise ValueError(f"reference degradation for {name!r} is {denom} (<= 0): its corrupted errors do "
                             f"not exceed the reference clean error {reference_clean_error}")
        ratios.append(100.0 * sum(e - clean_error for e in errors[name]) / denom)
    return sum(ratios) / len(ratios)


def flip_rate(preds: torch.Tensor, against_first: bool = False) -> float:
    """Share (a fraction) of frame pairs whose top-1 prediction differs, over ``N`` sequences of ``F``
    frames given as an (N, F) tensor of predicted classes. By default the pairs are consecutive frames
    ``(t, t+1)``, ``N * (F - 1)`` pairs in all (ImageNet-P's flip probability for sequential perturbations
    such as translate or zoom). ``against_first=True`` compares every frame ``t >= 1`` with frame 0
    instead, which is how ImageNet-P scores the noise perturbations, whose frames are not ordered.
    """
    if preds.dim() != 2:
        raise ValueError(f"preds must be (N, F) top-1 classes, got shape {tuple(preds.shape)}")
    n, f = preds.shape
    if n == 0 or f < 2:
        raise ValueError(f"need at least one sequence of at least 2 frames, got shape {tuple(preds.shape)}")
    if against_first:
        flips = preds[:, 1:] != preds[:, :1]
    else:
        flips = preds[:, 1:] != preds[:, :-1]
    return float(flips.sum()) / (n * (f - 1))


def mfr(flip_rates: dict[str, float], reference: dict[str, float]) -> float:
    """Mean flip rate in percent: the mean over perturbations of ``100 * FR / FR_ref``; 100 means as stable
    as the reference, lower is better."""
    _check_pair(flip_rates, reference, lists=False)
    ratios = []
    for name in flip_rates:
        if reference[name] <= 0:
            raise ValueError(f"reference flip rate for {name!r} is {reference[name]}; cannot normalise by it")
        ratios.append(100.0 * flip_rates[name] / reference[name])
    return sum(ratios) / len(ratios)


def normalised(errors: dict[str, list[float]], clean_error: float, flip_rates: dict[str, float],
               ref_errors: dict[str, list[float]], ref_clean_error: float, ref_flip_rates: dict[str, float]
               ) -> tuple[float | None, float | None, float | None, list[str]]:
    """(mCE, relative mCE, mFR, [corruptions left out, perturbations left out]) against a reference.

    A kind the reference never gets wrong (or never flips on) cannot normalise: it is left out, and said."""
    usable = [c for c in ref_errors if sum(ref_errors[c]) > 0]
    usable_rel = [c for c in usable if sum(v - ref_clean_error for v in ref_errors[c]) > 0]
    usable_fr = [p for p in ref_flip_rates if ref_flip_rates[p] > 0]

    def pick(d: dict, keys: list[str]) -> dict:
        return {k: d[k] for k in keys}

    m = mce(pick(errors, usable), pick(ref_errors, usable)) if usable else None
    rel = relative_mce(pick(errors, usable_rel), clean_error, pick(ref_errors, usable_rel),
                       ref_clean_error) if usable_rel else None
    fr = mfr(pick(flip_rates, usable_fr), pick(ref_flip_rates, usable_fr)) if usable_fr else None
    left_out = [", ".join(sorted(set(ref_errors) - set(usable))) or "none",
                ", ".join(sorted(set(ref_flip_rates) - set(usable_fr))) or "none"]
    return m, rel, fr, left_out
