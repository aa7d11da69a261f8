"""Child processes of the orchestrators (results table, scaling study): logged runs, ports."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (for a launcher's ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_logged(cmd: Sequence[str], log: Path, cwd: Path = ROOT) -> float:
    """Run ``cmd`` (from the project root) with its output in ``log``; returns the wall
    time. Raises ``RuntimeError`` with the log's tail when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(list(cmd), cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}); log {log}:\n{tail}")
    return wall
