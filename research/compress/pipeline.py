"""The `compress` job: load a model, compress it with a chain of transforms, optionally fine-tune with the
compression held, evaluate before and after, and save the compressed model with a JSON summary.

    ziplm compress --config experiments/configs/prune.py:wanda [--workdir runs/x] [--config.compress.0.sparsity=0.6]

A compress config (see `base_config`) holds the source model, the data, the calibration sample, the chain of
methods (`compress`: a list of {"method": name, **arguments}, applied in order), the fine-tuning and the evaluation.
Two entries are not parameter transforms: {"finetune": steps} fine-tunes the chain so far, and
{"method": "act_quant", "bits": 8} fake-quantizes the inputs of the block linear layers per token
(`models.act_quant`; W8A8 with an 8-bit weight method): it sets the saved model config's `act_bits`, and every
evaluation, fine-tuning stage and calibration pass after it runs with quantized activations.
The output directory, written only when everything succeeded, holds:

    model.zlm         the compressed model, packed (`coding.pack`): every leaf a transform changed stored as the
                      typed record it exported (`core.export`: masks, grid codes with scales and zero points,
                      palette indices with their tables), the rest as entropy-coded bit-exact floats; its header
                      holds the model config, tokenizer, source, the source's run config and this compress config.
                      `ziplm eval / encode / export / pack --model DIR` read it (DIR or DIR/model.zlm). With
                      `shrink`, the smaller dense model of structured pruning.
    summary.json      methods, sparsity report, metrics before / after compression / after fine-tuning, seconds
                      per stage, and the packed sizes (`artifact.sizes`: bytes, bits per weight, ratios against
                      float32 and bfloat16) of the compressed model before fine-tuning ("packed_compressed") and of
                      the saved one ("packed")
    metrics.jsonl     fine-tuning losses (and W&B offline files under wandb/ when enabled)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import tempfile
import time
import warnings
import zlib
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections as mlc
import numpy as np

from research import codes as codes_lib
from research import config as config_lib
from research import errors, files, hardware, log, models, sources, tree
from research.coding import artifact
from research.coding import pack as coding_pack
from research.compress import calib as calib_lib
from research.compress import core, registry
from research.compress import report as compress_report
from research.data import corpora, dataset, tokenizers
from research.eval import metrics
from research.models import act_quant
from research.parallel import distributed, sharding
from research.train import fit


def base_config() -> mlc.ConfigDict:
    """The defaults of a compress config: magnitude pruning to 50%, no fine-tuning."""
    c = mlc.ConfigDict()
    c.seed = 0
    c.model = ""  # a run directory, a Hugging Face checkpoint directory or a hub id
    c.step = None  # checkpoint step of a run (None: the latest)
    # corpus / tokenizer None: the source run's (HF sources need a corpus).
    c.data = dict(corpus=None, tokenizer=None, val_fraction=0.1, batch_size=16, seq_len=None)
    # Calibration windows (n=0: none) at seeded random offsets of `corpus` (a text of its own, tokenized whole) or,
    # when None, of the training split of data.corpus; length is capped by the model's context.
    c.calibration = dict(n=128, length=2048, seed=0, batch_size=8, corpus=None)
    # Methods applied in order; a {"finetune": steps} entry fine-tunes the chain so far (with the settings of
    # `finetune`) before the methods after it are initialised: prune -> fine-tune -> quantize is one list.
    c.compress = [dict(method="magnitude", sparsity=0.5)]
    # After structured pruning: save the physically smaller dense model (prune.structured.shrink) instead of masks.
    c.shrink = False
    c.finetune = dict(
        steps=0,
        lr=1e-4,
        min_lr=1e-5,
        warmup_steps=0,
        weight_decay=0.0,
        b1=0.9,
        b2=0.99,
        grad_clip=1.0,
        log_every=10,
        eval_every=0,  # 0: evaluate only after each stage
        ckpt_every=100,
        keep_checkpoints=2,
    )
    # The mesh (research/parallel/sharding.py) fine-tuning runs on; with more than one device (or in a multi-process
    # run), calibration and evaluation split their windows over its data axis too. The default is one device.
    c.mesh = dict(data=1, model=1, rules="replicated")
    c.distributed = dict(enabled=False, coordinator=None, num_processes=None, process_id=None)
    # Evaluation: the validation split of data.corpus, or `corpus` (a text of its own, evaluated whole: e.g.
    # "wikitext:<wiki.test.raw>"); protocol "windows" (window/stride) or "gptq" (disjoint windows, the published
    # tables' protocol, with the tokenizer's default prefix first); window None: data.seq_len. `agreement` also
    # reports KL(dense || compressed) per token and top-1 agreement with the dense model; `dense` False skips the
    # dense model's own evaluation (summary "dense": None; for sweeps that evaluate it once).
    c.eval = dict(
        window=None,
        stride=None,
        batch_size=32,
        max_windows=None,
        corpus=None,
        protocol="windows",
        agreement=False,
        dense=True,
    )
    c.wandb = dict(mode="offline", project="ziplm", entity=None, name=None, group=None, job_type=None, sweep=None)
    return c


class ActQuant(NamedTuple):
    """A {"method": "act_quant", "bits": b} entry: per-token activation fake quantization from here on."""

    bits: int


def members(specs) -> list:
    """The `compress` list as Transforms, with the steps (ints) of its {"finetune": steps} entries and the
    `ActQuant` of its act_quant entry in place."""
    if not isinstance(specs, list | tuple) or not specs:
        raise errors.UserError("compress must be a non-empty list of {'method': name, ...} entries")
    out = []
    for spec in specs:
        spec = dict(spec)
        if set(spec) == {"finetune"}:
            steps = spec["finetune"]
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise errors.UserError(f"a {{'finetune': steps}} entry needs a positive integer, got {steps!r}")
            out.append(steps)
            continue
        if "method" not in spec:
            raise errors.UserError(f"compress entry {spec} has no 'method' (or is not {{'finetune': steps}})")
        if spec["method"] == "act_quant":
            extra = sorted(set(spec) - {"method", "bits"})
            if extra or "bits" not in spec:
                raise errors.UserError(f"an act_quant entry takes exactly one argument, bits (got {spec})")
            out.append(ActQuant(act_quant.check_bits(spec["bits"])))
            continue
        out.append(registry.make(spec.pop("method"), **spec))
    if all(isinstance(x, int) for x in out):
        raise errors.UserError("the compress list names no method")
    if sum(isinstance(x, ActQuant) for x in out) > 1:
        raise errors.UserError("the compress list has more than one act_quant entry")
    return out


def build(specs) -> core.Transform:
    """The chain of transforms a config's `compress` list names ({"finetune": steps} and act_quant entries aside)."""
    ts = [x for x in members(specs) if isinstance(x, core.Transform)]
    return ts[0] if len(ts) == 1 else core.chain(*ts)


