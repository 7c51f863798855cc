"""Tests: olmo.py (and its NumPy twin, the converter and the benchmark) against transformers, the reference.

Every check compares against transformers' OlmoForCausalLM on the same weights, or against a second computation
of the same quantity (cached vs uncached, padded vs alone) -- never against numbers copied from our own output.

Tolerances come from float32 error analysis, never from the errors one machine happened to show: other CPUs
(AVX2/AVX-512, AMD/Intel, x86/ARM) sum in other orders and bring other vectorised exp, tanh and erf. U = 2^-24 is
float32's unit roundoff. A sum of n products rounds to within n U sum|a_i b_i| (worst case), ~sqrt(n) U sum|a_i b_i|
in practice, as independent rounding errors add like a random walk. The models here are small (hidden, intermediate
<= 64, head_dim <= 16, <= 24 tokens, 1-2 layers) with reference_model's weights, which keep every activation and
logit O(1) (|logit| <= ~5). A logit ends ~15 rounding stages per layer (norm, q/k/v, RoPE, scores, softmax,
weighted sum, o_proj, residual, norm, up/gate, activation, product, down, residual), each ~sqrt(64) U = 8 U, some
amplified: a RoPE angle of up to 24 rad rounds to 24 U absolute; an absolute error in an attention score is a
relative one in its weight, and scores carry the errors of q and k; layer norm over as few as 4 numbers divides by
a spread that can be several times smaller than the numbers. That is ~100 U per layer, ~250 U for 2 layers and the
head, so:
- FP32_TOL: one float32 forward against the exact logits (transformers' model in float64, `.double()`, on the same
  weights) agrees to 512 U = 2^-15 = 3.1e-5, absolute plus as much relative. Measured here over 600 random
  configs: 30-60 U typically, 260 U at worst (hidden size 4).
- ATOL, RTOL: two float32 computations of the same logits (olmo.py against transformers, cached against uncached)
  are each within FP32_TOL of the exact value, so within twice it of each other: 2^-14 = 6.1e-5.
Either stays far below what a real bug does: over 80 random configs, mixing up rotate-half and interleaved RoPE
moved the logits by >= 0.07, a padding leak by >= 0.8, a missed clip_qkv by >= 0.2 -- never less than 1e-3, while
the largest allowance is 6.1e-5 x (1 + 5) = 3.7e-4. The NumPy twin, the converter and bf16 follow the same
analysis, stated where they are tested.
"""

import base64
import copy
import io
import json
import math
import os
import pickle
import re
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import types
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
import cli
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
U = 2.0 ** -24  # float32's unit roundoff: every +, -, *, / of float32 numbers is exact times (1 + d), |d| <= U
LIB = 32 * U  # what we grant a float32 library exp, tanh or erf: see test_numpy_erf_and_activations
FP32_TOL = dict(atol=512 * U, rtol=512 * U)  # one float32 forward against float64: see the module docstring
ATOL = RTOL = 2 * 512 * U  # two float32 computations against each other: see the module docstring
BF16_TOL = dict(atol=32 * 2.0 ** -8, rtol=8 * 2.0 ** -8)  # bf16 logits: test_sharded_bin_and_dtype_loading
ACTIVATIONS = ["silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"]


# ----------------------------------------------------------------------------------------------------------------
# Random small configs and checkpoints


GENERATIONS = {"olmo": ("OlmoConfig", "OlmoForCausalLM"), "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
               "olmo3": ("Olmo3Config", "Olmo3ForCausalLM")}


@st.composite
def configs(draw, generations=tuple(GENERATIONS)):
    """A small config exercising every option of each generation: MHA/GQA/MQA, bias, tying, each activation,
    no/linear/dynamic/YaRN RoPE scaling with a short max_position_embeddings so that sequences run past it;
    OLMo 1's clip_qkv; OLMo 2's rms_norm_eps; OLMo 3's sliding windows shorter than the sequences and custom
    layer_types."""
    kind = draw(st.sampled_from(generations))
    heads = draw(st.sampled_from([1, 2, 4]))
    layers = draw(st.integers(1, 2 if kind != "olmo3" else 4))
    scaling = draw(st.sampled_from([None, "linear", "dynamic", "yarn"]))
    rope_scaling = scaling and {"rope_type": scaling, "factor": draw(st.floats(1.5, 4.0))}
    if scaling == "yarn":
        rope_scaling.update(original_max_position_embeddings=draw(st.sampled_from([4, 8])),
                            truncate=draw(st.booleans()), beta_fast=draw(st.sampled_from([32.0, 4.0])),
                            beta_slow=draw(st.sampled_from([1.0, 0.5])),
                            attention_factor=draw(st.none() | st.floats(0.5, 1.5)))
    cfg = dict(
        model_type=kind,
        vocab_size=draw(st.integers(40, 130)),
        hidden_size=heads * draw(st.sampled_from([4, 8, 16])),
        intermediate_size=draw(st.integers(8, 64)),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])),
        hidden_act=draw(st.sampled_from(ACTIVATIONS)),
        max_position_embeddings=draw(st.sampled_from([8, 16, 64])),
        tie_word_embeddings=draw(st.booleans()),
        attention_bias=draw(st.booleans()),
        clip_qkv=draw(st.none() | st.floats(0.3, 2.0)) if kind == "olmo" else None,
        rope_theta=draw(st.sampled_from([10000.0, 500.0] if kind != "olmo3" else [500000.0, 500.0])),
        rope_scaling=rope_scaling,
        pad_token_id=1, bos_token_id=None, eos_token_id=None,
    )
    if kind != "olmo":
        cfg["rms_norm_eps"] = draw(st.sampled_from([1e-5, 1e-6, 0.1]))
    if kind == "olmo3":
        # windows of 1 are tested against transformers' forward only (test_the_cache_grows_with_the_tokens_produced):
        # transformers 5.23's generate treats a window of 1 as one of 2, disagreeing with its own forward
        cfg["sliding_window"] = draw(st.integers(2, 8))
        cfg["layer_types"] = draw(st.none() | st.lists(st.sampled_from(["full_attention", "sliding_attention"]),
                                                       min_size=layers, max_size=layers))
    return cfg


def reference_model(cfg, seed=0):
    """A transformers model of cfg's generation with random weights large enough that activations matter:
    unit-variance projections (so clip_qkv really clips), biases, and norm weights around 1 with a 0.3 spread
    (so every OLMo 2 norm weight matters), instead of the tiny std-0.02 init that makes logits ~0."""
    cfg = {k: v for k, v in cfg.items() if v is not None or k not in ("layer_types", "clip_qkv")}
    kind = cfg.pop("model_type", "olmo")
    scaling = cfg.pop("rope_scaling")
    config_class, model_class = (getattr(transformers, name) for name in GENERATIONS[kind])
    config = config_class(**cfg, **({"rope_scaling": dict(scaling)} if scaling else {}))
    model = model_class(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.3 * noise if name.endswith("norm.weight") else
                    noise * (0.3 if p.ndim == 1 else p.shape[-1] ** -0.5))
    return model.eval()


def save(model, path, style="v5"):
    """save_pretrained writes transformers 5's config.json (rope_parameters, nested per layer type for OLMo 3);
    style "v4" rewrites it the way the files on the hub are (top-level rope_theta, rope_scaling with "type"), with
    some keys that don't matter."""
    model.save_pretrained(path)
    if style == "v4":
        with open(os.path.join(path, "config.json")) as f:
            d = json.load(f)
        rope = d.pop("rope_parameters")
        if "full_attention" in rope:  # OLMo 3: top-level rope_scaling means the full-attention layers
            # transformers gives 4.x's sliding layers its default base (5e5): only that base is expressible
            assert rope["sliding_attention"] == {"rope_type": "default", "rope_theta": 5e5}, "not expressible in 4.x"
            rope = rope["full_attention"]
        d["rope_theta"] = rope.pop("rope_theta")
        kind = rope.pop("rope_type")
        d["rope_scaling"] = {"type": kind, **rope} if kind != "default" else None
        d.update(torch_dtype="float32", pretraining_tp=1, transformers_version="4.40.0")
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(d, f)
    return path


SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, hidden_act="silu", max_position_embeddings=64, tie_word_embeddings=False,
             attention_bias=False, clip_qkv=None, rope_theta=10000.0, rope_scaling=None, pad_token_id=1,
             bos_token_id=None, eos_token_id=None)


def float64_model(ref):
    """transformers' model in float64 on the same weights: the exact logits, up to float32 RoPE cos/sin (transformers
    computes them in float32 whatever the model's dtype: ~24 U on an angle of 24 rad, shared by every float32
    implementation that rounds the angle the same way, and far inside FP32_TOL for one that doesn't)."""
    return copy.deepcopy(ref).double()


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
    """Whether a sequence this long runs dynamic RoPE past the trained length (where it changes frequencies) in a
    layer that has it: OLMo 3 scales only its full-attention layers (by default every 4th)."""
    layers = range(cfg["num_hidden_layers"])
    full = cfg.get("model_type") != "olmo3" or "full_attention" in (
        cfg.get("layer_types") or ["full_attention" if i % 4 == 3 else "sliding_attention" for i in layers])
    return full and (cfg["rope_scaling"] or {}).get("rope_type") == "dynamic" and \
        length > cfg["max_position_embeddings"]


# ----------------------------------------------------------------------------------------------------------------
# olmo.py against transformers


