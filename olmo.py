"""OLMo (1, 2 and 3), OLMoE, FlexOlmo and Olmo Hybrid in one readable PyTorch file.

OLMo (Groeneveld et al., 2024, https://arxiv.org/abs/2402.00838) is a decoder-only transformer: token
embeddings, N blocks of (norm -> attention with rotary positions -> residual, norm -> gated MLP -> residual),
a final norm and a linear head over the vocabulary. OLMo 1's one unusual choice is the norm: a LayerNorm with
no learnable weight.

OLMo 2 (OLMo et al., 2024, https://arxiv.org/abs/2501.00656) changes three coupled things for training
stability: RMSNorm with weights, a norm on the queries and keys, and the norm moved after each sublayer.
OLMo 3 adds sliding-window attention on three layers in four, and YaRN to stretch the context. Olmo
Hybrid (Merrill et al., 2026, https://arxiv.org/abs/2604.03444) makes those three layers in four Gated
DeltaNet instead: linear attention, a fixed-size state per head updated once per token, the same cost at any
length. Each change is written once, where it happens, under a comment starting "OLMo 2:", "OLMo 3:" or
"Olmo Hybrid:"; a reader of OLMo 1 can skip those lines.

OLMoE (Muennighoff et al., 2024, https://arxiv.org/abs/2409.02060) is a mixture of experts: each MLP becomes
many (64 in OLMoE-1B-7B), and a router sends each token to a few of them (8), so a token runs through a
fifth of the weights. Its block is OLMo 1's order with OLMo 2's RMSNorm and QK-norm. FlexOlmo (Shi et al.,
2025, https://arxiv.org/abs/2507.07024) puts the same experts into OLMo 2's block. Their lines are marked "OLMoE:".

It reads top to bottom: config -> norm -> RoPE -> attention -> (Olmo Hybrid) Gated DeltaNet -> MLP -> block ->
model -> generation -> loading -> reading config.json -> CLI. Names match transformers' `OlmoForCausalLM`,
`Olmo2ForCausalLM`, `Olmo3ForCausalLM`, `OlmoeForCausalLM`, `FlexOlmoForCausalLM` and `OlmoHybridForCausalLM`,
so their checkpoints load with strict name and shape checks and no renaming (Olmo Hybrid's hub layout is
joined as transformers joins it), and the logits equal transformers' (see the tests). It is meant to be read
and copied, not configured: no framework.

Notation: B batch rows, T tokens in this call, S cache slots (keys), H / KV query and key-value heads,
D head_dim. A *slot* is a column of the (left-padded) batch, the index into the KV cache; a *position* is
what RoPE rotates by: the slot minus the row's left padding. Olmo Hybrid's Gated DeltaNet layers: Hk / Hv
query-key and value heads, of sizes dk / dv.

    python olmo.py --model path/to/OLMo-1B-hf --prompt "Language models are"
"""

import json
import math
import os
import pickle
import platform
import stat
import sys
import types
import typing
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class OlmoConfig:
    """Every field of transformers' OlmoConfig with its default (the OLMo-7B shape), plus the few OLMo 2,
    OLMo 3 and OLMoE add. from_json reads and checks a config.json (see "Reading config.json", near the end).
    __post_init__ adds what the family (model_type's row of FAMILIES) switches on: qk_norm (OLMo 2's RMSNorm and
    QK-norm), norm_after (OLMo 2's norm placement) and moe (OLMoE's experts)."""

    model_type: str = "olmo"  # "olmo", "olmo2", "olmo3", "olmoe", "flex_olmo" or "olmo_hybrid" (config.json says)
    vocab_size: int = 50304  # 50280 real tokens, padded to a multiple of 128 for fast matmuls
    hidden_size: int = 4096  # d_model: the width of the residual stream
    intermediate_size: int = 11008  # width of the MLP's hidden layer (per gate/up projection)
    num_hidden_layers: int = 32  # number of decoder blocks
    num_attention_heads: int = 32  # H, query heads
    num_key_value_heads: int | None = None  # KV, key/value heads: None = H (MHA), 1 = MQA, else GQA
    head_dim: int | None = None  # D, each head's size: None = hidden_size // H (transformers reads it if given)
    hidden_act: str = "silu"  # the MLP gate's activation (SwiGLU with silu)
    max_position_embeddings: int = 2048  # context length trained on; dynamic RoPE scales beyond it
    initializer_range: float = 0.02  # std of the normal init of fresh (untrained) weights
    use_cache: bool = True  # transformers' flag; generate() here always uses the KV cache
    pad_token_id: int | None = 1  # fills rows that finished early in a batch
    bos_token_id: int | None = None  # OLMo adds no BOS token to prompts
    eos_token_id: int | list[int] | None = 50279  # generation stops at this token ("<|endoftext|>")
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix (OLMo-1B) or not (OLMo-7B)
    # RoPE per layer type, as transformers 5 holds it: {"full_attention": {"rope_type": "default" | "linear" |
    # "dynamic" | "yarn", "rope_theta": base, "factor": f > 1, ...}, "sliding_attention": {...}}. A flat dict
    # (or 4.x's rope_theta and rope_scaling) means the full-attention layers. The base defaults to 10000.
    # Olmo Hybrid: "none" (rope_theta given as null) leaves q and k unrotated
    rope_parameters: dict | None = None
    attention_bias: bool = False  # biases on q/k/v/o projections
    attention_dropout: float = 0.0  # dropout on attention probabilities, in training mode only
    clip_qkv: float | None = None  # OLMo 1 only: clamp q, k and v to [-clip_qkv, clip_qkv] (7B-0424: 8.0)
    rms_norm_eps: float = 1e-5  # OLMo 2: the epsilon of its RMSNorms
    sliding_window: int | None = None  # OLMo 3: a query sees this many keys (itself included); None: 4096
    layer_types: list[str] | None = None  # OLMo 3: per layer "full_attention" or "sliding_attention"
    dtype: str | None = None  # the checkpoint's dtype ("torch_dtype" in transformers 4), e.g. "bfloat16"
    # OLMoE and FlexOlmo: a mixture of experts in each MLP's place (dense models ignore these fields)
    num_experts: int = 64  # OLMoE: experts per layer, each an MLP of intermediate_size (OLMoE-1B-7B: 64)
    num_experts_per_tok: int = 8  # OLMoE: how many experts the router sends each token to, its top-k
    norm_topk_prob: bool = False  # OLMoE: rescale the chosen experts' probabilities to sum to 1
    output_router_logits: bool = False  # OLMoE: add the router's load-balancing loss to the training loss
    router_aux_loss_coef: float = 0.01  # OLMoE: that loss's weight
    # Olmo Hybrid: its Gated DeltaNet ("linear_attention") layers have heads of their own
    linear_num_key_heads: int | None = None  # Hk, query/key heads (None: H)
    linear_num_value_heads: int | None = None  # Hv, value heads, each with its own state (None: H)
    linear_key_head_dim: int | None = None  # dk (None: 0.75 hidden_size / Hk)
    linear_value_head_dim: int | None = None  # dv (None: 2 dk)
    linear_conv_kernel_dim: int = 4  # the short causal convolution over q, k and v spans this many tokens
    linear_allow_neg_eigval: bool = True  # beta in (0, 2), not (0, 1): an update may overshoot, flipping signs

    def __post_init__(self):
        """Fill the defaults that depend on other fields, each after the checks (in "Reading config.json")
        of the fields it relies on. The family's row of FAMILIES says what differs from OLMo 1."""
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        require(self, self.model_type in FAMILIES, "model_type", f"one of {', '.join(FAMILIES)} (for 'hf_olmo' "
                "or trainer checkpoints run convert.py first)")
        self.qk_norm, self.norm_after, self.moe, other, rope_theta = FAMILIES[self.model_type]
        check_fields(self)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        require(self, 2 <= self.head_dim < 2 ** 31 and self.head_dim % 2 == 0, "head_dim", "an even number >= 2 "
                "(RoPE rotates pairs)")
        # Every layer attends to all earlier tokens but in OLMo 3 and Olmo Hybrid, where 3 layers in 4 are of their
        # other type unless config.json lists them (as transformers, the other families read no list)
        if self.layer_types is None or other == "full_attention":
            self.layer_types = [other if i % 4 != 3 else "full_attention" for i in range(self.num_hidden_layers)]
            if other == "linear_attention" and "full_attention" not in self.layer_types:  # Olmo Hybrid: < 4
                self.layer_types[-1] = "full_attention"  # layers: the last one attends
        if other == "sliding_attention" and self.sliding_window is None:  # OLMo 3
            self.sliding_window = 4096
        self.rope_parameters = rope_per_layer_type(self, other, rope_theta)
        if "linear_attention" in self.layer_types:  # Olmo Hybrid
            fill_linear_attention(self)

    @property
    def dynamic_rope(self):
        """Whether RoPE's frequencies change with the sequence's length (dynamic NTK scaling past
        max_position_embeddings): then keys cached at one length can't be reused at another."""
        return any(rope["rope_type"] == "dynamic" for rope in self.rope_parameters.values())

    @classmethod
    def from_dict(cls, d, source="config.json"):
        """A config.json's object -> OlmoConfig, every field checked; errors name `source`."""
        return config_from_dict(cls, d, source)

    @classmethod
    def from_json(cls, path):
        return cls.from_dict(read_json_object(path), path)


# ----------------------------------------------------------------------------------------------------------------
# Norm


class OlmoLayerNorm(nn.Module):
    """LayerNorm with no learnable weight or bias (OLMo 1's choice, for training stability and speed).
    Computed in float32 even for bf16 activations, like transformers, so the statistics keep their
    precision."""

    def __init__(self, hidden_size):
        super().__init__()
        self.normalized_shape = (hidden_size,)

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, eps=1e-5).to(x.dtype)


