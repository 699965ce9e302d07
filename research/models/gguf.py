"""GGUF files (llama.cpp's format) in: metadata -> `ModelConfig`, tensors -> our parameter tree, tokenizer built.

    pre = gguf.load("SmolLM2-135M-Instruct.Q4_1.gguf")    # an `hf.Pretrained`: cfg, graphdef, params, tokenizer
    m = sources.load("model.gguf")                        # the same through the one model entry point

Read with the `gguf` package (the reader and its NumPy dequantizers; no torch). Every tensor type the package can
dequantize loads (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, ...) into float32 master weights,
equal to `gguf.quants.dequantize`. The metadata of an architecture that maps cleanly onto a Hugging Face family
becomes that family's config, and the tensors are renamed to its names, so the checks and layouts of
`models.hf` apply unchanged (a missing tensor or a shape that disagrees with the metadata is a one-line error):

    GGUF architecture   family   notes
    llama               llama    llama.cpp's converter permutes the Q and K rows of each head for its RoPE layout
                                 (interleaved pairs); `unpermute` undoes it, so the rotate-half RoPE of HF applies
    qwen2               qwen2    q/k/v biases; no permutation (llama.cpp runs Qwen2 with NeoX-style RoPE)

Refused with the reason: other architectures, RoPE scalings other than none and linear (a `rope_freqs` tensor, as
Llama 3.1 files carry, or yarn), partial rotary dimensions.

Tokenizer: the file's `tokenizer.ggml.*` metadata (none when its model is "none"; raw bytes when ziplm's export
recorded `ziplm.tokenizer = "byte"`), rebuilt as a fast tokenizer by `data.gguf_tokenizer` (no torch) and cached as
a `tokenizer.json` directory (see `tokenizers.load("gguf:<file>")`), so it is built once.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np

from research import errors
from research.models import hf

# GGUF tensor names (per block, "blk.N." prefix) -> Hugging Face Llama/Qwen2 names ("model.layers.N." prefix).
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
_PERMUTED = {"llama"}  # architectures whose converter permutes the Q/K rows


def is_gguf(source) -> bool:
    """Whether `source` names an existing file that starts with the GGUF magic."""
    path = Path(str(source)).expanduser()
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def read(path) -> object:
    """A `gguf.GGUFReader` of `path`, with damaged or foreign files as one-line errors."""
    import gguf as gguf_lib

    path = Path(path).expanduser()
    if not is_gguf(path):
        raise errors.UserError(f"{path} is not a GGUF file (no GGUF magic at its start)")
    try:
        return gguf_lib.GGUFReader(str(path))
    except Exception as e:  # truncated or damaged: the reader raises ValueError, IndexError, struct errors...
        raise errors.UserError(f"cannot read GGUF file {path}: {type(e).__name__}: {str(e)[:200]}") from None


def metadata(reader) -> dict:
    """{key: value} of every metadata field except the (large) tokenizer arrays."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.rsplit(".", 1)[-1] in ("tokens", "scores", "token_type", "merges"):
            continue
        try:
            out[key] = field.contents()
        except Exception:  # a field type the reader cannot present: not needed here
            continue
    return out


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation: per head, rows (pair, 2) back to (2, half) (rotate-half layout).

    Args:
      w: (n_head * head_dim, ...) rows as stored in the GGUF file (a weight or a bias).
      n_head: heads in w (n_head for Q, n_kv_head for K).
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (the inverse of `unpermute`), as its converter applies it."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config(meta: dict, tensor_names: set[str], vocab: int | None) -> types.SimpleNamespace:
    """The Hugging Face config fields a GGUF file's metadata describes, as attributes (what
    `families.model_config` reads), raising UserError when it cannot. Not a transformers config object:
    importing transformers' config classes imports torch where it is installed (about 180 MB more RSS)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise errors.UserError(
            f"GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}"
        )

    def get(key, default=None, required=True):
        v = meta.get(f"{arch}.{key}", default)
        if v is None and required:
            raise errors.UserError(f"GGUF metadata lacks {arch}.{key}")
        if isinstance(v, float):  # stored as float32: 1e-5 reads 9.9999997e-06; keep the value that was written
            v = float(str(np.float32(v)))
        return v

    if "rope_freqs.weight" in tensor_names:
        raise errors.UserError("GGUF file carries rope_freqs (Llama 3.1-style RoPE scaling), which is not supported")
    n_head = int(get("attention.head_count"))
    d_model = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", d_model // n_head))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise errors.UserError(f"GGUF rope.dimension_count {rope_dim} != head dim {head_dim} (partial rotary)")
    rope = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0))}
    scaling = get("rope.scaling.type", None, required=False)
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise errors.UserError(f"GGUF RoPE scaling {scaling!r} is not supported; supported: none, linear")
        rope.update(rope_type="linear", factor=float(get("rope.scaling.factor")))
    vocab_size = int(get("vocab_size", vocab, required=vocab is None) or vocab)
    d = dict(
        vocab_size=vocab_size,
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(get("attention.head_count_kv", n_head)),
        hidden_size=d_model,
        intermediate_size=int(get("feed_forward_length")),
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        hidden_act="silu",
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in tensor_names,
    )
    if arch == "llama":
        d["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        d["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
    if arch == "qwen2":
        d["use_sliding_window"] = False  # llama.cpp runs Qwen2 with full attention
    return types.SimpleNamespace(model_type=ARCHITECTURES[arch], **d)


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor name (None for names with no counterpart)."""
    base, _, kind = name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        return f"model.layers.{layer}.{_BLOCK[part]}.{kind}" if part in _BLOCK else None
    return f"{_TOP[base]}.{kind}" if base in _TOP else None


