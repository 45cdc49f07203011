"""One decoder-only transformer for the Llama family, configured by fields.

Llama 2/3/3.1/3.2, SmolLM, TinyLlama, CodeLlama, Mistral, Qwen2 and Qwen3 differ only in the fields of
ModelArgs; everything is decided in __init__ and forward does tensor work only. The KV cache has fixed
buffers so torch.compile can capture a decode step in a CUDA graph. This file knows nothing of
quantization (quantize.py swaps modules) or tensor parallelism (tp.py shards a built model).
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 4096  # hidden size
    n_layer: int = 32
    n_head: int = 32  # query heads
    n_local_heads: int = -1  # key/value heads (GQA/MQA when < n_head); -1 means n_head
    head_dim: int = -1  # explicit for Qwen3 and some Mistrals; -1 means dim // n_head
    intermediate_size: int = 11008  # SwiGLU hidden size
    block_size: int = 4096  # maximum context the model was trained for
    rope_base: float = 10000.0
    rope_scaling: dict | None = None  # HF rope_scaling: {"rope_type": "llama3" | "linear", ...}
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2 (and Llama with attention_bias) add a bias to q, k, v
    o_bias: bool = False  # Llama's attention_bias also covers the output projection
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before rotary
    sliding_window: int | None = None  # attend to at most this many previous positions (itself included)
    sliding_layers: tuple[bool, ...] = ()  # which layers use the window; empty means all when set
    tie_word_embeddings: bool = False  # output projection shares the embedding matrix
    model_type: str = "llama"
    extra: dict = field(default_factory=dict)  # unused HF fields kept for the record

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.head_dim == -1:
            self.head_dim = self.dim // self.n_head
        if self.sliding_window is not None and not self.sliding_layers:
            self.sliding_layers = (True,) * self.n_layer

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """The one mapping from an HF config.json dict to our fields (GGUF metadata is turned into such a
        dict by the converter first)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        n_layer = cfg["num_hidden_layers"]
        rope_scaling = cfg.get("rope_scaling") or None
        rope_base = cfg.get("rope_theta")
        if rope_base is None:  # transformers 5 may keep theta inside rope_parameters
            rope_base = (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        if rope_scaling is None and cfg.get("rope_parameters"):
            params = cfg["rope_parameters"]
            if params.get("rope_type", "default") != "default":
                rope_scaling = params
        if rope_scaling is not None:
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind == "default":
                rope_scaling = None
            elif kind not in ("llama3", "linear"):
                raise ValueError(f"unsupported rope scaling {kind!r}; supported: llama3, linear")

        sliding_window, sliding_layers = None, ()
        if model_type == "mistral":
            sliding_window = cfg.get("sliding_window")
        elif cfg.get("use_sliding_window") and cfg.get("sliding_window"):  # qwen2 / qwen3
            sliding_window = cfg["sliding_window"]
            if cfg.get("layer_types"):
                sliding_layers = tuple(t == "sliding_attention" for t in cfg["layer_types"])
            else:
                first = cfg.get("max_window_layers", n_layer)
                sliding_layers = tuple(i >= first for i in range(n_layer))
            if not any(sliding_layers):
                sliding_window, sliding_layers = None, ()

        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layer=n_layer,
            n_head=cfg["num_attention_heads"],
            n_local_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            block_size=cfg.get("max_position_embeddings", 4096),
            rope_base=float(rope_base),
            rope_scaling=rope_scaling,
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            sliding_layers=sliding_layers,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            model_type=model_type,
        )