@settings(max_examples=40)
@given(cfg=configs(), length=st.integers(1, 24), style=st.sampled_from(["v4", "v5"]), seed=st.integers(0, 99))
def test_logits_and_loss_equal_transformers(cfg, length, style, seed):
    # transformers gives the sliding layers of a 4.x-style OLMo 3 config its default base, whatever rope_theta says
    assume(style == "v5" or cfg["model_type"] != "olmo3" or cfg["rope_theta"] == 5e5)
    ref = reference_model(cfg, seed)
    ids = ids_for(cfg, 2, length, seed)
    labels = ids.clone()
    labels[0, : length // 2] = -100  # ignored positions count in neither the sum nor the mean
    with tempfile.TemporaryDirectory() as d:
        model = olmo.OlmoForCausalLM.from_pretrained(save(ref, d, style))
    assert model.config.model_type == cfg["model_type"]
    if "full_attention" in model.config.rope_parameters:  # OLMo 3 may have sliding layers only
        assert model.config.rope_parameters["full_attention"].items() >= (cfg["rope_scaling"] or {}).items()
    with torch.no_grad():
        expected = ref(ids, labels=labels)
        exact = float64_model(ref)(ids).logits
        logits, loss = model(ids, labels=labels)
    assert logits.shape == (2, length, cfg["vocab_size"])
    assert_close(logits.double(), exact, **FP32_TOL)
    assert_close(expected.logits.double(), exact, **FP32_TOL)  # the tolerance's premise, on this CPU
    if (labels[:, 1:] != -100).any():
        # the mean of logsumexp(logits) - logits[label]: each term within twice a logit's allowance (both float32)
        assert_close(loss, expected.loss, atol=2 * (ATOL + RTOL * exact.abs().max().item()), rtol=0)
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

    # the per-step logits, through the same prefill / decode_one_token path generate uses
    T = ids.shape[1]
    steps = step_logits(model, ids, mask, tokens[:, T:])
    assert_same_greedy(tokens.numpy(), out.sequences.numpy(), steps.numpy(), T)
    same = (tokens == out.sequences).all(1)  # a row past a near tie (one example here has a 6e-5 gap) may differ
    assert_close(steps[same], torch.stack(out.logits, 1)[same])

    full_mask = torch.cat([mask, torch.ones(len(lengths), new - 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = model(tokens[:, :-1], attention_mask=full_mask)[:, T - 1:]
    # Dynamic NTK changes the frequencies as the sequence grows, but cached keys keep the rotation they got when
    # they were computed; transformers behaves exactly so (checked above), and a full forward differs.
    if not dynamic_past_max(cfg, max(lengths) + new - 1):
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
    model = olmo.OlmoForCausalLM(olmo.OlmoConfig.from_dict(cfg)).eval()
    # reference_model's weights: with the std-0.02 init, logits are ~0.3 and a padding leak can move them by 2e-3
    model.load_state_dict(reference_model(cfg, seed).state_dict())
    rows = [ids_for(cfg, 1, n, seed + i)[0] for i, n in enumerate(lengths)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batch_logits = model(ids, attention_mask=mask)
        batch_tokens = model.generate(ids, 6, attention_mask=mask)
        for i, row in enumerate(rows):
            n = len(row)
            assert_close(batch_logits[i, -n:], model(row[None])[0])
            alone = model.generate(row[None], 6)
            steps = step_logits(model, row[None], torch.ones(1, n, dtype=torch.long), alone[:, n:])
            assert_same_greedy(alone[:, n:].numpy(), batch_tokens[i:i + 1, -6:].numpy(), steps.numpy(), 0)


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
                                                 num_hidden_layers=1, num_attention_heads=2, eos_token_id=None))
    ids = torch.tensor([[3, 4, 5]])
    a = model.generate(ids, 8, temperature=0.9, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = model.generate(ids, 8, temperature=0.9, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (1, 11)


def test_token_ids_outside_the_vocabulary_are_refused():
    model = olmo.OlmoForCausalLM(olmo.OlmoConfig.from_dict(SMALL)).eval()
    for bad in (-1, SMALL["vocab_size"]):
        ids = torch.tensor([[3, bad, 5]])
        with pytest.raises(ValueError, match=f"token id {bad} "):
            model(ids)
        with pytest.raises(ValueError, match=f"token id {bad} "):
            model.generate(ids, 2)


def test_top_k_zero_is_off_and_tiny_temperatures_are_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.9, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = {int(olmo.sample(logits, 5.0, top_k=0, generator=g)) for _ in range(400)}
    assert draws == {0, 1, 2, 3, 4}  # top_k=0 keeps every token, as in transformers (at T=5 each has p > 0.08)
    for t in (1e-3, 1e-40, 1e-320, 5e-324):  # 1/t overflows float32 (and float64 for the last two)
        assert [int(olmo.sample(logits, t, top_k=k, top_p=p, generator=g)) for k in (None, 2) for p in (None, 0.5)
                ] == [1] * 4


def tiny_olmo3():
    """An OLMo 3 with short windows, one full-attention layer in three and YaRN: every path of the cache at once."""
    return dict(model_type="olmo3", vocab_size=60, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=16,
                tie_word_embeddings=False, attention_bias=False, clip_qkv=None, rope_theta=500000.0,
                rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
                pad_token_id=1, bos_token_id=None, eos_token_id=None, rms_norm_eps=1e-6, sliding_window=3,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"])


@pytest.mark.parametrize("window", [1, 3])
def test_the_cache_grows_with_the_tokens_produced(tmp_path, window):
    """A budget is a limit, not an allocation: the cache starts at 256 slots whatever max_new_tokens says, and
    doubles as tokens are produced, with transformers' greedy tokens past the doubling and the windows."""
    cfg = {**tiny_olmo3(), "sliding_window": window}
    ref = reference_model(cfg, 5)
    model = olmo.OlmoForCausalLM.from_pretrained(save(ref, tmp_path))
    ids = ids_for(cfg, 1, 6, 0)
    first = model.generate(ids, 4)
    tokens = model.generate(ids, 10 ** 9, eos_token_id=int(first[0, -1]))
    assert len(model.slots) == 256 and torch.equal(tokens[:, :10], first)
    ids = ids_for(cfg, 1, 250, 0)
    out = model.generate(ids, 10)  # past 256: the cache doubles mid-generation
    assert len(model.slots) == 512
    # against transformers' full forward along the same tokens (its generate with OLMo 3's sliding-window cache
    # drifts from its own forward on prompts this long, in transformers 5.23)
    with torch.no_grad():
        steps = ref(out[:, :-1]).logits[:, 249:]  # (1, 10, vocab): transformers' logits along our tokens
    assert_same_greedy(out.numpy(), torch.cat([out[:, :250], steps.argmax(-1)], 1).numpy(), steps.numpy(), 250)
    model.generate(ids[:, :5], 3)  # a short call after a long one attends over 256 slots, not the 512 allocated
    assert len(model.slots) == 512 and model.key_valid.shape == (1, 256)


@pytest.mark.parametrize("cfg", [tiny_olmo3(), {**SMALL, "max_position_embeddings": 12,
                                                "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}])
def test_a_shared_prefix_is_reused_exactly(cfg, tmp_path, monkeypatch):
    """A one-row generate after another prefills only what differs from the cached tokens (a chat's new turn), and
    gives exactly what a fresh model gives; dynamic RoPE past the trained length reuses nothing (its frequencies
    depend on the call's length)."""
    ref = reference_model(cfg, 2)
    path = save(ref, tmp_path)
    model, fresh = olmo.OlmoForCausalLM.from_pretrained(path), olmo.OlmoForCausalLM.from_pretrained(path)
    starts = []
    prefill = model.prefill
    monkeypatch.setattr(model, "prefill", lambda ids, mask, start=0: starts.append(start) or prefill(ids, mask, start))
    turn = model.generate(ids_for(cfg, 1, 5, 0), 4)
    for more in (3, 1):  # the conversation so far, the reply included, plus a new message
        ids = torch.cat([turn, ids_for(cfg, 1, more, more)], 1)
        turn = model.generate(ids, 4)
        assert torch.equal(turn, fresh.generate(ids, 4))
    dynamic_past = dynamic_past_max(cfg, turn.shape[1] - 4)
    assert starts == [0, 8, 0 if dynamic_past else 15]  # 5 + 4 - 1, 12 + 4 - 1: the last sampled token isn't cached
    different = turn.clone()
    different[0, 2] = (different[0, 2] + 1) % cfg["vocab_size"]  # an edit early in the history
    assert torch.equal(model.generate(different, 3), fresh.generate(different, 3))
    assert starts[-1] == (0 if dynamic_past_max(cfg, different.shape[1]) else 2)


def test_bfloat16_on_the_cpu_gives_transformers_bf16_tokens(tmp_path):
    for cfg in (SMALL, {**SMALL, "model_type": "olmo2", "rms_norm_eps": 1e-6}):
        ref = reference_model(cfg, 4).to(torch.bfloat16)
        model = olmo.OlmoForCausalLM.from_pretrained(save(ref, tmp_path / cfg.get("model_type", "olmo")))
        assert model.lm_head.weight.dtype == torch.bfloat16  # the checkpoint's own dtype by default
        ids, mask = left_pad([ids_for(cfg, 1, n, n)[0] for n in (7, 4)])
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1,
                           output_logits=True, return_dict_in_generate=True)
        steps = torch.stack(out.logits, 1).float().numpy()  # bf16 near-ties may go either way: BF16_TOL
        assert_same_greedy(model.generate(ids, 8, attention_mask=mask).numpy(), out.sequences.numpy(), steps,
                           ids.shape[1], **BF16_TOL)


# ----------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("kind", GENERATIONS)
def test_config_defaults_are_transformers_defaults(kind):
    ours, theirs = olmo.OlmoConfig(model_type=kind), getattr(transformers, GENERATIONS[kind][0])()
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "use_cache",
                 "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_bias",
                 "attention_dropout", "clip_qkv", "rms_norm_eps", "sliding_window", "layer_types"):
        if hasattr(theirs, name):
            assert getattr(ours, name) == getattr(theirs, name), name
    rope = theirs.rope_parameters.get("full_attention", theirs.rope_parameters)
    assert ours.rope_parameters["full_attention"] == {"rope_type": "default", "rope_theta": rope["rope_theta"]}


VALID = dict(model_type="olmo", hidden_size=32, num_attention_heads=4, architectures=["OlmoForCausalLM"],
             torch_dtype="bfloat16", transformers_version="4.40.0", pretraining_tp=1)


@pytest.mark.parametrize("change, field", [
    ({"model_type": "hf_olmo"}, "model_type"),
    ({"hidden_size": 30}, "hidden_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_type"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 1.0}}, "factor"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 0.5}}, "factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "factor"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "beta_fast": 4}}, "beta_fast"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "truncate": "false"}}, "truncate"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8.0}}, "original"),
    ({"rope_scaling": "linear"}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0}}, "rope_type"),
    ({"rope_parameters": [1]}, "rope_parameters"),
    ({"hidden_act": "tanh"}, "hidden_act"),
    ({"hidden_act": 1}, "hidden_act"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"attention_bias": 0}, "attention_bias"),
    ({"hidden_size": "32"}, "hidden_size"),
    ({"hidden_size": 32.0}, "hidden_size"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"num_hidden_layers": 0}, "num_hidden_layers"),
    ({"vocab_size": None}, "vocab_size"),
    ({"max_position_embeddings": -1}, "max_position_embeddings"),
    ({"rope_theta": 0}, "rope_theta"),
    ({"rope_theta": -1.0}, "rope_theta"),
    ({"rope_theta": float("nan")}, "rope_theta"),
    ({"clip_qkv": 0}, "clip_qkv"),
    ({"clip_qkv": float("inf")}, "clip_qkv"),
    ({"eos_token_id": 50304}, "eos_token_id"),
    ({"eos_token_id": [1, "2"]}, "eos_token_id"),
    ({"pad_token_id": -1}, "pad_token_id"),
    ({"model_type": "olmo2", "clip_qkv": 8.0}, "clip_qkv"),
    ({"model_type": "olmo2", "rms_norm_eps": "1e-6"}, "rms_norm_eps"),
    ({"model_type": "olmo3", "num_hidden_layers": 2, "layer_types": ["full_attention"]}, "layer_types"),
    ({"model_type": "olmo3", "num_hidden_layers": 1, "layer_types": ["global"]}, "layer_types"),
    ({"model_type": "olmo3", "sliding_window": 0}, "sliding_window"),
    ({"model_type": "olmo3", "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 5.0},
                                                 "sliding_attention": {"rope_type": "linear", "factor": 0.5}}},
     "sliding_attention"),
    ({"hidden_size": 36, "num_attention_heads": 4}, "head size 9"),
    ({"torch_dtype": "int8"}, "dtype"),
])
def test_bad_configs_are_rejected_naming_the_field(change, field, tmp_path):
    d = {**VALID, **change}
    with pytest.raises(ValueError, match=field):
        olmo.OlmoConfig.from_dict(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "config.json"))):  # errors name the file
        olmo.OlmoConfig.from_json(tmp_path / "config.json")


@pytest.mark.parametrize("keys", [{"torch_dtype": "bfloat16"}, {"dtype": "bfloat16"},
                                  {"dtype": None, "torch_dtype": "bfloat16"},
                                  {"dtype": "bfloat16", "torch_dtype": "float16"}, {"dtype": None}, {}])
def test_checkpoint_dtype_read_as_transformers_reads_it(keys):
    """dtype (transformers 5) first, torch_dtype (4.x) when dtype is absent or null, else none: float32."""
    expected = transformers.OlmoConfig(**keys).dtype
    expected = None if expected is None else str(expected).removeprefix("torch.")
    config = {k: v for k, v in VALID.items() if k != "torch_dtype"} | keys
    for module in (olmo, olmo_numpy):
        assert module.OlmoConfig.from_dict(config).dtype == expected, module.__name__


def test_config_styles_and_ignored_keys():
    v4 = olmo.OlmoConfig.from_dict({"model_type": "olmo", "rope_theta": 500.0, "dtype": "float32",
                                    "rope_scaling": {"type": "dynamic", "factor": 2}, "architectures": ["x"]})
    v5 = olmo.OlmoConfig.from_dict({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0},
                                    "dtype": "float32"})
    assert v4 == v5 and v4.rope_parameters == {"full_attention": {"rope_type": "dynamic", "rope_theta": 500.0,
                                                                   "factor": 2.0}}
    plain = olmo.OlmoConfig.from_dict({"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}})
    assert plain.rope_parameters == {"full_attention": {"rope_type": "default", "rope_theta": 7.0}}
    assert plain.num_key_value_heads == 32
    # OLMo 3: 4.x's top-level rope_scaling and 5.x's nested rope_parameters mean the same (full layers only)
    yarn = {"factor": 8.0, "original_max_position_embeddings": 8192, "attention_factor": 1.2, "beta_fast": 32,
            "beta_slow": 1}
    v4 = olmo.OlmoConfig.from_dict({"model_type": "olmo3", "num_hidden_layers": 8, "rope_theta": 5e5,
                                    "rope_scaling": {"rope_type": "yarn", **yarn}})
    v5 = olmo.OlmoConfig.from_dict({"model_type": "olmo3", "num_hidden_layers": 8, "rope_parameters": {
        "full_attention": {"rope_type": "yarn", "rope_theta": 5e5, **yarn},
        "sliding_attention": {"rope_type": "default", "rope_theta": 5e5}}})
    assert v4 == v5 and v4.rope_parameters["sliding_attention"] == {"rope_type": "default", "rope_theta": 5e5}
    assert v4.sliding_window == 4096 and v4.layer_types == ["sliding_attention"] * 3 + [
        "full_attention"] + ["sliding_attention"] * 3 + ["full_attention"]


MUTATIONS = [lambda v: str(v), lambda v: float(v) if type(v) is int else int(v) if type(v) is float and
             v.is_integer() else v, lambda v: not v if type(v) is bool else True, lambda v: None, lambda v: [v],
             lambda v: {"value": v}, lambda v: float("nan"), lambda v: float("inf"), lambda v: -1, lambda v: 0,
             lambda v: 10 ** 30, lambda v: "false"]


@settings(max_examples=60)
@given(data=st.data())
def test_mutated_config_json_loads_the_same_model_or_names_the_file(data, tmp_path_factory):
    """Whatever one key of a valid config.json is turned into (a type swap, a non-finite or out-of-range number,
    null, nesting, or removal), loading either raises ValueError naming config.json or the offending tensor, or
    gives a model with transformers' logits for the same file (where transformers refuses the file, the unmutated
    model's): never another exception, never a different model; and the NumPy twin decides the same."""
    cfg = data.draw(configs())
    d = tmp_path_factory.mktemp("mutated")
    unmutated = reference_model(cfg)
    save(unmutated, d, "v5" if cfg["model_type"] == "olmo3" else data.draw(st.sampled_from(["v4", "v5"])))
    with open(d / "config.json") as f:
        config = json.load(f)
    key = data.draw(st.sampled_from(sorted(config)))
    if data.draw(st.booleans()):
        del config[key]
    else:
        config[key] = data.draw(st.sampled_from(MUTATIONS))(config[key])
    with open(d / "config.json", "w") as f:
        json.dump(config, f)
    try:
        model = olmo.OlmoForCausalLM.from_pretrained(d)
    except ValueError as e:
        assert "config.json" in str(e) or "tensor" in str(e), str(e)
        with pytest.raises(ValueError, match="config.json|tensor"):  # the twin refuses it too
            olmo_numpy.OlmoForCausalLM.from_pretrained(str(d))
        return
    ids = ids_for(cfg, 1, 12, 0)
    assert_close(olmo_numpy.OlmoForCausalLM.from_pretrained(str(d))(ids.numpy()), model(ids).detach().numpy())
    try:
        ref = getattr(transformers, GENERATIONS[model.config.model_type][1]).from_pretrained(d).eval()
    except Exception:  # stricter than us (an int where it wants a float): then nothing may have changed
        ref = unmutated
    with torch.no_grad():
        assert_close(model(ids), ref(ids).logits)


# ----------------------------------------------------------------------------------------------------------------
# Loading



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
    # bf16: every weight in bf16, and the logits near fp32's. BF16_TOL: bfloat16 keeps 8 significant bits, unit
    # roundoff 2^-8 = 3.9e-3; each weight and each stage's output (matmuls sum in float32) rounds once, so each of
    # the ~30 stages (module docstring) adds ~2^-8 relative to the O(1) activations: ~sqrt(30) 2^-8 = 0.02 in
    # quadrature, typically, with tails several times that; float32's own error is 1000 times smaller. Allowed:
    # 32 x 2^-8 = 0.125 absolute plus 8 x 2^-8 = 0.03 relative (over 30 seeds, half of that at most), against the
    # O(1) change of a weight that isn't loaded.
    model = olmo.OlmoForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert_close(model(ids).float(), expected_logits(ref, ids), **BF16_TOL)


def test_bin_files_are_never_unpickled_as_code(small_checkpoint, tmp_path):
    path, _ = small_checkpoint
    (tmp_path / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "payload": Exploit()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin") as error:
        olmo.OlmoForCausalLM.from_pretrained(str(tmp_path))
    assert not os.path.exists(tmp_path / "pwned")
    # one line, and not torch's advice to retry with weights_only=False
    assert "\n" not in str(error.value) and "weights_only" not in str(error.value)


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
    (lambda sd: {**sd, "model.layers.0.mlp.up_proj.weight": sd["model.layers.0.mlp.up_proj.weight"].to(torch.int32)},
     "model.layers.0.mlp.up_proj.weight has dtype"),  # integers are never weights: refused, not cast
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


@pytest.mark.parametrize("listing, weights", [
    (["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json"], "*.safetensors"),
    (["config.json", "pytorch_model.bin", "tokenizer.json"], "*.bin")])
def test_hub_ids_fetch_one_weight_format_at_a_revision(small_checkpoint, monkeypatch, listing, weights):
    """A hub id goes to huggingface_hub (stubbed: no network here): the repo's files are listed first and only one
    weight format is fetched -- safetensors when there are any, as transformers prefers -- at the asked revision
    (OLMo's intermediate checkpoints are revisions); without huggingface_hub the error says how to get it."""
    import huggingface_hub
    path, ref = small_checkpoint
    asked = []
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: listing)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append((repo, kw)) or path)
    ids = ids_for(SMALL, 1, 5, 0)
    model = olmo.OlmoForCausalLM.from_pretrained("allenai/OLMo-1B-hf", revision="step1000-tokens4B")
    assert_close(model(ids), expected_logits(ref, ids))
    (repo, kw), = asked
    assert repo == "allenai/OLMo-1B-hf" and kw["revision"] == "step1000-tokens4B"
    assert weights in kw["allow_patterns"] and {"*.safetensors", "*.bin"} - {weights} - set(kw["allow_patterns"])

    def offline(repo, revision=None):  # what list_repo_files does with HF_HUB_OFFLINE set
        raise OSError("offline mode is enabled")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    asked.clear()
    assert_close(olmo.OlmoForCausalLM.from_pretrained("allenai/OLMo-1B-hf")(ids), expected_logits(ref, ids))
    assert {"*.safetensors", "*.bin"} <= set(asked[0][1]["allow_patterns"])  # whichever the cache holds

    class RevisionNotFoundError(Exception):
        pass

    def unknown(repo, revision=None, **kw):
        raise RevisionNotFoundError("404 Client Error\n(many lines)")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", unknown)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", unknown)
    with pytest.raises(ValueError, match="revision 'step0'.*RevisionNotFoundError") as error:
        olmo.OlmoForCausalLM.from_pretrained("allenai/OLMo-1B-hf", revision="step0")
    assert "\n" not in str(error.value)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(ValueError, match="pip install huggingface_hub"):
        olmo.OlmoForCausalLM.from_pretrained("allenai/OLMo-1B-hf")