def validate(cfg: mlc.ConfigDict) -> None:
    if not cfg.model:
        raise errors.UserError("set the model to compress: --config.model=RUN_DIR (or an HF directory / hub id)")
    f = cfg.finetune

    def integer(name, value, low):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise errors.UserError(f"{name} must be an integer >= {low}, got {value!r}")

    integer("finetune.steps", f.steps, 0)
    integer("finetune.log_every", f.log_every, 1)
    integer("data.batch_size", cfg.data.batch_size, 1)
    integer("calibration.n", cfg.calibration.n, 0)
    integer("calibration.batch_size", cfg.calibration.batch_size, 1)
    if f.steps and (f.lr <= 0 or f.min_lr < 0 or f.warmup_steps < 0):
        raise errors.UserError("finetune.lr must be > 0, finetune.min_lr >= 0 and finetune.warmup_steps >= 0")
    specs = [dict(x) for x in cfg.compress]
    for i, spec in enumerate(specs):
        if spec.get("method") == "gradual":
            # Its fine-tuning is the next {"finetune": N} stage after it, or the final fine-tune without one.
            stage = next((s["finetune"] for s in specs[i + 1 :] if set(s) == {"finetune"}), None)
            end = spec.get("start", 0) + spec.get("steps", 1000)
            have, name = (f.steps, "finetune.steps") if stage is None else (stage, f"the {{'finetune': {stage}}} stage")
            if isinstance(have, int) and have < end:
                fix = f"--config.finetune.steps={end}" if stage is None else f"a {{'finetune': {end}}} stage"
                raise errors.UserError(
                    f"gradual pruning ends at step {end} but {name} runs {have} steps: the final sparsity would "
                    f"never be reached; use {fix} or more (more leaves recovery steps)"
                )
        if registry.needs_calibration(spec) and not cfg.calibration.n:
            raise errors.UserError(f"{spec['method']} needs calibration data: set calibration.n > 0")
    data = (cfg.get("mesh") or {}).get("data", 1)
    if isinstance(data, int) and data > 1 and any(map(registry.needs_calibration, specs)):
        if cfg.calibration.batch_size % data:
            raise errors.UserError(
                f"calibration.batch_size={cfg.calibration.batch_size} is not divisible by mesh.data={data}: each "
                "calibration batch is split over the data devices"
            )
    if "pack" in cfg:
        raise errors.UserError("compress always writes model.zlm now: drop the config's 'pack' entry")
    if cfg.get("shrink") and [dict(x).get("method") for x in cfg.compress] != ["structured"]:
        raise errors.UserError("shrink applies to a compress list holding exactly one 'structured' entry")