class OlmoRMSNorm(nn.Module):
    """OLMo 2: RMSNorm with a learned weight (no mean subtraction, no bias). In float32; the weight
    multiplies the float32 result before the cast back, exactly as transformers' Olmo2RMSNorm (the order
    matters in bf16)."""

    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h).to(x.dtype)


class OlmoRMSNormGated(OlmoRMSNorm):
    """Olmo Hybrid: the Gated DeltaNet's output norm, per head: RMSNorm, then times silu(gate). Llama's order
    (cast back, then the weight), as transformers' OlmoHybridRMSNormGated."""

    def forward(self, x, gate):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h.to(x.dtype) * F.silu(gate.float())).to(x.dtype)


def make_norm(config, size=None):
    """A layer's norm over `size` numbers (default hidden_size): OLMo 1's LayerNorm without weights, or the
    RMSNorm of OLMo 2 and every later model. (transformers' OlmoeRMSNorm casts back to bf16 before multiplying
    by the weight; in bf16 that moves a rounding, as the order of a kernel's sums does.)"""
    if config.qk_norm:  # OLMo 2
        return OlmoRMSNorm(size or config.hidden_size, config.rms_norm_eps)
    return OlmoLayerNorm(config.hidden_size)


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE), rotate-half layout
#
# Each head vector is split in two halves (x1, x2); frequency i rotates the pair (x1[i], x2[i]) by the angle
# position * inv_freq[i]. Rotating q and k by their positions makes q.k depend only on the distance between
# them. Scaling stretches a model past the context it was trained on: linear divides every frequency, dynamic
# NTK raises the base once a sequence is longer, YaRN (OLMo 3) interpolates only the slow frequencies.


class OlmoRotaryEmbedding(nn.Module):
    def __init__(self, config, kind="full_attention"):
        super().__init__()
        self.dim = config.head_dim
        self.max_pos = config.max_position_embeddings
        rope = config.rope_parameters[kind]  # kind: the layer type these settings are for
        self.rope_type, self.theta, self.factor = rope["rope_type"], rope["rope_theta"], rope.get("factor", 1.0)
        # Computed on the CPU even when the model is built on the meta device: a few numbers that no
        # checkpoint holds.
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device="cpu").float() / self.dim
        inv_freq = 1.0 / self.theta ** exponents  # (D/2,)
        self.attention_factor = 1.0  # scales cos and sin, hence every attention score by its square
        if self.rope_type == "linear":  # "position interpolation": every position, i.e. frequency, / factor
            inv_freq = inv_freq / self.factor
        elif self.rope_type == "none":  # Olmo Hybrid's NoPE: every angle 0 (cos 1, sin 0), q and k as they are
            inv_freq = inv_freq * 0
        elif self.rope_type == "yarn":  # OLMo 3: YaRN
            inv_freq, self.attention_factor = yarn(self.theta ** exponents, rope, self.dim, self.theta)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("exponents", exponents, persistent=False)

    def forward(self, position_ids):
        """position_ids (B, T) -> cos, sin (B, T, D), float32."""
        inv_freq = self.dynamic_inv_freq(position_ids) if self.rope_type == "dynamic" else self.inv_freq
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # both halves of a pair turn by the same angle
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor

    def dynamic_inv_freq(self, position_ids):
        """Dynamic NTK scaling raises the base once the sequence outgrows the trained context, so
        long-wavelength dimensions interpolate while short ones keep their resolution. Like transformers,
        "the sequence" is the largest position in this call; up to max_position_embeddings this is the
        unscaled base.

        So while decoding past it, each step rotates with new frequencies, but the cached keys keep the ones
        they were rotated with: transformers behaves exactly so, and cached decoding then differs from a full
        forward (the tests check both). Tensor ops only (no .item()), so the decode step compiles into one
        graph."""
        seq_len = position_ids.max() + 1
        stretch = self.factor * seq_len.float() / self.max_pos - (self.factor - 1)
        base = self.theta * stretch ** (self.dim / (self.dim - 2))
        return torch.where(seq_len > self.max_pos, 1.0 / base ** self.exponents, self.inv_freq)


def yarn(wavelengths, s, dim, theta):
    """OLMo 3: YaRN (Peng et al., 2023). Frequencies that turn more than beta_fast times over the original
    context keep their value (extrapolate), those turning fewer than beta_slow times are divided by factor
    (interpolate), with a linear ramp between; attention is sharpened by 0.1 ln(factor) + 1. Arithmetic as in
    transformers. wavelengths (D/2,): theta ** (2i / D); s: the layer type's rope settings."""
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    def correction_dim(rotations):  # the dimension whose frequency turns `rotations` times over the context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    factor, original = s["factor"], s["original_max_position_embeddings"]
    attention_factor = s["attention_factor"]
    if attention_factor is None and s["mscale"] and s["mscale_all_dim"]:
        attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
    elif attention_factor is None:
        attention_factor = mscale(factor)
    low, high = correction_dim(s["beta_fast"]), correction_dim(s["beta_slow"])
    if s["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if high == low else high  # the ramp below divides by high - low
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1: keep the frequency, 0: divide it by factor
    inv_freq = 1.0 / (factor * wavelengths) * (1 - extrapolation) + 1.0 / wavelengths * extrapolation
    return inv_freq, attention_factor


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x, cos, sin):
    """x (B, H or KV, T, D), cos/sin (B, T, D). The product runs in float32, as in transformers."""
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Attention


def causal_mask(query_slots, key_valid, window=None):
    """The one masking rule, for the full forward, prefill and decode alike: key j is visible to the query in
    slot i if j <= i, j holds a real token, and (OLMo 3's sliding layers) i - j < window.

    query_slots (T,): the queries' cache slots; key_valid (B, S) bool, False at padding. Returns (B, 1, T, S)
    bool, True = may attend; or None when that is plain causal attention (the queries are all S slots, none of
    them padding, and no window), which the fused kernel does without a mask. Every query also sees itself, so
    a padding query has one finite score instead of a softmax over nothing (NaN); its output is never used,
    since real tokens never attend to padding."""
    if window is None and len(query_slots) == key_valid.shape[1] and key_valid.all():
        return None
    i = query_slots[:, None]  # (T, 1)
    j = torch.arange(key_valid.shape[1], device=key_valid.device)  # (S,)
    visible = j <= i  # (T, S)
    if window is not None:  # OLMo 3: a sliding-window layer sees only the last `window` keys
        visible = visible & (i - j < window)
    return (visible & key_valid[:, None, None, :]) | (i == j)


class KVCache(nn.Module):
    """Keys and values of every slot so far, (B, KV, S, D), written in place (see setup_cache), in the model's dtype
    but on the CPU in bfloat16: there the cache is float32, holding the bfloat16 keys and values exactly, and
    attention runs in float32 (its scores are summed in float32 either way). torch's CPU attention kernel spends
    ~0.35 ms more per call on one bfloat16 query than on a float32 one (measured on an AMD EPYC, 16 heads of 128:
    0.41 ms against 0.05 over 256 keys, 3.2 against 1.1 over 2048; as fast for 16 queries or more): a tenth of a
    1B model's bfloat16 decode step, and more as the context grows."""

    @staticmethod
    def dtype_for(dtype, device):
        return torch.float32 if device.type == "cpu" and dtype == torch.bfloat16 else dtype

    def __init__(self, batch_size, length, config, dtype, device):
        super().__init__()
        shape = (batch_size, config.num_key_value_heads, length, config.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots, k, v):
        """Write k, v (B, KV, T, D) at slots (T,); return the whole cache."""
        self.k_cache.index_copy_(2, slots, k.to(self.k_cache.dtype))
        self.v_cache.index_copy_(2, slots, v.to(self.v_cache.dtype))
        return self.k_cache, self.v_cache


class OlmoAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        if config.qk_norm:  # OLMo 2: QK-norm over all heads at once keeps attention logits from blowing up
            self.q_norm = make_norm(config, self.num_heads * self.head_dim)
            self.k_norm = make_norm(config, self.num_kv_heads * self.head_dim)
        self.kv_cache = None  # set by OlmoForCausalLM.setup_cache

    def forward(self, x, cos, sin, mask, slots=None):
        """x (B, T, hidden) -> (B, T, hidden). mask (B, 1, T, S) bool, True = may attend; or None: plain
        causal over S = T keys. slots (T,): the cache slots to write k and v to, then attend over the
        cache's first S; None: no cache, attend only within x (S = T)."""
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.config.qk_norm:  # OLMo 2: QK-norm
            q, k = self.q_norm(q), self.k_norm(k)
        if self.config.clip_qkv is not None:  # OLMo-0424+ and OLMoE: bounds activations, stabilising training
            c = self.config.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)
        if slots is not None:  # into the cache, then attend over its first S slots (the mask's width)
            S = T if mask is None else mask.shape[-1]
            k, v = (t[:, :, :S] for t in self.kv_cache.update(slots, k, v))  # (B, KV, S, D)
            q = q.to(k.dtype)  # the cache's (see KVCache)
        # One fused kernel for softmax(q k^T / sqrt(D) + mask) v (without a mask: the causal kernel, which
        # skips the masked half). enable_gqa lets each group of query heads share a key/value head, no copies.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.config.attention_dropout if self.training else 0.0,
            is_causal=mask is None, enable_gqa=self.num_kv_heads != self.num_heads)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim).to(x.dtype)
        return self.o_proj(y)


# ----------------------------------------------------------------------------------------------------------------
# Olmo Hybrid: Gated DeltaNet (linear attention)
#
# Instead of keeping every key and value, a Gated DeltaNet head keeps one matrix S (dk, dv), a memory that maps
# keys to values, and updates it once per token (Yang, Kautz and Hatamizadeh, 2024, "Gated Delta Networks",
# https://arxiv.org/abs/2412.06464, eq. 10): it fades (the gate), then moves its answer for the token's key
# toward the token's value (the delta rule); the output reads it with the query.
#     S = exp(g_t) S                              g_t <= 0, the decay: -exp(A_log) softplus(a_proj(x) + dt_bias)
#     S = S + k_t (beta_t (v_t - S^T k_t))^T      beta_t = sigmoid(b_proj(x)), doubled by linear_allow_neg_eigval
#     o_t = S^T q_t
# A step costs the same at any length, and the state (with the convolution's last inputs) is all the next
# step needs: no KV cache for these layers.


