"""Tests of convert.py, the checkpoint converter: trainer, hf_olmo and transformers layouts in, transformers'
layout out, against a reference forward written from the trainer's semantics."""

import base64
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert
import olmo
import olmo_numpy
from conftest import (HERE, assert_close, capped, fifo_released, link_dev_zero, make_fifo, memory_cap, one_error_line,
                      reference_model, run_cli, sparse, transformers_source)


# ----------------------------------------------------------------------------------------------------------------
# convert.py, the checkpoint converter: trainer checkpoints built here
#
# Tiny checkpoints are built here in each source layout, with random weights under the original names; their
# expected logits come from `trainer_reference_logits`, a forward pass written from the OLMo trainer's semantics
# (olmo/model.py in ai2-olmo 0.6.0) straight on the fused tensors, never from convert.py's mapping.
# Tolerance: assert_close's default, ATOL = RTOL = 2^-14 (conftest.py's docstring). The reference is float64 and
# transformers runs the converted checkpoint in float32, conftest.py's analysis with one change: the
# trainer's embedding has std 1, not d^-1/2, so a tied head's logits are sqrt(d) ~ 6 times larger (up to ~30) and
# so are their errors, which the relative part follows. One float32 side would allow FP32_TOL; the default, twice
# that, also covers the checks here between two float32 computations. Measured: <= 100 U (1 + |logit|), against
# 1024 U allowed; a wrong split (q/k/v, up/gate) changes the logits by O(1).

TRAINER_IDS = [3, 17, 99, 0, 42, 7, 64, 5, 88, 12, 31, 1]  # all below the 100 real tokens


def trainer_config(**overrides):
    """A full `model:` section as the trainer dumps it (every ModelConfig field), for a tiny model."""
    cfg = {
        "d_model": 32, "n_heads": 4, "n_kv_heads": None, "clip_qkv": None, "n_layers": 2, "mlp_ratio": 4,
        "mlp_hidden_size": 96, "activation_type": "swiglu", "block_type": "sequential", "block_group_size": 1,
        "alibi": False, "alibi_bias_max": 8.0, "rope": True, "rope_full_precision": True, "rope_theta": 10000,
        "flash_attention": False, "attention_dropout": 0.0, "multi_query_attention": None,
        "attention_layer_norm": False, "residual_dropout": 0.0, "embedding_dropout": 0.0,
        "embedding_layer_norm": False, "layer_norm_type": "default", "layer_norm_with_affine": False,
        "layer_norm_eps": 1.0e-05, "attention_layer_norm_with_affine": False, "max_sequence_length": 64,
        "include_bias": False, "bias_for_layer_norm": False, "scale_logits": False, "vocab_size": 100,
        "embedding_size": 128, "weight_tying": False, "eos_token_id": 99, "pad_token_id": 1,
        "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "init_cutoff_factor": None,
        "precision": "amp_bf16", "scale_emb_init": False, "emb_init_std": None, "norm_after": False,
    }
    cfg.update(overrides)
    return cfg


# What makes a trainer config OLMo 2 (OLMo-2-1124-7B's config.yaml sets exactly these, with eps 1e-6).
OLMO2_TRAINER = dict(layer_norm_type="rms", layer_norm_with_affine=True, attention_layer_norm=True,
                     attention_layer_norm_with_affine=True, norm_after=True, layer_norm_eps=1e-6)


def trainer_effective(cfg):
    """The few settings the reference forward needs, with the trainer's defaults (olmo/config.py)."""
    d, heads = cfg.get("d_model", 768), cfg.get("n_heads", 12)
    kv = cfg.get("n_kv_heads") or (1 if cfg.get("multi_query_attention") else heads)
    fused = cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * d
    vocab = cfg.get("embedding_size", 50304) or cfg.get("vocab_size", 50257)
    return dict(d=d, heads=heads, kv=kv, fused_mlp=fused, vocab=vocab, layers=cfg.get("n_layers", 12),
                tied=cfg.get("weight_tying", True), theta=cfg.get("rope_theta", 10000), clip=cfg.get("clip_qkv"),
                group=cfg.get("block_group_size", 1), olmo2=cfg.get("layer_norm_type") == "rms",
                eps=cfg.get("layer_norm_eps", 1e-5))


def trainer_block_prefix(e, i, prefix):
    g = e["group"]
    return f"{prefix}blocks.{i}." if g == 1 else f"{prefix}block_groups.{i // g}.{i % g}."