def test_sharded_index_must_name_files(small_checkpoint, tmp_path):
    path, ref = small_checkpoint
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    for weight_map in ({"lm_head.weight": 3}, {"lm_head.weight": "../model.safetensors"}, ["x"]):
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(ValueError, match="model.safetensors.index.json"):
            olmo.OlmoForCausalLM.from_pretrained(str(tmp_path))


HEADER_MUTATIONS = {
    "dtype": ["F64", "I32", "F16", "BF16", ["F32"], {"F32": 1}, 4, None],
    "shape": [[2.0, 16], [-1, 32], ["16", 32], [10 ** 20, 32], [[16, 32]], [16, 32, 1], {}, "16,32", None],
    "data_offsets": [[0.0, 4], [-4, 0], ["0", "4"], [0, 10 ** 20], [0], [[0, 4]], None, "0-4"],
}


@settings(max_examples=60)
@given(data=st.data())
def test_mutated_safetensors_header_loads_the_same_model_or_names_the_file(data, small_checkpoint, tmp_path_factory):
    """Both twins read a model.safetensors whose header had one thing mutated (a tensor's dtype, shape or offsets
    swapped for another type, range or nesting; an entry removed; __metadata__ not an object; the whole header
    nested thousands deep): each either loads the unmutated model or raises ValueError naming the file or the
    tensor -- never another exception, never a different model."""
    path, ref = small_checkpoint
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    name = data.draw(st.sampled_from(sorted(header) + ["(nesting)"]))
    if name == "(nesting)":
        text = "[" * 100_000 + "]" * 100_000
    else:
        if name == "__metadata__":
            header[name] = data.draw(st.sampled_from([[1], "pt", 3, None, {"format": 1}]))
        elif data.draw(st.booleans()):
            del header[name]
        else:
            key = data.draw(st.sampled_from(sorted(HEADER_MUTATIONS)))
            header[name][key] = data.draw(st.sampled_from(HEADER_MUTATIONS[key]))
        text = json.dumps(header)
    d = tmp_path_factory.mktemp("header")
    shutil.copy(os.path.join(path, "config.json"), d)
    with open(d / "model.safetensors", "wb") as f:
        f.write(len(text.encode()).to_bytes(8, "little") + text.encode() + raw[8 + n:])
    ids = ids_for(SMALL, 1, 6, 0)
    for load in (lambda: olmo.OlmoForCausalLM.from_pretrained(str(d))(ids),
                 lambda: torch.from_numpy(olmo_numpy.OlmoForCausalLM.from_pretrained(str(d))(ids.numpy()))):
        try:
            logits = load()
        except ValueError as e:
            assert "model.safetensors" in str(e) or "tensor" in str(e), str(e)
            continue
        assert_close(logits, expected_logits(ref, ids))


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


def break_checkpoint(path, dest, breakage):
    """A copy of a checkpoint, broken one way: no_path (nothing left at dest), no_config, bad_json, not_olmo
    (model_type llama), no_tokenizer, missing_tensor (model.layers.0.mlp.up_proj.weight), bad_shape (a 3x32
    embedding), bad_up_proj (a 3x3 model.layers.0.mlp.up_proj.weight), or a generation_config.json that is
    bad_generation_json, generation_list (not an object) or generation_top_p (7)."""
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
    generation = {"bad_generation_json": '{"do_sample": tru', "generation_list": "[1, 2]",
                  "generation_top_p": '{"do_sample": true, "top_p": 7}'}
    if breakage in generation:
        open(os.path.join(bad, "generation_config.json"), "w").write(generation[breakage])
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


def test_import_olmo_needs_only_torch():
    code = ("import sys, olmo; extra = {'transformers', 'tokenizers', 'safetensors', 'huggingface_hub'}"
            " & set(sys.modules); assert not extra, extra")
    assert run_cli(code=code).returncode == 0


SCRIPTS = ["olmo.py", "olmo_numpy.py"]  # the two CLIs: cli.py behind a torch and a NumPy backend
MODULES = {"olmo.py": olmo, "olmo_numpy.py": olmo_numpy}
ON_CPU = {"olmo.py": ["--device", "cpu"], "olmo_numpy.py": []}  # float32 on the CPU, as greedy_output computes


@pytest.fixture(scope="module")
def endless_checkpoint(cli_checkpoint, tmp_path_factory):
    """cli_checkpoint with no EOS id anywhere: greedy generation runs until the budget (or a signal) ends it."""
    path = shutil.copytree(cli_checkpoint[0], tmp_path_factory.mktemp("endless") / "ckpt")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": None}))
    (path / "generation_config.json").unlink(missing_ok=True)
    return str(path)


def greedy_output(module, path, tok, prompt, new_tokens):
    """What the CLI prints for a greedy run: the prompt, then module's (olmo's or olmo_numpy's) own greedy
    continuation to EOS 0 decoded by the tokenizer, then a newline."""
    ids = tok.encode(prompt, add_special_tokens=False).ids
    array = torch.tensor if module is olmo else np.array
    new = module.OlmoForCausalLM.from_pretrained(path).generate(array([ids]), new_tokens, eos_token_id=0)
    return prompt + tok.decode([int(t) for t in new[0, len(ids):]], skip_special_tokens=True) + "\n"


def error_line(status, err):
    """The one `error: ...` line of a failed run (and that there is nothing else: no traceback, exit status 2)."""
    assert status == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if not line.startswith("loaded ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_cli_streams_prompt_and_continuation(cli_checkpoint, script):
    """A real run: stdout is the prompt and the greedy continuation, exactly as the twin's generate + the tokenizer
    give it; a budget past the 64 positions the model was trained on runs, with one warning line on stderr."""
    path, tok = cli_checkpoint
    prompt = "Language 🙂 models"
    result = run_cli("--model", path, "--prompt", prompt, "--max-new-tokens", "70", *ON_CPU[script], script=script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == greedy_output(MODULES[script], path, tok, prompt, 70)
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "64 positions" in warnings[0], result.stderr
    assert "tokens/s" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("rope_type, warns", [("dynamic", False), ("linear", True)])
def test_cli_warns_past_the_trained_context_unless_rope_is_dynamic(cli_checkpoint, tmp_path, capsys, rope_type,
                                                                   warns):
    """Dynamic RoPE rescales to any length, so going past max_position_embeddings warns only without it."""
    copy = shutil.copytree(cli_checkpoint[0], tmp_path / rope_type)
    config = json.loads((copy / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": rope_type, "factor": 2.0, "rope_theta": 10000.0}
    (copy / "config.json").write_text(json.dumps(config))
    status, _, err = main_in_process(olmo_numpy.main, ["--model", str(copy), "--prompt", "Language",
                                                       "--max-new-tokens", "70"], capsys)
    assert status == 0 and err.count("warning:") == warns, err


class Chunks:
    """A stand-in for stdout that keeps each write apart."""

    def __init__(self):
        self.chunks = []

    def write(self, text):
        self.chunks.append(text)

    def flush(self):
        pass


def test_cli_stream_never_splits_a_character(cli_checkpoint):
    """Feed the streamer one byte per token, so that tokens split multi-byte characters: every chunk it prints
    is whole text."""
    _, tok = cli_checkpoint
    ids = tok.encode("🙂日本語🙂", add_special_tokens=False).ids
    byte_ids = [tok.token_to_id(c) for c in "".join(tok.id_to_token(i) for i in ids)]  # one byte per token
    assert len(byte_ids) > len(ids) and None not in byte_ids
    out = Chunks()
    stream = cli.Stream(tok, out)
    for t in byte_ids:
        stream(t)
    stream.finish()
    assert "".join(out.chunks) == "🙂日本語🙂\n"
    assert all("\ufffd" not in c for c in out.chunks) and len(out.chunks) > 3


@settings(max_examples=40)
@given(ids=st.lists(st.integers(0, 299), max_size=30))
def test_cli_stream_prints_exactly_the_decoded_text(cli_checkpoint, ids):
    """Whatever the tokens (special ones, bytes that never form a character), the chunks add up to the
    tokenizer's decoding of all of them, and only the last chunk may end in U+FFFD (a character cut off)."""
    _, tok = cli_checkpoint
    out = Chunks()
    stream = cli.Stream(tok, out)
    for t in ids:
        stream(t)
    stream.finish()
    assert "".join(out.chunks) == tok.decode(ids, skip_special_tokens=True) + "\n"
    assert not any(c.endswith("\ufffd") for c in out.chunks[:-1])


@pytest.mark.parametrize("script", SCRIPTS)
def test_cli_generation_config_defaults_and_flags(cli_checkpoint, tmp_path, monkeypatch, capsys, script):
    """generation_config.json sets the sampling defaults (transformers' semantics: sampling only with do_sample,
    top_k 50 unless set) and the EOS ids; flags win; without the file, EOS comes from config.json; config.json's
    bos_token_id adds no BOS (AutoTokenizer doesn't either)."""
    module, (path, tok) = MODULES[script], cli_checkpoint
    seen = {}

    def recording_generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, **kw):
        seen.update(temperature=temperature, top_k=top_k, top_p=top_p, eos=eos_token_id, n=max_new_tokens,
                    ids=[int(i) for i in input_ids[0]])

    def run(directory, *flags):
        seen.clear()
        status, _, err = main_in_process(module.main, ["--model", str(directory), "--prompt", "hi", *flags], capsys)
        assert status == 0, err
        return dict(seen)

    monkeypatch.setattr(module.OlmoForCausalLM, "generate", recording_generate)
    hi = tok.encode("hi", add_special_tokens=False).ids
    assert json.load(open(os.path.join(path, "generation_config.json")))["eos_token_id"] == 0
    greedy = dict(temperature=0.0, top_k=None, top_p=None, eos=0, n=100, ids=hi)
    assert run(path) == greedy

    copy = shutil.copytree(path, tmp_path / "copy")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "eos_token_id": 5, "bos_token_id": 1}))
    (copy / "generation_config.json").unlink()
    assert run(copy, "--max-new-tokens", "7") == {**greedy, "eos": 5, "n": 7}
    assert hi == transformers.AutoTokenizer.from_pretrained(str(copy))("hi")["input_ids"]

    gen = copy / "generation_config.json"
    gen.write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [0, 7]}))
    assert run(copy) == {**greedy, "temperature": 0.6, "top_k": 50, "top_p": 0.9, "eos": [0, 7]}
    assert run(copy, "--temperature", "0", "--top-k", "5") == \
        {**greedy, "temperature": 0.0, "top_k": 5, "top_p": 0.9, "eos": [0, 7]}
    assert run(copy, "--top-k", "0", "--top-p", "1")["top_k"] is None  # 0 = off, as in transformers
    gen.write_text(json.dumps({"do_sample": False, "temperature": 0.6, "top_k": 3, "top_p": 0.9}))
    assert run(copy) == {**greedy, "eos": 5}  # no do_sample: greedy, whatever the sampling fields say
    assert run(copy, "--temperature", "0.5") == {**greedy, "temperature": 0.5, "eos": 5}