def gated_delta_rule(q, k, v, g, beta, state):
    """The recurrence, one token at a time. q, k (B, Hv, T, dk) unit vectors (q also times dk^-1/2),
    v (B, Hv, T, dv), g and beta (B, Hv, T), state (B, Hv, dk, dv) -> outputs (B, Hv, T, dv), final state."""
    outputs = []
    for t in range(q.shape[2]):
        state = state * g[:, :, t, None, None].exp()
        k_t = k[:, :, t, :, None]  # (B, Hv, dk, 1)
        error = v[:, :, t, None, :] - k_t.transpose(-1, -2) @ state  # (B, Hv, 1, dv): the value minus S's answer
        state = state + k_t @ (beta[:, :, t, None, None] * error)
        outputs.append(q[:, :, t, None, :] @ state)  # (B, Hv, 1, dv)
    return torch.cat(outputs, dim=2), state


def chunked_gated_delta_rule(q, k, v, g, beta, state, chunk=64):
    """The same recurrence (same arguments, same results up to rounding), `chunk` tokens at a time: a few
    matrix products per chunk instead of a step per token, for prompts (Yang et al., section 3.3).

    Within a chunk starting from state S, let c_t = g_1 + ... + g_t and D[t, s] = exp(c_t - c_s), the decay
    from token s to token t (s <= t). Unrolling the recurrence gives
        S_t = exp(c_t) S + sum_{s <= t} D[t, s] k_s u_s^T,    u_t = beta_t (v_t - (S before token t)^T k_t)
    so the chunk's corrections u (C, dv) solve one unit lower-triangular system,
        (I + A) u = beta (v - exp(c) k S),    A[t, s] = beta_t D[t, s] k_t . k_s for s < t,
    and then o_t = exp(c_t) S^T q_t + sum_{s <= t} D[t, s] (q_t . k_s) u_s; the next chunk starts from S_C."""
    outputs = []
    for start in range(0, q.shape[2], chunk):
        q_c, k_c, v_c, g_c, beta_c = (x[:, :, start:start + chunk] for x in (q, k, v, g, beta))
        c = g_c.cumsum(-1)  # (B, Hv, C)
        D = (c[..., :, None] - c[..., None, :]).exp().tril()  # (B, Hv, C, C); above the diagonal: 0
        A = k_c @ k_c.transpose(-1, -2) * D * beta_c[..., None]  # (B, Hv, C, C)
        rhs = beta_c[..., None] * (v_c - c.exp()[..., None] * k_c @ state)  # (B, Hv, C, dv)
        # unitriangular: the solver reads A only below the diagonal and takes the diagonal as 1, i.e. I + A
        u = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)  # (B, Hv, C, dv)
        outputs.append(c.exp()[..., None] * q_c @ state + (q_c @ k_c.transpose(-1, -2) * D) @ u)
        k_decayed = (c[..., -1:] - c).exp()[..., None] * k_c  # each key decayed to the chunk's end
        state = c[..., -1:, None].exp() * state + k_decayed.transpose(-1, -2) @ u
    return torch.cat(outputs, dim=2), state


