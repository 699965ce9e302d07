"""compressed-tensors out: the checkpoint vLLM (and `transformers`) read for weight-only int4 / int8 models.

    ziplm export --model runs/gptq --format compressed-tensors --out gptq-ct            # scales in bfloat16
    ziplm export --model runs/gptq --format compressed-tensors --dtype float32 --out x  # bit-exact values

A Hugging Face checkpoint directory (`hf.export`: config.json, safetensors, tokenizer files) whose quantized Linear
layers are stored as the package's "pack-quantized" format (compressed-tensors 0.20; the layout every version
since 0.12 reads for 4 and 8 bits), with `quantization_config` in config.json:

    <module>.weight_packed      int32 (out, in * bits / 32): code u = c (ziplm's unsigned code) of element i of a
                                row at bits [i * bits, (i + 1) * bits) of the row's little-endian words
    <module>.weight_scale       --dtype (out, in / g) per group, (out, 1) per channel, (1,) per tensor
    <module>.weight_zero_point  asymmetric grids only: the zero code z, packed the same way along the outputs
                                (int32 (ceil(out * bits / 32), in / g)); int8 z - 2**(bits-1) per tensor
    <module>.weight_shape       int64 [out, in]

The package dequantizes (q - zp) * s with q = u - 2**(bits-1) and zp = z - 2**(bits-1), which is ziplm's
(c - z) * s exactly; a ziplm grid is symmetric here when every zero code is 2**(bits-1). With `--dtype float32` the
decompressed weights are ziplm's values bit for bit; with bfloat16 / float16 (what vLLM runs) scales are rounded to
that type and the report says which leaves that changed.

What it keeps: integer-zero grid codes of up to 8 bits (2- and 3-bit grids become int4 with their zero points)
from RTN, GPTQ or QAT, per tensor, channel or group (the group must divide the inputs; vLLM's kernels take groups
of 32, 64 or 128, or channels), one config group per distinct scheme. Pruned weights stay exactly zero (the zero
code; dense layers keep their zeros as floats): the package dropped its sparse formats after 0.14 and vLLM its 2:4
kernels, so no sparsity layout is written. Linear layers with no grid are stored as floats and listed in `ignore`,
as is `lm_head` unless it has a grid. The values are the grid's: a model that computes with them rounded to its
dtype (bfloat16) is reported ("rounded_values"), since the checkpoint holds the unrounded grid.

Refused, naming the leaf and why: a Linear weight held as a codebook or a float-minimum grid (Q4_1-style: no integer
zero point), a grid on a leaf fused with others in the checkpoint (GPT-2's c_attn, GPT-NeoX's query_key_value).
A compressed leaf that is not a Linear weight (an embedding, a norm the packer found few values in) is written as
its values in `--dtype`, and listed in the report.
"""

from __future__ import annotations

import collections

import numpy as np

from research import codes as codes_lib
from research import errors, tree
from research.models import hf
from research.models.hf import families

BITS = (4, 8)
FORMAT = "pack-quantized"
VERSION = "0.20.1"  # the compressed-tensors version whose layout this writes (checked by the parity tests)