@dataclasses.dataclass
class _Job:
    """What `run` works on, every input checked before anything is computed: the loaded model, its tokenizer, the
    token streams (training split, evaluation, calibration), the protocol, the parsed compress list (`parts`) and
    the model config the result runs with (`out_cfg`: with the act_quant entry's activation bits)."""

    cfg: mlc.ConfigDict
    m: sources.Model
    tok: tokenizers.ByteTokenizer | tokenizers.HFTokenizer
    corpus: str
    train_tokens: np.ndarray
    eval_tokens: np.ndarray
    calib_tokens: np.ndarray
    seq_len: int
    protocol: metrics.Protocol
    specs: list
    parts: list
    out_cfg: object
    out_graphdef: object
    progress: bool | None
    mesh: object  # fine-tuning's mesh; calibration and evaluation use it too when `spread`
    times: dict = dataclasses.field(default_factory=dict)
    partial: Path | None = None  # where fine-tuning checkpoints and metrics live until the run succeeds
    logger: log.Logger | None = None

    @property
    def spread(self) -> bool:
        """Whether calibration and evaluation split their windows over the mesh (more than one device)."""
        return self.mesh.size > 1

    @contextlib.contextmanager
    def timed(self, name: str):
        t = time.time()
        yield
        self.times[name] = time.time() - t

    def evaluate(self, params, desc: str, graphdef=None) -> dict:
        """The metrics of `params` on the evaluation tokens (with agreement against the dense model if asked)."""
        graphdef = self.m.graphdef if graphdef is None else graphdef
        dense = params is self.m.params and graphdef is self.m.graphdef
        return metrics.evaluate(
            graphdef,
            params,
            self.eval_tokens,
            self.tok.token_bytes,
            self.protocol,
            batch_size=self.cfg.eval.batch_size,
            max_windows=self.cfg.eval.max_windows,
            progress=self.progress,
            desc=desc,
            reference=(self.m.graphdef, self.m.params) if self.cfg.eval.get("agreement") and not dense else None,
            sharding=sharding.batch_sharding(self.mesh, ("data",)) if self.spread else None,
        )

    def batches(self) -> dataset.Batches:
        """The fine-tuning batches: step -> batch, a pure function of (seed, step)."""
        return dataset.Batches(self.train_tokens, self.cfg.data.batch_size, self.seq_len, self.cfg.seed, "random")

    def finetune(self, graphdef, params, transform, cstate, steps: int, offset: int, name: str):
        """Fine-tunes `steps` steps under `transform` on the batch stream from step `offset` on, through the
        trainer's loop (`fit.finetune`), checkpointed in `partial/name` and resumed from there."""
        t_cfg = mlc.ConfigDict({**self.cfg.finetune.to_dict(), "steps": steps})
        return fit.finetune(
            graphdef, params, transform, cstate, fit.Offset(self.batches(), offset), t_cfg,
            workdir=self.partial / name, mesh=self.mesh, rules=_mesh_cfg(self.cfg)["rules"], logger=self.logger,
            log_offset=offset, evaluate=lambda p: self.evaluate(p, f"eval {name}", graphdef),
            meta={"stage": name, "offset": offset}, seed=self.cfg.seed, progress=self.progress, desc=name,
        )  # fmt: skip

    def pack_meta(self, model_cfg) -> dict:
        """The header of the packed result: model config, tokenizer, provenance and this compress config (without its
        W&B settings: logging is not provenance, and a sweep's names must not change a file's bytes)."""
        return artifact.meta(
            model_cfg,
            self.tok.spec,
            self.cfg.model,
            self.m.kind,
            self.m.step,
            self.m.run_config,
            methods=[dict(x) for x in self.cfg.compress],
            compress_config={k: v for k, v in json.loads(config_lib.to_json(self.cfg)).items() if k != "wandb"},
        )