def trainer_state(cfg, prefix="transformer.", seed=0):
    """Random weights in the trainer's fused layout. The scales keep activations O(1), so that a wrong
    split (q/k/v, up/gate) changes the logits by far more than any tolerance below. OLMo 2's norm weights are
    1 + N(0, 0.5^2), far from the all-ones init, so that a misplaced or swapped norm weight shows too."""
    e, gen = trainer_effective(cfg), torch.Generator().manual_seed(seed)
    d, hd = e["d"], e["d"] // e["heads"]

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    state = {prefix + "wte.weight": randn(e["vocab"], d)}
    for i in range(e["layers"]):
        b = trainer_block_prefix(e, i, prefix)
        state[b + "att_proj.weight"] = randn(d + 2 * e["kv"] * hd, d, scale=d**-0.5)
        state[b + "attn_out.weight"] = randn(d, d, scale=d**-0.5)
        state[b + "ff_proj.weight"] = randn(e["fused_mlp"], d, scale=d**-0.5)
        state[b + "ff_out.weight"] = randn(d, e["fused_mlp"] // 2, scale=(e["fused_mlp"] // 2) ** -0.5)
        if e["olmo2"]:
            for name, size in [("attn_norm", d), ("ff_norm", d), ("q_norm", d), ("k_norm", e["kv"] * hd)]:
                state[b + name + ".weight"] = 1 + randn(size, scale=0.5)
    if e["olmo2"]:
        state[prefix + "ln_f.weight"] = 1 + randn(d, scale=0.5)
    if not e["tied"]:
        state[prefix + "ff_out.weight"] = randn(e["vocab"], d, scale=d**-0.5)
    return state


def trainer_st_key(name):
    """How the trainer names a tensor in model.safetensors (olmo/safetensors_util.py: encode_key)."""
    return base64.urlsafe_b64encode(pickle.dumps(((name,), False))).decode("ascii")


def write_trainer(path, cfg, state, fmt="pt"):
    path.mkdir(parents=True)
    dump = {"run_name": "tiny", "seed": 6198, "model": cfg, "optimizer": {"name": "adamw", "learning_rate": 4e-4},
            "tokenizer": {"identifier": "tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"}}
    (path / "config.yaml").write_text(yaml.safe_dump(dump))
    if fmt == "pt":
        torch.save(state, path / "model.pt")
    else:
        save_file({trainer_st_key(k): v for k, v in state.items()}, path / "model.safetensors")
    return path


# ----------------------------------------------------------------------------------------------------------------
# convert.py: the trainer's forward, the reference


def trainer_reference_logits(state, cfg, ids, prefix="transformer."):
    """The trainer's OLMo forward on its fused tensors, in float64: non-affine LayerNorm (eps 1e-5),
    q/k/v as consecutive row blocks of att_proj (clamped to ±clip_qkv), rotate-half RoPE, GQA by
    repeat_interleave, causal softmax attention, SwiGLU as `x, gate = ff_proj(h).chunk(2)` →
    silu(gate) * x, then wte (tied) or ff_out.
    OLMo 2 (layer_norm_type rms, norm_after, attention_layer_norm; olmo/model.py OLMoSequentialBlock): every
    norm is an RMSNorm with a weight, x / sqrt(mean(x^2) + eps) * weight; q_norm and k_norm normalise the whole
    q (d wide) and k (kv_heads * head_dim wide) before the split into heads; attn_norm and ff_norm normalise the
    sublayer's output before the residual add; ln_f has a weight."""
    e = trainer_effective(cfg)
    d, heads, kv = e["d"], e["heads"], e["kv"]
    hd, T = d // heads, len(ids)
    w = {k: v.double() for k, v in state.items()}

    def norm(x, weight=None):  # weight: the name of an OLMo 2 norm's weight
        if not e["olmo2"]:
            return F.layer_norm(x, (d,), eps=1e-5)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + e["eps"]) * w[weight]

    inv_freq = 1.0 / (e["theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rope(t):  # (heads, T, hd)
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    x = w[prefix + "wte.weight"][torch.tensor(ids)]
    causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(e["layers"]):
        b = trainer_block_prefix(e, i, prefix)
        qkv = (x if e["olmo2"] else norm(x)) @ w[b + "att_proj.weight"].T
        if e["clip"] is not None:
            qkv = qkv.clamp(-e["clip"], e["clip"])
        q, k, v = qkv.split([d, kv * hd, kv * hd], dim=-1)
        if e["olmo2"]:
            q, k = norm(q, b + "q_norm.weight"), norm(k, b + "k_norm.weight")
        q = q.view(T, heads, hd).transpose(0, 1)
        k = k.view(T, kv, hd).transpose(0, 1).repeat_interleave(heads // kv, dim=0)
        v = v.view(T, kv, hd).transpose(0, 1).repeat_interleave(heads // kv, dim=0)
        q, k = rope(q), rope(k)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + causal, dim=-1) @ v
        att = att.transpose(0, 1).reshape(T, d) @ w[b + "attn_out.weight"].T
        x = x + (norm(att, b + "attn_norm.weight") if e["olmo2"] else att)
        up, gate = ((x if e["olmo2"] else norm(x)) @ w[b + "ff_proj.weight"].T).chunk(2, dim=-1)
        mlp = (F.silu(gate) * up) @ w[b + "ff_out.weight"].T
        x = x + (norm(mlp, b + "ff_norm.weight") if e["olmo2"] else mlp)
    head = w[prefix + "wte.weight"] if e["tied"] else w[prefix + "ff_out.weight"]
    return norm(x, prefix + "ln_f.weight") @ head.T


def transformers_logits(path, ids):
    """transformers' OlmoForCausalLM or Olmo2ForCausalLM, as config.json's model_type says."""
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


# ----------------------------------------------------------------------------------------------------------------
# convert.py: the trainer layout


@pytest.mark.parametrize("overrides,fmt", [
    ({}, "pt"),
    ({"weight_tying": True}, "safetensors"),
    ({"n_kv_heads": 2}, "pt"),
    ({"multi_query_attention": True, "weight_tying": True}, "pt"),
    ({"clip_qkv": 0.5, "rope_theta": 500000}, "safetensors"),
    ({"block_group_size": 2, "layer_norm_type": "low_precision"}, "pt"),
], ids=["untied", "tied-safetensors", "gqa", "mqa-tied", "clip-theta", "block-groups"])
def test_convert_trainer_checkpoint_gives_the_trainers_logits(tmp_path, overrides, fmt):
    cfg = trainer_config(**overrides)
    state = trainer_state(cfg)
    src = write_trainer(tmp_path / "src", cfg, state, fmt)
    (src / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    convert.convert(src, tmp_path / "dst")

    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    e = trainer_effective(cfg)
    assert config["model_type"] == "olmo" and config["architectures"] == ["OlmoForCausalLM"]
    assert config["vocab_size"] == 128  # the padded embedding, not the 100 real tokens
    assert config["intermediate_size"] == 48  # the fused ff_proj (96 rows) holds up and gate
    assert config["num_key_value_heads"] == e["kv"]
    assert config["tie_word_embeddings"] == e["tied"]
    assert config["rope_theta"] == e["theta"] and config["clip_qkv"] == e["clip"]
    assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (99, 1, None)
    assert config["max_position_embeddings"] == 64 and config["torch_dtype"] == "float32"
    assert (tmp_path / "dst" / "tokenizer.json").read_text() == '{"fake": "tokenizer"}'
    with safe_open(tmp_path / "dst" / "model.safetensors", "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not e["tied"])  # transformers omits a tied head

    expected = trainer_reference_logits(state, cfg, TRAINER_IDS)
    assert_close(transformers_logits(tmp_path / "dst", TRAINER_IDS), expected)
    if e["clip"] is not None:  # the clip must actually bite for this case to test anything
        unclipped = trainer_reference_logits(state, dict(cfg, clip_qkv=None), TRAINER_IDS)
        assert not torch.allclose(unclipped, expected, atol=1e-3)  # not just by rounding (allclose's atol is 1e-8)


# OLMo 2 tolerance, against the float64 reference: a float32 dot product of length K is off by at most
# K * u * sum(|terms|), u = 2^-24 (Higham). One OLMo 2 layer chains att_proj (K = d = 32), q.k (K = head_dim = 8),
# attention @ v (K = T = 12), attn_out (32), ff_proj (32) and ff_out (K = 48), plus ~20 elementwise roundings
# (five RMSNorms, RoPE, softmax, silu): ~184u = 1.1e-5 relative per layer. RMSNorm after each sublayer keeps
# errors from compounding, so 2 layers and the head (K = 32) give ~2.4e-5 of sum(|terms|), which for random
# weights is ~sqrt(d)/3 ~ 2x the largest |logit| (max ~ 3 sigma). Hence 5e-5 * max|logit| (~1.5e-3 on the
# O(30) logits of a tied head; measured: <= 1.8e-5). Any misplaced norm weight moves logits by O(1) (checked).
# Checked once against the original, ai2-olmo 0.6.0's OLMo 2 model (olmo/model.py, run outside this repo; d_model 64,
# 3 layers, GQA and tied MHA): transformers' Olmo2ForCausalLM on the converted checkpoint gives its float32 logits
# bit for bit, and this float64 reference is within 7.8e-6 of them (logits up to 11).
OLMO2_TOL = 5e-5


@pytest.mark.parametrize("overrides,fmt", [
    ({"n_kv_heads": 2}, "pt"),
    ({"weight_tying": True}, "safetensors"),
    ({"n_kv_heads": 1, "weight_tying": True, "block_group_size": 2, "rope_theta": 500000}, "safetensors"),
], ids=["gqa-untied-pt", "tied-safetensors", "mqa-tied-groups-theta"])
def test_convert_olmo2_trainer_checkpoint_gives_the_trainers_logits(tmp_path, overrides, fmt):
    cfg = trainer_config(**OLMO2_TRAINER, **overrides)
    state = trainer_state(cfg)
    src = write_trainer(tmp_path / "src", cfg, state, fmt)
    convert.convert(src, tmp_path / "dst")

    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    e = trainer_effective(cfg)
    assert config["model_type"] == "olmo2" and config["architectures"] == ["Olmo2ForCausalLM"]
    assert config["rms_norm_eps"] == 1e-6 and "clip_qkv" not in config
    assert config["num_key_value_heads"] == e["kv"] and config["tie_word_embeddings"] == e["tied"]
    assert config["rope_theta"] == e["theta"] and config["intermediate_size"] == 48
    with safe_open(tmp_path / "dst" / "model.safetensors", "pt") as f:
        out = {name: f.get_tensor(name) for name in f.keys()}
    # Each trainer norm weight lands, unchanged, under transformers' name.
    for i in range(2):
        b, layer = trainer_block_prefix(e, i, "transformer."), f"model.layers.{i}."
        for trainer_name, name in [("attn_norm", "post_attention_layernorm"), ("ff_norm", "post_feedforward_layernorm"),
                                   ("q_norm", "self_attn.q_norm"), ("k_norm", "self_attn.k_norm")]:
            assert torch.equal(out[layer + name + ".weight"], state[b + trainer_name + ".weight"])
    assert torch.equal(out["model.norm.weight"], state["transformer.ln_f.weight"])
    assert ("lm_head.weight" in out) == (not e["tied"])

    expected = trainer_reference_logits(state, cfg, TRAINER_IDS)
    atol = OLMO2_TOL * expected.abs().max().item()
    assert_close(transformers_logits(tmp_path / "dst", TRAINER_IDS), expected, atol=atol, rtol=0)
    with torch.no_grad():
        ours = olmo.OlmoForCausalLM.from_pretrained(tmp_path / "dst", dtype=torch.float32)(torch.tensor([TRAINER_IDS]))
    assert_close(ours[0].double(), expected, atol=atol, rtol=0)
    # The norm weights matter: all-ones norms (the init) would be far outside the tolerance.
    ones = {k: torch.ones_like(v) if "norm" in k or "ln_f" in k else v for k, v in state.items()}
    assert (trainer_reference_logits(ones, cfg, TRAINER_IDS) - expected).abs().max() > 100 * atol


@pytest.mark.parametrize("setting,value", [
    ("norm_after", False), ("attention_layer_norm", False), ("layer_norm_with_affine", False),
    ("attention_layer_norm_with_affine", False), ("clip_qkv", 8.0), ("layer_norm_type", "fancy"),
])
def test_convert_olmo2_settings_transformers_cannot_express_are_refused(tmp_path, setting, value):
    cfg = trainer_config(**OLMO2_TRAINER)
    src = write_trainer(tmp_path / "src", dict(cfg, **{setting: value}), trainer_state(cfg))
    with pytest.raises(convert.ConversionError, match=f"sets {setting}: {json.dumps(value)}"):
        convert.convert(src, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_olmo2_norm_biases_are_refused_by_name(tmp_path):
    cfg = trainer_config(**OLMO2_TRAINER, bias_for_layer_norm=True)
    state = trainer_state(cfg)
    state["transformer.blocks.0.attn_norm.bias"] = torch.zeros(32)  # what bias_for_layer_norm adds
    src = write_trainer(tmp_path / "src", cfg, state)
    unexplained = r"config.yaml does not explain: transformer.blocks.0.attn_norm.bias"
    with pytest.raises(convert.ConversionError, match=unexplained):
        convert.convert(src, tmp_path / "dst")


def test_convert_sparse_config_takes_the_trainers_defaults(tmp_path):
    # Only what a real sparse config must say to be convertible; everything else is the trainer's default.
    cfg = {"d_model": 32, "n_heads": 4, "n_layers": 1, "vocab_size": 100, "rope": True, "include_bias": False,
           "layer_norm_with_affine": False}
    state = trainer_state(cfg)
    src = write_trainer(tmp_path / "src", cfg, state)
    convert.convert(src, tmp_path / "dst")
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config["vocab_size"] == 50304  # embedding_size
    assert config["intermediate_size"] == 64  # mlp_ratio 4 * d_model, halved
    assert config["max_position_embeddings"] == 1024
    assert config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == config["pad_token_id"] == 50256
    assert config["rope_theta"] == 10000.0 and config["num_key_value_heads"] == 4
    assert_close(transformers_logits(tmp_path / "dst", TRAINER_IDS),
                 trainer_reference_logits(state, cfg, TRAINER_IDS))


@pytest.mark.parametrize("setting,value", [
    ("rope", False), ("alibi", True), ("activation_type", "gelu"), ("block_type", "llama"),
    ("include_bias", True), ("layer_norm_with_affine", True), ("layer_norm_eps", 1e-6),
    ("attention_layer_norm", True), ("embedding_layer_norm", True), ("norm_after", True),
    ("scale_logits", True), ("layer_norm_type", "rms"), ("some_future_setting", 1),
])
def test_convert_unsupported_settings_are_refused(tmp_path, setting, value):
    cfg = trainer_config()
    src = write_trainer(tmp_path / "src", dict(cfg, **{setting: value}), trainer_state(cfg))
    with pytest.raises(convert.ConversionError, match=setting):
        convert.convert(src, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("setting", ["rope", "include_bias", "layer_norm_with_affine"])
def test_convert_absent_settings_are_refused_by_their_trainer_default(tmp_path, setting):
    cfg = trainer_config()
    del cfg[setting]
    src = write_trainer(tmp_path / "src", cfg, trainer_state(trainer_config()))
    with pytest.raises(convert.ConversionError, match=f"leaves {setting} unset"):
        convert.convert(src, tmp_path / "dst")


@pytest.mark.parametrize("setting,value,message", [
    ("d_model", "64", 'd_model must be a positive integer, got "64"'),
    ("vocab_size", None, "vocab_size must be a positive integer, got null"),
    ("embedding_size", "50304", 'embedding_size must be a positive integer or null, got "50304"'),
    ("n_heads", 4.0, "n_heads must be a positive integer, got 4.0"),
    ("max_sequence_length", True, "max_sequence_length must be a positive integer, got true"),
    ("n_kv_heads", [2], r"n_kv_heads must be a positive integer or null, got \[2\]"),
    ("weight_tying", "false", 'weight_tying must be true or false, got "false"'),
    ("rope", "true", 'sets rope: "true"; transformers\' OLMo has rotary position embeddings'),
    ("multi_query_attention", 0, "multi_query_attention must be true, false or null, got 0"),
    ("rope_theta", float("nan"), "rope_theta must be a positive number, got NaN"),
    ("rope_theta", "10000", 'rope_theta must be a positive number, got "10000"'),
    ("clip_qkv", 0, "clip_qkv must be a positive number or null, got 0"),
    ("eos_token_id", 128, r"eos_token_id must be .*128\).*got 128"),  # olmo.py's check
    ("pad_token_id", -1, "pad_token_id must be an integer >= 0, got -1"),
    ("n_heads", 5, "d_model must be divisible by n_heads 5, got 32"),  # olmo.py's check, in the trainer's names
    ("n_layers", 10**9, "n_layers 1000000000, but the checkpoint holds only 10 tensors"),
    ("d_model", 2**62, r"d_model must be .*got 4611686018427387904"),  # olmo.py's check
])
def test_convert_config_yaml_with_wrong_types_names_the_key(tmp_path, setting, value, message):
    cfg = trainer_config()
    src = write_trainer(tmp_path / "src", dict(cfg, **{setting: value}), trainer_state(cfg))
    with pytest.raises(convert.ConversionError, match=message) as info:
        convert.convert(src, tmp_path / "dst")
    assert str(info.value).startswith(str(src / "config.yaml")) and "\n" not in str(info.value)


def test_convert_config_yaml_numbers_are_read_as_the_trainer_reads_them(tmp_path):
    # PyYAML (YAML 1.1) reads a hand-written 1e-6 or 5e5 as a string; the trainer's OmegaConf reads a float, and so
    # must we. A quoted "1e-6" stays a string, and is refused.
    cfg = trainer_config(**OLMO2_TRAINER)
    state = trainer_state(cfg)
    src = write_trainer(tmp_path / "src", cfg, state)
    text = (src / "config.yaml").read_text()
    assert "layer_norm_eps: 1.0e-06\n" in text and "rope_theta: 10000\n" in text
    (src / "config.yaml").write_text(text.replace("layer_norm_eps: 1.0e-06", "layer_norm_eps: 1e-6")
                                     .replace("rope_theta: 10000", "rope_theta: 5e5"))
    convert.convert(src, tmp_path / "dst")
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config["rms_norm_eps"] == 1e-6 and config["rope_theta"] == 500000.0
    (src / "config.yaml").write_text(text.replace("layer_norm_eps: 1.0e-06", "layer_norm_eps: '1e-6'"))
    with pytest.raises(convert.ConversionError, match='layer_norm_eps must be a positive number, got "1e-6"'):
        convert.convert(src, tmp_path / "dst2")


ALIAS_BOMB = "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10))


def test_convert_yaml_alias_bomb_is_refused_quickly(tmp_path):
    """A config.yaml whose d_model is ten nested aliases (10**9 values once expanded) ends in one line
    naming the alias, in a real process capped at 4 GiB (the unfixed converter grew without bound while building
    its error message, deaf to signals)."""
    cfg = trainer_config()
    src = write_trainer(tmp_path / "src", cfg, trainer_state(cfg))
    text = (src / "config.yaml").read_text().replace("  d_model: 32\n", "  d_model: *a9\n")
    (src / "config.yaml").write_text("a0: &a0 [lol]\n" + ALIAS_BOMB + text)
    assert "d_model: *a9" in (src / "config.yaml").read_text()
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, os.path.join(HERE, "convert.py"), str(src), str(tmp_path / "dst")],
                          capture_output=True, text=True, timeout=120, preexec_fn=capped())
    assert proc.returncode == 2, proc.stderr[-500:]
    assert "alias *a0 is not supported" in one_error_line(proc.stderr) and time.monotonic() - t0 < 60
    assert not (tmp_path / "dst").exists()


def test_convert_yaml_duplicate_keys_and_syntax_errors_are_one_line(tmp_path):
    """A key written twice is refused by name and line (YAML keeps the last silently); a syntax
    error is one line with the file, line and column (PyYAML's message is 5-7 lines with a caret)."""
    cfg = trainer_config()
    src = write_trainer(tmp_path / "src", cfg, trainer_state(cfg))
    good = (src / "config.yaml").read_text()
    lines = good.splitlines()
    at = lines.index("  d_model: 32")
    (src / "config.yaml").write_text("\n".join(lines[:at + 1] + ["  d_model: 64"] + lines[at + 1:]) + "\n")
    with pytest.raises(convert.ConversionError) as info:
        convert.convert(src, tmp_path / "dst")
    assert str(info.value) == f"{src / 'config.yaml'}: line {at + 2}, column 3: the key \"d_model\" appears twice"

    (src / "config.yaml").write_text(good.replace("  d_model: 32\n", "  d_model: 32: 5\n"))
    with pytest.raises(convert.ConversionError) as info:
        convert.convert(src, tmp_path / "dst")
    message = str(info.value)
    assert "\n" not in message and re.fullmatch(re.escape(str(src / "config.yaml")) + r": line \d+, column \d+: "
                                                r"mapping values are not allowed here", message), message
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_convert_integer_tensors_are_refused_by_name(tmp_path, fmt):
    cfg = trainer_config()
    state = trainer_state(cfg)
    state["transformer.blocks.1.attn_out.weight"] = state["transformer.blocks.1.attn_out.weight"].to(torch.int64)
    src = write_trainer(tmp_path / "src", cfg, state, fmt)
    with pytest.raises(convert.ConversionError, match=r"tensor transformer.blocks.1.attn_out.weight has dtype "
                                                      r"(torch.int64|I64), not a floating-point type"):
        convert.convert(src, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_float64_sources_are_written_as_float32_unless_asked(tmp_path):
    cfg = trainer_config()
    state = {k: v.double() for k, v in trainer_state(cfg).items()}
    src = write_trainer(tmp_path / "src", cfg, state)
    convert.convert(src, tmp_path / "f32")
    convert.convert(src, tmp_path / "bf16", dtype="bfloat16")
    for name, dtype in [("f32", torch.float32), ("bf16", torch.bfloat16)]:
        assert json.loads((tmp_path / name / "config.json").read_text())["torch_dtype"] == str(dtype)[6:]
        out = load_file(tmp_path / name / "model.safetensors")
        assert out["model.embed_tokens.weight"].dtype == dtype
        assert torch.equal(out["model.embed_tokens.weight"], state["transformer.wte.weight"].to(dtype))


# config.yaml mutations: each turns one setting into another type, an out-of-range or non-finite number, a nested
# value, or removes it (the base spells out every trainer default a deletion would fall back to, so that a deletion
# either changes nothing or is refused), or adds an unknown nested setting.
CONFIG_MUTATIONS = ["delete", "text", "float", "list", "dict", "unknown", None, True, False, 0, -1, math.nan,
                    math.inf, -math.inf]


def mutate_setting(cfg, key, mutation):
    cfg, value = dict(cfg), cfg[key]
    if mutation == "delete":
        del cfg[key]
    elif mutation == "unknown":
        cfg["a_future_setting"] = {"nested": value}
    else:
        cfg[key] = {"text": str(value), "list": [value], "dict": {"value": value},
                    "float": float(value) if type(value) is int else value}.get(mutation, mutation)
    return cfg


@settings(max_examples=30)
@given(olmo2=st.booleans(), key=st.sampled_from(sorted(trainer_config())), mutation=st.sampled_from(CONFIG_MUTATIONS))
def test_convert_mutated_config_yaml_gives_the_same_model_or_names_the_file(tmp_path_factory, olmo2, key, mutation):
    # Either the same model as the unmutated config (bit-identical tensors and olmo.py logits; token ids and
    # max_sequence_length may change, which the forward pass doesn't see) or ValueError naming the file, before
    # anything is written. Never another exception.
    base = trainer_config(max_sequence_length=1024, **(dict(OLMO2_TRAINER, layer_norm_eps=1e-5) if olmo2 else {}))
    state, tmp = trainer_state(base), tmp_path_factory.mktemp("mutated")
    convert.convert(write_trainer(tmp / "base", base, state), tmp / "base-out")
    src = write_trainer(tmp / "src", mutate_setting(base, key, mutation), state)
    try:
        convert.convert(src, tmp / "out")
    except ValueError as e:
        assert str(src / "config.yaml") in str(e) and "\n" not in str(e)
        assert not (tmp / "out").exists()
        return
    out, expected = load_file(tmp / "out" / "model.safetensors"), load_file(tmp / "base-out" / "model.safetensors")
    assert out.keys() == expected.keys() and all(torch.equal(out[k], expected[k]) for k in out)
    ids = torch.tensor([TRAINER_IDS])
    with torch.no_grad():
        logits = [olmo.OlmoForCausalLM.from_pretrained(tmp / d, dtype=torch.float32)(ids) for d in ("out", "base-out")]
    assert torch.equal(*logits)


def test_convert_conflicting_mqa_and_n_kv_heads_are_refused(tmp_path):
    cfg = trainer_config(multi_query_attention=True, n_kv_heads=2)
    src = write_trainer(tmp_path / "src", cfg, trainer_state(trainer_config(n_kv_heads=2)))
    with pytest.raises(convert.ConversionError, match="multi_query_attention"):
        convert.convert(src, tmp_path / "dst")


@pytest.mark.parametrize("change,message", [
    (lambda s: s.update({"transformer.blocks.0.att_proj.weight": torch.zeros(90, 32)}),
     r"transformer.blocks.0.att_proj.weight has shape \(90, 32\)"),
    (lambda s: s.update({"transformer.blocks.1.attn_norm.weight": torch.ones(32)}), "attn_norm"),
    (lambda s: s.pop("transformer.ff_out.weight"), "transformer.ff_out.weight"),
], ids=["shape", "extra", "missing"])
def test_convert_weights_inconsistent_with_the_config_are_refused(tmp_path, change, message):
    cfg = trainer_config()
    state = trainer_state(cfg)
    change(state)
    src = write_trainer(tmp_path / "src", cfg, state)
    with pytest.raises(convert.ConversionError, match=message):
        convert.convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


# ----------------------------------------------------------------------------------------------------------------
# convert.py: destination safety


def test_convert_non_empty_destination_is_untouched_and_an_empty_one_is_used(tmp_path):
    cfg = trainer_config()
    src = write_trainer(tmp_path / "src", cfg, trainer_state(cfg))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(convert.ConversionError, match="not an empty directory"):
        convert.convert(src, tmp_path / "full")
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"

    (tmp_path / "empty").mkdir()
    convert.convert(src, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "full", "src"]  # no temporary left


@pytest.mark.parametrize("exception", [KeyboardInterrupt, OSError])
def test_convert_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch, exception):
    cfg = trainer_config()
    src = write_trainer(tmp_path / "src", cfg, trainer_state(cfg))
    real_write, written = convert.write_safetensors, []

    def write_then_fail(path, *args):
        if written:  # the first shard is complete on disk; fail while writing the second
            path.write_bytes(b"partial")
            raise exception("interrupted")
        written.append(path)
        real_write(path, *args)

    monkeypatch.setattr(convert, "write_safetensors", write_then_fail)
    with pytest.raises(exception):
        convert.convert(src, tmp_path / "dst", shard_size="20KB")
    assert written and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.fixture(scope="module")
def tall_trainer_checkpoint(tmp_path_factory):
    """250 layers of width 8: 1752 tiny tensors, so converting prints ~137 KB of progress lines on stderr."""
    cfg = trainer_config(d_model=8, n_heads=2, n_layers=250, mlp_hidden_size=16, vocab_size=16, embedding_size=16,
                         eos_token_id=15)
    return write_trainer(tmp_path_factory.mktemp("tall") / "src", cfg, trainer_state(cfg))


def small_pipe():
    """A pipe (read end, write end) holding as little as the system allows: on Linux one page, via F_SETPIPE_SZ
    (its default is 16 pages, 1 MiB with ARM's 64 KiB pages); elsewhere at most 64 KiB (macOS)."""
    import fcntl

    read, write = os.pipe()
    if hasattr(fcntl, "F_SETPIPE_SZ"):
        fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, os.sysconf("SC_PAGE_SIZE"))
        assert fcntl.fcntl(write, fcntl.F_GETPIPE_SZ) <= 64 * 1024
    return read, write


def test_convert_signals_mid_conversion_leave_nothing(tall_trainer_checkpoint, tmp_path):
    # Deterministically mid-conversion: convert.py prints a progress line before each tensor, 137 KB in all, more
    # than its stderr pipe holds (at most 64 KiB, see small_pipe). Reading stderr only up to the first tensor's
    # line means the process must block writing progress long before it can finish, with its staging directory
    # on disk, until the signal arrives. The three processes start together (each spends seconds importing torch).
    procs = {}  # signal -> (process, its stderr)
    # a signal this process ignores (SIGHUP under nohup, SIGINT in a shell's background job) stays ignored in its
    # children, and convert.py leaves it so (nohup's promise): only the others can stop a conversion
    for signum in [s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if signal.getsignal(s) != signal.SIG_IGN]:
        read, write = small_pipe()
        procs[signum] = subprocess.Popen([sys.executable, os.path.join(HERE, "convert.py"),
                                          str(tall_trainer_checkpoint), str(tmp_path / f"dst-{signum.name}")],
                                         stderr=write), os.fdopen(read)
        os.close(write)
    for signum, (proc, stderr) in procs.items():
        line = ""
        while not line.startswith("[1/1752] model.embed_tokens.weight"):  # after "converting ...", any warnings
            line = stderr.readline()
            assert line, "convert.py ended before converting"
        assert any(p.name.startswith(f".dst-{signum.name}.partial-") for p in tmp_path.iterdir())
        proc.send_signal(signum)
    for signum, (proc, stderr) in procs.items():
        with stderr:
            err = stderr.read()  # to the end: the process exits once the signal is handled
        proc.wait(timeout=60)
        assert proc.returncode == 128 + signum, (signum, err[-500:])  # the shell's "ended by signal N"
        assert "Traceback" not in err
        assert err.splitlines()[-1] == f"error: stopped by {signum.name}; nothing was written"
    assert os.listdir(tmp_path) == []  # no destination, no staging directory


def test_convert_three_quick_ctrl_cs_print_one_line(tall_trainer_checkpoint, tmp_path):
    """Ctrl-C pressed three times in quick succession: the one "stopped" line, nothing after it (the
    unfixed converter put its handlers back before exiting, so a later Ctrl-C printed "Exception ignored ...
    KeyboardInterrupt"), status 130, nothing left on disk. As in test_convert_signals_mid_conversion_leave_nothing,
    a small stderr pipe holds the process mid-conversion until the signals come."""
    read, write = small_pipe()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "convert.py"), str(tall_trainer_checkpoint),
                             str(tmp_path / "dst")], stderr=write)
    os.close(write)
    stderr = os.fdopen(read)
    line = ""
    while not line.startswith("[1/1752] model.embed_tokens.weight"):
        line = stderr.readline()
        assert line, "convert.py ended before converting"
    proc.send_signal(signal.SIGINT)
    err = ""
    while "error: stopped by SIGINT" not in err:  # the first Ctrl-C has been handled ...
        chunk = stderr.readline()
        assert chunk, err[-500:]
        err += chunk
    for _ in range(20):  # ... and more come while the process is on its way out
        try:
            proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            break
        time.sleep(0.005)
    err += stderr.read()
    assert proc.wait(timeout=60) == 130
    assert err.splitlines()[-1] == "error: stopped by SIGINT; nothing was written", err[-1000:]
    assert "Exception ignored" not in err and "Traceback" not in err and os.listdir(tmp_path) == []


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_convert_removes_staging_left_by_a_killed_conversion(cli_checkpoint, tmp_path, capsys):
    """The staging directory of a conversion killed with SIGKILL is removed by the next conversion to the
    same DST, which says so; one of a process still running is named and left alone."""
    src = transformers_source(cli_checkpoint, tmp_path / "src")
    stale = tmp_path / f".dst.partial-{dead_pid()}"
    live = tmp_path / f".dst.partial-{os.getppid()}"
    for leftover in (stale, live):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"x" * 1000)
    convert.convert(src, tmp_path / "dst")
    err = capsys.readouterr().err
    assert not stale.exists() and f"removed {stale}" in err
    assert live.exists() and f"{live} is the staging directory of a conversion (process {os.getppid()})" in err
    assert (tmp_path / "dst" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------------------
# convert.py: dtypes and shards


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_convert_dtype_changes_cast_every_tensor(tmp_path, dtype):
    cfg = trainer_config()
    state = trainer_state(cfg)
    src = write_trainer(tmp_path / "src", cfg, state)
    convert.convert(src, tmp_path / "f32")
    convert.convert(src, tmp_path / "out", dtype=dtype)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == dtype
    reference = load_file(tmp_path / "f32" / "model.safetensors")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert out.keys() == reference.keys()
    for name, tensor in out.items():  # exactly the float32 weights rounded once
        assert tensor.dtype == getattr(torch, dtype)
        assert torch.equal(tensor, reference[name].to(tensor.dtype)), name


def test_convert_small_shards_reload_bit_for_bit(tmp_path):
    cfg = trainer_config()
    src = write_trainer(tmp_path / "src", cfg, trainer_state(cfg))
    convert.convert(src, tmp_path / "one")
    convert.convert(src, tmp_path / "sharded", shard_size="20KB")
    whole = load_file(tmp_path / "one" / "model.safetensors")

    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in whole.values())
    reloaded = {}
    for shard in shards:
        part = load_file(tmp_path / "sharded" / shard)
        assert {n for n, s in index["weight_map"].items() if s == shard} == part.keys()
        # 20KB = 20000 bytes: only a tensor bigger than that alone (the 128x32 embedding, 16KB, isn't) may exceed
        assert sum(t.numel() * 4 for t in part.values()) <= 20000
        reloaded.update(part)
    assert reloaded.keys() == whole.keys()
    for name in whole:
        assert torch.equal(reloaded[name], whole[name]), name
    assert_close(transformers_logits(tmp_path / "sharded", TRAINER_IDS),
                     transformers_logits(tmp_path / "one", TRAINER_IDS))


