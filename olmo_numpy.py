"""OLMo (1, 2 and 3), OLMoE, FlexOlmo and Olmo Hybrid in one readable NumPy file: olmo.py's twin, with every
matrix product written out.

Frameworks hide the arithmetic; this file shows it. The norms, the rotation, the attention softmax, the MLP
(and OLMoE's router and experts, Olmo Hybrid's recurrence) and the KV cache are plain array code over a dict of
weights (named as in transformers' checkpoints), and the .safetensors reader is a few lines of header parsing
over a memory map. It tells olmo.py's story in olmo.py's order, with the same names where the concept is the
same (OLMo 2, OLMo 3, OLMoE and Olmo Hybrid again under "OLMo 2:", "OLMo 3:", "OLMoE:" and "Olmo Hybrid:"
comments), so the two read side by side; its logits equal olmo.py's and transformers' to float32 rounding (the
tests check both). It needs only NumPy (and tokenizers for the CLI), no torch. Everything runs in float32;
float16 and bfloat16 checkpoints are widened to float32 when they load. from_pretrained reads a checkpoint
directory; the command line (cli.py) also takes a hub id, and downloads it with huggingface_hub.

Notation: B batch rows, T tokens in this call, S cache slots (keys), H / KV query and key-value heads,
D head_dim. A *slot* is a column of the (left-padded) batch, the index into the KV cache; a *position* is
what RoPE rotates by: the slot minus the row's left padding. Olmo Hybrid's Gated DeltaNet layers: Hk / Hv
query-key and value heads, of sizes dk / dv.

    python olmo_numpy.py --model path/to/OLMo-1B-hf --prompt "Language models are"
"""

import json
import math
import mmap
import os
import stat
import sys
import types
import typing
from dataclasses import dataclass, fields

import numpy as np

# Threads: NumPy's BLAS keeps its default, a thread per core, on purpose: a real model's decode step streams
# every weight from memory, which one core alone doesn't do at full speed (160m: 30 vs 45 ms per token with a
# second core free). For tiny models, or cores busy with other work, one thread is faster:
# set OPENBLAS_NUM_THREADS=1.

# ----------------------------------------------------------------------------------------------------------------
# Config
#
# The same dataclass as olmo.py's, repeated on purpose: this file imports nothing from it.


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
    initializer_range: float = 0.02  # std of the normal init of fresh weights (unused here: we only load)
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
    attention_dropout: float = 0.0  # dropout on attention probabilities, in training only (none here)
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


def layer_norm(x, eps=1e-5):
    """LayerNorm with no learnable weight or bias (OLMo 1's choice): each vector to mean 0 and variance 1."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased (divides by n), like torch's layer_norm
    return (x - mean) / np.sqrt(var + eps)


def rms_norm(x, weight, eps):
    """OLMo 2: RMSNorm with a learned weight (no mean subtraction, no bias), multiplied in the order
    transformers uses."""
    return weight * (x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + np.float32(eps)))


def norm(weights, name, config, x):
    """A layer's norm: OLMo 1's layer_norm, or the RMSNorm `name` (with its weight) of OLMo 2 and every later
    model."""
    if config.qk_norm:  # OLMo 2
        return rms_norm(x, weights[f"{name}.weight"], config.rms_norm_eps)
    return layer_norm(x)


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE), rotate-half layout
#
# Each head vector is split in two halves (x1, x2); frequency i rotates the pair (x1[i], x2[i]) by the angle
# position * inv_freq[i]. Rotating q and k by their positions makes q.k depend only on the distance between
# them. Scaling stretches a model past the context it was trained on: linear divides every frequency, dynamic
# NTK raises the base once a sequence is longer, YaRN (OLMo 3) interpolates only the slow frequencies.
# Everything is float32, as in olmo.py, so the angles round the same way.


def rotary_emb(config, rope, position_ids):
    """position_ids (B, T) -> cos, sin (B, T, D), float32, for one layer type's RoPE settings `rope`."""
    dim = config.head_dim
    theta = np.float32(rope["rope_theta"])
    factor = np.float32(rope.get("factor", 1.0))
    exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    inv_freq = 1.0 / theta ** exponents  # (D/2,)
    attention_factor = 1.0  # scales cos and sin, hence every attention score by its square
    if rope["rope_type"] == "linear":  # "position interpolation": every position divided by factor
        inv_freq = inv_freq / factor
    elif rope["rope_type"] == "none":  # Olmo Hybrid's NoPE: every angle 0 (cos 1, sin 0), q and k as they are
        inv_freq = inv_freq * 0
    elif rope["rope_type"] == "yarn":  # OLMo 3: YaRN
        inv_freq, attention_factor = yarn(theta ** exponents, rope, dim, rope["rope_theta"])
    elif rope["rope_type"] == "dynamic" and position_ids.max() + 1 > config.max_position_embeddings:
        # Dynamic NTK scaling raises the base once the sequence outgrows the trained context, so
        # long-wavelength dimensions interpolate while short ones keep their resolution. As in transformers
        # and olmo.py, "the sequence" is the largest position in this call, and cached keys keep the
        # frequencies they got.
        seq_len = np.float32(position_ids.max() + 1)
        stretch = factor * seq_len / np.float32(config.max_position_embeddings) - (factor - 1)
        base = theta * stretch ** np.float32(dim / (dim - 2))
        inv_freq = 1.0 / base ** exponents
    freqs = position_ids[..., None].astype(np.float32) * inv_freq.astype(np.float32)  # (B, T, D/2)
    emb = np.concatenate((freqs, freqs), axis=-1)  # both halves of a pair turn by the same angle
    return np.cos(emb) * np.float32(attention_factor), np.sin(emb) * np.float32(attention_factor)


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
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the frequency, 0: divide it by factor
    inv_freq = 1.0 / (factor * wavelengths) * (1 - extrapolation) + 1.0 / wavelengths * extrapolation
    return inv_freq, attention_factor


def rotate_half(x):
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate((-x2, x1), axis=-1)


def apply_rotary_pos_emb(x, cos, sin):
    """x (B, H or KV, T, D), cos/sin (B, T, D)."""
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------------------------
# Attention