def _mesh_cfg(cfg) -> dict:
    return dict(cfg.get("mesh") or {"data": 1, "model": 1, "rules": "replicated"})


def _prepare(cfg: mlc.ConfigDict, progress) -> _Job:
    """Loads the model and the data a compress config names, and checks what only they can tell."""
    mesh_cfg = _mesh_cfg(cfg)
    mesh = sharding.make_mesh(mesh_cfg["data"], mesh_cfg["model"])
    if cfg.finetune.steps or any(set(dict(x)) == {"finetune"} for x in cfg.compress):
        sharding.check_batch(cfg.data.batch_size, mesh, ("data",))
    m = sources.load(cfg.model, cfg.step)
    run_cfg = m.run_config
    tok_spec = cfg.data.tokenizer or m.tokenizer
    if tok_spec is None:
        raise errors.UserError(f"{cfg.model} names no tokenizer: set --config.data.tokenizer (byte or hf:DIR)")
    tok = tokenizers.load(tok_spec)
    corpus = cfg.data.corpus or (run_cfg.data.corpus if run_cfg else None) or cfg.calibration.get("corpus")
    if corpus is None:
        raise errors.UserError(f"{cfg.model} is not a run of ours: set --config.data.corpus (e.g. a text file)")
    val_fraction = run_cfg.data.val_fraction if (run_cfg and not cfg.data.corpus) else cfg.data.val_fraction
    splits = dataset.prepare(corpus, tok, val_fraction)
    # A pretrained model's context can be far longer than its evaluation protocol needs (SmolLM2: 8,192).
    seq_len = cfg.data.seq_len or (run_cfg.data.seq_len if run_cfg else min(m.cfg.max_seq_len, 2048))
    window = cfg.eval.window or seq_len
    for name, value in (("data.seq_len", seq_len), ("eval.window", window)):
        if value > m.cfg.max_seq_len:
            raise errors.UserError(f"{name} ({value}) exceeds the model's context ({m.cfg.max_seq_len})")

    def text(spec):
        return np.asarray(dataset.tokenize_cached(corpora.load(spec).text, tok), np.int32)

    eval_tokens = text(cfg.eval.corpus) if cfg.eval.get("corpus") else splits.val
    style = cfg.eval.get("protocol", "windows")
    if style not in ("windows", "gptq"):
        raise errors.UserError(f"eval.protocol must be 'windows' or 'gptq', got {style!r}")
    if style == "gptq":
        if cfg.eval.stride not in (None, window):
            raise errors.UserError("eval.stride does not apply to the gptq protocol (its windows are disjoint)")
        # as `tokenizer(text)` in the reference code: the tokenizer's default prefix first
        eval_tokens = np.concatenate([tok.added_prefix, eval_tokens]).astype(np.int32)
        protocol = metrics.Protocol.gptq(window)
    else:
        protocol = metrics.Protocol(window, cfg.eval.stride or window)
    calib_tokens = text(cfg.calibration.corpus) if cfg.calibration.get("corpus") else splits.train
    # The list, parsed once, with what only the model knows filled in: heads are units of its head width.
    specs = [dict(x) for x in cfg.compress]
    specs = [{"head_dim": m.cfg.dim_head, **x} if x.get("method") == "structured" else x for x in specs]
    parts = members(specs)
    bits = next((x.bits for x in parts if isinstance(x, ActQuant)), None)
    out_cfg = m.cfg if bits is None else m.cfg.replace(act_bits=bits)
    out_graphdef = m.graphdef if bits is None else models.abstract(out_cfg)[0]
    return _Job(
        cfg, m, tok, corpus, splits.train, eval_tokens, calib_tokens, seq_len, protocol, specs, parts, out_cfg,
        out_graphdef, progress, mesh,
    )  # fmt: skip