@pytest.mark.parametrize("text,expected", [
    ("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("20KB", 20000), ("1000", 1000),
    (4096, 4096), ("1.5kb", 1500),
])
def test_convert_parse_size(text, expected):
    assert convert.parse_size(text) == expected


@pytest.mark.parametrize("text", ["5XB", "-1GB", "0", "GB", "", "5 G B"])
def test_convert_bad_sizes_are_refused(text):
    with pytest.raises(convert.ConversionError, match="--shard-size"):
        convert.parse_size(text)


# ----------------------------------------------------------------------------------------------------------------
# convert.py: the hf_olmo and transformers layouts


@pytest.mark.parametrize("weights_file", ["pytorch_model.bin", "model.safetensors"])
def test_convert_hf_olmo_layout(tmp_path, weights_file):
    cfg = trainer_config(n_kv_heads=2)
    state = trainer_state(cfg, prefix="model.transformer.")
    src = tmp_path / "src"
    src.mkdir()
    # hf_olmo's OLMoConfig: every ModelConfig field plus transformers' own.
    hf_config = dict(cfg, model_type="hf_olmo", architectures=["OLMoForCausalLM"], use_cache=True,
                     torch_dtype="float32", transformers_version="4.38.2",
                     auto_map={"AutoConfig": "configuration_olmo.OLMoConfig"})
    (src / "config.json").write_text(json.dumps(hf_config))
    if weights_file == "model.safetensors":
        save_file(state, src / weights_file)
    else:
        torch.save(state, src / weights_file)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]:
        (src / name).write_text(json.dumps({"name": name}))
    convert.convert(src, tmp_path / "dst")
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]:
        assert json.loads((tmp_path / "dst" / name).read_text()) == {"name": name}
    expected = trainer_reference_logits(state, cfg, TRAINER_IDS, prefix="model.transformer.")
    assert_close(transformers_logits(tmp_path / "dst", TRAINER_IDS), expected)