def linear(x, weights, name):
    """x (..., in) -> (..., out): x W^T + b, with W (out, in) as checkpoints store it. The .T is a view:
    nothing is copied. An int8 W (--quantize int8) stands for W * scale, a scale per row (quantize_rows)."""
    w = weights[f"{name}.weight"]
    if w.dtype == np.int8:  # x (W * scale)^T = (x W^T) * scale: each output times its row's scale
        y = (x @ w.T.astype(np.float32)) * weights[f"{name}.scale"]
    else:
        y = x @ w.T
    bias = weights.get(f"{name}.bias")
    return y if bias is None else y + bias


def causal_mask(query_slots, key_valid, window=None):
    """The one masking rule, for the full forward, prefill and decode alike: key j is visible to the query in
    slot i if j <= i, j holds a real token, and (OLMo 3's sliding layers) i - j < window.

    query_slots (T,): the queries' cache slots; key_valid (B, S) bool, False at padding. Returns (B, 1, T, S)
    bool, True = may attend (always a mask: unlike olmo.py, there is no fused causal kernel to hand it to).
    Every query also sees itself, so a padding query has one finite score instead of a softmax over nothing
    (NaN); its output is never used, since real tokens never attend to padding."""
    i = query_slots[:, None]  # (T, 1)
    j = np.arange(key_valid.shape[1])  # (S,)
    visible = j <= i  # (T, S)
    if window is not None:  # OLMo 3: a sliding-window layer sees only the last `window` keys
        visible = visible & (i - j < window)
    return (visible & key_valid[:, None, None, :]) | (i == j)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # minus the max: exp never overflows, and -inf -> 0
    return e / e.sum(axis=-1, keepdims=True)


QUERY_BLOCK = 256  # queries per block in attend: one block for decoding and for prompts up to 256 tokens


def attend(q, k, v, mask):
    """softmax(q k^T / sqrt(D) + mask) v: q (B, KV, group, T, D), k and v (B, KV, 1, S, D) broadcast over the
    group (GQA without copies), mask (B, 1, T, S) -> (B, KV, group, T, D). In blocks of queries, because all
    the scores at once, (B, KV, group, T, S) floats, take 1.7 GB for a 6000-token prompt of a 12-head model.
    The queries are the last T of the S slots, so a block's keys can end at its last query's slot: later ones
    are masked anyway."""
    T, S = q.shape[3], k.shape[3]
    scale = np.float32(math.sqrt(q.shape[-1]))
    y = np.empty_like(q)
    for start in range(0, T, QUERY_BLOCK):
        stop = min(start + QUERY_BLOCK, T)
        keys = S - T + stop  # the keys up to this block's last query
        scores = q[:, :, :, start:stop] @ k[:, :, :, :keys].swapaxes(-1, -2) / scale
        scores = np.where(mask[:, :, None, start:stop, :keys], scores, -np.inf)  # (B, KV, group, block, keys)
        y[:, :, :, start:stop] = softmax(scores) @ v[:, :, :, :keys]
    return y


