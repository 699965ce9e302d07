"""The training loop: one function from a config and a run directory to a trained, evaluated, checkpointed model.

A run directory holds `config.json`, `metrics.jsonl` (every logged metric), `checkpoints/` (orbax), `summary.json`
and, with W&B offline, `wandb/`. Running `train` again on the same directory resumes from its latest checkpoint and
continues the same trajectory (batches and dropout keys are functions of the seed and step). A directory holding a
run with a different model, data or seed is refused rather than overwritten. Ctrl-C or SIGTERM stops at the next
step boundary, saves a checkpoint and raises `Interrupted`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import ml_collections as mlc

from research import config as config_lib
from research import errors, files, hardware, log, models
from research.compress import core
from research.data import dataset, tokenizers
from research.eval import metrics
from research.parallel import distributed, sharding
from research.train import checkpoint, fit, optim
from research.train.fit import Interrupted  # noqa: F401  (raised by train; the CLI catches it as loop.Interrupted)

# Settings that may change between an interrupted run and its resumption.
RESUMABLE_KEYS = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "eval",
    "mesh",
    "distributed",
    "wandb",
)


def check_run_dir(workdir: Path, cfg: mlc.ConfigDict) -> bool:
    """Decides what to do with a run directory.

    Returns:
      True if `workdir` holds a checkpointed run of this config to resume; False if the run starts afresh there
      (a new or empty directory, or one whose run never reached a checkpoint).

    Raises:
      UserError: the directory holds something else: a checkpointed run of a different config, or files that are
        not a ziplm run. Nothing in it is touched.
    """
    if not workdir.exists():
        return False
    if not workdir.is_dir():
        raise errors.UserError(f"run directory {workdir} is a file")
    saved = workdir / "config.json"
    if not saved.exists():
        if any(p.name not in ("checkpoints", ".lock") for p in workdir.iterdir()) or checkpoint.exists(workdir):
            raise errors.UserError(f"{workdir} exists and is not a ziplm run directory; choose another --workdir")
        return False
    if not checkpoint.exists(workdir):
        try:
            json.loads(saved.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            print(
                f"warning: {saved} is damaged ({e}) and no checkpoint was saved: the run starts afresh", file=sys.stderr
            )
        return False
    try:
        recorded = json.loads(saved.read_text())
        if not isinstance(recorded, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        # The checkpoints carry the run's config too: compare against theirs (config.json is rewritten below).
        print(f"warning: {saved} is damaged ({e}); using the config recorded in the checkpoints", file=sys.stderr)
        ckpts = checkpoint.Checkpoints(workdir, create=False)
        try:
            recorded = ckpts.meta()["config"]
        finally:
            ckpts.close()
    recorded = {"compress": [], **recorded}  # runs from before training under transforms
    old, new = config_lib.flat(recorded), config_lib.flat(json.loads(config_lib.to_json(cfg)))
    changed = sorted(
        k
        for k in set(old) | set(new)
        if old.get(k) != new.get(k) and not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)
    )
    if changed:
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        raise errors.UserError(
            f"{workdir} holds a run with a different config ({diff}); choose another --workdir or remove it"
        )
    return True


def _check_same_data(meta: dict, tok, splits, workdir: Path) -> None:
    """Refuses to resume on other data: the corpus text or the tokenizer changed since the checkpoint."""
    if meta.get("tokenizer") != tok.spec:
        raise errors.UserError(f"{workdir} was trained with tokenizer {meta.get('tokenizer')}, not {tok.spec}")
    if meta.get("corpus_sha256") != splits.corpus_sha256:
        raise errors.UserError(
            f"the corpus {splits.corpus!r} changed since {workdir} was checkpointed (sha256 "
            f"{str(meta.get('corpus_sha256'))[:12]}... then, {splits.corpus_sha256[:12]}... now); "
            "resuming would train on other data: choose another --workdir"
        )


def _discard_unsaved(workdir: Path, fresh: bool):
    """An exit callback that removes a run directory this call created when the run fails (diverged, a full disk
    at its first save, ...) before saving any checkpoint: nothing in it could be resumed, and the same command
    after a fix starts clean. A run stopped by a signal, or one that saved a checkpoint, is kept."""

    def callback(exc_type, exc, tb):
        if fresh and exc_type is not None and issubclass(exc_type, errors.UserError) and not checkpoint.exists(workdir):
            shutil.rmtree(workdir, ignore_errors=True)
        return False

    return callback


def train(
    cfg: mlc.ConfigDict, workdir: str | Path, *, stop_at: int | None = None, progress: bool | None = None
) -> dict:
    """Trains (or resumes) the run `cfg` describes in `workdir`.

    Args:
      cfg: the run config (see research.config.base_config).
      workdir: the run directory; created if missing, resumed if it holds this run.
      stop_at: stop after this many steps as if interrupted (saves a checkpoint first); for tests and debugging.
      progress: show progress bars (None: only on a terminal).

    Returns:
      The summary: parameters, steps, final validation metrics, tokens/s, MFU, wall time.

    Raises:
      UserError: bad config, data or run directory (raised before anything is written).
      Interrupted: stopped by a signal or `stop_at` after saving a checkpoint.
    """
    t_start = time.time()
    config_lib.validate(cfg)
    distributed.initialize(cfg.get("distributed"))
    workdir = Path(workdir).expanduser().resolve()
    resume = check_run_dir(workdir, cfg)
    mcfg = config_lib.model_cfg(cfg)
    tok = tokenizers.load(cfg.data.tokenizer)
    if tok.vocab_size > mcfg.vocab_size:
        raise errors.UserError(
            f"model.vocab_size ({mcfg.vocab_size}) is smaller than the tokenizer's vocabulary ({tok.vocab_size}): "
            f"set --config.model.vocab_size={tok.vocab_size}"
        )
    splits = dataset.prepare(cfg.data.corpus, tok, cfg.data.val_fraction)
    batches = dataset.Batches(splits.train, cfg.data.batch_size, cfg.data.seq_len, cfg.seed, cfg.data.sampling)
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.model)
    batch_axes = sharding.batch_axes_for(cfg.mesh.rules)
    sharding.check_batch(cfg.data.batch_size, mesh, batch_axes)
    _check_memory(cfg, mcfg, mesh)
    protocol = metrics.Protocol(
        cfg.eval.window or cfg.data.seq_len, cfg.eval.stride or cfg.eval.window or cfg.data.seq_len
    )

    transform, cstate_init = _transform(cfg, mcfg)
    tx = optim.make(cfg.train) if transform is None else core.keep_masked(optim.make(cfg.train))
    graphdef, abstract_params = models.abstract(mcfg)

    def init_state():
        params = models.init(mcfg, cfg.seed)[1]
        return fit.new_state(params, tx, None if transform is None else cstate_init(params))

    abstract_state = jax.eval_shape(init_state)
    state_sh = fit.state_shardings(abstract_state, abstract_params, cfg.mesh.rules, mesh)
    batch_sh = sharding.batch_sharding(mesh, batch_axes)

    fresh = not workdir.exists() or not any(workdir.iterdir())
    with contextlib.ExitStack() as cleanup:
        # Everything is checked: from here on the run directory is written, by this process alone.
        if distributed.is_main():
            cleanup.push(_discard_unsaved(workdir, fresh))  # pushed first: runs last, after the lock is released
            cleanup.enter_context(files.RunLock(workdir))
        resume = check_run_dir(workdir, cfg)  # again, under the lock: another run may have written it meanwhile
        ckpts = checkpoint.Checkpoints(workdir, keep=cfg.train.keep_checkpoints)
        cleanup.callback(ckpts.close)
        cleanup.callback(ckpts.wait)
        if resume and ckpts.all_steps()[-1] > cfg.train.steps:
            raise errors.UserError(
                f"{workdir} holds a run already at step {ckpts.all_steps()[-1]}, past train.steps={cfg.train.steps}: "
                "a run cannot be shortened; evaluate an earlier step with ziplm eval --step, or use a new --workdir"
            )
        if distributed.is_main():
            files.write_json(workdir / "config.json", cfg.to_dict())
        if resume:
            _check_same_data(ckpts.meta(), tok, splits, workdir)
            state = fit.restore(ckpts, abstract_state, state_sh)
        else:
            state = jax.jit(init_state, out_shardings=state_sh)()
        start = int(state["step"])
        logger = log.Logger(workdir, cfg.to_dict(), cfg.wandb.to_dict(), resume_step=start if resume else None)
        cleanup.callback(logger.close)
        n_params = config_lib.model_config.count_params(mcfg)
        effective = jax.jit(
            lambda st: st["params"] if transform is None else transform.apply(st["params"], st["compress"])
        )

        def evaluate(state, max_windows):
            return metrics.evaluate(
                graphdef,
                effective(state),
                splits.val,
                tok.token_bytes,
                protocol,
                batch_size=cfg.eval.batch_size,
                max_windows=max_windows,
                progress=progress,
                sharding=batch_sh,
            )

        def meta(step):
            return {
                "config": cfg.to_dict(),
                "tokenizer": tok.spec,
                "corpus_sha256": splits.corpus_sha256,
                "data": {"sampler": cfg.data.sampling, "seed": cfg.seed, "next_step": step},
            }

        lp = fit.Loop(
            graphdef, tx, optim.schedule(cfg.train), batches, state_sh, batch_sh, ckpts, logger, meta,
            steps=cfg.train.steps, log_every=cfg.train.log_every, eval_every=cfg.train.eval_every,
            ckpt_every=cfg.train.ckpt_every, seed=cfg.seed, dropout=mcfg.dropout > 0, transform=transform,
            evaluate=lambda st: evaluate(st, cfg.eval.max_windows),
        )  # fmt: skip
        end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
        if distributed.is_main():
            print(
                f"run {workdir}: {n_params:,} parameters; {splits.corpus} with {tok.spec}: {len(splits.train):,} "
                f"train / {len(splits.val):,} val tokens; steps {start}->{end} of {cfg.train.steps}, "
                f"{cfg.data.batch_size}x{cfg.data.seq_len} tokens each; mesh {dict(mesh.shape)} on "
                f"{jax.device_count()} {jax.devices()[0].platform} device(s) in {jax.process_count()} process(es)"
                + (f"; under {[dict(x)['method'] for x in cfg.compress]}" if transform is not None else ""),
                flush=True,
            )
        res = fit.run(lp, state, stop_at=stop_at, progress=progress)
        state, timed_steps, timed_seconds, last_loss, signalled = (
            res.state, res.timed_steps, res.timed_seconds, res.last_loss, res.signalled
        )  # fmt: skip
        done = int(state["step"])
        summary_file = workdir / "summary.json"
        previous = _read_summary(summary_file) if resume else {}
        final = evaluate(state, None) if done >= cfg.train.steps else None
        if final is not None:
            logger.log(done, log.numeric(final), split="val")

    # A resumed run that had nothing left to do reports the throughput of the run that trained it.
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    tokens_per_s = timed_steps * tokens_per_step / timed_seconds if timed_steps and timed_seconds > 0 else None
    tokens_per_s = tokens_per_s or previous.get("tokens_per_second")
    flops = config_lib.model_config.flops_per_token(mcfg, cfg.data.seq_len)
    peak = hardware.peak_flops(mcfg.dtype)
    summary = {
        "workdir": str(workdir),
        "params": n_params,
        "steps": done,
        "resumed_from": start if resume else None,
        "train_loss": last_loss if start < done else previous.get("train_loss"),
        "val": final,
        "tokens_per_second": tokens_per_s,
        "flops_per_token": flops,
        "mfu": tokens_per_s * flops / peak if tokens_per_s and peak else None,
        "devices": hardware.describe(),
        "host_cpus": hardware.host_cpus(),  # CPU results reproduce bit for bit at the same count (hardware.host_cpus)
        "environment": hardware.environment(),  # jax version, CPU model and ISA, lock file
        "mesh": dict(mesh.shape),
        "wall_seconds": time.time() - t_start,
    }
    if distributed.is_main():
        files.write_json(summary_file, summary)
    if signalled or done < cfg.train.steps:
        raise Interrupted(
            f"stopped at step {done}; checkpoint saved in {workdir}; rerun the same command to resume", signalled
        )
    return summary


def _transform(cfg, mcfg):
    """The transform a train config's `compress` list names (None for an empty list) and its initialiser
    params -> state (traced: it runs inside the jitted initialisation, and abstractly to restore a checkpoint).

    Training from scratch under a transform is QAT from the start or pruning during pre-training: the methods
    that need calibration data (a trained model's activations) are refused."""
    specs = [dict(x) for x in cfg.get("compress", None) or []]
    if not specs:
        return None, None
    from research.compress import registry

    ts = []
    for spec in specs:
        if "method" not in spec:
            raise errors.UserError(f"train config: compress entry {spec} has no 'method'")
        if registry.needs_calibration(spec):
            raise errors.UserError(
                f"{spec['method']} needs a trained model's calibration data; compress a trained run with "
                "ziplm compress instead, or train under a method without calibration (magnitude, gradual, qat, ...)"
            )
        ts.append(registry.make(spec.pop("method"), **spec))
    t = ts[0] if len(ts) == 1 else core.chain(*ts)
    key = jax.random.fold_in(jax.random.key(cfg.seed), 1)

    def init(params):
        try:
            return t.init(params, key, None)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as e:
            raise errors.UserError(
                f"train config: the compress list cannot be initialised inside the training step "
                f"({type(e).__name__}); start from a trained run with ziplm compress instead"
            ) from None

    return t, init


def _check_memory(cfg, mcfg, mesh) -> None:
    """Refuses a batch whose training memory estimate (`hardware.training_bytes`) is more than twice what a device
    has, before anything is written; CPU devices share the host's memory."""
    available = hardware.device_memory_bytes()
    if not available:
        return
    data = mesh.shape["data"]
    shards = {"fsdp": mesh.size, "tensor": mesh.shape["model"]}.get(cfg.mesh.rules, 1)
    n_params = config_lib.model_config.count_params(mcfg)
    need = hardware.training_bytes(mcfg, n_params, -(-cfg.data.batch_size // data), cfg.data.seq_len, shards)
    if jax.local_devices()[0].platform == "cpu":
        need *= len(jax.local_devices()[: mesh.size])
    if need > 2 * available:
        raise errors.UserError(
            f"data.batch_size={cfg.data.batch_size} at seq_len {cfg.data.seq_len} needs about {need / 2**30:,.1f} GiB "
            f"to train (estimate), more than twice the {available / 2**30:,.1f} GiB available per device; lower "
            "data.batch_size (or add devices)"
        )


def _read_summary(path: Path) -> dict:
    """The previous summary.json of a resumed run ({} when missing or damaged: it is rewritten at the end)."""
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as e:
        print(f"warning: {path} is damaged ({e}); it is rewritten at the end of this run", file=sys.stderr)
        return {}
    return summary if isinstance(summary, dict) else {}
