"""GGUF out: a model, compressed or not, as a file llama.cpp loads, with its grid codes written as they are.

    ziplm export --model runs/gptq --format gguf --out model.gguf               # --type auto: exact, smallest
    ziplm export --model runs/gptq --format gguf --type q4_0 --out model.gguf   # every matrix Q4_0
    rep = gguf.export(m.cfg, m.params, "model.gguf", codes=pack.codes_of(file), tokenizer=m.tokenizer)

What is written: the architecture's hyper-parameters (`llama.*` or `qwen2.*` keys); the tokenizer: copied field by
field from a GGUF source (with the source's descriptive `general.*` fields: license, base model...), built from a
byte-level BPE `tokenizer.json` (llama.cpp's "gpt2" model), or none for raw bytes (with `ziplm.tokenizer = "byte"`
so that ziplm reads it back); every tensor under llama.cpp's name, the Q and K rows of a Llama model permuted per
head as llama.cpp's converter does (`models.gguf.permute`). Vectors (norms, biases) are F32, as llama.cpp expects.

The type of each matrix (`--type`):

    auto          the smallest GGUF type that holds it exactly: a grid code of the compressed model that a block type
                  stores (`blocks.express`; GPTQ / RTN with gguf="q4_0" ...), a dense matrix that lies on a block
                  grid (a model read from a GGUF file: its tensors come back in their types, byte for byte); BF16
                  or F16 when the values are such floats; F32 otherwise. Nothing is rounded: a grid whose values
                  the model rounds to its dtype (a bfloat16 model) is written as those values.
    q4_0 ... q8_0 every matrix in that block type: grid codes it holds are written as they are; a dense matrix is
                  rounded by llama.cpp's round-to-nearest (`blocks.requantize`); a compressed leaf it cannot hold
                  (a codebook, float32 scales, scales that change inside a block of 32, 8-bit codes into Q4_0) is
                  refused, naming the leaf and why, unless `requantize` (then it is rounded like a dense one, and the
                  report says so).
    f32 f16 bf16  every matrix as floats of that type (f16 / bf16 round unless the values fit; the report says).

A matrix whose rows are not a multiple of 32 cannot be a block type: with a block type asked for it is F16 (as
llama.cpp's converter falls back), reported. The report lists every tensor's type and how it got there.

Families: Llama and Qwen2 (the ones llama.cpp and ziplm's GGUF reader share); others are refused with the reason.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np

from research import codes as codes_lib
from research import errors, files, tree
from research.export import blocks
from research.models import gguf as gguf_in
from research.models import hf
from research.models.hf import families

FLOATS = {"f32": np.float32, "f16": np.float16, "bf16": None}
TYPES = ("auto", *FLOATS, *(t.lower() for t in blocks.TYPES))
FAMILIES = {v: k for k, v in gguf_in.ARCHITECTURES.items()}  # ziplm/HF family -> GGUF architecture
_OWN = {
    "general.architecture",
    "general.name",
    "general.file_type",
    "general.quantization_version",
    "general.alignment",
}
_GGUF_NAMES = {v: k for k, v in {**gguf_in._BLOCK, **gguf_in._TOP}.items()}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of a Hugging Face Llama/Qwen2 tensor name (the inverse of `models.gguf.hf_name`)."""
    base, _, kind = hf_name.rpartition(".")
    if base.startswith("model.layers."):
        _, _, layer, part = base.split(".", 3)
        return f"blk.{layer}.{_GGUF_NAMES[part]}.{kind}"
    return f"{_GGUF_NAMES[base]}.{kind}"


def _check(cfg, model_type):
    model_type, hf_cfg, full = hf.family(cfg, model_type)
    if model_type not in FAMILIES:
        raise errors.UserError(
            f"GGUF export writes the {' and '.join(FAMILIES)} families (those llama.cpp and ziplm's GGUF reader "
            f"share); this model is {model_type}: export it with --format hf"
        )
    if full.rope_scaling not in (None, "linear"):
        raise errors.UserError(
            f"GGUF export: RoPE scaling {full.rope_scaling!r} needs a rope_freqs tensor; not written"
        )
    return model_type, full