class KVCache(nn.Module):
    def __init__(self, batch_size: int, n_heads: int, max_seq_length: int, head_dim: int, dtype):
        super().__init__()
        shape = (batch_size, n_heads, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # input_pos: [S], k/v: [B, H_kv, S, D]; writes in place so the buffers keep their addresses
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.max_batch_size = -1
        self.max_seq_length = -1

    def setup_caches(self, max_batch_size: int, max_seq_length: int, device=None, dtype=None):
        """Allocate the KV cache and build the rotary table and masks once, for sequences of at most
        max_seq_length positions (prompt plus generated tokens)."""
        device = device or self.tok_embeddings.weight.device
        dtype = dtype or self.tok_embeddings.weight.dtype
        cfg = self.config
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                max_batch_size, cfg.n_local_heads, max_seq_length, cfg.head_dim, dtype
            ).to(device)
        cos, sin = rope_cos_sin(cfg, max_seq_length, device)
        self.register_buffer("rope_cos", cos.to(dtype), persistent=False)  # [T, D]
        self.register_buffer("rope_sin", sin.to(dtype), persistent=False)
        pos = torch.arange(max_seq_length, device=device)
        causal = pos[None, :] <= pos[:, None]  # [T, T]: query row may see key column
        self.register_buffer("causal_mask", causal, persistent=False)
        window = cfg.sliding_window or max_seq_length
        self.register_buffer("window_mask", causal & (pos[:, None] - pos[None, :] < window), persistent=False)
        # kv_valid[b, t] is False for left-padding slots of row b; generate.py fills it for ragged batches
        self.register_buffer(
            "kv_valid", torch.ones(max_batch_size, max_seq_length, dtype=torch.bool, device=device), persistent=False
        )

    def forward(self, idx: Tensor, input_pos: Tensor) -> Tensor:
        # idx: [B, S] token ids, input_pos: [S] cache slots they occupy -> logits [B, S, vocab]
        x, cos, sin, full_mask, window_mask = self.embed(idx, input_pos)
        for layer in self.layers:
            x = layer(x, input_pos, cos, sin, window_mask if layer.sliding else full_mask)
        return self.output(self.norm(x))

    def embed(self, idx: Tensor, input_pos: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        # what the layers take: embeddings [B, S, dim], rotary rows cos, sin [S, D], full and sliding-window masks
        assert self.max_seq_length > 0, "call setup_caches() before forward"
        valid = self.kv_valid[: idx.shape[0], None, None, :]  # [B, 1, 1, T]
        diag = F.one_hot(input_pos, self.max_seq_length).bool()  # a query always sees itself (no NaN rows)
        full_mask = (self.causal_mask[input_pos] & valid) | diag  # [B, 1, S, T]
        window_mask = (self.window_mask[input_pos] & valid) | diag
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # [S, D]
        return self.tok_embeddings(idx), cos, sin, full_mask, window_mask


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs, layer_id: int):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.sliding = bool(config.sliding_layers and config.sliding_layers[layer_id])

    def forward(self, x: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        h = x + self.attention(self.attention_norm(x), input_pos, cos, sin, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = config.n_head, config.n_local_heads, config.head_dim
        # q, k and v in one matmul: one weight read and one kernel per layer at decode time
        qkv_out = (config.n_head + 2 * config.n_local_heads) * config.head_dim
        self.wqkv = nn.Linear(config.dim, qkv_out, bias=config.qkv_bias)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.dim, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()
        self.kv_cache: KVCache | None = None
        # F.scaled_dot_product_attention or a function with its signature (quantize.prepare_for_device puts
        # triton_attention.DecodeAttention here on a GPU: a Triton kernel for decode steps)
        self.sdpa = F.scaled_dot_product_attention

    def forward(self, x: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        return self.wo(self.attend(self.wqkv(x), input_pos, cos, sin, mask))

    def attend(self, qkv: Tensor, input_pos: Tensor, cos: Tensor, sin: Tensor, mask: Tensor) -> Tensor:
        # qkv: [B, S, (H + 2 H_kv) D], the input's projection -> the heads' outputs before wo, [B, S, H * D]
        bsz, seqlen, _ = qkv.shape
        q_size, kv_size = self.n_head * self.head_dim, self.n_local_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = self.q_norm(q.view(bsz, seqlen, self.n_head, self.head_dim))
        k = self.k_norm(k.view(bsz, seqlen, self.n_local_heads, self.head_dim))
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = self.kv_cache.update(input_pos, k, v)  # [B, H_kv, T, D]
        y = self.sdpa(q, k, v, attn_mask=mask, enable_gqa=self.n_head != self.n_local_heads)
        return y.transpose(1, 2).contiguous().view(bsz, seqlen, q_size)


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        # gate (w1) and up (w3) projections stacked into one matmul: [2 * hidden, dim]
        self.w13 = nn.Linear(config.dim, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # normalise in float32, cast back, then scale: the same rounding order as the HF reference
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(cfg: ModelArgs, seq_len: int, device=None) -> tuple[Tensor, Tensor]:
    """Rotary tables [seq_len, head_dim] in the rotate-half layout of HF checkpoints."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def llama3_inv_freq(inv_freq: Tensor, s: dict) -> Tensor:
    # Llama 3.1: leave high frequencies alone, divide low ones by `factor`, interpolate smoothly between
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    is_medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(is_medium, smoothed, out)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [B, H, S, D], cos/sin: [S, D]; rotate-half: pairs are (i, i + D/2)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
