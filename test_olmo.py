"""Tests: olmo.py (and its NumPy twin, the converter and the benchmark) against transformers, the reference.

Every check compares against transformers' OlmoForCausalLM on the same weights, or against a second computation
of the same quantity (cached vs uncached, padded vs alone) -- never against numbers copied from our own output.
Tolerances (fp32 on the CPU): logits agree to 1e-5. The two implementations run the same float32 operations,
mostly in the same order, so they typically agree bit for bit; 1e-5 on logits of order 1 leaves room for a
different kernel's summation order (~1e-6) while any real bug (a wrong rotation, a missed clip, a padding leak)
moves logits by 1e-3 or more. The NumPy twin and the converter have tolerances of their own, justified at the top
of their sections.
"""

import base64
import json
import math
import os
import pickle
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from dataclasses import asdict

import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import torch
import torch.nn.functional as F
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import bench
import convert
import olmo
import olmo_numpy

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

# Deterministic in CI: the same examples every run, no per-example deadline (model building is slow-ish).
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")

HERE = os.path.dirname(os.path.abspath(__file__))
ATOL = RTOL = 1e-5  # see the module docstring
ACTIVATIONS = ["silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"]


# ----------------------------------------------------------------------------------------------------------------
# Random small configs and checkpoints


@st.composite
def configs(draw):
    """A small config exercising every option: MHA/GQA/MQA, bias, tying, clip_qkv, each activation, no/linear/
    dynamic RoPE scaling with a short max_position_embeddings so that sequences run past it."""
    heads = draw(st.sampled_from([1, 2, 4]))
    scaling = draw(st.sampled_from([None, "linear", "dynamic"]))
    return dict(
        vocab_size=draw(st.integers(40, 130)),
        hidden_size=heads * draw(st.sampled_from([4, 8, 16])),
        intermediate_size=draw(st.integers(8, 64)),
        num_hidden_layers=draw(st.integers(1, 2)),
        num_attention_heads=heads,
        num_key_value_heads=draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])),
        hidden_act=draw(st.sampled_from(ACTIVATIONS)),
        max_position_embeddings=draw(st.sampled_from([8, 16, 64])),
        tie_word_embeddings=draw(st.booleans()),
        attention_bias=draw(st.booleans()),
        clip_qkv=draw(st.none() | st.floats(0.3, 2.0)),
        rope_theta=draw(st.sampled_from([10000.0, 500.0])),
        rope_scaling=scaling and {"rope_type": scaling, "factor": draw(st.floats(1.5, 4.0))},
        pad_token_id=1, bos_token_id=None, eos_token_id=None,
    )


def reference_model(cfg, seed=0):
    """A transformers OlmoForCausalLM with random weights large enough that activations matter: unit-variance
    projections (so clip_qkv really clips) and biases, instead of the tiny std-0.02 init that makes logits ~0."""
    cfg = dict(cfg)
    scaling = cfg.pop("rope_scaling")
    config = transformers.OlmoConfig(**cfg, **({"rope_scaling": dict(scaling)} if scaling else {}))
    model = transformers.OlmoForCausalLM(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else p.shape[-1] ** -0.5))
    return model.eval()


def save(model, path, style="v5"):
    """save_pretrained writes transformers 5's config.json (rope_parameters); style "v4" rewrites it the way the
    files on the hub are (top-level rope_theta, rope_scaling with "type"), with some keys that don't matter."""
    model.save_pretrained(path)
    if style == "v4":
        with open(os.path.join(path, "config.json")) as f:
            d = json.load(f)
        rope = d.pop("rope_parameters")
        d["rope_theta"] = rope["rope_theta"]
        d["rope_scaling"] = {"type": rope["rope_type"], "factor": rope["factor"]} if "factor" in rope else None
        d.update(torch_dtype="float32", pretraining_tp=1, transformers_version="4.40.0")
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(d, f)
    return path