class OlmoGatedDeltaNet(nn.Module):
    """Olmo Hybrid's token mixer in its "linear_attention" layers. q, k and v pass a short causal convolution
    (each channel sees its last linear_conv_kernel_dim inputs); each of the Hv value heads has its own state
    and shares q and k with the Hv / Hk heads beside it (as GQA shares keys). The output is normalised per
    head and gated."""

    def __init__(self, config):
        super().__init__()
        C, Hk, Hv = config.hidden_size, config.linear_num_key_heads, config.linear_num_value_heads
        self.Hk, self.Hv, self.dk, self.dv = Hk, Hv, config.linear_key_head_dim, config.linear_value_head_dim
        self.q_proj = nn.Linear(C, Hk * self.dk, bias=False)
        self.k_proj = nn.Linear(C, Hk * self.dk, bias=False)
        self.v_proj = nn.Linear(C, Hv * self.dv, bias=False)
        self.a_proj = nn.Linear(C, Hv, bias=False)  # the decay's part that depends on the token
        self.b_proj = nn.Linear(C, Hv, bias=False)  # beta, the delta rule's step size
        self.g_proj = nn.Linear(C, Hv * self.dv, bias=False)  # the output gate
        self.o_proj = nn.Linear(Hv * self.dv, C, bias=False)
        channels = 2 * Hk * self.dk + Hv * self.dv  # q, k and v side by side
        self.conv1d = nn.Conv1d(channels, channels, config.linear_conv_kernel_dim, groups=channels, bias=False)
        self.A_log = nn.Parameter(torch.zeros(Hv))  # per head, the decay's scale (log) and bias; zeros: fresh
        self.dt_bias = nn.Parameter(torch.zeros(Hv))
        self.o_norm = OlmoRMSNormGated(self.dv, 1e-5)  # transformers' fixed epsilon, not rms_norm_eps
        self.act_fn = ACT2FN[config.hidden_act]  # after the convolution
        self.beta_scale = 2.0 if config.linear_allow_neg_eigval else 1.0
        self.state = None  # while generating: (the convolution's last K - 1 inputs, S); see prefill

    def forward(self, x, cos, sin, mask, slots=None):
        """x (B, T, hidden) -> (B, T, hidden), the signature of OlmoAttention's; cos and sin unused (the order
        of tokens is in the recurrence). mask (B, T) bool: False at padding. slots not None: continue from
        self.state and keep the new one (generation); None: start from zeros, keep nothing."""
        B, T, _ = x.shape
        x = x * mask[..., None]  # left padding becomes zeros: then it writes nothing (k = 0), the conv sees 0s
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1).transpose(1, 2)
        if slots is not None and self.state is not None:
            conv, state = self.state
        else:  # zeros, as before a sequence's first token
            conv = qkv.new_zeros(B, qkv.shape[1], self.conv1d.kernel_size[0] - 1)
            state = qkv.new_zeros(B, self.Hv, self.dk, self.dv, dtype=torch.float32)
        window = torch.cat([conv, qkv], dim=-1)  # (B, channels, K - 1 + T): each output sees its K inputs
        qkv = self.act_fn(F.conv1d(window, self.conv1d.weight, groups=qkv.shape[1])).transpose(1, 2)
        q, k, v = qkv.float().split([self.Hk * self.dk, self.Hk * self.dk, self.Hv * self.dv], dim=-1)
        q = q.view(B, T, self.Hk, self.dk).transpose(1, 2).repeat_interleave(self.Hv // self.Hk, dim=1)
        k = k.view(B, T, self.Hk, self.dk).transpose(1, 2).repeat_interleave(self.Hv // self.Hk, dim=1)
        v = v.view(B, T, self.Hv, self.dv).transpose(1, 2)  # (B, Hv, T, dv); q and k (B, Hv, T, dk)
        q = q * torch.rsqrt((q * q).sum(-1, keepdim=True) + 1e-6) * self.dk ** -0.5  # unit length, then scaled
        k = k * torch.rsqrt((k * k).sum(-1, keepdim=True) + 1e-6)
        beta = (self.b_proj(x).sigmoid() * self.beta_scale).float().transpose(1, 2)  # (B, Hv, T)
        g = (-self.A_log.float().exp() * F.softplus(self.a_proj(x).float() + self.dt_bias)).transpose(1, 2)
        rule = gated_delta_rule if T == 1 else chunked_gated_delta_rule
        y, state = rule(q, k, v, g, beta, state)  # (B, Hv, T, dv)
        if slots is not None:
            self.state = (window[..., T:], state)
        y = self.o_norm(y.transpose(1, 2).to(x.dtype), self.g_proj(x).view(B, T, self.Hv, self.dv))
        return self.o_proj(y.reshape(B, T, self.Hv * self.dv))


# ----------------------------------------------------------------------------------------------------------------
# MLP

# The MLP gate's activations, by the names config.json uses (transformers' ACT2FN).
ACT2FN = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
          "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}


class OlmoMLP(nn.Module):
    """Gated MLP (SwiGLU with silu): down(act(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class OlmoeSparseMoeBlock(nn.Module):
    """OLMoE: a mixture of experts in the MLP's place. A router scores the experts for each token; the token
    goes through its top num_experts_per_tok (each expert an OlmoMLP), and their outputs are summed, weighted
    by the router's probabilities (rescaled to sum to 1 if norm_topk_prob). Only the chosen experts' weights
    are read: OLMoE-1B-7B holds 64 experts per layer and runs 8 per token, 1.3B of its 6.9B parameters. Each
    token is routed on its own, so padding can't change a real token's experts."""

    def __init__(self, config):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(OlmoMLP(config) for _ in range(config.num_experts))

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B * T, C)  # (N, hidden): the tokens, each routed on its own
        self.router_logits = self.gate(x)  # (N, experts), kept for the load-balancing loss
        probs = self.router_logits.float().softmax(dim=-1)  # float32 whatever the model's dtype, as transformers
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, top_k): each token's best experts, best first
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        y = torch.zeros_like(x)
        for e in chosen.unique().tolist():  # only the experts some token chose
            token, k = torch.where(chosen == e)  # the tokens that chose expert e, as their k-th choice
            y[token] += self.experts[e](x[token]) * weights[token, k, None]  # a token picks e at most once
        return y.view(B, T, C)


# ----------------------------------------------------------------------------------------------------------------
# Block


class OlmoDecoderLayer(nn.Module):
    """A residual block. OLMo 1 normalises each sublayer's input (pre-norm); OLMo 2 and 3 normalise its
    output, before the residual add, so the residual stream itself is never rescaled (their stability fix):

        OLMo 1 (OLMoE)                                OLMo 2 and 3 (FlexOlmo)
        x = x + attn(input_layernorm(x))              x = x + post_attention_layernorm(attn(x))
        x = x + mlp(post_attention_layernorm(x))      x = x + post_feedforward_layernorm(mlp(x))

    OLMoE and FlexOlmo: mlp is a mixture of experts (OlmoeSparseMoeBlock). Olmo Hybrid: its attention layers
    are OLMo 3's; its Gated DeltaNet layers ("linear_attention") put their norms where OLMo 1 puts its own:
    x = x + linear_attn(input_layernorm(x)), and the MLP likewise."""

    def __init__(self, config, kind="full_attention"):
        super().__init__()
        linear = kind == "linear_attention"  # Olmo Hybrid
        self.norm_after = config.norm_after and not linear
        self.mixer = "linear_attn" if linear else "self_attn"  # the token mixer's name in checkpoints
        self.add_module(self.mixer, OlmoGatedDeltaNet(config) if linear else OlmoAttention(config))
        self.mlp = OlmoeSparseMoeBlock(config) if config.moe else OlmoMLP(config)  # OLMoE: experts
        if self.norm_after:  # OLMo 2: norms after the sublayers, none before
            self.post_attention_layernorm = make_norm(config)
            self.post_feedforward_layernorm = make_norm(config)
            return
        self.input_layernorm = make_norm(config)
        self.post_attention_layernorm = make_norm(config)

    def forward(self, x, cos, sin, mask, slots=None):
        attn = getattr(self, self.mixer)  # Olmo Hybrid: self_attn or linear_attn
        if self.norm_after:  # OLMo 2: normalise each sublayer's output
            x = x + self.post_attention_layernorm(attn(x, cos, sin, mask, slots))
            return x + self.post_feedforward_layernorm(self.mlp(x))
        x = x + attn(self.input_layernorm(x), cos, sin, mask, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------------------------
# Model


class OlmoModel(nn.Module):
    """Token ids -> final hidden states (B, T, hidden)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        # _weight: uninitialised (the checkpoint or _init_weights fills it); nn.Embedding's own init is slow
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(OlmoDecoderLayer(config, kind) for kind in config.layer_types)
        self.norm = make_norm(config)
        # Per layer type, a RoPE and a mask window: "full_attention" sees every earlier key; OLMo 3 adds
        # "sliding_attention", which sees the last sliding_window keys (and RoPE scaling leaves alone)
        self.rotary_emb = nn.ModuleDict({kind: OlmoRotaryEmbedding(config, kind) for kind in config.rope_parameters})
        self.windows = {"full_attention": None, "sliding_attention": config.sliding_window}

    def forward(self, input_ids, position_ids, key_valid, slots=None):
        """input_ids, position_ids (B, T) -> hidden states (B, T, hidden). key_valid (B, S) bool: which key
        slots hold real tokens (False at left padding). slots (T,): the KV cache slots these tokens are
        written to and attend from; None: no cache, the tokens attend among themselves (S = T)."""
        # without a cache, the tokens are slots 0..T-1
        query_slots = torch.arange(input_ids.shape[1], device=input_ids.device) if slots is None else slots
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        # RoPE tables and masks once per layer type, shared by every layer of that type
        rope = {kind: emb(position_ids) for kind, emb in self.rotary_emb.items()}
        masks = {kind: causal_mask(query_slots, key_valid, self.windows[kind]) for kind in rope}
        # Olmo Hybrid: a Gated DeltaNet layer has no RoPE and needs to know only which tokens are padding
        rope["linear_attention"] = (None, None)
        masks["linear_attention"] = key_valid[:, query_slots]  # (B, T)
        for layer, kind in zip(self.layers, self.config.layer_types):
            x = layer(x, *rope[kind], masks[kind], slots)
        return self.norm(x)


def load_balancing_loss_func(router_logits, attention_mask, top_k):
    """OLMoE: Switch Transformer's auxiliary loss (Fedus et al., 2021, eq. 4-6), least when the tokens spread
    evenly over the experts: num_experts * sum over experts e of f_e P_e, where f_e is the share of (token,
    choice) pairs that went to e and P_e the mean router probability of e, both over every layer's real tokens
    (padding left out), as transformers computes it. router_logits: one (B*T, experts) per layer."""
    mask = attention_mask.reshape(1, -1, 1).float()  # (1, N, 1)
    probs = torch.stack(router_logits).softmax(dim=-1)  # (layers, N, experts)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, probs.shape[-1]).sum(-2)  # 1 where chosen, else 0
    rows = mask.sum() * len(router_logits)
    f = (chosen * mask).sum((0, 1)) / rows  # (experts,)
    P = (probs.float() * mask).sum((0, 1)) / rows
    return probs.shape[-1] * (f * P).sum()


def positions_from_mask(attention_mask):
    """attention_mask (B, T) of 1/0 -> RoPE positions (B, T): left padding doesn't count, so a padded row gets
    the positions it would have alone (what transformers' generate computes too)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def check_ids(input_ids, vocab_size):
    """Token ids outside the vocabulary would index past the embedding (in NumPy, wrap around): refuse
    them."""
    bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)]
    if len(bad):
        raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})")


class OlmoForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = OlmoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.cached_ids = []  # the tokens whose keys and values the cache holds (see reuse_prefix)
        self.kept_states = {}  # Olmo Hybrid: {tokens fed: each Gated DeltaNet layer's state} (see reuse_prefix)
        if not self.lm_head.weight.is_meta:  # on the meta device (from_pretrained) there is nothing to fill
            self.apply(self._init_weights)

    def _init_weights(self, module):  # transformers' init, for fresh models (tests, training from scratch)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()

    def forward(self, input_ids, attention_mask=None, labels=None, output_router_logits=None):
        """The full forward, no cache: input_ids (B, T), attention_mask (B, T) 1 = token, 0 = left padding.
        Returns logits (B, T, vocab); with labels (B, T) returns (logits, loss), where loss is the mean
        cross-entropy of predicting token t+1 from positions <= t, over labels that aren't -100 (as
        transformers). OLMoE: with output_router_logits (None: the config's), the loss adds
        router_aux_loss_coef times the router's load-balancing loss. Logits at padding positions are
        meaningless."""
        check_ids(input_ids, self.config.vocab_size)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids, positions_from_mask(attention_mask), attention_mask.bool())
        logits = self.lm_head(hidden)
        if labels is None:
            return logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        if output_router_logits is None:  # OLMoE
            output_router_logits = self.config.output_router_logits
        if self.config.moe and output_router_logits:  # OLMoE
            router_logits = [layer.mlp.router_logits for layer in self.model.layers]
            aux = load_balancing_loss_func(router_logits, attention_mask, self.config.num_experts_per_tok)
            loss = loss + self.config.router_aux_loss_coef * aux
        return logits, loss

    # ------------------------------------------------------------------------------------------------------------
    # Generation
    #
    # Generation runs in two steps, as in gpt-fast: prefill pushes the prompt through once, filling the
    # cache; then decode_one_token feeds one token per step, attending to the cache. Cache slot s holds the
    # s-th token of the (left-padded) batch row; its RoPE position is s minus the row's padding.

    def mixers(self, name):
        """The layers' token mixers of one kind: "self_attn" (attention) or, Olmo Hybrid, "linear_attn"."""
        return [getattr(layer, name) for layer in self.model.layers if layer.mixer == name]

    def setup_cache(self, attention_mask, length):
        """Make room for `length` slots for attention_mask's batch (B, T), keeping what the cache holds;
        key_valid (B, S): which slots hold real tokens (not the prompt's padding). The cache grows to, and compiled
        steps attend over, S = `length` rounded up to a power of two (at least 256): a static shape per doubling
        (as torch.compile and CUDA graphs need), at most twice what is filled; a large max_new_tokens costs nothing
        until its tokens are produced."""
        B = attention_mask.shape[0]
        width = max(256, 1 << (length - 1).bit_length())
        self.key_valid = F.pad(attention_mask.bool(), (0, width - attention_mask.shape[1]), value=True)
        weight = self.model.embed_tokens.weight  # the cache goes by the model's dtype and device (not the head's:
        # it may be int8)
        dtype = KVCache.dtype_for(weight.dtype, weight.device)
        attns = self.mixers("self_attn")  # Olmo Hybrid: not its Gated DeltaNet layers, which keep a state
        cache = attns[0].kv_cache
        k = None if cache is None else cache.k_cache  # (B, KV, S, D)
        same = k is not None and (k.shape[0], k.dtype, k.device) == (B, dtype, weight.device)
        filled = k.shape[2] if same else 0  # a new batch size, dtype or device keeps nothing
        if width <= filled:
            return
        self.cached_ids = self.cached_ids if same else []
        self.slots = torch.arange(width, device=weight.device)
        try:
            for attn in attns:
                old = attn.kv_cache
                attn.kv_cache = None  # free before allocating
                new = KVCache(B, width, self.config, dtype, weight.device)
                if filled:
                    new.k_cache[:, :, :filled], new.v_cache[:, :, :filled] = old.k_cache, old.v_cache
                attn.kv_cache = new
        except BaseException as e:  # out of memory, or Ctrl-C (the chat stops a prefill at once): keep no cache
            for attn in attns:
                attn.kv_cache = None
            if isinstance(e, (RuntimeError, MemoryError)):  # torch reports a failed allocation as a RuntimeError
                raise MemoryError(f"out of memory growing the KV cache to {width} tokens") from e
            raise

    def prefill(self, input_ids, attention_mask, start=0):
        """input_ids, attention_mask (B, T), cache slots < start already filled -> the last position's logits
        (B, vocab)."""
        T = input_ids.shape[1]
        positions = positions_from_mask(attention_mask)[:, start:]
        if start == 0:  # Olmo Hybrid: the Gated DeltaNet layers start from zeros (else see reuse_prefix)
            for layer in self.mixers("linear_attn"):
                layer.state = None
        # keys past T are later than every query here: attend over the first T slots only
        hidden = self.model(input_ids[:, start:], positions, self.key_valid[:, :T], self.slots[start:T])
        return self.lm_head(hidden[:, -1])  # the vocab projection only where we sample: (B, vocab)

    def decode_one_token(self, token, slot, position_ids):
        """token, position_ids (B, 1); slot (1,) the cache slot -> logits (B, vocab).

        Run as it is, the step attends over the filled slots only (as the NumPy twin's): attention reads every slot
        it is given, masked or not, and the cache's empty ones come from memory, not from a CPU cache (over the
        whole cache, at least 256 slots, an OLMo 2 1B model's CPU steps at short contexts took 6-7% longer).
        Compiled, it attends over the whole cache: one static shape per size of the cache."""
        filled = self.key_valid if torch.compiler.is_compiling() else self.key_valid[:, :int(slot[0]) + 1]
        hidden = self.model(token, position_ids, filled, slot)
        return self.lm_head(hidden[:, -1])

    def reuse_prefix(self, input_ids, attention_mask):
        """A chat's next turn sends the whole conversation again: prefill only what is new.

        Returns (start, keep_up_to): the cache's slots before `start` already hold input_ids' keys and
        values, so prefill starts there; generate records this call's tokens in self.cached_ids while they
        are fewer than keep_up_to (0: none).

        What it keeps: for a one-row batch, the longest prefix shared with the tokens the cache holds (the
        last call's prompt and reply), but not the last prompt token, whose logits prefill must produce. A
        slot's keys and values depend only on the tokens up to it, so this gives exactly what starting
        afresh gives.

        When it can't: a batch of several rows, or with padding (a row's slots then depend on the other
        rows' lengths); and dynamic RoPE past the trained length, whose frequencies change with each call's
        length: there it keeps only calls and tokens within max_position_embeddings.

        Olmo Hybrid: a Gated DeltaNet layer's state sums up every token before it, so unlike keys and values
        it can't be cut back to a shorter prefix. generate keeps the states at two points of the last call
        (kept_states): the end of its prompt, and the end of what it fed after it (the reply but its last
        token, never fed). A chat's next prompt extends that reply (then a turn costs only its new tokens) or
        at least the last prompt (a chat template may write the reply back differently: then the reply is
        read again), so a turn's cost doesn't grow with the conversation, and the states are exactly those of
        recomputing. `start` moves back to the latest kept point at or before it."""
        B, T = input_ids.shape
        keep_up_to = self.config.max_position_embeddings if self.config.dynamic_rope else math.inf
        if B > 1 or not attention_mask.all() or T > keep_up_to:
            self.cached_ids = []
            return 0, 0
        start, ids = 0, input_ids[0].tolist()
        while start < min(T - 1, len(self.cached_ids)) and ids[start] == self.cached_ids[start]:
            start += 1
        if self.mixers("linear_attn"):  # Olmo Hybrid: back to the latest kept states, 0 (zeros) if none
            start = max((n for n in self.kept_states if n <= start), default=0)
            for layer, state in zip(self.mixers("linear_attn"), self.kept_states.get(start, [])):
                layer.state = state
        self.cached_ids = self.cached_ids[:start]  # slots from start on are about to be overwritten
        return start, keep_up_to

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_token_id=None,
                 attention_mask=None, generator=None, callback=None):
        """input_ids (B, T), left-padded when prompts differ in length (attention_mask 0 on padding).
        Returns (B, T + n) prompt + new tokens, n <= max_new_tokens: generation ends when every row has
        produced an EOS (rows that finish early are filled with pad_token_id after it, as in transformers).
        temperature=0 is greedy; callback(tokens (B,)) is called with each step's tokens (for streaming).
        A one-row call after another prefills only what is new (a chat's next turn: see reuse_prefix)."""
        check_ids(input_ids, self.config.vocab_size)
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = torch.tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long,
                           device=input_ids.device).reshape(-1)  # an int or a list of ints
        pad = self.config.pad_token_id
        if pad is None:  # as transformers: the first EOS id, else 0
            pad = int(eos[0]) if len(eos) else 0
        self.setup_cache(attention_mask, T + 1)
        start, keep_up_to = self.reuse_prefix(input_ids, attention_mask)
        next_position = attention_mask.sum(-1, keepdim=True)  # (B, 1): RoPE position of the first new token
        tokens = [input_ids]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        if max_new_tokens > 0:
            logits = self.prefill(input_ids, attention_mask, start)
            if T <= keep_up_to:  # the cache holds the prompt now: record it for the next call
                self.cached_ids = input_ids[0].tolist()
                self.kept_states = {T: [layer.state for layer in self.mixers("linear_attn")]}  # Olmo Hybrid
        for i in range(max_new_tokens):
            check_finite(logits, i)
            token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            token = token.masked_fill(finished, pad)
            tokens.append(token[:, None])
            if callback is not None:
                callback(token)
            if len(eos):
                finished |= torch.isin(token, eos)
                if finished.all():
                    break
            if i + 1 < max_new_tokens:
                if T + i + 1 > self.key_valid.shape[1]:
                    self.setup_cache(attention_mask, T + i + 1)
                # the slot as a view of self.slots: a new tensor per step would be a host-to-device copy
                logits = self.decode_one_token(token[:, None], self.slots[T + i:T + i + 1], next_position + i)
                if T + i < keep_up_to:  # slot T + i now holds this token
                    self.cached_ids.append(int(token[0]))
        fed = T + len(tokens) - 2  # Olmo Hybrid: the states hold every token but the last sampled (never fed)
        if max_new_tokens > 0 and self.cached_ids and len(self.cached_ids) == fed:
            self.kept_states[fed] = [layer.state for layer in self.mixers("linear_attn")]
        return torch.cat(tokens, dim=1)

    # ------------------------------------------------------------------------------------------------------------
    # Loading (the readers are in the Loading section below the class)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, quantize=None, pack=False):
        """Load a checkpoint directory as the hub ships it (config.json + safetensors or pytorch_model.bin,
        single or sharded). A hub id such as "allenai/OLMo-1B-hf" is the command line's business: `python olmo.py
        --model allenai/OLMo-1B-hf` downloads it (cli.fetch_checkpoint, which returns the directory), as does
        `hf download allenai/OLMo-1B-hf`. dtype None keeps the checkpoint's own (config.json's dtype or
        torch_dtype), as transformers 5 does. quantize "int8": every linear layer's weight, the head's included, as
        8-bit integers (see Int8Linear). pack=True, on an x86 CPU in float32 or bfloat16 (unquantized): every linear
        layer becomes a PackedLinear, its weight in oneDNN's layout (bfloat16) or NumPy's (float32: then torch runs on
        one thread, NumPy's BLAS on all), 1.5-2x faster decoding (the command line packs unless --compile); such a
        model can't be moved, trained or compiled, nor saved in bfloat16 (its state_dict holds opaque tensors:
        torch.save and safetensors refuse them), so it is not the default. A tied head gets a packed copy of the
        embedding in bfloat16 (the embedding stays as it is, for the lookup), the embedding itself in float32."""
        config = OlmoConfig.from_json(os.path.join(path, "config.json"))
        dtype = dtype or getattr(torch, config.dtype or "float32")
        with torch.device("meta"):  # shapes only: no memory, no random init of billions of weights
            model = cls(config)
        state_dict = {}  # every tensor of the checkpoint, memory-mapped (pages read on demand, never copied)
        for name in weight_files(path):
            state_dict.update(load_file(os.path.join(path, name)))
        if "linear_attention" in config.layer_types:  # Olmo Hybrid
            state_dict = join_hub_layout(state_dict)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:  # tied checkpoints may or may not store lm_head.weight (a copy)
            state_dict.pop("lm_head.weight", None)
            del expected["lm_head.weight"]
        check_state_dict(state_dict, expected)
        if quantize == "int8":  # the linear layers' weights leave state_dict, as int8 in the model
            quantize_int8(model, state_dict, device)
        for name, tensor in state_dict.items():
            state_dict[name] = tensor.to(device=device, dtype=dtype)  # a no-op if they already match
        model.load_state_dict(state_dict, strict=False, assign=True)  # checked above, with clearer errors
        if config.tie_word_embeddings and not quantize:
            model.lm_head.weight = model.model.embed_tokens.weight
        cpu = torch.device(device or "cpu").type == "cpu"
        if pack and cpu and not quantize and PackedLinear.packs(dtype):
            del state_dict  # bfloat16: each weight leaves memory as its packed copy replaces it (kept, its mapped
            # pages would stay: a 1B model's load peak 5.1 GB against 3.0); float32 weights stay as they are
            for name in [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]:
                model.set_submodule(name, PackedLinear(model.get_submodule(name)))
            # inference only: oneDNN's product has no gradient (with one asked of it, torch warns and returns
            # wrong ones), NumPy's none at all; without parameters that ask, backward() fails instead of lying
            model.requires_grad_(False)
            if dtype == torch.float32:  # NumPy runs the products on threads of its own: torch's, spinning between
                torch.set_num_threads(1)  # its ops, would take the cores from them (see PackedLinear)
        model.model.rotary_emb.to(device or "cpu")  # its buffers aren't in the checkpoint: built on the CPU
        return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Generation: sampling, beside its caller OlmoForCausalLM.generate above


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, vocab) -> next tokens (B,). temperature 0 is greedy; otherwise scale by 1/temperature, keep
    the top_k logits (ties with the k-th included; 0 or None: all), then the smallest set of tokens whose
    probability reaches top_p."""
    if temperature == 0:  # (in float32: torch's CPU argmax over bfloat16 takes 5x as long, 0.33 ms at 100k)
        return logits.float().argmax(dim=-1)
    # Subtract the max before scaling, so a tiny temperature sends the others to -inf instead of the max to
    # inf (inf - inf = NaN); below 1e-30, 1/t no longer fits float32, and the distribution is one-hot anyway.
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / max(temperature, 1e-30)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
        # drop a token when the more likely ones before it already reach top_p (so the top token always stays)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop_sorted[:, 0] = False  # and keep it when top_p is below float32's range (1e-46 rounds to 0)
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, -math.inf)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]


def check_finite(logits, step):
    """logits (B, vocab) holding NaN or infinity (corrupt weights, or activations past the dtype's range) would
    sample garbage, or make sampling fail: stop, naming the step. One max per step is all it costs: NaN and
    +inf carry through a max, and all -inf leaves it -inf."""
    top = logits.max(dim=-1).values
    if not torch.isfinite(top).all():
        kind = "NaN" if top.isnan().any() else "infinite"
        raise ValueError(f"the model produced {kind} logits at token {step + 1}: are the weights corrupt?")


# ----------------------------------------------------------------------------------------------------------------
# Loading


def join_hub_layout(state_dict):
    """Olmo Hybrid: its checkpoints name the Gated DeltaNet layers' norms as OLMo-core does (attention_layer_norm,
    feedforward_layer_norm) and store their convolution in three parts, q_conv1d, k_conv1d and v_conv1d (the
    hub's: q's, k's and v's channels; transformers 5's save_pretrained: three equal thirds). As transformers'
    loader: rename, join the parts in that order (their joined shape is checked with the rest), and drop the
    multi-token-prediction tensors (mtp.*), which generation doesn't use."""
    renamed = {}
    for name, tensor in state_dict.items():
        name = name.replace(".attention_layer_norm.", ".input_layernorm.")
        if not name.startswith("mtp."):
            renamed[name.replace(".feedforward_layer_norm.", ".post_attention_layernorm.")] = tensor
    for name in [name for name in renamed if name.endswith(".q_conv1d.weight")]:
        prefix = name.removesuffix("q_conv1d.weight")
        parts = [renamed.pop(f"{prefix}{part}_conv1d.weight", None) for part in "qkv"]
        if any(part is None or part.shape[1:] != parts[0].shape[1:] for part in parts):
            raise ValueError(f"checkpoint has {name} but no k_conv1d and v_conv1d of its kernel size beside it")
        renamed[f"{prefix}conv1d.weight"] = torch.cat(parts)
    return renamed


def weight_files(path):
    """The checkpoint's weight files: model.safetensors, pytorch_model.bin, or the shards their index
    lists."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.exists(os.path.join(path, index)):
            weight_map = read_json_object(os.path.join(path, index)).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: weight_map must be an object mapping tensor names to files")
            if not all(isinstance(f, str) and f and os.path.basename(f) == f for f in weight_map.values()):
                raise ValueError(f"{index}: weight_map values must be file names in {path}")
            return sorted(set(weight_map.values()))
        if os.path.exists(os.path.join(path, single)):
            return [single]
    raise ValueError(f"{path} has no model.safetensors or pytorch_model.bin")


def read_json_object(path, limit=2**27):
    """A JSON object from a regular file of at most `limit` bytes (128 MiB: config files are kilobytes, index
    files a few megabytes). A FIFO would wait forever for a writer and /dev/zero never ends: refused unread
    (O_NONBLOCK lets even a FIFO's open return at once; the checks look at what was opened)."""
    with open_regular_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise ValueError(f"{path} is {size / 1e6:,.0f} MB, far more than a JSON file of a checkpoint holds (at "
                             f"most {limit / 1e6:,.0f} MB is read)")
        data = f.read(limit + 1)
    try:
        d = json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return d


def open_regular_file(path):
    """path opened for reading if it is a regular file (or a link to one, as in the hub's cache); a FIFO, a device
    or a directory named like a checkpoint file is refused before anything waits on it or reads it forever."""
    try:
        f = open(os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)), "rb")
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise ValueError(f"{path} is not a regular file (a FIFO, a device or a directory)")
    return f


