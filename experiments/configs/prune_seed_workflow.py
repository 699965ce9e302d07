"""The seed workflow in one config: importance estimation -> prune -> fine-tune -> evaluate.

Command:
    ziplm compress --config experiments/configs/prune_seed_workflow.py [--workdir runs/seed_workflow]

Importance is first-order Taylor saliency |g * w| (SNIP) from 128 calibration windows of the training split,
ranked globally across the block linear layers; the lowest 50% are pruned; 300 steps of fine-tuning follow with
the masks held at exact zeros; the dense, pruned and fine-tuned models are evaluated on the validation split
(non-overlapping 64-character windows). The model is the Tiny Shakespeare run of
experiments/configs/shakespeare_char_cpu.py. Results: runs/prune_seed_workflow/summary.json.

Expected (2-core CPU): validation loss 1.8252 dense -> 1.8629 after pruning 50% -> 1.8112 after fine-tuning
(nats/char). The dense model alone, fine-tuned 200 steps with these settings, reaches 1.8071 (the control row of
experiments/results/prune_study.json): the 2000-step model is undertrained, so fine-tuning gains beyond recovery.
"""

from pathlib import Path

from research.compress import pipeline

ROOT = Path(__file__).resolve().parents[2]


def get_config():
    c = pipeline.base_config()
    c.model = str(ROOT / "runs" / "shakespeare_char_cpu")
    c.compress = [dict(method="snip", sparsity=0.5, distribution="global")]
    c.calibration.update(n=128, length=64, batch_size=32)
    c.finetune.update(steps=300, lr=3e-4, min_lr=3e-5, warmup_steps=10, log_every=20)
    c.eval.batch_size = 256
    return c
