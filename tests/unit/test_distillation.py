import numpy as np
import pytest

from uts_cli.distillation import decide
from uts_cli.errors import UsageError

# Six crafted samples: (label, prob, tp, fp, fn)
#  0 agree negative          1 image-level FP         2 image-level FN
#  3 positive, perfect       4 positive, no TP (FP+FN) 5 positive, TP and an extra FP
LABELS = np.array([0, 0, 1, 1, 1, 1])
PROBS = np.array([0.1, 0.9, 0.2, 0.95, 0.8, 0.7])
TP = np.array([0, 0, 0, 1, 0, 1])
FP = np.array([0, 1, 0, 0, 1, 1])
FN = np.array([0, 0, 1, 0, 1, 0])


def run(criterion, pseudo=False):
    return decide(LABELS, PROBS, 0.5, TP, FP, FN, criterion=criterion, pseudolabel=pseudo)


def test_tp_criterion_drops_disagreements_and_positives_without_tp():
    d = run("TP")
    assert d.keep.tolist() == [True, False, False, True, False, True]
    assert d.reason.tolist() == ["", "image_fp", "image_fn", "", "no_tp", ""]


def test_fp_criterion_drops_positives_with_false_positives():
    d = run("FP")
    assert d.keep.tolist() == [True, False, False, True, False, False]
    assert d.reason[4] == "has_fp" and d.reason[5] == "has_fp"


def test_fp_tp_keeps_only_perfect_positives():
    d = run("FP_TP")
    assert d.keep.tolist() == [True, False, False, True, False, False]
    assert set(d.reason[[4, 5]]) == {"not_perfect"}


def test_pseudolabel_keeps_all_and_relabels_with_teacher():
    d = run("TP", pseudo=True)
    assert d.keep.all()
    assert d.label.tolist() == [0, 1, 0, 1, 1, 1]


def test_threshold_is_inclusive():
    d = decide(np.array([1]), np.array([0.5]), 0.5, np.array([1]), np.array([0]), np.array([0]))
    assert d.keep.tolist() == [True]


def test_unknown_criterion():
    with pytest.raises(UsageError):
        run("XX")