def ids_for(cfg, batch, length, seed):
    return torch.randint(0, cfg["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
    """A NumPy `actual` (olmo_numpy's output) must be float32 and is compared as an array, to a tensor or array."""
    if isinstance(actual, np.ndarray):
        expected = expected.numpy() if isinstance(expected, torch.Tensor) else expected
        assert actual.dtype == np.float32 and actual.shape == expected.shape
        np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)
    else:
        torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def dynamic_past_max(cfg, length):
    """Whether a sequence this long runs dynamic RoPE past the trained length (where it changes frequencies)."""
    return (cfg["rope_scaling"] or {}).get("rope_type") == "dynamic" and length > cfg["max_position_embeddings"]


# ----------------------------------------------------------------------------------------------------------------
# olmo.py against transformers


@settings(max_examples=40)
@given(cfg=configs(), length=st.integers(1, 24), style=st.sampled_from(["v4", "v5"]), seed=st.integers(0, 99))
def test_logits_and_loss_equal_transformers(cfg, length, style, seed):
    ref = reference_model(cfg, seed)
    ids = ids_for(cfg, 2, length, seed)
    labels = ids.clone()
    labels[0, : length // 2] = -100  # ignored positions count in neither the sum nor the mean
    with tempfile.TemporaryDirectory() as d:
        model = olmo.OlmoForCausalLM.from_pretrained(save(ref, d, style))
    assert model.config.rope_scaling == (cfg["rope_scaling"] and {**cfg["rope_scaling"]})
    with torch.no_grad():
        expected = ref(ids, labels=labels)
        logits, loss = model(ids, labels=labels)
    assert logits.shape == (2, length, cfg["vocab_size"])
    assert_close(logits, expected.logits)
    if (labels[:, 1:] != -100).any():
        assert_close(loss, expected.loss)
    else:  # nothing to predict: both give NaN (0/0)
        assert loss.isnan() and expected.loss.isnan()


@settings(max_examples=25)
@given(cfg=configs(), lengths=st.lists(st.integers(1, 12), min_size=2, max_size=3), new=st.integers(1, 12),
       seed=st.integers(0, 99))
def test_cached_generation_equals_transformers_and_full_forward(cfg, lengths, new, seed):
    """Left-padded batch, greedy: same tokens and same per-step logits as transformers' generate (which also
    uses a KV cache), and -- except for dynamic RoPE past the trained length -- the same logits as one full
    forward over the final sequence."""
    ref = reference_model(cfg, seed)
    ids, mask = left_pad([ids_for(cfg, 1, n, seed + i)[0] for i, n in enumerate(lengths)])
    with tempfile.TemporaryDirectory() as d:
        model = olmo.OlmoForCausalLM.from_pretrained(save(ref, d))
    out = ref.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=1,
                       output_logits=True, return_dict_in_generate=True)
    tokens = model.generate(ids, new, attention_mask=mask, callback=lambda t: None)
    assert torch.equal(tokens, out.sequences)

    # the per-step logits, through the same prefill / decode_one_token path generate uses
    T = ids.shape[1]
    steps = step_logits(model, ids, mask, tokens[:, T:])
    assert_close(steps, torch.stack(out.logits, 1))

    full_mask = torch.cat([mask, torch.ones(len(lengths), new - 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = model(tokens[:, :-1], attention_mask=full_mask)[:, T - 1:]
    if dynamic_past_max(cfg, max(lengths) + new - 1):
        # Dynamic NTK changes the frequencies as the sequence grows, but cached keys keep the rotation they got
        # when they were computed; transformers behaves exactly so (checked above), and a full forward differs.
        assume(new > 1)
        assert not torch.allclose(full, steps, atol=1e-3)
    else:
        assert_close(full, steps)


def step_logits(model, ids, mask, new):
    """Per-step logits (B, n, vocab) of olmo.py's cached path, generate's own prefill / decode_one_token calls, fed
    the tokens new (B, n): step i predicts new[:, i]."""
    T = ids.shape[1]
    model.setup_cache(mask, T + new.shape[1])
    with torch.no_grad():
        steps = [model.prefill(ids, mask)]
        for i in range(new.shape[1] - 1):
            position = mask.sum(-1, keepdim=True) + i
            steps.append(model.decode_one_token(new[:, i, None], torch.tensor([T + i]), position))
    return torch.stack(steps, 1)


def left_pad(rows, pad=1):
    """Token rows of different lengths -> (ids, attention_mask), padded on the left as generate expects; NumPy
    arrays for NumPy rows (olmo_numpy's), tensors otherwise."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.as_tensor(r)
        mask[i, T - len(r):] = 1
    return (ids.numpy(), mask.numpy()) if isinstance(rows[0], np.ndarray) else (ids, mask)


@settings(max_examples=20)
@given(cfg=configs(), lengths=st.lists(st.integers(1, 10), min_size=2, max_size=3), seed=st.integers(0, 99))
def test_left_padded_rows_equal_prompts_alone(cfg, lengths, seed):
    # With dynamic RoPE past the trained length the frequencies depend on the longest row in the batch (as in
    # transformers), so a short row alone would legitimately differ.
    assume(not dynamic_past_max(cfg, max(lengths) + 6))
    model = olmo.OlmoForCausalLM(olmo.OlmoConfig(**cfg)).eval()
    rows = [ids_for(cfg, 1, n, seed + i)[0] for i, n in enumerate(lengths)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batch_logits = model(ids, attention_mask=mask)
        batch_tokens = model.generate(ids, 6, attention_mask=mask)
        for i, row in enumerate(rows):
            n = len(row)
            assert_close(batch_logits[i, -n:], model(row[None])[0])
            assert torch.equal(batch_tokens[i, -6:], model.generate(row[None], 6)[0, -6:])


def test_generation_stops_at_eos_like_transformers():
    cfg = dict(  # a fixed config: the point here is the EOS bookkeeping
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, hidden_act="silu", max_position_embeddings=64, tie_word_embeddings=False,
        attention_bias=False, clip_qkv=None, rope_theta=10000.0, rope_scaling=None, pad_token_id=1,
        bos_token_id=None, eos_token_id=None)
    ref = reference_model(cfg, 3)
    ids, mask = left_pad([ids_for(cfg, 1, n, n)[0] for n in (5, 9, 7)])
    with tempfile.TemporaryDirectory() as d:
        model = olmo.OlmoForCausalLM.from_pretrained(save(ref, d))
    free = model.generate(ids, 12, attention_mask=mask)[:, ids.shape[1]:]
    # make EOS a token that row 0 produces at step 2, and another row produces only later (or never)
    eos = int(free[0, 2])
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                            pad_token_id=1)
    tokens = model.generate(ids, 12, attention_mask=mask, eos_token_id=eos)
    assert torch.equal(tokens, expected)
    assert (tokens[0, ids.shape[1] + 3:] == 1).all()  # row 0 is padded after its EOS
    # a list of EOS ids works too, and generation stops once every row has finished
    all_eos = sorted(set(free[:, 0].tolist()))
    tokens = model.generate(ids, 12, attention_mask=mask, eos_token_id=all_eos)
    assert tokens.shape[1] == ids.shape[1] + 1


def test_clip_qkv_clips_and_tied_weights_are_shared():
    cfg = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, hidden_act="silu", max_position_embeddings=32, tie_word_embeddings=True,
               attention_bias=True, clip_qkv=0.5, rope_theta=10000.0, rope_scaling=None, pad_token_id=1,
               bos_token_id=None, eos_token_id=None)
    ref = reference_model(cfg)
    ids = ids_for(cfg, 1, 10, 0)
    with tempfile.TemporaryDirectory() as d:
        model = olmo.OlmoForCausalLM.from_pretrained(save(ref, d))
        assert "lm_head.weight" not in load_keys(d)  # transformers stores a tied head once
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        clipped = model(ids)
        model.config.clip_qkv = None
        assert not torch.allclose(clipped, model(ids), atol=1e-3)  # the random weights do exceed the clip


def load_keys(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return set(f.keys())


# ----------------------------------------------------------------------------------------------------------------
# Sampling


def test_sample_greedy_top_k_top_p():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, -1.0], [0.0, 0.0, 5.0, 0.0, 0.0]])
    assert olmo.sample(logits).tolist() == [1, 2]  # temperature 0: argmax (first of a tie)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([olmo.sample(logits, 1.0, top_k=2, generator=g) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 2}  # the two tied top logits, nothing else
    # top_k=1 with a tie keeps both tied tokens (the threshold is the k-th value)
    draws = torch.stack([olmo.sample(logits, 1.0, top_k=1, generator=g) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 2}
    assert set(draws[:, 1].tolist()) == {2}
    # probabilities of row 0: [0.061, 0.454, 0.454, 0.023, 0.008]; top_p=0.5 needs both 0.454s (0.908), and
    # top_p=0.95 adds the 0.061 (0.969) but not the 0.023
    draws = torch.stack([olmo.sample(logits, 1.0, top_p=0.5, generator=g) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 2}
    draws = torch.stack([olmo.sample(logits, 1.0, top_p=0.95, generator=g) for _ in range(600)])
    assert set(draws[:, 0].tolist()) == {0, 1, 2}
    # a tiny top_p still keeps the most likely token
    assert olmo.sample(logits[1:], 1.0, top_p=1e-6, generator=g).tolist() == [2]


def test_sampling_with_a_seed_is_reproducible():
    model = olmo.OlmoForCausalLM(olmo.OlmoConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2))
    ids = torch.tensor([[3, 4, 5]])
    a = model.generate(ids, 8, temperature=0.9, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = model.generate(ids, 8, temperature=0.9, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (1, 11)


# ----------------------------------------------------------------------------------------------------------------
# Config


def test_config_defaults_are_transformers_defaults():
    ours, theirs = olmo.OlmoConfig(), transformers.OlmoConfig()
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "use_cache",
                 "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_bias",
                 "attention_dropout", "clip_qkv"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] and ours.rope_scaling is None


@pytest.mark.parametrize("change, field", [
    ({"model_type": "hf_olmo"}, "model_type"),
    ({"hidden_size": 30}, "hidden_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling type"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 1.0}}, "factor"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 0.5}}, "factor"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}}, "rope_scaling type"),
    ({"hidden_act": "tanh"}, "hidden_act"),
])
def test_bad_configs_are_rejected_naming_the_field(change, field):
    d = dict(model_type="olmo", hidden_size=32, num_attention_heads=4, architectures=["OlmoForCausalLM"],
             torch_dtype="bfloat16", transformers_version="4.40.0", pretraining_tp=1)
    d.update(change)
    with pytest.raises(ValueError, match=field):
        olmo.OlmoConfig.from_dict(d)


def test_config_styles_and_ignored_keys():
    v4 = olmo.OlmoConfig.from_dict({"model_type": "olmo", "rope_theta": 500.0, "dtype": "float32",
                                    "rope_scaling": {"type": "dynamic", "factor": 2}, "architectures": ["x"]})
    v5 = olmo.OlmoConfig.from_dict({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0}})
    assert v4 == v5 and v4.rope_theta == 500.0 and v4.rope_scaling == {"rope_type": "dynamic", "factor": 2.0}
    plain = olmo.OlmoConfig.from_dict({"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}})
    assert plain.rope_scaling is None and plain.rope_theta == 7.0 and plain.num_key_value_heads == 32


# ----------------------------------------------------------------------------------------------------------------
# Loading


SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, hidden_act="silu", max_position_embeddings=64, tie_word_embeddings=False,
             attention_bias=False, clip_qkv=None, rope_theta=10000.0, rope_scaling=None, pad_token_id=1,
             bos_token_id=None, eos_token_id=None)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    ref = reference_model(SMALL)
    return save(ref, str(tmp_path_factory.mktemp("small"))), ref


def expected_logits(ref, ids):
    with torch.no_grad():
        return ref(ids).logits


def test_sharded_bin_and_dtype_loading(small_checkpoint, tmp_path):
    path, ref = small_checkpoint
    ids = ids_for(SMALL, 1, 9, 0)
    sharded = str(tmp_path / "sharded")
    ref.save_pretrained(sharded, max_shard_size="20KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    assert_close(olmo.OlmoForCausalLM.from_pretrained(sharded)(ids), expected_logits(ref, ids))
    # pytorch_model.bin, single and sharded, as older hub repos ship them
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    state = ref.state_dict()
    torch.save(state, binary / "pytorch_model.bin")
    assert_close(olmo.OlmoForCausalLM.from_pretrained(str(binary))(ids), expected_logits(ref, ids))
    os.remove(binary / "pytorch_model.bin")
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, binary / file)
    (binary / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in halves.items() for k in keys}}))
    assert_close(olmo.OlmoForCausalLM.from_pretrained(str(binary))(ids), expected_logits(ref, ids))
    # bf16: every weight in bf16, and the logits near fp32's (bf16 keeps 8 bits of mantissa)
    model = olmo.OlmoForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert_close(model(ids).float(), expected_logits(ref, ids), atol=0.1, rtol=0.05)


def test_bin_files_are_never_unpickled_as_code(small_checkpoint, tmp_path):
    path, _ = small_checkpoint
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "payload": Exploit()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        olmo.OlmoForCausalLM.from_pretrained(str(tmp_path))
    assert not os.path.exists(tmp_path / "pwned")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {tempfile.gettempdir()}/pwned",))


def rewrite_weights(path, dest, edit):
    """Copy a checkpoint, passing its tensors through edit(dict) -> dict."""
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(path):
        if name != "model.safetensors":
            with open(os.path.join(path, name), "rb") as src, open(os.path.join(dest, name), "wb") as dst:
                dst.write(src.read())
    save_file(edit(load_file(os.path.join(path, "model.safetensors"))), os.path.join(dest, "model.safetensors"))
    return dest


WRONG_TENSORS = [  # (edit for rewrite_weights, the error it must give): for olmo.py and olmo_numpy.py alike
    (lambda sd: {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"},
     "missing tensor model.layers.1.mlp.up_proj.weight"),
    (lambda sd: {**sd, "model.layers.0.self_attn.rotary.weight": torch.zeros(1)},
     "unexpected tensor model.layers.0.self_attn.rotary.weight"),
    (lambda sd: {**sd, "model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 32)},
     r"model.layers.0.self_attn.k_proj.weight has shape \(32, 32\), expected \(16, 32\)"),
    (lambda sd: {k: v for k, v in sd.items() if k != "lm_head.weight"}, "missing tensor lm_head.weight"),
]


@pytest.mark.parametrize("edit, message", WRONG_TENSORS)
def test_wrong_tensors_are_named(small_checkpoint, tmp_path, edit, message):
    path, _ = small_checkpoint
    with pytest.raises(ValueError, match=message):
        olmo.OlmoForCausalLM.from_pretrained(rewrite_weights(path, str(tmp_path / "bad"), edit))


def test_tied_checkpoint_with_a_stored_head_loads(tmp_path):
    cfg = {**SMALL, "tie_word_embeddings": True}
    ref = reference_model(cfg)
    path = save(ref, str(tmp_path / "tied"))
    edited = rewrite_weights(path, str(tmp_path / "with_head"),
                             lambda sd: {**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()})
    ids = ids_for(cfg, 1, 7, 0)
    assert_close(olmo.OlmoForCausalLM.from_pretrained(edited)(ids), expected_logits(ref, ids))


def test_hub_ids_are_fetched_with_huggingface_hub(small_checkpoint, monkeypatch):
    """A hub id goes to huggingface_hub.snapshot_download (stubbed: no network here), whose directory then loads;
    without huggingface_hub the error says how to get the checkpoint."""
    import huggingface_hub
    path, ref = small_checkpoint
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append(repo) or path)
    ids = ids_for(SMALL, 1, 5, 0)
    assert_close(olmo.OlmoForCausalLM.from_pretrained("allenai/OLMo-1B-hf")(ids), expected_logits(ref, ids))
    assert asked == ["allenai/OLMo-1B-hf"]
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(ValueError, match="pip install huggingface_hub"):
        olmo.OlmoForCausalLM.from_pretrained("allenai/OLMo-1B-hf")


def test_missing_and_non_checkpoint_paths(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        olmo.OlmoForCausalLM.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="config.json"):
        olmo.OlmoForCausalLM.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no model.safetensors or pytorch_model.bin"):
        olmo.OlmoForCausalLM.from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# CLI


def train_tokenizer(path, vocab_size):
    """A tiny byte-level BPE tokenizer.json, as OLMo's (GPT-NeoX style) is, trained on a few sentences."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Language models are fun. 🙂 日本語も少し。"] * 20, trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    return tok


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli"))
    cfg = {**SMALL, "vocab_size": 300, "eos_token_id": 0}
    save(reference_model(cfg, 5), path)
    tok = train_tokenizer(path, 300)
    return path, tok


def run_cli(*args, script="olmo.py", code=None, env=None):
    """A CLI (olmo.py, olmo_numpy.py, convert.py) as a user runs it, or `python -c code`: a fresh process, so exit
    status, stdout/stderr and tracebacks are real."""
    command = ["-c", code] if code else [os.path.join(HERE, script), *args]
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=HERE,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=120)


def ctrl_c_after_prompt(path, script):
    """Start a long sampled generation from "Go", read the first two characters printed (the prompt is printed
    before generation starts), then Ctrl-C: (first, rest of stdout, stderr, exit status)."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, script), "--model", path, "--prompt", "Go",
                             "--max-new-tokens", "3000", "--temperature", "1", "--seed", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.read(2)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    return first, rest, err, proc.returncode


def greedy_output(path, tok, prompt, new_tokens):
    """What the CLI prints for a greedy run: the prompt, olmo.py's continuation (to EOS 0) decoded, a newline."""
    ids = tok.encode(prompt, add_special_tokens=False).ids
    new = olmo.OlmoForCausalLM.from_pretrained(path).generate(torch.tensor([ids]), new_tokens, eos_token_id=0)
    return prompt + tok.decode(new[0, len(ids):].tolist(), skip_special_tokens=True) + "\n"


def stream_split_characters(module, cli_checkpoint, as_token, monkeypatch):
    """Run module's (olmo's or olmo_numpy's) CLI with prompt "x" and a generate that feeds the streamer "🙂日本語🙂"
    one byte per token (as_token([id]) each), so that tokens split multi-byte characters: the chunks it prints."""
    path, tok = cli_checkpoint
    ids = tok.encode("🙂日本語🙂", add_special_tokens=False).ids
    byte_ids = [tok.token_to_id(c) for c in "".join(tok.id_to_token(i) for i in ids)]  # one byte per token
    assert len(byte_ids) > len(ids) and None not in byte_ids

    def scripted_generate(self, input_ids, max_new_tokens, callback=None, **kw):  # "generates" the byte tokens
        for t in byte_ids:
            callback(as_token([t]))

    chunks = []
    monkeypatch.setattr(module.OlmoForCausalLM, "generate", scripted_generate)
    monkeypatch.setattr("builtins.print", lambda *a, file=None, end="\n", flush=False:
                        file is None and chunks.append((a[0] if a else "") + end))
    module.run(module.parse_args(["--model", path, "--prompt", "x", "--max-new-tokens", "50"]))
    return chunks


def break_checkpoint(path, dest, breakage):
    """A copy of a checkpoint, broken one way: no_path (nothing left at dest), no_config, bad_json, not_olmo
    (model_type llama), no_tokenizer, missing_tensor (model.layers.0.mlp.up_proj.weight), bad_shape (a 3x32
    embedding) or bad_up_proj (a 3x3 model.layers.0.mlp.up_proj.weight)."""
    bad = rewrite_weights(path, dest, {
        "missing_tensor": lambda sd: {k: v for k, v in sd.items() if k != "model.layers.0.mlp.up_proj.weight"},
        "bad_shape": lambda sd: {**sd, "model.embed_tokens.weight": torch.zeros(3, 32)},
        "bad_up_proj": lambda sd: {**sd, "model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)},
    }.get(breakage, lambda sd: sd))
    config = os.path.join(bad, "config.json")
    if breakage == "no_path":
        shutil.rmtree(bad)
    if breakage == "no_config":
        os.remove(config)
    if breakage == "bad_json":
        open(config, "w").write("{not json")
    if breakage == "not_olmo":
        d = json.load(open(config))
        open(config, "w").write(json.dumps({**d, "model_type": "llama"}))
    if breakage == "no_tokenizer":
        os.remove(os.path.join(bad, "tokenizer.json"))
    return bad


def main_in_process(main, args, capsys):
    """The CLI's main() in this process (a subprocess costs seconds of torch import): (status, stdout, stderr).
    An uncaught exception fails the test, as a traceback would."""
    try:
        status = main(args)
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_streams_prompt_and_continuation(cli_checkpoint):
    path, tok = cli_checkpoint
    prompt = "Language 🙂 models"
    result = run_cli("--model", path, "--prompt", prompt, "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr
    # the same greedy continuation computed here, decoded by the tokenizer
    assert result.stdout == greedy_output(path, tok, prompt, 24)
    assert "tokens/s" in result.stderr and "Traceback" not in result.stderr


def test_cli_streaming_never_splits_a_character(cli_checkpoint, monkeypatch):
    """Feed the streamer tokens that split multi-byte characters: every chunk it prints must be whole text."""
    chunks = stream_split_characters(olmo, cli_checkpoint, torch.tensor, monkeypatch)
    assert "".join(chunks) == "x🙂日本語🙂\n"
    assert all("\ufffd" not in c for c in chunks) and len(chunks) > 3


def test_cli_generation_config_and_bos(cli_checkpoint, tmp_path, monkeypatch, capsys):
    """generation_config.json sets the sampling defaults (transformers' semantics: sampling only with do_sample)
    and EOS; flags override it; BOS is prepended only when config.json has a bos_token_id."""
    path, tok = cli_checkpoint
    seen = {}

    def recording_generate(self, input_ids, max_new_tokens, callback=None, **settings):
        seen.update(settings, ids=input_ids[0].tolist())

    monkeypatch.setattr(olmo.OlmoForCausalLM, "generate", recording_generate)
    prompt_ids = tok.encode("hi", add_special_tokens=False).ids
    assert olmo.main(["--model", path, "--prompt", "hi"]) == 0
    assert seen == dict(temperature=0.0, top_k=None, top_p=None, eos_token_id=0, ids=prompt_ids)

    sampled = rewrite_weights(path, str(tmp_path / "sampled"), lambda sd: sd)
    with open(os.path.join(sampled, "generation_config.json"), "w") as f:
        json.dump({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [0, 7]}, f)
    assert olmo.main(["--model", sampled, "--prompt", "hi"]) == 0
    assert seen == dict(temperature=0.6, top_k=50, top_p=0.9, eos_token_id=[0, 7], ids=prompt_ids)
    assert olmo.main(["--model", sampled, "--prompt", "hi", "--temperature", "0", "--top-k", "5"]) == 0
    assert seen["temperature"] == 0 and seen["top_k"] == 5

    with open(os.path.join(sampled, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(sampled, "config.json"), "w") as f:
        json.dump({**config, "bos_token_id": 1}, f)
    assert olmo.main(["--model", sampled, "--prompt", "hi"]) == 0
    assert seen["ids"] == [1] + prompt_ids
    capsys.readouterr()


def test_import_olmo_needs_only_torch():
    code = ("import sys, olmo; extra = {'transformers', 'tokenizers', 'safetensors', 'huggingface_hub'}"
            " & set(sys.modules); assert not extra, extra")
    assert run_cli(code=code).returncode == 0


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/dir"], "not a checkpoint directory"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--temperature", "-0.5"], "--temperature"),
    (["--top-k", "0"], "--top-k"),
    (["--model", "allenai/OLMo-1B-hf-not-cached"], "cannot fetch allenai/OLMo-1B-hf-not-cached"),
    (["--dtype", "int8"], "--dtype"),
])
def test_cli_bad_flags_one_line_exit_2(cli_checkpoint, args, message, tmp_path, monkeypatch, capsys):
    path, _ = cli_checkpoint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    status, out, err = main_in_process(olmo.main, ["--model", path, "--prompt", "hi", *args], capsys)
    assert status == 2 and out == ""
    assert message in err and err.count("\n") == 1


def test_cli_errors_in_a_real_process(cli_checkpoint, tmp_path):
    path, _ = cli_checkpoint
    for args in (["--top-p", "2"], ["--model", str(tmp_path)]):  # a flag, and a directory with no config.json
        result = run_cli("--model", path, "--prompt", "hi", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("breakage, message", [
    ("no_config", "config.json"),
    ("bad_json", "config.json"),
    ("not_olmo", "model_type"),
    ("missing_tensor", "missing tensor model.layers.0.mlp.up_proj.weight"),
    ("bad_shape", "model.embed_tokens.weight has shape"),
    ("no_tokenizer", "tokenizer.json"),
])
def test_cli_bad_checkpoints_one_line_exit_2(cli_checkpoint, tmp_path, breakage, message, capsys):
    path, _ = cli_checkpoint
    bad = break_checkpoint(path, str(tmp_path / "bad"), breakage)
    status, out, err = main_in_process(olmo.main, ["--model", bad, "--prompt", "hi"], capsys)
    assert status == 2 and out == ""
    assert message in err and err.count("\n") == 1


def test_cli_ctrl_c_keeps_what_was_printed(cli_checkpoint):
    first, rest, err, status = ctrl_c_after_prompt(cli_checkpoint[0], "olmo.py")
    assert first == "Go" and status == 130
    assert "Traceback" not in err and (first + rest).endswith("\n")


# ----------------------------------------------------------------------------------------------------------------
# olmo_numpy.py, the NumPy twin: against olmo.py and transformers on the same random checkpoints
#
# Tolerance (fp32, CPU): logits agree with olmo.py's and transformers' to atol = rtol = 2e-5 (logits of order 1).
# The twin runs the same float32 arithmetic but through NumPy's OpenBLAS and its own reductions, so sums are taken
# in another order (and gelu's erf is an approximation good to 1.5e-7): observed differences are a few 1e-6. Any
# real bug (a wrong rotation, a missed clip or bias, a padding leak, a stale cache slot) moves logits by 1e-3 or
# more.

NP_TOL = dict(atol=2e-5, rtol=2e-5)  # see the comment above

# Explicit examples, so every run covers the rarest combination whatever hypothesis draws: dynamic RoPE past the
# trained length, with GQA, bias, clip_qkv, a tied head and exact gelu.
NP_DYNAMIC = dict(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, hidden_act="gelu", max_position_embeddings=8, tie_word_embeddings=True,
                  attention_bias=True, clip_qkv=0.8, rope_theta=500.0,
                  rope_scaling={"rope_type": "dynamic", "factor": 2.5}, pad_token_id=1, bos_token_id=None,
                  eos_token_id=None)


def three_models(cfg, seed):
    """(transformers, olmo.py, olmo_numpy) models with the same weights, through a saved checkpoint."""
    ref = reference_model(cfg, seed)
    with tempfile.TemporaryDirectory() as d:
        save(ref, d)
        return ref, olmo.OlmoForCausalLM.from_pretrained(d), olmo_numpy.OlmoForCausalLM.from_pretrained(d)


def np_step_logits(model, ids, mask, new):
    """step_logits for olmo_numpy: per-step logits (B, n, vocab) of its cached path, generate's own prefill /
    decode_one_token calls, fed the tokens new (B, n): step i predicts new[:, i]."""
    T = ids.shape[1]
    model.setup_cache(mask, T + new.shape[1])
    steps = [model.prefill(ids, mask)]
    for i in range(new.shape[1] - 1):
        steps.append(model.decode_one_token(new[:, i:i + 1], T + i, mask.sum(-1, keepdims=True) + i))
    return np.stack(steps, 1)


def assert_same_greedy(tokens, expected, logits, T):
    """Greedy tokens (B, T + n) equal expected token for token. One exception, which random weights can make:
    two candidates whose logits tie to within the tolerance may come out either way; past such a step the rows
    are no longer comparable. logits (B, n, vocab) are the step logits along `tokens`."""
    expected = np.asarray(expected)
    for b in range(tokens.shape[0]):
        n = min(tokens.shape[1], expected.shape[1]) - T
        differ = np.flatnonzero(tokens[b, T:T + n] != expected[b, T:T + n])
        if len(differ):
            i = differ[0]
            gap = logits[b, i, tokens[b, T + i]] - logits[b, i, expected[b, T + i]]
            assert abs(gap) < 10 * NP_TOL["atol"], f"row {b} step {i}: token {tokens[b, T + i]}, expected " \
                                                    f"{expected[b, T + i]}, whose logit is {gap} lower"
            return  # a legitimate near tie: what follows is not comparable
    assert tokens.shape == expected.shape


@settings(max_examples=30)
@given(cfg=configs(), length=st.integers(1, 24), seed=st.integers(0, 99))
@example(cfg=NP_DYNAMIC, length=20, seed=0)
@example(cfg={**NP_DYNAMIC, "hidden_act": "gelu_pytorch_tanh", "num_key_value_heads": 1}, length=12, seed=1)
def test_numpy_logits_equal_olmo_and_transformers(cfg, length, seed):
    ref, model, twin = three_models(cfg, seed)
    ids = ids_for(cfg, 2, length, seed).numpy()
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids)).logits
        ours = model(torch.from_numpy(ids))
    logits = twin(ids)
    assert isinstance(logits, np.ndarray) and logits.shape == (2, length, cfg["vocab_size"])
    assert_close(logits, expected, **NP_TOL)
    assert_close(logits, ours, **NP_TOL)
    if cfg["clip_qkv"] is not None:  # the weights are large enough that the clip changes the result
        twin.config.clip_qkv = None
        assert not np.allclose(twin(ids), logits, atol=1e-3)


@settings(max_examples=20)
@given(cfg=configs(), lengths=st.lists(st.integers(1, 12), min_size=2, max_size=3), new=st.integers(1, 12),
       seed=st.integers(0, 99))
@example(cfg=NP_DYNAMIC, lengths=[3, 10, 6], new=8, seed=0)
@example(cfg={**NP_DYNAMIC, "hidden_act": "gelu_new", "rope_scaling": None}, lengths=[5, 2], new=12, seed=1)
def test_numpy_cached_generation_equals_olmo_and_full_forward(cfg, lengths, new, seed):
    """Left-padded batch, greedy: the same tokens as olmo.py's generate; the same per-step logits through the
    cache as olmo.py's; and -- except for dynamic RoPE past the trained length, where cached keys keep the
    rotation they were computed with -- the same logits as one full forward over the final sequence."""
    _, model, twin = three_models(cfg, seed)
    ids, mask = left_pad([ids_for(cfg, 1, n, seed + i)[0].numpy() for i, n in enumerate(lengths)])
    T = ids.shape[1]
    tokens = twin.generate(ids, new, attention_mask=mask)
    assert tokens.shape == (len(lengths), T + new) and tokens.dtype == np.int64
    assert np.array_equal(tokens[:, :T], ids)
    steps = np_step_logits(twin, ids, mask, tokens[:, T:])
    assert_close(steps, step_logits(model, *map(torch.from_numpy, (ids, mask, tokens[:, T:]))), **NP_TOL)
    expected = model.generate(torch.from_numpy(ids), new, attention_mask=torch.from_numpy(mask))
    assert_same_greedy(tokens, expected, steps, T)

    full_mask = np.concatenate([mask, np.ones((len(lengths), new - 1), dtype=mask.dtype)], 1)
    full = twin(tokens[:, :-1], attention_mask=full_mask)[:, T - 1:]
    if dynamic_past_max(cfg, max(lengths) + new - 1):
        assume(new > 1)
        assert not np.allclose(full, steps, atol=1e-3)
    else:
        assert_close(steps, full, **NP_TOL)


@settings(max_examples=15)
@given(cfg=configs(), lengths=st.lists(st.integers(1, 10), min_size=2, max_size=3), seed=st.integers(0, 99))
def test_numpy_left_padded_rows_equal_prompts_alone(cfg, lengths, seed):
    # With dynamic RoPE past the trained length the frequencies depend on the longest row in the batch (as in
    # transformers), so a short row alone would legitimately differ.
    assume(not dynamic_past_max(cfg, max(lengths) + 6))
    _, _, twin = three_models(cfg, seed)
    rows = [ids_for(cfg, 1, n, seed + i)[0].numpy() for i, n in enumerate(lengths)]
    ids, mask = left_pad(rows)
    batch_logits = twin(ids, attention_mask=mask)
    batch_tokens = twin.generate(ids, 6, attention_mask=mask)
    for i, row in enumerate(rows):
        n = len(row)
        assert_close(batch_logits[i, -n:], twin(row[None])[0], **NP_TOL)
        alone = twin.generate(row[None], 6)
        steps = np_step_logits(twin, row[None], np.ones((1, n), dtype=np.int64), alone[:, n:])
        assert_same_greedy(alone[:, n:], batch_tokens[i:i + 1, -6:], steps, 0)


def test_numpy_generation_stops_at_eos_like_olmo():
    _, model, twin = three_models(SMALL, 3)
    ids, mask = left_pad([ids_for(SMALL, 1, n, n)[0].numpy() for n in (5, 9, 7)])
    free = twin.generate(ids, 12, attention_mask=mask)[:, ids.shape[1]:]
    eos = int(free[0, 2])  # a token row 0 produces at step 2; other rows produce it later or never
    tokens = twin.generate(ids, 12, attention_mask=mask, eos_token_id=eos)
    expected = model.generate(torch.from_numpy(ids), 12, attention_mask=torch.from_numpy(mask), eos_token_id=eos)
    assert np.array_equal(tokens, expected.numpy())
    assert (tokens[0, ids.shape[1] + 3:] == 1).all()  # row 0 is padded after its EOS
    all_eos = sorted(set(free[:, 0].tolist()))  # a list of EOS ids; stop once every row has finished
    assert twin.generate(ids, 12, attention_mask=mask, eos_token_id=all_eos).shape[1] == ids.shape[1] + 1
    assert np.array_equal(twin.generate(ids, 0, attention_mask=mask), ids)


def test_numpy_sample_greedy_top_k_top_p():
    logits = np.array([[1.0, 3.0, 3.0, 0.0, -1.0], [0.0, 0.0, 5.0, 0.0, 0.0]], dtype=np.float32)
    assert olmo_numpy.sample(logits).tolist() == [1, 2]  # temperature 0: argmax (first of a tie)
    rng = np.random.default_rng(0)
    draws = np.stack([olmo_numpy.sample(logits, 1.0, top_k=1, rng=rng) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 2}  # top_k keeps tokens tied with the k-th
    assert set(draws[:, 1].tolist()) == {2}
    # probabilities (row 0) ~ [.06, .45, .45, .02, .01]: top_p 0.5 keeps the two tied, 0.95 adds token 0
    draws = np.stack([olmo_numpy.sample(logits, 1.0, top_p=0.5, rng=rng) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 2}
    draws = np.stack([olmo_numpy.sample(logits, 1.0, top_p=0.95, rng=rng) for _ in range(600)])
    assert set(draws[:, 0].tolist()) == {0, 1, 2}
    a = [olmo_numpy.sample(logits, 0.8, rng=np.random.default_rng(7)).tolist() for _ in range(2)]
    assert a[0] == a[1]  # a seeded rng is reproducible


def test_numpy_erf_and_activations():
    x = np.linspace(-6, 6, 100_001).astype(np.float32)
    exact = np.array([math.erf(v) for v in x.tolist()])
    assert np.abs(olmo_numpy.erf(x.astype(np.float64)) - exact).max() < 1.5e-7  # Abramowitz & Stegun 7.1.26
    assert np.abs(olmo_numpy.erf(x) - exact).max() < 1.5e-7 + 6e-8  # plus the final rounding to float32
    t = torch.from_numpy(x)
    for name in ACTIVATIONS:
        expected = transformers.activations.ACT2FN[name](t).numpy()
        np.testing.assert_allclose(olmo_numpy.ACT2FN[name](t.numpy()), expected, atol=3e-7, rtol=1e-6)
    assert not np.isnan(olmo_numpy.silu(np.float32([-1e4, 1e4]))).any()


@pytest.mark.parametrize("d", [
    {},
    {"model_type": "olmo", "rope_theta": 500.0, "rope_scaling": {"type": "dynamic", "factor": 2},
     "torch_dtype": "float32", "num_key_value_heads": 8, "clip_qkv": 8.0},
    {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}, "architectures": ["X"]},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "tie_word_embeddings": True},
])
def test_numpy_config_equals_olmo_config(d):
    assert asdict(olmo_numpy.OlmoConfig.from_dict(d)) == asdict(olmo.OlmoConfig.from_dict(d))


@pytest.mark.parametrize("d", [
    {"model_type": "hf_olmo"}, {"hidden_size": 100, "num_attention_heads": 3}, {"num_key_value_heads": 5},
    {"hidden_act": "tanh"}, {"rope_scaling": {"type": "yarn", "factor": 2.0}},
    {"rope_scaling": {"type": "linear", "factor": 0.5}},
])
def test_numpy_bad_configs_fail_like_olmo(d):
    with pytest.raises(ValueError) as expected:
        olmo.OlmoConfig.from_dict(d)
    with pytest.raises(ValueError) as ours:
        olmo_numpy.OlmoConfig.from_dict(d)
    assert str(ours.value) == str(expected.value)


# ----------------------------------------------------------------------------------------------------------------
# olmo_numpy.py: loading (its .safetensors reader, sharded checkpoints, wrong tensors)


def test_numpy_reads_f32_f16_bf16_like_torch(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(4, 2, generator=g).half(),
               "bf16": torch.randn(7, generator=g).bfloat16(), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 3), "big": torch.tensor([1e30, -3e38, 1e-40]).bfloat16()}
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    arrays = olmo_numpy.load_safetensors(str(tmp_path / "t.safetensors"))
    assert arrays.keys() == tensors.keys()
    for name, t in tensors.items():
        assert arrays[name].dtype == np.float32 and arrays[name].shape == tuple(t.shape), name
        assert np.array_equal(arrays[name], t.float().numpy()), name  # widening is exact
    assert not arrays["f32"].flags.owndata and not arrays["f32"].flags.writeable  # a view of the mapped file