def load_file(file):
    open_regular_file(file).close()  # refused unread if it isn't one
    try:
        if file.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(file, "pt") as f:
                names = list(f.keys())
            # each tensor memory-mapped on its own, the mapping closed when the tensor is freed: a tensor replaced
            # by its copy in another dtype or layout, or by int8, leaves memory (one mapping would keep them all)
            return {name: safe_open(file, "pt").get_tensor(name) for name in names}
        # weights_only: a .bin is a pickle, and unpickling arbitrary objects can run arbitrary code
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"cannot read {file}: it holds Python objects besides tensors, which are not loaded "
                         "(unpickling them could run code)") from None
    except Exception as e:
        message = str(e).strip() or repr(e)  # its first line; the exception's type if it has no text
        raise ValueError(f"cannot read {file}: {message.splitlines()[0]}") from None


def check_state_dict(state_dict, expected):
    """Names, shapes and kinds must match exactly: a wrong checkpoint must fail loudly, naming the tensor."""
    for name, shape in expected.items():
        if name not in state_dict:
            raise ValueError(f"checkpoint is missing tensor {name}")
        if state_dict[name].shape != shape:
            raise ValueError(f"tensor {name} has shape {tuple(state_dict[name].shape)}, expected {tuple(shape)}")
        if not state_dict[name].is_floating_point():  # casting integers to floats would silently run garbage
            raise ValueError(f"tensor {name} has dtype {state_dict[name].dtype}; weights must be floating point")
    for name in state_dict:
        if name not in expected:
            raise ValueError(f"checkpoint has unexpected tensor {name}")


