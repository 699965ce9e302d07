"""Fault injection: damaged packed, coded and checkpoint files, kill -9 during saves, concurrent writers, a full disk.

    python benchmarks/fault_injection.py [--flips 60] [--kills 4] [--seed 0]

Each probe's outcome is one of:
  - error:     a one-line `UserError` / `CorruptData` (the CLI prints it and exits 2): the wanted outcome;
  - fallback:  a damaged checkpoint step named in a warning, and the older intact step restored instead;
  - harmless:  no error and the same result as the intact file (a byte nobody reads);
  - silent:    no error and a different result (wrong weights, wrong bytes, a different optimizer state);
  - traceback: any other exception (a bug: what a user would see as a traceback);
  - hang:      no answer within 60 s.
Probes:
  - packed:     single-bit flips at random positions and truncations of a packed tiny model (`pack.unpack`);
  - coded:      the same for a file coded by `lm.encode` with a byte-level model (`lm.decode`);
  - checkpoint: the same for every file of the newest checkpoint step of a finished tiny run
    (`checkpoint.load_run`);
  - kill -9:    `ziplm train` killed at random moments with checkpoints every step, then resumed: the resumed run
    must finish and equal an uninterrupted one bit for bit;
  - writers:    two `ziplm train` started together on one run directory: exactly one may run;
  - disk full:  `ziplm pack`, `ziplm train` and `ziplm export` onto a 3 MiB tmpfs, and `pack --json` with its report
    there (root only; skipped otherwise): a one-line error (one line of stderr in all), nothing half-written, no
    temporary file left behind;
  - claims:     a 2.4 kB coded file whose header (checksums recomputed) claims 2.5 GB of output: `ziplm decode`
    refuses it at once by default; with `--max-output 0` it runs in bounded memory (peak RSS, stopped after 20 s);
  - headers:    packed models whose header (checksums recomputed) lacks meta.model, has group 0, a bogus layout,
    version "x", or a leaf of a huge shape: `eval`, `pack`, `inspect` and `export` each give one line;
  - misuse:     `--workdir ''`, a diverged run (lr 1e30: no directory left), temporaries of a killed writer beside
    the target (removed by the rerun), SIGTERM (exit 143), a truncated config.json (a warning), the modes of an
    export's files (the umask's), a GGUF model exported with its tokenizer.
Outcome "unbounded": a process's peak memory past the probe's bound.
Target: zero silent outputs, zero tracebacks, zero hangs, memory bounded. Writes
benchmarks/results/fault_injection_<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from research import errors, files, hardware, tree  # noqa: E402

OUTCOMES = ("error", "fallback", "harmless", "silent", "traceback", "hang", "unbounded")
TINY = [
    "--config.model.n_layer=2",
    "--config.model.d_model=32",
    "--config.model.n_head=2",
    "--config.model.max_seq_len=32",
    "--config.data.seq_len=32",
    "--config.data.batch_size=8",
    "--config.train.warmup_steps=2",
    "--config.eval.max_windows=8",
    "--config.mesh.data=1",
    "--config.wandb.mode=disabled",
]


class Hang(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: int):
    def fire(signum, frame):
        raise Hang

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def classify(fn, same) -> tuple[str, str]:
    """(outcome, detail) of calling fn(); `same(result)` says whether a result equals the intact one (True /
    False), or names the outcome itself."""
    try:
        with deadline(60):
            result = fn()
    except Hang:
        return "hang", ""
    except errors.UserError as e:
        text = str(e)
        return ("error", text[:120]) if "\n" not in text else ("traceback", "multi-line: " + text[:120])
    except Exception as e:
        return "traceback", f"{type(e).__name__}: {str(e)[:120]}"
    verdict = same(result)
    if isinstance(verdict, str):
        return verdict, ""
    return ("harmless", "") if verdict else ("silent", "")


def damaged_copies(path: Path, rng: random.Random, flips: int, work: Path):
    """Yields (description, damaged copy) for single-bit flips and truncations of `path`."""
    data = path.read_bytes()
    for _ in range(flips):
        pos, bit = rng.randrange(len(data)), rng.randrange(8)
        bad = bytearray(data)
        bad[pos] ^= 1 << bit
        out = work / path.name
        out.write_bytes(bytes(bad))
        yield f"flip byte {pos} bit {bit}", out
    for keep in sorted({0, 1, len(data) // 3, len(data) // 2, len(data) - 41, len(data) - 1}):
        out = work / path.name
        out.write_bytes(data[: max(0, keep)])
        yield f"truncate to {keep}", out


def tally(rows: list[dict]) -> dict:
    return {o: sum(r["outcome"] == o for r in rows) for o in OUTCOMES}


def _tree_equal(a, b) -> bool:
    fa, fb = tree.flatten(a), tree.flatten(b)
    return fa.keys() == fb.keys() and all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


def probe_packed(work: Path, rng, flips: int) -> list[dict]:
    import jax

    from research import models
    from research.coding import pack
    from research.models import config as model_config

    cfg = model_config.gpt2_style(vocab_size=64, n_layer=2, n_head=2, d_model=32, max_seq_len=16)
    _, params = models.init(cfg, seed=0)
    params = jax.tree.map(np.asarray, params)
    good = work / "model.zlm"
    pack.pack(params, good, meta={"note": "fault injection"})
    _, intact = pack.unpack(good)
    rows = []
    (work / "damaged").mkdir()
    for what, bad in damaged_copies(good, rng, flips, work / "damaged"):
        outcome, detail = classify(lambda bad=bad: pack.unpack(bad)[1], lambda r: _tree_equal(r, intact))
        rows.append(dict(probe=what, outcome=outcome, detail=detail))
    return rows


def probe_coded(work: Path, rng, flips: int) -> list[dict]:
    from research.coding import lm

    text = (ROOT / "README.md").read_bytes()[:3000]
    model = _byte_model()
    blob, _ = lm.encode(text, model, chunk_len=8, batch_size=4, fallback=False)
    good = work / "text.zlmt"
    good.write_bytes(blob)
    rows = []
    (work / "damaged-coded").mkdir()
    for what, bad in damaged_copies(good, rng, flips, work / "damaged-coded"):
        outcome, detail = classify(lambda bad=bad: lm.decode(bad.read_bytes(), model)[0], lambda r: r == text)
        rows.append(dict(probe=what, outcome=outcome, detail=detail))
    return rows


def _byte_model():
    from research import models, sources
    from research.models import config as model_config

    cfg = model_config.gpt2_style(vocab_size=256, n_layer=1, n_head=2, d_model=16, max_seq_len=16)
    graphdef, params = models.init(cfg, seed=0)
    return sources.Model(cfg, graphdef, params, "byte", "run", "byte-model")


def probe_checkpoints(work: Path, rng, flips: int) -> list[dict]:
    from research.train import checkpoint

    run = work / "run"
    _cli(["train", "--workdir", str(run), *TINY, "--config.train.steps=4", "--config.train.ckpt_every=2"])
    _, _, intact, _ = checkpoint.load_run(run)
    _, _, older, _ = checkpoint.load_run(run, step=2)
    step_dir = run / "checkpoints" / "4"
    targets = [p for p in step_dir.rglob("*") if p.is_file()]
    sizes = np.array([p.stat().st_size for p in targets], float)
    rows = []
    for i in range(flips):
        victim = targets[rng.choices(range(len(targets)), weights=sizes)[0]] if i % 2 else rng.choice(targets)
        saved = victim.read_bytes()
        if not saved:
            continue
        pos, bit = rng.randrange(len(saved)), rng.randrange(8)
        bad = bytearray(saved)
        bad[pos] ^= 1 << bit
        victim.write_bytes(bytes(bad))

        def load():
            with contextlib.redirect_stderr(open(os.devnull, "w")):
                return checkpoint.load_run(run)

        def same(result):
            _, _, params, meta = result
            if meta["step"] == 2 and _tree_equal(params, older):
                return "fallback"
            return _tree_equal(params, intact)

        outcome, detail = classify(load, same)
        rows.append(
            dict(probe=f"{victim.relative_to(step_dir)}: flip byte {pos} bit {bit}", outcome=outcome, detail=detail)
        )
        victim.write_bytes(saved)
    return rows


def _cli(args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "research", *args], capture_output=True, text=True, env=env, **kw)


def probe_kills(work: Path, rng, kills: int) -> list[dict]:
    steps = ["--config.train.steps=12", "--config.train.ckpt_every=1", "--config.train.log_every=1"]
    ref = work / "ref"
    _cli(["train", "--workdir", str(ref), *TINY, *steps])
    want = [r for r in _jsonl(ref / "metrics.jsonl") if r["split"] == "train"]
    rows = []
    env = {**os.environ, "WANDB_MODE": "disabled", "JAX_PLATFORMS": "cpu"}
    for k in range(kills):
        run = work / f"killed-{k}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "research", "train", "--workdir", str(run), *TINY, *steps],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        time.sleep(rng.uniform(6, 14))  # start-up is ~5 s: kill during the steps and their saves
        proc.kill()
        proc.wait()
        resumed = _cli(["train", "--workdir", str(run), *TINY, *steps])
        got = [r for r in _jsonl(run / "metrics.jsonl") if r["split"] == "train"]
        if resumed.returncode != 0:
            last = (resumed.stderr.strip().splitlines() or [""])[-1]
            outcome = "error" if last.startswith("error:") else "traceback"
            rows.append(dict(probe=f"kill {k}", outcome=outcome, detail=last[:120]))
        else:
            same = [r["loss"] for r in got] == [r["loss"] for r in want]
            rows.append(dict(probe=f"kill {k}", outcome="harmless" if same else "silent", detail=""))
    return rows


def _jsonl(path: Path) -> list[dict]:
    from research import log

    return log.read_jsonl(path)


def probe_writers(work: Path) -> list[dict]:
    run = work / "contended"
    env = {**os.environ, "WANDB_MODE": "disabled", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "research", "train", "--workdir", str(run), *TINY, "--config.train.steps=200"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    refused = [err for code, err in results if code == 2 and "in use by pid" in err]
    ok = codes == [0, 2] and len(refused) == 1
    detail = " / ".join((err.strip().splitlines() or [""])[-1][:100] for _, err in results)
    return [dict(probe="two train on one directory", outcome="error" if ok else "silent", detail=detail)]


def probe_disk_full(work: Path) -> list[dict]:
    mnt = work / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)]).returncode:
        return [dict(probe="disk full", outcome="skipped", detail="cannot mount a tmpfs (needs root)")]
    rows = []
    try:
        _fill(mnt, 16 << 10)  # 16 KiB left: less than the packed model
        packed = _cli(["pack", "--model", str(work / "run"), "--out", str(mnt / "m.zlm")])
        rows.append(_disk_row("pack onto a full disk", packed, mnt, keep={"filler"}))
        for p in mnt.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        _fill(mnt, 256 << 10)  # room for the run's small files, not for a checkpoint
        trained = _cli(["train", "--workdir", str(mnt / "run"), *TINY, "--config.train.steps=4"])
        rows.append(_disk_row("train onto a full disk", trained, mnt, keep={"filler", "run"}))
        (mnt / "filler").unlink()  # space freed: the same command resumes and finishes
        again = _cli(["train", "--workdir", str(mnt / "run"), *TINY, "--config.train.steps=4"])
        last = (again.stderr.strip().splitlines() or [""])[-1]
        ok = again.returncode == 0
        rows.append(dict(probe="rerun after space is freed", outcome="harmless" if ok else "traceback", detail=last))
        _empty(mnt)
        _fill(mnt, 16 << 10)
        exported = _cli(["export", "--model", str(work / "run"), "--out", str(mnt / "hf")])
        rows.append(_disk_row("export onto a full disk", exported, mnt, keep={"filler"}))
        _empty(mnt)
        _fill(mnt, 0)  # not even room for the report
        zlm = work / "report-first.zlm"
        report = _cli(["pack", "--model", str(work / "run"), "--out", str(zlm), "--json", str(mnt / "r.json")])
        row = _disk_row("pack --json with the report on a full disk", report, mnt, keep={"filler"})
        if zlm.exists():
            row.update(outcome="silent", detail=row["detail"] + "; the packed file was written")
        rows.append(row)
    finally:
        subprocess.run(["umount", str(mnt)])
    return rows


def _empty(mnt: Path) -> None:
    for p in mnt.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _fill(mnt: Path, leave: int) -> None:
    st = os.statvfs(mnt)
    (mnt / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def _disk_row(what, proc, mnt: Path, keep: set) -> dict:
    lines = proc.stderr.strip().splitlines() or [""]
    last = lines[-1]
    leftovers = [p.name for p in mnt.iterdir() if p.name not in keep]
    if len(lines) > 1:  # a one-line error after pages of library tracebacks is still a traceback to the user
        return dict(probe=what, outcome="traceback", detail=f"{len(lines)} lines of stderr, last: {last[:100]}")
    if proc.returncode == 2 and last.startswith("error:") and not leftovers:
        return dict(probe=what, outcome="error", detail=last[:120])
    outcome = "traceback" if proc.returncode not in (0, 2) or not last.startswith("error:") else "silent"
    return dict(probe=what, outcome=outcome, detail=f"exit {proc.returncode}: {last[:100]}; left {leftovers}")


def _one_line(what: str, proc, expect: str = "") -> dict:
    """The row of a command that must fail with one line naming `expect`."""
    lines = proc.stderr.strip().splitlines() or [""]
    if proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0]:
        return dict(probe=what, outcome="error", detail=lines[0][:120])
    outcome = "silent" if proc.returncode == 0 else "traceback"
    return dict(probe=what, outcome=outcome, detail=f"exit {proc.returncode}, {len(lines)} lines: {lines[-1][:100]}")


def _peak_rss_run(cmd, seconds: float) -> tuple[int, float, int]:
    """(exit status or None when stopped, seconds, peak RSS in bytes) of `cmd`, stopped after `seconds`."""
    env = {**os.environ, "WANDB_MODE": "disabled", "JAX_PLATFORMS": "cpu"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    while proc.poll() is None and time.time() - t0 < seconds:
        try:
            rss = int(open(f"/proc/{proc.pid}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            peak = max(peak, rss)
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.2)
    code = proc.poll()
    if code is None:
        proc.kill()
    proc.wait()
    return code, time.time() - t0, peak


def probe_claims(work: Path) -> list[dict]:
    """A coded file that claims 2.5 GB of output (valid checksums): refused by default, bounded without a limit."""
    from research.coding import lm
    from research.models import hf

    m = _byte_model()
    model = work / "byte-model"
    hf.export(m.cfg, m.params, model, tokenizer="byte")
    blob, _ = lm.encode((ROOT / "README.md").read_bytes()[:9000], m, chunk_len=8, batch_size=4, fallback=False)
    claim = lm.MAX_EXPANSION * len(blob)
    crafted = work / "claims.zlmt"
    crafted.write_bytes(lm.with_header(blob, length=claim, tokens=claim, runs=[["t", claim, claim]]))
    detail = f"{len(blob):,} bytes claiming {claim:,}"
    rows = []
    cmd = [sys.executable, "-m", "research", "decode", "--model", str(model), str(crafted), str(work / "claims.out")]
    code, secs, peak = _peak_rss_run(cmd, 60)
    bound = 1 << 30
    if code is None:
        rows.append(dict(probe="decode, default limit", outcome="hang", detail=detail))
    else:
        ok = code == 2 and peak < bound and not (work / "claims.out").exists()
        rows.append(dict(probe="decode, default limit", outcome="error" if ok else "traceback",
                         detail=f"{detail}; exit {code} in {secs:.1f} s, peak RSS {peak / 2**20:.0f} MiB"))  # fmt: skip
    code, secs, peak = _peak_rss_run([*cmd, "--max-output", "0"], 20)
    outcome = "harmless" if peak < bound and not (work / "claims.out").exists() else "unbounded"
    rows.append(dict(probe="decode --max-output 0 (stopped after 20 s)", outcome=outcome,
                     detail=f"{detail}; peak RSS {peak / 2**20:.0f} MiB (bound {bound >> 20} MiB)"))  # fmt: skip
    return rows


def probe_headers(work: Path) -> list[dict]:
    """Packed models with crafted headers (every checksum recomputed) through every command that reads them."""
    from research.coding import container

    good = work / "good.zlm"
    _cli(["pack", "--model", str(work / "run"), "--out", str(good)])
    data = good.read_bytes()
    grid = work / "grid.zlm"  # a model with grid leaves, for the layout fields
    rtn = "--config.compress=[{'method': 'rtn', 'bits': 4, 'granularity': 'group', 'group_size': 16}]"
    quick = ["--config.calibration.n=0", "--config.eval.max_windows=1", "--config.wandb.mode=disabled"]
    made = _cli(["compress", "--model", str(work / "run"), "--workdir", str(work / "rtn"), rtn, *quick])
    if made.returncode:
        raise RuntimeError(f"could not make the grid model: {made.stderr[-500:]}")
    shutil.copy(work / "rtn" / "model.zlm", grid)
    grid_data = grid.read_bytes()

    def first_grid(h):
        return next(leaf for leaf in h["leaves"] if leaf["kind"] == "grid")

    cases = {
        "no meta.model": (data, lambda h: h["meta"].pop("model")),
        "group 0": (grid_data, lambda h: first_grid(h).update(layout="group", group=0)),
        "bogus layout": (grid_data, lambda h: first_grid(h).update(layout="diagonal")),
        'version "x"': (data, lambda h: h.update(version="x")),
        "huge shape": (data, lambda h: h["leaves"][0].update(shape=[2**20, 2**19])),
    }
    rows = []
    for name, (base, edit) in cases.items():
        h = container.header_of(base)
        edit(h)
        bad = work / "crafted.zlm"
        bad.write_bytes(container.with_header(base, h))
        commands = [
            ["eval", "--model", str(bad)],
            ["pack", "--model", str(bad), "--out", str(work / "again.zlm")],
            ["inspect", str(bad)],
            ["export", "--model", str(bad), "--out", str(work / "crafted-hf")],
        ]
        for cmd in commands:
            rows.append(_one_line(f"{name}: {cmd[0]}", _cli(cmd)))
    return rows


def probe_misuse(work: Path) -> list[dict]:
    import socket

    rows = [_one_line("--workdir ''", _cli(["train", "--workdir", "", *TINY]), "--workdir is empty")]
    div = work / "diverged"
    r = _cli(["train", "--workdir", str(div), *TINY, "--config.train.steps=20", "--config.train.lr=1e30"])
    row = _one_line("diverged run (lr 1e30)", r, "diverged")
    if div.exists():
        row.update(outcome="silent", detail=row["detail"] + "; a run directory with nothing to resume was left")
    rows.append(row)
    # Temporaries of a killed writer (a pid that is gone) beside the target: the rerun removes them.
    host = "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"
    dead = _dead_pid()
    stale = [work / f".again.zlm.{host}-{dead}.abc123.tmp", work / f".again-hf.{host}-{dead}.abc123"]
    stale[0].write_bytes(b"half a file")
    stale[1].mkdir()
    _cli(["pack", "--model", str(work / "run"), "--out", str(work / "again.zlm"), "--overwrite"])
    _cli(["export", "--model", str(work / "run"), "--out", str(work / "again-hf")])
    left = [p.name for p in stale if p.exists()]
    rows.append(dict(probe="a killed writer's temporaries", outcome="silent" if left else "harmless",
                     detail=f"left: {left}" if left else "removed by the rerun"))  # fmt: skip
    # SIGTERM: 143, as a shell reports it.
    env = {**os.environ, "WANDB_MODE": "disabled", "JAX_PLATFORMS": "cpu"}
    run = work / "term"
    proc = subprocess.Popen([sys.executable, "-m", "research", "train", "--workdir", str(run), *TINY,
                             "--config.train.steps=100000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    ok = proc.returncode == 143 and "Traceback" not in err
    rows.append(dict(probe="SIGTERM during train", outcome="harmless" if ok else "silent",
                     detail=f"exit {proc.returncode}"))  # fmt: skip
    # A truncated config.json: named in a warning, the checkpoints' config used, the run resumed.
    cfg_file = run / "config.json"
    cfg_file.write_text(cfg_file.read_text()[:100])
    stopped = json.loads((run / "summary.json").read_text())["steps"]
    warned = _cli(["train", "--workdir", str(run), *TINY, f"--config.train.steps={stopped + 1}"])
    ok = warned.returncode == 0 and "config.json is damaged" in warned.stderr
    rows.append(dict(probe="truncated config.json", outcome="harmless" if ok else "silent",
                     detail=(warned.stderr.strip().splitlines() or [""])[0][:120]))  # fmt: skip
    # The modes of an export's files: as the umask gives.
    hf_dir = work / "modes-hf"
    _cli(["export", "--model", str(work / "run"), "--out", str(hf_dir)])
    want = 0o666 & ~files.umask()
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in hf_dir.iterdir()}
    ok = all(int(m, 8) == want for m in modes.values())
    rows.append(dict(probe="export file modes", outcome="harmless" if ok else "silent", detail=str(modes)))
    # A GGUF model exported to Hugging Face: its tokenizer goes along.
    from research import models
    from research.models import config as model_config
    from tests import gguf_files

    text = (ROOT / "README.md").read_text()[:20000]
    vocab = gguf_files.sentencepiece_vocab(text, size=300)
    cfg = model_config.llama_style(vocab_size=len(vocab["tokens"]), n_layer=1, n_head=2, n_kv_head=1, d_model=32,
                                   d_ff=64, max_seq_len=32)  # fmt: skip
    _, params = models.init(cfg, 0)
    gguf_files.write_llama(work / "m.gguf", cfg, params, vocab=vocab)
    _cli(["export", "--model", str(work / "m.gguf"), "--out", str(work / "gguf-hf")])
    ok = (work / "gguf-hf" / "tokenizer.json").is_file()
    rows.append(dict(probe="GGUF model exported to hf", outcome="harmless" if ok else "silent",
                     detail="tokenizer.json written" if ok else "no tokenizer"))  # fmt: skip
    return rows


def _dead_pid() -> int:
    """A process id that is not running (a child that has exited)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--flips", type=int, default=60, help="single-bit flips per file kind")
    p.add_argument("--kills", type=int, default=4, help="kill -9 trials")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    os.environ.setdefault("WANDB_MODE", "disabled")
    work = Path(tempfile.mkdtemp(prefix="ziplm-faults-"))
    t0 = time.time()
    try:
        scenarios = {
            "packed": probe_packed(work, rng, args.flips),
            "coded": probe_coded(work, rng, args.flips),
            "checkpoint": probe_checkpoints(work, rng, args.flips),
            "kill -9": probe_kills(work, rng, args.kills),
            "writers": probe_writers(work),
            "disk full": probe_disk_full(work),
            "claims": probe_claims(work),
            "headers": probe_headers(work),
            "misuse": probe_misuse(work),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    totals = {o: sum(tally(r)[o] for r in scenarios.values()) for o in OUTCOMES}
    result = {
        "benchmark": "fault injection: damaged files, kill -9, concurrent writers, full disk, crafted headers, misuse",
        "command": "python benchmarks/fault_injection.py " + " ".join(sys.argv[1:]),
        "seed": args.seed,
        "seconds": time.time() - t0,
        "totals": totals,
        "target": "zero silent outputs, zero tracebacks, zero hangs, memory bounded",
        "met": all(totals[o] == 0 for o in ("silent", "traceback", "hang", "unbounded")),
        "scenarios": {k: {"counts": tally(v), "probes": v} for k, v in scenarios.items()},
    }
    out = ROOT / "benchmarks" / "results" / f"fault_injection_{hardware.slug()}.json"
    files.write_json(out, result)
    for k, v in scenarios.items():
        print(f"{k:>10}: {tally(v)}")
        for r in v:
            if r["outcome"] in ("silent", "traceback", "hang", "unbounded"):
                print(f"            {r['outcome']}: {r['probe']}: {r['detail']}")
    print(f"totals: {totals}; target met: {result['met']}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
