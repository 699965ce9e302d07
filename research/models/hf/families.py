"""Hugging Face model families: `config.json` <-> `ModelConfig`, and tensor names and layouts <-> our parameter tree.

Each family is two config functions and one list of tensor rules. A `Rule` ties one Hugging Face tensor to one or
more of our parameter paths with a layout `kind`:

    copy     same array (embeddings, norms, biases, GPT-2's Conv1D kernels, which are already (in, out))
    linear   torch nn.Linear weight (out, in) <-> our kernel (in, out)
    concat   GPT-2's fused c_attn: [q | k | v] along the last axis
    heads    GPT-NeoX's fused query_key_value: per head [q_h, k_h, v_h], rows of an nn.Linear weight
    offset2  OPT's learned positions: two unused leading rows (position ids start at 2)

Export goes through the same rules backwards. A model whose config a family cannot represent exactly gets
`Unsupported` with the reason; biases the family has and the model lacks are written as zeros (the same function).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from research.models import transformer
from research.models.config import ModelConfig

SUPPORTED = ("gpt2", "llama", "mistral", "qwen2", "opt", "gpt_neox")
_ACT_IN = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu", "silu": "silu"}
_ACT_IN["swish"] = "silu"
_ACT_OUT = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}
_ARCH = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "opt": "OPTForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
}
PREFIX = {"gpt2": "transformer.", "opt": "model.decoder.", "gpt_neox": "gpt_neox."}
# Buffers some checkpoints carry that are not weights (causal masks, rotary tables).
IGNORED = ("attn.bias", "attn.masked_bias", "attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")


class Unsupported(Exception):
    """The checkpoint or model uses a feature this codebase does not implement."""


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str
    ours: tuple[str, ...]
    kind: str = "copy"
    heads: int = 0


def hf_shape(rule: Rule, shapes: list[tuple]) -> tuple:
    """The Hugging Face tensor's shape given the shapes of our arrays."""
    if rule.kind == "copy":
        return shapes[0]
    if rule.kind == "linear":
        return shapes[0][::-1]
    if rule.kind == "concat":
        return (*shapes[0][:-1], sum(s[-1] for s in shapes))
    if rule.kind == "heads":
        return (3 * shapes[0][-1], *shapes[0][:-1][::-1])
    if rule.kind == "offset2":
        return (shapes[0][0] + 2, *shapes[0][1:])
    raise ValueError(rule.kind)


def to_hf(rule: Rule, arrays: list[np.ndarray]) -> np.ndarray:
    if rule.kind == "copy":
        return arrays[0]
    if rule.kind == "linear":
        return np.ascontiguousarray(arrays[0].T)
    if rule.kind == "concat":
        return np.concatenate(arrays, axis=-1)
    if rule.kind == "heads":
        h = rule.heads
        if arrays[0].ndim == 1:  # biases (H*hd,) -> (H, 3, hd)
            return np.stack([a.reshape(h, -1) for a in arrays], 1).reshape(-1)
        d_in = arrays[0].shape[0]
        fused = np.stack([a.reshape(d_in, h, -1) for a in arrays], 2).reshape(d_in, -1)  # (in, H, 3, hd)
        return np.ascontiguousarray(fused.T)
    if rule.kind == "offset2":
        return np.concatenate([np.zeros((2, *arrays[0].shape[1:]), arrays[0].dtype), arrays[0]])
    raise ValueError(rule.kind)


def to_ours(rule: Rule, array: np.ndarray, shapes: list[tuple]) -> list[np.ndarray]:
    if rule.kind == "copy":
        return [array]
    if rule.kind == "linear":
        return [array.T]
    if rule.kind == "concat":
        cuts = np.cumsum([s[-1] for s in shapes])[:-1]
        return np.split(array, cuts, axis=-1)
    if rule.kind == "heads":
        h = rule.heads
        if array.ndim == 1:
            parts = array.reshape(h, 3, -1)
            return [parts[:, j].reshape(-1) for j in range(3)]
        parts = array.T.reshape(array.shape[1], h, 3, -1)  # (in, H, 3, hd)
        return [parts[:, :, j].reshape(array.shape[1], -1) for j in range(3)]
    if rule.kind == "offset2":
        return [array[2:]]
    raise ValueError(rule.kind)


# ----------------------------------------------------------------------------------------------- config.json in


