"""Running one point of a sweep: its job's config, the job itself, and whether it has already run.

- train:    the point config is a run config (research/config.py); `loop.train` into the point directory, which
            resumes from the last checkpoint when interrupted. Result: summary.json.
- compress: a compress config (research/compress/pipeline.py); `pipeline.run` into the point directory, which
            resumes an interrupted fine-tuning from its `.<point>.partial` checkpoints. Result: summary.json.
- eval, encode: the base is a dict of the command's options (`model`, `corpus`, `window`, ... for eval; `model`,
            `input`, `chunk_len`, ... for encode: the keys of `ziplm eval --help` with "_" for "-"); the point
            runs that command in a child process (its output in output.txt), writing result.json. `encode`
            also decodes the coded file and checks that it gives the input back (`roundtrip` in the result)
            unless `verify=False`. (The sweep never imports the CLI: research.cli imports the sweep.)

A finished point has `point.json` (its overrides, the resolved config, a hash of it, the seconds it took); a point
whose `point.json` holds another config's hash is "stale" (the sweep file changed) and is not rerun without
`overwrite`.
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_collections as mlc

from research import config as config_lib
from research import errors, files

RESULT = {"train": "summary.json", "compress": "summary.json", "eval": "result.json", "encode": "result.json"}
CLI_JOBS = ("eval", "encode")


class PointFailed(Exception):
    """A point's job did not finish; the message says why (the sweep goes on with the other points)."""


def base(sweep: mlc.ConfigDict) -> mlc.ConfigDict:
    """A fresh copy of the sweep's base config (defaults: the demo run, the default compress config)."""
    b = sweep.get("base")
    if isinstance(b, str):
        return config_lib.load(b)
    if b is None:
        if sweep.job == "train":
            return config_lib.base_config()
        if sweep.job == "compress":
            from research.compress import pipeline

            return pipeline.base_config()
        raise errors.UserError(f"a {sweep.job} sweep needs base = dict(model=..., ...) (the command's options)")
    return mlc.ConfigDict(copy.deepcopy(b.to_dict() if isinstance(b, mlc.ConfigDict) else dict(b)))


def config(sweep: mlc.ConfigDict, point) -> mlc.ConfigDict:
    """The job config of `point`: the base with the point's overrides, and its W&B group, name and job type."""
    cfg = base(sweep)
    if sweep.job in CLI_JOBS:
        return _options(sweep.job, cfg, point.overrides)
    for key, value in point.overrides.items():
        config_lib.override(cfg, key, value)
    if sweep.job in ("train", "compress"):
        mode = (sweep.get("wandb") or {}).get("mode")
        if mode is not None:
            cfg.wandb.mode = mode
        cfg.wandb.group = str(sweep.name)
        cfg.wandb.name = point.name
        cfg.wandb.job_type = job_type(sweep.job, cfg)
        cfg.wandb.sweep = json.dumps(dict(point=point.name, **_jsonable(point.overrides)))  # JSON: keys hold dots
    return cfg


def _options(job: str, cfg: mlc.ConfigDict, overrides: dict) -> mlc.ConfigDict:
    """An eval / encode point's options: the base's with the point's, every key one of the command's options."""
    known = _command_options(job) | ({"verify"} if job == "encode" else set())
    options = dict(cfg.to_dict(), **overrides)
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise errors.UserError(f"'{key}' is not an option of ziplm {job}{hint}")
    return mlc.ConfigDict(options)


@functools.cache
def _command_options(job: str) -> frozenset[str]:
    """The options of `ziplm <job>` (from its --help: the sweep runs the command, it does not import the CLI)."""
    out = subprocess.run([sys.executable, "-m", "research", job, "--help"], capture_output=True, text=True)
    flags = {f.replace("-", "_") for f in re.findall(r"--([a-z][a-z0-9-]*)", out.stdout)}
    return frozenset((flags | ({"input"} if job == "encode" else set())) - {"help", "json", "overwrite"})


def job_type(job: str, cfg) -> str:
    """W&B job type: the compress chain's methods joined by "+" (e.g. "sparsegpt+finetune+gptq"), else the job."""
    if job != "compress":
        return job
    names = []
    for entry in cfg.compress:
        entry = dict(entry)
        names.append(str(entry.get("method", "finetune" if "finetune" in entry else "?")))
    return "+".join(names)


def _jsonable(v):
    return json.loads(json.dumps(v, default=str))


def digest(job: str, cfg: mlc.ConfigDict) -> str:
    """A hash of what the point computes (its config without W&B settings)."""
    d = {k: v for k, v in json.loads(config_lib.to_json(cfg)).items() if k != "wandb"}
    return hashlib.sha256(json.dumps([job, d], sort_keys=True).encode()).hexdigest()[:16]


