"""The disagreement filter of ``uts distill`` on hand-set teacher outputs, one criterion at a time."""
import numpy as np
import pytest

from uts_cli.api.distill import cam_peak_near
from uts_cli.distillation import REASONS, decide
from uts_cli.errors import UsageError

# Eight patches. threshold 0.5.             label  prob   tp fp fn  peak near an annotation
CASES = [
    ("negative, teacher agrees", 0, 0.10, 0, 0, 0, False),
    ("negative, teacher says positive", 0, 0.90, 0, 1, 0, False),
    ("positive, teacher says negative", 1, 0.20, 0, 0, 1, True),
    ("positive, perfect", 1, 0.90, 1, 0, 0, True),
    ("positive, TP and an FP", 1, 0.90, 1, 1, 0, True),
    ("positive, no TP, peak on the point", 1, 0.90, 0, 0, 1, True),
    ("positive, no TP, peak elsewhere", 1, 0.90, 0, 1, 1, False),
    ("positive, TP but a second point missed", 1, 0.90, 1, 0, 1, True),
]
LABEL, PROB, TP, FP, FN, PEAK = (np.array([c[i] for c in CASES]) for i in range(1, 7))


def run(criterion, pseudolabel=False, keep_negatives=False):
    return decide(LABEL, PROB, 0.5, TP, FP, FN, criterion, pseudolabel, peak_near=PEAK.astype(bool),
                  keep_negatives=keep_negatives)


@pytest.mark.parametrize("criterion, reasons", [
    ("TP", ["", "image_fp", "image_fn", "", "", "no_tp", "no_tp", ""]),
    ("FP", ["", "image_fp", "image_fn", "", "has_fp", "", "has_fp", ""]),
    ("FP_TP", ["", "image_fp", "image_fn", "", "not_perfect", "not_perfect", "not_perfect", "not_perfect"]),
    ("PEAK", ["", "image_fp", "image_fn", "", "", "", "no_tp_peak_away", ""]),
])
def test_each_criterion_removes_what_it_says(criterion, reasons):
    d = run(criterion)
    assert list(d.reason) == reasons
    assert list(d.keep) == [r == "" for r in reasons]
    assert (d.label == LABEL).all()                      # removing never relabels
    assert all(r in REASONS for r in reasons if r)


def test_peak_keeps_more_positives_than_tp_and_never_fewer():
    tp, peak = run("TP"), run("PEAK")
    assert (peak.keep >= tp.keep).all() and peak.keep.sum() == tp.keep.sum() + 1


@pytest.mark.parametrize("criterion", ["TP", "FP", "FP_TP", "PEAK"])
def test_pseudolabel_keeps_everything_and_takes_the_teachers_labels(criterion):
    d = run(criterion, pseudolabel=True)
    assert d.keep.all()
    assert list(d.label) == [int(p >= 0.5) for p in PROB]
    # The reason still says what the teacher disagreed with (the review files list these rows).
    assert list(d.reason) == list(run(criterion).reason)


def test_threshold_is_inclusive_and_bad_inputs():
    d = decide([1, 0], [0.5, 0.5], 0.5, [1, 0], [0, 0], [0, 0], "TP")
    assert list(d.reason) == ["", "image_fp"]
    with pytest.raises(UsageError, match="unknown filter"):
        decide([1], [0.9], 0.5, [1], [0], [0], "XX")
    with pytest.raises(UsageError, match="PEAK filter needs"):
        decide([1], [0.9], 0.5, [1], [0], [0], "PEAK")


def test_cam_peak_near():
    cam = np.zeros((64, 64), np.float32)
    cam[40, 20] = 0.3                                     # far below any detection threshold
    assert cam_peak_near(cam, np.array([[45.0, 22.0]]), radius=10)
    assert not cam_peak_near(cam, np.array([[10.0, 10.0]]), radius=10)
    assert not cam_peak_near(cam, np.zeros((0, 2)), radius=10)


@pytest.mark.parametrize("criterion", ["TP", "FP", "FP_TP", "PEAK"])
def test_keep_negatives_judges_the_positives_only(criterion):
    plain, kept = run(criterion), run(criterion, keep_negatives=True)
    negative = LABEL == 0
    assert kept.keep[negative].all() and (kept.reason[negative] == "").all()
    assert not plain.keep[1]                             # the negative the teacher calls positive
    # The positives get the same decision either way.
    assert (kept.keep[~negative] == plain.keep[~negative]).all()
    assert list(kept.reason[~negative]) == list(plain.reason[~negative])


def test_keep_negatives_with_pseudolabel_relabels_positives_only():
    d = run("TP", pseudolabel=True, keep_negatives=True)
    assert d.keep.all()
    assert list(d.label) == [0 if lab == 0 else int(p >= 0.5) for lab, p in zip(LABEL, PROB)]
    assert d.label[1] == 0 and d.label[2] == 0           # negative kept negative; positive relabelled
