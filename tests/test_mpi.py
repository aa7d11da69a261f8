"""``mpirun -np 2 python launch/distill.py ...``: DeepSpeed's MPI discovery (mpi4py), 2 CPU ranks.

    mpirun --allow-run-as-root --oversubscribe --bind-to none -np 2 -x MASTER_PORT=29511 \
        .venv/bin/python launch/distill.py --deepspeed ds_configs/zero3.json [key=value ...]

Skipped, with the reason, where ``mpirun`` or mpi4py is missing (Open MPI: apt-get install
openmpi-bin libopenmpi-dev, or tests/cluster/start_slurm.sh). One run: tiny teachers are
trained inside it (teachers.auto_train, collectively under MPI), then a ZeRO-3 student.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.helpers_ds import ROOT, free_port


def _mpi_reason() -> str | None:
    if shutil.which("mpirun") is None:
        return "mpirun not on PATH (Open MPI: apt-get install openmpi-bin libopenmpi-dev)"
    # in a subprocess: importing mpi4py.MPI initialises MPI (and needs the system libmpi)
    check = subprocess.run(
        [sys.executable, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check.returncode != 0:
        err = (check.stderr.strip().splitlines() or ["?"])[-1]
        return f"mpi4py cannot load MPI ({err}); pip install mpi4py against Open MPI"
    return None


_REASON = _mpi_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def test_mpirun_two_ranks(tmp_path, synthetic_dir):
    out = tmp_path / "out"
    cmd = [
        "mpirun",
        "--allow-run-as-root",  # harmless when not root
        "--oversubscribe",
        "--bind-to",
        "none",  # each rank uses its own torch threads; no core pinning
        "-np",
        "2",
        "-x",
        f"MASTER_PORT={free_port()}",  # else DeepSpeed's MPI discovery takes 29500
        "-x",
        "OMP_NUM_THREADS=1",
        "-x",
        "PYTHONPATH",
        sys.executable,
        "launch/distill.py",
        "--deepspeed",
        "ds_configs/zero3.json",
        f"data_dir={synthetic_dir}",
        f"teachers.rec_dir={tmp_path}/rec",
        f"teachers.dialog_dir={tmp_path}/dialog",
        "teachers.rec_overrides=epochs=1",
        "teachers.dialog_overrides=model.preset=tiny,model.vocab_size=500,train.max_steps=8,"
        "train.eval_every=0,train.eval_max_batches=1,train.lr=5e-3",
        "max_length=128",
        "max_train_conversations=60",
        "train.progress=false",
        "train.log_every=1",
        "train.micro_batch=4",
        "student.preset=tiny",
        "train.eval_every=0",
        "train.eval_max_batches=1",
        "train.max_steps=4",
        "train.save_every=2",
        f"output_dir={out}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    for k in [k for k in env if k.startswith(("SLURM_", "OMPI_", "PMIX_", "PMI_"))]:
        del env[k]  # not inside another launcher's job
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        env.pop(k, None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=800, check=False
    )
    text = proc.stdout + proc.stderr
    (tmp_path / "mpirun.log").write_text(
        f"$ {' '.join(cmd)}\n# {time.perf_counter() - t0:.1f} s\n{text}"
    )
    assert proc.returncode == 0, text[-6000:]
    info = json.loads((out / "run_info.json").read_text())
    assert info["launcher"] == "mpi" and info["world_size"] == 2, info
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002", "step_00000004"]
    assert (out / "hf" / "config.json").is_file()
