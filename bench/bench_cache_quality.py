"""Students distilled from the teacher cache against students distilled with D online: same
teachers, seeds and settings, metrics compared with the seed spread, and the wall time.

    python bench/bench_cache_quality.py --config configs/results_synthetic.yaml \
        [--rows hard,soft] [--work runs/bench/cache_quality/synthetic] [--out FILE] [key=value ...]
    # reuse an online table's students (and its walls) instead of training them again:
    python bench/bench_cache_quality.py --config configs/results_redial.yaml --rows soft \
        --online-work runs/results/redial --online-results results/redial \
        data_dir=../shared/data/redial
    # a cache setting for the offline side only:
    python bench/bench_cache_quality.py ... --offline-distill teachers.cache_tail_samples=32

Runs ``launch/results_table.py`` twice on the given rows (``only=``): ``teachers_mode=online``
in ``<work>/online`` (or ``--online-work``), then ``teachers_mode=offline`` in
``<work>/offline`` with a copy of the online side's trained R and D (the teachers are
trained first, on their own, when missing, so neither side's wall includes them). Per row
and metric: mean ± sd over the seeds on each side, the paired (same-seed) difference, and
whether |offline − online| lies within the larger of the two seed sds. Walls, from each
table's ``run_walls_s``: the students' training runs, plus the cache job on the offline side;
and every job of the table (``--rows all``: the whole table, teachers excluded).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conkd_scale.utils.io import atomic_open  # noqa: E402

METRICS = ("PPL", "R@1", "R@10", "R@50", "R@10/new", "F1@1[class]", "Dist-2", "BLEU-2")


def _table(config: str, work: Path, results: Path, mode: str, rows: str, over: list[str]) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "launch/results_table.py"),
        "--config",
        config,
        *over,
        f"work_dir={work}",
        f"results_dir={results}",
        f"teachers_mode={mode}",
        f"only={rows}",
    ]
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads((results / "results.json").read_text(encoding="utf-8"))


def _train_teachers(config: str, work: Path, over: list[str]) -> None:
    """R and D into ``work/teachers`` with the table's settings, when missing."""
    from conkd_scale.config import build_config
    from conkd_scale.jobs import teacher_commands
    from conkd_scale.results.table import TEACHERS_FROM, ResultsConfig, ResultsTable

    cfg = build_config(ResultsConfig, ROOT / config, [*over, f"work_dir={work}"])
    args = ResultsTable(cfg)._distill_args(TEACHERS_FROM)  # the table's own teacher settings
    for name, cmd in teacher_commands(cfg.nproc, args):
        print(f"+ teacher {name}:", shlex.join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)


def _per_seed(row: dict, metric: str) -> dict[str, float]:
    return {s: m[metric] for s, m in row.get("per_seed", {}).items() if m.get(metric) is not None}


def _fmt(xs: list[float]) -> str:
    if not xs:
        return "–"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):.4f} ± {sd:.4f}"


def compare(online: dict, offline: dict, rows: list[str]) -> tuple[list[str], int, int]:
    """Markdown table lines, and how many (row, metric) pairs lie within the seed spread of
    how many compared."""
    lines = [
        "| row | metric | online (mean ± sd) | offline (mean ± sd) | paired diff (mean ± sd) "
        "| within seed sd |",
        "|---|---|---|---|---|---|",
    ]
    within = total = 0
    for key in rows:
        on_row, off_row = online["rows"][key], offline["rows"][key]
        for metric in METRICS:
            on, off = _per_seed(on_row, metric), _per_seed(off_row, metric)
            seeds = sorted(set(on) & set(off))
            if len(seeds) < 2:
                continue
            a, b = [on[s] for s in seeds], [off[s] for s in seeds]
            diffs = [y - x for x, y in zip(a, b, strict=True)]
            spread = max(statistics.stdev(a), statistics.stdev(b))
            ok = abs(statistics.fmean(b) - statistics.fmean(a)) <= spread
            within += ok
            total += 1
            lines.append(
                f"| {key} | {metric} | {_fmt(a)} | {_fmt(b)} | {_fmt(diffs)} | "
                f"{'yes' if ok else 'no'} |"
            )
    return lines, within, total