def attention(weights, name, config, x, cos, sin, mask, cache=None, slots=None):
    """Self-attention, its weights under `name` (model.layers.N.self_attn): x (B, T, hidden) -> (B, T, hidden).
    mask (B, 1, T, S) bool, True = may attend. cache (k_cache, v_cache), each (B, KV, length, D), and slots (T,):
    the cache slots to write k and v to, then attend over the cache's first S (the filled ones: S is the mask's
    width); None: no cache, attend only within x (S = T)."""
    B, T, _ = x.shape
    H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = linear(x, weights, f"{name}.q_proj")  # (B, T, H*D)
    k = linear(x, weights, f"{name}.k_proj")  # (B, T, KV*D)
    v = linear(x, weights, f"{name}.v_proj")  # (B, T, KV*D)
    if config.qk_norm:  # OLMo 2: QK-norm over all heads at once keeps attention logits from blowing up
        q = norm(weights, f"{name}.q_norm", config, q)
        k = norm(weights, f"{name}.k_norm", config, k)
    if config.clip_qkv is not None:  # OLMo-0424+ and OLMoE: bounds activations, stabilising training
        c = config.clip_qkv
        q, k, v = np.clip(q, -c, c), np.clip(k, -c, c), np.clip(v, -c, c)
    q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
    k = k.reshape(B, T, KV, D).transpose(0, 2, 1, 3)  # (B, KV, T, D)
    v = v.reshape(B, T, KV, D).transpose(0, 2, 1, 3)
    q, k = apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)
    if cache is not None:
        k_cache, v_cache = cache
        k_cache[:, :, slots], v_cache[:, :, slots] = k, v  # written in place
        k, v = k_cache[:, :, :mask.shape[-1]], v_cache[:, :, :mask.shape[-1]]  # (B, KV, S, D), views
    # Grouped-query attention: each group of H/KV query heads shares one key/value head. Reshaping q to
    # (B, KV, group, T, D) lets the matmul broadcast k and v over the group, instead of copying them H/KV
    # times.
    y = attend(q.reshape(B, KV, H // KV, T, D), k[:, :, None], v[:, :, None], mask)  # (B, KV, group, T, D)
    y = y.reshape(B, H, T, D).transpose(0, 2, 1, 3).reshape(B, T, H * D)
    return linear(y, weights, f"{name}.o_proj")  # (B, T, hidden)


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
        state = state * np.exp(g[:, :, t, None, None])
        k_t = k[:, :, t, :, None]  # (B, Hv, dk, 1)
        error = v[:, :, t, None, :] - k_t.swapaxes(-1, -2) @ state  # (B, Hv, 1, dv): the value minus S's answer
        state = state + k_t @ (beta[:, :, t, None, None] * error)
        outputs.append(q[:, :, t, None, :] @ state)  # (B, Hv, 1, dv)
    return np.concatenate(outputs, axis=2), state


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
        c = np.cumsum(g_c, axis=-1)  # (B, Hv, C)
        causal = np.tri(c.shape[-1], dtype=bool)
        D = np.exp(np.where(causal, c[..., :, None] - c[..., None, :], -np.inf))  # (B, Hv, C, C), 0 above
        A = np.tril(k_c @ k_c.swapaxes(-1, -2) * D * beta_c[..., None], -1)  # (B, Hv, C, C)
        rhs = beta_c[..., None] * (v_c - np.exp(c)[..., None] * k_c @ state)  # (B, Hv, C, dv)
        # NumPy has no triangular solver: a general one, on the same unit lower-triangular I + A
        u = np.linalg.solve(np.eye(c.shape[-1], dtype=A.dtype) + A, rhs)  # (B, Hv, C, dv)
        outputs.append(np.exp(c)[..., None] * q_c @ state + (q_c @ k_c.swapaxes(-1, -2) * D) @ u)
        k_decayed = np.exp(c[..., -1:] - c)[..., None] * k_c  # each key decayed to the chunk's end
        state = np.exp(c[..., -1:, None]) * state + k_decayed.swapaxes(-1, -2) @ u
    return np.concatenate(outputs, axis=2), state


def gated_delta_net(weights, name, config, x, cos, sin, mask, cache=None, slots=None):
    """Olmo Hybrid's token mixer in a "linear_attention" layer, its weights under `name`
    (model.layers.N.linear_attn): x (B, T, hidden) -> (B, T, hidden), attention's signature; cos, sin and slots
    unused (the order of tokens is in the recurrence). mask (B, T) bool: False at padding. cache: a dict whose
    "state" (the convolution's last K - 1 inputs, S) this call continues from (None: zeros) and replaces
    (generation); None: start from zeros, keep nothing.
    q, k and v pass a short causal convolution (each channel sees its last linear_conv_kernel_dim inputs); each
    of the Hv value heads has its own state and shares q and k with the Hv / Hk heads beside it (as GQA shares
    keys). The output is normalised per head and gated."""
    B, T, _ = x.shape
    Hk, Hv = config.linear_num_key_heads, config.linear_num_value_heads
    dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
    x = x * mask[..., None]  # left padding becomes zeros: then it writes nothing (k = 0), the conv sees 0s
    qkv = np.concatenate([linear(x, weights, f"{name}.{p}_proj") for p in "qkv"], axis=-1)  # (B, T, channels)
    weight = weights[f"{name}.conv1d.weight"][:, 0]  # (channels, K): one filter per channel
    K = weight.shape[1]
    if cache is not None and cache["state"] is not None:
        conv, state = cache["state"]
    else:  # zeros, as before a sequence's first token
        conv = np.zeros((B, K - 1, qkv.shape[-1]), np.float32)
        state = np.zeros((B, Hv, dk, dv), np.float32)
    window = np.concatenate([conv, qkv], axis=1)  # (B, K - 1 + T, channels): each output sees its K inputs
    qkv = ACT2FN[config.hidden_act](sum(window[:, j:j + T] * weight[:, j] for j in range(K)))  # the conv
    q, k, v = np.split(qkv, [Hk * dk, 2 * Hk * dk], axis=-1)
    q = np.repeat(q.reshape(B, T, Hk, dk).transpose(0, 2, 1, 3), Hv // Hk, axis=1)  # (B, Hv, T, dk)
    k = np.repeat(k.reshape(B, T, Hk, dk).transpose(0, 2, 1, 3), Hv // Hk, axis=1)
    v = v.reshape(B, T, Hv, dv).transpose(0, 2, 1, 3)  # (B, Hv, T, dv)
    q = q / np.sqrt((q * q).sum(-1, keepdims=True) + np.float32(1e-6)) / np.float32(math.sqrt(dk))
    k = k / np.sqrt((k * k).sum(-1, keepdims=True) + np.float32(1e-6))
    beta = 1 / (1 + np.exp(-linear(x, weights, f"{name}.b_proj")))  # (B, T, Hv)
    if config.linear_allow_neg_eigval:
        beta = beta * 2
    a = linear(x, weights, f"{name}.a_proj") + weights[f"{name}.dt_bias"]
    g = -np.exp(weights[f"{name}.A_log"]) * np.logaddexp(np.float32(0), a)  # softplus(a) = log(1 + e^a)
    rule = gated_delta_rule if T == 1 else chunked_gated_delta_rule
    y, state = rule(q, k, v, g.transpose(0, 2, 1), beta.transpose(0, 2, 1), state)  # (B, Hv, T, dv)
    if cache is not None:
        cache["state"] = (window[:, T:], state)
    # per head: RMSNorm with transformers' fixed epsilon (not rms_norm_eps), then times silu of the gate
    y = rms_norm(y.transpose(0, 2, 1, 3), weights[f"{name}.o_norm.weight"], 1e-5)
    y = y * silu(linear(x, weights, f"{name}.g_proj").reshape(B, T, Hv, dv))
    return linear(y.reshape(B, T, Hv * dv), weights, f"{name}.o_proj")


# ----------------------------------------------------------------------------------------------------------------
# MLP
#
# The MLP gate's activations, by the names config.json uses (transformers' ACT2FN), then the MLP.


def silu(x):
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x < -88; x / inf = -0 is the right limit
        return x / (1.0 + np.exp(-x))


def erf(x):
    """The error function, which NumPy lacks (math.erf is one Python call per element): Abramowitz & Stegun
    7.1.26, absolute error below 1.5e-7, evaluated in float64 so that only the final rounding to float32 (half
    an ulp, <= 3e-8) adds to it. The bound is absolute, and gelu = 0.5 * x * (1 + erf(x / sqrt 2)) turns it
    into an absolute error of up to |x| / 2 * 1.5e-7, not a relative one: where gelu nears 0
    (x < -4, |gelu| < 1e-4) the relative error grows without bound (4% at x = -5), harmless next to the O(1)
    activations around it."""
    a1, a2, a3, a4, a5, p = 0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429, 0.3275911
    z = np.abs(x).astype(np.float64)
    t = 1.0 / (1.0 + p * z)
    y = 1.0 - ((((a5 * t + a4) * t + a3) * t + a2) * t + a1) * t * np.exp(-z * z)
    return (np.sign(x) * y).astype(x.dtype)


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


ACT2FN = {"silu": silu, "swish": silu, "gelu": gelu, "gelu_new": gelu_tanh, "gelu_pytorch_tanh": gelu_tanh,
          "relu": lambda x: np.maximum(x, 0.0)}


def mlp(weights, name, config, x):
    """The gated MLP (SwiGLU with silu) under `name` (model.layers.N.mlp; OLMoE: model.layers.N.mlp.experts.E):
    down(act(gate(x)) * up(x))."""
    act = ACT2FN[config.hidden_act]
    gate = act(linear(x, weights, f"{name}.gate_proj"))  # (B, T, hidden) -> (B, T, intermediate)
    up = linear(x, weights, f"{name}.up_proj")
    return linear(gate * up, weights, f"{name}.down_proj")  # (B, T, hidden)


def sparse_moe_block(weights, name, config, x):
    """OLMoE: a mixture of experts in the MLP's place. A router scores the experts for each token; the token
    goes through its top num_experts_per_tok (each expert an mlp), and their outputs are summed, weighted by
    the router's probabilities (rescaled to sum to 1 if norm_topk_prob). Only the chosen experts' weights are
    read: OLMoE-1B-7B holds 64 experts per layer and runs 8 per token, 1.3B of its 6.9B parameters. Each token
    is routed on its own, so padding can't change a real token's experts. x (B, T, hidden) -> (B, T, hidden)."""
    B, T, C = x.shape
    x = x.reshape(B * T, C)  # (N, hidden): the tokens, each routed on its own
    probs = softmax(linear(x, weights, f"{name}.gate"))  # (N, experts): the router's
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :config.num_experts_per_tok]  # (N, top_k), best first
    p = np.take_along_axis(probs, chosen, axis=-1)  # (N, top_k)
    if config.norm_topk_prob:
        p = p / p.sum(axis=-1, keepdims=True)
    y = np.zeros_like(x)
    for e in np.unique(chosen):  # only the experts some token chose
        token, k = np.nonzero(chosen == e)  # the tokens that chose expert e, as their k-th choice
        y[token] += mlp(weights, f"{name}.experts.{e}", config, x[token]) * p[token, k, None]
    return y.reshape(B, T, C)


# ----------------------------------------------------------------------------------------------------------------
# Block


def decoder_layer(weights, i, config, x, cos, sin, mask, cache=None, slots=None):
    """A residual block. OLMo 1 normalises each sublayer's input (pre-norm); OLMo 2 and 3 normalise its
    output, before the residual add, so the residual stream itself is never rescaled (their stability fix):

        OLMo 1 (OLMoE)                                OLMo 2 and 3 (FlexOlmo)
        x = x + attn(input_layernorm(x))              x = x + post_attention_layernorm(attn(x))
        x = x + mlp(post_attention_layernorm(x))      x = x + post_feedforward_layernorm(mlp(x))

    OLMoE and FlexOlmo: mlp is a mixture of experts (sparse_moe_block). Olmo Hybrid: its attention layers
    are OLMo 3's; its Gated DeltaNet layers ("linear_attention") put their norms where OLMo 1 puts its own:
    x = x + linear_attn(input_layernorm(x)), and the MLP likewise."""
    layer = f"model.layers.{i}"
    ffn = sparse_moe_block if config.moe else mlp  # OLMoE: experts
    linear = config.layer_types[i] == "linear_attention"  # Olmo Hybrid
    attn = gated_delta_net if linear else attention
    mixer = f"{layer}.linear_attn" if linear else f"{layer}.self_attn"  # the token mixer's name in checkpoints
    if config.norm_after and not linear:  # OLMo 2: each sublayer's output is normalised, then added
        x_attn = attn(weights, mixer, config, x, cos, sin, mask, cache, slots)
        x = x + norm(weights, f"{layer}.post_attention_layernorm", config, x_attn)
        x_ffn = ffn(weights, f"{layer}.mlp", config, x)
        return x + norm(weights, f"{layer}.post_feedforward_layernorm", config, x_ffn)
    x_norm = norm(weights, f"{layer}.input_layernorm", config, x)
    x = x + attn(weights, mixer, config, x_norm, cos, sin, mask, cache, slots)
    return x + ffn(weights, f"{layer}.mlp", config, norm(weights, f"{layer}.post_attention_layernorm", config, x))


# ----------------------------------------------------------------------------------------------------------------
# Model


def olmo_model(weights, config, input_ids, position_ids, key_valid, slots=None, caches=None):
    """input_ids, position_ids (B, T) -> hidden states (B, T, hidden). key_valid (B, S) bool: which key slots
    hold real tokens (False at left padding). slots (T,): the KV cache slots these tokens are written to and
    attend from, in caches (one (k_cache, v_cache) per layer); None: no cache, the tokens attend among
    themselves (S = T)."""
    # without a cache, the tokens are slots 0..T-1
    query_slots = np.arange(input_ids.shape[1]) if slots is None else slots
    x = weights["model.embed_tokens.weight"][input_ids]  # (B, T, hidden): a row lookup
    # RoPE tables and masks once per layer type, shared by every layer of that type: "full_attention" sees
    # every earlier key; OLMo 3 adds "sliding_attention", which sees the last sliding_window keys (and RoPE
    # scaling leaves alone).
    rope = {kind: rotary_emb(config, r, position_ids) for kind, r in config.rope_parameters.items()}
    windows = {"full_attention": None, "sliding_attention": config.sliding_window}  # OLMo 3: the window
    masks = {kind: causal_mask(query_slots, key_valid, windows[kind]) for kind in rope}
    # Olmo Hybrid: a Gated DeltaNet layer has no RoPE and needs to know only which tokens are padding
    rope["linear_attention"] = (None, None)
    masks["linear_attention"] = key_valid[:, query_slots]  # (B, T)
    for i, kind in enumerate(config.layer_types):
        cache = None if caches is None else caches[i]
        x = decoder_layer(weights, i, config, x, *rope[kind], masks[kind], cache, slots)
    return norm(weights, "model.norm", config, x)


def positions_from_mask(attention_mask):
    """attention_mask (B, T) of 1/0 -> RoPE positions (B, T): left padding doesn't count, so a padded row gets
    the positions it would have alone (what transformers' generate computes too)."""
    return np.maximum(np.cumsum(attention_mask.astype(np.int64), axis=-1) - 1, 0)


def check_ids(input_ids, vocab_size):
    """Token ids outside the vocabulary would wrap around (-1 is the last row of the embedding) or index past
    it: refuse them, and anything that isn't an integer."""
    if not np.issubdtype(input_ids.dtype, np.integer):
        raise ValueError(f"token ids must be integers, got an array of {input_ids.dtype}")
    bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)]
    if len(bad):
        raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {vocab_size})")


