"""The GPU scripts without a GPU: scripts/gpu_check.sh and scripts/gpu_scale.sh plan their
steps under --dry-run and refuse unknown arguments (their shared parts: scripts/gpu_lib.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conkd_scale.utils.procs import ROOT


def _run(script: str, *args: str, out: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    return subprocess.run(
        ["bash", f"scripts/{script}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_gpu_scale_dry_run(tmp_path: Path) -> None:
    """gpu_scale.sh --dry-run plans the run and shows its commands."""
    proc = _run("gpu_scale.sh", "--dry-run", out=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = proc.stderr
    assert "would run [prepare corpus, tokenizer, random student and D]" in err
    assert "would run [distil 30 steps]" in err and "launch/distill.py" in err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["input"]["student"]["params"] > 0.9e9  # the ~1 B student
    assert plan["input"]["teacher"]["params"] > plan["input"]["student"]["params"]
    assert plan["input"]["device"] == "gpu" and plan["fits"]
    assert "total" in (tmp_path / "plan.txt").read_text()


def test_gpu_check_dry_run(tmp_path: Path) -> None:
    """gpu_check.sh --dry-run: the benchmarks parse their arguments, pytest selects GPU and
    CPU loss tests, and the summary lists every step as not run."""
    proc = _run("gpu_check.sh", "--dry-run", out=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok: bench/bench_loss_gpu.py --help" in proc.stderr
    gpu = int(proc.stderr.split("pytest -m 'gpu' selects ")[1].split()[0])
    assert gpu > 0
    summary = (tmp_path / "gpu_check.md").read_text()
    assert summary.count("not run (dry run)") == 4, summary


@pytest.mark.parametrize(
    ("script", "arg"), [("gpu_check.sh", "--bogus"), ("gpu_scale.sh", "--install")]
)
def test_gpu_scripts_refuse_unknown_arguments(script: str, arg: str, tmp_path: Path) -> None:
    proc = _run(script, arg, out=tmp_path)
    assert proc.returncode == 64 and f"unknown argument: {arg}" in proc.stderr