def run(cfg: mlc.ConfigDict, workdir: str | Path, *, overwrite: bool = False, progress: bool | None = None) -> dict:
    """Runs a compress config; returns the summary (also written to `workdir/summary.json`).

    Raises:
      UserError: bad config, model or data, a non-empty `workdir` without `overwrite`, or non-finite weights
        after compression (nothing is written then).
    """
    t0 = time.time()
    validate(cfg)
    distributed.initialize(cfg.get("distributed"))
    members(cfg.compress)  # every entry checked before the model is loaded
    out = Path(workdir).expanduser().resolve()
    atomic = files.AtomicDir(out, overwrite)
    partial = _partial_dir(out, cfg, overwrite)
    job = _prepare(cfg, progress)
    job.times["load"] = time.time() - t0
    try:
        summary = _locked(job, atomic, partial, t0)
    except BaseException:
        resumable = _resume_step(partial) is not None or any((partial / "calibration").glob("*/block-*"))
        if distributed.is_main() and not resumable:  # nothing to resume: leave nothing behind
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if distributed.is_main():
        shutil.rmtree(partial, ignore_errors=True)
    return summary


def _locked(job: _Job, atomic, partial: Path, t0: float) -> dict:
    cfg = job.cfg
    with contextlib.ExitStack() as cleanup:
        with distributed.together("process 0 could not set up the run's directory; see its error"):
            if distributed.is_main():
                cleanup.enter_context(files.RunLock(partial))
                files.write_json(partial / "config.json", json.loads(config_lib.to_json(cfg)))
        job.partial = partial
        job.logger = log.Logger(partial, cfg.to_dict(), cfg.wandb.to_dict(), resume_step=_resume_step(partial))
        cleanup.callback(job.logger.close)
        return _run(job, atomic, t0)


def _partial_dir(out: Path, cfg, overwrite: bool) -> Path:
    """`.<name>.partial` beside the output: the calibration journal (`compress.journal`), fine-tuning checkpoints
    and metrics of a run that has not finished.
    It is resumed when it holds this config, refused when it holds another (replaced with `overwrite`)."""
    partial = out.with_name(f".{out.name}.partial")
    saved = partial / "config.json"
    if saved.is_file():
        try:
            old = json.loads(saved.read_text())
        except (ValueError, UnicodeDecodeError):
            old = None
        new = json.loads(config_lib.to_json(cfg))
        keep = ("wandb", "eval", "finetune.log_every", "finetune.eval_every", "finetune.ckpt_every", "mesh")
        if old is not None:
            old, new = (
                {k: v for k, v in config_lib.flat(d).items() if not any(k == r or k.startswith(r + ".") for r in keep)}
                for d in (old, new)
            )
        if old != new and not overwrite:
            raise errors.UserError(
                f"{partial} holds an unfinished compress run of a different config; rerun that config to resume "
                "it, or pass --overwrite to discard it"
            )
        if old != new and distributed.is_main():
            shutil.rmtree(partial)
    elif partial.exists() and overwrite and distributed.is_main():
        shutil.rmtree(partial)
    distributed.barrier("compress-partial")  # the others read it only after process 0 has cleared it
    return partial


def _resume_step(partial: Path) -> int | None:
    """The logged step the metrics file continues from: the newest fine-tuning checkpoint's (None: a new run)."""
    from research.train import checkpoint

    steps = []
    for stage in sorted(partial.glob("*/checkpoints")) if partial.is_dir() else []:
        if checkpoint.exists(stage.parent):
            ckpts = checkpoint.Checkpoints(stage.parent, create=False)
            try:
                steps.append(ckpts.meta()["offset"] + ckpts.all_steps()[-1])
            finally:
                ckpts.close()
    return max(steps) if steps else None