class PackedLinear(nn.Module):
    """An nn.Linear for an x86 CPU, its weight laid out once for the fastest kernel found for one row of input: the
    one place that picks the CPU's float kernel. Measured on an AMD EPYC (Zen 5, AVX-512, AVX512_BF16), at the OLMo 2
    1B shape (BENCHMARKS.md):
    - bfloat16: oneDNN, the weight reordered once into its blocked layout. torch's F.linear multiplies with oneDNN
      too, but reorders the weight on every call: a product streams the weight at 17 GB/s per core so, 29-36
      packed; a decode step takes 95 ms against 189 on one core, prompts as long as before; the products are
      bit-identical.
    - float32: NumPy's BLAS (OpenBLAS), on the weight as loaded (see below). torch's F.linear is MKL's, which
      takes a slow path on AMD CPUs and runs one row on one thread (21-26 GB/s); oneDNN's packed product streams
      34-48 GB/s, OpenBLAS's 45-59 on two threads. In one process, alternating: a decode step 88-124 ms against
      oneDNN's 116-156. Prompts: 512 rows at once run at 450 GFLOP/s against oneDNN's 372 (with OpenBLAS's own
      choice of kernel; forced to its Haswell kernel, as OPENBLAS_CORETYPE=Haswell does, 210-250), but a few rows
      at once are slower, 13-15 GB/s for 4 to 16 rows against oneDNN's 21-31 (a 16-token prompt 0.6x llama.cpp's
      speed, against 1.0x): one row per generated token is what most of the time goes to. NumPy runs the
      products on threads of its own, so a float32 model sets torch's to 1 (see from_pretrained): the threads of
      both wait for work spinning, and with two of each on two cores a decode step took 264 ms. The weight
      stays where loading put it, in the checkpoint's memory mapping for a float32 file, as the NumPy twin reads
      its weights: no copy (a 1B model loads in 0.04 s against 1.2 with one, at 0.88x the weights' bytes against
      1.00x), and no slower (decoding in 0.92-0.99x the twin's time in three bench runs, 0.80-0.97x with a copy;
      NumPy's own arrays, which ask Linux for huge pages, streamed 3-10% faster, but filling 6 GB took 7-10 s).
    The packed bfloat16 weight is opaque (no strides, no .to(), not savable); either is a buffer, so not trained,
    and torch.compile can't lower the products: from_pretrained packs only when asked (pack=True; the command line
    does, unless --compile). (float16: oneDNN packs it only on CPUs with AVX512_FP16 or AVX-NE-CONVERT, which that
    one lacks: left to F.linear. Arm CPUs keep F.linear too: not measured there.)"""

    @staticmethod
    def packs(dtype):
        """Whether this CPU has a kernel for dtype worth packing for (oneDNN's bf16 needs AVX512_BF16 or AMX)."""
        bf16 = dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return platform.machine().lower() in ("x86_64", "amd64") and (dtype == torch.float32 or bf16)

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach()  # (out, in)
        if w.dtype == torch.float32:  # as it is: NumPy reads it in place, in the checkpoint's mapping if loaded so
            self.register_buffer("weight", w)
        else:  # oneDNN's blocked layout, for one row of input
            self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(w, 1))
        self.bias = linear.bias  # (out,) or None, as nn.Linear's

    def forward(self, x):  # x (..., in) -> (..., out), as nn.Linear
        if self.weight.is_mkldnn:  # "none": no activation fused after the product
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        rows = x.detach().reshape(-1, x.shape[-1]).numpy()  # (N, in)
        y = torch.from_numpy(rows @ self.weight.numpy().T).view(*x.shape[:-1], -1)  # (N, out) -> (..., out)
        return y if self.bias is None else y + self.bias


# ----------------------------------------------------------------------------------------------------------------
# 8-bit weights (--quantize int8): weight-only, symmetric, one scale per output row