# generation_config.json mutated: every field the CLI reads, with values of every JSON type and range. The rules
# below are the issue's, written out here independently of cli.py.
VALID_GENERATION_CONFIG = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9, "eos_token_id": [0, 7],
                           "pad_token_id": 1, "transformers_version": "5.23.0"}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, 299, 300, -1, 0.0, 1.0, 2.5])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=4) | st.sampled_from(["false", "1"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=2),
    max_leaves=5)


def generation_field_ok(field, value, vocab_size=300):
    integer = type(value) is int
    number = type(value) in (int, float)
    token = integer and 0 <= value < vocab_size
    return value is None or {
        "do_sample": type(value) is bool,
        "temperature": number and math.isfinite(value) and value >= 0,
        "top_k": integer and value >= 0,
        "top_p": number and 0 < value <= 1,
        "eos_token_id": token or type(value) is list and all(type(v) is int and 0 <= v < vocab_size for v in value),
    }.get(field, True)


def expected_settings(d, config_eos=0):
    """transformers' semantics for a valid file: sampling only with do_sample; null means unset."""
    sampling = d.get("do_sample") is True
    get = lambda field, default: default if d.get(field) is None else d[field]  # noqa: E731
    top_k, top_p = get("top_k", 50), get("top_p", 1.0)
    return dict(temperature=float(get("temperature", 1.0)) if sampling else 0.0,
                top_k=top_k if sampling and top_k > 0 else None,
                top_p=top_p if sampling and top_p < 1 else None, eos_token_id=get("eos_token_id", config_eos))


@settings(max_examples=150)
@given(how=st.sampled_from(["swap", "drop", "whole", "cut", "as is"]), field=st.sampled_from(list(
    VALID_GENERATION_CONFIG)), value=JSON_VALUES, cut=st.integers(0, 200))
@example(how="as is", field="top_k", value=None, cut=0)
@example(how="swap", field="temperature", value=None, cut=0)  # null = unset
@example(how="swap", field="do_sample", value="false", cut=0)  # a string is not a boolean
@example(how="swap", field="top_k", value=20.0, cut=0)  # nor is 20.0 an integer
@example(how="swap", field="eos_token_id", value=[0, True], cut=0)
@example(how="whole", field="top_k", value=[VALID_GENERATION_CONFIG], cut=0)  # a list, not an object
def test_cli_generation_config_is_read_or_refused_naming_the_file(tmp_path_factory, how, field, value, cut):
    """A mutated generation_config.json (a field's value swapped for any JSON value, a field dropped, the whole
    document replaced, or the text cut short) gives exactly the settings the rules say, or a ValueError naming the
    file: never another exception, never a silently different setting."""
    path = tmp_path_factory.mktemp("gen")
    file = path / "generation_config.json"
    document = dict(VALID_GENERATION_CONFIG)
    if how == "swap":
        document[field] = value
    if how == "drop":
        del document[field]
    if how == "whole":
        document = value
    text = json.dumps(document)
    file.write_text(text[:min(cut, len(text) - 1)] if how == "cut" else text)  # a cut object is never JSON
    args = types.SimpleNamespace(temperature=None, top_k=None, top_p=None)  # no flags given
    config = types.SimpleNamespace(vocab_size=300, eos_token_id=0)
    if how != "cut" and isinstance(document, dict) and all(generation_field_ok(*kv) for kv in document.items()):
        assert cli.sampling_settings(args, str(path), config) == expected_settings(document)
    else:
        with pytest.raises(ValueError, match=re.escape(str(file))):
            cli.sampling_settings(args, str(path), config)


def test_cli_generation_config_nested_too_deep_is_refused_naming_the_file(tmp_path):
    (tmp_path / "generation_config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "generation_config.json"))):
        cli.read_generation_config(str(tmp_path), 300)


SURROGATES = os.fsdecode(b"\xff\xfe")  # what Python makes of the bytes of `--prompt $'\xff\xfe'`
BAD_FLAGS = [  # (flags, what the one error line must say): for both CLIs
    (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["--top-p", "nan"], "--top-p"),
    (["--temperature", "-0.5"], "--temperature must be a finite number >= 0"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--top-k", "-1"], "--top-k must be >= 0"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--seed", "x"], "--seed"),
    (["--prompt", SURROGATES], "--prompt is not valid UTF-8"),
    (["--chat"], "either --prompt TEXT or --chat"),
    (["--system", "be brief"], "--system is for --chat"),
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("flags, message", BAD_FLAGS)
def test_cli_bad_flags_one_line_exit_2(cli_checkpoint, capsys, script, flags, message):
    status, out, err = main_in_process(MODULES[script].main, ["--model", cli_checkpoint[0], "--prompt", "hi",
                                                              *flags], capsys)
    assert out == "" and re.search(message, error_line(status, err))


@pytest.mark.parametrize("script", SCRIPTS)
def test_cli_no_prompt_is_an_error(cli_checkpoint, capsys, script):
    status, out, err = main_in_process(MODULES[script].main, ["--model", cli_checkpoint[0]], capsys)
    assert out == "" and "--prompt (or --chat) is required" in error_line(status, err)


@pytest.mark.parametrize("args, message", [
    (["--dtype", "int8"], "--dtype"),
    (["--device", "foo"], r"--device foo is not available here \(available: .*cpu\)"),
    (["--device", "cuda"], r"--device cuda is not available here \(available: cpu\)"),
    (["--device", "mps"], r"--device mps is not available here \(available: .*cpu\)"),
    (["--device", "cuda:7"], r"--device cuda:7 is not available here \(available: .*cpu\)"),
    (["--model", "/no/such/dir"], "not a checkpoint directory"),
    (["--model", "allenai/OLMo-1B-hf-not-cached"], "cannot fetch allenai/OLMo-1B-hf-not-cached"),
])
def test_cli_torch_flags_one_line_exit_2(cli_checkpoint, args, message, tmp_path, monkeypatch, capsys):
    if (args[-1] == "cuda" and torch.cuda.is_available()) or (args[-1] == "mps" and torch.backends.mps.is_available()):
        pytest.skip(f"this machine has {args[-1]}")
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: the env var is too late
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty hub cache
    status, out, err = main_in_process(olmo.main, ["--model", cli_checkpoint[0], "--prompt", "hi", *args], capsys)
    assert out == "" and re.search(message, error_line(status, err))


def test_numpy_cli_has_no_torch_flags(cli_checkpoint, capsys):
    for flag in ("--device", "--dtype", "--compile", "--revision"):
        status, out, err = main_in_process(olmo_numpy.main, ["--model", cli_checkpoint[0], "--prompt", "hi", flag,
                                                             "x"], capsys)
        assert out == "" and f"unrecognized arguments: {flag}" in error_line(status, err)


@pytest.mark.parametrize("script", SCRIPTS)
def test_cli_errors_in_a_real_process(cli_checkpoint, script):
    """`--prompt $'\xff\xfe'` as a shell passes it (real argv bytes, not a str), in a fresh process: exit status 2,
    one line, no traceback. (The other bad flags and files run in this process, above and below: a fresh process
    costs seconds of torch import.)"""
    result = run_cli("--model", cli_checkpoint[0], "--prompt", SURROGATES, script=script)
    assert result.stdout == "" and "--prompt is not valid UTF-8" in error_line(result.returncode, result.stderr)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("breakage, message", [
    ("no_path", "not a checkpoint directory"),
    ("no_config", "config.json"),
    ("bad_json", "config.json"),
    ("not_olmo", "model_type"),
    ("missing_tensor", "missing tensor model.layers.0.mlp.up_proj.weight"),
    ("bad_up_proj", r"model.layers.0.mlp.up_proj.weight has shape \(3, 3\)"),
    ("no_tokenizer", "tokenizer.json"),
    ("bad_generation_json", "generation_config.json"),
    ("generation_list", "generation_config.json does not hold a JSON object"),
    ("generation_top_p", "generation_config.json: top_p must be a number in"),
])
def test_cli_bad_checkpoints_one_line_exit_2(cli_checkpoint, tmp_path, capsys, script, breakage, message):
    bad = break_checkpoint(cli_checkpoint[0], str(tmp_path / "bad"), breakage)
    status, out, err = main_in_process(MODULES[script].main, ["--model", bad, "--prompt", "hi"], capsys)
    assert out == "" and re.search(message, error_line(status, err))


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("temperature", ["1e-40", "1e-320"])
def test_cli_tiny_temperature_samples_the_top_token(cli_checkpoint, capsys, script, temperature):
    """A tiny positive temperature is a valid request, not a NaN: a token whose logit is below the top one by a gap
    has relative probability exp(-gap / T), which underflows to exactly 0 once gap > ~104 T (float32), and distinct
    float32 logits of order 1 differ by at least ~1e-7 >> 104 * 1e-40. So every sample is greedy's token."""
    module, (path, tok) = MODULES[script], cli_checkpoint
    status, out, err = main_in_process(module.main, ["--model", path, "--prompt", "Language", "--max-new-tokens",
                                                     "12", "--temperature", temperature, *ON_CPU[script]], capsys)
    assert status == 0, err
    assert out == greedy_output(module, path, tok, "Language", 12)


@pytest.mark.parametrize("script", SCRIPTS)
def test_cli_seeded_sampling_is_reproducible(cli_checkpoint, capsys, script):
    path, _ = cli_checkpoint
    outs = [main_in_process(MODULES[script].main, ["--model", path, "--prompt", "Language", "--max-new-tokens", "8",
                                                   "--temperature", "1", "--seed", str(2**64 - 1)], capsys)
            for _ in range(2)]
    assert outs[0][0] == 0 and outs[0][1] == outs[1][1] and outs[0][1].startswith("Language")


@pytest.mark.parametrize("script", SCRIPTS)
def test_cli_out_of_memory_keeps_the_text_and_says_how_far_it_got(cli_checkpoint, monkeypatch, capsys, script):
    """When the growing cache runs out of memory, what was printed stays, and one line says how many tokens."""
    module, (path, tok) = MODULES[script], cli_checkpoint
    new = tok.encode(" models are", add_special_tokens=False).ids

    def generate_then_run_out(self, input_ids, max_new_tokens, callback=None, **kw):
        for t in new:
            callback(np.array([t]) if module is olmo_numpy else torch.tensor([t]))
        raise MemoryError

    monkeypatch.setattr(module.OlmoForCausalLM, "generate", generate_then_run_out)
    status, out, err = main_in_process(module.main, ["--model", path, "--prompt", "Language", "--max-new-tokens",
                                                     "10"], capsys)
    assert out == "Language models are\n"
    assert f"out of memory after {len(new)} new tokens" in error_line(status, err)


def ctrl_c_after_first_token(path, script, prompt="Go"):
    """Start an endless greedy generation from prompt, read the prompt and 10 characters more as the CLI prints
    them (a run that fails prints the prompt and a newline, then stops), then Ctrl-C: (what was read, the rest of
    stdout, stderr, exit status)."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, script), "--model", path, "--prompt", prompt,
                             "--max-new-tokens", "100000000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (2**32, 2**32)),
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # CUDA can't start in 4 GiB
    watchdog = threading.Timer(60, proc.kill)  # should nothing be printed, fail instead of waiting forever
    watchdog.start()
    first = proc.stdout.read(len(prompt) + 10)
    watchdog.cancel()
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    return first, rest, err, proc.returncode


@pytest.mark.parametrize("script", SCRIPTS)
def test_cli_huge_budget_starts_at_once_and_ctrl_c_keeps_the_text(endless_checkpoint, script):
    """--max-new-tokens 100000000 is a limit, not an allocation: tokens stream at once, in 4 GiB of address space
    (a cache for the whole budget would need 51 GB), and Ctrl-C keeps what was printed and ends the line."""
    first, rest, err, status = ctrl_c_after_first_token(endless_checkpoint, script)
    assert first.startswith("Go") and len(first) == 12, err
    assert status == 130 and "Traceback" not in err and (first + rest).endswith("\n")


@pytest.mark.parametrize("script", SCRIPTS)
def test_cli_reader_closing_stdout_early_is_quiet(endless_checkpoint, script):
    """`| head -c 20`: the reader goes away; no message, no traceback, and status 141 (what a shell reports for
    a writer killed by SIGPIPE), so that `set -o pipefail` still knows the output was cut short."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, script), "--model", endless_checkpoint, "--prompt",
                             "Go", "--max-new-tokens", "5000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    head = proc.stdout.read(20)
    proc.stdout.close()  # what `head -c 20` does once it has its 20 bytes
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and head.startswith(b"Go")
    assert [line for line in err.splitlines() if not line.startswith(("loaded ", "warning: "))] == [], err


def test_cli_compile_time_is_reported_apart():
    """With --compile the first decode step (between the first two tokens) compiles: it is reported on its own and
    left out of tokens/s. Times: 1 s of prefill, 10 s of compiling, then 1 s per token."""
    line = cli.stats(0.0, [1.0, 11.0, 12.0, 13.0], compiled=True)
    assert line.startswith("4 tokens in 13.00s") and "took 10.0s" in line and line.endswith(", 1.0 tokens/s")
    assert cli.stats(0.0, [1.0, 2.0, 3.0, 4.0], compiled=False).endswith("4 tokens in 4.00s, 1.0 tokens/s")


@pytest.mark.parametrize("script", SCRIPTS)
def test_cli_help_shows_every_default(script, capsys):
    parser = cli.make_parser(MODULES[script].Backend())
    for action in parser._actions:
        if action.dest != "help":
            assert action.required or "default" in (action.help or ""), action.option_strings
    status, out, _ = main_in_process(MODULES[script].main, ["--help"], capsys)
    assert status == 0 and "(default: 100)" in out.replace("\n", " ")
    assert ("allenai/OLMo-1B-hf" if script == "olmo.py" else "required") in out


def test_cli_revision_goes_to_the_hub(cli_checkpoint, monkeypatch, capsys):
    """--revision picks an intermediate training checkpoint (a hub revision); without it none is asked for."""
    asked = []
    monkeypatch.setattr(olmo, "resolve_checkpoint", lambda path, revision=None: asked.append((path, revision))
                        or cli_checkpoint[0])
    for flags in (["--revision", "step1000-tokens4B"], []):
        status, _, err = main_in_process(olmo.main, ["--model", "allenai/OLMo-1B-hf", "--prompt", "hi",
                                                     "--max-new-tokens", "1", *flags], capsys)
        assert status == 0, err
    hub = [(path, rev) for path, rev in asked if path == "allenai/OLMo-1B-hf"]  # from_pretrained gets the directory
    assert hub == [("allenai/OLMo-1B-hf", "step1000-tokens4B"), ("allenai/OLMo-1B-hf", None)]


# The prompt's ids: as transformers' AutoTokenizer.from_pretrained(dir) gives them, for each way a checkpoint can
# set them up: tokenizer.json's post-processor (none, one that prepends BOS, byte-level), tokenizer_config.json's
# tokenizer_class and add_bos_token / add_prefix_space, config.json's model_type and bos_token_id.
TOKENIZER_TEXTS = ["Language models", "e\u0301t\u00e9 🙂 日本語", " <|endoftext|>x", "", "  two  spaces\n"]


@pytest.fixture(scope="module")
def trained_tokenizer_json(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    train_tokenizer(path, 300)
    return json.load(open(os.path.join(path, "tokenizer.json")))


@pytest.mark.parametrize("post", ["none", "bos", "byte_level"])
@pytest.mark.parametrize("tokenizer_class", [None, "GPTNeoXTokenizerFast", "GPT2Tokenizer", "TokenizersBackend",
                                             "PreTrainedTokenizerFast"])
@pytest.mark.parametrize("model_type, settings", [("olmo", {}), ("olmo", {"add_bos_token": True}),
                                                  ("olmo", {"add_prefix_space": True}),
                                                  ("olmo2", {"add_bos_token": True}), ("olmo3", {})])
def test_cli_prompt_ids_equal_autotokenizer(trained_tokenizer_json, tmp_path, post, tokenizer_class, model_type,
                                        settings):
    d = dict(trained_tokenizer_json)
    d["post_processor"] = {
        "none": None,
        "bos": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}},
        "byte_level": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    }[post]
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    tokenizer_config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|padding|>",
                        **settings, **({"tokenizer_class": tokenizer_class} if tokenizer_class else {})}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 300,
                                                      "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = cli.load_tokenizer(str(tmp_path))
    for text in TOKENIZER_TEXTS:
        assert ours.encode(text).ids == reference(text)["input_ids"], text