def _metadata(w, cfg, arch: str, name: str) -> None:
    import gguf

    w.add_name(name)
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.ff_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    if cfg.dim_head * cfg.n_head != cfg.d_model:
        w.add_key_length(cfg.dim_head)
        w.add_value_length(cfg.dim_head)
    w.add_rope_dimension_count(cfg.dim_head)
    w.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope_factor)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)


def _tokenizer(w, spec: str | None, vocab_size: int) -> str:
    """Writes the tokenizer fields; returns what was written, in words."""
    import gguf

    if spec is None:
        w.add_tokenizer_model("none")
        return "none (the source has no tokenizer)"
    if spec == "byte":
        w.add_tokenizer_model("none")
        w.add_string("ziplm.tokenizer", "byte")
        return "none: raw bytes (token id = byte value; recorded as ziplm.tokenizer = byte)"
    if spec.startswith("gguf:"):
        if not Path(spec.removeprefix("gguf:")).is_file():
            raise errors.UserError(
                f"GGUF export copies the tokenizer from {spec.removeprefix('gguf:')}, which no longer exists; "
                "put the model's GGUF file back there"
            )
        source = gguf_in.read(spec.removeprefix("gguf:"))
        n = 0
        for key, field in source.fields.items():
            if key.startswith("tokenizer.") or key.startswith("general.") and key not in _OWN:
                vtype = field.types[0]
                sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(key, field.contents(), vtype, sub)
                n += 1
        return f"copied from {spec.removeprefix('gguf:')} (with its general.* fields: {n} in all)"
    return _bpe(w, spec, vocab_size)


