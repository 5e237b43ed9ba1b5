"""The check set's 95% intervals (evaluate.drop_interval / rate_interval / check_metrics) and the
note that says when a check set cannot resolve the accuracy budget."""

import random

import pytest
import torch

from vitedit.evaluate import check_metrics, drop_interval, rate_interval, resolution_note


def _paired(n_both: int, n_lost: int, n_gained: int, n_neither: int) -> tuple[torch.Tensor, torch.Tensor]:
    base = torch.tensor([True] * n_both + [True] * n_lost + [False] * n_gained + [False] * n_neither)
    after = torch.tensor([True] * n_both + [False] * n_lost + [True] * n_gained + [False] * n_neither)
    return base, after


def test_drop_interval_pins_the_adjusted_wald_formula():
    # 1,000 images, 30 lost and 10 gained: drop 2.0 points. Cells + 0.5: b 30.5, c 10.5, n 1,002.
    lo, hi = drop_interval(*_paired(800, 30, 10, 160))
    d = (30.5 - 10.5) / 1002
    half = 1.959964 * (((41.0 / 1002) - d * d) / 1002) ** 0.5
    assert (lo, hi) == (round(100 * (d - half), 3), round(100 * (d + half), 3))
    assert (lo, hi) == (0.75, 3.242)


def test_an_edit_that_changed_nothing_still_has_an_interval_of_about_196_over_n():
    lo, hi = drop_interval(*_paired(900, 0, 0, 100))
    assert lo < 0 < hi
    assert hi == pytest.approx(-lo, abs=1e-3)
    assert hi == pytest.approx(100 * 1.959964 / 1002, abs=1e-3)


def test_drop_interval_is_antisymmetric_and_empty_is_none():
    lo, hi = drop_interval(*_paired(50, 7, 2, 41))
    lo2, hi2 = drop_interval(*_paired(50, 2, 7, 41))
    assert (lo, hi) == (-hi2, -lo2)
    assert drop_interval(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.bool)) is None


def test_drop_interval_covers_the_true_drop_about_95_percent_of_the_time():
    # A population where the edit loses 3% of images and gains 1% (true drop 2 points); 400 check
    # images drawn 400 times. Coverage of a 95% interval should be 0.93-0.97.
    rng = random.Random(0)
    covered = 0
    for _ in range(400):
        cells = torch.tensor([rng.random() for _ in range(400)])
        base = (cells >= 0.01) & (cells < 0.92)            # right before: 91%
        after = cells < 0.89                              # lost [0.89, 0.92): 3%; gained [0, 0.01): 1%
        lo, hi = drop_interval(base, after)
        covered += lo <= 2.0 <= hi
    assert 0.93 <= covered / 400 <= 0.97


def test_wilson_interval():
    assert rate_interval(0, 0) is None
    lo, hi = rate_interval(0, 100)
    assert lo == 0.0 and hi == round(1.959964 ** 2 / (100 + 1.959964 ** 2), 6)  # Wilson at 0 of n: z^2 / (n + z^2)
    lo, hi = rate_interval(28, 1000)
    assert lo < 0.028 < hi and (lo, hi) == (0.019442, 0.04017)


def test_check_metrics_on_predictions():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    base = torch.tensor([0, 1, 2, 0, 1, 0, 1, 1])    # 6 right
    after = torch.tensor([0, 1, 2, 1, 1, 2, 1, 2])   # 5 right: lost 2 (idx 3, 7), gained 1 (idx 5)
    m = check_metrics(after, base, labels)
    assert m["accuracy_before"] == 0.75 and m["accuracy_after"] == 0.625
    assert m["flip_rate"] == 0.375 and m["check_images"] == 8
    assert m["accuracy_drop_ci95"] == drop_interval(base == labels, after == labels)
    assert m["flip_rate_ci95"] == rate_interval(3, 8)


def test_resolution_note_says_when_the_check_set_cannot_resolve_the_budget():
    small = check_metrics(*(torch.zeros(200, dtype=torch.long),) * 2, torch.zeros(200, dtype=torch.long))
    note = resolution_note(small, 0.5)  # nothing changed, 200 images: +-0.97 points
    assert note is not None and "200 images" in note and "0.5-point" in note and "--check" in note
    assert "about 800 images" in note  # 200 x (0.97 / 0.5)^2 = 755, rounded up to hundreds
    big = check_metrics(*(torch.zeros(2000, dtype=torch.long),) * 2, torch.zeros(2000, dtype=torch.long))
    assert resolution_note(big, 0.5) is None
    assert resolution_note(small, 1.0) is None
    assert resolution_note({"accuracy_drop_ci95": None, "check_images": 0}, 0.5) is None
