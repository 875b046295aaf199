"""Calibration and clean-metric math against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.evaluate.calibration import (
    confusion_matrix,
    ece,
    nll,
    per_class_accuracy,
    reliability,
    topk_accuracy,
)

# Six samples, four classes, bins=4 (edges 0, .25, .5, .75, 1 -- exact in binary floating point):
#   sample  probs                     label  conf  pred  correct  bin
#   s1      [.30, .25, .25, .20]      0      .30   0     yes      1  (.25, .5]
#   s2      [.40, .30, .20, .10]      1      .40   0     no       1
#   s3      [.10, .70, .10, .10]      1      .70   1     yes      2  (.5, .75]
#   s4      [.10, .10, .75, .05]      0      .75   2     no       2  (on the edge .75 -> the bin below)
#   s5      [.90, .05, .05, .00]      0      .90   0     yes      3  (.75, 1]
#   s6      [.00, 1.0, .00, .00]      1      1.0   1     yes      3  (1.0 -> the last bin)
# bin 0: empty                                        -> 0
# bin 1: n=2, acc 1/2, conf (.30+.40)/2 = .35,  gap .15  -> 2/6 * .15  = 6/120
# bin 2: n=2, acc 1/2, conf (.70+.75)/2 = .725, gap .225 -> 2/6 * .225 = 9/120
# bin 3: n=2, acc 1,   conf (.90+1.0)/2 = .95,  gap .05  -> 2/6 * .05  = 2/120
# ECE = 17/120. (Had .75 gone to bin 3 instead, ECE would be .05 + .05 + .1083 = .2083.)
HAND_PROBS = torch.tensor([[.30, .25, .25, .20], [.40, .30, .20, .10], [.10, .70, .10, .10],
                           [.10, .10, .75, .05], [.90, .05, .05, .00], [.00, 1.0, .00, .00]], dtype=torch.float64)
HAND_LABELS = torch.tensor([0, 1, 1, 0, 0, 1])


def test_ece_hand_case():
    assert ece(HAND_PROBS, HAND_LABELS, bins=4) == pytest.approx(17 / 120, abs=1e-12)


def test_ece_float32_input_gives_same_value():
    assert ece(HAND_PROBS.float(), HAND_LABELS, bins=4) == pytest.approx(17 / 120, abs=1e-6)


def test_reliability_hand_case():
    r = reliability(HAND_PROBS, HAND_LABELS, bins=4)
    assert r["edges"] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert r["count"] == [0, 2, 2, 2]
    assert r["accuracy"][0] is None and r["confidence"][0] is None
    assert r["accuracy"][1:] == pytest.approx([0.5, 0.5, 1.0])
    assert r["confidence"][1:] == pytest.approx([0.35, 0.725, 0.95])


def test_ece_perfectly_calibrated_is_zero():
    # four samples at confidence .75 with three right, two at confidence 1.0 both right
    probs = torch.tensor([[.75, .25]] * 4 + [[1.0, 0.0]] * 2, dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1, 0, 0])
    assert ece(probs, labels, bins=4) == 0.0
    assert ece(probs, labels, bins=15) == 0.0


def test_edges_one_and_zero_land_in_documented_bins():
    # float32 0.2 sits on the float32 edge 0.2 of 5 bins -> bin 0; 0.8 on edge 0.8 -> bin 3; 1.0 -> bin 4
    probs = torch.tensor([[0.2] * 5, [0.8, 0.2, 0, 0, 0], [1.0, 0, 0, 0, 0]], dtype=torch.float32)
    assert reliability(probs, torch.tensor([0, 0, 0]), bins=5)["count"] == [1, 0, 0, 1, 1]
    # confidence 0 (a degenerate all-zero row) goes to bin 0
    zero = reliability(torch.zeros(1, 3), torch.tensor([0]), bins=3)
    assert zero["count"] == [1, 0, 0] and zero["confidence"][0] == 0.0
    # default 15 bins: 1.0 goes to the last bin, not past it
    assert reliability(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))["count"][-1] == 1


def test_ece_overconfident_wrong_sample():
    # one sample, confidence .9, wrong -> |0 - .9| = .9
    assert ece(torch.tensor([[0.9, 0.1]]), torch.tensor([1])) == pytest.approx(0.9)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="labels"):
        ece(HAND_PROBS, HAND_LABELS[:3])
    with pytest.raises(ValueError, match="bins"):
        ece(HAND_PROBS, HAND_LABELS, bins=0)
    with pytest.raises(ValueError, match="range"):
        nll(HAND_PROBS, torch.tensor([0, 1, 2, 3, 4, 0]))
    with pytest.raises(ValueError, match="empty"):
        ece(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


def test_nll_hand_case():
    # -log .5, -log .75 and -log(eps) for a true class given probability 0
    probs = torch.tensor([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    expected = (math.log(2) + math.log(4 / 3) - math.log(1e-12)) / 3
    assert nll(probs, torch.tensor([0, 1, 1])) == pytest.approx(expected, rel=1e-6)
    assert nll(probs[:2], torch.tensor([0, 1])) == pytest.approx((math.log(2) + math.log(4 / 3)) / 2, rel=1e-6)


def test_topk_hand_case():
    # true class ranks 1st, 2nd and 4th
    probs = torch.tensor([[0.10, 0.20, 0.30, 0.40], [0.40, 0.30, 0.20, 0.10], [0.25, 0.35, 0.30, 0.10]])
    labels = torch.tensor([3, 1, 3])
    assert topk_accuracy(probs, labels, 1) == pytest.approx(100 / 3)
    assert topk_accuracy(probs, labels, 2) == pytest.approx(200 / 3)
    assert topk_accuracy(probs, labels, 3) == pytest.approx(200 / 3)
    assert topk_accuracy(probs, labels, 4) == 100.0
    for k in (0, 5):
        with pytest.raises(ValueError, match="k must"):
            topk_accuracy(probs, labels, k)


def test_confusion_matrix_and_per_class_accuracy():
    preds = torch.tensor([0, 1, 1, 2, 0, 2])
    labels = torch.tensor([0, 1, 2, 2, 0, 1])
    cm = confusion_matrix(preds, labels, 4)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [[2, 0, 0, 0],   # true 0: predicted 0 twice
                           [0, 1, 1, 0],   # true 1: once right, once called 2
                           [0, 1, 1, 0],   # true 2: once called 1, once right
                           [0, 0, 0, 0]]   # true 3: no samples
    assert per_class_accuracy(cm) == [100.0, 50.0, 50.0, None]
    with pytest.raises(ValueError, match="preds"):
        confusion_matrix(torch.tensor([0, 4]), torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError, match="square"):
        per_class_accuracy(torch.zeros(2, 3, dtype=torch.long))


def test_ece_topk_and_confusion_agree_with_torchmetrics():
    """Cross-check against a well-kept reference on random data (no sample on a bin edge)."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_calibration_error,
        multiclass_confusion_matrix,
    )

    g = torch.Generator().manual_seed(0)
    n, c = 3000, 7
    probs = torch.softmax(torch.randn(n, c, generator=g) * 2, 1)
    labels = torch.randint(0, c, (n,), generator=g)
    for bins in (5, 15):
        ref = multiclass_calibration_error(probs, labels, c, n_bins=bins, norm="l1").item()
        assert ref > 0.01 and ece(probs, labels, bins) == pytest.approx(ref, abs=1e-6)
    for k in (1, 3):
        ref = 100 * multiclass_accuracy(probs, labels, c, top_k=k, average="micro").item()
        assert topk_accuracy(probs, labels, k) == pytest.approx(ref, abs=1e-3)
    preds = probs.argmax(1)
    assert torch.equal(confusion_matrix(preds, labels, c), multiclass_confusion_matrix(preds, labels, c))