class Tensors:
    """The tensors of a GGUF file under their Hugging Face names, dequantized to float32 on `get`.

    Attributes:
      shapes: {HF name: shape in the HF (torch) layout}.
      types: {HF name: GGUF tensor type name ("Q4_1", "F32", ...)}.
    """

    def __init__(self, reader, arch: str, n_head: int, n_kv_head: int):
        self._tensors, self.shapes, self.types, unknown = {}, {}, {}, []
        for t in reader.tensors:
            name = hf_name(t.name)
            if name is None:
                unknown.append(t.name)
                continue
            self._tensors[name] = t
            self.shapes[name] = tuple(int(n) for n in reversed(t.shape.tolist()))  # ggml lists ne0 (inner) first
            self.types[name] = t.tensor_type.name
        if unknown:
            raise errors.UserError(f"GGUF tensor(s) with no place in a {arch} model: {unknown[:3]}")
        self._heads = {"q_proj": n_head, "k_proj": n_kv_head} if arch in _PERMUTED else {}

    def names(self) -> set[str]:
        return set(self._tensors)

    def get(self, name: str) -> np.ndarray:
        import gguf as gguf_lib

        t = self._tensors[name]
        try:
            w = _dequantize(gguf_lib.quants.dequantize, t.data, t.tensor_type, self.shapes[name])
        except NotImplementedError:
            msg = f"GGUF tensor {t.name} has type {t.tensor_type.name}, which the gguf package cannot dequantize"
            raise errors.UserError(msg) from None
        proj = name.split(".")[-2]
        return unpermute(w, self._heads[proj]) if proj in self._heads else w


DEQUANT_CHUNK = 1 << 22  # elements dequantized at a time: the package's intermediates stay a few MB


def _dequantize(fn, data: np.ndarray, kind, shape) -> np.ndarray:
    """`fn(data, kind)` as float32 of `shape`, a chunk of rows at a time into one preallocated array (the whole
    tensor at once makes float32 intermediates several times its size: 0.3 GB for SmolLM2's embedding)."""
    out = np.empty(shape, np.float32)
    if data.ndim < 2 or out.ndim < 2 or data.shape[0] != out.shape[0]:
        out[...] = np.asarray(fn(data, kind), np.float32).reshape(shape)
        return out
    step = max(1, DEQUANT_CHUNK // max(1, out[0].size))
    for i in range(0, out.shape[0], step):
        out[i : i + step] = np.asarray(fn(data[i : i + step], kind), np.float32).reshape(out[i : i + step].shape)
    return out


def load(path, dtype: str = "float32") -> hf.Pretrained:
    """Loads a GGUF model file into our parameter tree.

    Args:
      path: the .gguf file.
      dtype: compute dtype; weights are float32 (the dequantized values, exactly).

    Returns:
      An `hf.Pretrained` whose tokenizer spec is "gguf:<absolute path>" (None if the file has no tokenizer).
    """
    path = Path(path).expanduser().resolve()
    reader = read(path)
    meta = metadata(reader)
    names = {t.name for t in reader.tensors}
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    cfg = hf_config(meta, names, vocab)
    tensors = Tensors(reader, meta["general.architecture"], cfg.num_attention_heads, cfg.num_key_value_heads)
    tok = f"gguf:{path}" if meta.get("tokenizer.ggml.model", "none") not in ("none", "no_vocab") else None
    if meta.get("ziplm.tokenizer") == "byte":  # a byte-level model that ziplm exported (no GGUF tokenizer exists)
        tok = "byte"
    return hf.from_tensors(cfg, tensors, path, tok, dtype)


def tensor_types(path) -> dict[str, int]:
    """{GGUF tensor type name: number of tensors} of a file (for reports: which quantization it came from)."""
    counts: dict[str, int] = {}
    for t in read(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts
