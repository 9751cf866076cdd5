"""The transactions profile's last-seen time never goes back: one old or forged timestamp cannot
inflate the next in-order event's `log_seconds_since_prev`."""

from __future__ import annotations

import math

import numpy as np

from stream_detector.profiles import TransactionProfile

T0 = 1_767_225_600.0


def _gaps(timestamps: list[float]) -> list[float]:
    profile = TransactionProfile()
    state = np.zeros(profile.state_size)
    out = np.zeros(profile.n_features)
    gap = profile.feature_names.index("log_seconds_since_prev")
    gaps = []
    for ts in timestamps:
        profile.featurize((10.0, "T1"), ts, state, out)
        gaps.append(float(out[gap]))
    return gaps


def test_an_old_timestamp_does_not_rewind_the_last_seen_time():
    gaps = _gaps([T0, T0 + 600, T0 - 2_000_000, T0 + 1200])
    assert round(gaps[1], 2) == 6.40  # log1p(600)
    assert gaps[2] == 0.0  # the old event itself: no negative gap
    assert gaps[3] == math.log1p(600)  # measured from the newest time seen, not from the old event (14.7)


def test_in_order_events_keep_their_gaps():
    assert _gaps([T0, T0 + 5, T0 + 65]) [1:] == [math.log1p(5), math.log1p(60)]