def _run(job: _Job, atomic, t0: float) -> dict:
    cfg, out = job.cfg, atomic.target
    with job.timed("eval_dense"):
        before = job.evaluate(job.m.params, "eval dense") if cfg.eval.get("dense", True) else None
    calib = None
    if any(registry.needs_calibration(x) for x in job.specs):
        c = cfg.calibration
        inputs = calib_lib.sample(job.calib_tokens, c.n, c.length, c.seed, job.m.cfg.max_seq_len)
        journal = job.partial / "calibration" if job.partial is not None else None  # resumable walks
        calib = calib_lib.Calibration(job.m.graphdef, inputs, c.batch_size, job.mesh if job.spread else None, journal)
    _reserve_header(job)
    with job.timed("compress"):
        transform, cstate, base, stages, offset = _staged(job, calib)
        effective = jax.block_until_ready(transform.apply(base, cstate))
    _check_finite(effective, "compression")
    at_init = compress_report.summarize(effective, transform.masks(cstate))
    allocations = _allocations(job, cstate)
    with job.timed("eval_compressed"):
        after = job.evaluate(effective, "eval compressed", job.out_graphdef)
    packed_at_init = None
    # else the saved model is this one; in a multi-process run process 0 packs, the others wait
    if (cfg.finetune.steps or cfg.get("shrink")) and distributed.is_main():
        with job.timed("pack_compressed"), tempfile.TemporaryDirectory() as d:  # model.zlm's header: same bytes
            exported = core.export(transform, base, cstate)
            packed_at_init = _pack(effective, exported, Path(d) / "m.zlm", job.pack_meta(job.out_cfg))

    tuned, ft, params = None, None, base
    if cfg.finetune.steps:  # the batch stream continues after the stages' batches
        params, cstate, ft = job.finetune(
            job.out_graphdef, base, transform, cstate, cfg.finetune.steps, offset, "finetune"
        )
        effective = jax.block_until_ready(transform.apply(params, cstate))
        job.times["finetune"] = ft["seconds"]
        _check_finite(effective, "fine-tuning")
        with job.timed("eval_finetuned"):
            tuned = job.evaluate(effective, "eval fine-tuned", job.out_graphdef)
        job.logger.log(offset + cfg.finetune.steps, log.numeric(tuned), split="val")
    job.logger.close()
    sizes = compress_report.summarize(effective, transform.masks(cstate))
    out_cfg, shrunk = job.out_cfg, None
    if cfg.get("shrink"):
        from research.compress.prune import structured

        out_cfg, effective = structured.shrink(job.m.cfg, params, cstate)
        with job.timed("eval_shrunk"):
            shrunk = job.evaluate(effective, "eval shrunk", models.abstract(out_cfg)[0])
        shrunk["params"] = sum(int(np.size(x)) for x in tree.flatten(effective).values())
        shrunk["model"] = out_cfg.to_dict()
    summary = {
        "source": cfg.model,
        "methods": [dict(s) for s in cfg.compress],
        "act_bits": out_cfg.act_bits,
        "sparsity": sizes["masked_sparsity"],
        "sparsity_compressed": at_init["masked_sparsity"],
        "nonzero_compressed": at_init["nonzero"],
        "sparsity_all_params": sizes["sparsity"],
        **{k: sizes[k] for k in ("masked_params", "params", "nonzero", "dense_bytes_fp32", "dense_bytes_bf16")},
        "leaves": sizes["leaves"],
        "calibration": {
            "n": cfg.calibration.n,
            "length": None if calib is None else calib.inputs.shape[1],
            "corpus": cfg.calibration.get("corpus") or f"{job.corpus} (training split)",
        },
        "eval_corpus": cfg.eval.get("corpus") or f"{job.corpus} (validation split)",
        "stages": stages,
        "dense": before,
        "compressed": after,
        "finetuned": tuned,
        "shrunk": shrunk,
        "finetune": ft,
        "devices": {
            "processes": jax.process_count(),
            "mesh": dict(job.mesh.shape),
            "host_cpus": hardware.host_cpus(),
            "kind": hardware.describe(),
            "jax": jax.__version__,
            "cpu": hardware.cpu(),
            "lock": hardware.lock(),
        },
        "seconds": {**job.times, "total": time.time() - t0},
        "workdir": str(out),
        "packed": None,  # process 0's: written with the file
        "packed_compressed": packed_at_init,
        **({"allocation": allocations} if allocations else {}),
    }
    # Process 0 writes the result; a failure there (disk full) stops every process with the same status.
    with distributed.together("process 0 failed to write the result; see its error"):
        if distributed.is_main():
            _write(job, atomic, summary, effective, params, cstate, transform, shrunk, out_cfg, t0)
    return summary


def _write(job: _Job, atomic, summary: dict, effective, params, cstate, transform, shrunk, out_cfg, t0) -> None:
    """Writes model.zlm, summary.json and the fine-tuning metrics into the output directory, all or nothing."""
    with atomic as tmp:
        for name in ("metrics.jsonl", "wandb"):
            if (job.partial / name).exists():
                (shutil.copytree if (job.partial / name).is_dir() else shutil.copy2)(job.partial / name, tmp / name)
        with job.timed("pack"):
            exported = {} if shrunk else core.export(transform, params, cstate)
            packed = _pack(effective, exported, tmp / "model.zlm", job.pack_meta(out_cfg), job.progress)
        summary["packed"] = packed
        summary["packed_compressed"] = summary["packed_compressed"] or packed
        for a in summary.get("allocation", []):  # the budget bounds the file as saved
            if a["budget_bytes"] is None:  # a loss budget
                a["file_bytes"] = packed["file_bytes"]
                continue
            a.update(file_bytes=packed["file_bytes"], within_budget=packed["file_bytes"] <= a["budget_bytes"])
            if not a["within_budget"]:
                warnings.warn(
                    f"the packed file ({packed['file_bytes']:,} bytes) exceeds the mixed budget "
                    f"({a['budget_bytes']:,.0f}): fine-tuning changed the codes' entropy",
                    stacklevel=2,
                )
        summary["seconds"] = {**job.times, "total": time.time() - t0}
        files.write_json(tmp / "summary.json", summary)


