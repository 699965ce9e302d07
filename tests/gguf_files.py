"""Small GGUF files for the tests, written with the `gguf` package's writer as llama.cpp's converter lays them out.

`write_llama(path, cfg, params, types=..., tokenizer=...)` writes a ziplm Llama-style model: HF-layout (out, in)
matrices, Q and K rows permuted per head (llama.cpp's RoPE layout), each matrix in the tensor type `types` names
(quantized by the package, or random bytes with finite fp16 fields for the types it only dequantizes), and
optionally a GPT-2 BPE tokenizer in the metadata. It returns {HF tensor name: what the file holds, dequantized by
the package and un-permuted}, the values a correct loader must produce.
"""

from __future__ import annotations

import json

import gguf
import numpy as np

from research import tree
from research.models import gguf as zgguf

# Byte offsets of the fp16 scale fields in one block of the types the package can only dequantize.
_FP16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,)}


def _encode(w: np.ndarray, kind: str, rng) -> np.ndarray:
    qt = gguf.GGMLQuantizationType[kind]
    if kind == "F32":
        return w.astype(np.float32)
    if kind == "F16":
        return w.astype(np.float16)
    if kind in _FP16_FIELDS:
        block, size = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, (w.shape[0], w.shape[1] // block, size), dtype=np.uint8)
        for off in _FP16_FIELDS[kind]:
            raw[..., off : off + 2] = np.full(raw.shape[:-1], 0.01, np.float16)[..., None].view(np.uint8)
        return raw.reshape(w.shape[0], -1)
    return gguf.quants.quantize(w, qt)


def write_llama(path, cfg, params, *, types=None, tokenizer=None, vocab=None, seed=0) -> dict:
    """Writes a Llama-style ziplm model as a GGUF file.

    Args:
      path: the file to write.
      cfg: the ModelConfig (llama style, tied or untied head).
      params: its parameter tree.
      types: {HF tensor name: GGUF type name} (default "F32" for all).
      tokenizer: a directory with GPT-2's vocab.json and merges.txt, written as tokenizer.ggml.* metadata.
      vocab: or `add_vocab`'s arguments (e.g. `sentencepiece_vocab(text)`).
      seed: for the random blocks of the dequantize-only types.

    Returns:
      {HF tensor name: float32 array in HF layout}: the values the file holds.
    """
    rng = np.random.default_rng(seed)
    types = types or {}
    flat = {p: np.asarray(a, np.float32) for p, a in tree.flatten(params).items()}
    hf = {"model.embed_tokens.weight": flat["embed/embedding"], "model.norm.weight": flat["final_norm/scale"]}
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = flat["lm_head/kernel"].T
    for i in range(cfg.n_layer):
        o, h = f"layers/{i}", f"model.layers.{i}"
        hf[f"{h}.input_layernorm.weight"] = flat[f"{o}/attn_norm/scale"]
        hf[f"{h}.post_attention_layernorm.weight"] = flat[f"{o}/mlp_norm/scale"]
        for n in "qkvo":
            hf[f"{h}.self_attn.{n}_proj.weight"] = flat[f"{o}/attn/{n}/kernel"].T
        for n in ("gate", "up", "down"):
            hf[f"{h}.mlp.{n}_proj.weight"] = flat[f"{o}/mlp/{n}/kernel"].T
    gguf_name = {v: k for k, v in _names(cfg).items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("ziplm test model")
    w.add_block_count(cfg.n_layer)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.ff_dim)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_dimension_count(cfg.dim_head)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if tokenizer is not None:
        add_vocab(w, **gpt2_vocab(tokenizer))
    if vocab is not None:
        add_vocab(w, **vocab)
    expected = {}
    for name, array in hf.items():
        heads = {"q_proj": cfg.n_head, "k_proj": cfg.kv_heads}.get(name.split(".")[-2])
        stored = zgguf.permute(array, heads) if heads else array
        kind = types.get(name, "F32")
        data = _encode(stored, kind, rng) if stored.ndim == 2 else stored.astype(np.float32)
        qt = gguf.GGMLQuantizationType[kind if stored.ndim == 2 else "F32"]
        native = qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)  # typed by the array itself
        w.add_tensor(gguf_name[name], data, raw_dtype=None if native else qt)
        held = np.asarray(gguf.quants.dequantize(data, qt), np.float32).reshape(stored.shape)
        expected[name] = zgguf.unpermute(held, heads) if heads else held
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _names(cfg) -> dict[str, str]:
    """{GGUF name: HF name} of a Llama model's tensors."""
    out = {}
    for i in range(cfg.n_layer):
        for part in zgguf._BLOCK:
            name = f"blk.{i}.{part}.weight"
            out[name] = zgguf.hf_name(name)
    for name in ("token_embd.weight", "output_norm.weight", "output.weight"):
        out[name] = zgguf.hf_name(name)
    return out


