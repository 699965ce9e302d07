"""`ziplm sweep CONFIG`: every point of a sweep run in order (or `--jobs N` at a time in child processes), finished
points skipped, interrupted ones resumed, the table and plots rewritten after each point.

    ziplm sweep experiments/sweeps/prune.py                     # runs/sweeps/<name>/<point>/ + results.*
    ziplm sweep experiments/sweeps/prune.py --dry-run           # the points, their overrides and status
    ziplm sweep experiments/sweeps/prune.py --jobs 2 --only wanda
    ziplm sweep experiments/sweeps/prune.py --wandb-yaml sweep.yaml   # for `wandb sweep` + `wandb agent`
    ziplm sweep experiments/sweeps/prune.py --table             # rewrite the table from what has finished

A point that fails is recorded ("failed" in point.json and the table, with its error) and the sweep goes on; the
exit status is 1 when any point failed. With --jobs N each point runs as `ziplm sweep CONFIG --point NAME` in its
own process, its output in `<point>.log` beside the point's directory; on a CPU machine give each fewer threads (e.g.
XLA_FLAGS=--xla_cpu_multi_thread_eigen=false) or N processes share the cores.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

from research import errors, files
from research.sweep import jobs, table
from research.sweep import points as points_lib


def run(
    config_path: str,
    overrides: list[str],
    *,
    workdir: str | None = None,
    n_jobs: int = 1,
    dry_run: bool = False,
    overwrite: bool = False,
    only: str | None = None,
    point: str | None = None,
    wandb_yaml: str | None = None,
    table_only: bool = False,
    progress: bool | None = None,
) -> int:
    """Runs the sweep of `config_path`; returns the exit status (0: every selected point finished)."""
    sweep = points_lib.load(config_path, overrides)
    pts = points_lib.of(sweep)
    root = _root(sweep, workdir)
    selected = _select(pts, only, point)
    for p in selected:  # every point's config built (and checked) before anything runs
        jobs.config(sweep, p)
    if wandb_yaml:
        files.write_bytes(wandb_yaml, _wandb_yaml(sweep, config_path, overrides, root, selected).encode())
        print(f"wrote {wandb_yaml}: `wandb sweep {wandb_yaml}`, then `wandb agent <id>` runs one point per run")
        return 0
    if dry_run:
        print(_listing(sweep, selected, root))
        return 0
    if table_only:
        return _finish(sweep, pts, root, failed=[])
    if point is not None:  # a child of --jobs N, or one point by hand
        return _one(sweep, selected[0], root, overwrite, progress)
    todo = [p for p in selected if jobs.status(sweep.job, jobs.config(sweep, p), root / p.name) != "done"]
    stale = [p.name for p in todo if jobs.status(sweep.job, jobs.config(sweep, p), root / p.name) == "stale"]
    if stale and not overwrite:
        raise errors.UserError(
            f"{len(stale)} point(s) ran with another config ({stale[0]}, ...): pass --overwrite to rerun them"
        )
    print(f"sweep {sweep.name}: {len(selected)} points, {len(selected) - len(todo)} done, {len(todo)} to run -> {root}")
    root.mkdir(parents=True, exist_ok=True)
    if n_jobs > 1:
        failed = _parallel(config_path, overrides, root, todo, n_jobs, overwrite, len(selected))
    else:
        failed = []
        for i, p in enumerate(todo, 1):
            t0 = time.time()
            print(f"[{i}/{len(todo)}] {p.name} ...", flush=True)
            try:
                jobs.run(sweep, p, root / p.name, overwrite=overwrite, progress=progress)
                print(f"[{i}/{len(todo)}] {p.name}: done in {time.time() - t0:.0f} s", flush=True)
            except jobs.PointFailed as e:
                failed.append(p.name)
                print(f"[{i}/{len(todo)}] {p.name}: FAILED: {e}", file=sys.stderr, flush=True)
            table.write(sweep, table.rows(sweep, pts, root), root)
    return _finish(sweep, pts, root, failed)


def finished(config_path: str, overrides: list[str] = (), workdir: str | None = None) -> list[dict]:
    """The table rows of a sweep's finished points, each with its job's whole result under "result" (what a study's
    analysis reads after `run`)."""
    sweep = points_lib.load(config_path, list(overrides))
    root = _root(sweep, workdir)
    out = []
    for row in table.rows(sweep, points_lib.of(sweep), root):
        if row["status"] == "done":
            row["result"] = table.read(root / row["point"] / jobs.RESULT[sweep.job])
            out.append(row)
    return out


def _root(sweep, workdir: str | None) -> Path:
    return Path(workdir or sweep.get("workdir") or Path("runs") / "sweeps" / str(sweep.name)).expanduser().absolute()


def _select(pts, only: str | None, point: str | None):
    if point is not None:
        match = [p for p in pts if p.name == point]
        if not match:
            raise errors.UserError(f"the sweep has no point named {point!r} (see --dry-run)")
        return match
    if only:
        try:
            rx = re.compile(only)
        except re.error as e:
            raise errors.UserError(f"--only {only!r} is not a regular expression: {e}") from None
        pts = [p for p in pts if rx.search(p.name)]
        if not pts:
            raise errors.UserError(f"--only {only!r} matches no point (see --dry-run)")
    return pts


def _one(sweep, p, root: Path, overwrite: bool, progress) -> int:
    try:
        jobs.run(sweep, p, root / p.name, overwrite=overwrite, progress=progress)
    except jobs.PointFailed as e:
        print(f"error: point {p.name} failed: {e}", file=sys.stderr)
        return 1
    return 0


def _parallel(config_path, overrides, root: Path, todo, n_jobs: int, overwrite: bool, total: int) -> list[str]:
    """Runs `todo` as child processes, at most `n_jobs` at once; returns the names of the failed points."""
    waiting, running, failed, finished = list(todo), {}, [], 0
    try:
        while waiting or running:
            while waiting and len(running) < n_jobs:
                p = waiting.pop(0)
                log = (root / f"{p.name}.log").open("w")
                argv = [sys.executable, "-m", "research", "sweep", config_path, "--point", p.name]
                argv += ["--workdir", str(root), *(["--overwrite"] if overwrite else []), *overrides]
                running[p.name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log, time.time())
            time.sleep(0.5)
            for name, (proc, log, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                log.close()
                del running[name]
                finished += 1
                ok = proc.returncode == 0
                if not ok:
                    failed.append(name)
                what = "done" if ok else f"FAILED (status {proc.returncode}, see {root / name}.log)"
                print(f"[{finished}/{len(todo)}] {name}: {what} in {time.time() - t0:.0f} s", flush=True)
    except KeyboardInterrupt:
        for proc, _log, _ in running.values():
            proc.terminate()  # the jobs checkpoint on SIGTERM; the next run resumes them
        for proc, log, _ in running.values():
            proc.wait()
            log.close()
        raise
    return failed


def _finish(sweep, pts, root: Path, failed: list[str]) -> int:
    rows = table.rows(sweep, pts, root)
    written = table.write(sweep, rows, root)
    done = sum(r["status"] == "done" for r in rows)
    print(table.markdown([{k: v for k, v in r.items() if k != "overrides"} for r in rows], _columns(rows)))
    print(f"{done}/{len(rows)} points done; table and plots: " + ", ".join(str(p) for p in written))
    if failed:
        print(f"{len(failed)} point(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _columns(rows) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r if k not in ("overrides", "error")))


def _listing(sweep, pts, root: Path) -> str:
    lines = [f"sweep {sweep.name} ({sweep.job}): {len(pts)} points in {root}"]
    for p in pts:
        state = jobs.status(sweep.job, jobs.config(sweep, p), root / p.name)
        what = ", ".join(f"{k}={points_lib.describe(v)}" for k, v in p.overrides.items())
        lines.append(f"{p.index:4d}  {state:8s} {p.name}    {what}")
    return "\n".join(lines)


def _wandb_yaml(sweep, config_path: str, overrides: list[str], root: Path, pts) -> str:
    """A W&B grid sweep over the point names: each agent run is `ziplm sweep CONFIG --point NAME`, so zipped
    axes, labels, run directories and skipping behave as with `ziplm sweep` itself."""
    import yaml

    wb = dict(sweep.get("wandb") or {})
    spec = {
        "name": str(sweep.name),
        "project": wb.get("project") or "ziplm",
        **({"entity": wb["entity"]} if wb.get("entity") else {}),
        "method": "grid",
        "parameters": {"point": {"values": [p.name for p in pts]}},
        "command": [
            "ziplm",
            "sweep",
            _absolute(config_path),
            "--workdir",
            str(root),
            *overrides,
            "${args}",
        ],
    }
    return yaml.safe_dump(spec, sort_keys=False)


def _absolute(config_path: str) -> str:
    file, sep, arg = config_path.partition(":")
    return str(Path(file).absolute()) + sep + arg
