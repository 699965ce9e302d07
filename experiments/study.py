"""What the pruning and quantization studies share: the study model (trained when missing), its splits, the
calibration sample, the fine-tuning batches and settings, the evaluation, and the dense control.

    s = study.setup(Path("runs/shakespeare_char_cpu"), finetune_steps=200)
    s.evaluate(params)                      # {"loss", "bits_per_byte", "accuracy"} on the validation split
    params, state, info = s.finetune(t, state)

Calibration: 128 training windows of the model's context, seed 0. Fine-tuning: AdamW lr 3e-4 -> 3e-5 (10 warmup
steps), no weight decay, clipping 1.0, the run's batch shape, the same batches (seed 0) for every row.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections as mlc

from research import config as config_lib
from research import sources
from research.compress import calib, registry
from research.data import dataset, tokenizers
from research.eval import metrics
from research.train import fit, loop

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class Study:
    m: sources.Model
    tok: tokenizers.ByteTokenizer | tokenizers.HFTokenizer
    splits: dataset.Splits
    protocol: metrics.Protocol
    cal: calib.Calibration
    batches: dataset.Batches
    ft: mlc.ConfigDict

    def evaluate(self, params, graphdef=None) -> dict:
        graphdef = self.m.graphdef if graphdef is None else graphdef
        r = metrics.evaluate(graphdef, params, self.splits.val, self.tok.token_bytes, self.protocol, batch_size=256)
        return {k: r[k] for k in ("loss", "bits_per_byte", "accuracy")}

    def finetune(self, t, state, graphdef=None):
        graphdef = self.m.graphdef if graphdef is None else graphdef
        return fit.finetune(graphdef, self.m.params, t, state, self.batches, self.ft)

    def dense_control(self) -> dict | None:
        """The dense model fine-tuned with the same steps and batches (the fair control), or None at 0 steps."""
        if not self.ft.steps:
            return None
        t = registry.make("magnitude", sparsity=0.0)
        params, state, _ = self.finetune(t, t.init(self.m.params, jax.random.key(0), None))
        return self.evaluate(t.apply(params, state))


def setup(path: Path, finetune_steps: int) -> Study:
    """The study on the run at `path`, trained first (experiments/configs/shakespeare_char_cpu.py) if missing."""
    if not sources.is_run(path):
        print(f"training the study model into {path} (experiments/configs/shakespeare_char_cpu.py)", flush=True)
        loop.train(config_lib.load(str(ROOT / "experiments/configs/shakespeare_char_cpu.py")), path)
    m = sources.load(str(path))
    run = m.run_config
    tok = tokenizers.load(m.tokenizer)
    splits = dataset.prepare(run.data.corpus, tok, run.data.val_fraction)
    cal = calib.Calibration(m.graphdef, calib.sample(splits.train, 128, 2048, 0, m.cfg.max_seq_len), 32)
    ft = mlc.ConfigDict(
        dict(steps=finetune_steps, lr=3e-4, min_lr=3e-5, warmup_steps=10, weight_decay=0.0, b1=0.9, b2=0.99)
    )
    ft.grad_clip, ft.log_every = 1.0, max(finetune_steps, 1)
    return Study(
        m,
        tok,
        splits,
        metrics.Protocol(run.data.seq_len, run.data.seq_len),
        cal,
        dataset.Batches(splits.train, run.data.batch_size, run.data.seq_len, 0, "random"),
        ft,
    )
