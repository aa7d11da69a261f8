"""R under a 2-process launch (torchrun, gloo): rank 0 trains, rank 1 waits and gets the result.

One torchrun launch (~10-20 s on 2 CPU cores) runs a helper script that, on both ranks,
first makes rank 0 fail (a missing data dir: rank 1 must raise, not hang) and then trains.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conkd_scale.data.synthetic import write_synthetic

ROOT = Path(__file__).resolve().parents[1]

HELPER = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import torch.distributed as dist
    from conkd_scale.config import build_config
    from conkd_scale.distributed import init_distributed
    from conkd_scale.rec.train import RecTeacherConfig, train_rec_teacher

    data, out, report = sys.argv[1:4]
    info = init_distributed("gloo", timeout_minutes=5)
    rank, world, created = info.rank, info.world_size, dist.is_initialized()
    res = {"rank": rank, "world": world, "created": created,
           "threads_before": torch.get_num_threads()}
    tiny = ["dataset=synthetic", "min_relation_count=0", "dim=16", "num_bases=2", "epochs=2",
            "lr=0.01", "progress=false"]
    bad = build_config(RecTeacherConfig, None, [*tiny, f"data_dir={data}/missing",
                                                f"output_dir={out}/bad"])
    try:
        train_rec_teacher(bad)
        res["failure"] = None
    except Exception as e:
        res["failure"] = type(e).__name__ + ": " + str(e)
    good = build_config(RecTeacherConfig, None, [*tiny, f"data_dir={data}",
                                                 f"output_dir={out}/good"])
    res["metrics"] = train_rec_teacher(good)
    res["threads_after"] = torch.get_num_threads()
    dist.barrier()
    dist.destroy_process_group()
    with open(f"{report}/rank{rank}.json", "w") as f:
        json.dump(res, f)
    """
)


@pytest.mark.slow
def test_rank0_trains_others_wait(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_synthetic(data, seed=0, conversations=100, items=40)
    helper = tmp_path / "helper.py"
    helper.write_text(HELPER)
    report = tmp_path / "report"
    report.mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(helper),
        str(data),
        str(tmp_path / "out"),
        str(report),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((report / "rank0.json").read_text())
    r1 = json.loads((report / "rank1.json").read_text())
    assert (r0["world"], r1["world"]) == (2, 2) and r0["created"] and r1["created"]
    # rank 0's failure reaches rank 1 (a RankZeroError naming the cause), nobody hangs
    assert r0["failure"].startswith("DataError") and "does not exist" in r0["failure"]
    assert r1["failure"].startswith("RankZeroError") and "DataError" in r1["failure"]
    # both ranks return rank 0's metrics; only rank 0 computed (it alone raised its threads)
    assert r0["metrics"] == r1["metrics"] and r0["metrics"]["R@50"] > 0
    assert r0["threads_before"] == 1 == r1["threads_after"]  # torchrun sets OMP_NUM_THREADS=1
    assert r0["threads_after"] == len(os.sched_getaffinity(0))
    assert (tmp_path / "out" / "good" / "checkpoint" / "rec_teacher.pt").is_file()