def write_vocab(path, family: str, tokens: list[str], **fields) -> None:
    """Writes a vocabulary-only GGUF file (no tensors) whose `tokenizer.ggml.*` metadata is the arguments (see
    `add_vocab`)."""
    w = gguf.GGUFWriter(str(path), "llama")
    add_vocab(w, family, tokens, **fields)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def add_vocab(
    w,
    family: str,
    tokens: list[str],
    *,
    types: list[int] | None = None,
    merges: list[str] | None = None,
    scores: list[float] | None = None,
    pre: str | None = None,
    bos: int | None = None,
    eos: int | None = None,
    unk: int | None = None,
    pad: int | None = None,
    add_bos: bool | None = None,
    add_space_prefix: bool | None = None,
) -> None:
    """Adds `tokenizer.ggml.*` metadata to a `gguf.GGUFWriter` (None: the field is left out)."""
    w.add_tokenizer_model(family)
    w.add_token_list(tokens)
    optional = (
        (pre, w.add_tokenizer_pre), (types, w.add_token_types), (scores, w.add_token_scores),
        (merges, w.add_token_merges), (bos, w.add_bos_token_id), (eos, w.add_eos_token_id),
        (unk, w.add_unk_token_id), (pad, w.add_pad_token_id), (add_bos, w.add_add_bos_token),
        (add_space_prefix, w.add_add_space_prefix),
    )  # fmt: skip
    for value, add in optional:
        if value is not None:
            add(value)


def gpt2_vocab(tokenizer_dir, pre: str | None = "gpt-2") -> dict:
    """GPT-2's vocabulary (a directory with vocab.json and merges.txt) as `add_vocab`'s arguments: a byte-level GGUF
    tokenizer with the pre-tokenizer `pre`, laid out as llama.cpp's converter writes it."""
    ids = json.loads((tokenizer_dir / "vocab.json").read_text())
    tokens = sorted(ids, key=ids.get)
    merges = [m for m in (tokenizer_dir / "merges.txt").read_text().split("\n")[1:] if m]
    eot = ids["<|endoftext|>"]
    types = [3 if t == "<|endoftext|>" else 1 for t in tokens]
    return dict(family="gpt2", tokens=tokens, types=types, merges=merges, pre=pre, bos=eot, eos=eot, add_bos=False)


def write_gpt2_vocab(path, tokenizer_dir, pre: str | None = "gpt-2") -> None:
    """`gpt2_vocab` written as a vocabulary-only GGUF file."""
    write_vocab(path, **gpt2_vocab(tokenizer_dir, pre))


def sentencepiece_vocab(text: str, size: int = 600) -> dict:
    """A Llama-2-style SentencePiece vocabulary learned from `text` (BPE over "▁"-joined words, byte fallback):
    <unk>, <s>, </s>, the 256 byte tokens <0xNN>, then pieces with descending scores and no merges, as llama.cpp
    writes Llama 2 files. Returns `add_vocab`'s arguments."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    learner.train_from_iterator([text], trainers.BpeTrainer(vocab_size=size, show_progress=False))
    learned = sorted(learner.get_vocab().items(), key=lambda kv: kv[1])
    head = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens = head + [t for t, _ in learned if t not in head]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - len(head))
    scores = [0.0] * len(head) + [-float(i) for i in range(len(tokens) - len(head))]
    return dict(family="llama", tokens=tokens, types=types, scores=scores, bos=1, eos=2, unk=0)


def write_sentencepiece_vocab(path, text: str, size: int = 600, **fields) -> list[str]:
    """`sentencepiece_vocab(text, size)` written as a vocabulary-only GGUF file (`fields` override its metadata);
    returns the tokens."""
    vocab = {**sentencepiece_vocab(text, size), **fields}
    write_vocab(path, **vocab)
    return vocab["tokens"]
