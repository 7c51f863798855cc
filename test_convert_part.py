"""Tests for convert.py (to be merged into test_olmo.py).

Tiny checkpoints are built here in each source layout, with random weights under the original names; their
expected logits come from `_cv_reference_logits`, a forward pass written from the OLMo trainer's semantics
(olmo/model.py in ai2-olmo 0.6.0) straight on the fused tensors, never from convert.py's mapping.
"""

import base64
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert

REPO = Path(__file__).resolve().parent
_CV_IDS = [3, 17, 99, 0, 42, 7, 64, 5, 88, 12, 31, 1]  # all below the 100 real tokens


# --- building checkpoints -------------------------------------------------------------------------------


def _cv_model_config(**overrides):
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


def _cv_effective(cfg):
    """The few settings the reference forward needs, with the trainer's defaults (olmo/config.py)."""
    d, heads = cfg.get("d_model", 768), cfg.get("n_heads", 12)
    kv = cfg.get("n_kv_heads") or (1 if cfg.get("multi_query_attention") else heads)
    fused = cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * d
    vocab = cfg.get("embedding_size", 50304) or cfg.get("vocab_size", 50257)
    return dict(d=d, heads=heads, kv=kv, fused_mlp=fused, vocab=vocab, layers=cfg.get("n_layers", 12),
                tied=cfg.get("weight_tying", True), theta=cfg.get("rope_theta", 10000), clip=cfg.get("clip_qkv"),
                group=cfg.get("block_group_size", 1))


def _cv_block_prefix(e, i, prefix):
    g = e["group"]
    return f"{prefix}blocks.{i}." if g == 1 else f"{prefix}block_groups.{i // g}.{i % g}."