class Int8Linear(nn.Module):
    """A linear layer whose weight is kept as int8 with a scale per output row, weight ~ int8 * scale: a quarter
    of float32's bytes to read per token. The activations stay in the model's dtype."""

    def __init__(self, weight, scale, bias):
        super().__init__()
        self.register_buffer("weight", weight)  # (out, in) int8
        # (out,) in bfloat16, as the CPU kernel takes it (see forward): casting it in the step instead breaks
        # torch.compile (torch 2.13's lowering of _weight_int8pack_mm wants its inputs stored, not computed)
        self.register_buffer("scale", scale.bfloat16())
        self.bias = bias  # nn.Linear's parameter (loaded with the other tensors) or None

    def forward(self, x):
        """x (..., in) @ (weight * scale).T -> (..., out) in x's dtype: the one place that picks the kernel.
        On the CPU, torch's _weight_int8pack_mm streams the int8 weight, but only with bfloat16 activations (17-18
        GB/s of int8 on one core of an AMD EPYC, about what bfloat16 weights reach); with float32 ones it takes a
        path 10x slower (1.6 GB/s), and dequantizing the weight for each product is slower still (0.5-1 GB/s). So
        a float32 model's activations enter the product as bfloat16 (8 significant bits, as many as the weight
        has), and the result returns as float32. Elsewhere: dequantize in the product (on CUDA torch.compile fuses
        it, as gpt-fast). The CPU kernel takes whole blocks of 16 inputs: with other widths it returns garbage or
        crashes the process (torch 2.13), so those take the dequantizing product too (no OLMo has such a width)."""
        if x.device.type == "cpu" and x.shape[-1] % 16 == 0:
            rows = x.reshape(-1, x.shape[-1]).bfloat16()  # (N, in)
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scale)  # (N, out) bfloat16
            y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
        else:
            y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