def _bpe(w, spec: str, vocab_size: int) -> str:
    """A byte-level BPE tokenizer (transformers' fast tokenizer of `spec`) as llama.cpp's "gpt2" tokenizer, as its
    converter writes GPT-2's."""
    import gguf

    from research.data import tokenizers

    fast = getattr(tokenizers.load(spec)._tok, "backend_tokenizer", None)
    if fast is None:
        raise errors.UserError(f"GGUF export: {spec} has no fast (tokenizer.json) form to write as a BPE tokenizer")
    spec, path = json.loads(fast.to_str()), spec.removeprefix("hf:")
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise errors.UserError(
            f"GGUF export writes byte-level BPE tokenizers; {path} is a {model.get('type')} model"
            + (" with byte fallback (SentencePiece-style)" if model.get("byte_fallback") else "")
        )
    vocab = dict(model["vocab"])
    special = {}
    for t in spec.get("added_tokens") or []:
        vocab[t["content"]] = t["id"]
        special[t["id"]] = t.get("special", False)
    n = max(vocab_size, max(vocab.values()) + 1)
    tokens, types = [f"[PAD{i}]" for i in range(n)], [int(gguf.TokenType.UNUSED)] * n
    for text, i in vocab.items():
        kind = (gguf.TokenType.CONTROL if special[i] else gguf.TokenType.USER_DEFINED) if i in special else 1
        tokens[i], types[i] = text, int(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre = spec.get("pre_tokenizer") or {}
    gpt2_pre = pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2" if gpt2_pre else "default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    w.add_add_bos_token(False)
    how = "GPT-2 pre-tokenizer" if gpt2_pre else "pre-tokenizer written as 'default' (llama.cpp's GPT-2 rule)"
    return f"byte-level BPE from {path} ({len(vocab)} tokens, {len(merges)} merges, {how})"


def _grid_rows(record: codes_lib.Grid, rule, perm):
    """A grid record's codes, scales and zero points per element, in GGUF's row layout."""
    shape = record.codes.shape
    expand = [record.codes] + [
        record.layout.expand(np.asarray(a, np.float32), shape) for a in (record.scale, record.zero)
    ]
    return [perm(families.to_hf(rule, [np.broadcast_to(a, shape)])) for a in expand]


def _block(kind: blocks.BlockType, values, record, rows, requantize: bool, path: str):
    """(type, data, how) of one matrix asked to be `kind` (raises UserError for a leaf it cannot hold)."""
    if values.shape[1] % blocks.BLOCK:
        return "F16", values.astype(np.float16), f"fallback: its rows of {values.shape[1]} are not a multiple of 32"
    if isinstance(record, codes_lib.Grid):
        data = blocks.express(kind, *rows, record.float_zero)
        if not isinstance(data, str):
            return kind.name, data, "grid codes as they are"
        why = f"{kind.name} cannot hold its grid exactly: {data}"
    elif isinstance(record, codes_lib.Palette):
        why = f"it is a codebook of {record.table.shape[-1]} values per problem, which no GGUF block type stores"
    elif isinstance(record, codes_lib.Vectors):
        why = f"it is a vector codebook ({record.dim}-vectors), which no GGUF block type stores"
    else:
        data = blocks.requantize(kind, values)
        exact = codes_lib.same_bits(blocks.dequantize(kind, data), values)
        return kind.name, data, "exact" if exact else "rounded: llama.cpp's round-to-nearest"
    if not requantize:
        raise errors.UserError(
            f"GGUF export: {path}: {why}; pass --requantize to round its values with llama.cpp's round-to-nearest, "
            "or --type auto to keep it exact"
        )
    return kind.name, blocks.requantize(kind, values), f"requantized: {why}"


def _auto(values, record, rows):
    """(type, data, how) of one matrix under --type auto: the smallest exact block type, else F32."""
    reasons = []
    for kind in blocks.TYPES.values():
        if isinstance(record, codes_lib.Grid):
            data = blocks.express(kind, *rows, record.float_zero)
            if not isinstance(data, str):
                return kind.name, data, "grid codes as they are"
            reasons.append(f"{kind.name}: {data}")
        elif record is None:
            data = blocks.exact_dense(kind, values)
            if data is not None:
                return kind.name, data, f"exact: its values lie on the {kind.name} grid"
    why = ""
    if isinstance(record, codes_lib.Palette):
        why = ": a codebook, which no GGUF block type stores"
    elif isinstance(record, codes_lib.Vectors):
        why = ": a vector codebook, which no GGUF block type stores"
    elif reasons:
        why = f": no block type holds its grid ({reasons[0]})"
    for kind in ("bf16", "f16"):  # a model read from an F16 / BF16 file goes back in its type (BF16 values most
        # often are F16 numbers too; F16 values with more than 8 significant bits are not BF16 numbers)
        found = _floats(values, kind)
        if found[2] == "exact":
            return found[0], found[1], "exact" + why
    return "F32", values, "exact" + why


def _floats(values, kind: str):
    import gguf

    if kind == "bf16":
        data = gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16)
        back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.BF16).reshape(values.shape)
    else:
        data = values.astype(FLOATS[kind])
        back = data.astype(np.float32)
    return kind.upper(), data, "exact" if codes_lib.same_bits(np.asarray(back, np.float32), values) else "rounded"