def model_config(hf, dtype: str = "float32") -> ModelConfig:
    """Our ModelConfig for a transformers config object (raises Unsupported for features not implemented)."""
    kind = hf.model_type
    if kind not in SUPPORTED:
        raise Unsupported(f"model_type {kind!r} is not supported; supported: {', '.join(SUPPORTED)}")
    return {"gpt2": _gpt2_in, "opt": _opt_in, "gpt_neox": _neox_in}.get(kind, _llama_in)(hf, dtype)


def _act(name):
    if name not in _ACT_IN:
        raise Unsupported(f"activation {name!r} is not supported; supported: {sorted(_ACT_IN)}")
    return _ACT_IN[name]


def _rope(hf, head_dim):
    rp = dict(getattr(hf, "rope_parameters", None) or {})
    kind = rp.get("rope_type", rp.get("type", "default"))
    if kind not in ("default", "linear", "llama3"):
        raise Unsupported(f"rope_type {kind!r} (RoPE scaling) is not supported; supported: default, linear, llama3")
    if rp.get("attention_factor") not in (None, 1.0):
        raise Unsupported("RoPE attention_factor other than 1 is not supported")
    theta = rp.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    rot = int(head_dim * rp.get("partial_rotary_factor", 1.0))
    out = dict(rope_theta=float(theta), rotary_dim=None if rot == head_dim else rot)
    if kind == "linear":
        out.update(rope_scaling="linear", rope_factor=float(rp["factor"]))
    elif kind == "llama3":
        out.update(
            rope_scaling="llama3",
            rope_factor=float(rp["factor"]),
            rope_low_freq_factor=float(rp["low_freq_factor"]),
            rope_high_freq_factor=float(rp["high_freq_factor"]),
            rope_original_max_len=int(rp["original_max_position_embeddings"]),
        )
    return out


def _gpt2_in(hf, dtype):
    if not getattr(hf, "scale_attn_weights", True) or getattr(hf, "scale_attn_by_inverse_layer_idx", False):
        raise Unsupported("GPT-2 attention scaling variants (scale_attn_*) are not supported")
    return ModelConfig(
        vocab_size=hf.vocab_size,
        n_layer=hf.n_layer,
        n_head=hf.n_head,
        d_model=hf.n_embd,
        d_ff=hf.n_inner or 4 * hf.n_embd,
        max_seq_len=hf.n_positions,
        norm="layernorm",
        norm_eps=float(hf.layer_norm_epsilon),
        activation=_act(hf.activation_function),
        position="learned",
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        bias=True,
        dtype=dtype,
    )


def _llama_in(hf, dtype):
    kind = hf.model_type
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    window = getattr(hf, "sliding_window", None) if kind == "mistral" else None
    if kind == "qwen2" and getattr(hf, "use_sliding_window", False):
        raise Unsupported("Qwen2 with use_sliding_window=True (per-layer windows) is not supported")
    attn_bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        vocab_size=hf.vocab_size,
        n_layer=hf.num_hidden_layers,
        n_head=hf.num_attention_heads,
        n_kv_head=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        d_model=hf.hidden_size,
        d_ff=hf.intermediate_size,
        head_dim=head_dim,
        max_seq_len=hf.max_position_embeddings,
        norm="rmsnorm",
        norm_eps=float(hf.rms_norm_eps),
        activation=_act(hf.hidden_act),
        gated_mlp=True,
        position="rope",
        **_rope(hf, head_dim),
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        bias=False,
        qkv_bias=True if kind == "qwen2" else attn_bias,
        o_bias=False if kind == "qwen2" else attn_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        sliding_window=window if window and window < hf.max_position_embeddings else None,
        dtype=dtype,
    )


def _opt_in(hf, dtype):
    if not hf.do_layer_norm_before or getattr(hf, "_remove_final_layer_norm", False):
        raise Unsupported("OPT with post-LayerNorm (do_layer_norm_before=False, as in opt-350m) is not supported")
    if hf.word_embed_proj_dim != hf.hidden_size:
        raise Unsupported(
            "OPT with word_embed_proj_dim != hidden_size (project_in/out, as in opt-350m) is not supported"
        )
    if not getattr(hf, "layer_norm_elementwise_affine", True):
        raise Unsupported("OPT with layer_norm_elementwise_affine=False is not supported")
    return ModelConfig(
        vocab_size=hf.vocab_size,
        n_layer=hf.num_hidden_layers,
        n_head=hf.num_attention_heads,
        d_model=hf.hidden_size,
        d_ff=hf.ffn_dim,
        max_seq_len=hf.max_position_embeddings,
        norm="layernorm",
        norm_eps=1e-5,
        activation=_act(hf.activation_function),
        position="learned",
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        bias=bool(getattr(hf, "enable_bias", True)),
        norm_bias=True,
        dtype=dtype,
    )