class OlmoForCausalLM:
    """The config and the weight dict (transformers' names -> float32 arrays); the functions above do all
    the rest."""

    def __init__(self, config, weights):
        self.config, self.weights = config, weights
        self.caches = None  # one (k_cache, v_cache) per attention layer, set by setup_cache
        self.cached_ids = []  # the tokens whose keys and values the cache holds (see reuse_prefix)
        self.kept_states = {}  # Olmo Hybrid: {tokens fed: each Gated DeltaNet layer's state} (see reuse_prefix)

    def __call__(self, input_ids, attention_mask=None):
        """The full forward, no cache: input_ids (B, T) ints, attention_mask (B, T) 1 = token, 0 = left
        padding. Returns float32 logits (B, T, vocab). Logits at padding positions are meaningless."""
        input_ids = np.asarray(input_ids)
        check_ids(input_ids, self.config.vocab_size)
        attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
        positions = positions_from_mask(attention_mask)
        hidden = olmo_model(self.weights, self.config, input_ids, positions, attention_mask.astype(bool))
        return linear(hidden, self.weights, "lm_head")  # (B, T, vocab)

    # ------------------------------------------------------------------------------------------------------------
    # Generation
    #
    # Generation runs in two steps, as in gpt-fast: prefill pushes the prompt through once, filling the cache;
    # then decode_one_token feeds one token per step, attending to the cache. Cache slot s holds the s-th
    # token of the (left-padded) batch row; its RoPE position is s minus the row's padding.

    def linear_caches(self):
        """Olmo Hybrid: the Gated DeltaNet layers' caches, {"state": (the conv's last inputs, S) or None}."""
        return [cache for cache, kind in zip(self.caches, self.config.layer_types) if kind == "linear_attention"]

    def setup_cache(self, attention_mask, length):
        """Make room for `length` slots for attention_mask's batch (B, T), keeping what the cache holds: the
        filled slots, zeros after them (a new batch size keeps nothing: it grows from empty caches); key_valid
        (B, S): which slots hold real tokens (not the prompt's padding). The cache grows to `length` rounded up
        to a power of two (at least 256): a large max_new_tokens costs nothing until its tokens are produced.
        Each step attends over the filled slots only (prefill and decode_one_token cut key_valid there), as olmo.py's
        does unless compiled: NumPy has no compiler that needs a static shape. Olmo Hybrid: a Gated DeltaNet layer's
        cache is {"state": ...}, not slots (see reuse_prefix)."""
        B, T = attention_mask.shape
        width = max(256, 1 << (length - 1).bit_length())
        same = self.caches is not None and self.key_valid.shape[0] == B  # key_valid: still the last batch's
        filled = len(self.slots) if same else 0
        padding = ((0, 0), (0, width - T))  # (before, after) per axis
        self.key_valid = np.pad(attention_mask.astype(bool), padding, constant_values=True)
        if width <= filled:
            return
        if not same:
            self.cached_ids = []
            # (B, KV, 0, D): no slots yet; float32, like the weights
            empty = np.zeros((B, self.config.num_key_value_heads, 0, self.config.head_dim), np.float32)
            self.caches = [{"state": None} if kind == "linear_attention" else (empty, empty)
                           for kind in self.config.layer_types]
        self.slots = np.arange(width)
        more = ((0, 0), (0, 0), (0, width - filled), (0, 0))  # (before, after) per axis: the new slots
        try:
            for i, kind in enumerate(self.config.layer_types):
                if kind != "linear_attention":  # Olmo Hybrid: the Gated DeltaNet layers keep their states
                    k_cache, v_cache = self.caches[i]  # (B, KV, filled, D)
                    self.caches[i] = np.pad(k_cache, more), np.pad(v_cache, more)  # the old one freed once copied
        except BaseException as e:  # out of memory, or Ctrl-C (the chat stops a prefill at once): keep no cache
            self.caches = None
            if isinstance(e, MemoryError):
                raise MemoryError(f"out of memory growing the KV cache to {width} tokens") from e
            raise

    def prefill(self, input_ids, attention_mask, start=0):
        """input_ids, attention_mask (B, T), cache slots < start already filled -> the last position's logits
        (B, vocab)."""
        T = input_ids.shape[1]
        positions = positions_from_mask(attention_mask)[:, start:]
        if start == 0:  # Olmo Hybrid: the Gated DeltaNet layers start from zeros (else see reuse_prefix)
            for cache in self.linear_caches():
                cache["state"] = None
        # keys past T are later than every query here: attend over the first T slots only
        hidden = olmo_model(self.weights, self.config, input_ids[:, start:], positions, self.key_valid[:, :T],
                            self.slots[start:T], self.caches)
        return linear(hidden[:, -1], self.weights, "lm_head")  # the vocab projection only where we sample

    def decode_one_token(self, token, slot, position_ids):
        """token, position_ids (B, 1); slot (1,) the cache slot -> logits (B, vocab)."""
        key_valid = self.key_valid[:, :slot[0] + 1]  # the filled slots only (see setup_cache)
        hidden = olmo_model(self.weights, self.config, token, position_ids, key_valid, slot, self.caches)
        return linear(hidden[:, -1], self.weights, "lm_head")

    def reuse_prefix(self, input_ids, attention_mask):
        """A chat's next turn sends the whole conversation again. Returns (start, keep_up_to): the cache's slots
        before `start` already hold input_ids' keys and values, so prefill starts there; this call's tokens are
        recorded in self.cached_ids while they are fewer than keep_up_to (0: none).

        What it keeps: for a one-row batch, the longest prefix shared with the tokens the cache holds (the last
        call's prompt and reply), but not the last prompt token, whose logits prefill must produce. A slot's
        keys and values depend only on the tokens up to it, so this gives exactly what starting afresh gives.

        When it can't: a batch of several rows, or with padding (a row's slots then depend on the other rows'
        lengths); and with dynamic RoPE past the trained length, whose frequencies change with each call's
        length: it keeps only calls and tokens within max_position_embeddings.

        Olmo Hybrid: a Gated DeltaNet layer's state sums up every token before it, so unlike keys and values it
        can't be cut back to a shorter prefix. generate keeps the states at two points of the last call
        (kept_states): the end of its prompt, and the end of what it fed after it (the reply but its last token,
        never fed). A chat's next prompt extends that reply (then a turn costs only its new tokens) or at least
        the last prompt (a chat template may write the reply back differently: then the reply is read again),
        so a turn's cost doesn't grow with the conversation, and the states are exactly those of recomputing.
        `start` moves back to the latest kept point at or before it."""
        B, T = input_ids.shape
        keep_up_to = self.config.max_position_embeddings if self.config.dynamic_rope else math.inf
        if B > 1 or not attention_mask.all() or T > keep_up_to:
            self.cached_ids = []
            return 0, 0
        ids = input_ids[0].tolist()
        start = 0
        while start < min(T - 1, len(self.cached_ids)) and ids[start] == self.cached_ids[start]:
            start += 1
        if self.linear_caches():  # Olmo Hybrid: back to the latest kept states, 0 (zeros) if none
            start = max((n for n in self.kept_states if n <= start), default=0)
            for cache, state in zip(self.linear_caches(), self.kept_states.get(start, [])):
                cache["state"] = state
        self.cached_ids = self.cached_ids[:start]  # slots from start on are about to be overwritten
        return start, keep_up_to

    # NaN and overflow are caught where they matter, in the logits (check_finite names the step), instead of
    # warned about at each operation they pass through
    @np.errstate(invalid="ignore", over="ignore")
    def generate(self, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_token_id=None,
                 attention_mask=None, rng=None, callback=None):
        """input_ids (B, T), left-padded when prompts differ in length (attention_mask 0 on padding). Returns
        (B, T + n) prompt + new tokens, n <= max_new_tokens: generation ends when every row has produced an
        EOS (rows that finish early are filled with pad_token_id after it, as in transformers). temperature=0
        is greedy; rng a np.random.Generator for sampling; callback(tokens (B,)) is called with each step's
        tokens (for streaming). A one-row call after another prefills only what is new (a chat's next turn: see
        reuse_prefix)."""
        input_ids = np.asarray(input_ids)
        check_ids(input_ids, self.config.vocab_size)
        input_ids = input_ids.astype(np.int64)
        B, T = input_ids.shape
        attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
        # eos_token_id: None, an int or a list of ints
        eos = np.array([] if eos_token_id is None else eos_token_id, dtype=np.int64).reshape(-1)
        pad = self.config.pad_token_id
        if pad is None:  # as transformers: the first EOS id, else 0
            pad = int(eos[0]) if len(eos) else 0
        self.setup_cache(attention_mask, T + 1)
        start, keep_up_to = self.reuse_prefix(input_ids, attention_mask)
        next_position = attention_mask.sum(-1, keepdims=True)  # (B, 1): RoPE position of the first new token
        tokens = [input_ids]
        finished = np.zeros(B, dtype=bool)
        if max_new_tokens > 0:
            logits = self.prefill(input_ids, attention_mask, start)
            if T <= keep_up_to:  # the cache holds the prompt now: record it for the next call
                self.cached_ids = input_ids[0].tolist()
                self.kept_states = {T: [cache["state"] for cache in self.linear_caches()]}  # Olmo Hybrid
        for i in range(max_new_tokens):
            check_finite(logits, i)
            token = sample(logits, temperature, top_k, top_p, rng)  # (B,)
            token = np.where(finished, pad, token)
            tokens.append(token[:, None])
            if callback is not None:
                callback(token)
            if len(eos):
                finished |= np.isin(token, eos)
                if finished.all():
                    break
            if i + 1 < max_new_tokens:
                if T + i + 1 > self.key_valid.shape[1]:
                    self.setup_cache(attention_mask, T + i + 1)
                logits = self.decode_one_token(token[:, None], self.slots[T + i:T + i + 1], next_position + i)
                if T + i < keep_up_to:  # slot T + i now holds this token
                    self.cached_ids.append(int(token[0]))
        fed = T + len(tokens) - 2  # Olmo Hybrid: the states hold every token but the last sampled (never fed)
        if max_new_tokens > 0 and self.cached_ids and len(self.cached_ids) == fed:
            self.kept_states[fed] = [cache["state"] for cache in self.linear_caches()]
        return np.concatenate(tokens, axis=1)

    # ------------------------------------------------------------------------------------------------------------
    # Loading (the readers are in the Loading section below the class)

    @classmethod
    def from_pretrained(cls, path, quantize=None):
        """Load a checkpoint directory as the hub ships it: config.json + model.safetensors, single or
        sharded. F32 weights stay memory-mapped (nothing is copied); F16 and BF16 are widened to float32.
        quantize "int8": every linear layer's weight, the head's included, as 8-bit integers (quantize_rows)."""
        config = OlmoConfig.from_json(os.path.join(path, "config.json"))
        weights = {}  # every tensor of the checkpoint, memory-mapped (see load_safetensors)
        for name in weight_files(path):
            weights.update(load_safetensors(os.path.join(path, name)))
        if "linear_attention" in config.layer_types:  # Olmo Hybrid
            weights = join_hub_layout(weights)
        expected = weight_shapes(config)
        if config.tie_word_embeddings:  # tied checkpoints may or may not store lm_head.weight (a copy)
            weights.pop("lm_head.weight", None)
            del expected["lm_head.weight"]
        check_state_dict(weights, expected)
        if config.tie_word_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # the same array, not a copy
        if quantize == "int8":  # the linear layers' weights: 2-D, all but the embedding (a tied head: its copy)
            kept = ("model.embed_tokens.weight", ".mlp.gate.weight")  # OLMoE: the router too, as olmo.py's
            for name in [n for n, w in weights.items() if w.ndim == 2 and not n.endswith(kept)]:
                weights[name], weights[name.removesuffix("weight") + "scale"] = quantize_rows(weights[name])
        return cls(config, weights)


