"""OLMo v1 in one readable PyTorch file.

OLMo (Groeneveld et al., 2024, https://arxiv.org/abs/2402.00838) is a decoder-only transformer: token embeddings,
N blocks of (norm -> attention with rotary positions -> residual, norm -> gated MLP -> residual), a final norm and
a linear head over the vocabulary. Its one unusual choice is the norm: a LayerNorm with no learnable weight or bias.

This file reads top to bottom in that order: config -> norm -> RoPE -> attention -> MLP -> block -> model ->
cache and generation -> loading -> CLI. Module and parameter names match transformers' `OlmoForCausalLM`, so its
checkpoints (allenai/OLMo-1B-hf, OLMo-7B-hf, OLMo-7B-0424-hf, ...) load with strict=True and no renaming, and the
logits equal transformers' (see test_olmo.py). It is meant to be read and copied, not configured: no framework.

    python olmo.py --model path/to/OLMo-1B-hf --prompt "Language models are"
"""

import json
import math
import os
import sys
import time
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Config


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
    initializer_range: float = 0.02  # std of the normal init of fresh (untrained) weights
    use_cache: bool = True  # transformers' flag; generate() here always uses the KV cache
    pad_token_id: int | None = 1  # fills rows that finished early in a batch
    bos_token_id: int | None = None  # OLMo adds no BOS token to prompts
    eos_token_id: int | list[int] | None = 50279  # generation stops at this token ("<|endoftext|>")
    tie_word_embeddings: bool = False  # lm_head shares the embedding matrix (OLMo-1B) or not (OLMo-7B)
    rope_theta: float = 10000.0  # RoPE base: wavelengths grow geometrically from 2*pi to ~2*pi*theta
    rope_scaling: dict | None = None  # None, {"rope_type": "linear" | "dynamic", "factor": f > 1}
    attention_bias: bool = False  # biases on q/k/v/o projections
    attention_dropout: float = 0.0  # dropout on attention probabilities, in training mode only
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


# The MLP gate's activations, by the names config.json uses (transformers' ACT2FN).
ACT2FN = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}

# ----------------------------------------------------------------------------------------------------------------
# Norm


class OlmoLayerNorm(nn.Module):
    """LayerNorm with no learnable weight or bias (OLMo's choice, for training stability and speed).
    Computed in float32 even for bf16 activations, like transformers, so the statistics don't lose precision."""

    def __init__(self, hidden_size):
        super().__init__()
        self.normalized_shape = (hidden_size,)

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, eps=1e-5).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Rotary position embedding (RoPE), rotate-half layout
#
# Each head vector is split in two halves (x1, x2); frequency i rotates the pair (x1[i], x2[i]) by the angle
# position * inv_freq[i]. Rotating q and k by their positions makes q.k depend only on the distance between them.


class OlmoRotaryEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.dim = config.head_dim
        scaling = config.rope_scaling or {}
        self.rope_type = scaling.get("rope_type", "default")
        self.factor = scaling.get("factor", 1.0)
        # Computed on the CPU even when the model is built on the meta device: a few numbers that no checkpoint
        # holds. Linear scaling ("position interpolation") divides every position, i.e. every frequency, by factor.
        exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device="cpu").float() / self.dim
        inv_freq = 1.0 / config.rope_theta ** exponents  # (dim/2,)
        if self.rope_type == "linear":
            inv_freq = inv_freq / self.factor
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("exponents", exponents, persistent=False)

    def dynamic_inv_freq(self, position_ids):
        # Dynamic NTK scaling raises the base once the sequence outgrows the trained context, so long-wavelength
        # dimensions interpolate while short ones keep their resolution. Like transformers, "the sequence" is the
        # largest position in this call; up to max_position_embeddings this is the unscaled base. So while decoding
        # past it, each step rotates with new frequencies but the cached keys keep the ones they were rotated with:
        # transformers behaves exactly so, and cached decoding then differs from a full forward (test_olmo.py checks
        # both). Written with tensor ops (no .item()) so the decode step still compiles into one graph.
        max_pos = self.config.max_position_embeddings
        seq_len = position_ids.max() + 1
        base = self.config.rope_theta * (self.factor * seq_len.float() / max_pos - (self.factor - 1)) ** (
            self.dim / (self.dim - 2))
        return torch.where(seq_len > max_pos, 1.0 / base ** self.exponents, self.inv_freq)

    def forward(self, position_ids):
        """position_ids (B, T) -> cos, sin (B, T, head_dim), float32."""
        inv_freq = self.dynamic_inv_freq(position_ids) if self.rope_type == "dynamic" else self.inv_freq
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # both halves of a pair turn by the same angle
        return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x, cos, sin):
    """x (B, heads, T, head_dim), cos/sin (B, T, head_dim). The product runs in float32, as in transformers."""
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Attention