def _neox_in(hf, dtype):
    head_dim = hf.hidden_size // hf.num_attention_heads
    attn_bias = bool(getattr(hf, "attention_bias", True))
    return ModelConfig(
        vocab_size=hf.vocab_size,
        n_layer=hf.num_hidden_layers,
        n_head=hf.num_attention_heads,
        d_model=hf.hidden_size,
        d_ff=hf.intermediate_size,
        max_seq_len=hf.max_position_embeddings,
        norm="layernorm",
        norm_eps=float(hf.layer_norm_eps),
        activation=_act(hf.hidden_act),
        position="rope",
        **_rope(hf, head_dim),
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        bias=True,
        qkv_bias=attn_bias,
        o_bias=attn_bias,
        parallel_residual=bool(hf.use_parallel_residual),
        dtype=dtype,
    )


# ---------------------------------------------------------------------------------------------- config.json out


def hf_config_dict(cfg: ModelConfig, model_type: str) -> dict:
    """The config.json entries of `cfg` as a `model_type` model (raises Unsupported if it cannot be exact)."""
    need = _Checker(model_type)
    tie = dict(tie_word_embeddings=cfg.tie_embeddings)
    if model_type in ("gpt2", "opt"):
        need(cfg.norm == "layernorm", "it needs LayerNorm")
        need(cfg.position == "learned", "it needs learned positions")
        need(not cfg.gated_mlp and not cfg.parallel_residual, "it has a plain sequential MLP")
        need(cfg.kv_heads == cfg.n_head and cfg.dim_head * cfg.n_head == cfg.d_model, "it has plain multi-head")
        need(cfg.sliding_window is None, "it has no sliding window")
    if model_type == "gpt2":
        return dict(
            vocab_size=cfg.vocab_size,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            n_embd=cfg.d_model,
            n_inner=cfg.ff_dim,
            n_positions=cfg.max_seq_len,
            layer_norm_epsilon=cfg.norm_eps,
            activation_function=_ACT_OUT[cfg.activation],
            **tie,
        )
    if model_type == "opt":
        linear = {cfg.has_bias(p) for p in ("qkv", "o", "mlp")}
        need(len(linear) == 1, "its linear layers either all have biases or none do")
        need(cfg.norm_eps == 1e-5, "its LayerNorm epsilon is 1e-5")
        return dict(
            vocab_size=cfg.vocab_size,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            hidden_size=cfg.d_model,
            word_embed_proj_dim=cfg.d_model,
            ffn_dim=cfg.ff_dim,
            max_position_embeddings=cfg.max_seq_len,
            activation_function=_ACT_OUT[cfg.activation],
            enable_bias=linear.pop(),
            do_layer_norm_before=True,
            **tie,
        )
    need(cfg.position == "rope", "it needs RoPE")
    rope = {"rope_type": cfg.rope_scaling or "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        rope.update(
            low_freq_factor=cfg.rope_low_freq_factor,
            high_freq_factor=cfg.rope_high_freq_factor,
            original_max_position_embeddings=cfg.rope_original_max_len,
        )
    if cfg.rope_dim != cfg.dim_head:
        rope["partial_rotary_factor"] = cfg.rope_dim / cfg.dim_head
    if model_type == "gpt_neox":
        need(cfg.norm == "layernorm" and not cfg.gated_mlp, "it needs LayerNorm and a plain MLP")
        need(cfg.kv_heads == cfg.n_head and cfg.dim_head * cfg.n_head == cfg.d_model, "it has plain multi-head")
        need(cfg.has_bias("qkv") == cfg.has_bias("o"), "its attention biases are all on or all off")
        need(cfg.sliding_window is None, "it has no sliding window")
        return dict(
            vocab_size=cfg.vocab_size,
            num_hidden_layers=cfg.n_layer,
            num_attention_heads=cfg.n_head,
            hidden_size=cfg.d_model,
            intermediate_size=cfg.ff_dim,
            max_position_embeddings=cfg.max_seq_len,
            layer_norm_eps=cfg.norm_eps,
            hidden_act=_ACT_OUT[cfg.activation],
            rope_parameters={"partial_rotary_factor": 1.0, **rope},
            attention_bias=cfg.has_bias("qkv"),
            use_parallel_residual=cfg.parallel_residual,
            **tie,
        )
    need(cfg.norm == "rmsnorm" and cfg.gated_mlp and not cfg.parallel_residual, "it needs RMSNorm and a gated MLP")
    need(cfg.rope_dim == cfg.dim_head, "it rotates whole heads")
    out = dict(
        vocab_size=cfg.vocab_size,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.kv_heads,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ff_dim,
        head_dim=cfg.dim_head,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        hidden_act=_ACT_OUT[cfg.activation],
        rope_parameters=rope,
        **tie,
    )
    if model_type == "qwen2":
        need(cfg.has_bias("qkv") and not cfg.has_bias("o") and not cfg.has_bias("mlp"), "it has q/k/v biases only")
        need(cfg.sliding_window is None, "it has no sliding window here")
        return out
    if model_type == "mistral":
        need(cfg.has_bias("qkv") == cfg.has_bias("o") == cfg.has_bias("mlp") is False, "it has no biases")
        return {**out, "sliding_window": cfg.sliding_window}
    need(cfg.sliding_window is None, "it has no sliding window (use mistral)")
    need(cfg.has_bias("qkv") == cfg.has_bias("o"), "its attention biases are all on or all off")
    return {**out, "attention_bias": cfg.has_bias("qkv"), "mlp_bias": cfg.has_bias("mlp")}


