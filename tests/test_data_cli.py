import json
import subprocess
import sys

import pytest


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "conkd_scale.data", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("name, n", [("redial", 2043), ("inspired", 721)])
def test_stats_on_real_data(name, n, request):
    data_dir = request.getfixturevalue(f"{name}_dir")
    r = _run("stats", "--dataset", name, "--data-dir", str(data_dir), "--split", "train")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["conversations"] == n
    for key in (
        "messages",
        "recommendation_turns",
        "items",
        "kg_entities",
        "kg_relations",
        "kg_edges",
        "items_without_kg_node",
    ):
        assert isinstance(st[key], int)


def test_synth_then_stats(tmp_path):
    out = tmp_path / "syn"
    r = _run("synth", "--out", str(out), "--seed", "3", "--conversations", "60")
    assert r.returncode == 0, r.stderr
    r = _run("stats", "--dataset", "synthetic", "--data-dir", str(out), "--split", "train")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["conversations"] > 0 and st["recommendation_turns"] > 0 and st["kg_edges"] > 0


def test_clear_error_and_exit_code(tmp_path):
    r = _run("stats", "--dataset", "redial", "--data-dir", str(tmp_path / "nope"))
    assert r.returncode == 2 and "data directory does not exist" in r.stderr
    (tmp_path / "movies_with_mentions.csv").write_text("movieId,movieName\n1,A\n")
    (tmp_path / "train_data.jsonl").write_text('{"conversationId": 1\n')
    r = _run("stats", "--dataset", "redial", "--data-dir", str(tmp_path), "--kg", "none")
    assert r.returncode == 2 and "train_data.jsonl:1: not valid JSON" in r.stderr