# A transformers checkpoint's config for reference_model (whose random biases are non-zero, unlike transformers'
# init, where they would test nothing): GQA, clip_qkv, a large rope_theta.
CONVERTIBLE = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, clip_qkv=2.0,
                   rope_theta=500000.0, rope_scaling=None, pad_token_id=1, eos_token_id=100)


def save_transformers_config(model, src, v4_config):
    """config.json as transformers 5 writes it (rope_parameters, "dtype"), or as 4.x did (top-level rope_theta,
    rope_scaling with "type" if scaled, "torch_dtype"). Returns the dict written, and its dtype's key."""
    model.config.save_pretrained(src)
    raw = json.loads((src / "config.json").read_text())
    if v4_config:
        rope = raw.pop("rope_parameters")
        raw["rope_theta"] = rope.pop("rope_theta")
        rope_type = rope.pop("rope_type")
        raw["rope_scaling"] = None if rope_type == "default" else dict(rope, type=rope_type)
    dtype_key = "torch_dtype" if v4_config else "dtype"
    raw[dtype_key] = "float32"
    (src / "config.json").write_text(json.dumps(raw))
    return raw, dtype_key


@pytest.mark.parametrize("tied,sharded,v4_config", [(False, False, False), (True, True, True)])
def test_convert_transformers_bin_is_rewritten_as_safetensors(tmp_path, tied, sharded, v4_config):
    model = reference_model({**CONVERTIBLE, "tie_word_embeddings": tied})
    src = tmp_path / "src"
    raw, _ = save_transformers_config(model, src, v4_config)
    state = {k: v.clone() for k, v in model.state_dict().items()}  # a tied model's lm_head too, as old saves had
    if sharded:
        names = list(state)
        halves = {"pytorch_model-00001-of-00002.bin": names[:7], "pytorch_model-00002-of-00002.bin": names[7:]}
        for file, keys in halves.items():
            torch.save({k: state[k] for k in keys}, src / file)
        weight_map = {k: file for file, keys in halves.items() for k in keys}
        (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        torch.save(state, src / "pytorch_model.bin")
    convert.convert(src, tmp_path / "dst", dtype="float32")

    out = load_file(tmp_path / "dst" / "model.safetensors")
    assert ("lm_head.weight" in out) == (not tied)
    for name, tensor in out.items():
        assert torch.equal(tensor, state[name]), name
    # Every setting kept, in the source's style.
    assert json.loads((tmp_path / "dst" / "config.json").read_text()) == raw
    with torch.no_grad():
        expected = model(torch.tensor([TRAINER_IDS])).logits[0].double()
    # The same float32 weights and code on both sides: only run-to-run nondeterminism could differ.
    assert_close(transformers_logits(tmp_path / "dst", TRAINER_IDS), expected)


@pytest.mark.parametrize("model_type", ["olmo2", "olmo3"])
def test_convert_olmo2_and_olmo3_transformers_checkpoints_are_rewritten(tmp_path, model_type):
    # A .bin with norm weights that matter, GQA and (OLMo 3) a sliding window shorter than the input.
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, pad_token_id=1, eos_token_id=100)
    if model_type == "olmo2":
        model = transformers.Olmo2ForCausalLM(transformers.Olmo2Config(**kw, rms_norm_eps=1e-6))
    else:
        layer_types = ["sliding_attention", "full_attention"]
        model = transformers.Olmo3ForCausalLM(transformers.Olmo3Config(**kw, sliding_window=4, layer_types=layer_types))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g) if p.ndim == 1 else
                    torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    src = tmp_path / "src"
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    convert.convert(src, tmp_path / "dst")

    out = load_file(tmp_path / "dst" / "model.safetensors")
    assert out.keys() == model.state_dict().keys() and "model.layers.1.self_attn.k_norm.weight" in out
    assert all(torch.equal(t, model.state_dict()[name]) for name, t in out.items())
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config == dict(json.loads((src / "config.json").read_text()), torch_dtype="float32")  # only the dtype added
    ids = torch.tensor([TRAINER_IDS])
    with torch.no_grad():  # the same weights and code on both sides: bit for bit
        expected = model(ids).logits
        assert torch.equal(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dst").eval()(ids).logits,
                           expected)
        ours = olmo.OlmoForCausalLM.from_pretrained(tmp_path / "dst", dtype=torch.float32)(ids)
    assert_close(ours, expected)


