"""OLMo v1 in one readable NumPy file: olmo.py's twin, with every matrix product written out.

Frameworks hide the arithmetic; this file shows it. The layer norm, the rotation, the attention softmax, the MLP
and the KV cache are plain array code over a dict of weights (named as in transformers' checkpoints), and the
.safetensors reader is a few lines of header parsing over a memory map. It tells the same story in the same order
as olmo.py: config -> norm -> RoPE -> attention -> MLP -> block -> model -> cache and generation -> loading -> CLI,
with the same names where the concept is the same, so the two files read side by side. Its logits equal olmo.py's
and transformers' to float32 rounding (the tests check both). It needs only NumPy (and tokenizers for the CLI), no
torch. Everything runs in float32; float16 and bfloat16 checkpoints are widened to float32 when they load.
Local checkpoint directories only (fetching hub ids would need huggingface_hub).

    python olmo_numpy.py --model path/to/OLMo-1B-hf --prompt "Language models are"
"""

import json
import math
import mmap
import os
import sys
import time
from dataclasses import dataclass, fields

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# Config (the same dataclass as olmo.py's, repeated on purpose: this file imports nothing from it)


@dataclass
class OlmoConfig:
    """Every field of transformers' OlmoConfig, with its defaults: the OLMo-7B shape."""

    vocab_size: int = 50304  # 50280 real tokens, padded to a multiple of 128 for fast matmuls
    hidden_size: int = 4096  # d_model: the width of the residual stream
    intermediate_size: int = 11008  # width of the MLP's hidden layer (per gate/up projection)
    num_hidden_layers: int = 32  # number of decoder blocks
    num_attention_heads: int = 32  # query heads; head_dim = hidden_size // num_attention_heads
    num_key_value_heads: int | None = None  # key/value heads: None = num_attention_heads (MHA), 1 = MQA, else GQA
    hidden_act: str = "silu"  # the MLP gate's activation (SwiGLU with silu)
    max_position_embeddings: int = 2048  # context length trained on; dynamic RoPE scales beyond it
    initializer_range: float = 0.02  # std of the normal init of fresh weights (unused here: we only load)
    use_cache: bool = True  # transformers' flag; generate() here always uses the KV cache
    pad_token_id: int | None = 1  # fills rows that finished early in a batch
    bos_token_id: int | None = None  # OLMo adds no BOS token to prompts
    eos_token_id: int | list[int] | None = 50279  # generation stops at this token ("<|endoftext|>")
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix (OLMo-1B) or not (OLMo-7B)
    rope_theta: float = 10000.0  # RoPE base: wavelengths grow geometrically from 2*pi to ~2*pi*theta
    rope_scaling: dict | None = None  # None, {"rope_type": "linear" | "dynamic", "factor": f > 1}
    attention_bias: bool = False  # biases on q/k/v/o projections
    attention_dropout: float = 0.0  # dropout on attention probabilities, in training only (none here)
    clip_qkv: float | None = None  # clamp q, k and v to [-clip_qkv, clip_qkv] (OLMo-7B-0424 uses 8.0)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not divisible by "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (use one of {', '.join(ACT2FN)})")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("linear", "dynamic"):
                raise ValueError(f"rope_scaling type {kind!r} is not supported (use 'linear' or 'dynamic')")
            factor = self.rope_scaling.get("factor")
            if not isinstance(factor, (int, float)) or factor <= 1:
                raise ValueError(f"rope_scaling factor must be a number > 1, got {factor!r}")
            self.rope_scaling = {"rope_type": kind, "factor": float(factor)}

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d):
        """Read a config.json as transformers 4.x writes it (top-level rope_theta, rope_scaling with "type" or
        "rope_type") or as transformers 5 does (rope_parameters = {"rope_type", "rope_theta", "factor"})."""
        if d.get("model_type", "olmo") != "olmo":
            raise ValueError(f"model_type is {d.get('model_type')!r}, not 'olmo' (for 'hf_olmo' or trainer "
                             "checkpoints run convert.py first)")
        d = dict(d)
        rope = d.pop("rope_parameters", None)
        if rope:  # transformers 5: theta and scaling live together
            d["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                d["rope_scaling"] = rope
        known = {f.name for f in fields(cls)}  # everything else (architectures, torch_dtype, ...) is irrelevant
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path):
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path}: {e}") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path} does not hold a JSON object")
        return cls.from_dict(d)