def quantize_rows(w):
    """w (out, in) float -> int8 q (out, in), float32 scale (out,): scale = max |row| / 127, q = round(w / scale),
    so |w - q * scale| <= scale / 2. Blocks of rows, 2^18 numbers or one row, keep the temporaries at 1 MB."""
    q = torch.empty(w.shape, dtype=torch.int8)
    scale = torch.empty(w.shape[0])
    block = max(1, 2 ** 18 // w.shape[1])
    for i in range(0, len(w), block):
        rows = w[i:i + block].float()
        amax = rows.abs().amax(dim=1)
        scale[i:i + block] = torch.where(amax > 0, amax / 127, 1.0)  # a row of zeros: any scale (1 avoids 0/0)
        q[i:i + block] = (rows / scale[i:i + block, None]).round()
    return q, scale


def quantize_int8(model, state_dict, device):
    """Every nn.Linear of the (meta) model, the head included, becomes an Int8Linear quantized from the
    checkpoint one weight at a time, each float weight freed (unmapped, see load_file) once quantized: memory
    holds the int8 weights and one float tensor. The embedding stays in dtype (a token reads one row of it); a
    tied head is quantized from it, so only the head's copy is int8. OLMoE: the router stays too (as llama.cpp
    keeps it): it is tiny, and a rounding there can send a token to other experts."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.endswith(".mlp.gate"):  # OLMoE: the router stays as it was
            continue
        tied_head = name == "lm_head" and model.config.tie_word_embeddings
        key = "model.embed_tokens.weight" if tied_head else f"{name}.weight"
        weight = state_dict[key] if tied_head else state_dict.pop(key)  # the embedding stays, for its lookup
        q, scale = quantize_rows(weight)
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, Int8Linear(q.to(device), scale.to(device), module.bias))


# ----------------------------------------------------------------------------------------------------------------
# Reading config.json
#
# OlmoConfig.from_json reads the file as it comes: transformers 4.x writes a top-level rope_theta and
# rope_scaling (with "type" or "rope_type"), transformers 5 writes rope_parameters, for OLMo 3 nested per
# layer type. Every field is checked, its JSON type and its range, so a config we can't interpret fails with
# one line naming file, field and value, instead of building a different model.


def config_from_dict(cls, d, source):
    """OlmoConfig.from_dict: every known field must have its JSON type (no "false" for false, no 128.0
    for 128); unknown keys (architectures, transformers_version, ...) are irrelevant. Errors name the
    source."""
    try:
        d = dict(d)
        if d.get("dtype") is None:  # as transformers 5: dtype, else transformers 4's torch_dtype
            d["dtype"] = d.get("torch_dtype")
        # Olmo Hybrid: rope_theta given as null (in rope_parameters, else at the top) means no RoPE (NoPE), as
        # transformers reads it; absent means the default base
        given = d["rope_parameters"] if isinstance(d.get("rope_parameters"), dict) else {}
        given = given if "rope_theta" in given else d
        if d.get("model_type") == "olmo_hybrid" and "rope_theta" in given and given["rope_theta"] is None:
            d["rope_parameters"] = {"rope_type": "none"}
        d["rope_parameters"] = read_rope_keys(d)
        known = {f.name: f.type for f in fields(cls)}
        # OLMoE, FlexOlmo: transformers' defaults for the keys a config.json leaves out; router settings this
        # file doesn't implement (or spells otherwise, as num_local_experts) are refused, not ignored
        d = {**FAMILY_DEFAULTS.get(d.get("model_type"), {}), **d}
        for key in d.keys() - known.keys():
            if any(word in key for word in ("expert", "router", "moe", "topk")):
                raise ValueError(f"{key} is a router setting this file doesn't implement")
        for key, value in d.items():
            if key in known and not fits(value, known[key]):
                kind = str(known[key]).replace("NoneType", "null").replace("<class '", "").replace("'>", "")
                raise ValueError(f"{key} must be {kind}, got {value!r}")
        return cls(**{k: v for k, v in d.items() if k in known})
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def read_rope_keys(d):
    """config.json's RoPE keys -> its rope_parameters. Beside transformers 5's rope_parameters, 4.x's rope_theta
    and rope_scaling (what a user gets who follows an old guide and adds "rope_scaling" to a transformers 5
    config) are read as transformers 5 reads them (PreTrainedConfig.convert_rope_params_to_dict): rope_scaling
    takes rope_parameters' place, and rope_theta is the base wherever none is given (10000 if none is). Where that
    would drop a setting rope_parameters makes (a scaling of its own, a different base), or where transformers
    has no reading (OLMo 3's RoPE per layer type: it keeps a half-merged dict, or fails), the file contradicts
    itself: refused, naming both keys."""
    theta, scaling, rope = d.pop("rope_theta", None), d.pop("rope_scaling", None), d.get("rope_parameters")
    if not isinstance(scaling, (dict, type(None))):
        raise ValueError(f"rope_scaling must be an object, got {scaling!r}")
    if not isinstance(rope, (dict, type(None))):
        return rope  # not an object: the field checks name it
    if rope is None or scaling:  # 4.x's keys alone, or rope_scaling in rope_parameters' place
        taken = {**(scaling or {}), "rope_theta": (scaling or {}).get("rope_theta", theta)}
        base = 10000.0 if taken["rope_theta"] is None else taken["rope_theta"]
        said = {("rope_type" if k == "type" else k): v for k, v in (rope or {}).items()}
        kept = {("rope_type" if k == "type" else k): v for k, v in {**taken, "rope_theta": base}.items()}
        dropped = [k for k, v in said.items() if kept.get(k) != v and (k, v) != ("rope_type", "default")]
        if dropped or rope is not None and d.get("model_type") == "olmo3":
            raise ValueError(f"rope_parameters {rope} and rope_scaling {scaling} disagree (transformers 5 would "
                             "take rope_scaling in place of rope_parameters); keep one of them")
        return taken
    rope = {key: dict(value) if isinstance(value, dict) else value for key, value in rope.items()}
    per_type = [rope[kind] for kind in ("full_attention", "sliding_attention") if isinstance(rope.get(kind), dict)]
    for settings in per_type or [rope]:  # rope_theta fills in the base of each layer type that gives none
        if settings.get("rope_theta") is None:
            settings["rope_theta"] = theta
        if theta is not None and settings["rope_theta"] != theta:
            raise ValueError(f"rope_theta {theta} and rope_parameters' rope_theta {settings['rope_theta']} "
                             "disagree (transformers 5 would ignore rope_theta); keep one of them")
    return rope


# The families this file reads, by model_type, and what each changes from OLMo 1: OLMo 2's RMSNorm with weights and
# QK-norm; OLMo 2's norms after each sublayer, not before (see OlmoDecoderLayer); OLMoE's experts in each MLP's
# place (see OlmoeSparseMoeBlock); the type of 3 layers in 4, the 4th attending to every earlier token (OLMo 3's
# sliding window, Olmo Hybrid's Gated DeltaNet); RoPE's base where config.json gives none.
FAMILIES = {  # model_type: (qk_norm, norm_after, moe, other layer type, RoPE base)
    "olmo": (False, False, False, "full_attention", 10000.0),
    "olmo2": (True, True, False, "full_attention", 10000.0),  # OLMo 2
    "olmo3": (True, True, False, "sliding_attention", 500000.0),  # OLMo 3
    "olmoe": (True, False, True, "full_attention", 10000.0),  # OLMoE
    "flex_olmo": (True, True, True, "full_attention", 500000.0),  # FlexOlmo: OLMo 2 7B's base
    "olmo_hybrid": (True, True, False, "linear_attention", 10000.0),  # Olmo Hybrid: its attention layers as OLMo 3's
}
# OLMoE, FlexOlmo, Olmo Hybrid: where transformers' configs for them default otherwise than OlmoConfig
FAMILY_DEFAULTS = {
    "olmoe": dict(hidden_size=2048, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=16,
                  max_position_embeddings=4096),
    "flex_olmo": dict(vocab_size=100352, max_position_embeddings=4096, rms_norm_eps=1e-6, pad_token_id=100277,
                      eos_token_id=100257, num_experts=7, num_experts_per_tok=5),
    "olmo_hybrid": dict(vocab_size=100352, hidden_size=3840, num_attention_heads=30, max_position_embeddings=65536,
                        rms_norm_eps=1e-6, pad_token_id=100277, eos_token_id=100257),  # Olmo Hybrid
}


def fits(value, annotation):
    """Whether a JSON value has a field's type: a bool is not an int, an int is a float, a string is
    neither."""
    if isinstance(annotation, types.UnionType):
        return any(fits(value, a) for a in annotation.__args__)
    if typing.get_origin(annotation) is list:
        return type(value) is list and all(fits(v, typing.get_args(annotation)[0]) for v in value)
    if annotation is float:
        return type(value) in (int, float)
    return type(value) is annotation  # int, bool, str, dict, NoneType


def require(config, ok, name, what):
    if not ok:
        raise ValueError(f"{name} must be {what}, got {getattr(config, name)!r}")


def check_fields(c):
    """The ranges of the fields every generation has, and how they fit together (OlmoConfig.__post_init__)."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "linear_conv_kernel_dim"):
        require(c, 1 <= getattr(c, name) < 2 ** 31, name, "in [1, 2**31)")  # tensor sizes are int64s
    require(c, c.head_dim is not None or c.hidden_size % c.num_attention_heads == 0, "hidden_size",
            f"divisible by num_attention_heads {c.num_attention_heads}")
    require(c, c.num_attention_heads % c.num_key_value_heads == 0, "num_attention_heads",
            f"divisible by num_key_value_heads {c.num_key_value_heads}")
    require(c, c.hidden_act in ACT2FN, "hidden_act", f"one of {', '.join(ACT2FN)}")
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        ids = getattr(c, name)  # None, an id or a list of ids
        ids = [ids] if isinstance(ids, int) else ids or []
        require(c, all(0 <= i < c.vocab_size for i in ids), name, f"null or in [0, {c.vocab_size})")
    require(c, 0 <= c.attention_dropout < 1, "attention_dropout", "in [0, 1)")
    require(c, math.isfinite(c.initializer_range) and c.initializer_range >= 0, "initializer_range", ">= 0")
    # OLMo 2: the epsilon of its RMSNorms
    require(c, math.isfinite(c.rms_norm_eps) and c.rms_norm_eps >= 0, "rms_norm_eps", ">= 0")
    require(c, c.clip_qkv is None or math.isfinite(c.clip_qkv) and c.clip_qkv > 0, "clip_qkv", "None or > 0")
    # OLMo 2: no clip_qkv (QK-norm bounds the attention logits instead); OLMoE has both
    require(c, c.clip_qkv is None or c.model_type in ("olmo", "olmoe"), "clip_qkv", "None but in OLMo 1 and OLMoE")
    require(c, c.dtype in (None, "float32", "float16", "bfloat16", "float64"), "dtype", "a float type")
    if c.moe:  # OLMoE
        require(c, 1 <= c.num_experts < 2 ** 31, "num_experts", "in [1, 2**31)")
        require(c, 1 <= c.num_experts_per_tok <= c.num_experts, "num_experts_per_tok",
                f"in [1, num_experts {c.num_experts}]")
        require(c, math.isfinite(c.router_aux_loss_coef), "router_aux_loss_coef", "a finite number")


def rope_per_layer_type(c, other, default_theta):
    """Checks layer_types (OLMo 3's, Olmo Hybrid's) and sliding_window; then rope_parameters, flat or per
    layer type -> {layer type: its settings checked, every default filled}, for the layer types the model has
    (but Olmo Hybrid's Gated DeltaNet layers, which have no RoPE)."""
    kinds = {"full_attention", other}
    require(c, len(c.layer_types) == c.num_hidden_layers and set(c.layer_types) <= kinds, "layer_types",
            f"{c.num_hidden_layers} of {' or '.join(map(repr, sorted(kinds)))}")
    # Olmo Hybrid: a layer of each kind, as transformers asks (generation needs a KV cache to size)
    require(c, other != "linear_attention" or len(set(c.layer_types)) == 2, "layer_types", "of both kinds")
    # OLMo 3: a window holds at least the query itself
    require(c, other != "sliding_attention" or 1 <= c.sliding_window, "sliding_window", ">= 1")
    rope = c.rope_parameters or {}
    require(c, isinstance(rope, dict), "rope_parameters", "an object")
    if not {"full_attention", "sliding_attention"} & rope.keys():  # flat: the full-attention layers' settings
        rope = {"full_attention": rope, "sliding_attention": {"rope_theta": rope.get("rope_theta")}}
    return {kind: check_rope(rope.get(kind) or {}, default_theta, c.max_position_embeddings, kind)
            for kind in sorted(set(c.layer_types) - {"linear_attention"})}


def fill_linear_attention(c):
    """Olmo Hybrid: the Gated DeltaNet's sizes, defaulted as transformers' OlmoHybridConfig does, and checked
    (each before the next default divides by it)."""
    defaults = {"linear_num_key_heads": lambda: c.num_attention_heads,
                "linear_num_value_heads": lambda: c.num_attention_heads,
                "linear_key_head_dim": lambda: int(0.75 * c.hidden_size / c.linear_num_key_heads),
                "linear_value_head_dim": lambda: 2 * c.linear_key_head_dim}
    for name, default in defaults.items():
        if getattr(c, name) is None:
            setattr(c, name, default())
        require(c, 1 <= getattr(c, name) < 2 ** 31, name, "in [1, 2**31)")
    require(c, c.linear_num_value_heads % c.linear_num_key_heads == 0, "linear_num_value_heads",
            f"a multiple of linear_num_key_heads {c.linear_num_key_heads}")


def positive(v):
    return type(v) in (int, float) and 0 < v < math.inf


# What each RoPE type takes besides rope_type and rope_theta: key -> (default, test, what it asks); all
# else is refused. YaRN's defaults are transformers'; those that are None (unset) it computes from the others.
FACTOR = {"factor": (None, lambda v: positive(v) and v > 1, "a number > 1")}
ROPE_TYPES = {"default": {}, "none": {}, "linear": FACTOR, "dynamic": FACTOR, "yarn": {
    **FACTOR, "original_max_position_embeddings": (None, lambda v: type(v) is int and v >= 1, "an integer >= 1"),
    "attention_factor": (None, positive, "a number > 0"), "beta_fast": (32.0, positive, "a number > 0"),
    "beta_slow": (1.0, positive, "a number > 0"), "mscale": (None, positive, "a number > 0"),
    "mscale_all_dim": (None, positive, "a number > 0"), "truncate": (True, lambda v: type(v) is bool, "a boolean")}}


def check_rope(rope, default_theta, max_position_embeddings, kind):
    """One layer type's RoPE settings ("type" or "rope_type", "rope_theta", "factor", YaRN's keys) -> the same
    with "rope_type", "rope_theta" and every default filled in."""
    where = f"rope_parameters[{kind!r}]"
    if not isinstance(rope, dict):
        raise ValueError(f"{where} must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{where} rope_type must be one of {', '.join(ROPE_TYPES)}, got {rope_type!r}")
    takes = {"rope_theta": (default_theta, positive, "a finite number > 0"), **ROPE_TYPES[rope_type]}
    for key in rope.keys() - takes.keys() - {"rope_type", "type"}:
        raise ValueError(f"{where} has {key!r}, which rope_type {rope_type!r} doesn't take")
    out = {"rope_type": rope_type}
    for key, (default, ok, what) in takes.items():
        value = default if rope.get(key) is None else rope[key]  # null is the same as absent
        if (value is not None or key == "factor") and not ok(value):  # YaRN computes its unset (None) keys
            raise ValueError(f"{where} {key} must be {what}, got {rope.get(key)!r}")
        out[key] = value
    if rope_type == "yarn" and out["original_max_position_embeddings"] is None:
        out["original_max_position_embeddings"] = max_position_embeddings
    return out


# ----------------------------------------------------------------------------------------------------------------
# CLI
#
# cli.py holds the command line both twins share; this is what it needs from torch.


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype's names


def available_devices():
    """The devices torch can run on here, the default first: cuda (and each cuda:N), then mps, then cpu."""
    cuda = ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    mps = ["mps"] if torch.backends.mps.is_available() else []
    return cuda + mps + ["cpu"]


class Backend:
    name = "PyTorch"

    def add_arguments(self, p):
        p.add_argument("--device", choices=available_devices(), help="default: cuda, then mps, then cpu")
        p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on a GPU; on the CPU the checkpoint's "
                                                       "own (config.json's dtype or torch_dtype, else float32)")
        p.add_argument("--compile", action="store_true", help="torch.compile the decode step; on an x86 CPU it "
                                                              "loads weights unpacked, slower (default: off)")

    def load(self, args, path):
        device = args.device or available_devices()[0]
        default_dtype = None if device == "cpu" else "bfloat16"  # None: the checkpoint's; a bf16 7B is 14 GB
        if args.seed is not None:
            torch.manual_seed(args.seed)
        model = OlmoForCausalLM.from_pretrained(path, device=device, dtype=DTYPES.get(args.dtype or default_dtype),
                                                quantize=args.quantize, pack=not args.compile)
        dtype = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
        self.name = f"PyTorch on {device}, {dtype}" + (f", {args.quantize} weights" if args.quantize else "")
        if args.compile:
            # CUDA graphs on GPU remove the per-kernel launch cost that dominates one-token steps; rounding
            # after every op as eager does keeps bf16's tokens (fused kernels would round once)
            options = {"triton.cudagraphs": device.startswith("cuda"), "emulate_precision_casts": True}
            # OLMoE: which experts run depends on the router's values, so the step compiles in pieces
            model.decode_one_token = torch.compile(model.decode_one_token, fullgraph=not model.config.moe,
                                                   options=options)
        return model

    def generate(self, model, ids, max_new_tokens, callback, **settings):
        ids = torch.tensor([ids], device=model.lm_head.weight.device)
        model.generate(ids, max_new_tokens, callback=lambda t: callback(int(t[0])), **settings)


def main(argv=None):
    import cli  # beside this file: the command line olmo.py and olmo_numpy.py share
    return cli.main(Backend(), argv)


if __name__ == "__main__":
    sys.exit(main())
