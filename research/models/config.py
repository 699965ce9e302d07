"""Model configuration: one frozen dataclass covers the GPT-2, Llama (Mistral, Qwen2), OPT and GPT-NeoX families.

`ModelConfig` holds every architectural choice; `gpt2_style` and `llama_style` fill in the defaults of each
family. `count_params` and `flops_per_token` are analytic, so they work without building the model (a test checks
`count_params` against the built model).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from research import errors

NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")
POSITIONS = ("learned", "rope", "none")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    Attributes:
      vocab_size: number of token ids.
      n_layer: number of transformer blocks.
      n_head: number of query heads.
      n_kv_head: number of key/value heads (grouped-query attention); None means n_head.
      d_model: width of the residual stream.
      d_ff: hidden width of the MLP; None means 4 * d_model.
      head_dim: width of one head; None means d_model // n_head.
      max_seq_len: context length (size of the learned position table; the RoPE limit is advisory).
      norm: "layernorm" (GPT-2) or "rmsnorm" (Llama).
      norm_eps: epsilon of the norms.
      activation: MLP non-linearity: "gelu" (exact), "gelu_tanh" (GPT-2's gelu_new), "relu", "silu".
      gated_mlp: SwiGLU-style MLP, act(gate(x)) * up(x), as in Llama.
      position: "learned" absolute positions (GPT-2), "rope" (Llama) or "none".
      rope_theta: RoPE base frequency.
      rotary_dim: number of leading head dimensions RoPE rotates; None means all of them.
      rope_scaling: None, "linear" (positions divided by rope_factor) or "llama3" (Llama 3.1's per-frequency
        scaling: low frequencies divided by rope_factor, high ones kept, a smooth ramp between).
      rope_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_len: the scaling's parameters
        (Hugging Face's factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
      tie_embeddings: the output head reuses the token embedding.
      bias: biases in the linear layers and the LayerNorms (the default for the four flags below).
      qkv_bias: biases on the query, key and value projections; None means `bias` (Qwen2: True with bias False).
      o_bias: bias on the attention output projection; None means `bias`.
      mlp_bias: biases in the MLP; None means `bias`.
      norm_bias: LayerNorm biases; None means `bias` (OPT without linear biases keeps them).
      parallel_residual: x + attn(norm1(x)) + mlp(norm2(x)) in one step (GPT-NeoX / Pythia).
      sliding_window: each query sees at most this many keys, itself included (Mistral); None means all.
      dropout: dropout rate on embeddings and residual branches (only when a dropout key is given).
      dtype: compute dtype; parameters always stay float32 (master weights).
      act_bits: fake-quantize the input of every block linear layer per token to this many bits (2..16, W8A8
        studies; `models.act_quant`); None: full precision.
    """

    vocab_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None
    d_model: int = 128
    d_ff: int | None = None
    head_dim: int | None = None
    max_seq_len: int = 256
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    activation: Literal["gelu", "gelu_tanh", "relu", "silu"] = "gelu_tanh"
    gated_mlp: bool = False
    position: Literal["learned", "rope", "none"] = "learned"
    rope_theta: float = 10000.0
    rotary_dim: int | None = None
    rope_scaling: Literal["linear", "llama3"] | None = None
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    tie_embeddings: bool = True
    bias: bool = True
    qkv_bias: bool | None = None
    o_bias: bool | None = None
    mlp_bias: bool | None = None
    norm_bias: bool | None = None
    parallel_residual: bool = False
    sliding_window: int | None = None
    dropout: float = 0.0
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    act_bits: int | None = None

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise errors.UserError(f"model config: {msg}")

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len", "rope_original_max_len"):
            v = getattr(self, name)
            need(is_int(v) and v > 0, f"{name} must be a positive integer, got {v!r}")
        for name in ("n_kv_head", "d_ff", "head_dim", "rotary_dim", "sliding_window"):
            v = getattr(self, name)
            need(v is None or (is_int(v) and v > 0), f"{name} must be a positive integer or None, got {v!r}")
        for name in (
            "norm_eps",
            "rope_theta",
            "dropout",
            "rope_factor",
            "rope_low_freq_factor",
            "rope_high_freq_factor",
        ):
            v = getattr(self, name)
            need(isinstance(v, int | float) and not isinstance(v, bool), f"{name} must be a number, got {v!r}")
        for name in ("gated_mlp", "tie_embeddings", "bias", "parallel_residual"):
            need(isinstance(getattr(self, name), bool), f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("qkv_bias", "o_bias", "mlp_bias", "norm_bias"):
            v = getattr(self, name)
            need(v is None or isinstance(v, bool), f"{name} must be True, False or None, got {v!r}")
        need(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        need(self.position in POSITIONS, f"position must be one of {POSITIONS}, got {self.position!r}")
        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(
            self.act_bits is None or (is_int(self.act_bits) and 2 <= self.act_bits <= 16),
            f"act_bits must be an integer in 2..16 or None, got {self.act_bits!r}",
        )
        need(
            self.rope_scaling in (None, "linear", "llama3"),
            f"rope_scaling must be None, 'linear' or 'llama3', got {self.rope_scaling!r}",
        )
        need(self.rope_factor > 0, f"rope_factor must be positive, got {self.rope_factor}")
        if self.rope_scaling == "llama3":
            need(
                self.rope_high_freq_factor > self.rope_low_freq_factor > 0,
                "rope_high_freq_factor must exceed rope_low_freq_factor > 0",
            )
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(
            self.n_head % self.kv_heads == 0,
            f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.kv_heads})",
        )
        if self.head_dim is None:
            need(
                self.d_model % self.n_head == 0,
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}), or set head_dim",
            )
        if self.position == "rope":
            need(self.rope_dim % 2 == 0 and 0 < self.rope_dim <= self.dim_head, "rotary_dim must be even, <= head_dim")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def rope_dim(self) -> int:
        return self.rotary_dim or self.dim_head

    def has_bias(self, part: str) -> bool:
        """Whether `part` ("qkv", "o", "mlp" or "norm") has biases; a norm bias needs a LayerNorm."""
        flag = getattr(self, f"{part}_bias")
        on = self.bias if flag is None else flag
        return on and (part != "norm" or self.norm == "layernorm")

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Builds a config from a dict, with a one-line error for unknown keys."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise errors.UserError(f"model config: unknown key(s) {unknown}; known keys: {sorted(fields)}")
        return cls(**d)


