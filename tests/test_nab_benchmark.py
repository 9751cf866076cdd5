"""benchmarks/nab.py end to end on a generated NAB-shaped corpus (no real NAB data)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("nab_benchmark", ROOT / "benchmarks" / "nab.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _write_corpus(root: Path) -> None:
    rng = np.random.default_rng(3)
    start = np.datetime64("2026-01-01T00:00:00")
    windows = {}
    for category, name, spike in (("artificialTest", "with_spike.csv", 900), ("realTest", "calm.csv", None)):
        n = 1200
        value = 20 + 5 * np.sin(2 * np.pi * np.arange(n) / 144) + rng.normal(0, 0.3, n)
        stamps = [str(start + np.timedelta64(5 * i, "m")).replace("T", " ") for i in range(n)]
        entry = []
        if spike is not None:
            value[spike:spike + 6] += 30
            entry = [[stamps[spike - 20] + ".000000", stamps[spike + 20] + ".000000"]]
        (root / "data" / category).mkdir(parents=True, exist_ok=True)
        (root / "data" / category / name).write_text(
            "timestamp,value\n" + "".join(f"{t},{v:.4f}\n" for t, v in zip(stamps, value)))
        windows[f"{category}/{name}"] = entry
    (root / "labels").mkdir()
    (root / "labels" / "combined_windows.json").write_text(json.dumps(windows))


def test_the_nab_benchmark_trains_on_probation_streams_scores_and_reports(tmp_path: Path) -> None:
    _write_corpus(tmp_path / "nab")
    out = tmp_path / "report" / "nab.md"
    results = tmp_path / "results"
    bench = _load_benchmark()
    assert bench.main(["--nab", str(tmp_path / "nab"), "--out", str(out), "--results-dir", str(results)]) == 0
    text = out.read_text()
    assert "## Totals" in text and "Spread across series" in text and "realTest/calm.csv" in text
    assert "Threshold chosen on the other categories" in text
    payload = json.loads(out.with_suffix(".json").read_text())
    info = payload["series"]["artificialTest/with_spike.csv"]
    assert info["train_rows"] == 180  # floor(0.15 x 1200)
    for name in ("product", "product_alerts", "product_openings", "rolling_zscore", "rolling_zscore_over"):
        assert set(payload["scores"][name]) == {"standard", "reward_low_FP_rate", "reward_low_FN_rate"}
    cross = payload["leave_one_category_out"]["product"]["standard"]["categories"]
    assert set(cross) == {"artificialTest", "realTest"}
    # A 100-sigma spike inside the window: found by the optimised figure.
    product = payload["scores"]["product"]["standard"]
    assert product["per_series"]["artificialTest/with_spike.csv"]["detected_windows"] == 1
    # NAB-format result files, one per detector and series.
    csv_file = results / "product" / "artificialTest" / "product_with_spike.csv"
    lines = csv_file.read_text().splitlines()
    assert lines[0] == "timestamp,value,anomaly_score,label" and len(lines) == 1201
    assert sum(int(line.rsplit(",", 1)[1]) for line in lines[1:]) == 41  # the window's rows are labelled
