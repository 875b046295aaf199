"""ImageNet-C / ImageNet-P summary math against values worked out by hand."""

from __future__ import annotations

import pytest
import torch

from pipeline.evaluate.robustness import corruption_errors, flip_rate, mce, mfr, relative_mce

# Two corruptions x five severities, errors in percent.
#   noise: model sum 150, reference sum 300 -> CE 50
#   blur:  model sum  75, reference sum 100 -> CE 75           mCE = (50 + 75) / 2 = 62.5
# Relative, model clean 4, reference clean 8:
#   noise: (150 - 5*4) / (300 - 5*8) = 130 / 260 -> 50
#   blur:  ( 75 - 5*4) / (100 - 5*8) =  55 /  60 -> 91.666...  relative mCE = (50 + 91.666...) / 2 = 425/6
MODEL = {"noise": [10, 20, 30, 40, 50], "blur": [5, 10, 15, 20, 25]}
REFERENCE = {"noise": [20, 40, 60, 80, 100], "blur": [10, 15, 20, 25, 30]}


def _fraction(errors: dict) -> dict:
    return {k: [v / 100 for v in vs] for k, vs in errors.items()}


def test_corruption_errors_mean_over_severities():
    assert corruption_errors(MODEL) == {"noise": 30.0, "blur": 15.0}


def test_mce_hand_case():
    assert mce(MODEL, REFERENCE) == pytest.approx(62.5)
    assert mce(_fraction(MODEL), _fraction(REFERENCE)) == pytest.approx(62.5)  # units cancel


def test_relative_mce_hand_case():
    assert relative_mce(MODEL, 4.0, REFERENCE, 8.0) == pytest.approx(425 / 6)
    assert relative_mce(_fraction(MODEL), 0.04, _fraction(REFERENCE), 0.08) == pytest.approx(425 / 6)


def test_reference_against_itself_is_100():
    assert mce(REFERENCE, REFERENCE) == pytest.approx(100.0)
    assert relative_mce(REFERENCE, 8.0, REFERENCE, 8.0) == pytest.approx(100.0)


def test_relative_mce_rejects_non_positive_reference_degradation():
    flat = {"noise": REFERENCE["noise"], "blur": [8, 8, 8, 8, 8]}  # no drop from the clean error 8
    with pytest.raises(ValueError, match="blur"):
        relative_mce(MODEL, 4.0, flat, 8.0)


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="same keys"):
        mce({"noise": MODEL["noise"]}, REFERENCE)
    with pytest.raises(ValueError, match="severities"):
        mce({"noise": MODEL["noise"], "blur": [5, 10, 15]}, REFERENCE)
    with pytest.raises(ValueError, match="same keys"):
        relative_mce({**MODEL, "fog": [1] * 5}, 4.0, REFERENCE, 8.0)
    with pytest.raises(ValueError, match="no severities"):
        corruption_errors({"noise": []})
    with pytest.raises(ValueError, match="sum to 0"):
        mce(MODEL, {"noise": [0] * 5, "blur": REFERENCE["blur"]})


def test_flip_rate_hand_case():
    # sequence 1 changes once (0 -> 1) in 3 pairs, sequence 2 never: 1 of 6 pairs
    assert flip_rate(torch.tensor([[0, 0, 1, 1], [2, 2, 2, 2]])) == pytest.approx(1 / 6)


def test_flip_rate_against_first_frame():
    preds = torch.tensor([[0, 1, 0, 1]])
    assert flip_rate(preds) == 1.0                                  # every consecutive pair differs
    assert flip_rate(preds, against_first=True) == pytest.approx(2 / 3)  # frames 1 and 3 differ from frame 0


def test_flip_rate_rejects_bad_shape():
    with pytest.raises(ValueError, match="2 frames"):
        flip_rate(torch.tensor([[3], [4]]))
    with pytest.raises(ValueError, match=r"\(N, F\)"):
        flip_rate(torch.tensor([1, 2, 3]))


def test_mfr_hand_case():
    # translate 100 * .02 / .04 = 50, rotate 100 * .03 / .04 = 75 -> mean 62.5
    assert mfr({"translate": 0.02, "rotate": 0.03}, {"rotate": 0.04, "translate": 0.04}) == pytest.approx(62.5)
    with pytest.raises(ValueError, match="same keys"):
        mfr({"translate": 0.02}, {"translate": 0.04, "rotate": 0.04})
    with pytest.raises(ValueError, match="rotate"):
        mfr({"rotate": 0.02}, {"rotate": 0.0})
