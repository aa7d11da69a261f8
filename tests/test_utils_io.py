import os
import stat

import pytest

from conkd_scale.utils.io import atomic_dir, atomic_open, write_json


def test_atomic_open_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_open(target) as f:
        f.write("half")
        raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'


def test_atomic_dir_replaces_whole_and_cleans_up(tmp_path):
    out = tmp_path / "d"
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("1")
    with pytest.raises(ValueError), atomic_dir(out) as tmp:
        (tmp / "y").write_text("2")
        raise ValueError
    assert sorted(p.name for p in out.iterdir()) == ["x"]
    with atomic_dir(out) as tmp:
        (tmp / "z").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["z"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_outputs_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "f.json", {})
        with atomic_dir(tmp_path / "d"):
            pass
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755


def test_one_nan_policy_for_every_json_file(tmp_path):
    """NaN/inf anywhere in a JSON file or a metrics log is written as null (never the string
    "nan", which made `loss == loss` pass on a diverged run, nor bare NaN, which is not JSON)."""
    import json

    from conkd_scale.training.metrics import JsonlLogger
    from conkd_scale.utils.io import append_jsonl, write_jsonl

    nan, inf = float("nan"), float("inf")
    obj = {"a": nan, "b": [1.0, -inf, {"c": inf}], "d": (nan, 2), "e": 3, "f": "nan"}
    expect = {"a": None, "b": [1.0, None, {"c": None}], "d": [None, 2], "e": 3, "f": "nan"}
    write_json(tmp_path / "x.json", obj)
    write_jsonl(tmp_path / "x.jsonl", [obj])
    append_jsonl(tmp_path / "y.jsonl", obj)
    log = JsonlLogger(tmp_path / "metrics.jsonl")
    log.log({"step": 1, "loss": nan, "kd": inf})
    strict = {"parse_constant": lambda c: pytest.fail(f"non-JSON constant {c}")}
    assert json.loads((tmp_path / "x.json").read_text(), **strict) == expect
    for name in ("x.jsonl", "y.jsonl"):
        assert json.loads((tmp_path / name).read_text(), **strict) == expect
    row = json.loads((tmp_path / "metrics.jsonl").read_text(), **strict)
    assert row == {"step": 1, "loss": None, "kd": None}
