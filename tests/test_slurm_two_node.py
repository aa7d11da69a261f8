"""slurm/*.sh across two hosts: ``--nodes=2``, one CPU rank per node, gloo between the nodes.

    tests/cluster/start_slurm_two_node.sh
    .venv/bin/python -m pytest -q tests/test_slurm_two_node.py

The cluster of tests/cluster/start_slurm_two_node.sh: nodes ``conkd-n1`` and ``conkd-n2`` are
network namespaces on this machine with their own addresses (``10.213.77.11``/``.12`` by
default), host names, ``/etc/hosts`` and ``slurmd``; the controller listens on the bridge
between them (``SLURM_CONF=/etc/slurm-two-node/slurm.conf``). Skipped, with the reason, when
that cluster is not up. Jobs: ``--nodes=2 --ntasks-per-node=1 --cpus-per-task=1``.

- a module fixture trains tiny teachers with slurm/teachers.sh (R on one node, D on both);
- slurm/distill.sh completes with rank 0 on conkd-n1 and rank 1 on conkd-n2, the rendezvous
  at ``conkd-n1`` (the first node of the allocation);
- pre-emption the way a cluster sends it, ``scancel --signal=TERM``: both ranks save one
  checkpoint, the job exits 75 and is requeued, the requeued run resumes and completes; the
  ranks' gloo connections run between the two namespace addresses;
- a rank killed on one node (SIGKILL) ends the job on both nodes, FAILED, within a bound,
  with no process of the job left on either node;
- a rendezvous host (MASTER_ADDR) the nodes cannot resolve: exit 2 at once, saying what to do.

The clear error for a rendezvous host that does not resolve always runs (no cluster needed).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conkd_scale.utils.errors import ConfigError
from tests.test_slurm import (
    Jobs,
    _train_steps,
    assert_completed,
    distill_args,
    rows,
    train_teachers,
    wait_for_train_row,
)

CONF = "/etc/slurm-two-node/slurm.conf"
SLURM_ENV = {"SLURM_CONF": CONF}
NODES = ("conkd-n1", "conkd-n2")
CLUSTER = "ci2"  # ClusterName of that slurm.conf: tells its jobs' processes from others
TWO_NODE_JOB = [
    "--nodes=2",
    "--gpus-per-node=0",
    "--ntasks-per-node=1",
    "--cpus-per-task=1",
    "--time=30",
]
# a killed rank must end the job on both nodes within this many seconds (measured: see
# docs/reliability.md); generous for a loaded 2-core machine
KILL_BOUND_S = 60.0


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=20, env={**os.environ, **SLURM_ENV}
    )


def _cluster_reason() -> str | None:
    """Why the two-node tests cannot run here, or None."""
    start = "start it with tests/cluster/start_slurm_two_node.sh (as root)"
    if not Path(CONF).is_file():
        return f"no two-node test cluster configured ({CONF} missing); {start}"
    if not all(Path("/run/netns", n).exists() for n in NODES):
        return f"the nodes' network namespaces {NODES} do not exist; {start}"
    try:
        ping = _run(["scontrol", "ping"])
        if "is UP" not in ping.stdout:
            said = (ping.stdout.strip() or ping.stderr.strip() or "nothing").splitlines()[0]
            return f"two-node cluster not up (scontrol ping: {said}); {start}"
        states = dict(
            line.split()
            for line in _run(["sinfo", "-h", "-N", "-o", "%N %T"]).stdout.splitlines()
            if line.strip()
        )
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return f"two-node cluster not usable: {e}"
    usable = ("idle", "mix", "alloc")
    if not all(states.get(n, "").rstrip("*~#").startswith(usable) for n in NODES):
        return f"two-node cluster nodes not usable (sinfo: {states}); {start}"
    return None


_REASON = _cluster_reason()


def cluster_test(fn):
    fn = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")(fn)
    return pytest.mark.slow(fn)


# ----------------------------------------------------------------------------- helpers
def _job_pids(job_id: str) -> dict[int, str]:
    """pid -> command line of every process of this cluster's job ``job_id`` (batch shell,
    srun, slurmstepd's children, ranks), on both nodes (one /proc: one machine)."""
    want = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_CLUSTER_NAME={CLUSTER}".encode()}
    found: dict[int, str] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = set((proc / "environ").read_bytes().split(b"\0"))
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if want <= env:
            found[int(proc.name)] = cmd.strip()
    return found


def _rank_pid(job_id: str, rank: int) -> int | None:
    """The pid of one rank's Python process (in an srun step, not the batch shell)."""
    for pid, cmd in _job_pids(job_id).items():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        in_step = any(x.startswith(b"SLURM_STEP_ID=") for x in env)
        mine = f"SLURM_PROCID={rank}".encode() in env
        if in_step and mine and "launch/distill.py" in cmd and not cmd.startswith("srun"):
            return pid
    return None