def test_numpy_loads_sharded_and_tied_checkpoints(tmp_path):
    cfg = {**SMALL, "tie_word_embeddings": True}
    ref = reference_model(cfg, 1)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 2
    twin = olmo_numpy.OlmoForCausalLM.from_pretrained(str(tmp_path / "sharded"))
    assert twin.weights["lm_head.weight"] is twin.weights["model.embed_tokens.weight"]
    ids = ids_for(cfg, 1, 9, 0).numpy()
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids)).logits
    assert_close(twin(ids), expected, **NP_TOL)
    # a tied checkpoint that also stores lm_head.weight (a copy) loads the same
    path = shutil.copytree(tmp_path / "sharded", tmp_path / "with_head")
    safetensors.numpy.save_file({"lm_head.weight": np.ascontiguousarray(twin.weights["lm_head.weight"])},
              str(path / "head.safetensors"))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "head.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_close(olmo_numpy.OlmoForCausalLM.from_pretrained(str(path))(ids), expected, **NP_TOL)
    # a bfloat16 checkpoint: the same weights rounded, widened to float32 at load
    half = reference_model(cfg, 1).to(torch.bfloat16)
    half.save_pretrained(tmp_path / "bf16")
    twin = olmo_numpy.OlmoForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert twin.weights["model.layers.0.mlp.up_proj.weight"].dtype == np.float32
    with torch.no_grad():
        expected = olmo.OlmoForCausalLM.from_pretrained(str(tmp_path / "bf16"))(torch.from_numpy(ids))
    assert_close(twin(ids), expected, **NP_TOL)


