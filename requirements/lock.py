"""Refreshes the lock files (`make lock`): every install set of ziplm pinned, with hashes, at one moment.

    make lock      # .venv-lock (pip-tools, itself pinned by lock-tools.txt), then this script; ~10 min

Install sets, one file each (what `make` installs from them):

    main.txt   pip install .                        the main install (no torch)
    dev.txt    pip install '.[dev]'                 make demo, and the no-torch half of make test (.venv)
    test.txt   pip install '.[dev,parity,harness]'  the test suite (.venv-test: CPU torch, lm_eval)
    bench.txt  pip install '.[bench]'               benchmarks/ that compare with scikit-learn
    llama.txt  pip install '.[llama]'               experiments/deploy_table.py (llama-cpp-python, built from source)

The union of the sets is resolved first (pip's resolver, through pip-compile, with this machine's pip
configuration: the local CPU torch wheel); each set is then compiled under that union's pins, so a package has the
same version in every file that holds it (checked at the end). The files are for CPython 3.11 on Linux x86_64,
the machine kind the committed results come from; elsewhere install with `pip install -e '.[...]'` and compare
the versions `summary.json` records. Refresh deliberately: the committed numbers came from these versions.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETS = {"main": [], "dev": ["dev"], "test": ["dev", "parity", "harness"], "bench": ["bench"], "llama": ["llama"]}
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([^ \\;]+)", re.M)


def compile_set(extras: list[str], out: Path, constraint: Path | None = None) -> None:
    """pip-compile of pyproject.toml with `extras` into `out`, run from the repository root with relative paths,
    so the files' headers and annotations do not change from one refresh to the next but for the versions."""
    root = HERE.parent
    cmd = [sys.executable, "-m", "piptools", "compile", "--quiet", "--generate-hashes", "--allow-unsafe"]
    cmd += ["--strip-extras", "--no-emit-index-url", "--no-emit-find-links", "--newline", "LF"]
    cmd += [f"--extra={e}" for e in extras]
    cmd += ["--constraint", str(constraint.relative_to(root))] if constraint else []
    cmd += ["--output-file", str(out.relative_to(root)), "pyproject.toml"]
    print(f"locking {out.name}: pip install '.[{','.join(extras)}]'", flush=True)
    env = {**os.environ, "CUSTOM_COMPILE_COMMAND": "make lock"}  # the command the files' headers name
    subprocess.run(cmd, check=True, cwd=root, env=env)


def pins(path: Path) -> dict[str, str]:
    return {name.lower().replace("_", "-"): version for name, version in PIN.findall(path.read_text())}


def main() -> int:
    union = sorted({e for extras in SETS.values() for e in extras if e != "llama"})
    everything, constraint = HERE / ".union.txt", HERE / ".union-pins.txt"  # removed when done
    try:
        compile_set(union, everything)
        constraint.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins(everything).items())))
        for name, extras in SETS.items():
            compile_set(extras, HERE / f"{name}.txt", constraint)
        versions = pins(everything)
    finally:
        everything.unlink(missing_ok=True)
        constraint.unlink(missing_ok=True)
    clash = [
        f"{f.name}: {n} {v} (union {versions[n]})"
        for f in (HERE / f"{s}.txt" for s in SETS)
        for n, v in pins(f).items()
        if n in versions and versions[n] != v
    ]
    if clash:
        print("error: sets disagree on versions:\n" + "\n".join(clash), file=sys.stderr)
        return 1
    if "torch" in pins(HERE / "main.txt") or "torch" in pins(HERE / "dev.txt"):
        print("error: torch entered the main install; find the dependency that pulls it", file=sys.stderr)
        return 1
    print("locked: " + ", ".join(f"{s}.txt ({len(pins(HERE / f'{s}.txt'))} packages)" for s in SETS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