def _node_of(pid: int) -> str | None:
    """The node whose network namespace the process lives in."""
    ino = os.stat(f"/proc/{pid}/ns/net").st_ino
    for node in NODES:
        if os.stat(f"/run/netns/{node}").st_ino == ino:
            return node
    return None


def _node_addr(node: str) -> str:
    """The node's address, from its own /etc/hosts (what its processes resolve)."""
    for line in Path(f"/etc/netns/{node}/hosts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and node in fields[1:]:
            return fields[0]
    raise AssertionError(f"{node} not in /etc/netns/{node}/hosts")


def _connections(pid: int) -> list[tuple[str, str, int]]:
    """(local address, remote address, remote port) of the process's own ESTABLISHED IPv4
    TCP connections: its socket fds looked up in its namespace's /proc/PID/net/tcp."""

    def addr(field: str) -> tuple[str, int]:
        ip, port = field.split(":")
        return socket.inet_ntoa(int(ip, 16).to_bytes(4, "little")), int(port, 16)

    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == "01" and f[9] in inodes:  # state ESTABLISHED, one of this process's sockets
            (local, _), (remote, port) = addr(f[1]), addr(f[2])
            found.append((local, remote, port))
    return found


@pytest.fixture(scope="module")
def jobs():
    j = Jobs(TWO_NODE_JOB, SLURM_ENV)
    yield j
    j.cancel_active()


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, synthetic_dir, jobs) -> Path:
    """Tiny R and D trained once by slurm/teachers.sh (R: 1 process on one node; D: one rank
    on each node)."""
    root = tmp_path_factory.mktemp("slurm2")
    train_teachers(jobs, synthetic_dir, root)
    info = json.loads((root / "teachers" / "dialog" / "run_info.json").read_text())
    assert info["hosts"] == list(NODES), info
    assert (root / "teachers" / "rec" / "checkpoint" / "rec_teacher.pt").is_file()
    return root


def _submit_distill(jobs: Jobs, teachers: Path, data: Path, out: Path, *extra: str) -> str:
    return jobs.submit(
        "slurm/distill.sh", distill_args(teachers, data, out, *extra), teachers / "logs"
    )


# ----------------------------------------------------------------------------- tests
@cluster_test
def test_distill_across_two_nodes_completes(teachers, synthetic_dir, jobs):
    out = teachers / "a"
    job = _submit_distill(
        jobs, teachers, synthetic_dir, out, "train.max_steps=4", "train.save_every=2"
    )
    info = jobs.wait(job, timeout=600)
    assert_completed(jobs, job, info)
    assert info["NodeList"] == "conkd-n[1-2]" and info["NumNodes"] == "2", info
    run = json.loads((out / "run_info.json").read_text())
    # one rank per node, rank 0 on the first node, the rendezvous at the first node's name
    assert run["launcher"] == "slurm" and run["world_size"] == 2, run
    assert run["hosts"] == list(NODES), run
    assert run["master"].startswith("conkd-n1:"), run
    assert [r["step"] for r in rows(out, "train")] == [1, 2, 3, 4]
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002", "step_00000004"]
    for c in ckpts:
        assert (out / "checkpoints" / c / "manifest.json").is_file(), c
    assert (out / "hf" / "config.json").is_file()
    assert list((out / "hf").glob("*.safetensors")) or list((out / "hf").glob("*.bin"))
    log = jobs.log(job)
    assert "2 node(s) x 1 rank(s)" in log and "master conkd-n1:" in log, log
    assert "done" in log, log


@cluster_test
def test_sigterm_preempts_saves_and_requeues_across_nodes(teachers, synthetic_dir, jobs):
    """``scancel --signal=TERM JOB`` signals the ranks on both nodes (not the batch shell):
    each saves at the next step boundary and exits 75; slurm/common.sh requeues on 75; the
    requeued run resumes from that checkpoint and finishes, each step logged once."""
    out = teachers / "pre"
    total = 60
    job = _submit_distill(
        jobs, teachers, synthetic_dir, out, f"train.max_steps={total}", "train.save_every=1000"
    )
    wait_for_train_row(jobs, job, out / "metrics.jsonl", timeout=600)
    pids = {rank: _rank_pid(job, rank) for rank in (0, 1)}
    assert None not in pids.values(), f"ranks of job {job}: {pids}\n{jobs.log(job)}"
    assert {r: _node_of(p) for r, p in pids.items()} == dict(enumerate(NODES)), pids
    # the ranks talk over the link between the namespaces: each rank's own TCP connections
    # (gloo's pairs) run from its node's address to the other node's, none over the loopback
    addrs = [_node_addr(n) for n in NODES]
    for rank, pid in pids.items():
        conns = {c[:2] for c in _connections(pid)}
        assert conns == {(addrs[rank], addrs[1 - rank])}, f"rank {rank}'s connections: {conns}"

    t0 = time.monotonic()
    _run(["scancel", "--signal=TERM", job]).check_returncode()
    t_end = t0 + 300
    while not rows(out, "preempted") or jobs.info(job).get("Restarts") != "1":
        assert time.monotonic() < t_end, f"no pre-emption after SIGTERM:\n{jobs.log(job)}"
        time.sleep(0.25)
    requeued_s = time.monotonic() - t0
    (pre,) = rows(out, "preempted")
    k = pre["step"]
    assert 1 <= k < total, pre
    ckpt = out / "checkpoints" / f"step_{k:08d}"
    assert (ckpt / "manifest.json").is_file() and (ckpt / "meta.json").is_file()

    info = jobs.wait(job, timeout=600)
    assert_completed(jobs, job, info)
    assert info.get("Restarts") == "1", info
    log = jobs.log(job, tail=30000)
    assert log.count("pre-empted (exit 75): requeueing") == 1, log
    assert f"resumed from {ckpt} at step {k} " in log, log
    assert _train_steps(out / "metrics.jsonl") == list(range(1, total + 1))
    (final,) = rows(out, "final")
    assert final["step"] == total and final["stopped_early"] is False
    assert (out / "hf" / "config.json").is_file()
    print(f"SIGTERM -> checkpoint step {k}, exit 75, requeued after {requeued_s:.1f} s")