def status(job: str, cfg: mlc.ConfigDict, point_dir: Path) -> str:
    """ "done", "stale" (done with another config), "failed", "partial" (interrupted: resumed) or "pending"."""
    marker = point_dir / "point.json"
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("status") == "failed":
            return "failed"
        if saved.get("status") == "done" and (point_dir / RESULT[job]).is_file():
            return "done" if saved.get("digest") == digest(job, cfg) else "stale"
    partial = point_dir.with_name(f".{point_dir.name}.partial")
    return "partial" if point_dir.exists() or partial.exists() else "pending"


def run(sweep: mlc.ConfigDict, point, point_dir: Path, *, overwrite: bool = False, progress: bool | None = None):
    """Runs `point` into `point_dir` (resuming it when it was interrupted) and writes its point.json.

    Returns:
      The job's result dict (summary.json or result.json).

    Raises:
      PointFailed: the job stopped with an error (recorded in point.json as "failed").
      UserError: the point is stale and `overwrite` is False.
    """
    cfg = config(sweep, point)
    state = status(sweep.job, cfg, point_dir)
    if state == "stale" and not overwrite:
        raise errors.UserError(
            f"{point_dir} was run with another config (the sweep changed); pass --overwrite to rerun it"
        )
    if state in ("stale", "failed") or (state == "partial" and sweep.job in CLI_JOBS):
        shutil.rmtree(point_dir, ignore_errors=True)
    marker = point_dir / "point.json"
    record = dict(name=point.name, index=point.index, job=sweep.job, overrides=_jsonable(point.overrides))
    record.update(labels=point.labels, digest=digest(sweep.job, cfg), config=json.loads(config_lib.to_json(cfg)))
    t0 = time.time()
    try:
        result = _run_job(sweep, cfg, point_dir, progress)
    except (errors.UserError, OSError, PointFailed) as e:
        point_dir.mkdir(parents=True, exist_ok=True)
        files.write_json(marker, dict(record, status="failed", error=str(e), seconds=time.time() - t0))
        raise PointFailed(str(e)) from None
    files.write_json(marker, dict(record, status="done", result=RESULT[sweep.job], seconds=time.time() - t0))
    return result


def _run_job(sweep, cfg, point_dir: Path, progress) -> dict:
    if sweep.job == "train":
        from research.train import loop

        return loop.train(cfg, point_dir, progress=progress)
    if sweep.job == "compress":
        from research.compress import pipeline

        return pipeline.run(cfg, point_dir, overwrite=True, progress=progress)
    point_dir.mkdir(parents=True, exist_ok=True)
    result = point_dir / RESULT[sweep.job]
    options = cfg.to_dict()
    verify = options.pop("verify", True) if sweep.job == "encode" else False
    _cli(_argv(sweep.job, dict(options), point_dir, result), point_dir)
    if verify:
        decoded = point_dir / "decoded.bin"
        _cli(
            ["decode", "--model", str(options["model"]), str(point_dir / "coded.bin"), str(decoded), "--overwrite"],
            point_dir,
        )
        same = Path(options["input"]).read_bytes() == decoded.read_bytes()
        decoded.unlink()
        if not same:
            raise PointFailed(f"decoding {point_dir / 'coded.bin'} did not give {options['input']} back")
        rep = json.loads(result.read_text())
        files.write_json(result, dict(rep, roundtrip=True))
    if sweep.get("wandb", {}).get("mode") != "disabled":
        _log(sweep, cfg, point_dir, json.loads(result.read_text()))
    return json.loads(result.read_text())


def _argv(job: str, options: dict, point_dir: Path, result: Path) -> list[str]:
    """The command line of an eval / encode point."""
    if not options.get("model"):
        raise errors.UserError(f"a {job} point needs a model (base or axes: model=...)")
    argv = [job]
    if job == "encode":
        if not options.get("input"):
            raise errors.UserError("an encode point needs input=PATH (the file to code)")
        argv += [str(options.pop("input")), str(point_dir / "coded.bin"), "--overwrite"]
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv + ["--json", str(result)]


def _cli(argv: list[str], point_dir: Path) -> None:
    """Runs `ziplm ARGV` in a child process, its output appended to `<point>/output.txt`."""
    with (point_dir / "output.txt").open("a") as log:
        done = subprocess.run([sys.executable, "-m", "research", *argv], stdout=log, stderr=subprocess.PIPE, text=True)
        log.write(done.stderr)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [""])[-1]
        raise PointFailed(f"ziplm {argv[0]} exited with status {done.returncode}: {last}")


def _log(sweep, cfg, point_dir: Path, result: dict) -> None:
    """An eval / encode point's result as one W&B run of the sweep's group (offline unless configured)."""
    from research import log

    wb = dict(mode="offline", project="ziplm", entity=None)
    wb.update({k: v for k, v in dict(sweep.get("wandb") or {}).items() if v is not None})
    wb.update(group=str(sweep.name), name=point_dir.name, job_type=sweep.job)
    logger = log.Logger(point_dir, cfg.to_dict(), wb)
    logger.log(0, log.numeric(result), split=sweep.job)
    logger.close()
