"""atomic_write / write_json: a reader sees the old file or the whole new one, never a part."""
import json
import os

import pytest

from threestudio_rfds.atomic import atomic_write, write_json


def test_write_json_round_trips_and_names_non_finite_floats(tmp_path):
    path = str(tmp_path / "run.json")
    write_json(path, {"b": [1.5, float("nan")], "a": {"x": float("inf")}}, sort_keys=True)
    text = open(path).read()
    assert text.index('"a"') < text.index('"b"')  # sort_keys honoured
    assert json.loads(text) == {"a": {"x": "inf"}, "b": [1.5, "nan"]}
    assert os.listdir(tmp_path) == ["run.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "run.json")
    write_json(path, {"v": 1})

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write('{"v": 2, "half')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert json.load(open(path)) == {"v": 1}
    assert os.listdir(tmp_path) == ["run.json"]