def write_safetensors(path, header, data, n=None):
    """Write a raw .safetensors file: the 8-byte length (n, default the true one), the JSON header, the data."""
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return str(path)


F32_BYTES = np.arange(6, dtype="<f4").tobytes()  # 24 bytes


@pytest.mark.parametrize("header, data, n, message", [
    ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, F32_BYTES[:20], None,
     "end by 20"),  # truncated data
    ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, F32_BYTES, 10 ** 6,
     "header length 1000000 runs past the end of the file"),
    ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, F32_BYTES, 2 ** 63,
     "runs past the end"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, F32_BYTES, None,
     "tensor b has data_offsets \\[8, 24\\), expected to start at 16"),  # overlap
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, F32_BYTES, None,
     "tensor b has data_offsets \\[16, 24\\), expected to start at 8"),  # a gap
    ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 24]}}, F32_BYTES, None,
     "tensor a has 24 bytes, but shape \\[2, 2\\] of F32 needs 16"),
    ({"a": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 24]}}, F32_BYTES, None,
     "tensor a has 24 bytes, but shape \\[2, 3\\] of F16 needs 12"),
    ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, F32_BYTES, None,
     "8 bytes after the last tensor"),
    ({"a": {"dtype": "F64", "shape": [3], "data_offsets": [0, 24]}}, F32_BYTES, None,
     "tensor a has dtype 'F64'; only F32, F16, BF16 are supported"),
    ({"a": {"dtype": "Q4", "shape": [3], "data_offsets": [0, 24]}}, F32_BYTES, None, "tensor a has dtype 'Q4'"),
    ({"a": {"dtype": "F32", "shape": [-2, -3], "data_offsets": [0, 24]}}, F32_BYTES, None, "malformed"),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0]}}, F32_BYTES, None, "tensor a has a malformed"),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": ["0", "24"]}}, F32_BYTES, None, "malformed"),
    ({"a": [1, 2]}, F32_BYTES, None, "tensor a has a malformed"),
    ([1, 2], F32_BYTES, None, "not a JSON object"),
])
def test_numpy_corrupt_safetensors_raise_naming_file_and_tensor(tmp_path, header, data, n, message):
    path = write_safetensors(tmp_path / "bad.safetensors", header, data, n)
    with pytest.raises(ValueError, match=message) as e:
        olmo_numpy.load_safetensors(path)
    assert str(e.value).startswith(f"cannot read {path}: ")