# ----------------------------------------------------------------------------------------------------------------
# Weights: the tensors olmo.py's modules hold, by their transformers names, and the one operation on them


def weight_shapes(config):
    """Every tensor the model needs, by transformers' name -> shape: what olmo.py's module tree declares.
    A linear layer's weight is (out_features, in_features), as checkpoints store it; it is applied as x @ W.T."""
    C, I, D = config.hidden_size, config.intermediate_size, config.head_dim
    H, KV = config.num_attention_heads, config.num_key_value_heads
    shapes = {"model.embed_tokens.weight": (config.vocab_size, C)}
    for i in range(config.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        for proj, out_features, in_features in (("q_proj", H * D, C), ("k_proj", KV * D, C),
                                                ("v_proj", KV * D, C), ("o_proj", C, H * D)):
            shapes[f"{attn}.{proj}.weight"] = (out_features, in_features)
            if config.attention_bias:
                shapes[f"{attn}.{proj}.bias"] = (out_features,)
        shapes[f"{mlp}.gate_proj.weight"] = (I, C)
        shapes[f"{mlp}.up_proj.weight"] = (I, C)
        shapes[f"{mlp}.down_proj.weight"] = (C, I)
    shapes["lm_head.weight"] = (config.vocab_size, C)
    return shapes  # OLMo's layer norms have no weights, so they have no entries


def linear(x, weights, name):
    """x (..., in) -> (..., out): x W^T + b, with W (out, in) as stored. The .T is a view: nothing is copied."""
    y = x @ weights[f"{name}.weight"].T
    bias = weights.get(f"{name}.bias")
    return y if bias is None else y + bias


# The MLP gate's activations, by the names config.json uses (transformers' ACT2FN).


def silu(x):
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for x < -88; x / inf = -0 is the right limit
        return x / (1.0 + np.exp(-x))


def erf(x):
    """The error function, which NumPy lacks (math.erf is one Python call per element): Abramowitz & Stegun
    7.1.26, absolute error below 1.5e-7, evaluated in float64 so that only the final rounding to float32 (half an
    ulp, <= 3e-8) adds to it. The bound is absolute, and gelu = 0.5 * x * (1 + erf(x / sqrt 2)) turns it into an
    absolute error of up to |x| / 2 * 1.5e-7, not a relative one: where gelu nears 0 (x < -4, |gelu| < 1e-4) the
    relative error grows without bound (4% at x = -5), harmless next to the O(1) activations around it."""
    a1, a2, a3, a4, a5, p = 0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429, 0.3275911
    z = np.abs(x).astype(np.float64)
    t = 1.0 / (1.0 + p * z)
    y = 1.0 - ((((a5 * t + a4) * t + a3) * t + a2) * t + a1) * t * np.exp(-z * z)
    return (np.sign(x) * y).astype(x.dtype)


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


ACT2FN = {
    "silu": silu,
    "swish": silu,
    "gelu": gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": lambda x: np.maximum(x, 0.0),
}

# ----------------------------------------------------------------------------------------------------------------
# Norm


def layer_norm(x, eps=1e-5):
    """LayerNorm with no learnable weight or bias (OLMo's choice): each vector to mean 0 and variance 1."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased (divides by n), like torch's layer_norm
    return (x - mean) / np.sqrt(var + eps)


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE), rotate-half layout
#
# Each head vector is split in two halves (x1, x2); frequency i rotates the pair (x1[i], x2[i]) by the angle
# position * inv_freq[i]. Rotating q and k by their positions makes q.k depend only on the distance between them.
# Everything is float32, as in olmo.py, so the angles round the same way.


def rope_inv_freq(config, position_ids):
    """The rotation frequencies (head_dim/2,) for this call's positions (B, T)."""
    dim = config.head_dim
    scaling = config.rope_scaling or {}
    kind, factor = scaling.get("rope_type", "default"), scaling.get("factor", 1.0)
    exponents = np.arange(0, dim, 2).astype(np.float32) / dim
    inv_freq = 1.0 / np.float32(config.rope_theta) ** exponents  # (dim/2,)
    max_pos = config.max_position_embeddings
    if kind == "linear":  # "position interpolation": every position divided by factor, i.e. every frequency
        inv_freq = inv_freq / np.float32(factor)
    elif kind == "dynamic" and position_ids.max() + 1 > max_pos:
        # Dynamic NTK scaling raises the base once the sequence outgrows the trained context, so long-wavelength
        # dimensions interpolate while short ones keep their resolution. Like transformers, "the sequence" is the
        # largest position in this call; up to max_position_embeddings this is the unscaled base.
        seq_len = np.float32(position_ids.max() + 1)
        base = config.rope_theta * (factor * seq_len / max_pos - (factor - 1)) ** (dim / (dim - 2))
        inv_freq = 1.0 / np.float32(base) ** exponents
    return inv_freq.astype(np.float32)


def rotary_emb(config, position_ids):
    """position_ids (B, T) -> cos, sin (B, T, head_dim), float32."""
    freqs = position_ids[..., None].astype(np.float32) * rope_inv_freq(config, position_ids)  # (B, T, dim/2)
    emb = np.concatenate((freqs, freqs), axis=-1)  # both halves of a pair turn by the same angle
    return np.cos(emb), np.sin(emb)


def rotate_half(x):
    x1, x2 = np.split(x, 2, axis=-1)
    return np.concatenate((-x2, x1), axis=-1)


def apply_rotary_pos_emb(x, cos, sin):
    """x (B, heads, T, head_dim), cos/sin (B, T, head_dim)."""
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------------------------
# Attention


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))  # minus the max: exp never overflows, and -inf -> 0
    return e / e.sum(axis=-1, keepdims=True)