def export(
    cfg,
    params,
    out,
    *,
    codes: dict | None = None,
    tokenizer: str | None = None,
    type: str = "auto",
    requantize: bool = False,
    model_type: str | None = None,
    name: str = "ziplm export",
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Writes a model as a GGUF file (see the module docstring).

    Args:
      cfg, params: the model; params are its effective (dequantized) values.
      out: the .gguf file to write (refused if it exists, unless `overwrite`).
      codes: {leaf path: `codes.Grid` / `codes.Palette` / `codes.Vectors`} of a compressed model (`pack.codes_of`).
      tokenizer: the model's tokenizer spec.
      type: "auto", "f32", "f16", "bf16", or a block type ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0").
      requantize: round compressed leaves the type cannot hold, instead of refusing them.
      model_type: the family (default: the first that represents `cfg`; "llama" or "qwen2").
      name: the file's general.name.
      overwrite: replace an existing file.
      progress: a progress bar over the tensors.

    Returns:
      {"file", "bytes", "type", "types": {GGUF type: matrices}, "tensors": [{"name", "type", "how"}],
       "tokenizer", "requantized": [leaf paths]}.
    """
    import gguf
    from gguf.gguf_writer import WriterState

    if type not in TYPES:
        raise errors.UserError(f"GGUF export type must be one of {', '.join(TYPES)}; got {type!r}")
    model_type, full = _check(cfg, model_type)
    arch = FAMILIES[model_type]
    target = files.check_writable(out, overwrite=overwrite)
    flat = {p: np.asarray(a, np.float32) for p, a in tree.flatten(params).items()}
    codes, heads = codes or {}, ({"q_proj": cfg.n_head, "k_proj": cfg.kv_heads} if arch == "llama" else {})
    w = gguf.GGUFWriter(None, arch)
    _metadata(w, cfg, arch, name)
    tok = _tokenizer(w, tokenizer, cfg.vocab_size)
    rules = families.rules(full, model_type)
    report, counts, requantized = [], collections.Counter(), []
    from tqdm import tqdm

    for rule in tqdm(rules, desc="gguf", unit="tensor", disable=not progress, leave=False):
        (path,) = rule.ours
        proj = rule.hf.split(".")[-2]
        h = heads.get(proj)
        perm = (lambda a, h=h: gguf_in.permute(a, h)) if h else (lambda a: a)
        values = np.ascontiguousarray(perm(families.to_hf(rule, [flat[path]])))
        record = codes.get(path)
        rows = _grid_rows(record, rule, perm) if isinstance(record, codes_lib.Grid) else None
        off = rows is not None and not codes_lib.same_bits(
            codes_lib.grid_values(*rows, codes_lib.Layout("tensor"), record.float_zero), values
        )  # the model's values are the grid's rounded to its dtype (a bfloat16 model): the grid is not them
        if off and type == "auto":
            record = rows = None  # its values, exactly, as a dense matrix
        if values.ndim == 1:
            kind, data, how = "F32", values, "vector"
        elif type in FLOATS:
            kind, data, how = _floats(values, type)
            counts[kind] += 1
        else:
            if type == "auto":
                kind, data, how = _auto(values, record, rows)
            else:
                kind, data, how = _block(blocks.TYPES[type.upper()], values, record, rows, requantize, path)
            counts[kind] += 1
            if how.startswith("requantized"):
                requantized.append(path)
            elif off and how.startswith("grid codes"):
                how += ": the model computes with them rounded to its dtype, which this file does not"
        native = kind in ("F32", "F16")
        w.add_tensor(gguf_name(rule.hf), data, raw_dtype=None if native else gguf.GGMLQuantizationType[kind])
        report.append({"name": gguf_name(rule.hf), "leaf": path, "type": kind, "how": how})
    file_type = _file_type(counts, type)
    w.add_file_type(int(file_type))
    if any(k in blocks.TYPES for k in counts):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    with files.atomic_file(target, overwrite=overwrite) as f:
        w.fout, w.path, w.state = [f], target, WriterState.EMPTY  # the writer's own open() bypassed: atomic file
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    return {
        "file": str(target),
        "bytes": target.stat().st_size,
        "type": file_type.name,
        "types": dict(counts),
        "tensors": report,
        "tokenizer": tok,
        "requantized": requantized,
    }


def _file_type(counts: collections.Counter, asked: str):
    """general.file_type: the type most matrices have (F32 when they are all vectors)."""
    import gguf

    kind = counts.most_common(1)[0][0] if counts else ("F32" if asked == "auto" else asked.upper())
    return {"F32": gguf.LlamaFileType.ALL_F32, "BF16": gguf.LlamaFileType.MOSTLY_BF16}.get(
        kind, getattr(gguf.LlamaFileType, f"MOSTLY_{kind}", gguf.LlamaFileType.ALL_F32)
    )


def summary(rep: dict) -> str:
    """One paragraph for the CLI: the file, its size, its types and what was rounded."""
    kinds = collections.Counter((t["type"], t["how"].split(":")[0]) for t in rep["tensors"])
    parts = [f"{n} {kind} {how}" for (kind, how), n in sorted(kinds.items())]
    lines = [f"wrote {rep['file']}: {rep['bytes']:,} bytes, {rep['type']}", "  tensors: " + "; ".join(parts)]
    lines.append(f"  tokenizer: {rep['tokenizer']}")
    if rep["requantized"]:
        lines.append(f"  requantized (--requantize): {len(rep['requantized'])} leaves, e.g. {rep['requantized'][0]}")
    return "\n".join(lines)