def test_cli_prompt_with_bos_reaches_the_model(cli_checkpoint, tmp_path, monkeypatch, capsys):
    """A tokenizer.json whose post-processor prepends BOS, read as AutoTokenizer reads it (TokenizersBackend): the
    model gets the BOS; the same file under OLMo 1's GPTNeoXTokenizer gets none."""
    path, _ = cli_checkpoint
    seen = []
    monkeypatch.setattr(olmo_numpy.OlmoForCausalLM, "generate", lambda self, ids, *a, **kw: seen.append(ids[0]))
    copy = shutil.copytree(path, tmp_path / "copy")
    tokenizer = tokenizers.Tokenizer.from_file(str(copy / "tokenizer.json"))
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    tokenizer.save(str(copy / "tokenizer.json"))
    for tokenizer_class in ("TokenizersBackend", "GPTNeoXTokenizer"):
        (copy / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class}))
        status, _, err = main_in_process(olmo_numpy.main, ["--model", str(copy), "--prompt", "hi"], capsys)
        assert status == 0, err
        assert seen[-1].tolist() == transformers.AutoTokenizer.from_pretrained(str(copy))("hi")["input_ids"]
    assert seen[0][0] == 0 and seen[0][1:].tolist() == seen[1].tolist()  # BOS, then the same ids


def test_cli_unknown_tokenizer_class_is_refused(cli_checkpoint, tmp_path, capsys):
    copy = shutil.copytree(cli_checkpoint[0], tmp_path / "copy")
    (copy / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    status, out, err = main_in_process(olmo_numpy.main, ["--model", str(copy), "--prompt", "hi"], capsys)
    assert out == "" and "tokenizer_class 'LlamaTokenizer' is not supported" in error_line(status, err)


# ----------------------------------------------------------------------------------------------------------------
# olmo_numpy.py, the NumPy twin: against olmo.py and transformers on the same random checkpoints
#
# Tolerance: the module docstring's. The twin runs float32 arithmetic through NumPy's OpenBLAS and its own
# reductions, so it sums in other orders, and its gelu's erf is an approximation good to 1.5e-7 absolute (5 U
# after the |x| / 2 of gelu, inside the ~8 U of a stage): the same analysis holds. Its logits are within FP32_TOL
# of the float64 ones; against another float32 computation (olmo.py, its own cached path) within twice that, NP_TOL.
# Any real bug (a wrong rotation, a missed clip or bias, a padding leak, a stale cache slot) moves logits by 1e-3
# or more.

NP_TOL = dict(atol=ATOL, rtol=RTOL)  # see the comment above

# Explicit examples, so every run covers the rarest combination whatever hypothesis draws: dynamic RoPE past the
# trained length, with GQA, bias, clip_qkv, a tied head and exact gelu.
NP_DYNAMIC = dict(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, hidden_act="gelu", max_position_embeddings=8, tie_word_embeddings=True,
                  attention_bias=True, clip_qkv=0.8, rope_theta=500.0,
                  rope_scaling={"rope_type": "dynamic", "factor": 2.5}, pad_token_id=1, bos_token_id=None,
                  eos_token_id=None)
# ... and OLMo 3 with a window of 2, YaRN from an original length of 4, one full-attention layer in three.
NP_OLMO3 = dict(NP_DYNAMIC, model_type="olmo3", clip_qkv=None, num_hidden_layers=3, sliding_window=2,
                rms_norm_eps=1e-6, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                rope_scaling={"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 4})


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
        steps.append(model.decode_one_token(new[:, i:i + 1], np.array([T + i]), mask.sum(-1, keepdims=True) + i))
    return np.stack(steps, 1)


def assert_same_greedy(tokens, expected, logits, T, atol=ATOL, rtol=RTOL):
    """Greedy tokens (B, T + n) equal expected token for token. One exception, which random weights can make:
    two candidates whose logits tie to within the tolerance may come out either way; past such a step the rows
    are no longer comparable. logits (B, n, vocab) are the step logits along `tokens`.
    At the first step where the tokens differ both computations saw the same prefix; ours picked a, the other b,
    and each logit is within atol + rtol |logit| of the other's: so logit a - logit b <= twice that."""
    expected = np.asarray(expected)
    assert tokens.shape == expected.shape
    for b in range(tokens.shape[0]):
        differ = np.flatnonzero(tokens[b, T:] != expected[b, T:])
        if len(differ):
            i = differ[0]
            gap = logits[b, i, tokens[b, T + i]] - logits[b, i, expected[b, T + i]]
            tie = 2 * (atol + rtol * np.abs(logits[b, i]).max())
            assert abs(gap) <= tie, f"row {b} step {i}: token {tokens[b, T + i]}, expected " \
                                    f"{expected[b, T + i]}, whose logit is {gap} lower"


@settings(max_examples=30)
@given(cfg=configs(), length=st.integers(1, 24), seed=st.integers(0, 99))
@example(cfg=NP_DYNAMIC, length=20, seed=0)
@example(cfg={**NP_DYNAMIC, "hidden_act": "gelu_pytorch_tanh", "num_key_value_heads": 1}, length=12, seed=1)
@example(cfg=NP_OLMO3, length=20, seed=2)
def test_numpy_logits_equal_olmo_and_transformers(cfg, length, seed):
    ref, model, twin = three_models(cfg, seed)
    ids = ids_for(cfg, 2, length, seed).numpy()
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids)).logits
        ours = model(torch.from_numpy(ids))
        exact = float64_model(ref)(torch.from_numpy(ids)).logits
    logits = twin(ids)
    assert isinstance(logits, np.ndarray) and logits.shape == (2, length, cfg["vocab_size"])
    for float32_logits in (logits, ours.double(), expected.double()):  # each float32 implementation
        assert_close(float32_logits, exact, **FP32_TOL)
    if cfg["clip_qkv"] is not None:  # the weights are large enough that the clip changes the result
        twin.config.clip_qkv = None
        assert not np.allclose(twin(ids), logits, atol=1e-3)


@settings(max_examples=20)
@given(cfg=configs(), lengths=st.lists(st.integers(1, 12), min_size=2, max_size=3), new=st.integers(1, 12),
       seed=st.integers(0, 99))
@example(cfg=NP_DYNAMIC, lengths=[3, 10, 6], new=8, seed=0)
@example(cfg={**NP_DYNAMIC, "hidden_act": "gelu_new", "rope_scaling": None}, lengths=[5, 2], new=12, seed=1)
@example(cfg=NP_OLMO3, lengths=[3, 9], new=10, seed=2)
def test_numpy_cached_generation_equals_olmo_and_full_forward(cfg, lengths, new, seed):
    """Left-padded batch, greedy, every generation (past OLMo 3's windows and YaRN's original length): the same
    tokens as olmo.py's generate; the same per-step logits through the cache as olmo.py's; the same full-forward
    logits along the final sequence as transformers'; and -- except for dynamic RoPE past the trained length,
    where cached keys keep the rotation they were computed with -- the same logits as that full forward."""
    ref, model, twin = three_models(cfg, seed)
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
    with torch.no_grad():  # transformers' forward, not its generate: with OLMo 3's sliding windows (a window of 1,
        # a padded batch) transformers 5.23's cached generate departs from its own forward
        theirs = ref(torch.from_numpy(tokens[:, :-1]), attention_mask=torch.from_numpy(full_mask),
                     position_ids=torch.from_numpy(olmo_numpy.positions_from_mask(full_mask))).logits[:, T - 1:]
    assert_close(full, theirs, **NP_TOL)
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


def test_numpy_cache_grows_and_long_prompts_run_in_query_blocks(tmp_path, monkeypatch):
    """As olmo.py's: the cache starts at 256 slots whatever the budget and doubles as tokens are produced. A prompt
    longer than a query block (16 here, so a 250-token prompt is 16 blocks) gives the per-step logits of
    transformers' forward along the same tokens, past the doubling, OLMo 3's windows and YaRN's original length."""
    cfg = tiny_olmo3()
    ref = reference_model(cfg, 5)
    twin = olmo_numpy.OlmoForCausalLM.from_pretrained(save(ref, tmp_path))
    ids = ids_for(cfg, 1, 6, 0).numpy()
    first = twin.generate(ids, 4)
    tokens = twin.generate(ids, 10 ** 9, eos_token_id=int(first[0, -1]))
    assert len(twin.slots) == 256 and np.array_equal(tokens[:, :10], first)
    monkeypatch.setattr(olmo_numpy, "QUERY_BLOCK", 16)
    ids = ids_for(cfg, 1, 250, 0).numpy()
    out = twin.generate(ids, 10)
    assert len(twin.slots) == 512
    steps = np_step_logits(twin, ids, np.ones_like(ids), out[:, 250:])
    with torch.no_grad():
        assert_close(steps, ref(torch.from_numpy(out[:, :-1])).logits[:, 249:], **NP_TOL)


@pytest.mark.parametrize("cfg", [tiny_olmo3(), {**SMALL, "max_position_embeddings": 12,
                                                "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}])
def test_numpy_shared_prefix_is_reused_exactly(cfg, tmp_path, monkeypatch):
    """As olmo.py's: a one-row generate after another prefills only what differs from the cached tokens, and gives
    exactly what a fresh model gives; dynamic RoPE past the trained length reuses nothing."""
    path = save(reference_model(cfg, 2), tmp_path)
    twin, fresh = olmo_numpy.OlmoForCausalLM.from_pretrained(path), olmo_numpy.OlmoForCausalLM.from_pretrained(path)
    starts = []
    prefill = twin.prefill
    monkeypatch.setattr(twin, "prefill", lambda ids, mask, start=0: starts.append(start) or prefill(ids, mask, start))
    turn = twin.generate(ids_for(cfg, 1, 5, 0).numpy(), 4)
    for more in (3, 1):  # the conversation so far, the reply included, plus a new message
        ids = np.concatenate([turn, ids_for(cfg, 1, more, more).numpy()], 1)
        turn = twin.generate(ids, 4)
        assert np.array_equal(turn, fresh.generate(ids, 4))
    assert starts == [0, 8, 0 if dynamic_past_max(cfg, turn.shape[1] - 4) else 15]
    different = turn.copy()
    different[0, 2] = (different[0, 2] + 1) % cfg["vocab_size"]  # an edit early in the history
    assert np.array_equal(twin.generate(different, 3), fresh.generate(different, 3))
    assert starts[-1] == (0 if dynamic_past_max(cfg, different.shape[1]) else 2)


def test_numpy_bad_ids_top_k_zero_and_tiny_temperatures():
    """Like olmo.py: ids outside the vocabulary (-1 would silently wrap to the last row) are refused naming the id;
    top_k=0 is off; a tiny temperature is greedy, not NaN."""
    twin = olmo_numpy.OlmoForCausalLM(olmo_numpy.OlmoConfig.from_dict(SMALL), {
        name: np.ones(shape, np.float32) for name, shape in olmo_numpy.weight_shapes(
            olmo_numpy.OlmoConfig.from_dict(SMALL)).items()})
    for bad in (-1, SMALL["vocab_size"]):
        for call in (twin, lambda ids: twin.generate(ids, 2)):
            with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
                call(np.array([[3, bad, 5]]))
    with pytest.raises(ValueError, match="token ids must be integers"):
        twin(np.array([[3.0, 4.5]]))
    logits = np.array([[1.0, 3.0, 2.9, 0.0, -1.0]], dtype=np.float32)
    rng = np.random.default_rng(0)
    draws = {int(olmo_numpy.sample(logits, 5.0, top_k=0, rng=rng)[0]) for _ in range(400)}
    assert draws == {0, 1, 2, 3, 4}  # top_k=0 keeps every token (at temperature 5 each has p > 0.08)
    for t in (1e-3, 1e-40, 1e-320, 5e-324):  # 1/t overflows float32 (and float64 for the last two)
        assert [int(olmo_numpy.sample(logits, t, top_k=k, top_p=p, rng=rng)[0]) for k in (None, 2)
                for p in (None, 0.5)] == [1] * 4


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
    """Each float32 activation, olmo_numpy's and transformers' (torch's vectorised kernels, which differ by CPU),
    against its exact value: the same formula in float64 on the same float32 inputs, with math.erf. Each must stay
    within the bound float32 error analysis gives it, element by element. Every +, -, *, / adds a relative error
    of at most U; a library's float32 exp, tanh or erf is granted LIB = 32 U (2e-6): relative for exp, absolute
    for tanh and erf, whose values lie in (-1, 1). SLEEF, SVML and Arm's routines promise 1 to 4 ulps; torch's own
    gelu erf has shown up to ~12 U (7e-7 absolute) on AVX-512."""
    x = np.linspace(-8, 8, 100_001).astype(np.float32)  # past |x| = 6, where erf and tanh saturate in float32
    xd = x.astype(np.float64)

    def within(name, actual, exact, bound):
        excess = np.abs(np.asarray(actual, np.float64) - exact) - bound
        i = excess.argmax()
        assert excess[i] <= 0, f"{name} at x = {x[i]}: {actual[i]}, exact {exact[i]}, bound {bound[i]:.3g}"

    # olmo_numpy.erf: A&S 7.1.26's own error (< 1.5e-7, evaluated in float64), then rounded once to float32 (half
    # an ulp of a value in (-1, 1): U / 2).
    exact_erf = np.array([math.erf(v) for v in xd.tolist()])
    assert np.abs(olmo_numpy.erf(xd) - exact_erf).max() < 1.5e-7
    within("olmo_numpy.erf", olmo_numpy.erf(x), exact_erf, np.full_like(xd, 1.5e-7 + U / 2))

    # gelu = 0.5 x (1 + f(z)), f = erf or tanh, 0.5 x exact: an absolute error E in f (its own, plus <= 3 U from
    # its argument z, which carries <= 6 U relative, with |f'(z) z| <= 0.5) is an absolute |x| / 2 * (E + 3 U) in
    # gelu, not a relative one; then 1 + f and the product round once each (2 U |gelu|). So gelu's relative error is
    # unbounded where gelu nears 0 (x < -4). silu = x / (1 + exp(-x)) or x * sigmoid(x): a relative LIB in exp,
    # then 3 roundings.
    erf_half = np.array([math.erf(v / math.sqrt(2.0)) for v in xd.tolist()])
    tanh_arg = math.sqrt(2.0 / math.pi) * (xd + 0.044715 * xd ** 3)
    exact = {"silu": xd / (1.0 + np.exp(-xd)), "gelu": 0.5 * xd * (1.0 + erf_half),
             "gelu_tanh": 0.5 * xd * (1.0 + np.tanh(tanh_arg)), "relu": np.maximum(xd, 0.0)}
    exact.update(swish=exact["silu"], gelu_new=exact["gelu_tanh"], gelu_pytorch_tanh=exact["gelu_tanh"])

    def bound(name, f_error):
        if name in ("silu", "swish"):
            return (LIB + 3 * U) * np.abs(exact[name])
        if name == "relu":
            return np.zeros_like(xd)  # exact
        return np.abs(xd) / 2 * (f_error + 3 * U) + 2 * U * np.abs(exact[name])

    t = torch.from_numpy(x)
    for name in ACTIVATIONS:
        within(f"transformers {name}", transformers.activations.ACT2FN[name](t).numpy(), exact[name],
               bound(name, LIB))
        # the twin's gelu uses its own erf, whose bound is known (above); its tanh and exp are NumPy's
        ours = bound(name, 1.5e-7 + U / 2 if name == "gelu" else LIB)
        within(f"olmo_numpy {name}", olmo_numpy.ACT2FN[name](x), exact[name], ours)
    # the closest wrong choice, the tanh approximation for exact gelu, is 100 times the bound away
    assert (np.abs(exact["gelu_tanh"] - exact["gelu"]) > 100 * bound("gelu", LIB)).any()
    assert not np.isnan(olmo_numpy.silu(np.float32([-1e4, 1e4]))).any()


@pytest.mark.parametrize("d", [
    {},
    {"model_type": "olmo", "rope_theta": 500.0, "rope_scaling": {"type": "dynamic", "factor": 2},
     "torch_dtype": "float32", "num_key_value_heads": 8, "clip_qkv": 8.0},
    {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 4.0}, "architectures": ["X"]},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "tie_word_embeddings": True},
    {"model_type": "olmo2", "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16"},
    {"model_type": "olmo3", "num_hidden_layers": 8, "sliding_window": 16, "rope_scaling": {
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192, "attention_factor": 1.2}},
    {"model_type": "olmo3", "num_hidden_layers": 2, "layer_types": ["full_attention", "sliding_attention"],
     "rope_parameters": {"full_attention": {"rope_type": "dynamic", "rope_theta": 5e5, "factor": 2.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
])
def test_numpy_config_equals_olmo_config(d):
    assert asdict(olmo_numpy.OlmoConfig.from_dict(d)) == asdict(olmo.OlmoConfig.from_dict(d))


@pytest.mark.parametrize("d", [
    {"model_type": "hf_olmo"}, {"hidden_size": 100, "num_attention_heads": 3}, {"num_key_value_heads": 5},
    {"hidden_act": "tanh"}, {"rope_scaling": {"type": "longrope", "factor": 2.0}},
    {"rope_scaling": {"type": "linear", "factor": 0.5}}, {"tie_word_embeddings": "false"}, {"hidden_size": 32.0},
    {"rope_theta": float("nan")}, {"eos_token_id": [1, "2"]}, {"model_type": "olmo2", "clip_qkv": 8.0},
    {"model_type": "olmo3", "sliding_window": 0}, {"model_type": "olmo3", "layer_types": ["global"]},
    {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "truncate": "false"}}, {"rope_parameters": [1]},
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
    with torch.no_grad():  # the same rounded weights, computed in float32 by both
        expected = olmo.OlmoForCausalLM.from_pretrained(str(tmp_path / "bf16"), dtype=torch.float32)(
            torch.from_numpy(ids))
    assert_close(twin(ids), expected, **NP_TOL)


def write_safetensors(path, header, data, n=None):
    """Write a raw .safetensors file: the 8-byte length (n, default the true one), the JSON header (a str is
    written as it is), the data."""
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
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
    ({"a": {"dtype": ["F32"], "shape": [6], "data_offsets": [0, 24]}}, F32_BYTES, None, "tensor a has a malformed"),
    ({"a": {"dtype": {"F32": 1}, "shape": [6], "data_offsets": [0, 24]}}, F32_BYTES, None, "malformed"),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0.0, 24.0]}}, F32_BYTES, None, "malformed"),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [False, 24]}}, F32_BYTES, None, "malformed"),
    ({"a": {"dtype": "F32", "shape": [6.0], "data_offsets": [0, 24]}}, F32_BYTES, None, "malformed"),
    ({"a": {"dtype": "F32", "shape": 6, "data_offsets": [0, 24]}}, F32_BYTES, None, "malformed"),
    ({"__metadata__": ["format", "pt"], "a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}, F32_BYTES,
     None, "__metadata__ is not a JSON object"),
    ({"__metadata__": None, "a": {"dtype": "F32", "shape": [6], "data_offsets": [0, 24]}}, F32_BYTES, None,
     "__metadata__ is not a JSON object"),
    ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", F32_BYTES, None, "header is not valid JSON"),  # too deep
])
def test_numpy_corrupt_safetensors_raise_naming_file_and_tensor(tmp_path, header, data, n, message):
    path = write_safetensors(tmp_path / "bad.safetensors", header, data, n)
    with pytest.raises(ValueError, match=message) as e:
        olmo_numpy.load_safetensors(path)
    assert str(e.value).startswith(f"cannot read {path}: ") and "\n" not in str(e.value)


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
    if "has dtype" not in message:  # an integer tensor: the twin's reader refuses it first, by its safetensors name
        assert str(ours.value) == str(expected.value)