def attention(weights, name, config, x, cos, sin, mask, cache=None, input_pos=0):
    """x (B, T, hidden); mask (B, 1, T, S) bool, True = may attend. cache = (k_cache, v_cache), each
    (B, kv_heads, max_len, head_dim): x's keys and values are written at slots input_pos .. input_pos+T-1 and
    attention runs over slots 0 .. input_pos+T-1 (S = input_pos + T). Without a cache, S = T."""
    B, T, _ = x.shape
    H, KV, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    q = linear(x, weights, f"{name}.q_proj")  # (B, T, H*D)
    k = linear(x, weights, f"{name}.k_proj")  # (B, T, KV*D)
    v = linear(x, weights, f"{name}.v_proj")  # (B, T, KV*D)
    if config.clip_qkv is not None:  # OLMo-0424+: bounds activations, stabilising training
        c = config.clip_qkv
        q, k, v = np.clip(q, -c, c), np.clip(k, -c, c), np.clip(v, -c, c)
    q = q.reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
    k = k.reshape(B, T, KV, D).transpose(0, 2, 1, 3)  # (B, KV, T, D)
    v = v.reshape(B, T, KV, D).transpose(0, 2, 1, 3)
    q, k = apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)
    if cache is not None:
        k_cache, v_cache = cache
        k_cache[:, :, input_pos:input_pos + T] = k  # written in place: the cache never grows or moves
        v_cache[:, :, input_pos:input_pos + T] = v
        k, v = k_cache[:, :, :input_pos + T], v_cache[:, :, :input_pos + T]  # (B, KV, S, D), views
    # Grouped-query attention: each group of H/KV query heads shares one key/value head. Reshaping q to
    # (B, KV, group, T, D) lets the matmul broadcast k and v over the group, instead of copying them H/KV times.
    q = q.reshape(B, KV, H // KV, T, D)
    k, v = k[:, :, None], v[:, :, None]  # (B, KV, 1, S, D)
    scores = q @ k.swapaxes(-1, -2) / np.float32(math.sqrt(D))  # (B, KV, group, T, S)
    scores = np.where(mask[:, :, None], scores, -np.inf)  # mask (B, 1, 1, T, S)
    y = softmax(scores) @ v  # (B, KV, group, T, D)
    y = y.reshape(B, H, T, D).transpose(0, 2, 1, 3).reshape(B, T, H * D)
    return linear(y, weights, f"{name}.o_proj")  # (B, T, hidden)


# ----------------------------------------------------------------------------------------------------------------
# MLP


def mlp(weights, name, config, x):
    """Gated MLP (SwiGLU with silu): down(act(gate(x)) * up(x)). x (B, T, hidden) -> (B, T, intermediate) ->
    (B, T, hidden)."""
    act = ACT2FN[config.hidden_act]
    return linear(act(linear(x, weights, f"{name}.gate_proj")) * linear(x, weights, f"{name}.up_proj"),
                  weights, f"{name}.down_proj")


# ----------------------------------------------------------------------------------------------------------------
# Block


def decoder_layer(weights, i, config, x, cos, sin, mask, cache=None, input_pos=0):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""
    attn, ffn = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
    x = x + attention(weights, attn, config, layer_norm(x), cos, sin, mask, cache, input_pos)
    return x + mlp(weights, ffn, config, layer_norm(x))


# ----------------------------------------------------------------------------------------------------------------
# Model


def olmo_model(weights, config, input_ids, position_ids, mask, caches=None, input_pos=0):
    """Token ids -> final hidden states. input_ids, position_ids (B, T); mask (B, 1, T, S); caches: one
    (k_cache, v_cache) per layer, or None."""
    x = weights["model.embed_tokens.weight"][input_ids]  # (B, T, hidden): a row lookup
    cos, sin = rotary_emb(config, position_ids)  # computed once, shared by every layer
    for i in range(config.num_hidden_layers):
        cache = None if caches is None else caches[i]
        x = decoder_layer(weights, i, config, x, cos, sin, mask, cache, input_pos)
    return layer_norm(x)


def causal_mask(key_valid):
    """key_valid (B, S) bool, False at padding -> (B, 1, S, S) bool: query i may attend to key j <= i that isn't
    padding. Every query also sees itself, so a padding query has one finite score instead of a softmax over
    nothing (NaN); its output is never used, since real tokens never attend to padding."""
    S = key_valid.shape[1]
    causal = np.tril(np.ones((S, S), dtype=bool))
    diagonal = np.eye(S, dtype=bool)
    return (causal & key_valid[:, None, None, :]) | diagonal


def positions_from_mask(attention_mask):
    """attention_mask (B, T) of 1/0 -> RoPE positions (B, T): left padding doesn't count, so a padded row gets the
    positions it would have alone (what transformers' generate computes too)."""
    return np.maximum(np.cumsum(attention_mask.astype(np.int64), axis=-1) - 1, 0)


class OlmoForCausalLM:
    """The config and the weight dict (transformers' names -> float32 arrays); the functions above do the rest."""

    def __init__(self, config, weights):
        self.config = config
        self.weights = weights
        self.caches = None  # set by setup_cache

    def __call__(self, input_ids, attention_mask=None):
        """The full forward, no cache: input_ids (B, T) ints, attention_mask (B, T) 1 = token, 0 = left padding.
        Returns float32 logits (B, T, vocab). Logits at padding positions are meaningless."""
        input_ids = np.asarray(input_ids)
        attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
        hidden = olmo_model(self.weights, self.config, input_ids, positions_from_mask(attention_mask),
                            causal_mask(attention_mask.astype(bool)))
        return linear(hidden, self.weights, "lm_head")  # (B, T, vocab)

    # ------------------------------------------------------------------------------------------------------------
    # KV cache and generation
    #
    # Generation runs in two steps, as in gpt-fast: prefill pushes the whole prompt through once, filling the
    # cache; then decode_one_token feeds one token per step, attending to the cache. Cache slot s holds the s-th
    # token of the (left-padded) batch row; its RoPE position is s minus the row's padding.

    def setup_cache(self, attention_mask, max_len):
        """Allocate each layer's cache for max_len slots, float32 zeros (B, kv_heads, max_len, head_dim), and note
        which slots hold real tokens: key_valid (B, max_len), False at the prompt's padding."""
        B, T = attention_mask.shape
        shape = (B, self.config.num_key_value_heads, max_len, self.config.head_dim)
        self.caches = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32))
                       for _ in range(self.config.num_hidden_layers)]
        self.key_valid = np.pad(attention_mask.astype(bool), ((0, 0), (0, max_len - T)), constant_values=True)

    def prefill(self, input_ids, attention_mask):
        """input_ids, attention_mask (B, T) -> logits of the last position (B, vocab)."""
        hidden = olmo_model(self.weights, self.config, input_ids, positions_from_mask(attention_mask),
                            causal_mask(attention_mask.astype(bool)), self.caches, input_pos=0)
        return linear(hidden[:, -1], self.weights, "lm_head")  # the vocab projection only where we sample

    def decode_one_token(self, token, input_pos, position_ids):
        """token, position_ids (B, 1); input_pos the cache slot (an int) -> logits (B, vocab)."""
        mask = self.key_valid[:, None, None, :input_pos + 1]  # (B, 1, 1, S): the filled slots, less padding
        hidden = olmo_model(self.weights, self.config, token, position_ids, mask, self.caches, input_pos)
        return linear(hidden[:, -1], self.weights, "lm_head")

    def generate(self, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_token_id=None,
                 attention_mask=None, rng=None, callback=None):
        """input_ids (B, T), left-padded when prompts differ in length (attention_mask 0 on padding).
        Returns (B, T + n) prompt + new tokens, n <= max_new_tokens: generation ends when every row has produced
        an EOS (rows that finish early are filled with pad_token_id after it, as in transformers).
        temperature=0 is greedy; rng a np.random.Generator for sampling; callback(tokens (B,)) is called with
        each step's tokens (for streaming)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        B, T = input_ids.shape
        attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
        eos = np.array([] if eos_token_id is None else eos_token_id, dtype=np.int64).reshape(-1)  # int or list
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else (eos.tolist() or [0])[0]
        self.setup_cache(attention_mask, T + max_new_tokens)
        next_position = attention_mask.sum(-1, keepdims=True)  # (B, 1): RoPE position of the first new token
        tokens = [input_ids]
        finished = np.zeros(B, dtype=bool)
        if max_new_tokens > 0:
            logits = self.prefill(input_ids, attention_mask)
        for i in range(max_new_tokens):
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
                logits = self.decode_one_token(token[:, None], T + i, next_position + i)
        return np.concatenate(tokens, axis=1)

    # ------------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(cls, path):
        """Load a checkpoint directory as the hub ships it: config.json + model.safetensors, single or sharded.
        F32 weights stay memory-mapped (nothing is copied); F16 and BF16 are widened to float32."""
        path = resolve_checkpoint(path)
        config = OlmoConfig.from_json(os.path.join(path, "config.json"))
        weights = load_state_dict(path)
        expected = weight_shapes(config)
        if config.tie_word_embeddings:  # tied checkpoints may or may not store lm_head.weight (a copy)
            weights.pop("lm_head.weight", None)
            del expected["lm_head.weight"]
        check_state_dict(weights, expected)
        if config.tie_word_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # the same array, not a copy
        return cls(config, weights)


def check_state_dict(state_dict, expected):
    """Names and shapes must match exactly: a wrong checkpoint must fail loudly, naming the tensor."""
    for name, shape in expected.items():
        if name not in state_dict:
            raise ValueError(f"checkpoint is missing tensor {name}")
        if state_dict[name].shape != shape:
            raise ValueError(f"tensor {name} has shape {tuple(state_dict[name].shape)}, expected {tuple(shape)}")
    for name in state_dict:
        if name not in expected:
            raise ValueError(f"checkpoint has unexpected tensor {name}")


def resolve_checkpoint(path):
    """Local directories only: fetching from the hub would need huggingface_hub, and this file needs only NumPy."""
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a checkpoint directory (to use a hub id, download it first: "
                         f"`huggingface-cli download {path} --local-dir DIR`)")
    return path


def load_state_dict(path):
    """Every tensor of the checkpoint: model.safetensors, or the shards model.safetensors.index.json lists."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"cannot read model.safetensors.index.json: {e}") from None
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    elif any(os.path.exists(os.path.join(path, f)) for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise ValueError(f"{path} has pytorch_model.bin weights, which only torch can read; rewrite them as "
                         f"safetensors once with `python convert.py {path} DST` and load DST")
    else:
        raise ValueError(f"{path} has no model.safetensors")
    state_dict = {}
    for name in files:
        state_dict.update(load_safetensors(os.path.join(path, name)))
    return state_dict


# A .safetensors file is: 8 bytes, the little-endian length N of a JSON header; the header, mapping each tensor's
# name to {"dtype", "shape", "data_offsets": [begin, end)} (offsets count from the first byte after the header),
# plus an optional "__metadata__" entry; then the tensors' raw little-endian bytes, back to back, to the end of file.
DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}  # BF16: raw bits, see below
MAX_HEADER = 100_000_000  # the safetensors library's own limit: a larger N means a corrupt file