class _Checker:
    def __init__(self, model_type):
        if model_type not in SUPPORTED:
            raise Unsupported(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED)}")
        self.model_type = model_type

    def __call__(self, ok, why):
        if not ok:
            raise Unsupported(f"cannot be written as {self.model_type}: {why}")


def same_function(cfg: ModelConfig, written: ModelConfig) -> list[str]:
    """Fields where `written` (the config a checkpoint declares) computes something other than `cfg`.

    Biases `cfg` lacks may be present in `written` (they are written as zeros); everything else must agree.
    """

    def arch(c):
        rope = c.position == "rope"
        return dict(
            vocab_size=c.vocab_size,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_kv_head=c.kv_heads,
            d_model=c.d_model,
            d_ff=c.ff_dim,
            head_dim=c.dim_head,
            max_seq_len=c.max_seq_len,
            norm=c.norm,
            norm_eps=c.norm_eps,
            activation=c.activation,
            gated_mlp=c.gated_mlp,
            position=c.position,
            rope_theta=c.rope_theta if rope else None,
            rotary_dim=c.rope_dim if rope else None,
            rope_scaling=tuple(transformer.rope_frequencies(c).tolist()) if rope else None,
            tie_embeddings=c.tie_embeddings,
            parallel_residual=c.parallel_residual,
            sliding_window=c.sliding_window,
        )

    a, b = arch(cfg), arch(written)
    diff = [k for k in a if a[k] != b[k]]
    return diff + [f"{p}_bias" for p in ("qkv", "o", "mlp", "norm") if cfg.has_bias(p) and not written.has_bias(p)]


def architecture(model_type: str) -> str:
    return _ARCH[model_type]


def default_model_type(cfg: ModelConfig) -> str:
    """The first family (gpt2, llama, qwen2, mistral, opt, gpt_neox) that represents `cfg` exactly."""
    reasons = []
    for kind in ("gpt2", "llama", "qwen2", "mistral", "opt", "gpt_neox"):
        try:
            hf_config_dict(cfg, kind)
            return kind
        except Unsupported as e:
            reasons.append(str(e))
    raise Unsupported("no Hugging Face family represents this model: " + "; ".join(reasons))


# ------------------------------------------------------------------------------------------------- tensor rules


def rules(cfg: ModelConfig, model_type: str) -> list[Rule]:
    """The tensor rules of a `model_type` checkpoint with config `cfg` (as `model_config` returns it)."""
    fam = {"gpt2": _gpt2_rules, "opt": _opt_rules, "gpt_neox": _neox_rules}.get(model_type, _llama_rules)
    out = fam(cfg)
    if not cfg.tie_embeddings:
        out.append(Rule(head_name(model_type), ("lm_head/kernel",), "linear"))
    return out


def head_name(model_type: str) -> str:
    """The output head's tensor name (GPT-NeoX checkpoints call it embed_out)."""
    return "embed_out.weight" if model_type == "gpt_neox" else "lm_head.weight"


def _norm(hf, ours, cfg, weight="weight"):
    out = [Rule(f"{hf}.{weight}", (f"{ours}/scale",))]
    if cfg.has_bias("norm"):
        out.append(Rule(f"{hf}.bias", (f"{ours}/bias",)))
    return out


def _lin(hf, ours, cfg, part, kind="linear"):
    out = [Rule(f"{hf}.weight", (f"{ours}/kernel",), kind)]
    if cfg.has_bias(part):
        out.append(Rule(f"{hf}.bias", (f"{ours}/bias",)))
    return out