# ----------------------------------------------------------------------------------------------------------------
# Generation: sampling, beside its caller OlmoForCausalLM.generate above


def sample(logits, temperature=0.0, top_k=None, top_p=None, rng=None):
    """logits (B, vocab) -> next tokens (B,). temperature 0 is greedy; otherwise scale by 1/temperature, keep
    the top_k logits (ties with the k-th included; 0 or None: all), then the smallest set of tokens whose
    probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    # Subtract the max before scaling, so a tiny temperature sends the others to -inf instead of the max to
    # inf (inf - inf = NaN); below 1e-30 the distribution is one-hot anyway (as in olmo.py).
    logits = logits.astype(np.float64)
    logits = (logits - logits.max(axis=-1, keepdims=True)) / max(temperature, 1e-30)
    if top_k and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, [-top_k]]  # the k-th largest, (B, 1)
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p is not None and top_p < 1.0:
        probs = softmax(logits)
        order = np.argsort(-probs, axis=-1, kind="stable")  # most likely first
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # drop a token when the more likely ones before it already reach top_p (so the top token always stays)
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= top_p
        drop_sorted[:, 0] = False  # and keep it whatever top_p is (as olmo.py must, where 1e-46 rounds to 0)
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)  # back to vocabulary order
        logits = np.where(drop, -np.inf, logits)
    probs = softmax(logits)
    rng = rng if rng is not None else np.random.default_rng()
    return np.array([rng.choice(len(p), p=p) for p in probs])


def check_finite(logits, step):
    """logits (B, vocab) holding NaN or infinity (corrupt weights, or activations past float32's range) would
    sample garbage, or make sampling fail: stop, naming the step. One max per step is all it costs: NaN and
    +inf carry through a max, and all -inf leaves it -inf."""
    top = logits.max(axis=-1)
    if not np.isfinite(top).all():
        kind = "NaN" if np.isnan(top).any() else "infinite"
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
        renamed[f"{prefix}conv1d.weight"] = np.concatenate(parts)
    return renamed


def weight_files(path):
    """The checkpoint's weight files: model.safetensors, or the shards model.safetensors.index.json lists."""
    index = "model.safetensors.index.json"
    if os.path.exists(os.path.join(path, index)):
        weight_map = read_json_object(os.path.join(path, index)).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: weight_map must be an object mapping tensor names to files")
        if not all(isinstance(f, str) and f and os.path.basename(f) == f for f in weight_map.values()):
            raise ValueError(f"{index}: weight_map values must be file names in {path}")
        return sorted(set(weight_map.values()))
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return ["model.safetensors"]
    torch_files = ("pytorch_model.bin", "pytorch_model.bin.index.json")
    if any(os.path.exists(os.path.join(path, f)) for f in torch_files):
        raise ValueError(f"{path} has pytorch_model.bin weights, which only torch can read; rewrite them as "
                         f"safetensors once with `python convert.py {path} DST` and load DST")
    raise ValueError(f"{path} has no model.safetensors")


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


# A .safetensors file is: 8 bytes, the little-endian length N of a JSON header; the header, mapping each
# tensor's name to {"dtype", "shape", "data_offsets": [begin, end)} (offsets count from the first byte after
# the header), plus an optional "__metadata__" object; then the tensors' raw little-endian bytes, back to
# back, to the end of file. F64 is refused rather than narrowed behind the user's back (convert.py writes
# float32).
# The dtypes read, by their safetensors code (BF16 as raw bits: see load_safetensors).
SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
MAX_HEADER = 100_000_000  # the safetensors library's own limit: a larger N means a corrupt file


def load_safetensors(file):
    """file -> {name: float32 array}. The file is memory-mapped: F32 tensors are views of its pages (read on
    demand, never copied); F16 and BF16 ones are widened to float32 copies. Anything inconsistent in the
    header raises a ValueError naming the file (and the tensor), never returns a wrong array."""

    def fail(message):
        raise ValueError(f"cannot read {file}: {message}")

    f = open_regular_file(file)
    try:
        with f:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays open while arrays view it
    except (OSError, ValueError) as e:  # ValueError: mmap of an empty file
        fail(e)
    if len(buffer) < 8:
        fail("file is shorter than the 8-byte header length")
    n = int.from_bytes(buffer[:8], "little")
    if n > MAX_HEADER or 8 + n > len(buffer):
        fail(f"header length {n} runs past the end of the file ({len(buffer)} bytes)")
    try:
        header = json.loads(buffer[8:8 + n])
    except (ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
        fail(f"header is not valid JSON ({type(e).__name__})")
    if not isinstance(header, dict):
        fail("header is not a JSON object")
    if not isinstance(header.pop("__metadata__", {}), dict):
        fail("header's __metadata__ is not a JSON object")
    entries = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, stop) = info["dtype"], list(info["shape"]), info["data_offsets"]
            well_formed = type(dtype) is str and all(type(d) is int and d >= 0 for d in shape + [begin, stop])
        except (TypeError, KeyError, ValueError):
            well_formed = False
        if not well_formed:
            fail(f"tensor {name} has a malformed header entry (it needs a dtype name, and a shape and "
                 "data_offsets of integers >= 0)")
        if dtype not in SAFETENSORS_DTYPES:
            fail(f"tensor {name} has dtype {dtype!r}; only {', '.join(SAFETENSORS_DTYPES)} are supported")
        entries.append((begin, stop, name, dtype, tuple(shape)))
    data_start = 8 + n
    data_size = len(buffer) - data_start
    tensors = {}
    end = 0  # where the next tensor must begin
    for begin, stop, name, dtype, shape in sorted(entries):
        # The tensors must tile the data exactly, in offset order: no gap, no overlap, nothing left over.
        if begin != end or stop > data_size:
            fail(f"tensor {name} has data_offsets [{begin}, {stop}), expected to start at {end} and end by "
                 f"{data_size}")
        stored = SAFETENSORS_DTYPES[dtype]
        count = math.prod(shape)
        nbytes = count * stored.itemsize
        if stop - begin != nbytes:
            fail(f"tensor {name} has {stop - begin} bytes, but shape {list(shape)} of {dtype} needs {nbytes}")
        array = np.frombuffer(buffer, stored, count, data_start + begin).reshape(shape)
        if dtype == "F16":
            array = array.astype(np.float32)
        elif dtype == "BF16":  # bfloat16 is the top half of a float32: shift its 16 bits into the high half
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array
        end = stop
    if end != data_size:
        fail(f"{data_size - end} bytes after the last tensor: the header does not describe the data")
    return tensors


def weight_shapes(config):
    """Every tensor the model needs, by transformers' name -> shape: what olmo.py's module tree declares.
    A linear layer's weight is (out_features, in_features), as checkpoints store it; linear applies it as
    x @ W.T."""
    C, I, D = config.hidden_size, config.intermediate_size, config.head_dim
    H, KV = config.num_attention_heads, config.num_key_value_heads
    shapes = {"model.embed_tokens.weight": (config.vocab_size, C)}
    for i, kind in enumerate(config.layer_types):
        layer, attn, mlp = f"model.layers.{i}", f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        experts = [mlp]
        if config.moe:  # OLMoE: the router, and an MLP per expert
            shapes[f"{mlp}.gate.weight"] = (config.num_experts, C)
            experts = [f"{mlp}.experts.{e}" for e in range(config.num_experts)]
        for expert in experts:
            shapes[f"{expert}.gate_proj.weight"] = shapes[f"{expert}.up_proj.weight"] = (I, C)
            shapes[f"{expert}.down_proj.weight"] = (C, I)
        if kind == "linear_attention":  # Olmo Hybrid: Gated DeltaNet, with RMSNorms before its sublayers
            Hk, Hv = config.linear_num_key_heads, config.linear_num_value_heads
            dk, dv = config.linear_key_head_dim, config.linear_value_head_dim
            for proj, out_features in (("q", Hk * dk), ("k", Hk * dk), ("v", Hv * dv), ("a", Hv), ("b", Hv),
                                       ("g", Hv * dv)):
                shapes[f"{layer}.linear_attn.{proj}_proj.weight"] = (out_features, C)
            shapes[f"{layer}.linear_attn.o_proj.weight"] = (C, Hv * dv)
            shapes[f"{layer}.linear_attn.conv1d.weight"] = (2 * Hk * dk + Hv * dv, 1, config.linear_conv_kernel_dim)
            shapes[f"{layer}.linear_attn.A_log"] = shapes[f"{layer}.linear_attn.dt_bias"] = (Hv,)
            shapes[f"{layer}.linear_attn.o_norm.weight"] = (dv,)
            shapes[f"{layer}.input_layernorm.weight"] = shapes[f"{layer}.post_attention_layernorm.weight"] = (C,)
            continue
        for proj, out_features, in_features in (("q_proj", H * D, C), ("k_proj", KV * D, C),
                                                ("v_proj", KV * D, C), ("o_proj", C, H * D)):
            shapes[f"{attn}.{proj}.weight"] = (out_features, in_features)
            if config.attention_bias:
                shapes[f"{attn}.{proj}.bias"] = (out_features,)
        if config.qk_norm:  # OLMo 2: the RMSNorms have weights (OLMo 1's LayerNorms have none)
            shapes[f"{attn}.q_norm.weight"] = (H * D,)
            shapes[f"{attn}.k_norm.weight"] = (KV * D,)
            norms = ["post_attention", "post_feedforward"] if config.norm_after else ["input", "post_attention"]
            for where in norms:
                shapes[f"{layer}.{where}_layernorm.weight"] = (C,)
    if config.qk_norm:  # OLMo 2: the final RMSNorm's weight
        shapes["model.norm.weight"] = (C,)
    shapes["lm_head.weight"] = (config.vocab_size, C)
    return shapes


def check_state_dict(state_dict, expected):
    """Names and shapes must match exactly (dtypes: see load_safetensors): a wrong checkpoint fails, and
    the error names the tensor."""
    for name, shape in expected.items():
        if name not in state_dict:
            raise ValueError(f"checkpoint is missing tensor {name}")
        if state_dict[name].shape != shape:
            raise ValueError(f"tensor {name} has shape {tuple(state_dict[name].shape)}, expected {tuple(shape)}")
    for name in state_dict:
        if name not in expected:
            raise ValueError(f"checkpoint has unexpected tensor {name}")


# ----------------------------------------------------------------------------------------------------------------
# 8-bit weights (--quantize int8): weight-only, symmetric, one scale per output row


def quantize_rows(w):
    """w (out, in) -> int8 q (out, in), float32 scale (out,): scale = max |row| / 127, q = round(w / scale), so
    |w - q * scale| <= scale / 2. The same float32 operations as olmo.py's, so both twins get the same q and
    scale; the product (linear) dequantizes, where olmo.py's CPU kernel rounds its inputs to bfloat16."""
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / np.float32(127), np.float32(1))  # a row of zeros: any scale (1 avoids 0/0)
    return np.round(w / scale[:, None]).astype(np.int8), scale


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
# QK-norm; OLMo 2's norms after each sublayer, not before (see decoder_layer); OLMoE's experts in each MLP's
# place (see sparse_moe_block); the type of 3 layers in 4, the 4th attending to every earlier token (OLMo 3's
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
# cli.py holds the command line both twins share; this is what it needs from NumPy.


class Backend:
    name = "NumPy, float32"

    def add_arguments(self, p):
        pass  # no flags of its own: float32 on the CPU

    def load(self, args, path):
        self.rng = np.random.default_rng(args.seed)
        return OlmoForCausalLM.from_pretrained(path, quantize=args.quantize)

    def generate(self, model, ids, max_new_tokens, callback, **settings):
        model.generate(np.array([ids]), max_new_tokens, rng=self.rng, callback=lambda t: callback(int(t[0])),
                       **settings)


def main(argv=None):
    import cli  # beside this file: the command line olmo.py and olmo_numpy.py share
    return cli.main(Backend(), argv)


if __name__ == "__main__":
    sys.exit(main())