class KVCache(nn.Module):
    """Keys and values of every position seen so far, preallocated for the whole generation and written in place,
    so a decode step never copies or grows them and keeps static shapes (what torch.compile and CUDA graphs need)."""

    def __init__(self, batch_size, max_len, num_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):
        """Write k, v (B, kv_heads, T, head_dim) at slots input_pos (T,); return the whole cache."""
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


class OlmoAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.kv_cache = None  # set by OlmoForCausalLM.setup_cache

    def forward(self, x, cos, sin, mask, input_pos=None):
        """x (B, T, hidden); mask (B, 1, T, S) bool, True = may attend; input_pos (T,) cache slots, or None to
        attend only within x (S = T)."""
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.config.clip_qkv is not None:  # OLMo-0424+: bounds activations, stabilising training
            c = self.config.clip_qkv
            q, k, v = q.clamp(-c, c), k.clamp(-c, c), v.clamp(-c, c)
        q = q.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, heads, T, head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, kv_heads, T, head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, kv_heads, S, head_dim)
        # One fused kernel for softmax(q k^T / sqrt(head_dim) + mask) v. enable_gqa lets each group of
        # num_heads / num_kv_heads query heads share a key/value head without copying k and v.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.config.attention_dropout if self.training else 0.0,
            enable_gqa=self.num_kv_heads != self.num_heads)  # (B, heads, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)
        return self.o_proj(y)


# ----------------------------------------------------------------------------------------------------------------
# MLP


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


# ----------------------------------------------------------------------------------------------------------------
# Block


class OlmoDecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config):
        super().__init__()
        self.self_attn = OlmoAttention(config)
        self.mlp = OlmoMLP(config)
        self.input_layernorm = OlmoLayerNorm(config.hidden_size)
        self.post_attention_layernorm = OlmoLayerNorm(config.hidden_size)

    def forward(self, x, cos, sin, mask, input_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------------------------
# Model


class OlmoModel(nn.Module):
    """Token ids -> final hidden states (B, T, hidden)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        # _weight: start uninitialised (OlmoForCausalLM._init_weights or the checkpoint fills it); nn.Embedding's
        # own normal_ init would cost seconds on the meta device, where from_pretrained builds the model.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(OlmoDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = OlmoLayerNorm(config.hidden_size)
        self.rotary_emb = OlmoRotaryEmbedding(config)

    def forward(self, input_ids, position_ids, mask, input_pos=None):
        """input_ids, position_ids (B, T); mask (B, 1, T, S); input_pos (T,) cache slots or None."""
        x = self.embed_tokens(input_ids)  # (B, T, hidden)
        cos, sin = self.rotary_emb(position_ids)  # computed once, shared by every layer
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos)
        return self.norm(x)


def causal_mask(key_valid):
    """key_valid (B, S) bool, False at padding -> (B, 1, S, S) bool: query i may attend to key j <= i that isn't
    padding. Every query also sees itself, so a padding query has one finite score instead of a softmax over
    nothing (NaN); its output is never used, since real tokens never attend to padding."""
    S = key_valid.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=key_valid.device).tril()
    diagonal = torch.eye(S, dtype=torch.bool, device=key_valid.device)
    return (causal & key_valid[:, None, None, :]) | diagonal


def positions_from_mask(attention_mask):
    """attention_mask (B, T) of 1/0 -> RoPE positions (B, T): left padding doesn't count, so a padded row gets the
    positions it would have alone (what transformers' generate computes too)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class OlmoForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = OlmoModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not self.lm_head.weight.is_meta:  # on the meta device (from_pretrained) there is nothing to fill
            self.apply(self._init_weights)

    def _init_weights(self, module):
        # transformers' init, for fresh models (tests, training from scratch)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()

    def forward(self, input_ids, attention_mask=None, labels=None):
        """The full forward, no cache: input_ids (B, T), attention_mask (B, T) 1 = token, 0 = left padding.
        Returns logits (B, T, vocab); with labels (B, T) returns (logits, loss), where loss is the mean
        cross-entropy of predicting token t+1 from positions <= t, over labels that aren't -100 (as transformers).
        Logits at padding positions are meaningless."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.model(input_ids, positions_from_mask(attention_mask), causal_mask(attention_mask.bool()))
        logits = self.lm_head(hidden)
        if labels is None:
            return logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return logits, loss

    # ------------------------------------------------------------------------------------------------------------
    # KV cache and generation
    #
    # Generation runs in two steps, as in gpt-fast: prefill pushes the whole prompt through once, filling the
    # cache; then decode_one_token feeds one token per step, attending to the cache. Cache slot s holds the s-th
    # token of the (left-padded) batch row; its RoPE position is s minus the row's padding.

    def setup_cache(self, attention_mask, max_len):
        """Allocate (or reuse, when the size matches) each layer's cache for max_len slots, and note which slots
        hold real tokens: key_valid (B, max_len), False at the prompt's padding."""
        B, T = attention_mask.shape
        p, attn = self.lm_head.weight, self.model.layers[0].self_attn
        for layer in self.model.layers:  # reusing the buffers keeps their addresses, which CUDA graphs replay from
            cache = layer.self_attn.kv_cache
            if cache is None or cache.k_cache.shape != (B, attn.num_kv_heads, max_len, attn.head_dim) \
                    or (cache.k_cache.dtype, cache.k_cache.device) != (p.dtype, p.device):
                layer.self_attn.kv_cache = KVCache(B, max_len, attn.num_kv_heads, attn.head_dim, p.dtype, p.device)
        self.key_valid = F.pad(attention_mask.bool(), (0, max_len - T), value=True)  # generated tokens are real
        self.slots = torch.arange(max_len, device=p.device)

    def prefill(self, input_ids, attention_mask):
        """input_ids, attention_mask (B, T) -> logits of the last position (B, vocab)."""
        T = input_ids.shape[1]
        input_pos = torch.arange(T, device=input_ids.device)
        # the prompt attends causally within itself; the cache's empty slots after it are masked out
        mask = F.pad(causal_mask(attention_mask.bool()), (0, len(self.slots) - T), value=False)  # (B, 1, T, S)
        hidden = self.model(input_ids, positions_from_mask(attention_mask), mask, input_pos)
        return self.lm_head(hidden[:, -1])  # the vocab projection only where we sample: (B, vocab)

    def decode_one_token(self, token, input_pos, position_ids):
        """token, position_ids (B, 1); input_pos (1,) the cache slot -> logits (B, vocab)."""
        mask = ((self.slots <= input_pos) & self.key_valid)[:, None, None]  # (B, 1, 1, S): filled, real slots
        hidden = self.model(token, position_ids, mask, input_pos)
        return self.lm_head(hidden[:, -1])

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, eos_token_id=None,
                 attention_mask=None, generator=None, callback=None):
        """input_ids (B, T), left-padded when prompts differ in length (attention_mask 0 on padding).
        Returns (B, T + n) prompt + new tokens, n <= max_new_tokens: generation ends when every row has produced
        an EOS (rows that finish early are filled with pad_token_id after it, as in transformers).
        temperature=0 is greedy; callback(tokens (B,)) is called with each step's tokens (for streaming)."""
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        eos = torch.tensor([] if eos_token_id is None else eos_token_id, dtype=torch.long,
                           device=input_ids.device).reshape(-1)  # an int or a list of ints
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else (eos.tolist() or [0])[0]
        self.setup_cache(attention_mask, T + max_new_tokens)
        next_position = attention_mask.sum(-1, keepdim=True)  # (B, 1): RoPE position of the first new token
        tokens = [input_ids]
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        if max_new_tokens > 0:
            logits = self.prefill(input_ids, attention_mask)
        for i in range(max_new_tokens):
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
                # the slot as a view of self.slots: a tensor built per step would be a host-to-device copy that
                # stalls the CPU until the GPU catches up
                logits = self.decode_one_token(token[:, None], self.slots[T + i:T + i + 1], next_position + i)
        return torch.cat(tokens, dim=1)

    # ------------------------------------------------------------------------------------------------------------
    # Loading

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=torch.float32):
        """Load a checkpoint directory as the hub ships it (config.json + safetensors or pytorch_model.bin, single
        or sharded), or a hub id such as "allenai/OLMo-1B-hf" (downloaded with huggingface_hub)."""
        path = resolve_checkpoint(path)
        config = OlmoConfig.from_json(os.path.join(path, "config.json"))
        with torch.device("meta"):  # shapes only: no memory, no random init of billions of weights
            model = cls(config)
        state_dict = load_state_dict(path)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:  # tied checkpoints may or may not store lm_head.weight (a copy)
            state_dict.pop("lm_head.weight", None)
            del expected["lm_head.weight"]
        check_state_dict(state_dict, expected)
        state_dict = {k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}  # no-op if they match
        model.load_state_dict(state_dict, strict=False, assign=True)  # strictness checked above, with clearer errors
        head = model.model.embed_tokens if config.tie_word_embeddings else model.lm_head
        if head.weight.device.type == "cpu":
            # The CPU BLAS multiplies one token by the (vocab, hidden) head 1.5-5x faster when the matrix is stored
            # column by column (same shape, same values, one copy of the head; bench.py measures the difference).
            head.weight = nn.Parameter(head.weight.t().contiguous().t(), head.weight.requires_grad)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.model.rotary_emb.to(device or "cpu")  # its buffers aren't in the checkpoint: built on the CPU
        return model.eval()


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
    """A local directory is used as is; "org/name" that isn't one is fetched from the Hugging Face hub."""
    if os.path.isdir(path):
        return path
    if os.path.exists(path) or path.count("/") != 1 or path.startswith((".", "/")):
        raise ValueError(f"{path} is not a checkpoint directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(f"{path} is not a directory; to fetch it from the hub, pip install huggingface_hub "
                         f"or download it with `huggingface-cli download {path} --local-dir DIR`") from None
    try:  # safetensors if the repo has them, the .bin files otherwise
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.bin", "tokenizer*"])
    except Exception as e:  # offline, unknown repo, no network: one line, not a traceback
        raise ValueError(f"cannot fetch {path} from the hub ({type(e).__name__}); download it when online, "
                         "or pass a local checkpoint directory") from None