def _cv_trainer_state(cfg, prefix="transformer.", seed=0):
    """Random weights in the trainer's fused layout. The scales keep activations O(1), so that a wrong
    split (q/k/v, up/gate) changes the logits by far more than any tolerance below."""
    e, gen = _cv_effective(cfg), torch.Generator().manual_seed(seed)
    d, hd = e["d"], e["d"] // e["heads"]

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    state = {prefix + "wte.weight": randn(e["vocab"], d)}
    for i in range(e["layers"]):
        b = _cv_block_prefix(e, i, prefix)
        state[b + "att_proj.weight"] = randn(d + 2 * e["kv"] * hd, d, scale=d**-0.5)
        state[b + "attn_out.weight"] = randn(d, d, scale=d**-0.5)
        state[b + "ff_proj.weight"] = randn(e["fused_mlp"], d, scale=d**-0.5)
        state[b + "ff_out.weight"] = randn(d, e["fused_mlp"] // 2, scale=(e["fused_mlp"] // 2) ** -0.5)
    if not e["tied"]:
        state[prefix + "ff_out.weight"] = randn(e["vocab"], d, scale=d**-0.5)
    return state


def _cv_trainer_st_key(name):
    """How the trainer names a tensor in model.safetensors (olmo/safetensors_util.py: encode_key)."""
    return base64.urlsafe_b64encode(pickle.dumps(((name,), False))).decode("ascii")


def _cv_write_trainer(path, cfg, state, fmt="pt"):
    path.mkdir(parents=True)
    dump = {"run_name": "tiny", "seed": 6198, "model": cfg, "optimizer": {"name": "adamw", "learning_rate": 4e-4},
            "tokenizer": {"identifier": "tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"}}
    (path / "config.yaml").write_text(yaml.safe_dump(dump))
    if fmt == "pt":
        torch.save(state, path / "model.pt")
    else:
        save_file({_cv_trainer_st_key(k): v for k, v in state.items()}, path / "model.safetensors")
    return path


# --- the reference forward ------------------------------------------------------------------------------


def _cv_reference_logits(state, cfg, ids, prefix="transformer."):
    """The trainer's OLMo forward on its fused tensors, in float64: non-affine LayerNorm (eps 1e-5),
    q/k/v as consecutive row blocks of att_proj (clamped to ±clip_qkv), rotate-half RoPE, GQA by
    repeat_interleave, causal softmax attention, SwiGLU as `x, gate = ff_proj(h).chunk(2)` →
    silu(gate) * x, then wte (tied) or ff_out."""
    e = _cv_effective(cfg)
    d, heads, kv = e["d"], e["heads"], e["kv"]
    hd, T = d // heads, len(ids)
    w = {k: v.double() for k, v in state.items()}

    def norm(x):
        return F.layer_norm(x, (d,), eps=1e-5)

    inv_freq = 1.0 / (e["theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rope(t):  # (heads, T, hd)
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    x = w[prefix + "wte.weight"][torch.tensor(ids)]
    causal = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(e["layers"]):
        b = _cv_block_prefix(e, i, prefix)
        qkv = norm(x) @ w[b + "att_proj.weight"].T
        if e["clip"] is not None:
            qkv = qkv.clamp(-e["clip"], e["clip"])
        q, k, v = qkv.split([d, kv * hd, kv * hd], dim=-1)
        q = q.view(T, heads, hd).transpose(0, 1)
        k = k.view(T, kv, hd).transpose(0, 1).repeat_interleave(heads // kv, dim=0)
        v = v.view(T, kv, hd).transpose(0, 1).repeat_interleave(heads // kv, dim=0)
        q, k = rope(q), rope(k)
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd) + causal, dim=-1) @ v
        x = x + att.transpose(0, 1).reshape(T, d) @ w[b + "attn_out.weight"].T
        up, gate = (norm(x) @ w[b + "ff_proj.weight"].T).chunk(2, dim=-1)
        x = x + (F.silu(gate) * up) @ w[b + "ff_out.weight"].T
    head = w[prefix + "wte.weight"] if e["tied"] else w[prefix + "ff_out.weight"]
    return norm(x) @ head.T


def _cv_transformers_logits(path, ids):
    import transformers

    model = transformers.OlmoForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


def _cv_assert_close(actual, expected):
    # A float32 model against the float64 reference: float32 rounding (~6e-8 relative per op) over 1-2 tiny
    # layers leaves ~1e-6 relative error (measured: 1e-6 on O(3) logits, 6e-6 on the O(30) logits of a tied
    # head); 1e-5 relative + 1e-5 absolute is above that and far below what a wrong split gives (O(1)).
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# --- the trainer layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,fmt", [
    ({}, "pt"),
    ({"weight_tying": True}, "safetensors"),
    ({"n_kv_heads": 2}, "pt"),
    ({"multi_query_attention": True, "weight_tying": True}, "pt"),
    ({"clip_qkv": 0.5, "rope_theta": 500000}, "safetensors"),
    ({"block_group_size": 2, "layer_norm_type": "low_precision"}, "pt"),
], ids=["untied", "tied-safetensors", "gqa", "mqa-tied", "clip-theta", "block-groups"])
def test_cv_trainer_checkpoint_gives_the_trainers_logits(tmp_path, overrides, fmt):
    cfg = _cv_model_config(**overrides)
    state = _cv_trainer_state(cfg)
    src = _cv_write_trainer(tmp_path / "src", cfg, state, fmt)
    (src / "tokenizer.json").write_text('{"fake": "tokenizer"}')
    convert.convert(src, tmp_path / "dst")

    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    e = _cv_effective(cfg)
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

    expected = _cv_reference_logits(state, cfg, _CV_IDS)
    _cv_assert_close(_cv_transformers_logits(tmp_path / "dst", _CV_IDS), expected)
    if e["clip"] is not None:  # the clip must actually bite for this case to test anything
        assert not torch.allclose(_cv_reference_logits(state, dict(cfg, clip_qkv=None), _CV_IDS), expected)


def test_cv_sparse_config_takes_the_trainers_defaults(tmp_path):
    # Only what a real sparse config must say to be convertible; everything else is the trainer's default.
    cfg = {"d_model": 32, "n_heads": 4, "n_layers": 1, "vocab_size": 100, "rope": True, "include_bias": False,
           "layer_norm_with_affine": False}
    state = _cv_trainer_state(cfg)
    src = _cv_write_trainer(tmp_path / "src", cfg, state)
    convert.convert(src, tmp_path / "dst")
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config["vocab_size"] == 50304  # embedding_size
    assert config["intermediate_size"] == 64  # mlp_ratio 4 * d_model, halved
    assert config["max_position_embeddings"] == 1024
    assert config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == config["pad_token_id"] == 50256
    assert config["rope_theta"] == 10000.0 and config["num_key_value_heads"] == 4
    _cv_assert_close(_cv_transformers_logits(tmp_path / "dst", _CV_IDS), _cv_reference_logits(state, cfg, _CV_IDS))


@pytest.mark.parametrize("setting,value", [
    ("rope", False), ("alibi", True), ("activation_type", "gelu"), ("block_type", "llama"),
    ("include_bias", True), ("layer_norm_with_affine", True), ("layer_norm_eps", 1e-6),
    ("attention_layer_norm", True), ("embedding_layer_norm", True), ("norm_after", True),
    ("scale_logits", True), ("layer_norm_type", "rms"), ("some_future_setting", 1),
])
def test_cv_unsupported_settings_are_refused(tmp_path, setting, value):
    cfg = _cv_model_config()
    src = _cv_write_trainer(tmp_path / "src", dict(cfg, **{setting: value}), _cv_trainer_state(cfg))
    with pytest.raises(convert.ConversionError, match=setting):
        convert.convert(src, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("setting", ["rope", "include_bias", "layer_norm_with_affine"])
def test_cv_absent_settings_are_refused_by_their_trainer_default(tmp_path, setting):
    cfg = _cv_model_config()
    del cfg[setting]
    src = _cv_write_trainer(tmp_path / "src", cfg, _cv_trainer_state(_cv_model_config()))
    with pytest.raises(convert.ConversionError, match=f"leaves {setting} unset"):
        convert.convert(src, tmp_path / "dst")


def test_cv_conflicting_mqa_and_n_kv_heads_are_refused(tmp_path):
    cfg = _cv_model_config(multi_query_attention=True, n_kv_heads=2)
    src = _cv_write_trainer(tmp_path / "src", cfg, _cv_trainer_state(_cv_model_config(n_kv_heads=2)))
    with pytest.raises(convert.ConversionError, match="multi_query_attention"):
        convert.convert(src, tmp_path / "dst")


@pytest.mark.parametrize("change,message", [
    (lambda s: s.update({"transformer.blocks.0.att_proj.weight": torch.zeros(90, 32)}),
     r"transformer.blocks.0.att_proj.weight has shape \(90, 32\)"),
    (lambda s: s.update({"transformer.blocks.1.attn_norm.weight": torch.ones(32)}), "attn_norm"),
    (lambda s: s.pop("transformer.ff_out.weight"), "transformer.ff_out.weight"),
], ids=["shape", "extra", "missing"])
def test_cv_weights_inconsistent_with_the_config_are_refused(tmp_path, change, message):
    cfg = _cv_model_config()
    state = _cv_trainer_state(cfg)
    change(state)
    src = _cv_write_trainer(tmp_path / "src", cfg, state)
    with pytest.raises(convert.ConversionError, match=message):
        convert.convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


# --- destination safety ---------------------------------------------------------------------------------


def test_cv_non_empty_destination_is_untouched_and_an_empty_one_is_used(tmp_path):
    cfg = _cv_model_config()
    src = _cv_write_trainer(tmp_path / "src", cfg, _cv_trainer_state(cfg))
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
def test_cv_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch, exception):
    cfg = _cv_model_config()
    src = _cv_write_trainer(tmp_path / "src", cfg, _cv_trainer_state(cfg))
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


# --- dtypes and shards ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cv_dtype_changes_cast_every_tensor(tmp_path, dtype):
    cfg = _cv_model_config()
    state = _cv_trainer_state(cfg)
    src = _cv_write_trainer(tmp_path / "src", cfg, state)
    convert.convert(src, tmp_path / "f32")
    convert.convert(src, tmp_path / "out", dtype=dtype)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == dtype
    reference = load_file(tmp_path / "f32" / "model.safetensors")
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert out.keys() == reference.keys()
    for name, tensor in out.items():  # exactly the float32 weights rounded once
        assert tensor.dtype == getattr(torch, dtype)
        assert torch.equal(tensor, reference[name].to(tensor.dtype)), name


def test_cv_small_shards_reload_bit_for_bit(tmp_path):
    cfg = _cv_model_config()
    src = _cv_write_trainer(tmp_path / "src", cfg, _cv_trainer_state(cfg))
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
    _cv_assert_close(_cv_transformers_logits(tmp_path / "sharded", _CV_IDS),
                     _cv_transformers_logits(tmp_path / "one", _CV_IDS))


@pytest.mark.parametrize("text,expected", [
    ("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("20KB", 20000), ("1000", 1000),
    (4096, 4096), ("1.5kb", 1500),
])
def test_cv_parse_size(text, expected):
    assert convert.parse_size(text) == expected


@pytest.mark.parametrize("text", ["5XB", "-1GB", "0", "GB", "", "5 G B"])
def test_cv_bad_sizes_are_refused(text):
    with pytest.raises(convert.ConversionError, match="--shard-size"):
        convert.parse_size(text)


# --- the hf_olmo and transformers layouts ---------------------------------------------------------------


@pytest.mark.parametrize("weights_file", ["pytorch_model.bin", "model.safetensors"])
def test_cv_hf_olmo_layout(tmp_path, weights_file):
    cfg = _cv_model_config(n_kv_heads=2)
    state = _cv_trainer_state(cfg, prefix="model.transformer.")
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
    expected = _cv_reference_logits(state, cfg, _CV_IDS, prefix="model.transformer.")
    _cv_assert_close(_cv_transformers_logits(tmp_path / "dst", _CV_IDS), expected)


def _cv_transformers_model(tied, seed=0, **overrides):
    import transformers

    torch.manual_seed(seed)
    config = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied, clip_qkv=2.0,
                  initializer_range=0.2, rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                  pad_token_id=1, eos_token_id=100)
    model = transformers.OlmoForCausalLM(transformers.OlmoConfig(**dict(config, **overrides))).eval()
    with torch.no_grad():  # transformers starts biases at zero, where they would test nothing
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(std=0.5)
    return model


def _cv_save_transformers_config(model, src, v4_config):
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
def test_cv_transformers_bin_is_rewritten_as_safetensors(tmp_path, tied, sharded, v4_config):
    model = _cv_transformers_model(tied)
    src = tmp_path / "src"
    raw, _ = _cv_save_transformers_config(model, src, v4_config)
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
        expected = model(torch.tensor([_CV_IDS])).logits[0].double()
    # The same float32 weights and code on both sides: only run-to-run nondeterminism could differ.
    _cv_assert_close(_cv_transformers_logits(tmp_path / "dst", _CV_IDS), expected)


@pytest.mark.parametrize("rope_type,v4_config,dtype", [
    ("linear", False, "float32"), ("dynamic", True, "float32"), ("linear", True, "bfloat16"),
    ("dynamic", False, "bfloat16"),
])
def test_cv_transformers_features_survive_a_rewrite(tmp_path, rope_type, v4_config, dtype):
    # What only a transformers checkpoint can hold: q/k/v/o biases, RoPE scaling, another activation; with GQA.
    # max_position_embeddings 8 < len(_CV_IDS), so dynamic scaling changes the frequencies too.
    import transformers

    import olmo

    model = _cv_transformers_model(
        False, attention_bias=True, hidden_act="gelu", max_position_embeddings=8,
        rope_parameters={"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0})
    src = tmp_path / "src"
    raw, dtype_key = _cv_save_transformers_config(model, src, v4_config)
    save_file(model.state_dict(), src / "model.safetensors")
    convert.convert(src, tmp_path / "dst", dtype=dtype)

    # Every setting kept, in the source's style; only the dtype changes.
    assert json.loads((tmp_path / "dst" / "config.json").read_text()) == dict(raw, **{dtype_key: dtype})
    out = load_file(tmp_path / "dst" / "model.safetensors")
    assert out.keys() == model.state_dict().keys() and "model.layers.1.self_attn.o_proj.bias" in out
    ids = torch.tensor([_CV_IDS])

    def logits(path):
        return transformers.OlmoForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()(ids).logits

    with torch.no_grad():  # the same weights and code on both sides: bit for bit
        # In bfloat16: the source loaded as bfloat16 (model.to() would also round RoPE's inv_freq buffer).
        expected = model(ids).logits if dtype == "float32" else logits(src)
        assert torch.equal(logits(tmp_path / "dst"), expected)
        ours = olmo.OlmoForCausalLM.from_pretrained(tmp_path / "dst", dtype=torch.float32)(ids)
    _cv_assert_close(ours[0].double(), _cv_transformers_logits(tmp_path / "dst", _CV_IDS))


@pytest.mark.parametrize("change,message", [
    (lambda raw, s: raw.update(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope_scaling type 'yarn'"),
    (lambda raw, s: raw.update(hidden_act="tanh"), "hidden_act 'tanh'"),
    (lambda raw, s: raw.update(num_key_value_heads=3), "num_key_value_heads 3"),
    (lambda raw, s: raw.update(hidden_size=-32), "hidden_size must be a positive integer"),
    (lambda raw, s: s.pop("model.layers.1.self_attn.k_proj.bias"), "model.layers.1.self_attn.k_proj.bias"),
    (lambda raw, s: raw.update(attention_bias=False), "model.layers.0.self_attn.k_proj.bias"),
    (lambda raw, s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(16)}),
     r"q_proj.bias has shape \(16,\)"),
], ids=["rope-type", "activation", "kv-heads", "size", "missing-bias", "unexpected-bias", "bias-shape"])
def test_cv_transformers_checkpoint_inconsistent_with_olmo_is_refused(tmp_path, change, message):
    model = _cv_transformers_model(False, attention_bias=True)
    src = tmp_path / "src"
    raw, _ = _cv_save_transformers_config(model, src, False)
    state = dict(model.state_dict())
    change(raw, state)
    (src / "config.json").write_text(json.dumps(raw))
    save_file(state, src / "model.safetensors")
    with pytest.raises(convert.ConversionError, match=message):
        convert.convert(src, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(heads=st.sampled_from([1, 2, 4]), groups=st.sampled_from([1, 2]), head_dim=st.sampled_from([4, 8]),
       mlp=st.integers(4, 40), tied=st.booleans(), seed=st.integers(0, 2**16))
def test_cv_any_shape_matches_the_reference(tmp_path_factory, heads, groups, head_dim, mlp, tied, seed):
    # groups query heads per kv head; mlp is transformers' intermediate size (the fused ff_proj is twice it).
    cfg = _cv_model_config(d_model=heads * groups * head_dim, n_heads=heads * groups, n_kv_heads=heads,
                           mlp_hidden_size=2 * mlp, n_layers=1, weight_tying=tied)
    state = _cv_trainer_state(cfg, seed=seed)
    tmp = tmp_path_factory.mktemp("any")
    convert.convert(_cv_write_trainer(tmp / "src", cfg, state), tmp / "dst")
    _cv_assert_close(_cv_transformers_logits(tmp / "dst", _CV_IDS), _cv_reference_logits(state, cfg, _CV_IDS))


# --- our own readers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _cv_converted(tmp_path_factory):
    cfg = _cv_model_config(n_kv_heads=2, clip_qkv=0.5)
    state = _cv_trainer_state(cfg)
    tmp = tmp_path_factory.mktemp("ours")
    convert.convert(_cv_write_trainer(tmp / "src", cfg, state), tmp / "dst", shard_size="20KB")
    return tmp / "dst", _cv_reference_logits(state, cfg, _CV_IDS)


def test_cv_olmo_py_reads_the_result(_cv_converted):
    import olmo

    path, expected = _cv_converted
    model = olmo.OlmoForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([_CV_IDS]))[0].double()
    _cv_assert_close(logits, expected)


def test_cv_olmo_numpy_reads_the_result(_cv_converted):
    import numpy as np

    olmo_numpy = pytest.importorskip("olmo_numpy")  # written concurrently: skip only while it isn't there
    path, expected = _cv_converted
    logits = olmo_numpy.OlmoForCausalLM.from_pretrained(path)(np.array([_CV_IDS]))
    assert logits.dtype == np.float32
    _cv_assert_close(torch.from_numpy(logits[0]).double(), expected)


# --- the command line -----------------------------------------------------------------------------------


def test_cv_cli_converts_and_shows_progress(tmp_path, capsys):
    cfg = _cv_model_config()
    src = _cv_write_trainer(tmp_path / "src", cfg, _cv_trainer_state(cfg))
    convert.main([str(src), str(tmp_path / "dst"), "--dtype", "bfloat16", "--shard-size", "1MB"])
    assert "model.layers.1.mlp.down_proj.weight" in capsys.readouterr().err  # progress goes to stderr
    assert json.loads((tmp_path / "dst" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_cv_cli_errors_are_one_line_with_status_2(tmp_path, capsys):
    cfg = _cv_model_config(alibi=True)
    src = _cv_write_trainer(tmp_path / "src", cfg, _cv_trainer_state(cfg))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    cases = {
        (tmp_path / "missing", tmp_path / "o1"): "no such directory",
        (tmp_path / "notes", tmp_path / "o2"): "not an OLMo checkpoint",
        (src, tmp_path / "o3"): "alibi",
        (src, tmp_path / "o4", "--dtype", "float8"): "--dtype",
        (src, tmp_path / "o5", "--shard-size", "lots"): "--shard-size",
    }
    for args, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            convert.main([str(a) for a in args])
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2, (args, lines)
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "src"]

    # The same through a real process, once (each one spends seconds importing torch).
    result = subprocess.run([sys.executable, str(REPO / "convert.py"), str(src), str(tmp_path / "o6")],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "alibi" in result.stderr
    assert not (tmp_path / "o6").exists()