def test_numpy_unreadable_safetensors(tmp_path):
    for content in (b"", b"\x01\x00", b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{"):
        (tmp_path / "x.safetensors").write_bytes(content)
        with pytest.raises(ValueError, match="cannot read .*x.safetensors: "):
            olmo_numpy.load_safetensors(str(tmp_path / "x.safetensors"))
    # and a valid raw file reads back (the writer above is right, so the failures are the checks)
    path = write_safetensors(tmp_path / "ok.safetensors", {"__metadata__": {"k": "v"}, "a": {
        "dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, F32_BYTES)
    assert np.array_equal(olmo_numpy.load_safetensors(path)["a"], np.arange(6).reshape(2, 3))


@pytest.mark.parametrize("edit, message", WRONG_TENSORS)
def test_numpy_wrong_tensors_are_named_like_olmo(small_checkpoint, tmp_path, edit, message):
    path = rewrite_weights(small_checkpoint[0], str(tmp_path / "bad"), edit)
    with pytest.raises(ValueError, match=message) as ours:
        olmo_numpy.OlmoForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError) as expected:
        olmo.OlmoForCausalLM.from_pretrained(path)
    assert str(ours.value) == str(expected.value)


def test_numpy_missing_paths_and_bin_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        olmo_numpy.OlmoForCausalLM.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="config.json"):
        olmo_numpy.OlmoForCausalLM.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no model.safetensors"):
        olmo_numpy.OlmoForCausalLM.from_pretrained(str(tmp_path))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pytorch_model.bin .* `python convert.py "):
        olmo_numpy.OlmoForCausalLM.from_pretrained(str(tmp_path))


# ----------------------------------------------------------------------------------------------------------------
# olmo_numpy.py: no torch, and the CLI


def test_numpy_never_imports_torch(cli_checkpoint):
    path, _ = cli_checkpoint
    result = run_cli(code="import olmo_numpy, sys; assert 'torch' not in sys.modules, 'torch imported'; "
                          f"olmo_numpy.main(['--model', {path!r}, '--prompt', 'hi', '--max-new-tokens', '2']); "
                          "assert 'torch' not in sys.modules, 'torch imported by the CLI path'")
    assert result.returncode == 0, result.stderr


def test_numpy_cli_streams_prompt_and_continuation(cli_checkpoint):
    path, tok = cli_checkpoint
    prompt = "Language 🙂 models"
    result = run_cli("--model", path, "--prompt", prompt, "--max-new-tokens", "24", script="olmo_numpy.py")
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy_output(path, tok, prompt, 24)
    assert "tokens/s" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("breakage, flags, message", [
    ("no_path", [], "is not a checkpoint directory"),
    ("bad_json", [], "cannot read .*config.json"),
    ("not_olmo", [], "model_type is 'llama', not 'olmo'"),
    ("missing_tensor", [], "missing tensor model.layers.0.mlp.up_proj.weight"),
    ("bad_up_proj", [], r"model.layers.0.mlp.up_proj.weight has shape \(3, 3\)"),
    (None, ["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (None, ["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (None, ["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (None, ["--temperature", "-1"], "--temperature must be >= 0"),
    (None, ["--top-k", "0"], "--top-k must be >= 1"),
    (None, ["--device", "cpu"], "unrecognized arguments: --device"),
])
def test_numpy_cli_bad_input_one_line_exit_2(cli_checkpoint, tmp_path, breakage, flags, message):
    path, _ = cli_checkpoint
    if breakage:
        path = break_checkpoint(path, str(tmp_path / "broken"), breakage)
    result = run_cli("--model", path, "--prompt", "hi", *flags, script="olmo_numpy.py")
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]


def test_numpy_cli_honours_generation_config(cli_checkpoint, tmp_path, capsys):
    """generation_config.json's sampling settings apply unless a flag overrides them, as in olmo.py."""
    path, _ = cli_checkpoint
    path = shutil.copytree(path, tmp_path / "gen")
    (path / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.7, "top_p": 0.9,
                                                            "eos_token_id": [0, 5]}))
    config = olmo_numpy.OlmoConfig.from_json(str(path / "config.json"))
    for flags in ([], ["--temperature", "0", "--top-k", "3"]):
        args = olmo_numpy.parse_args(["--model", str(path), "--prompt", "x", *flags])
        assert olmo_numpy.sampling_settings(args, str(path), config) == \
            olmo.sampling_settings(olmo.parse_args(["--model", str(path), "--prompt", "x", *flags]), str(path),
                                   config)
    assert olmo_numpy.sampling_settings(olmo_numpy.parse_args(["--model", str(path), "--prompt", "x"]), str(path),
                                        config) == dict(temperature=0.7, top_k=50, top_p=0.9, eos_token_id=[0, 5])
    # seeded sampling is reproducible end to end
    outs = [run_cli("--model", str(path), "--prompt", "Language", "--max-new-tokens", "8", "--seed", "3",
                    script="olmo_numpy.py").stdout for _ in range(2)]
    assert outs[0] == outs[1] and outs[0].startswith("Language")


def test_numpy_cli_ctrl_c_keeps_what_was_printed(cli_checkpoint):
    first, rest, err, status = ctrl_c_after_prompt(cli_checkpoint[0], "olmo_numpy.py")
    assert first == "Go" and status == 130
    assert "Traceback" not in err and (first + rest).endswith("\n")


def test_numpy_cli_streaming_never_splits_a_character(cli_checkpoint, monkeypatch):
    """Feed the streamer tokens that split multi-byte characters: every chunk it prints must be whole text."""
    chunks = stream_split_characters(olmo_numpy, cli_checkpoint, np.array, monkeypatch)
    assert "".join(chunks) == "x🙂日本語🙂\n"
    assert all("\ufffd" not in c for c in chunks) and len(chunks) > 3


# ----------------------------------------------------------------------------------------------------------------
# convert.py, the checkpoint converter: trainer checkpoints built here
#
# Tiny checkpoints are built here in each source layout, with random weights under the original names; their
# expected logits come from `trainer_reference_logits`, a forward pass written from the OLMo trainer's semantics
# (olmo/model.py in ai2-olmo 0.6.0) straight on the fused tensors, never from convert.py's mapping.
# Tolerance: assert_close's default, 1e-5 absolute and relative, justified differently here. A float32 model against
# the float64 reference: float32 rounding (~6e-8 relative per op) over 1-2 tiny layers leaves ~1e-6 relative error
# (measured: 1e-6 on O(3) logits, 6e-6 on the O(30) logits of a tied head); 1e-5 relative + 1e-5 absolute is above
# that and far below what a wrong split gives (O(1)).

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


def trainer_effective(cfg):
    """The few settings the reference forward needs, with the trainer's defaults (olmo/config.py)."""
    d, heads = cfg.get("d_model", 768), cfg.get("n_heads", 12)
    kv = cfg.get("n_kv_heads") or (1 if cfg.get("multi_query_attention") else heads)
    fused = cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * d
    vocab = cfg.get("embedding_size", 50304) or cfg.get("vocab_size", 50257)
    return dict(d=d, heads=heads, kv=kv, fused_mlp=fused, vocab=vocab, layers=cfg.get("n_layers", 12),
                tied=cfg.get("weight_tying", True), theta=cfg.get("rope_theta", 10000), clip=cfg.get("clip_qkv"),
                group=cfg.get("block_group_size", 1))


def trainer_block_prefix(e, i, prefix):
    g = e["group"]
    return f"{prefix}blocks.{i}." if g == 1 else f"{prefix}block_groups.{i // g}.{i % g}."


def trainer_state(cfg, prefix="transformer.", seed=0):
    """Random weights in the trainer's fused layout. The scales keep activations O(1), so that a wrong
    split (q/k/v, up/gate) changes the logits by far more than any tolerance below."""
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
    silu(gate) * x, then wte (tied) or ff_out."""
    e = trainer_effective(cfg)
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
        b = trainer_block_prefix(e, i, prefix)
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


def transformers_logits(path, ids):
    model = transformers.OlmoForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
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
        assert not torch.allclose(trainer_reference_logits(state, dict(cfg, clip_qkv=None), TRAINER_IDS), expected)


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
    (lambda raw, s: raw.update(rope_parameters={"rope_type": "yarn", "factor": 2.0}), "rope_scaling type 'yarn'"),
    (lambda raw, s: raw.update(hidden_act="tanh"), "hidden_act 'tanh'"),
    (lambda raw, s: raw.update(num_key_value_heads=3), "num_key_value_heads 3"),
    (lambda raw, s: raw.update(hidden_size=-32), "hidden_size must be a positive integer"),
    (lambda raw, s: s.pop("model.layers.1.self_attn.k_proj.bias"), "model.layers.1.self_attn.k_proj.bias"),
    (lambda raw, s: raw.update(attention_bias=False), "model.layers.0.self_attn.k_proj.bias"),
    (lambda raw, s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(16)}),
     r"q_proj.bias has shape \(16,\)"),
], ids=["rope-type", "activation", "kv-heads", "size", "missing-bias", "unexpected-bias", "bias-shape"])
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
    result = run_cli(str(src), str(tmp_path / "o6"), script="convert.py")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "alibi" in result.stderr
    assert not (tmp_path / "o6").exists()


# ----------------------------------------------------------------------------------------------------------------
# bench.py, and what the speed work could break
#
# No test here times anything: speed is measured (and compared with transformers) by bench.py itself.


def test_bench_tiny_end_to_end(tmp_path):
    """The whole benchmark on the tiny shape: every implementation in its own process, a token budget, a long
    prompt, the NumPy twin's BLAS threads set in its process; the report holds every figure, and greedy tokens
    agree across implementations (timings are only checked to exist: speed is bench.py's output, not a test)."""
    out = tmp_path / "bench.json"
    proc = run_cli("--shape", "tiny", "--device", "cpu", "--prompt-len", "8", "--new-tokens", "4", "--reps", "1",
                   "--budgets", "6", "--long-prompt", "12", "--numpy-threads", "1", "--json", str(out),
                   script="bench.py", env={"OMP_NUM_THREADS": "1"})  # quick on a busy machine
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("model", "device", "dtypes", "batch", "prompt_len", "new_tokens", "budgets", "long_prompt_lens",
                "reps", "weight_bytes", "weight_bytes_per_step", "memory_bandwidth_bytes_s", "results", "skipped"):
        assert key in report, key
    assert report["model"] == "tiny" and report["dtypes"] == ["float32"] and report["new_tokens"] == 4
    assert report["memory_bandwidth_bytes_s"] > 0
    # The head counts, the embedding table doesn't: tiny is 2 layers of 64 wide over 50304 tokens, untied.
    layer = 4 * 64 * 64 + 3 * 64 * 256
    assert report["weight_bytes_per_step"]["float32"] == 4 * (2 * layer + 50304 * 64)
    assert report["weight_bytes"]["float32"] == 4 * (2 * layer + 2 * 50304 * 64)
    results = report["results"]
    assert set(results) == {"olmo.py", "olmo_numpy.py 1 thread", "transformers"}, results
    for label, r in results.items():
        assert "error" not in r, r
        for key in ("load_s", "peak_bytes", "peak_ratio", "prefill_tok_s", "decode_tok_s", "decode_bytes_s",
                    "roofline", "warmup_s"):
            assert r[key] > 0, (label, key, r[key])
        assert len(r["runs"]) == 1  # one process per rep
        assert set(r["budgets"]) == {"4", "6"} and r["budgets"]["6"]["vs_new_tokens"] > 0
        assert len(r["tokens"]) == 4  # the first budget's 4 tokens, (B,) each
        assert r["long"]["12"]["first_s"] > 0 and r["long"]["12"]["peak_bytes"] >= 0
        assert r["same_tokens"], f"{label}'s greedy tokens differ from {r['same_tokens_as']}'s"
        assert r["vs_transformers"]["decode_tok_s"] > 0
        assert label in proc.stdout  # the table names every variant
    blas = results["olmo_numpy.py 1 thread"]["blas"]  # None where numpy's BLAS isn't a findable OpenBLAS
    assert blas is None or blas.endswith(", 1 thread(s)"), blas
    assert "roofline" in proc.stdout and "budget 6" in proc.stdout and "12 tokens" in proc.stdout
    assert "[bench]" in proc.stderr  # progress goes to stderr


def test_bench_schedule_rotates():
    """Each repetition runs every implementation once, and over len(labels) repetitions each takes every place
    in the order once: none always runs first (cold caches, a clock still ramping) or always last."""
    labels = ["a", "b", "c"]
    order = bench.schedule(labels, 6)
    assert all(sorted(rep) == labels for rep in order)
    for place in range(3):
        assert sorted(rep[place] for rep in order) == ["a", "a", "b", "b", "c", "c"]


def test_bench_bad_model_is_one_line(tmp_path):
    for path in (tmp_path / "missing", tmp_path):  # no such directory; a directory without config.json
        proc = run_cli("--model", str(path), "--device", "cpu", script="bench.py")
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, \
            proc.stderr


def test_bench_tied_checkpoint_loads_in_both(tmp_path, monkeypatch):
    """A tied shape (like 1b) is written without lm_head.weight, loads in olmo.py with the head = the embedding,
    and transformers reads the same config.json and gives the same logits."""
    monkeypatch.setitem(bench.SHAPES, "tiny-tied", dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                                        num_attention_heads=2, tie_word_embeddings=True))
    bench.build_checkpoint("tiny-tied", tmp_path)
    assert "lm_head.weight" not in load_keys(tmp_path)
    model = olmo.OlmoForCausalLM.from_pretrained(str(tmp_path))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    total, per_step = bench.weight_bytes(bench.checkpoint_numels(tmp_path), True, torch.float32)
    layer = 4 * 32 * 32 + 3 * 32 * 64
    assert (total, per_step) == (4 * (layer + 50304 * 32), 4 * (layer + 50304 * 32))
    ids = torch.tensor([[5, 17, 300, 9000, 42]])
    with torch.no_grad():
        logits = model(ids)
        assert 0.3 < logits.std() < 3  # not degenerate
        assert_close(logits, transformers.OlmoForCausalLM.from_pretrained(tmp_path).eval()(ids).logits)


def test_bench_olmo2_shape(tmp_path, monkeypatch):
    """An OLMo 2 shape is written as transformers' Olmo2ForCausalLM reads it (every weight present, RMSNorm
    weights ones, logits not degenerate); bench runs olmo.py on it where olmo.py reads OLMo 2, else skips it
    and says why."""
    shape = dict(SHAPES_OLMO2_TINY)
    monkeypatch.setitem(bench.SHAPES, "tiny-olmo2", shape)
    bench.build_checkpoint("tiny-olmo2", tmp_path)
    ref, info = transformers.Olmo2ForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert torch.equal(ref.model.layers[0].self_attn.q_norm.weight, torch.ones(32))
    with torch.no_grad():
        assert 0.3 < ref.eval()(torch.tensor([[5, 17, 300, 9]])).logits.std() < 3
    out = tmp_path / "bench.json"
    proc = run_cli("--model", str(tmp_path), "--device", "cpu", "--impl", "olmo.py", "--impl", "transformers",
                   "--reps", "1", "--new-tokens", "3", "--budgets", "none", "--prompt-len", "4", "--json", str(out),
                   script="bench.py", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "error" not in report["results"]["transformers"], report["results"]["transformers"]
    if "olmo.py" in report["skipped"]:  # until olmo.py reads OLMo 2: said, not failed
        assert "model_type" in report["skipped"]["olmo.py"] and "skipped olmo.py" in proc.stdout
    else:
        assert report["results"]["olmo.py"]["same_tokens"], report["results"]["olmo.py"]


SHAPES_OLMO2_TINY = dict(model_type="olmo2", num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                         num_attention_heads=2, vocab_size=50304, rms_norm_eps=1e-6, rope_theta=500000.0)


def test_compiled_decode_gives_the_eager_tokens():
    """torch.compile of the one-token step (fullgraph, static cache) must not change a single greedy token."""
    model = olmo.OlmoForCausalLM(olmo.OlmoConfig(**SMALL)).eval()
    model.load_state_dict(reference_model(SMALL).state_dict())  # weights large enough that tokens differ
    ids, mask = left_pad([torch.tensor([3, 14, 15, 9, 26]), torch.tensor([35, 8, 9])])
    eager = [model.generate(ids, 12), model.generate(ids, 12, attention_mask=mask)]
    torch._dynamo.reset()
    model.decode_one_token = torch.compile(model.decode_one_token, mode="default", fullgraph=True)
    assert torch.equal(model.generate(ids, 12), eager[0])
    # left padding: other positions and masks through the same compiled step (same shapes, no recompile)
    assert torch.equal(model.generate(ids, 12, attention_mask=mask), eager[1])


@pytest.mark.parametrize("padded", [False, True])
def test_prefill_last_position_equals_full_forward(small_checkpoint, padded):
    """prefill applies the head only at the last position; that must be the full forward's last position."""
    model = olmo.OlmoForCausalLM.from_pretrained(small_checkpoint[0])
    ids, mask = left_pad([ids_for(SMALL, 1, n, n)[0] for n in ((7, 4, 6) if padded else (7, 7, 7))])
    with torch.no_grad():
        full = model(ids, attention_mask=mask)  # (B, T, vocab)
        model.setup_cache(mask, ids.shape[1] + 4)
        last = model.prefill(ids, mask)  # (B, vocab)
    assert last.shape == (3, SMALL["vocab_size"])
    assert_close(last, full[:, -1])


def test_memory_mapped_load_equals_copying_load(small_checkpoint):
    from safetensors.torch import load
    path = small_checkpoint[0]
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        copied = load(f.read())  # every byte read into memory, no mapping
    loaded = olmo.OlmoForCausalLM.from_pretrained(path).state_dict()
    assert set(loaded) == set(copied)
    for name, tensor in copied.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


# ----------------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_7b_shape_bf16_on_gpu_equals_transformers(tmp_path):
    """The OLMo-7B shape (4 of its 32 layers, to stay quick) with random weights of std 1/sqrt(fan_in), so logits
    have std ~1, loaded by both in bf16. bf16 keeps 8 mantissa bits (steps of 0.4%), and the two implementations
    round at different points (e.g. different attention kernels), so over 4 layers logits agree to a few 1e-2,
    not 1e-5: tolerance 0.1 absolute plus 2% relative, still far below the O(1) change of a real bug."""
    with torch.device("cuda"):
        ref = transformers.OlmoForCausalLM(transformers.OlmoConfig(num_hidden_layers=4))
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, p.shape[-1] ** -0.5)
    ref.save_pretrained(tmp_path)
    del ref
    # both load the saved fp32 weights as bf16 (casting a built model with .to() would also round transformers'
    # RoPE frequencies to bf16, which a loaded model doesn't)
    ref = transformers.OlmoForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).to("cuda").eval()
    model = olmo.OlmoForCausalLM.from_pretrained(str(tmp_path), device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 50280, (2, 64), device="cuda")
    with torch.no_grad():
        assert_close(model(ids).float(), ref(ids).logits.float(), atol=0.1, rtol=0.02)


@pytest.mark.skipif(not os.environ.get("OLMO_7B_PATH") or not torch.cuda.is_available(),
                    reason="set OLMO_7B_PATH to a downloaded allenai/OLMo-7B-hf and run on a GPU")
def test_real_olmo_7b_equals_transformers():
    path = os.environ["OLMO_7B_PATH"]
    ref = transformers.OlmoForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    model = olmo.OlmoForCausalLM.from_pretrained(path, device="cuda", dtype=torch.bfloat16)
    ids = torch.tensor([[1, 510, 3158, 8516, 30013, 27287, 689, 253, 22658, 4370, 15]], device="cuda")
    with torch.no_grad():
        assert_close(model(ids).float(), ref(ids).logits.float(), atol=0.05, rtol=0.01)
    expected = ref.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(model.generate(ids, 20, eos_token_id=50279), expected)
