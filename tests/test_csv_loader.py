"""trainer.data's CSV loader: one key per file, never two files merged into one key."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.data import CsvSpec, file_keys, load_csv


def _write_series(path: Path, rows: int, value: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["timestamp,value,label"] + [f"2026-01-01 00:{i // 60:02d}:{i % 60:02d},{value + i},0" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")


def test_same_named_files_in_different_folders_are_distinct_keys(tmp_path: Path) -> None:
    files = []
    for folder in ("valve1", "valve2", "other"):
        for n in range(1, 7):
            f = tmp_path / folder / f"{n}.csv"
            _write_series(f, 5, 100.0 * n)
            files.append(str(f))
    data = load_csv([str(tmp_path / "valve1"), str(tmp_path / "valve2"), str(tmp_path / "other")], "sensors",
                    CsvSpec(label_column="label"))
    keys = {e.key for e in data.events}
    assert len(keys) == 18 and data.describe()["keys"] == 18
    assert {"valve1/1", "valve2/1", "other/1", "other/6"} <= keys
    assert len({e.event_id for e in data.events}) == len(data.events) == 90
    # Each key holds its own file's rows only.
    by_key = {}
    for e in data.events:
        by_key.setdefault(e.key, []).append(e.values[0])
    assert sorted(by_key["valve2/3"]) == [300.0, 301.0, 302.0, 303.0, 304.0]


def test_unambiguous_files_keep_their_bare_names(tmp_path: Path) -> None:
    a, b = tmp_path / "x" / "a.csv", tmp_path / "y" / "b.csv.gz"
    assert file_keys([str(a), str(b)]) == {str(a): "a", str(b): "b"}
    _write_series(tmp_path / "x" / "a.csv", 3, 1.0)
    data = load_csv([str(tmp_path / "x" / "a.csv")], "sensors", CsvSpec())
    assert {e.key for e in data.events} == {"a"} and data.events[0].event_id == "a-0"


def test_nested_folders_key_by_the_path_below_the_common_root(tmp_path: Path) -> None:
    paths = [str(tmp_path / "d" / "1.csv"), str(tmp_path / "d" / "sub" / "1.csv")]
    assert file_keys(paths) == {paths[0]: "1", paths[1]: "sub/1"}


def test_the_same_file_given_twice_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "1.csv"
    other = tmp_path / "z" / "1.csv"
    with pytest.raises(ValueError, match="more than once"):
        file_keys([str(f), str(f), str(other)])


def test_a_label_column_is_found_by_name_and_never_read_as_a_channel(tmp_path: Path) -> None:
    _write_series(tmp_path / "s.csv", 4, 1.0)
    data = load_csv([str(tmp_path / "s.csv")], "sensors", CsvSpec())
    assert list(data.profile.feature_names) == ["value"]
    (tmp_path / "t.csv").write_text("timestamp,value,label\n2026-01-01 00:00:00,1.0,0\n2026-01-01 00:00:01,9.0,1\n")
    data = load_csv([str(tmp_path / "t.csv")], "sensors", CsvSpec())
    assert data.labels == [0, 1]
    # A file without the guessed column reads as unlabelled, not as an error.
    (tmp_path / "u.csv").write_text("timestamp,value\n2026-01-01 00:00:02,1.0\n")
    data = load_csv([str(tmp_path / "t.csv"), str(tmp_path / "u.csv")], "sensors", CsvSpec())
    assert data.labels == [0, 1, 0]
