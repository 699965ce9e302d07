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
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from tqdm.auto import tqdm

from research import config as config_lib
from research import errors, files, hardware, log, models
from research.data import dataset, tokenizers
from research.eval import metrics
from research.train import checkpoint, optim, sharding
from research.train import step as step_lib

# Settings that may change between an interrupted run and its resumption.
RESUMABLE_KEYS = (
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "eval",
    "mesh",
    "wandb",
)


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; rerunning the same command resumes."""


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


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
    old, new = _flat(recorded), _flat(json.loads(config_lib.to_json(cfg)))
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


@contextlib.contextmanager
def _stop_on_signal():
    """Yields a list that becomes non-empty when SIGINT/SIGTERM arrives (main thread only)."""
    flag: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag:  # a second signal stops at once
            raise KeyboardInterrupt
        flag.append(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in old.items():
            signal.signal(s, h)


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

    tx = optim.make(cfg.train)
    graphdef, abstract_params = models.abstract(mcfg)
    param_sh = sharding.named(sharding.param_specs(abstract_params, cfg.mesh.rules, mesh), mesh)
    abstract_state = step_lib.abstract_state(abstract_params, tx)
    state_sh = sharding.mirror(abstract_state, abstract_params, param_sh, mesh)
    batch_sh = sharding.batch_sharding(mesh, batch_axes)

    with contextlib.ExitStack() as cleanup:
        # Everything is checked: from here on the run directory is written, by this process alone.
        if jax.process_index() == 0:
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
        files.write_json(workdir / "config.json", cfg.to_dict())
        if resume:
            _check_same_data(ckpts.meta(), tok, splits, workdir)
            target = jax.tree.map(
                lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_state, state_sh
            )
            state, _ = ckpts.restore(target)
            for newer in [s for s in ckpts.all_steps() if s > int(state["step"])]:
                # Damaged steps past the intact one (restore warned about each): this run recomputes them.
                ckpts.delete(newer)
        else:
            init = jax.jit(lambda: step_lib.init_state(models.init(mcfg, cfg.seed)[1], tx), out_shardings=state_sh)
            state = init()
        start = int(state["step"])
        logger = log.Logger(workdir, cfg.to_dict(), cfg.wandb.to_dict(), resume_step=start if resume else None)
        cleanup.callback(logger.close)
        train_step = step_lib.make_train_step(
            graphdef, tx, seed=cfg.seed, dropout=mcfg.dropout > 0, state_shardings=state_sh, batch_sharding=batch_sh
        )
        schedule = optim.schedule(cfg.train)
        n_params = config_lib.model_config.count_params(mcfg)

        def evaluate(max_windows):
            return metrics.evaluate(
                graphdef,
                state["params"],
                splits.val,
                tok.token_bytes,
                protocol,
                batch_size=cfg.eval.batch_size,
                max_windows=max_windows,
                progress=progress,
            )

        def save(step):
            meta = {
                "config": cfg.to_dict(),
                "tokenizer": tok.spec,
                "corpus_sha256": splits.corpus_sha256,
                "data": {"sampler": cfg.data.sampling, "seed": cfg.seed, "next_step": step},
            }
            try:
                ckpts.save(step, state, meta)
            except (errors.UserError, KeyboardInterrupt):
                raise
            except Exception as e:  # disk full, permissions, a vanished directory: orbax raises many types
                saved = [s for s in ckpts.all_steps() if s < step]
                back = f"rerun the same command to resume from step {saved[-1]}" if saved else "rerun to start again"
                raise errors.UserError(
                    f"saving checkpoint step {step} in {ckpts.dir} failed ({type(e).__name__}: "
                    f"{checkpoint._short(e)}); free space or fix the directory, then {back}"
                ) from None

        end = cfg.train.steps if stop_at is None else min(stop_at, cfg.train.steps)
        print(
            f"run {workdir}: {n_params:,} parameters; {splits.corpus} with {tok.spec}: {len(splits.train):,} train "
            f"/ {len(splits.val):,} val tokens; steps {start}->{end} of {cfg.train.steps}, "
            f"{cfg.data.batch_size}x{cfg.data.seq_len} tokens each; mesh {dict(mesh.shape)} on "
            f"{jax.device_count()} {jax.devices()[0].platform} device(s)",
            flush=True,
        )
        timed_steps, t_mark, paused = 0, None, 0.0  # paused: evaluation and checkpoint time inside the timing
        last_loss, signalled = float("nan"), False
        pending = []  # (step, loss, grad norm) on the device since the last check: checked without a sync per step
        bar = tqdm(
            range(start, end),
            desc="train",
            initial=start,
            total=end,
            disable=None if progress is None else not progress,
        )
        with _stop_on_signal() as stop:
            for s in bar:
                state, m = train_step(state, jax.device_put(batches(s), batch_sh))
                done = s + 1
                pending.append((done, m["loss"], m["grad_norm"]))
                if s == start:  # the first step compiles: time from its end
                    jax.block_until_ready(m["loss"])
                    t_mark = time.time()
                else:
                    timed_steps += 1
                do_eval = done % cfg.train.eval_every == 0 and done < cfg.train.steps
                stopping = bool(stop)  # read once: a signal during this step's evaluation stops the next one
                do_save = done % cfg.train.ckpt_every == 0 or done == end or stopping
                do_log = done % cfg.train.log_every == 0 or done == end
                if do_log or do_eval or do_save:
                    _check_finite(pending, state if do_save else None, ckpts)
                    pending.clear()
                if do_log:
                    last_loss = float(m["loss"])
                    logger.log(done, {"loss": last_loss, "grad_norm": float(m["grad_norm"]), "lr": float(schedule(s))})
                    bar.set_postfix(loss=f"{last_loss:.4f}")
                if do_eval or do_save:
                    jax.block_until_ready(state)  # queued steps finish inside the timing, not in the pause
                    t0 = time.time()
                    if do_eval:
                        val = evaluate(cfg.eval.max_windows)
                        logger.log(done, log.numeric(val), split="val")
                        tqdm.write(
                            f"step {done}: train loss {last_loss:.4f}, val loss {val['loss']:.4f} nats/token, "
                            f"{val['bits_per_byte']:.4f} bits/byte"
                        )
                    if do_save:
                        save(done)
                    paused += time.time() - t0
                if stopping:
                    signalled = True
                    break
        bar.close()
        jax.block_until_ready(state)
        timed_seconds = time.time() - t_mark - paused if t_mark is not None else 0.0
        done = int(state["step"])
        summary_file = workdir / "summary.json"
        previous = _read_summary(summary_file) if resume else {}
        final = evaluate(None) if done >= cfg.train.steps else None
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
        "mesh": dict(mesh.shape),
        "wall_seconds": time.time() - t_start,
    }
    files.write_json(summary_file, summary)
    if signalled or done < cfg.train.steps:
        raise Interrupted(f"stopped at step {done}; checkpoint saved in {workdir}; rerun the same command to resume")
    return summary


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


def _check_finite(pending: list, state, ckpts) -> None:
    """Stops training at the first non-finite loss or gradient norm in `pending`, and before a save (`state` given)
    at non-finite parameters, so a diverged model is never checkpointed; the last finite checkpoint is kept."""
    values = jax.device_get([(loss, norm) for _, loss, norm in pending])
    bad = next(((step, v) for (step, _, _), v in zip(pending, values) if not np.all(np.isfinite(v))), None)
    if bad is None and state is not None and not bool(_all_finite(state["params"])):
        bad = (pending[-1][0] if pending else int(state["step"]), None)
    if bad is None:
        return
    step, v = bad
    what = f"loss {float(v[0])}, gradient norm {float(v[1])}" if v is not None else "non-finite parameters"
    saved = ckpts.all_steps()  # listed only when reporting: not a directory scan at every log step
    kept = f"the last finite checkpoint, step {saved[-1]}, is kept" if saved else "no checkpoint was saved"
    raise errors.UserError(
        f"training diverged at step {step} ({what}); {kept}. Lower train.lr or raise train.warmup_steps, and use a "
        "new --workdir or resume from that checkpoint"
    )


@jax.jit
def _all_finite(params):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)]))