def test_numpy_missing_paths_and_bin_checkpoints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path / "nope"), "./foo/bar", "foo/bar/baz", "nope"):  # not shaped like a hub id
        with pytest.raises(ValueError, match="not a checkpoint directory$"):
            olmo_numpy.OlmoForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="`huggingface-cli download allenai/OLMo-1B-hf --local-dir DIR`"):
        olmo_numpy.OlmoForCausalLM.from_pretrained("allenai/OLMo-1B-hf")
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


# ----------------------------------------------------------------------------------------------------------------
# convert.py, the checkpoint converter: trainer checkpoints built here
#
# Tiny checkpoints are built here in each source layout, with random weights under the original names; their
# expected logits come from `trainer_reference_logits`, a forward pass written from the OLMo trainer's semantics
# (olmo/model.py in ai2-olmo 0.6.0) straight on the fused tensors, never from convert.py's mapping.
# Tolerance: assert_close's default, ATOL = RTOL = 2^-14 (the module docstring's). The reference is float64 and
# transformers runs the converted checkpoint in float32, the module docstring's analysis with one change: the
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
    with pytest.raises(convert.ConversionError, match=r"config.yaml does not explain: transformer.blocks.0.attn_norm.bias"):
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
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
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
        model = transformers.Olmo3ForCausalLM(transformers.Olmo3Config(**kw, sliding_window=4,
                                                                       layer_types=["sliding_attention", "full_attention"]))
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


# ----------------------------------------------------------------------------------------------------------------
# bench.py, and what the speed work could break
#
# No test here times anything: speed is measured (and compared with transformers) by bench.py itself.