def _gpt2_rules(cfg):
    p = PREFIX["gpt2"]
    out = [Rule(p + "wte.weight", ("embed/embedding",)), Rule(p + "wpe.weight", ("pos_embed/embedding",))]
    for i in range(cfg.n_layer):
        h, o = f"{p}h.{i}", f"layers/{i}"
        qkv = tuple(f"{o}/attn/{n}/kernel" for n in "qkv")
        out += _norm(f"{h}.ln_1", f"{o}/attn_norm", cfg)
        out += [Rule(f"{h}.attn.c_attn.weight", qkv, "concat")]
        out += [Rule(f"{h}.attn.c_attn.bias", tuple(q.replace("kernel", "bias") for q in qkv), "concat")]
        out += _lin(f"{h}.attn.c_proj", f"{o}/attn/o", cfg, "o", "copy")
        out += _norm(f"{h}.ln_2", f"{o}/mlp_norm", cfg)
        out += _lin(f"{h}.mlp.c_fc", f"{o}/mlp/up", cfg, "mlp", "copy")
        out += _lin(f"{h}.mlp.c_proj", f"{o}/mlp/down", cfg, "mlp", "copy")
    return out + _norm(p + "ln_f", "final_norm", cfg)


def _llama_rules(cfg):
    out = [Rule("model.embed_tokens.weight", ("embed/embedding",))]
    for i in range(cfg.n_layer):
        h, o = f"model.layers.{i}", f"layers/{i}"
        out += _norm(f"{h}.input_layernorm", f"{o}/attn_norm", cfg)
        for n in "qkv":
            out += _lin(f"{h}.self_attn.{n}_proj", f"{o}/attn/{n}", cfg, "qkv")
        out += _lin(f"{h}.self_attn.o_proj", f"{o}/attn/o", cfg, "o")
        out += _norm(f"{h}.post_attention_layernorm", f"{o}/mlp_norm", cfg)
        for n in ("gate", "up", "down"):
            out += _lin(f"{h}.mlp.{n}_proj", f"{o}/mlp/{n}", cfg, "mlp")
    return out + _norm("model.norm", "final_norm", cfg)


def _opt_rules(cfg):
    p = PREFIX["opt"]
    out = [Rule(p + "embed_tokens.weight", ("embed/embedding",))]
    out.append(Rule(p + "embed_positions.weight", ("pos_embed/embedding",), "offset2"))
    for i in range(cfg.n_layer):
        h, o = f"{p}layers.{i}", f"layers/{i}"
        out += _norm(f"{h}.self_attn_layer_norm", f"{o}/attn_norm", cfg)
        for n in "qkv":
            out += _lin(f"{h}.self_attn.{n}_proj", f"{o}/attn/{n}", cfg, "qkv")
        out += _lin(f"{h}.self_attn.out_proj", f"{o}/attn/o", cfg, "o")
        out += _norm(f"{h}.final_layer_norm", f"{o}/mlp_norm", cfg)
        out += _lin(f"{h}.fc1", f"{o}/mlp/up", cfg, "mlp")
        out += _lin(f"{h}.fc2", f"{o}/mlp/down", cfg, "mlp")
    return out + _norm(p + "final_layer_norm", "final_norm", cfg)


def _neox_rules(cfg):
    p = PREFIX["gpt_neox"]
    out = [Rule(p + "embed_in.weight", ("embed/embedding",))]
    for i in range(cfg.n_layer):
        h, o = f"{p}layers.{i}", f"layers/{i}"
        qkv = tuple(f"{o}/attn/{n}/kernel" for n in "qkv")
        out += _norm(f"{h}.input_layernorm", f"{o}/attn_norm", cfg)
        out.append(Rule(f"{h}.attention.query_key_value.weight", qkv, "heads", cfg.n_head))
        if cfg.has_bias("qkv"):
            biases = tuple(q.replace("kernel", "bias") for q in qkv)
            out.append(Rule(f"{h}.attention.query_key_value.bias", biases, "heads", cfg.n_head))
        out += _lin(f"{h}.attention.dense", f"{o}/attn/o", cfg, "o")
        out += _norm(f"{h}.post_attention_layernorm", f"{o}/mlp_norm", cfg)
        out += _lin(f"{h}.mlp.dense_h_to_4h", f"{o}/mlp/up", cfg, "mlp")
        out += _lin(f"{h}.mlp.dense_4h_to_h", f"{o}/mlp/down", cfg, "mlp")
    return out + _norm(p + "final_layer_norm", "final_norm", cfg)