def load_state_dict(path):
    """Every tensor of the checkpoint, memory-mapped (the file's pages are read on demand, never copied)."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.exists(os.path.join(path, index)):
            try:
                with open(os.path.join(path, index)) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as e:
                raise ValueError(f"cannot read {index}: {e}") from None
            break
        if os.path.exists(os.path.join(path, single)):
            files = [single]
            break
    else:
        raise ValueError(f"{path} has no model.safetensors or pytorch_model.bin")
    state_dict = {}
    for name in files:
        state_dict.update(load_file(os.path.join(path, name)))
    return state_dict


def load_file(file):
    try:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file as load_safetensors
            return load_safetensors(file)  # memory-mapped by safetensors
        # weights_only: a .bin is a pickle, and unpickling arbitrary objects can run arbitrary code
        return torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {file}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, vocab) -> next tokens (B,). temperature 0 is greedy; otherwise scale by 1/temperature, keep the
    top_k logits (ties with the k-th included), then the smallest set of tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
        # drop a token when the more likely ones before it already reach top_p (so the top token always stays)
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, -math.inf)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------------------------------------------
# CLI: cli.py holds the command line both twins share; this is what it needs from torch.


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Backend:
    name = "PyTorch"

    def add_arguments(self, p):
        p.add_argument("--model", default="allenai/OLMo-1B-hf", help="checkpoint directory or hub id "
                                                                     "(default: %(default)s)")
        p.add_argument("--revision", help="hub revision: branch, tag or commit, e.g. an intermediate training "
                                          "checkpoint such as step1000-tokens4B (default: the latest)")
        p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
        p.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on a GPU, float32 on the CPU")
        p.add_argument("--compile", action="store_true", help="torch.compile the decode step (default: off)")

    def load(self, args):
        cuda = ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
        available = cuda + ["mps"] * torch.backends.mps.is_available() + ["cpu"]  # the first is the default
        device = args.device or available[0]
        if device not in available:
            raise ValueError(f"--device {device} is not available here (available: {', '.join(available)})")
        dtype = DTYPES[args.dtype] if args.dtype else torch.float32 if device == "cpu" else torch.bfloat16
        self.name = f"PyTorch on {device}, {str(dtype).removeprefix('torch.')}"
        if args.seed is not None:
            torch.manual_seed(args.seed)
        path = resolve_checkpoint(args.model, **{"revision": args.revision} if args.revision else {})
        model = OlmoForCausalLM.from_pretrained(path, device=device, dtype=dtype)
        if args.compile:  # CUDA graphs on GPU remove the per-kernel launch cost that dominates one-token steps
            mode = "reduce-overhead" if device.startswith("cuda") else "default"
            model.decode_one_token = torch.compile(model.decode_one_token, mode=mode, fullgraph=True)
        return model, path

    def generate(self, model, ids, max_new_tokens, callback, **settings):
        device = model.lm_head.weight.device
        model.generate(torch.tensor([ids], device=device), max_new_tokens, callback=lambda t: callback(int(t[0])),
                       **settings)

    def max_context(self, model):
        scaling = model.config.rope_scaling or {}
        return None if scaling.get("rope_type") == "dynamic" else model.config.max_position_embeddings


def main(argv=None):
    import cli  # beside this file: the command line olmo.py and olmo_numpy.py share
    return cli.main(Backend(), argv)


if __name__ == "__main__":
    sys.exit(main())