@pytest.mark.parametrize("rope_type,v4_config,dtype", [
    ("linear", False, "float32"), ("dynamic", True, "float32"), ("linear", True, "bfloat16"),
    ("dynamic", False, "bfloat16"),
])
def test_convert_transformers_features_survive_a_rewrite(tmp_path, rope_type, v4_config, dtype):
    # What only a transformers checkpoint can hold: q/k/v/o biases, RoPE scaling, another activation; with GQA.
    # max_position_embeddings 8 < len(TRAINER_IDS), so dynamic scaling changes the frequencies too.
    model = reference_model({**CONVERTIBLE, "attention_bias": True, "hidden_act": "gelu",
                             "max_position_embeddings": 8, "rope_theta": 10000.0,
                             "rope_scaling": {"rope_type": rope_type, "factor": 2.0}})
    src = tmp_path / "src"
    raw, dtype_key = save_transformers_config(model, src, v4_config)
    save_file(model.state_dict(), src / "model.safetensors")
    convert.convert(src, tmp_path / "dst", dtype=dtype)

    # Every setting kept, in the source's style; only the dtype changes.
    assert json.loads((tmp_path / "dst" / "config.json").read_text()) == dict(raw, **{dtype_key: dtype})
    out = load_file(tmp_path / "dst" / "model.safetensors")
    assert out.keys() == model.state_dict().keys() and "model.layers.1.self_attn.o_proj.bias" in out
    ids = torch.tensor([TRAINER_IDS])

    def logits(path):
        return transformers.OlmoForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()(ids).logits

    with torch.no_grad():  # the same weights and code on both sides: bit for bit
        # In bfloat16: the source loaded as bfloat16 (model.to() would also round RoPE's inv_freq buffer).
        expected = model(ids).logits if dtype == "float32" else logits(src)
        assert torch.equal(logits(tmp_path / "dst"), expected)
        ours = olmo.OlmoForCausalLM.from_pretrained(tmp_path / "dst", dtype=torch.float32)(ids)
    assert_close(ours[0].double(), transformers_logits(tmp_path / "dst", TRAINER_IDS))