@cluster_test
def test_killed_rank_on_one_node_ends_the_job_on_both(teachers, synthetic_dir, jobs):
    """SIGKILL to rank 1 (conkd-n2): srun --kill-on-bad-exit ends rank 0 on conkd-n1, the job
    FAILS (a crash is not a pre-emption: no requeue) within KILL_BOUND_S, and no process of
    the job is left on either node."""
    out = teachers / "kill"
    job = _submit_distill(jobs, teachers, synthetic_dir, out, "train.max_steps=100000")
    wait_for_train_row(jobs, job, out / "metrics.jsonl", timeout=600)
    victim, survivor = _rank_pid(job, 1), _rank_pid(job, 0)
    assert victim and survivor, f"ranks of job {job}: {_job_pids(job)}\n{jobs.log(job)}"
    assert (_node_of(victim), _node_of(survivor)) == (NODES[1], NODES[0])

    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    info = jobs.wait(job, timeout=KILL_BOUND_S, poll=0.25)
    failed_s = time.monotonic() - t0
    assert info["JobState"] == "FAILED", f"{info}\n{jobs.log(job)}"
    assert info["ExitCode"] != "0:0" and info.get("Restarts") == "0", info
    while (left := _job_pids(job)) and time.monotonic() - t0 < KILL_BOUND_S:
        time.sleep(0.25)
    gone_s = time.monotonic() - t0
    assert not left, f"processes of job {job} left after {gone_s:.0f} s: {left}"
    assert failed_s < KILL_BOUND_S and gone_s < KILL_BOUND_S
    print(
        f"rank 1 killed on {NODES[1]} -> job FAILED after {failed_s:.1f} s, "
        f"no process left after {gone_s:.1f} s"
    )


@cluster_test
def test_unresolvable_rendezvous_host_fails_fast_with_what_to_do(teachers, synthetic_dir, jobs):
    """MASTER_ADDR names a host the nodes cannot resolve: the ranks stop at once with exit 2
    and say what to do (instead of retrying their rendezvous until the collective timeout);
    srun --kill-on-bad-exit ends the step, and the job exits with the first rank's 2 (not
    the 143 of a rank srun terminated); a configuration error is not requeued and writes
    nothing."""
    out = teachers / "bad_master"
    job = jobs.submit(
        "slurm/distill.sh",
        distill_args(teachers, synthetic_dir, out, "train.max_steps=2"),
        teachers / "logs",
        env={"MASTER_ADDR": "conkd-n9"},
    )
    info = jobs.wait(job, timeout=300)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", f"{info}\n{jobs.log(job)}"
    assert info.get("Restarts") == "0", info
    log = jobs.log(job)
    assert "Exited with exit code 2" in log, log
    said = "MASTER_ADDR='conkd-n9' (the job's nodes: conkd-n[1-2]) cannot be resolved on host"
    assert said in log and "export MASTER_ADDR=" in log, log
    assert not (out / "run_info.json").exists() and not (out / "checkpoints").exists()


# ----------------------------------------------------------------------------- no cluster
def test_unresolvable_master_addr_is_a_clear_error():
    """A rendezvous host that does not resolve stops the rank at once (exit 2) with what to
    do, instead of a rendezvous retried until the collective timeout."""
    from conkd_scale.distributed import check_master_addr

    env = {"MASTER_ADDR": "conkd-no-such-node.invalid", "SLURM_JOB_NODELIST": "conkd-x[1-2]"}
    with pytest.raises(ConfigError) as exc:
        check_master_addr(env, "slurm")
    msg = str(exc.value)
    assert "MASTER_ADDR='conkd-no-such-node.invalid'" in msg and "conkd-x[1-2]" in msg, msg
    assert "export MASTER_ADDR=" in msg and "/etc/hosts" in msg, msg
    assert exc.value.exit_code == 2
    check_master_addr({"MASTER_ADDR": "127.0.0.1"}, "env")  # resolvable: no error
