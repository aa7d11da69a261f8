"""What a finished run measured, to set beside the plan: each rank's peak resident memory
(polled from /proc while the job runs) and its model-state bytes (from its ZeRO checkpoint).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

_RANK_RE = re.compile(r"--local_rank[= ](\d+)")


def _status_kib(pid: int, *keys: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in keys:
            out[name] = int(rest.split()[0])
    return out


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return kids


def _rank_processes(root: int) -> dict[int, int]:
    """``{local rank: pid}`` of the rank processes under ``root`` (``--local_rank=N``)."""
    ranks: dict[int, int] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        m = _RANK_RE.search(cmd)
        if m and "python" in cmd:
            ranks[int(m.group(1))] = pid
        todo += _children(pid)
    return ranks


class RankMemoryPoller:
    """Polls the rank processes under a launcher's pid: per rank, the kernel's resident
    high-water mark (``VmHWM``: every resident page, mapped files included) and the largest
    anonymous resident size seen (``RssAnon``: the process's own allocations)."""

    def __init__(self, root_pid: int, interval_s: float = 0.2) -> None:
        self.root, self.interval = root_pid, interval_s
        self.hwm_kib: dict[int, int] = {}
        self.anon_kib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rank-mem-poller", daemon=True)

    def start(self) -> RankMemoryPoller:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            for rank, pid in _rank_processes(self.root).items():
                st = _status_kib(pid, "VmHWM", "RssAnon")
                if "VmHWM" in st:
                    self.hwm_kib[rank] = max(self.hwm_kib.get(rank, 0), st["VmHWM"])
                if "RssAnon" in st:
                    self.anon_kib[rank] = max(self.anon_kib.get(rank, 0), st["RssAnon"])
            self._stop.wait(self.interval)

    def stop(self) -> dict[int, dict[str, float]]:
        """Stop polling; ``{rank: {"peak_rss_mib", "peak_anon_mib"}}``."""
        self._stop.set()
        self._thread.join()
        return {
            r: {
                "peak_rss_mib": self.hwm_kib[r] / 1024,
                "peak_anon_mib": self.anon_kib.get(r, 0) / 1024,
            }
            for r in sorted(self.hwm_kib)
        }


def checkpoint_state_bytes(step_dir: str | Path) -> dict[int, dict[str, Any]]:
    """Per rank of a ZeRO checkpoint directory: the numel of its fp32 weight partition and
    the bytes of that partition and of its Adam moments, read from the rank's
    ``zero_pp_rank_R_mp_rank_00_optim_states.pt``."""
    import torch

    out: dict[int, dict[str, Any]] = {}
    for f in sorted(Path(step_dir).glob("zero_pp_rank_*_mp_rank_*_optim_states.pt")):
        rank = int(f.name.split("_")[3])
        sd = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        flat = sd["fp32_flat_groups"]
        moments = [
            v
            for st in sd["optimizer_state_dict"]["state"].values()
            for k, v in st.items()
            if k in ("exp_avg", "exp_avg_sq")
        ]
        out[rank] = {
            "partition_numel": int(sum(t.numel() for t in flat)),
            "master_bytes": int(sum(t.numel() * t.element_size() for t in flat)),
            "moments_bytes": int(sum(t.numel() * t.element_size() for t in moments)),
        }
    return out