def test_bench_tiny_end_to_end(tmp_path):
    """The whole benchmark on the tiny shape: every implementation in its own process, a token budget, a long
    prompt, the NumPy twin's BLAS threads set in its process; the report holds every figure, and greedy tokens
    agree across implementations (timings are only checked to exist: speed is bench.py's output, not a test)."""
    out = tmp_path / "bench.json"
    proc = run_cli("--shape", "tiny", "--prompt-len", "8", "--new-tokens", "4", "--reps", "1",  # default device
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
    # The floor: a step's matrix-vector products alone, in a process of its own, and the bound it sets.
    assert report["floor"]["float32"]["step_s"] > 0, report["floor"]
    assert "weights alone in float32" in proc.stdout and "no implementation decodes faster than" in proc.stdout
    assert "[bench]" in proc.stderr  # progress goes to stderr


@pytest.mark.parametrize("tied", [False, True])
def test_bench_weights_alone_multiplies_what_a_step_reads(tmp_path, monkeypatch, tied):
    """The floor's passes multiply each weight a decode step reads once: every projection and the head, the
    embedding only when it is the head; first all by rows, then the head by columns, then all by columns."""
    monkeypatch.setitem(bench.SHAPES, "floor", dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                                    num_attention_heads=2, tie_word_embeddings=tied))
    bench.build_checkpoint("floor", tmp_path)
    seen, linear = [], torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w: seen.append(w) or linear(x, w))
    assert bench.floor_step_s(str(tmp_path), "cpu", torch.float32, reps=1) > 0
    per_pass = 4 + 3 + 1  # q, k, v, o; gate, up, down; the head
    passes = [seen[i:i + per_pass] for i in range(0, len(seen), per_pass)]
    assert len(passes) == 3 * 2  # three layouts, each a warm-up pass and reps=1 timed one
    expected = sorted([(32, 32)] * 4 + [(64, 32)] * 2 + [(32, 64), (50304, 32)])
    for i, weights in enumerate(passes):
        assert sorted(tuple(w.shape) for w in weights) == expected
        by_columns = [w.stride(0) == 1 for w in weights]  # (out, in) stored column by column
        head = [w.shape[0] == 50304 for w in weights]
        assert by_columns == [[False] * per_pass, head, [True] * per_pass][i // 2], i


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
    weights ones, logits not degenerate), and bench's olmo.py gives transformers' greedy tokens on it."""
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
    assert report["results"]["olmo.py"]["same_tokens"], report["results"]["olmo.py"]


SHAPES_OLMO2_TINY = dict(model_type="olmo2", num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                         num_attention_heads=2, vocab_size=50304, rms_norm_eps=1e-6, rope_theta=500000.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_decode_gives_the_eager_tokens(tmp_path, monkeypatch, dtype):
    """--compile (the CLI's torch.compile of the one-token step: fullgraph, static cache) must not change what a
    step computes. Both models are fed the same tokens, so each step's logits compare without earlier divergence.
    float32: within ATOL/RTOL (fusion may contract a multiply-add: a few ulps), and greedy generation, padded or
    not, gives the same tokens (a flip would need a near-tie of ~1e-6 in 24 steps).
    bfloat16: each logit within one bf16 spacing of eager's (2^-7 of its binade). With inductor rounding after
    every op as eager does, what can differ is the summation order inside a fused reduction (~1e-7 relative in
    its float32 accumulator): now and then that moves one activation across a rounding boundary, a change far
    below a logit's spacing that can move the logit's own rounding by one step, no more. Kernels that round once
    (the option off) give 2 to 2.5 spacings on this shape at every step."""
    monkeypatch.setitem(bench.SHAPES, "compile", dict(num_hidden_layers=2, hidden_size=128, intermediate_size=512,
                                                      num_attention_heads=4, vocab_size=1024, eos_token_id=None))
    bench.build_checkpoint("compile", tmp_path, getattr(torch, dtype))  # std 1/sqrt(fan_in): logits std ~1
    torch._dynamo.reset()
    args = cli.parse_args(olmo.Backend(), ["--model", str(tmp_path), "--prompt", "x", "--device", "cpu", "--compile"])
    compiled, _ = olmo.Backend().load(args)
    eager = olmo.OlmoForCausalLM.from_pretrained(str(tmp_path))
    assert compiled.lm_head.weight.dtype == eager.lm_head.weight.dtype == getattr(torch, dtype)  # the checkpoint's
    ids = torch.randint(0, 1024, (4, 8), generator=torch.Generator().manual_seed(0))
    tokens, mask = eager.generate(ids, 24), torch.ones_like(ids)
    with torch.no_grad():
        for model in (compiled, eager):
            model.setup_cache(mask, 32)
            model.prefill(ids, mask)
        for i in range(8, 31):
            ours, theirs = (model.decode_one_token(tokens[:, i:i + 1], model.slots[i:i + 1], torch.full((4, 1), i))
                            .float() for model in (compiled, eager))
            if dtype == "float32":
                assert_close(ours, theirs)
            else:
                spacing = 2.0 ** (torch.floor(torch.log2(torch.maximum(ours.abs(), theirs.abs()))) - 7)
                assert ((ours - theirs).abs() <= spacing).all(), f"step {i}: {(ours - theirs).abs().max()}"
    if dtype == "float32":
        assert torch.equal(compiled.generate(ids, 24), tokens)
        # left padding: other positions and masks through the same compiled step (same shapes, no recompile)
        ids, mask = left_pad([ids[0], ids[1, :5]])
        expected = eager.generate(ids, 24, attention_mask=mask)
        assert torch.equal(compiled.generate(ids, 24, attention_mask=mask), expected)


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


SHAPES_7B = {  # the released 7B shapes, by generation (OLMo-7B, OLMo-2-1124-7B, Olmo-3-7B)
    "olmo": dict(),
    "olmo2": dict(vocab_size=100352, rms_norm_eps=1e-6, rope_theta=500000.0, pad_token_id=100277,
                  eos_token_id=100257),
    "olmo3": dict(vocab_size=100278, rms_norm_eps=1e-6, pad_token_id=100277, eos_token_id=100257,
                  max_position_embeddings=65536, rope_scaling={"rope_type": "yarn", "factor": 8.0,
                                                               "original_max_position_embeddings": 8192}),
}


@cuda
@pytest.mark.parametrize("kind", SHAPES_7B)
def test_7b_shape_bf16_on_gpu_equals_transformers(tmp_path, kind):
    """Each generation's 7B shape (4 of its 32 layers, to stay quick: for OLMo 3 three sliding, one full) with
    random weights of std 1/sqrt(fan_in), so logits have std ~1, and norm weights 1 +- 0.3, loaded by both in bf16,
    each against the exact logits of the same bf16 weights (transformers' model cast to float64). BF16_TOL, as on
    the CPU: each stage's output rounds to bf16 once (cuBLAS sums in float32, so the sums of 4096 or 11008 products
    add little), ~60 stages over 4 layers, ~sqrt(60) 2^-8 = 0.03 typically. Measured on an H100 (torch 2.11, OLMo 1
    shape): 17 x 2^-8 at most, against 32 x 2^-8 allowed; a real bug changes logits by O(1)."""
    config_class, model_class = (getattr(transformers, name) for name in GENERATIONS[kind])
    with torch.device("cuda"):
        ref = model_class(config_class(num_hidden_layers=4, **SHAPES_7B[kind]))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.normal_(1, 0.3) if name.endswith("norm.weight") else p.normal_(0, p.shape[-1] ** -0.5)
    ref.save_pretrained(tmp_path)
    del ref
    # both load the saved fp32 weights as bf16 (casting a built model with .to() would also round transformers'
    # RoPE frequencies to bf16, which a loaded model doesn't)
    ref = model_class.from_pretrained(tmp_path, dtype=torch.bfloat16).to("cuda").eval()
    model = olmo.OlmoForCausalLM.from_pretrained(str(tmp_path), device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 50280, (2, 64), device="cuda")
    with torch.no_grad():
        ours, theirs = model(ids).double(), ref(ids).logits.double()
        exact = ref.double()(ids).logits  # 10 GB of float64 weights
    assert_close(ours, exact, **BF16_TOL)
    assert_close(theirs, exact, **BF16_TOL)


@pytest.mark.skipif(not os.environ.get("OLMO_7B_PATH") or not torch.cuda.is_available(),
                    reason="set OLMO_7B_PATH to a downloaded OLMo checkpoint of any generation (allenai/OLMo-7B-hf, "
                           "OLMo-2-1124-7B, Olmo-3-7B, ...) and run on a GPU")
def test_real_olmo_7b_equals_transformers():
    path = os.environ["OLMO_7B_PATH"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    model = olmo.OlmoForCausalLM.from_pretrained(path, device="cuda", dtype=torch.bfloat16)
    ids = torch.tensor([[1, 510, 3158, 8516, 30013, 27287, 689, 253, 22658, 4370, 15]], device="cuda")
    with torch.no_grad():
        assert_close(model(ids).float(), ref(ids).logits.float(), atol=0.05, rtol=0.01)
    expected = ref.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(model.generate(ids, 20, eos_token_id=model.config.eos_token_id), expected)


# ----------------------------------------------------------------------------------------------------------------
# --chat: the template rendered as transformers renders it, and conversations through both CLIs
#
# The references: transformers' AutoTokenizer.apply_chat_template over the same tokenizer files, and its
# OlmoForCausalLM.generate (greedy) on the prompts that renders. Replies are compared as exact text. A greedy token
# can only differ where the reference's top two logits are closer than the two implementations' logits can
# disagree: float32 over these 2-layer models with O(1) logits, within the tolerances derived above (1e-5 to 2e-5).
# Each of the two logits can be off by that much, so a gap above 2 x 2e-5 decides the token; chat_reference checks
# that every reference step's top-2 gap is above 1e-4, so an equal reply is the only passing outcome.


# OLMo 1 Instruct's template (Tulu style). The newline after each {{ ... }} stays, while a line holding only a
# block tag vanishes (trim_blocks, lstrip_blocks): "<|user|>\nHi\n<|assistant|>\n".
TULU_TEMPLATE = (
    "{{ eos_token }}{% for message in messages %}\n"
    "{% if message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] }}\n"
    "{% elif message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
# OLMo 2 Instruct's shape: a BOS string, whitespace control with {%- -%}, the last reply without a newline.
OLMO2_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}\n"
    "  {%- if message['role'] == 'system' -%}{{ '<|system|>\\n' + message['content'] + '\\n' }}\n"
    "  {%- elif message['role'] == 'user' -%}{{ '<|user|>\\n' + message['content'] + '\\n' }}\n"
    "  {%- elif not loop.last -%}{{ '<|assistant|>\\n' + message['content'] + eos_token + '\\n' }}\n"
    "  {%- else -%}{{ '<|assistant|>\\n' + message['content'] + eos_token }}{%- endif -%}\n"
    "  {%- if loop.last and add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}\n"
    "{%- endfor -%}")
# Refuses a system message and roles that don't alternate, as several hub templates do.
STRICT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<start_of_turn>{{ message['role'] }}\n{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
# tojson (transformers': no HTML escaping, unicode kept, keyword options), namespace, {% continue %}, {% break %},
# the {% generation %} tag, strftime_now, and indented block tags (lstrip_blocks removes the indent).
JSON_TEMPLATE = """{% set ns = namespace(shown=0) %}{{ strftime_now('%Y') | length }}
{% for message in messages %}
    {% if message['content'] == '' %}{% continue %}{% endif %}
    {% if ns.shown == 4 %}
        {% break %}
    {% endif %}
    {% set ns.shown = ns.shown + 1 %}
    {% if message['role'] == 'assistant' %}
        {% generation %}{{ message | tojson }}{% endgeneration %}
    {% else %}
  {{ message['content'] | tojson(indent=2, sort_keys=True) }}
    {% endif %}
{% endfor %}
{{ dict(n=ns.shown) | tojson(separators=(',', ':')) }}{% if add_generation_prompt %}<|assistant|>{% endif %}"""
PAD = {"__type": "AddedToken", "content": "<|padding|>", "lstrip": False, "rstrip": False, "normalized": False,
       "single_word": False, "special": True}
CHAT_CONFIGS = {  # tokenizer_config.json of each: special tokens as strings, nulls and token objects
    "tulu": dict(chat_template=TULU_TEMPLATE, tokenizer_class="GPTNeoXTokenizer", bos_token=None,
                 eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token=PAD),
    "olmo2": dict(chat_template=OLMO2_TEMPLATE, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                  pad_token=PAD),
    "strict": dict(chat_template=STRICT_TEMPLATE, eos_token="<|endoftext|>"),
    "json": dict(chat_template=JSON_TEMPLATE, eos_token={**PAD, "content": "<|endoftext|>"}),
}
CHAT_PIECES = ["", " ", "\n", "\n\n", "\t", "Hi", " there", "Language models", "🙂", "👍🏽", "日本語", "e\u0301",
               "<|user|>", "<|endoftext|>", "{{ eos_token }}", "\"quoted\" & <b>", "\\"]


def chat_text():
    """Message text: empty, multi-line, emoji, CJK, a combining accent (NFC), special-token and template syntax."""
    return st.lists(st.sampled_from(CHAT_PIECES) | st.text(max_size=5), max_size=6).map("".join)


@st.composite
def conversations(draw):
    """[system] + user/assistant turns ending with a user message, as --chat builds them."""
    messages = [{"role": "system", "content": draw(chat_text())}] if draw(st.booleans()) else []
    for i in range(draw(st.integers(0, 2))):
        messages += [{"role": "user", "content": draw(chat_text())},
                     {"role": "assistant", "content": draw(chat_text())}]
    return messages + [{"role": "user", "content": draw(chat_text())}]


def train_chat_tokenizer(path):
    """OLMo 1's tokenizer in miniature: byte-level BPE after NFC normalization, with chat special tokens."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.normalizer = tokenizers.normalizers.NFC()
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|padding|>", "<|system|>", "<|user|>", "<|assistant|>"])
    tok.train_from_iterator(["<|user|>\nLanguage models are fun. 🙂 日本語も少し。\n<|assistant|>\n"] * 20, trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    return tok


def write_chat_config(path, name, **changes):
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({**CHAT_CONFIGS[name], **changes}, f)


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """(directory holding the trained tokenizer.json, the tokenizers.Tokenizer)."""
    root = tmp_path_factory.mktemp("chat_tokenizer")
    return root, train_chat_tokenizer(str(root))


@pytest.fixture(scope="module")
def chat_tokenizers(chat_tokenizer):
    """{template name: (our prompt ids of a conversation, transformers' AutoTokenizer)}, over the same files."""
    root, tok = chat_tokenizer
    result = {}
    for name in CHAT_CONFIGS:
        path = str(root / name)
        os.makedirs(path)
        shutil.copy(root / "tokenizer.json", path)
        if name == "olmo2":  # a tokenizer.json that adds BOS by itself: apply_chat_template must not let it
            tok.post_processor = tokenizers.processors.TemplateProcessing(
                single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
            tok.save(os.path.join(path, "tokenizer.json"))
        write_chat_config(path, name)
        source, file = cli.find_chat_template(path)
        template, variables = cli.compile_chat_template(source, file), cli.special_token_variables(path)
        tokenizer = cli.load_tokenizer(path)
        result[name] = (lambda messages, t=template, f=file, v=variables, tok=tokenizer:
                        cli.chat_prompt(t, f, v, tok, messages),
                        transformers.AutoTokenizer.from_pretrained(path))
    return result


@settings(max_examples=80)
@given(name=st.sampled_from(sorted(CHAT_CONFIGS)), messages=conversations())
def test_chat_prompt_ids_equal_apply_chat_template(chat_tokenizers, name, messages):
    import jinja2
    ours, reference = chat_tokenizers[name]
    try:
        expected = reference.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    except jinja2.TemplateError as e:  # the template's raise_exception: ours refuses with the same message
        with pytest.raises(ValueError, match="the chat template failed: " + re.escape(str(e))):
            ours(messages)
        return
    assert ours(messages) == expected


def write_template_layout(path, layout):
    """A tokenizer directory whose templates are spread as `layout` says; "WIN" marks the one transformers uses."""
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|endoftext|>", "chat_template": {
            "jinja": "config", "extra": "config", "string": "WIN", "list": [
                {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "WIN"}],
            "json_last": "WIN", "json_only": None}[layout]}, f)
    if layout == "jinja":
        open(os.path.join(path, "chat_template.jinja"), "w").write("WIN")
    if layout == "extra":  # additional_chat_templates/default.jinja is the default too
        os.makedirs(os.path.join(path, "additional_chat_templates"))
        open(os.path.join(path, "additional_chat_templates", "default.jinja"), "w").write("WIN")
        open(os.path.join(path, "additional_chat_templates", "other.jinja"), "w").write("other")
    if layout in ("json_last", "json_only"):  # a processor's legacy file: tokenizers don't read it
        json.dump({"chat_template": "WIN" if layout == "json_only" else "json"},
                  open(os.path.join(path, "chat_template.json"), "w"))


@pytest.mark.parametrize("layout", ["jinja", "extra", "string", "list", "json_last", "json_only"])
def test_chat_template_found_where_transformers_finds_it(chat_tokenizer, tmp_path, layout):
    shutil.copy(chat_tokenizer[0] / "tokenizer.json", tmp_path)
    write_template_layout(str(tmp_path), layout)
    source, file = cli.find_chat_template(str(tmp_path))
    assert source == "WIN"
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    if layout == "json_only":  # the last resort, where AutoTokenizer has none
        assert reference.chat_template is None and file.endswith("chat_template.json")
    else:
        assert reference.get_chat_template() == "WIN"