def pack(u: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes (..., n) as int32 words along the last axis: element i at bits [i * bits, (i + 1) * bits)."""
    per = 32 // bits
    n = u.shape[-1]
    pad = -n % per
    u = np.pad(u.astype(np.uint32), [(0, 0)] * (u.ndim - 1) + [(0, pad)]).reshape(*u.shape[:-1], -1, per)
    words = np.zeros(u.shape[:-1], np.uint32)
    for k in range(per):
        words |= u[..., k] << np.uint32(k * bits)
    return words.view(np.int32)


def _scheme(record: codes_lib.Grid, bits: int, symmetric: bool) -> dict:
    lay = record.layout
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "strategy": lay.granularity,
        "group_size": lay.group_size if lay.granularity == "group" else None,
        "dynamic": False,
    }


def _leaf(path: str, record, rule, dtype) -> tuple[dict, dict, bool] | str:
    """(tensors, scheme, exact) of one quantized Linear weight, or the reason it cannot be one."""
    if isinstance(record, codes_lib.Palette):
        return "it is a codebook, which compressed-tensors does not store (use --format gguf --type auto or hf)"
    if isinstance(record, codes_lib.Vectors):
        return "it is a vector codebook, which compressed-tensors does not store (use --format gguf --type auto or hf)"
    if record.float_zero:
        return "its grid has a float minimum (no integer zero point); quantize with zero='integer'"
    zero = np.asarray(record.zero, np.float32)
    top = max(int(np.asarray(record.codes).max(initial=0)), int(zero.max(initial=0)))
    if top > 255:
        return "its codes do not fit 8 bits"
    bits = 4 if top <= 15 else 8  # a 2- or 3-bit grid is an int4 one (asymmetric: its zero is not 8)
    half = 2 ** (bits - 1)
    lay, shape = record.layout, np.asarray(record.codes).shape
    if lay.transposed:
        return f"its scales are per {lay.granularity} of the kernel (per input): compressed-tensors stores none such"
    if lay.granularity == "group" and shape[0] % lay.group_size:
        return f"its groups of {lay.group_size} do not divide its {shape[0]} inputs"
    u = np.asarray(record.codes).T  # (out, in)
    scale = np.asarray(record.scale, np.float32)
    symmetric = bool(np.all(zero == half))
    if lay.granularity == "tensor":
        s, z = scale.reshape(1), np.asarray(zero, np.float32).reshape(1)
    else:
        s = scale.T.reshape(shape[-1], -1)  # (out, groups) or (out, 1)
        z = zero.T.reshape(shape[-1], -1)
    stored = np.ascontiguousarray(s.astype(dtype))  # C order: safetensors writes the memory as it lies
    tensors = {"weight_packed": pack(u, bits), "weight_scale": stored, "weight_shape": np.array(u.shape, np.int64)}
    if not symmetric:
        if lay.granularity == "tensor":
            tensors["weight_zero_point"] = np.ascontiguousarray((z - half).astype(np.int8))
        else:
            tensors["weight_zero_point"] = np.ascontiguousarray(pack(z.astype(np.uint32).T, bits).T)
    exact = np.array_equal(np.asarray(stored, np.float32), s)
    return tensors, _scheme(record, bits, symmetric), exact


def export(
    cfg,
    params,
    out,
    *,
    codes: dict | None = None,
    tokenizer: str | None = None,
    model_type: str | None = None,
    dtype: str = "bfloat16",
    overwrite: bool = False,
) -> dict:
    """Writes a compressed model as a compressed-tensors checkpoint directory (see the module docstring).

    Args:
      cfg, params: the model; params are its effective values (dense layers are written from them).
      out: the directory to write (new or empty, unless `overwrite`).
      codes: {leaf path: code record} of the compressed model (`pack.codes_of`).
      tokenizer: its tokenizer spec (files copied as `hf.export` does).
      model_type: the Hugging Face family (default: the first that represents `cfg`).
      dtype: scales and float tensors: "bfloat16", "float16" or "float32" (exact).
      overwrite: replace an existing directory once the new one is complete.

    Returns:
      `hf.export`'s report plus {"quantized": {leaf: scheme}, "rounded_scales": [leaves], "ignored": [modules],
      "floats": [compressed leaves that are not Linear weights, written as their values in `dtype`],
      "rounded_values": [leaves whose grid values the model itself rounds to its dtype]}.
    """
    import jax.numpy as jnp

    model_type, _, full = hf.family(cfg, model_type)
    all_rules = families.rules(full, model_type)
    rules = {r.ours[0]: r for r in all_rules if len(r.ours) == 1}
    packed, schemes, rounded, floats, rounded_values = {}, {}, [], [], []
    flat = tree.flatten(params)
    for path, record in sorted((codes or {}).items()):
        rule = rules.get(path)
        if rule is None:
            got = "it is fused with other leaves in the checkpoint, not a Linear weight of its own"
        elif rule.kind != "linear":  # an embedding, a norm: compressed-tensors keeps them as floats
            floats.append(path)
            continue
        else:
            got = _leaf(path, record, rule, jnp.dtype(dtype))
        if isinstance(got, str):
            raise errors.UserError(f"compressed-tensors export: {path}: {got}")
        module = rule.hf.removesuffix(".weight")
        if not codes_lib.same_bits(codes_lib.decode(record), np.asarray(flat[path], np.float32)):
            rounded_values.append(path)  # the model rounds the grid's values to its dtype; the checkpoint does not
        packed[rule.hf] = {f"{module}.{k}": v for k, v in got[0].items()}
        schemes[module] = got[1]
        if not got[2]:
            rounded.append(path)
    if not packed:
        raise errors.UserError(
            "compressed-tensors export: the model has no grid-quantized Linear weights (compress it with rtn, gptq or "
            "qat first, or use --format hf)"
        )
    linears = [r.hf.removesuffix(".weight") for r in all_rules if r.kind == "linear"]
    ignored = sorted(m for m in linears if m not in schemes)
    config = _config(schemes, ignored)  # lm_head ignored unless it was packed
    rep = hf.export(
        cfg,
        params,
        out,
        model_type=model_type,
        tokenizer=tokenizer,
        dtype=dtype,
        overwrite=overwrite,
        packed=packed,
        quantization_config=config,
    )
    quantized = {p: schemes[rules[p].hf.removesuffix(".weight")] for p in codes if rules[p].hf in packed}
    return dict(
        rep,
        quantized=quantized,
        rounded_scales=rounded,
        rounded_values=rounded_values,
        ignored=ignored,
        dtype=dtype,
        floats=floats,
    )


def _config(schemes: dict, ignored: list[str]) -> dict:
    """The quantization_config: one group per distinct scheme (targets "Linear" when there is one)."""
    by_scheme = collections.defaultdict(list)
    for module, scheme in schemes.items():
        by_scheme[tuple(sorted(scheme.items(), key=lambda kv: kv[0]))].append(module)
    groups = {}
    for i, (scheme, modules) in enumerate(sorted(by_scheme.items(), key=lambda kv: -len(kv[1]))):
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(by_scheme) == 1 else sorted(modules),
            "weights": dict(scheme),
            "input_activations": None,
            "output_activations": None,
            "format": FORMAT,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(set(ignored) | ({"lm_head"} - set(schemes))),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "version": VERSION,
    }


def summary(rep: dict) -> str:
    """A few lines for the CLI."""
    kinds = collections.Counter(f"int{s['num_bits']} {s['strategy']}" for s in rep["quantized"].values())
    lines = [f"wrote compressed-tensors checkpoint to {rep['directory']}: {', '.join(rep['files'])}"]
    lines.append("  quantized: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    lines.append(f"  floats ({rep['dtype']}): {len(rep['ignored'])} Linear layers with no grid, embeddings, norms")
    if rep["rounded_values"]:
        lines.append(
            f"  {len(rep['rounded_values'])} leaves hold the grid's values, which the model rounds to its dtype"
        )
    if rep["floats"]:
        lines.append(
            f"  compressed leaves that are not Linear weights, written as floats: {', '.join(rep['floats'][:3])}"
        )
    if rep["rounded_scales"]:
        lines.append(
            f"  scales rounded to {rep['dtype']} in {len(rep['rounded_scales'])} leaves (--dtype float32 keeps them)"
        )
    return "\n".join(lines)