def gpt2_style(**kw) -> ModelConfig:
    """GPT-2: learned positions, LayerNorm, tanh-GELU MLP of width 4d, tied embeddings, biases."""
    base = dict(
        norm="layernorm",
        activation="gelu_tanh",
        gated_mlp=False,
        position="learned",
        tie_embeddings=True,
        bias=True,
        norm_eps=1e-5,
    )
    return ModelConfig(**{**base, **kw})


def llama_style(**kw) -> ModelConfig:
    """Llama: RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, untied head, no biases."""
    d_model = kw.get("d_model", ModelConfig.d_model)
    base = dict(
        norm="rmsnorm",
        activation="silu",
        gated_mlp=True,
        position="rope",
        tie_embeddings=False,
        bias=False,
        norm_eps=1e-5,
        d_ff=_swiglu_width(d_model),
    )
    return ModelConfig(**{**base, **kw})


def _swiglu_width(d_model: int, multiple_of: int = 32) -> int:
    """Llama's hidden width: 2/3 of 4d, rounded up to a multiple (keeps the MLP's parameter count near 8d^2)."""
    hidden = int(2 * 4 * d_model / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def count_params(cfg: ModelConfig, *, embeddings: bool = True) -> int:
    """Number of parameters of the model `cfg` describes.

    Args:
      cfg: the model configuration.
      embeddings: count the token and position tables (an untied output head always counts).

    Returns:
      The parameter count.
    """
    d, hd, f, v = cfg.d_model, cfg.dim_head, cfg.ff_dim, cfg.vocab_size
    q_out, kv_out = cfg.n_head * hd, cfg.kv_heads * hd
    norm = d * (2 if cfg.has_bias("norm") else 1)
    attn = d * q_out + 2 * d * kv_out + q_out * d + cfg.has_bias("qkv") * (q_out + 2 * kv_out) + cfg.has_bias("o") * d
    mlp = (3 if cfg.gated_mlp else 2) * d * f + cfg.has_bias("mlp") * ((2 if cfg.gated_mlp else 1) * f + d)
    total = cfg.n_layer * (attn + mlp + 2 * norm) + norm
    if not cfg.tie_embeddings:
        total += d * v
    if embeddings:
        total += v * d + (cfg.max_seq_len * d if cfg.position == "learned" else 0)
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, *, training: bool = True) -> float:
    """Matmul FLOPs per token, following the PaLM appendix B convention.

    Forward FLOPs per token = 2 * (weights used in matmuls: every linear layer and the output head, not the
    embedding lookups) + 4 * n_layer * seq_len * n_head * head_dim (scores and weighted values, counting the full
    causal square, as PaLM does). Training (forward + backward) is 3x the forward.

    Args:
      cfg: the model configuration.
      seq_len: context length the attention term uses; defaults to cfg.max_seq_len.
      training: count forward + backward (3x) rather than forward only.

    Returns:
      FLOPs per token, a float.
    """
    t = seq_len or cfg.max_seq_len
    d, q_out, kv_out = cfg.d_model, cfg.n_head * cfg.dim_head, cfg.kv_heads * cfg.dim_head
    per_layer = 2 * d * q_out + 2 * d * kv_out + (3 if cfg.gated_mlp else 2) * d * cfg.ff_dim
    matmul = cfg.n_layer * per_layer + d * cfg.vocab_size
    fwd = 2 * matmul + 4 * cfg.n_layer * t * cfg.n_head * cfg.dim_head
    return float(fwd * (3 if training else 1))