@pytest.mark.parametrize("change,message", [
    (lambda raw, s: raw.update(rope_parameters={"rope_type": "llama3", "factor": 2.0}), "rope_type .*got 'llama3'"),
    (lambda raw, s: raw.update(hidden_act="tanh"), "hidden_act must be one of .*, got 'tanh'"),
    (lambda raw, s: raw.update(num_key_value_heads=3), "num_key_value_heads 3"),
    (lambda raw, s: raw.update(hidden_size=-32), "hidden_size must be .*got -32"),
    (lambda raw, s: raw.update(tie_word_embeddings="false"), "tie_word_embeddings must be .*got 'false'"),
    (lambda raw, s: s.pop("model.layers.1.self_attn.k_proj.bias"), "model.layers.1.self_attn.k_proj.bias"),
    (lambda raw, s: raw.update(attention_bias=False), "model.layers.0.self_attn.k_proj.bias"),
    (lambda raw, s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(16)}),
     r"q_proj.bias has shape \(16,\)"),
], ids=["rope-type", "activation", "kv-heads", "size", "tie-string", "missing-bias", "unexpected-bias", "bias-shape"])
def test_convert_transformers_checkpoint_inconsistent_with_olmo_is_refused(tmp_path, change, message):
    model = reference_model({**CONVERTIBLE, "attention_bias": True})
    src = tmp_path / "src"
    raw, _ = save_transformers_config(model, src, False)
    state = dict(model.state_dict())
    change(raw, state)
    (src / "config.json").write_text(json.dumps(raw))
    save_file(state, src / "model.safetensors")
    with pytest.raises(convert.ConversionError, match=message):
        convert.convert(src, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("value, dtype, message", [
    (float("nan"), None, "holds NaN or infinite values"),
    (float("inf"), None, "holds NaN or infinite values"),
    (1e6, "float16", "has values beyond float16's range"),
])
def test_convert_non_finite_weights_are_refused_by_name(cli_checkpoint, tmp_path, value, dtype, message):
    """NaN or infinity in a weight (or a finite value the new dtype turns into one) is refused, naming the
    tensor; the unfixed converter wrote them, and the model then generated garbage with exit status 0."""
    src = transformers_source(cli_checkpoint, tmp_path / "src")
    weights = load_file(src / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(weights, src / "model.safetensors")
    with pytest.raises(convert.ConversionError, match=f"tensor model.layers.1.mlp.down_proj.weight {message}"):
        convert.convert(src, tmp_path / "dst", dtype=dtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no DST, no staging directory


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "generation_config.json", "model.safetensors"])
@pytest.mark.parametrize("make, message", [(make_fifo, "is not a regular file"),
                                           (link_dev_zero, "links to /dev/zero, outside"), (sparse, "6,000 MB")])
def test_convert_special_files_in_src_are_refused(cli_checkpoint, tmp_path, name, make, message):
    """A FIFO (which the unfixed converter waited on forever, or skipped silently as a tokenizer),
    /dev/zero linked in (read until memory ran out, or skipped) and a sparse 6 GB JSON file each end in one
    error naming the file; nothing is written."""
    if make is sparse and name == "model.safetensors":
        pytest.skip("weights may be large")
    src = transformers_source(cli_checkpoint, tmp_path / "src")
    make(src / name)
    t0 = time.monotonic()
    with fifo_released(src / name), memory_cap(), pytest.raises(convert.ConversionError) as info:
        convert.convert(src, tmp_path / "dst")
    assert str(info.value).startswith(str(src / name)) and message in str(info.value), info.value
    assert time.monotonic() - t0 < 8 and not (tmp_path / "dst").exists()


def test_convert_reads_and_copies_nothing_from_outside_src(cli_checkpoint, tmp_path):
    """A tokenizer.json linked to a file outside SRC is not copied into DST (the unfixed converter copied
    /etc/shadow with mode 0644), and an index whose weight_map names an absolute or ../ path is refused."""
    secret = tmp_path / "secret.json"
    secret.write_text('{"password": "hunter2"}')
    src = transformers_source(cli_checkpoint, tmp_path / "src")
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").symlink_to(secret)
    with pytest.raises(convert.ConversionError, match="links to .*secret.json, outside"):
        convert.convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()

    for outside in (str(tmp_path / "elsewhere.safetensors"), "../elsewhere.safetensors"):
        src = transformers_source(cli_checkpoint, tmp_path / f"src{len(outside)}")
        weights = load_file(src / "model.safetensors")
        (src / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
        index = {"metadata": {}, "weight_map": {name: outside for name in weights}}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(convert.ConversionError, match="weight_map names files outside"):
            convert.convert(src, tmp_path / "dst")
        assert not (tmp_path / "dst").exists()


def test_convert_hub_cache_snapshot_links_are_inside(cli_checkpoint, tmp_path):
    """The hub's cache is made of links (snapshots/COMMIT/NAME -> ../../blobs/HASH): still a checkpoint to convert,
    and the copied tokenizer is the file's content, not a link."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in os.listdir(cli_checkpoint[0]):
        (repo / "blobs" / f"hash-{name}").write_bytes(open(os.path.join(cli_checkpoint[0], name), "rb").read())
        (snapshot / name).symlink_to(f"../../blobs/hash-{name}")
    convert.convert(snapshot, tmp_path / "dst")
    copied = tmp_path / "dst" / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_bytes() == (snapshot / "tokenizer.json").read_bytes()


def test_convert_copies_nothing_it_does_not_understand(cli_checkpoint, tmp_path):
    """An extra file that isn't what its name says (a tokenizer_config.json that isn't JSON) is refused,
    not copied blindly; a chat template is copied with the rest (OLMo 3 Instruct ships chat_template.jinja)."""
    src = transformers_source(cli_checkpoint, tmp_path / "src")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (src / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(convert.ConversionError, match="tokenizer_config.json"):
        convert.convert(src, tmp_path / "dst")
    (src / "tokenizer_config.json").write_text("{}")
    convert.convert(src, tmp_path / "dst")
    assert (tmp_path / "dst" / "chat_template.jinja").read_text() == "{{ messages }}"


@settings(max_examples=6)
@given(heads=st.sampled_from([1, 2, 4]), groups=st.sampled_from([1, 2]), head_dim=st.sampled_from([4, 8]),
       mlp=st.integers(4, 40), tied=st.booleans(), seed=st.integers(0, 2**16))
def test_convert_any_shape_matches_the_reference(tmp_path_factory, heads, groups, head_dim, mlp, tied, seed):
    # groups query heads per kv head; mlp is transformers' intermediate size (the fused ff_proj is twice it).
    cfg = trainer_config(d_model=heads * groups * head_dim, n_heads=heads * groups, n_kv_heads=heads,
                           mlp_hidden_size=2 * mlp, n_layers=1, weight_tying=tied)
    state = trainer_state(cfg, seed=seed)
    tmp = tmp_path_factory.mktemp("any")
    convert.convert(write_trainer(tmp / "src", cfg, state), tmp / "dst")
    assert_close(transformers_logits(tmp / "dst", TRAINER_IDS), trainer_reference_logits(state, cfg, TRAINER_IDS))


# ----------------------------------------------------------------------------------------------------------------
# convert.py: olmo.py and olmo_numpy.py read the result


@pytest.fixture(scope="module")
def converted_checkpoint(tmp_path_factory):
    cfg = trainer_config(n_kv_heads=2, clip_qkv=0.5)
    state = trainer_state(cfg)
    tmp = tmp_path_factory.mktemp("ours")
    convert.convert(write_trainer(tmp / "src", cfg, state), tmp / "dst", shard_size="20KB")
    return tmp / "dst", trainer_reference_logits(state, cfg, TRAINER_IDS)


def test_convert_olmo_py_reads_the_result(converted_checkpoint):
    path, expected = converted_checkpoint
    model = olmo.OlmoForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([TRAINER_IDS]))[0].double()
    assert_close(logits, expected)


def test_convert_olmo_numpy_reads_the_result(converted_checkpoint):
    path, expected = converted_checkpoint
    logits = olmo_numpy.OlmoForCausalLM.from_pretrained(path)(np.array([TRAINER_IDS]))
    assert logits.dtype == np.float32
    assert_close(torch.from_numpy(logits[0]).double(), expected)


@pytest.mark.skipif(not hasattr(olmo_numpy.OlmoConfig, "model_type"),
                    reason="olmo_numpy.py does not read OLMo 2 yet")
def test_convert_olmo_numpy_reads_an_olmo2_result(tmp_path):
    cfg = trainer_config(**OLMO2_TRAINER, n_kv_heads=2)
    state = trainer_state(cfg)
    convert.convert(write_trainer(tmp_path / "src", cfg, state), tmp_path / "dst", shard_size="20KB")
    expected = trainer_reference_logits(state, cfg, TRAINER_IDS)
    logits = olmo_numpy.OlmoForCausalLM.from_pretrained(tmp_path / "dst")(np.array([TRAINER_IDS]))
    assert_close(torch.from_numpy(logits[0]).double(), expected, atol=OLMO2_TOL * expected.abs().max().item(), rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# convert.py: the command line


def test_convert_cli_converts_and_shows_progress(tmp_path, capsys):
    cfg = trainer_config()
    src = write_trainer(tmp_path / "src", cfg, trainer_state(cfg))
    convert.main([str(src), str(tmp_path / "dst"), "--dtype", "bfloat16", "--shard-size", "1MB"])
    assert "model.layers.1.mlp.down_proj.weight" in capsys.readouterr().err  # progress goes to stderr
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_convert_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    cfg = trainer_config(alibi=True)
    src = write_trainer(tmp_path / "src", cfg, trainer_state(cfg))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    (tmp_path / "olmo-core" / "model_and_optim").mkdir(parents=True)  # what olmo-core writes, with a config.json
    (tmp_path / "olmo-core" / "config.json").write_text('{"run_name": "x", "model": {}, "dataset": {}}')
    cases = {
        (tmp_path / "olmo-core", tmp_path / "o0"): "olmo-core checkpoint; convert it with olmo-core's own",
        (tmp_path / "missing", tmp_path / "o1"): "no such directory",
        (tmp_path / "notes", tmp_path / "o2"): "not an OLMo checkpoint",
        (src, tmp_path / "o3"): "alibi",
        (src, tmp_path / "o4", "--dtype", "float8"): "--dtype",
        (src, tmp_path / "o5", "--shard-size", "lots"): "--shard-size",
        (src, tmp_path / "notes" / "a.txt" / "o6"): f"{tmp_path / 'notes' / 'a.txt'} is a file, not a directory",
        (src, tmp_path / "notes" / "a.txt" / "deeper" / "o7"): "a.txt is a file",
    }
    for args, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            convert.main([str(a) for a in args])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2, (args, lines)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "olmo-core", "src"]
    assert (tmp_path / "notes" / "a.txt").read_text() == "x"

    # The same through a real process, once (each one spends seconds importing torch).
    result = run_cli(str(src), str(tmp_path / "o6"), script="convert.py")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "alibi" in result.stderr
    assert not (tmp_path / "o6").exists()


def test_convert_cli_flag_errors_are_one_line_and_help_names_olmo_3(capsys):
    """convert.py's --help says it handles OLMo 3 (transformers layout); a bad flag is one line."""
    with pytest.raises(SystemExit) as info:
        convert.main(["--help"])
    assert info.value.code == 0 and "OLMo 3" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        convert.main(["only-src", "--shard-sized", "1GB"])
    assert info.value.code == 2 and one_error_line(capsys.readouterr().err)