def _walls(report: dict, rows: list[str]) -> tuple[float | None, float]:
    """Seconds: the rows' student training runs (None if any was reused without a recorded
    wall), and the cache jobs."""
    walls = report.get("run_walls_s", {})
    train = 0.0
    for key in rows:
        for seed in report["rows"][key].get("seeds", []):
            w = walls.get(f"{key}/seed{seed}/train")
            if w is None:
                return None, 0.0
            train += w
    cache = sum(v for k, v in walls.items() if k.startswith("cache/"))
    return train, cache


def _table_wall(report: dict) -> float:
    """Seconds: every job the table ran (its ``run_walls_s``)."""
    return float(sum(report.get("run_walls_s", {}).values()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/results_synthetic.yaml")
    p.add_argument(
        "--rows", default="hard,soft", help="table rows (comma-separated), or all (the table)"
    )
    p.add_argument("--work", default=None, help="default: runs/bench/cache_quality/<config>")
    p.add_argument("--online-work", default=None, help="an online table's work_dir to reuse")
    p.add_argument("--online-results", default=None, help="its results dir (for its walls)")
    p.add_argument("--out", default=None, help="also write the markdown section here")
    p.add_argument(
        "--offline-distill",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a launch/distill.py override added for the offline side only (and its cache "
        "job), e.g. teachers.cache_tail_samples=32",
    )
    args, over = p.parse_known_args()
    rows = args.rows.split(",")
    if args.rows == "all":
        from conkd_scale.results.table import ROW

        rows = list(ROW)
        args.rows = ",".join(rows)
    work = ROOT / (args.work or f"runs/bench/cache_quality/{Path(args.config).stem}")
    on_work = ROOT / args.online_work if args.online_work else work / "online"
    on_res, off_res = work / "online_results", work / "offline_results"
    if args.online_results:
        on_res.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / args.online_results / "results.json", on_res / "results.json")

    _train_teachers(args.config, on_work, over)
    online = _table(args.config, on_work, on_res, "online", args.rows, over)
    off_teachers = work / "offline" / "teachers"
    for t in ("rec", "dialog"):
        if not (off_teachers / t).exists():
            shutil.copytree(on_work / "teachers" / t, off_teachers / t, symlinks=True)
    off_over = over
    if args.offline_distill:
        from conkd_scale.config import build_config
        from conkd_scale.results.table import ResultsConfig

        base = build_config(ResultsConfig, ROOT / args.config, over).distill
        off_over = [*over, "distill=" + json.dumps([*base, *args.offline_distill])]
    offline = _table(args.config, work / "offline", off_res, "offline", args.rows, off_over)

    lines, within, total = compare(online, offline, rows)
    (on_train, _), (off_train, cache) = _walls(online, rows), _walls(offline, rows)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = [
        f"## Students from the teacher cache vs D online on {online['dataset']} "
        f"(bench/bench_cache_quality.py) — {when}",
        "",
        f"- command: `{shlex.join(['python', 'bench/bench_cache_quality.py', *sys.argv[1:]])}`",
        f"- machine: {platform.machine()}, {platform.system()}; rows {args.rows}, seeds "
        f"{online['seeds']}, the same R and D on both sides, test split"
        + (f"; offline side: {', '.join(args.offline_distill)}" if args.offline_distill else ""),
        "",
        *lines,
        "",
        f"**{within} of {total}** (row, metric) pairs: |offline − online| within the larger "
        "seed sd.",
    ]
    on_all, off_all = _table_wall(online), _table_wall(offline)
    if on_all and off_all:
        section.append(
            f"Every job of the table (students, evaluations, and the cache job offline; the "
            f"teachers trained once beforehand for both sides), summed: online "
            f"{on_all / 60:.1f} min, offline {off_all / 60:.1f} min ({off_all / on_all:.2f}× "
            "online)."
        )
    if on_train is not None and off_train is not None:
        section.append(
            f"Student training, summed: online {on_train / 60:.1f} min, offline "
            f"{off_train / 60:.1f} min + cache job {cache / 60:.1f} min "
            f"({(off_train + cache) / on_train:.2f}× online)."
        )
    text = "\n".join(section) + "\n"
    print(text)
    if args.out:
        with atomic_open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
