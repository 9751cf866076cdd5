"""trainer/nab.py, NAB's scoring: hand-computed cases, and agreement on generated corpora with a
line-by-line transcription of NAB's own sweeper (``nab/sweeper.py``, kept below as the reference)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.nab import (
    PROFILES, CostMatrix, Series, nab_scores, null_score, probation_length, score_by_threshold, score_series,
    severity_to_anomaly_score, sweep, window_rows, windows_from_labels,
)


# --- NAB's sweeper, transcribed literally (the reference the vectorised port must match) -----------

def _nab_sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _nab_scaled_sigmoid(p: float) -> float:
    return -1.0 if p > 3.0 else 2 * _nab_sigmoid(-5 * p) - 1.0


def _nab_sweep(n: int, scores, windows, name, cost: CostMatrix, percent=0.15):
    max_tp = _nab_scaled_sigmoid(-1.0)
    probation = min(math.floor(percent * n), percent * 5000)
    windows = list(windows)
    out = []
    cur = cur_name = cur_width = cur_right = None
    prev_width = prev_right = None
    for i in range(n):
        if windows and i == windows[0][0]:
            cur = windows.pop(0)
            cur_name = f"{name}|{cur[0]}"
            cur_right = cur[1]
            cur_width = float(cur[1] - cur[0] + 1)
        if cur is not None:
            weighted = _nab_scaled_sigmoid(-(cur_right - i + 1) / cur_width) * cost.tp_weight / max_tp
        else:
            unweighted = (-1.0 if prev_right is None
                          else _nab_scaled_sigmoid(abs(prev_right - i) / float(prev_width - 1)))
            weighted = unweighted * cost.fp_weight
        out.append((scores[i], weighted, cur_name if i >= probation else "probationary"))
        if cur is not None and i == cur[1]:
            prev_right, prev_width = i, cur_width
            cur = cur_name = cur_width = cur_right = None
    return out


def _nab_score_by_threshold(points, cost: CostMatrix):
    scorable = sorted([p for p in points if p[2] != "probationary"], key=lambda p: p[0], reverse=True)
    parts = {"fp": 0}
    for p in scorable:
        if p[2] is not None:
            parts[p[2]] = -cost.fn_weight
    rows, current = [], 1.1
    for value, weighted, window in scorable:
        if value != current:
            rows.append((current, sum(parts.values())))
            current = value
        if window is None:
            parts["fp"] += weighted
        else:
            parts[window] = max(parts[window], weighted)
    rows.append((current, sum(parts.values())))
    return rows


def _generated_corpus(seed: int, files: int = 6, after_probation: bool = False) -> list[Series]:
    """Series of 200 to 1500 rows with up to 3 windows (some in the probationary period unless
    ``after_probation``), and scores with many ties."""
    rng = np.random.default_rng(seed)
    corpus = []
    for f in range(files):
        n = int(rng.integers(200, 1500))
        windows, cursor = [], int(rng.integers(n // 5 if after_probation else 0, n // 3))
        while cursor < n - 12 and len(windows) < 3 and f % 3:  # every third file has no window
            width = int(rng.integers(2, max(3, n // 10)))
            end = min(cursor + width, n - 1)
            windows.append((cursor, end))
            cursor = end + int(rng.integers(5, n // 2))
        scores = np.round(rng.random(n) ** 3, 3)  # rounded: many ties, as real detectors give
        for a, b in windows:
            scores[a + (b - a) // 2] = max(scores[a + (b - a) // 2], 0.9)
        corpus.append(Series(f"cat/series{f}.csv", scores, windows))
    return corpus


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_threshold_scores_as_nabs_sweeper_on_generated_corpora(seed: int, profile: str) -> None:
    cost = PROFILES[profile]
    corpus = _generated_corpus(seed)
    points = []
    for s in corpus:
        points.extend(_nab_sweep(len(s.scores), s.scores, s.windows, s.name, cost))
    reference = _nab_score_by_threshold(points, cost)
    ours = score_by_threshold(corpus, cost)
    assert np.allclose(ours.threshold, [r[0] for r in reference])
    assert np.allclose(ours.score, [r[1] for r in reference], atol=1e-9)
    best = max(range(len(reference)), key=lambda i: (reference[i][1], -i))
    assert ours.best() == best


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_per_series_scores_at_the_chosen_threshold_add_up_to_the_optimised_corpus_score(profile: str) -> None:
    corpus = _generated_corpus(5)
    result = nab_scores(corpus, {profile: PROFILES[profile]})[profile]
    table = score_by_threshold(corpus, PROFILES[profile])
    assert result.raw == pytest.approx(float(table.score.max()), abs=1e-9)
    assert result.raw == pytest.approx(sum(s.score for s in result.per_series), abs=1e-12)


def test_probation_is_fifteen_percent_capped_at_750_rows() -> None:
    assert probation_length(1000) == 150
    assert probation_length(1001) == 150
    assert probation_length(4000) == 600
    assert probation_length(22695) == 750.0


def test_a_detection_at_a_windows_first_row_earns_the_full_true_positive_weight() -> None:
    # 100 rows, probation 15; one window rows 40..49; detection on row 40 only.
    scores = np.zeros(100)
    scores[40] = 1.0
    series = Series("s", scores, [(40, 49)])
    result = score_series(series, PROFILES["standard"], threshold=1.0)
    assert result.score == pytest.approx(1.0)
    assert (result.tp, result.fp, result.fn, result.detected_windows) == (1, 0, 9, 1)


def test_a_missed_window_costs_the_false_negative_weight_and_a_lone_false_positive_its_weight() -> None:
    scores = np.zeros(100)
    scores[20] = 1.0  # before any window: a plain false positive
    series = Series("s", scores, [(40, 49)])
    for name, cost in PROFILES.items():
        got = score_series(series, cost, threshold=1.0).score
        assert got == pytest.approx(-cost.fp_weight - cost.fn_weight), name


def test_a_late_detection_scores_less_and_one_right_after_the_window_costs_little() -> None:
    cost = PROFILES["standard"]
    weights, window_id = sweep(Series("s", np.zeros(100), [(40, 49)]), cost)
    assert list(window_id[:15]) == [-2] * 15  # probation
    assert window_id[40] == 0 and window_id[49] == 0 and window_id[50] == -1
    inside = weights[40:50]
    assert np.all(np.diff(inside) < 0) and inside[0] == pytest.approx(1.0) and 0 < inside[-1] < 0.3
    assert -cost.fp_weight < weights[50] < 0  # just after the window, still a false positive
    assert weights[99] == pytest.approx(-cost.fp_weight)  # far after it: the full cost


def test_normalised_score_is_zero_for_the_null_detector_and_100_for_a_perfect_one() -> None:
    corpus = _generated_corpus(3, after_probation=True)
    null = [Series(s.name, np.full(len(s.scores), 0.5), s.windows) for s in corpus]
    perfect = []
    for s in corpus:
        scores = np.zeros(len(s.scores))
        for a, _ in s.windows:
            scores[a] = 1.0
        perfect.append(Series(s.name, scores, s.windows))
    for name in PROFILES:
        assert nab_scores(null, {name: PROFILES[name]})[name].normalised == pytest.approx(0.0)
        assert nab_scores(perfect, {name: PROFILES[name]})[name].normalised == pytest.approx(100.0)
        assert null_score(corpus, PROFILES[name]) == pytest.approx(
            -PROFILES[name].fn_weight * sum(len(s.windows) for s in corpus))


def test_fixed_detections_are_scored_as_they_stand_without_optimisation() -> None:
    scores = np.zeros(200)
    scores[[60, 150]] = 1.0  # one in the window, one far after it
    series = [Series("s", scores, [(55, 70)])]
    fixed = nab_scores(series, threshold=1.0)["standard"]
    expected = float(sweep(series[0], PROFILES["standard"])[0][60]) - 0.11
    assert fixed.threshold == 1.0 and fixed.raw == pytest.approx(expected)
    assert fixed.normalised == pytest.approx(100 * (expected + 1) / 2)


def test_windows_from_labels_and_from_timestamps() -> None:
    assert windows_from_labels([0, 1, 1, 0, 0, 1, 0, 1]) == [(1, 2), (5, 5), (7, 7)]
    assert windows_from_labels([0, 0]) == []
    times = ["2014-01-01 00:00:00", "2014-01-01 00:05:00", "2014-01-01 00:10:00", "2014-01-01 00:15:00"]
    assert window_rows(times, [["2014-01-01 00:05:00.000000", "2014-01-01 00:10:00.000000"]]) == [(1, 2)]
    with pytest.raises(ValueError, match="not a timestamp"):
        window_rows(times, [["2014-01-01 00:06:00", "2014-01-01 00:10:00"]])


def test_severity_maps_monotonically_into_the_unit_interval() -> None:
    got = severity_to_anomaly_score(np.array([np.nan, 0.0, 0.5, 1.0, 3.0, 1e9]))
    assert got[0] == 0.0 and got[3] == pytest.approx(0.5)
    assert np.all(np.diff(got[1:]) > 0) and got.max() < 1.0
