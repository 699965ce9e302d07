"""Peak memory and tokens/s of evaluating SmolLM2-135M at window 2048: ziplm's old path, its new one, transformers.

Usage:
    python benchmarks/eval_memory.py                          # 2 windows at batch 1: about 5 minutes on 2 cores
    python benchmarks/eval_memory.py --windows 4 --batch 1,4  # the committed result (about 20 minutes)
    python benchmarks/eval_memory.py --configs old,logits,new,hf

Data: the first --windows disjoint windows of 2048 tokens of WikiText-2 test (raw, rows joined with "\\n\\n",
tokenized once with the model's tokenizer, the tokenizer's default prefix first: the GPTQ protocol of `ziplm eval
--protocol gptq`). Model: the GGUF file (`research.models.gguf`; Q4_1 dequantized to float32 master weights);
transformers loads the same file (`from_pretrained(..., gguf_file=...)`, float32). Configurations, each in a fresh
subprocess per batch size:
  - old:    `metrics.evaluate` as it was: the full (B, W, V) logits, attention over all queries at once;
  - logits: logits in chunks (`models.loss.chunked_nll`), attention over all queries at once;
  - new:    the default `metrics.evaluate`: chunked logits and query-chunked attention;
  - hf:     transformers' LlamaForCausalLM (torch, CPU, `torch.no_grad()`, float32), NLL from its logits.
Memory: peak_rss_mib is the process's peak RSS during the evaluation (Linux VmHWM, reset once the model is
loaded, so loading's own peak is left out; it is process_peak_rss_mib, ru_maxrss); eval_peak_above_loaded_mib is
that peak less the RSS of the loaded model. Speed: tokens/s = scored tokens / seconds of evaluating all the windows,
after a warm-up (for ziplm one batch, which compiles the step: warmup_seconds; for transformers a 128-token batch,
as eager torch compiles nothing). The peaks include the warm-up, so ziplm's include the compiler's memory. On CPU
compare the ratios against transformers within one file; tokens per CPU-second (user + system time of the process)
is the steadier of the two on a shared machine. Writes benchmarks/results/eval_memory_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path("/root/.cache/ziplm/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf")
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "raw" / "wiki.test.raw"
WINDOW = 2048
# `metrics.evaluate` keywords of each ziplm configuration, and what it is.
CONFIGS = {"old": dict(logits_chunk=WINDOW, attn_chunk=WINDOW), "logits": dict(attn_chunk=WINDOW), "new": {}}
DESCRIBE = {
    "old": "full (B, W, V) logits, attention over all queries at once (the evaluation before chunking)",
    "logits": "logits in chunks of models.loss.auto_chunk positions, attention over all queries at once",
    "new": "metrics.evaluate's defaults: chunked logits, attention in chunks of metrics.auto_attn_chunk queries",
    "hf": "transformers LlamaForCausalLM, torch CPU float32, torch.no_grad(), NLL from its (B, W, V) logits",
}


def _mem(field: str) -> float:
    """A /proc/self/status field in MiB (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak() -> float:
    """Restarts VmHWM from the current RSS and returns that RSS (MiB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _mem("VmRSS")


def _process_peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all its threads): less sensitive than wall time to other load."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _windows(tokens_path: str):
    import numpy as np

    from research.eval import metrics

    tokens = np.load(tokens_path)
    inputs, targets, mask = metrics.windows(tokens, metrics.Protocol.gptq(WINDOW))
    return tokens, inputs, targets, mask


def _worker_ziplm(config: str, model: str, tokens_path: str, batch: int) -> dict:
    import jax
    import numpy as np

    from research import sources
    from research.eval import metrics

    jax.devices()
    rss_runtime = _mem("VmRSS")
    m = sources.load(model)
    jax.block_until_ready(m.params)
    torch_loaded = "torch" in sys.modules  # what loading imported stays in rss_loaded_mib
    weights = sum(x.nbytes for x in jax.tree.leaves(m.params)) / 2**20
    tokens, inputs, _, _ = _windows(tokens_path)
    protocol = metrics.Protocol.gptq(WINDOW)
    ones = np.ones(m.cfg.vocab_size)
    base = _reset_peak()
    t = time.perf_counter()
    metrics.evaluate(
        m.graphdef, m.params, tokens, ones, protocol, batch_size=batch, max_windows=batch, **CONFIGS[config]
    )
    warm = time.perf_counter() - t
    t, c = time.perf_counter(), _cpu_seconds()
    r = metrics.evaluate(m.graphdef, m.params, tokens, ones, protocol, batch_size=batch, **CONFIGS[config])
    seconds, cpu = time.perf_counter() - t, _cpu_seconds() - c
    return dict(
        weights_mib=weights,
        rss_runtime_mib=rss_runtime,
        rss_loaded_mib=base,
        peak_rss_mib=_mem("VmHWM"),
        process_peak_rss_mib=_process_peak_mib(),
        warmup_seconds=warm,
        seconds=seconds,
        cpu_seconds=cpu,
        tokens=r["tokens"],
        windows=len(inputs),
        loss=r["loss"],
        accuracy=r["accuracy"],
        torch_imported_by_load=torch_loaded,
    )


def _worker_hf(model: str, tokens_path: str, batch: int) -> dict:
    import numpy as np
    import torch
    import transformers

    path = Path(model)
    rss_runtime = _mem("VmRSS")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    hf.eval()
    weights = sum(p.numel() * p.element_size() for p in hf.parameters()) / 2**20
    _, inputs, targets, mask = _windows(tokens_path)

    def run(rows):
        nll, correct = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(rows), batch):
                x = torch.from_numpy(inputs[rows[i : i + batch]]).long()
                y = torch.from_numpy(targets[rows[i : i + batch]]).long()
                keep = torch.from_numpy(mask[rows[i : i + batch]])
                logits = hf(input_ids=x).logits.float()  # (B, W, V)
                tok_nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
                nll += float(tok_nll[keep.flatten()].sum())
                correct += int(((logits.argmax(-1) == y) & keep).sum())
        return nll, correct

    base = _reset_peak()
    t = time.perf_counter()
    with torch.no_grad():
        hf(input_ids=torch.from_numpy(inputs[:batch, :128]).long())  # first-call set-up; eager torch compiles nothing
    warm = time.perf_counter() - t
    t, c = time.perf_counter(), _cpu_seconds()
    nll, correct = run(np.arange(len(inputs)))
    seconds, cpu = time.perf_counter() - t, _cpu_seconds() - c
    count = int(mask.sum())
    return dict(
        weights_mib=weights,
        rss_runtime_mib=rss_runtime,
        rss_loaded_mib=base,
        peak_rss_mib=_mem("VmHWM"),
        process_peak_rss_mib=_process_peak_mib(),
        warmup_seconds=warm,
        seconds=seconds,
        cpu_seconds=cpu,
        tokens=count,
        windows=len(inputs),
        loss=nll / count,
        accuracy=correct / count,
        torch_threads=torch.get_num_threads(),
        transformers=transformers.__version__,
    )


def _tokens(model: str, windows: int, out: Path) -> str:
    """Writes the first `windows` * 2048 tokens of WikiText-2 test (GPTQ protocol) to `out`; returns the text spec."""
    import numpy as np

    from research.data import corpora, dataset, tokenizers

    tok = tokenizers.load(f"gguf:{model}")  # the tokenizer `sources.load` gives a GGUF model
    spec = f"wikitext:{WIKITEXT}"
    tokens = np.concatenate(
        [tok.added_prefix, np.asarray(dataset.tokenize_cached(corpora.load(spec).text, tok), np.int32)]
    )
    if len(tokens) < windows * WINDOW:
        raise SystemExit(f"WikiText-2 test has only {len(tokens) // WINDOW} windows of {WINDOW} tokens")
    np.save(out, tokens[: windows * WINDOW])
    return spec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(MODEL))
    p.add_argument("--windows", type=int, default=2, help="windows of 2048 tokens to evaluate")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--configs", default="old,new,hf", help="comma-separated: old, logits, new, hf")
    p.add_argument("--out", help="result file (default benchmarks/results/eval_memory_<device>.json)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        batch = int(args.batch)
        if args.worker == "hf":
            row = _worker_hf(args.model, args.tokens, batch)
        else:
            row = _worker_ziplm(args.worker, args.model, args.tokens, batch)
        print("RESULT " + json.dumps(row), flush=True)
        return 0

    sys.path.insert(0, str(ROOT))
    from research import files, hardware

    configs = args.configs.split(",")
    unknown = set(configs) - {*CONFIGS, "hf"}
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; choose from old, logits, new, hf")
    if not Path(args.model).is_file():
        raise SystemExit(f"model file {args.model} not found")
    load_average = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokens_path = Path(tmp) / "tokens.npy"
        spec = _tokens(args.model, args.windows, tokens_path)
        for batch in (int(b) for b in args.batch.split(",")):
            for config in configs:
                cmd = [sys.executable, __file__, "--worker", config, "--batch", str(batch)]
                cmd += ["--model", args.model, "--tokens", str(tokens_path)]
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
                )
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    raise SystemExit(f"{config} batch {batch} failed:\n{proc.stderr[-3000:]}")
                row = dict(config=config, batch=batch, **json.loads(lines[-1][len("RESULT ") :]))
                row["tokens_per_s"] = row["tokens"] / row["seconds"]
                row["tokens_per_cpu_s"] = row["tokens"] / row["cpu_seconds"]
                row["eval_peak_above_loaded_mib"] = row["peak_rss_mib"] - row["rss_loaded_mib"]
                rows.append(row)
                print(
                    f"batch {batch} {config:6s}: peak RSS {row['peak_rss_mib']:7.0f} MiB "
                    f"(+{row['eval_peak_above_loaded_mib']:5.0f} over the loaded model, process peak "
                    f"{row['process_peak_rss_mib']:5.0f}), {row['tokens_per_s']:6.1f} tokens/s, "
                    f"{row['tokens_per_cpu_s']:6.1f} tokens/CPU-s, loss {row['loss']:.5f}",
                    flush=True,
                )
    for row in rows:
        hf = next((r for r in rows if r["config"] == "hf" and r["batch"] == row["batch"]), None)
        row["peak_rss_over_fp32_weights"] = row["peak_rss_mib"] / row["weights_mib"]
        if hf is not None:
            row["tokens_per_s_vs_hf"] = row["tokens_per_s"] / hf["tokens_per_s"]
            row["tokens_per_cpu_s_vs_hf"] = row["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"]
            row["peak_rss_vs_hf"] = row["peak_rss_mib"] / hf["peak_rss_mib"]
            row["loss_minus_hf"] = row["loss"] - hf["loss"]
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"eval_memory_{hardware.slug()}.json"
    files.write_json(
        out,
        dict(
            benchmark="evaluation peak RSS and tokens/s at window 2048: ziplm old / new path vs transformers",
            command="python " + " ".join(["benchmarks/eval_memory.py", *(argv if argv is not None else sys.argv[1:])]),
            devices=hardware.describe(),
            python=platform.python_version(),
            cpu_count=os.cpu_count(),
            load_average_at_start=load_average,
            model=args.model,
            data=f"{spec}: first {args.windows} disjoint windows of {WINDOW} tokens (GPTQ protocol)",
            configs={c: DESCRIBE[c] for c in configs},
            target="peak RSS <= 2x the fp32 weights; tokens/s >= transformers' on the same windows",
            rows=rows,
        ),
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