def load_safetensors(file):
    """file -> {name: float32 array}. The file is memory-mapped: F32 tensors are views of its pages (read on
    demand, never copied); F16 and BF16 ones are widened to float32 copies. Anything inconsistent in the header
    raises a ValueError naming the file (and the tensor), never returns a wrong array."""

    def fail(message):
        raise ValueError(f"cannot read {file}: {message}")

    try:
        with open(file, "rb") as f:
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
    except ValueError as e:
        fail(f"header is not valid JSON ({e})")
    if not isinstance(header, dict):
        fail("header is not a JSON object")
    header.pop("__metadata__", None)
    entries = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, stop) = info["dtype"], list(info["shape"]), info["data_offsets"]
            well_formed = all(type(d) is int and d >= 0 for d in shape + [begin, stop])
        except (TypeError, KeyError, ValueError):
            well_formed = False
        if not well_formed:
            fail(f"tensor {name} has a malformed header entry {info!r}")
        if dtype not in DTYPES:
            fail(f"tensor {name} has dtype {dtype!r}; only {', '.join(DTYPES)} are supported")
        entries.append((begin, stop, name, dtype, tuple(shape)))
    data_start, data_size = 8 + n, len(buffer) - 8 - n
    tensors, end = {}, 0
    for begin, stop, name, dtype, shape in sorted(entries):
        # The tensors must tile the data exactly, in offset order: no gap, no overlap, nothing left over.
        if begin != end or stop > data_size:
            fail(f"tensor {name} has data_offsets [{begin}, {stop}), expected to start at {end} and end by "
                 f"{data_size}")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if stop - begin != nbytes:
            fail(f"tensor {name} has {stop - begin} bytes, but shape {list(shape)} of {dtype} needs {nbytes}")
        array = np.frombuffer(buffer, DTYPES[dtype], math.prod(shape), data_start + begin).reshape(shape)
        if dtype == "F16":
            array = array.astype(np.float32)
        elif dtype == "BF16":  # bfloat16 is the top half of a float32: shift its 16 bits into the high half
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name], end = array, stop
    if end != data_size:
        fail(f"{data_size - end} bytes after the last tensor: the header does not describe the data")
    return tensors


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def sample(logits, temperature=0.0, top_k=None, top_p=None, rng=None):
    """logits (B, vocab) -> next tokens (B,). temperature 0 is greedy; otherwise scale by 1/temperature, keep the
    top_k logits (ties with the k-th included), then the smallest set of tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, [-top_k]]  # the k-th largest, (B, 1)
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p is not None and top_p < 1.0:
        probs = softmax(logits)
        order = np.argsort(-probs, axis=-1, kind="stable")  # most likely first
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # drop a token when the more likely ones before it already reach top_p (so the top token always stays)
        drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= top_p
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)  # back to vocabulary order
        logits = np.where(drop, -np.inf, logits)
    probs = softmax(logits)
    rng = rng if rng is not None else np.random.default_rng()
    return np.array([rng.choice(len(p), p=p) for p in probs])


# ----------------------------------------------------------------------------------------------------------------
# CLI: cli.py holds the command line both twins share; this is what it needs from NumPy.


class Backend:
    name = "NumPy, float32"

    def add_arguments(self, p):
        p.add_argument("--model", required=True, help="checkpoint directory (config.json, model.safetensors, "
                                                      "tokenizer.json); required")

    def load(self, args):
        self.rng = np.random.default_rng(args.seed)
        path = resolve_checkpoint(args.model)
        return OlmoForCausalLM.from_pretrained(path), path

    def generate(self, model, ids, max_new_tokens, callback, **settings):
        model.generate(np.array([ids]), max_new_tokens, rng=self.rng, callback=lambda t: callback(int(t[0])),
                       **settings)


def main(argv=None):
    import cli  # beside this file: the command line olmo.py and olmo_numpy.py share
    return cli.main(Backend(), argv)


if __name__ == "__main__":
    sys.exit(main())
