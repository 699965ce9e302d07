"""`ziplm eval` of a Llama-3.2-1B-shaped checkpoint against transformers: one GPTQ window, wall, CPU and peak RSS.

    python benchmarks/eval_1b.py [--layers 16] [--windows 1] [--keep DIR]   # ~6 min on 2 cores, ~11 GB of RAM

The checkpoint: Llama-3.2-1B's shapes (d_model 2048, 32 heads / 8 KV heads of 64, SwiGLU 8192, vocabulary 128,256,
tied embedding, llama3 RoPE scaling, 16 layers: 1.24B parameters), random bf16 weights (normal, std 0.02; norms
1), written as a Hugging Face safetensors directory (2.47 GB). Text: WikiText-2 raw test, GPTQ protocol, the first
`--windows` windows of 2048 tokens, tokenized by GPT-2's tokenizer from ../shared (its 50,257 ids are valid ids of
the larger vocabulary; both tools get the same ids). Each tool runs in its own subprocess, one after the other on
the same cores: `ziplm eval --model DIR --protocol gptq --max-windows N` (the CLI as a user runs it, loading
included; once with the weights as stored, bf16, evaluated a block at a time, the default, and once with
`--params float32`), and transformers' LlamaForCausalLM (float32, `torch.no_grad()`, loss from its logits). Reported per
tool: wall and CPU seconds (user + system), peak RSS (ru_maxrss) as MiB and as a ratio to the checkpoint's bytes,
and the loss; and ziplm's ratios to transformers. Writes benchmarks/results/eval_1b_<device>.json.

Found with it (issue 33): one window evaluated 7.8x slower than transformers because `metrics.evaluate` padded it to
a batch of 8 windows (the CLI's default batch size); a batch now holds at most as many rows as there are windows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WIKITEXT = SHARED / "wikitext-2" / "raw" / "wiki.test.raw"
GPT2 = SHARED / "gpt2-tokenizer"
SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
             vocab_size=128256)  # fmt: skip


def write_checkpoint(out: Path, layers: int) -> int:
    """A random Llama-3.2-1B-shaped bf16 checkpoint in `out`; returns its bytes."""
    import ml_dtypes
    import numpy as np
    import safetensors.numpy

    rng = np.random.default_rng(0)
    d, f, v, kv = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"], 8 * 64

    def w(*shape):
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    ones = np.ones(d, ml_dtypes.bfloat16)
    tensors = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": ones}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": ones, p + "post_attention_layernorm.weight": ones,
            p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.k_proj.weight": w(kv, d),
            p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, d),
            p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d), p + "mlp.down_proj.weight": w(d, f),
        })  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", num_hidden_layers=layers, **SHAPE,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        hidden_act="silu", attention_bias=False, mlp_bias=False, torch_dtype="bfloat16", bos_token_id=128000,
        eos_token_id=128001,
    )  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return (out / "model.safetensors").stat().st_size


def hf_worker(model: str, windows: int, out: str) -> None:
    """transformers on the same ids: float32, no_grad, the GPTQ windows' mean NLL."""
    import numpy as np
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(GPT2))
    text = WIKITEXT.read_text(encoding="utf-8")
    text = "\n\n".join(line + "\n" if line.strip() else "" for line in text.split("\n")[:-1])
    ids = np.asarray(tok(text)["input_ids"][: 2048 * windows]).reshape(windows, 2048)
    t0 = time.time()
    m = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    loaded = time.time() - t0
    with torch.no_grad():
        logits = m(torch.tensor(ids)).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.tensor(ids[:, 1:]).reshape(-1)
        )
    Path(out).write_text(json.dumps(dict(loss=float(nll), load_seconds=loaded)))


# Runs a command and prints its resource usage: each measured command gets a fresh parent, so ru_maxrss is its own.
_WRAP = (
    "import json, resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "u = resource.getrusage(resource.RUSAGE_CHILDREN); sys.stderr.write(r.stderr); "
    "print(json.dumps(dict(code=r.returncode, cpu=u.ru_utime + u.ru_stime, maxrss=u.ru_maxrss)))"
)


def timed(cmd: list[str]) -> dict:
    """Wall seconds, CPU seconds (user + system) and peak RSS of a subprocess."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - t0
    usage = json.loads(r.stdout.strip().splitlines()[-1])
    if usage["code"]:
        raise RuntimeError(f"{cmd[:4]} failed: {r.stderr[-1500:]}")
    return dict(wall_seconds=wall, cpu_seconds=usage["cpu"], peak_rss_mib=usage["maxrss"] / 1024)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--keep", help="write (or reuse) the checkpoint here instead of a temporary directory")
    p.add_argument("--hf-worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hf_worker:
        hf_worker(args.hf_worker[0], int(args.hf_worker[1]), args.hf_worker[2])
        return 0
    from research import files, hardware

    with tempfile.TemporaryDirectory(prefix="ziplm-eval1b-") as tmp:
        model = Path(args.keep) if args.keep else Path(tmp) / "llama-1b"
        ckpt = (model / "model.safetensors").stat().st_size if (model / "model.safetensors").is_file() else None
        ckpt = ckpt or write_checkpoint(model, args.layers)
        runs = {}
        for params in ("checkpoint", "float32"):  # bf16 weights as stored (block by block), or float32 copies
            zjson = Path(tmp) / f"ziplm-{params}.json"
            runs[params] = timed([sys.executable, "-m", "research", "eval", "--model", str(model), "--tokenizer",
                                  f"hf:{GPT2}", "--corpus", f"wikitext:{WIKITEXT}", "--protocol", "gptq", "--window",
                                  "2048", "--max-windows", str(args.windows), "--params", params, "--json",
                                  str(zjson)])  # fmt: skip
            z = json.loads(zjson.read_text())
            runs[params].update(loss=z["loss"], tokens=z["tokens"])
        hjson = Path(tmp) / "hf.json"
        hf = timed([sys.executable, __file__, "--hf-worker", str(model), str(args.windows), str(hjson)])
        h = json.loads(hjson.read_text())
    ziplm, ziplm32 = runs["checkpoint"], runs["float32"]
    hf.update(loss=h["loss"], load_seconds=h["load_seconds"])
    for r in (ziplm, ziplm32, hf):
        r["peak_rss_vs_checkpoint"] = r["peak_rss_mib"] * 2**20 / ckpt
    result = dict(
        benchmark="ziplm eval vs transformers, Llama-3.2-1B-shaped random bf16 checkpoint, GPTQ windows of 2048",
        command="python benchmarks/eval_1b.py " + " ".join(sys.argv[1:]),
        layers=args.layers, windows=args.windows, checkpoint_bytes=ckpt, host_cpus=hardware.host_cpus(),
        cpu=hardware.cpu(), lock=hardware.lock(), ziplm=ziplm, ziplm_float32=ziplm32, transformers=hf,
        ratios=dict(wall=ziplm["wall_seconds"] / hf["wall_seconds"], cpu=ziplm["cpu_seconds"] / hf["cpu_seconds"],
                    peak_rss=ziplm["peak_rss_mib"] / hf["peak_rss_mib"]),
        loss_difference=abs(ziplm["loss"] - hf["loss"]),
        loss_difference_float32=abs(ziplm["loss"] - ziplm32["loss"]),
    )  # fmt: skip
    out = ROOT / "benchmarks" / "results" / f"eval_1b_{hardware.slug()}.json"
    files.write_json(out, result)
    print(json.dumps({k: result[k] for k in ("ratios", "loss_difference")}, indent=1))
    print(f"ziplm {ziplm}\nziplm float32 {ziplm32}\ntransformers {hf}\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