def _staged(job: _Job, calib):
    """Initialises the members in order (as one chain when the list has no stages), fine-tuning the chain so far at
    each {"finetune": steps} entry; from an act_quant entry on, calibration, fine-tuning and evaluation run on the
    model with quantized activations.

    Returns (the whole chain, its state, the raw parameters after the last fine-tuning, per-stage records, the
    stages' fine-tuning steps in all: the batch stream's position for a fine-tune after them).
    """
    key = jax.random.key(job.cfg.seed)
    if not any(isinstance(x, int | ActQuant) for x in job.parts):  # one step: the chain of every member
        transform = job.parts[0] if len(job.parts) == 1 else core.chain(*job.parts)
        return transform, transform.init(job.m.params, key, calib), job.m.params, [], 0
    ts, states, raw, stages, offset, graphdef = [], [], job.m.params, [], 0, job.m.graphdef
    for i, part in enumerate(job.parts):
        if isinstance(part, ActQuant):
            graphdef = job.out_graphdef
            if calib is not None:
                calib = dataclasses.replace(calib, graphdef=graphdef)
            continue
        if isinstance(part, int):
            chain = core.chain(*ts)
            raw, st, info = job.finetune(graphdef, raw, chain, tuple(states), part, offset, f"stage-{i}")
            states, offset = list(st), offset + part
            effective = chain.apply(raw, tuple(states))
            _check_finite(effective, "fine-tuning")
            before = [x["method"] for x in job.specs[:i] if "method" in x]
            val = job.evaluate(effective, f"eval stage {i}", graphdef)
            stages.append({"after": before, "finetune": info, "val": val})
            continue
        effective = core.chain(*ts).apply(raw, tuple(states)) if ts else raw
        states.append(part.init(effective, jax.random.fold_in(key, len(ts)), calib))
        ts.append(part)
    return core.chain(*ts), tuple(states), raw, stages, offset


def _reserve_header(job: _Job) -> None:
    """Gives each mixed entry the bytes the file's metadata will take (its budget counts the whole file)."""
    for i, spec in enumerate(job.specs):
        if spec.get("method") == "mixed" and "reserve_bytes" not in spec:
            meta = json.dumps(job.pack_meta(job.out_cfg)).encode()
            job.parts[i] = registry.make(**spec, reserve_bytes=len(zlib.compress(meta, 9)) + HEADER_MARGIN)


HEADER_MARGIN = 256  # bytes: mixed's header estimate lands within ~100 of the file's (tests/compress/test_mixed.py)


def _allocations(job: _Job, cstate) -> list[dict]:
    """`mixed.report` of every mixed entry of the compress list."""
    from research.compress import mixed

    specs = [s for s, p in zip(job.specs, job.parts) if isinstance(p, core.Transform)]
    states = (cstate,) if len(job.parts) == 1 else cstate
    return [mixed.report(s, job.m.params, st) for s, st in zip(specs, states) if s.get("method") == "mixed"]


def _pack(params, exported: dict, path, meta: dict, progress=False) -> dict:
    """Packs params with the transform's exported codes into `path`; returns `artifact.sizes` of the file."""
    rep = coding_pack.pack(
        jax.tree.map(np.asarray, params), path, meta=meta, exported=codes_lib.to_numpy(exported), progress=progress
    )
    return artifact.sizes(rep)


def _check_finite(params, stage: str) -> None:
    bad = [p for p, x in tree.flatten(params).items() if not bool(np.all(np.isfinite(np.asarray(x))))]
    if bad:
        raise errors.UserError(
            f"{stage} produced non-finite weights in {bad[0]} (and {len(bad) - 1} more); nothing saved"
        )