@pytest.mark.parametrize("config, message", [
    ({}, "has no chat template (use --prompt for plain text)"),
    ({"chat_template": None}, "has no chat template (use --prompt for plain text)"),
    ({"chat_template": [{"name": "tool_use", "template": "x"}]}, "tokenizer_config.json has chat templates "
                                                                 "tool_use but none named 'default'"),
    ({"chat_template": ["x"]}, "chat_template is a list but not of"),
    ({"chat_template": 7}, "tokenizer_config.json: chat_template is 7, not a string"),
    ({"chat_template": "{% if %}"}, "tokenizer_config.json: the chat template does not compile"),
    ({"chat_template": "x", "eos_token": 7}, "tokenizer_config.json: eos_token is 7, not a string"),
    ({"chat_template": "x", "bos_token": {"id": 3}}, "bos_token is an object without a string \"content\""),
])
def test_chat_bad_templates_raise_naming_the_file(tmp_path, config, message):
    with open(tmp_path / "tokenizer_config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=re.escape(message)):
        source, file = cli.find_chat_template(str(tmp_path))
        cli.compile_chat_template(source, file), cli.special_token_variables(str(tmp_path))


@pytest.fixture(scope="module")
def chat_checkpoint(chat_tokenizer, tmp_path_factory):
    """A random tiny OLMo 1 with OLMo 1 Instruct's template and a short context (96 positions), so that a
    conversation soon outgrows it: (path, transformers model, tokenizers.Tokenizer, AutoTokenizer)."""
    path = str(tmp_path_factory.mktemp("chat_checkpoint"))
    ref = reference_model({**SMALL, "vocab_size": 300, "eos_token_id": 0, "max_position_embeddings": 96}, 7)
    save(ref, path)
    shutil.copy(chat_tokenizer[0] / "tokenizer.json", path)
    write_chat_config(path, "tulu")
    return path, ref, chat_tokenizer[1], transformers.AutoTokenizer.from_pretrained(path)


def chat_reference(checkpoint, lines, new_tokens, system=None):
    """What `--chat` must print for these lines of stdin, computed with transformers: (stdout, notices), notices
    being "dropped" for a turn that had to drop the oldest turns and "not sent" for a message too long to fit.
    Each turn: the conversation (earlier replies as printed) through apply_chat_template, greedy generate, the
    new tokens decoded without special tokens; while the prompt and new_tokens don't fit the context, the oldest
    turn goes."""
    path, ref, tok, auto = checkpoint
    context, out, notices, turns = ref.config.max_position_embeddings, "", [], []
    for line in lines:
        if line == "/reset":
            turns = []
            continue

        def prompt(kept):
            messages = [{"role": "system", "content": system}] if system is not None else []
            for user, reply in kept:
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            messages.append({"role": "user", "content": line})
            return auto.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)

        first = next((k for k in range(len(turns) + 1) if len(prompt(turns[k:])) + new_tokens <= context), None)
        if first is None:
            notices.append("not sent")
            continue
        notices += ["dropped"] * (first > 0)
        turns, ids = turns[first:], prompt(turns[first:])
        with torch.no_grad():
            result = ref.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=0,
                                  pad_token_id=1, output_scores=True, return_dict_in_generate=True)
        top2 = torch.stack([s[0].topk(2).values for s in result.scores])
        assert (top2[:, 0] - top2[:, 1]).min() > 1e-4  # no near-tie: greedy tokens are determined (see above)
        reply = tok.decode(result.sequences[0, len(ids):].tolist(), skip_special_tokens=True)
        out += reply + "\n"
        turns.append((line, reply))
    return out, notices


CHAT_LINES = ["Hello 🙂", "Language models are fun.", "日本語も少し。", "", "/reset", "Language models",
              "The quick brown fox jumps over the lazy dog, again and again, all day long " * 2,
              "Are they?", "Yes, fun. 🙂", "Tell me more", "And more."]


@pytest.fixture(scope="module")
def chat_expected(chat_checkpoint):
    out, notices = chat_reference(chat_checkpoint, [line for line in CHAT_LINES if line], 8, system="Be brief.")
    assert "dropped" in notices and "not sent" in notices  # the conversation does outgrow the context
    return out, notices


@pytest.mark.parametrize("script", SCRIPTS)
def test_chat_through_a_pipe_equals_transformers(chat_checkpoint, chat_expected, script):
    """Replies (only they, on stdout) equal transformers' greedy replies turn by turn, across /reset, turns
    dropped to fit the 96-position context and a message too long to send at all; EOF ends with status 0."""
    proc = subprocess.run([sys.executable, os.path.join(HERE, script), "--model", chat_checkpoint[0], "--chat",
                           "--system", "Be brief.", "--max-new-tokens", "8"],
                          input="\n".join(CHAT_LINES).encode(), capture_output=True, cwd=HERE, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert proc.returncode == 0, err
    assert out == chat_expected[0]
    assert err.count("dropped the oldest") == chat_expected[1].count("dropped") and err.count("not sent") == 1
    assert "> " not in err and "Traceback" not in err


@pytest.fixture(scope="module")
def chat_endless_checkpoint(chat_checkpoint, tmp_path_factory):
    """chat_checkpoint with no EOS and a long context: replies run until stopped."""
    path = str(tmp_path_factory.mktemp("chat_endless"))
    for name in os.listdir(chat_checkpoint[0]):
        shutil.copy(os.path.join(chat_checkpoint[0], name), path)
    for name, changes in (("config.json", {"eos_token_id": None, "max_position_embeddings": 100000}),
                          ("generation_config.json", {"eos_token_id": None})):
        with open(os.path.join(path, name)) as f:
            d = json.load(f)
        with open(os.path.join(path, name), "w") as f:
            json.dump({**d, **changes}, f)
    return path


def greedy_text(checkpoint, messages, new_tokens):
    """transformers' greedy continuation of the chat prompt of messages, decoded without special tokens."""
    path, ref, tok, auto = checkpoint
    ids = auto.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    with torch.no_grad():
        new = ref.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                           pad_token_id=1)[0, len(ids):]
    return tok.decode(new.tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("script", SCRIPTS)
def test_chat_ctrl_c_stops_the_reply_and_at_the_prompt_exits_130(chat_checkpoint, chat_endless_checkpoint, script):
    """On a terminal (stdin a pty): "> " on stderr when the session waits for a line. Ctrl-C in a reply that would
    run for 50000 tokens ends it with a newline and returns to the prompt, the reply staying in the conversation
    as printed: the next reply continues that conversation. Ctrl-C at the prompt exits 130."""
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, script), "--model", chat_endless_checkpoint,
                             "--chat", "--max-new-tokens", "50000"], stdin=slave, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=HERE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    os.close(slave)
    out, err = proc.stdout.fileno(), proc.stderr.fileno()

    def read(fd, n):  # up to n bytes, failing instead of hanging if the session stops responding
        assert select.select([fd], [], [], 60)[0], "no output for 60 s"
        chunk = os.read(fd, n)
        assert chunk, "the session ended"
        return chunk

    def wait_for_prompt():
        seen = b""
        while not seen.endswith(b"> "):
            seen += read(err, 1)

    def interrupted_reply(line):
        """Send line, wait for 32 bytes of the reply, Ctrl-C, wait for the prompt: the reply as printed."""
        os.write(master, line.encode() + b"\n")
        printed = b""
        while len(printed) < 32:
            printed += read(out, 32 - len(printed))
        proc.send_signal(signal.SIGINT)
        wait_for_prompt()  # the reply and its newline were flushed to stdout before the prompt was written
        os.set_blocking(out, False)
        while True:
            try:
                chunk = os.read(out, 65536)
            except BlockingIOError:
                break
            printed += chunk
        os.set_blocking(out, True)
        return printed.decode()

    try:
        wait_for_prompt()
        first = interrupted_reply("Hello 🙂")
        second = interrupted_reply("Language models")
        proc.send_signal(signal.SIGINT)  # at the prompt
        assert proc.wait(timeout=60) == 130
    finally:
        proc.kill()
        os.close(master)
    assert first.endswith("\n") and second.endswith("\n")
    first, second = first[:-1], second[:-1]
    hello = [{"role": "user", "content": "Hello 🙂"}]
    assert greedy_text(chat_checkpoint, hello, len(first.encode()) + 16).startswith(first)
    followup = hello + [{"role": "assistant", "content": first}, {"role": "user", "content": "Language models"}]
    assert greedy_text(chat_checkpoint, followup, len(second.encode()) + 16).startswith(second)
    assert "Traceback" not in proc.stderr.read().decode()


def chat_in_process(module, path, lines, monkeypatch, capsys, *flags):
    """module's (olmo's or olmo_numpy's) --chat in this process, stdin piped from lines: (status, out, err)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("".join(f"{x}\n" for x in lines).encode())))
    return main_in_process(module.main, ["--model", path, "--chat", "--max-new-tokens", "4", *flags], capsys)


def copy_with_template(path, dest, template):
    shutil.copytree(path, dest)
    with open(os.path.join(dest, "tokenizer_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(dest, "tokenizer_config.json"), "w") as f:
        json.dump({**config, "chat_template": template}, f)
    return str(dest)


@pytest.mark.parametrize("module", [olmo, olmo_numpy], ids=["olmo", "olmo_numpy"])
def test_chat_without_a_template_one_line_exit_2(chat_checkpoint, tmp_path, module, monkeypatch, capsys):
    path = copy_with_template(chat_checkpoint[0], tmp_path / "plain", None)
    status, out, err = chat_in_process(module, path, ["hi"], monkeypatch, capsys)
    assert (status, out) == (2, "")
    assert err.splitlines()[-1] == f"error: {path} has no chat template (use --prompt for plain text)"


SANDBOX_ESCAPES = [  # (template, what the one error line says)
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "access to attribute '__class__' of 'str' object is unsafe"),
    ("{{ cycler.__init__.__globals__.os.system('touch pwned') }}", "is unsafe"),
    ("{{ lipsum.__globals__['os'].system('touch pwned') }}", "is unsafe"),
    ("{{ (messages | attr('__class__')).__base__ }}", "is unsafe"),
    ("{{ '{0.__init__.__globals__[os]}'.format(raise_exception) }}", "is unsafe"),
    ("{{ dict.__class__.__mro__ }}", "is unsafe"),
    ("{% set _ = messages.append({'role': 'user', 'content': 'x'}) %}", "is unsafe"),
    ("{% set ns = namespace() %}{% set ns._secret = 1 %}", "may not start with '_'"),
    ("{{ raise_exception.__globals__ }}", "renders the conversation as empty text"),  # unsafe renders as nothing
]


@pytest.mark.parametrize("module", [olmo, olmo_numpy], ids=["olmo", "olmo_numpy"])
@pytest.mark.parametrize("template, message", SANDBOX_ESCAPES)
def test_chat_template_sandbox_escapes_fail_in_one_line(chat_checkpoint, tmp_path, module, template, message,
                                                        monkeypatch, capsys):
    path = copy_with_template(chat_checkpoint[0], tmp_path / "evil", template)
    monkeypatch.chdir(tmp_path)
    status, out, err = chat_in_process(module, path, ["hi"], monkeypatch, capsys)
    assert (status, out) == (2, "") and not os.path.exists(tmp_path / "pwned")
    assert err.count("\n") == 2 and err.startswith("loaded ")  # the "loaded" line, then the error
    assert err.splitlines()[1].startswith(f"error: {path}/tokenizer_config.json: the chat template ")
    assert message in err


def test_chat_budget_dynamic_rope_and_bad_lines(chat_checkpoint, tmp_path, monkeypatch, capsys):
    """A reply budget that leaves no room in the context is refused; with dynamic RoPE nothing is ever dropped; a
    line that isn't UTF-8 is skipped with a notice, and the session goes on."""
    path = chat_checkpoint[0]
    status, out, err = chat_in_process(olmo_numpy, path, ["hi"], monkeypatch, capsys, "--max-new-tokens", "96")
    assert (status, out) == (2, "") and err.splitlines()[-1] == (
        "error: --max-new-tokens 96 leaves no room for a message in the 96 positions the model was trained on")

    dynamic = shutil.copytree(path, tmp_path / "dynamic")
    with open(dynamic / "config.json") as f:
        config = json.load(f)
    with open(dynamic / "config.json", "w") as f:
        json.dump({**config, "max_position_embeddings": 16, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
                   "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, f)
    lines = ["Language models are fun.", "日本語も少し。", "Hello 🙂 " * 4]
    status, out, err = chat_in_process(olmo_numpy, str(dynamic), lines, monkeypatch, capsys, "--max-new-tokens", "30")
    assert status == 0 and "dropped" not in err and "not sent" not in err and out.count("\n") >= 3

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xff\xfe\nLanguage models\n")))
    status, out, err = main_in_process(olmo_numpy.main, ["--model", path, "--chat", "--max-new-tokens", "4"], capsys)
    assert status == 0 and out.endswith("\n") and "that line is not UTF-8 text; skipped" in err


# ----------------------------------------------------------------------------------------------------------------
# README


def test_readme_python_example_runs_as_written(cli_checkpoint, capsys):
    """The README's Python example, run as written against a test checkpoint (its path swapped in), so the README
    can't drift from the code: it must print one decoded continuation per prompt."""
    with open(os.path.join(HERE, "README.md")) as f:
        code, = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert "path/to/OLMo-1B-hf" in code
    exec(compile(code.replace("path/to/OLMo-1B-hf", cli_checkpoint[0]), "README.md", "exec"), {})
    printed = eval(capsys.readouterr().out)
    assert isinstance(printed, list) and len(printed) == 2 and all(isinstance(text, str) for text in printed)
