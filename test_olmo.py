"""Tests of the model: olmo.py and its NumPy twin olmo_numpy.py, against transformers on the same weights and
against each other, in the order of the code: config, norm and activations, attention and masks, the model,
generation (the cache, decoding, sampling), loading, reading config.json. A behaviour both twins have is one test
parametrised over `twin`; where the twins' tests differ they sit side by side, olmo.py's first. The tolerances and
their derivation: conftest.py's docstring."""

import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import types
import warnings
from dataclasses import asdict

import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import bench
import cli
import olmo
import olmo_numpy
from conftest import (ACTIVATIONS, ATOL, BF16_TOL, FP32_TOL, GENERATIONS, HERE, LIB, RTOL, SMALL, U, assert_close,
                      configs, dynamic_past_max, fifo_released, float64_model, ids_for, link_dev_zero, load_keys,
                      make_fifo, memory_cap, reference_model, rewrite_weights, run_cli, save, sparse,
                      transformers_source)


# ----------------------------------------------------------------------------------------------------------------
# The two twins, and the helpers their tests share
#
# A test parametrised over `twin` runs one check on olmo.py and on olmo_numpy.py alike. Its inputs are built as
# torch tensors (ids_for, left_pad) and handed to each twin as its own array type by twin.array; what comes back
# is compared as it is (assert_close, assert_same_greedy and np.array_equal take tensors and arrays alike).
#
# olmo_numpy's tolerance is the analysis in conftest.py's docstring. The twin runs float32 arithmetic through
# NumPy's OpenBLAS and its own reductions, so it sums in other orders, and its gelu's erf is an approximation good
# to 1.5e-7 absolute (5 U after the |x| / 2 of gelu, inside the ~8 U of a stage): the same analysis holds. Its
# logits are within FP32_TOL of the float64 ones; against another float32 computation (olmo.py, its own cached
# path) within twice that, NP_TOL. Any real bug (a wrong rotation, a missed clip or bias, a padding leak, a stale
# cache slot) moves logits by 1e-3 or more.


NP_TOL = dict(atol=ATOL, rtol=RTOL)  # see the comment above


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
    tokens, expected, logits = np.asarray(tokens), np.asarray(expected), np.asarray(logits)
    assert tokens.shape == expected.shape
    for b in range(tokens.shape[0]):
        differ = np.flatnonzero(tokens[b, T:] != expected[b, T:])
        if len(differ):
            i = differ[0]
            gap = logits[b, i, tokens[b, T + i]] - logits[b, i, expected[b, T + i]]
            tie = 2 * (atol + rtol * np.abs(logits[b, i]).max())
            assert abs(gap) <= tie, f"row {b} step {i}: token {tokens[b, T + i]}, expected " \
                                    f"{expected[b, T + i]}, whose logit is {gap} lower"


def three_models(cfg, seed):
    """(transformers, olmo.py, olmo_numpy) models with the same weights, through a saved checkpoint."""
    ref = reference_model(cfg, seed)
    with tempfile.TemporaryDirectory() as d:
        save(ref, d)
        return ref, olmo.OlmoForCausalLM.from_pretrained(d), olmo_numpy.OlmoForCausalLM.from_pretrained(d)


def expected_logits(ref, ids):
    with torch.no_grad():
        return ref(ids).logits


def tiny_olmo3():
    """An OLMo 3 with short windows, one full-attention layer in three and YaRN: every path of the cache at once."""
    return dict(model_type="olmo3", vocab_size=60, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=16,
                tie_word_embeddings=False, attention_bias=False, clip_qkv=None, rope_theta=500000.0,
                rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
                pad_token_id=1, bos_token_id=None, eos_token_id=None, rms_norm_eps=1e-6, sliding_window=3,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"])


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


class Torch:
    """olmo.py, as a test run on both twins calls it."""
    array = staticmethod(torch.as_tensor)
    step_logits = staticmethod(step_logits)

    @staticmethod
    def load(path):
        return olmo.OlmoForCausalLM.from_pretrained(str(path))

    @staticmethod
    def rng(seed):
        return torch.Generator().manual_seed(seed)

    @staticmethod
    def sample(logits, *args, rng=None, **kw):
        """logits: a float32 NumPy array -> the sampled tokens, as a NumPy array."""
        return olmo.sample(torch.as_tensor(logits), *args, generator=rng, **kw).numpy()


class NumPy:
    """olmo_numpy.py, as a test run on both twins calls it."""
    array = staticmethod(np.asarray)
    step_logits = staticmethod(np_step_logits)
    rng = staticmethod(np.random.default_rng)

    @staticmethod
    def load(path):
        return olmo_numpy.OlmoForCausalLM.from_pretrained(str(path))

    @staticmethod
    def sample(logits, *args, rng=None, **kw):
        return olmo_numpy.sample(logits, *args, rng=rng, **kw)


TWINS = [pytest.param(Torch, id="olmo"), pytest.param(NumPy, id="olmo_numpy")]
TWIN_MODULES = [olmo, olmo_numpy]  # for the tests that call a twin's module directly (from_pretrained, sample)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    ref = reference_model(SMALL)
    return save(ref, str(tmp_path_factory.mktemp("small"))), ref


# ----------------------------------------------------------------------------------------------------------------
# Config: the defaults


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


# ----------------------------------------------------------------------------------------------------------------
# Norm and activations


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


# ----------------------------------------------------------------------------------------------------------------
# Attention: clip_qkv, and the mask of a left-padded batch


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


@pytest.mark.parametrize("twin", TWINS)
@settings(max_examples=20)
@given(cfg=configs(), lengths=st.lists(st.integers(1, 10), min_size=2, max_size=3), seed=st.integers(0, 99))
def test_left_padded_rows_equal_prompts_alone(twin, cfg, lengths, seed):
    # With dynamic RoPE past the trained length the frequencies depend on the longest row in the batch (as in
    # transformers), so a short row alone would legitimately differ.
    assume(not dynamic_past_max(cfg, max(lengths) + 6))
    # reference_model's weights: with the std-0.02 init, logits are ~0.3 and a padding leak can move them by 2e-3
    with tempfile.TemporaryDirectory() as d:
        model = twin.load(save(reference_model(cfg, seed), d))
    rows = [twin.array(ids_for(cfg, 1, n, seed + i)[0]) for i, n in enumerate(lengths)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batch_logits = model(ids, attention_mask=mask)
        batch_tokens = model.generate(ids, 6, attention_mask=mask)
        for i, row in enumerate(rows):
            n = len(row)
            assert_close(batch_logits[i, -n:], model(row[None])[0])
            alone = model.generate(row[None], 6)
            steps = twin.step_logits(model, row[None], twin.array(torch.ones(1, n, dtype=torch.long)), alone[:, n:])
            assert_same_greedy(alone[:, n:], batch_tokens[i:i + 1, -6:], steps, 0)


# ----------------------------------------------------------------------------------------------------------------
# The model against transformers


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


@pytest.mark.parametrize("twin", TWINS)
def test_token_ids_outside_the_vocabulary_are_refused(twin, small_checkpoint):
    """Ids outside the vocabulary (in NumPy -1 would silently wrap to the last row) are refused naming the id, by
    the forward pass and by generate."""
    model = twin.load(small_checkpoint[0])
    for bad in (-1, SMALL["vocab_size"]):
        ids = twin.array(torch.tensor([[3, bad, 5]]))
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
            model(ids)
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
            model.generate(ids, 2)
    if twin is NumPy:  # torch's embedding refuses non-integer ids itself
        with pytest.raises(ValueError, match="token ids must be integers"):
            model(np.array([[3.0, 4.5]]))


# On a GPU (skipped without CUDA): each generation's 7B shape, and a real checkpoint when OLMO_7B_PATH names one.
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
# Generation: prefill, decode_one_token and the cache


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


@pytest.mark.parametrize("twin", TWINS)
def test_generation_stops_at_eos_like_transformers(twin, tmp_path):
    ref = reference_model(SMALL, 3)  # a fixed config: the point here is the EOS bookkeeping
    model = twin.load(save(ref, tmp_path))
    ids, mask = left_pad([ids_for(SMALL, 1, n, n)[0] for n in (5, 9, 7)])
    T = ids.shape[1]
    free = model.generate(twin.array(ids), 12, attention_mask=twin.array(mask))[:, T:]
    # make EOS a token that row 0 produces at step 2, and another row produces only later (or never)
    eos = int(free[0, 2])
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                            pad_token_id=1)
    tokens = model.generate(twin.array(ids), 12, attention_mask=twin.array(mask), eos_token_id=eos)
    assert np.array_equal(tokens, expected)
    assert (tokens[0, T + 3:] == 1).all()  # row 0 is padded after its EOS
    # a list of EOS ids works too, and generation stops once every row has finished
    all_eos = sorted(set(free[:, 0].tolist()))
    tokens = model.generate(twin.array(ids), 12, attention_mask=twin.array(mask), eos_token_id=all_eos)
    assert tokens.shape[1] == T + 1
    assert np.array_equal(model.generate(twin.array(ids), 0, attention_mask=twin.array(mask)), ids)


@pytest.mark.parametrize("module", TWIN_MODULES, ids=["olmo", "olmo_numpy"])
@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "NaN")])
def test_non_finite_weights_stop_generation_naming_the_step(cli_checkpoint, tmp_path, module, value, kind):
    """A NaN or infinite weight makes NaN logits (inf - inf in the norm): generation stops with one error
    naming the step, greedy or sampling (the unfixed twins printed "Hello!!!!!!" and exited 0, or olmo.py failed
    inside torch.multinomial)."""
    path = transformers_source(cli_checkpoint, tmp_path / "ckpt")
    weights = load_file(path / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    save_file(weights, path / "model.safetensors")
    model = module.OlmoForCausalLM.from_pretrained(str(path))
    ids = (torch.tensor if module is olmo else np.array)([[3, 17, 42]])
    for temperature in (0.0, 0.8):
        with pytest.raises(ValueError, match=f"^the model produced {kind} logits at token 1: are the weights "
                                             "corrupt\\?$"):
            model.generate(ids, 5, temperature=temperature)


@pytest.mark.parametrize("module", TWIN_MODULES, ids=["olmo", "olmo_numpy"])
def test_non_finite_logits_later_name_their_step(cli_checkpoint, module, monkeypatch):
    """The step named is the token whose logits broke (here the third, as +inf); finite logits pass, -inf ones
    (masked tokens) too."""
    real = module.OlmoForCausalLM.decode_one_token
    calls = []

    def decode_then_break(self, *args):
        logits = real(self, *args)
        calls.append(1)
        if len(calls) == 2:  # the logits of the third new token
            logits[0, 7] = math.inf
        logits[0, 8] = -math.inf
        return logits

    monkeypatch.setattr(module.OlmoForCausalLM, "decode_one_token", decode_then_break)
    model = module.OlmoForCausalLM.from_pretrained(cli_checkpoint[0])
    ids = (torch.tensor if module is olmo else np.array)([[3, 17, 42]])
    with pytest.raises(ValueError, match="^the model produced infinite logits at token 3: "):
        model.generate(ids, 6)


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


def test_eager_decode_attends_over_the_filled_slots_only(small_checkpoint, monkeypatch):
    """Run as it is, a decode step attends over the slots filled so far, not the cache's 256: attention reads every
    key it is given, masked or not. (A compiled step attends over the whole cache, a static shape: the compile test
    checks it against this one.)"""
    path, _ = small_checkpoint
    model = olmo.OlmoForCausalLM.from_pretrained(path)
    widths, attend = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        widths.append(k.shape[2])  # (B, KV, S, D): S keys
        return attend(q, k, v, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    model.generate(torch.tensor([[2, 3, 4, 5, 6]]), 4)  # a prefill of 5 slots, then 3 steps (the 4th token isn't fed)
    assert len(model.slots) == 256
    assert widths == [S for S in (5, 6, 7, 8) for _ in range(SMALL["num_hidden_layers"])]


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


def test_a_bfloat16_cache_is_float32_and_kept_between_calls(small_checkpoint, monkeypatch):
    """On the CPU a bfloat16 model's KV cache is float32 (KVCache.dtype_for): the next call still finds it its own,
    keeps it and prefills only what is new."""
    model = olmo.OlmoForCausalLM.from_pretrained(small_checkpoint[0], dtype=torch.bfloat16)
    turn = model.generate(ids_for(SMALL, 1, 5, 0), 4)
    cache = model.model.layers[0].self_attn.kv_cache
    assert cache.k_cache.dtype == torch.float32
    starts = []
    prefill = model.prefill
    monkeypatch.setattr(model, "prefill", lambda ids, mask, start=0: starts.append(start) or prefill(ids, mask, start))
    model.generate(torch.cat([turn, ids_for(SMALL, 1, 3, 1)], 1), 2)
    assert starts == [8] and model.model.layers[0].self_attn.kv_cache is cache  # 5 + 4 - 1: the last isn't cached


@pytest.mark.parametrize("twin", TWINS)
def test_a_cache_that_cannot_grow_is_named_and_dropped(twin, tmp_path, monkeypatch):
    """Out of memory (or Ctrl-C) halfway through doubling the KV cache, one layer grown and the next not: a
    MemoryError naming the size, and no half-grown cache left behind -- the next call starts afresh and gives a
    fresh model's tokens."""
    path = save(reference_model(SMALL, 3), tmp_path)
    model, fresh = twin.load(path), twin.load(path)
    ids = twin.array(ids_for(SMALL, 1, 250, 0))
    grown = []
    if twin is Torch:
        class FailingKVCache(olmo.KVCache):
            def __init__(self, batch_size, length, *args):
                grown.append(length)
                if grown.count(512) == 2:  # the second layer's new cache
                    raise RuntimeError("CPU out of memory (simulated)")
                super().__init__(batch_size, length, *args)
        monkeypatch.setattr(olmo, "KVCache", FailingKVCache)
    else:
        pad = np.pad

        def failing_pad(array, widths, **kw):
            if array.ndim == 4 and array.shape[2] + widths[2][1] == 512:  # a (B, KV, S, D) cache doubling
                grown.append(512)
                if grown.count(512) == 2:
                    raise MemoryError
            return pad(array, widths, **kw)
        monkeypatch.setattr(olmo_numpy.np, "pad", failing_pad)
    with pytest.raises(MemoryError, match="^out of memory growing the KV cache to 512 tokens$"):
        model.generate(ids, 10)  # 250 + 10 tokens: the cache doubles from 256 to 512 slots mid-generation
    monkeypatch.undo()
    assert grown.count(512) == 2
    assert np.array_equal(model.generate(ids, 10), fresh.generate(ids, 10))


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("cfg", [tiny_olmo3(), {**SMALL, "max_position_embeddings": 12,
                                                "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}])
def test_a_shared_prefix_is_reused_exactly(twin, cfg, tmp_path, monkeypatch):
    """A one-row generate after another prefills only what differs from the cached tokens (a chat's new turn), and
    gives exactly what a fresh model gives; dynamic RoPE past the trained length reuses nothing (its frequencies
    depend on the call's length)."""
    path = save(reference_model(cfg, 2), tmp_path)
    model, fresh = twin.load(path), twin.load(path)
    starts = []
    prefill = model.prefill
    monkeypatch.setattr(model, "prefill", lambda ids, mask, start=0: starts.append(start) or prefill(ids, mask, start))
    turn = model.generate(twin.array(ids_for(cfg, 1, 5, 0)), 4)
    for more in (3, 1):  # the conversation so far, the reply included, plus a new message
        ids = twin.array(torch.cat([torch.as_tensor(turn), ids_for(cfg, 1, more, more)], 1))
        turn = model.generate(ids, 4)
        assert np.array_equal(turn, fresh.generate(ids, 4))
    dynamic_past = dynamic_past_max(cfg, turn.shape[1] - 4)
    assert starts == [0, 8, 0 if dynamic_past else 15]  # 5 + 4 - 1, 12 + 4 - 1: the last sampled token isn't cached
    edited = torch.as_tensor(turn).clone()
    edited[0, 2] = (edited[0, 2] + 1) % cfg["vocab_size"]  # an edit early in the history
    different = twin.array(edited)
    assert np.array_equal(model.generate(different, 3), fresh.generate(different, 3))
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
    compiled = olmo.Backend().load(args, str(tmp_path))
    eager = olmo.OlmoForCausalLM.from_pretrained(str(tmp_path))
    assert compiled.lm_head.weight.dtype == eager.lm_head.weight.dtype == getattr(torch, dtype)  # the checkpoint's
    ids = torch.randint(0, 1024, (4, 8), generator=torch.Generator().manual_seed(0))
    tokens, mask = eager.generate(ids, 24), torch.ones_like(ids)
    with torch.no_grad():
        for model in (compiled, eager):
            model.setup_cache(mask, 32)
            model.prefill(ids, mask)
        for i in range(8, 31):
            token, slot, position = tokens[:, i:i + 1], compiled.slots[i:i + 1], torch.full((4, 1), i)
            ours = compiled.decode_one_token(token, slot, position).float()
            # the compiled step's own computation, run eagerly: attention over the whole cache, as compiled (eager's
            # decode_one_token attends over the filled slots only, which sums in another order: test_eager_decode_
            # attends_over_the_filled_slots_only; in bfloat16 that moves roundings, hence logits, by more)
            theirs = eager.lm_head(eager.model(token, position, eager.key_valid, slot)[:, -1]).float()
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


# ----------------------------------------------------------------------------------------------------------------
# Sampling


@pytest.mark.parametrize("twin", TWINS)
def test_sample_greedy_top_k_top_p(twin):
    logits = np.array([[1.0, 3.0, 3.0, 0.0, -1.0], [0.0, 0.0, 5.0, 0.0, 0.0]], dtype=np.float32)
    assert twin.sample(logits).tolist() == [1, 2]  # temperature 0: argmax (first of a tie)
    rng = twin.rng(0)
    draws = np.stack([twin.sample(logits, 1.0, top_k=2, rng=rng) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 2}  # the two tied top logits, nothing else
    # top_k=1 with a tie keeps both tied tokens (the threshold is the k-th value)
    draws = np.stack([twin.sample(logits, 1.0, top_k=1, rng=rng) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 2}
    assert set(draws[:, 1].tolist()) == {2}
    # probabilities of row 0: [0.061, 0.454, 0.454, 0.023, 0.008]; top_p=0.5 needs both 0.454s (0.908), and
    # top_p=0.95 adds the 0.061 (0.969) but not the 0.023
    draws = np.stack([twin.sample(logits, 1.0, top_p=0.5, rng=rng) for _ in range(300)])
    assert set(draws[:, 0].tolist()) == {1, 2}
    draws = np.stack([twin.sample(logits, 1.0, top_p=0.95, rng=rng) for _ in range(600)])
    assert set(draws[:, 0].tolist()) == {0, 1, 2}
    # a tiny top_p still keeps the most likely token
    assert twin.sample(logits[1:], 1.0, top_p=1e-6, rng=rng).tolist() == [2]
    a = [twin.sample(logits, 0.8, rng=twin.rng(7)).tolist() for _ in range(2)]
    assert a[0] == a[1]  # a seeded generator is reproducible


@pytest.mark.parametrize("twin", TWINS)
def test_top_k_zero_is_off_and_tiny_temperatures_are_greedy(twin):
    logits = np.array([[1.0, 3.0, 2.9, 0.0, -1.0]], dtype=np.float32)
    rng = twin.rng(0)
    draws = {int(twin.sample(logits, 5.0, top_k=0, rng=rng)[0]) for _ in range(400)}
    assert draws == {0, 1, 2, 3, 4}  # top_k=0 keeps every token, as in transformers (at T=5 each has p > 0.08)
    for t in (1e-3, 1e-40, 1e-320, 5e-324):  # 1/t overflows float32 (and float64 for the last two)
        assert [int(twin.sample(logits, t, top_k=k, top_p=p, rng=rng)[0]) for k in (None, 2) for p in (None, 0.5)
                ] == [1] * 4


@pytest.mark.parametrize("module", TWIN_MODULES, ids=["olmo", "olmo_numpy"])
@pytest.mark.parametrize("top_p", [1e-46, 1e-300, 5e-324])
@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_sample_keeps_the_most_likely_token_for_every_accepted_top_p(module, top_p, top_k):
    """top_p 1e-46 (or generation_config's 1e-300) is accepted, and must leave the most likely token: in
    float32 it rounded to 0, dropped every token, and olmo.py failed with a RuntimeError."""
    array = torch.tensor if module is olmo else np.array
    logits = array([[0.1, 2.0, -1.0, 1.9], [3.0, -2.0, 0.0, 2.5]], dtype=torch.float32 if module is olmo else None)
    if module is olmo_numpy:
        logits = logits.astype(np.float32)
    for temperature in (0.7, 1e-20, 5.0):
        tokens = module.sample(logits, temperature, top_k=top_k, top_p=top_p)
        assert [int(t) for t in tokens] == [1, 0]


def test_sampling_with_a_seed_is_reproducible():
    model = olmo.OlmoForCausalLM(olmo.OlmoConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2, eos_token_id=None))
    ids = torch.tensor([[3, 4, 5]])
    a = model.generate(ids, 8, temperature=0.9, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = model.generate(ids, 8, temperature=0.9, top_k=20, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (1, 11)


# ----------------------------------------------------------------------------------------------------------------
# Loading: checkpoint layouts and dtypes


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
    # the ~30 stages (conftest.py's docstring) adds ~2^-8 relative to the O(1) activations: ~sqrt(30) 2^-8 = 0.02 in
    # quadrature, typically, with tails several times that; float32's own error is 1000 times smaller. Allowed:
    # 32 x 2^-8 = 0.125 absolute plus 8 x 2^-8 = 0.03 relative (over 30 seeds, half of that at most), against the
    # O(1) change of a weight that isn't loaded.
    model = olmo.OlmoForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert_close(model(ids).float(), expected_logits(ref, ids), **BF16_TOL)


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


def test_tied_checkpoint_with_a_stored_head_loads(tmp_path):
    cfg = {**SMALL, "tie_word_embeddings": True}
    ref = reference_model(cfg)
    path = save(ref, str(tmp_path / "tied"))
    edited = rewrite_weights(path, str(tmp_path / "with_head"),
                             lambda sd: {**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()})
    ids = ids_for(cfg, 1, 7, 0)
    assert_close(olmo.OlmoForCausalLM.from_pretrained(edited)(ids), expected_logits(ref, ids))


def test_memory_mapped_load_equals_copying_load(small_checkpoint):
    from safetensors.torch import load
    path = small_checkpoint[0]
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        copied = load(f.read())  # every byte read into memory, no mapping
    loaded = olmo.OlmoForCausalLM.from_pretrained(path).state_dict()
    assert set(loaded) == set(copied)
    for name, tensor in copied.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


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


@pytest.mark.parametrize("listing, weights", [
    (["config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json"], "*.safetensors"),
    (["config.json", "pytorch_model.bin", "tokenizer.json"], "*.bin")])
def test_hub_ids_fetch_one_weight_format_at_a_revision(small_checkpoint, monkeypatch, listing, weights):
    """A hub id goes to huggingface_hub through cli.fetch_checkpoint (stubbed: no network here): the repo's files
    are listed first and only one weight format is fetched -- safetensors when there are any, as transformers
    prefers -- at the asked revision (OLMo's intermediate checkpoints are revisions); without huggingface_hub the
    error says how to get it."""
    import huggingface_hub
    path, ref = small_checkpoint
    asked = []
    info = types.SimpleNamespace(siblings=[types.SimpleNamespace(rfilename=name) for name in listing])
    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo, revision=None: info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: asked.append((repo, kw)) or path)
    ids = ids_for(SMALL, 1, 5, 0)
    model = olmo.OlmoForCausalLM.from_pretrained(cli.fetch_checkpoint("allenai/OLMo-1B-hf", "step1000-tokens4B"))
    assert_close(model(ids), expected_logits(ref, ids))
    (repo, kw), = asked
    assert repo == "allenai/OLMo-1B-hf" and kw["revision"] == "step1000-tokens4B"
    assert weights in kw["allow_patterns"] and {"*.safetensors", "*.bin"} - {weights} - set(kw["allow_patterns"])

    def offline(repo, revision=None):  # what model_info does with HF_HUB_OFFLINE set
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline mode is enabled")
    monkeypatch.setattr(huggingface_hub, "model_info", offline)
    asked.clear()
    model = olmo.OlmoForCausalLM.from_pretrained(cli.fetch_checkpoint("allenai/OLMo-1B-hf"))
    assert_close(model(ids), expected_logits(ref, ids))
    assert asked[0][1]["local_files_only"]  # whatever the cache holds, without asking the network again

    import httpx2  # huggingface_hub's HTTP client: its errors carry the response

    def unknown(repo, revision=None, **kw):
        response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/x"))
        raise huggingface_hub.errors.RevisionNotFoundError("404 Client Error\n(many lines)", response=response)
    monkeypatch.setattr(huggingface_hub, "model_info", unknown)
    with pytest.raises(ValueError, match="allenai/OLMo-1B-hf has no revision 'step0' on the hub") as error:
        cli.fetch_checkpoint("allenai/OLMo-1B-hf", "step0")
    assert "\n" not in str(error.value)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(ValueError, match="pip install huggingface_hub"):
        cli.fetch_checkpoint("allenai/OLMo-1B-hf")


def test_hub_failures_in_words(cli_checkpoint, monkeypatch):
    """A hub id that can't be fetched says why in one line -- no such repository, no such revision, a
    login needed, no network -- after one request, not ~26 s of retries (huggingface_hub stubbed: no network
    here; its own error classes)."""
    import httpx2
    import huggingface_hub
    from huggingface_hub import errors

    response = httpx2.Response(404, request=httpx2.Request("GET", "https://huggingface.co/api/models/a/b"))
    cases = {
        errors.RepositoryNotFoundError("404\n(many lines)", response=response): "the hub has no repository a/b",
        errors.GatedRepoError("403\n(many lines)", response=response): "a/b is gated: accept its terms",
        errors.RevisionNotFoundError("404\n(many lines)", response=response): "a/b has no revision 'step0' on",
        httpx2.ConnectError("[Errno -2] Name or service not known"): "cannot fetch a/b at revision 'step0': the hub "
        "can't be reached (ConnectError: [Errno -2] Name or service not known) and the local cache doesn't have it",
        errors.OfflineModeIsEnabled("offline"): "the hub can't be reached (HF_HUB_OFFLINE is set)",
    }
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **kw: (_ for _ in ()).throw(
        errors.LocalEntryNotFoundError("not in the cache")))
    for error, message in cases.items():
        def model_info(repo, revision=None):
            raise error
        monkeypatch.setattr(huggingface_hub, "model_info", model_info)
        with pytest.raises(ValueError) as info:
            cli.fetch_checkpoint("a/b", "step0")
        assert message in str(info.value) and "\n" not in str(info.value), info.value


@pytest.mark.parametrize("module", [olmo, olmo_numpy])
def test_missing_and_non_checkpoint_paths(module, tmp_path, monkeypatch):
    """from_pretrained reads directories only (a hub id is the command line's: cli.fetch_checkpoint); a missing
    one, a hub id, a directory without config.json or without weights are named in one line."""
    monkeypatch.chdir(tmp_path)
    for path in (str(tmp_path / "nope"), "allenai/OLMo-1B-hf"):
        with pytest.raises(ValueError, match=f"cannot read {re.escape(path)}/config.json: No such file"):
            module.OlmoForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="config.json"):
        module.OlmoForCausalLM.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no model.safetensors"):
        module.OlmoForCausalLM.from_pretrained(str(tmp_path))


def test_numpy_refuses_bin_checkpoints_naming_convert(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pytorch_model.bin .* `python convert.py "):
        olmo_numpy.OlmoForCausalLM.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_head_layout_by_dtype(small_checkpoint, dtype):
    """On an x86 CPU the float32 and bfloat16 heads are packed with pack=True (PackedLinear: a NumPy array in
    float32, oneDNN's layout in bfloat16), else stored by rows (nn.Linear, as the checkpoint has them), and the int8
    one as its kernel takes it; the values are the checkpoint's in every layout."""
    path, ref = small_checkpoint
    expected = ref.lm_head.weight.detach().to(dtype)
    head = olmo.OlmoForCausalLM.from_pretrained(path, dtype=dtype).lm_head.weight
    assert head.is_contiguous() and torch.equal(head, expected)
    torch.set_num_threads(2)  # (conftest's torch_threads fixture restores the count after the test)
    head = olmo.OlmoForCausalLM.from_pretrained(path, dtype=dtype, pack=True).lm_head
    assert isinstance(head, olmo.PackedLinear) == olmo.PackedLinear.packs(dtype)  # else by rows, as above
    # float32's products are NumPy's, on its own threads: torch's are then 1, else they'd fight for the cores
    numpy_products = dtype == torch.float32 and olmo.PackedLinear.packs(dtype)
    assert torch.get_num_threads() == (1 if numpy_products else 2)
    assert head.weight.is_mkldnn != numpy_products  # float32: a plain array, not oneDNN's layout
    assert torch.equal(head.weight.to_dense() if head.weight.is_mkldnn else head.weight, expected)
    assert olmo.OlmoForCausalLM.from_pretrained(path, quantize="int8").lm_head.weight.is_contiguous()


def assert_packing_changes_nothing(path, ids, prompt, new):
    """A float32 or bfloat16 checkpoint on the CPU: from_pretrained's model with pack=True (every linear layer a
    PackedLinear: NumPy's BLAS in float32, oneDNN's layout in bfloat16) against the same checkpoint loaded unpacked
    (nn.Linear, F.linear).
    ids (B, T) without padding: the full forward over ids, the cached path (prefill of ids[:, :prompt], then decode
    steps fed the rest of ids), and `new` greedy tokens after ids[:, :prompt].

    Each product: both take the same inputs and weight and sum in float32 (the bias too); bfloat16 rounds the sum to
    bfloat16 (F.linear multiplies with oneDNN too, reordering the weight per call; on the AMD EPYC this was written
    on, those results are bit-identical; float32's F.linear is MKL's, which sums in another order than OpenBLAS).
    Two summation orders differ by at most 2 n U sum_i |x_i w_i| (n = in_features + 1 terms, the bias's included,
    U = 2^-24, each order within n U of the exact sum), and rounding two numbers that far apart to bfloat16 adds at
    most one bfloat16 spacing of the larger, <= 2^-7 of it: that bound is checked on every layer. Through the model
    such a difference is one more rounding in some of the products: float32's is a stage of ATOL / RTOL's analysis
    (two float32 computations of the same logits, conftest.py), bfloat16's of BF16_TOL's (test_sharded_bin_and_
    dtype_loading): the logits agree within those, and greedy tokens too but past a near tie within them. A weight
    packed wrongly (transposed, another layer's) moves a product by O(1)."""
    packed = olmo.OlmoForCausalLM.from_pretrained(path, pack=True)
    plain = olmo.OlmoForCausalLM.from_pretrained(path)
    dtype = plain.lm_head.weight.dtype
    tol = BF16_TOL if dtype == torch.bfloat16 else dict(atol=ATOL, rtol=RTOL)
    linears = {name: m for name, m in plain.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {name for name, m in packed.named_modules() if isinstance(m, olmo.PackedLinear)} == linears.keys()
    assert not any(isinstance(m, torch.nn.Linear) for m in packed.modules())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, linear in linears.items():
            x = torch.randn(2, 3, linear.in_features, generator=g).to(dtype)
            ours, theirs = packed.get_submodule(name)(x).float(), linear(x).float()
            terms = x.float().abs() @ linear.weight.float().abs().T
            terms = terms if linear.bias is None else terms + linear.bias.float().abs()
            rounding = 2.0 ** -7 * torch.maximum(ours.abs(), theirs.abs()) if dtype == torch.bfloat16 else 0
            bound = 2 * (linear.in_features + 1) * U * terms + rounding
            assert ((ours - theirs).abs() <= bound).all(), f"{name}: {(ours - theirs).abs().max()}"
        # a tied head: its packed copy is the head's; the embedding stays a plain table, for the lookup
        assert torch.equal(packed.model.embed_tokens.weight, plain.model.embed_tokens.weight)
        assert_close(packed(ids).float(), plain(ids).float(), **tol)
        mask = torch.ones_like(ids[:, :prompt])
        assert_close(step_logits(packed, ids[:, :prompt], mask, ids[:, prompt:]).float(),
                     step_logits(plain, ids[:, :prompt], mask, ids[:, prompt:]).float(), **tol)
        tokens = packed.generate(ids[:, :prompt], new)
        steps = step_logits(packed, ids[:, :prompt], mask, tokens[:, prompt:]).float()
        assert_same_greedy(tokens, plain.generate(ids[:, :prompt], new), steps, prompt, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_model_refuses_backward(tmp_path, dtype):
    """A packed model is for inference: none of its parameters asks for a gradient, so a loss's backward() fails
    loudly (torch's error) instead of returning the wrong gradients oneDNN's product gives (it has no autograd
    kernel: torch only warns) or none through NumPy's; and a forward outside no_grad warns of nothing."""
    if not olmo.PackedLinear.packs(dtype):
        pytest.skip(f"nothing is packed for {dtype} on this CPU")
    path = save(reference_model(dict(SMALL, model_type="olmo2"), seed=0).to(dtype), str(tmp_path))
    model = olmo.OlmoForCausalLM.from_pretrained(path, pack=True)
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.tensor([[3, 4, 5, 6]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "autograd kernel was not registered" warning would fail here
        logits, loss = model(ids, labels=ids)
    with pytest.raises(RuntimeError, match="does not require grad"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_keeps_one_copy_of_the_weights(tmp_path, dtype):
    """Packing at load replaces each memory-mapped weight by its copy in oneDNN's layout (bfloat16) and unmaps it,
    or leaves it mapped for NumPy to read (float32): the peak resident memory of from_pretrained stays within 1.15x
    the packed model's bytes (1.08x here in bfloat16; with the checkpoint kept mapped while packing, 2x). Measured
    in a fresh process, from its resident set before loading, as test_quantize.py's test_int8_load_peak_memory;
    then the model makes a token."""
    if not olmo.PackedLinear.packs(dtype):
        pytest.skip(f"nothing is packed for {dtype} on this CPU")
    cfg = dict(SMALL, model_type="olmo2", hidden_size=512, intermediate_size=4096, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=8, vocab_size=4096)  # mostly linear weights
    path = save(reference_model(cfg, seed=1).to(dtype), str(tmp_path))
    code = f"""
import sys
sys.path.insert(0, {HERE!r})
import torch, bench, olmo
torch.ones(1) @ torch.ones(1)  # the libraries' own buffers, before the baseline
bench.reset_peak_rss()
base = bench.peak_rss()
model = olmo.OlmoForCausalLM.from_pretrained({path!r}, pack=True)
print(bench.peak_rss() - base)
assert isinstance(model.lm_head, olmo.PackedLinear) and model.generate(torch.tensor([[2, 3]]), 1).shape == (1, 3)
print(sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())))
"""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # see test_int8_load_peak_memory
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    peak, packed_bytes = map(int, proc.stdout.split())
    assert peak <= 1.15 * packed_bytes, f"peak {peak / 1e6:.0f} MB for a model of {packed_bytes / 1e6:.0f} MB"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=10)
@given(cfg=configs(), seed=st.integers(0, 99))
@example(cfg=NP_DYNAMIC, seed=0)  # a tied head, biases, widths that aren't multiples of 16
def test_packed_model_equals_unpacked(dtype, cfg, seed):
    """OLMo 1, 2 and 3 in float32 and bfloat16 on the CPU: packing the linear layers (PackedLinear: NumPy's BLAS in
    float32, oneDNN in bfloat16) changes no product beyond a float32 summation order
    (assert_packing_changes_nothing)."""
    if not olmo.PackedLinear.packs(dtype):
        pytest.skip(f"this CPU's oneDNN is not used for {dtype}")
    with tempfile.TemporaryDirectory() as d:
        path = save(reference_model(cfg, seed).to(dtype), d)
        assert_packing_changes_nothing(path, ids_for(cfg, 2, 10, seed), prompt=4, new=8)


# ----------------------------------------------------------------------------------------------------------------
# Loading: files that are wrong


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


@pytest.mark.parametrize("twin", TWINS)
@pytest.mark.parametrize("edit, message", WRONG_TENSORS)
def test_wrong_tensors_are_named(small_checkpoint, tmp_path, twin, edit, message):
    path = rewrite_weights(small_checkpoint[0], str(tmp_path / "bad"), edit)
    with pytest.raises(ValueError, match=message) as ours:
        twin.load(path)
    if twin is NumPy and "has dtype" not in message:  # in olmo.py's words (an integer tensor: the twin's reader
        with pytest.raises(ValueError) as expected:     # refuses it first, by its safetensors name)
            olmo.OlmoForCausalLM.from_pretrained(path)
        assert str(ours.value) == str(expected.value)


def test_sharded_index_must_name_files(small_checkpoint, tmp_path):
    path, ref = small_checkpoint
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    for weight_map in ({"lm_head.weight": 3}, {"lm_head.weight": "../model.safetensors"}, ["x"]):
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(ValueError, match="model.safetensors.index.json"):
            olmo.OlmoForCausalLM.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("module", TWIN_MODULES, ids=["olmo", "olmo_numpy"])
@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "model.safetensors.index.json"])
@pytest.mark.parametrize("make, message", [(make_fifo, "is not a regular file"),
                                           (link_dev_zero, "is not a regular file"), (sparse, "is 6,000 MB")])
def test_twins_refuse_special_checkpoint_files(cli_checkpoint, tmp_path, module, name, make, message):
    """config.json, model.safetensors or an index as a FIFO (waited on forever, Ctrl-C ignored), /dev/zero
    linked in (a MemoryError traceback) or a sparse 6 GB JSON file: one ValueError naming the file, at once."""
    if make is sparse and name == "model.safetensors":
        pytest.skip("weights are large: no size limit")
    path = transformers_source(cli_checkpoint, tmp_path / "ckpt")
    if name.endswith(".index.json"):  # a sharded checkpoint: the index names the one shard
        weights = load_file(path / "model.safetensors")
        (path / name).write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in weights}}))
    make(path / name)
    t0 = time.monotonic()
    with fifo_released(path / name), memory_cap(), pytest.raises(ValueError) as info:
        module.OlmoForCausalLM.from_pretrained(str(path))
    assert str(info.value).startswith(f"{path / name} {message}"), info.value
    assert time.monotonic() - t0 < 8


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


# ----------------------------------------------------------------------------------------------------------------
# Reading config.json: both styles, the checks, the dtype


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
    ({"hidden_size": 36, "num_attention_heads": 4}, "head_dim must be an even number >= 2 .*, got 9"),
    ({"head_dim": 0}, "head_dim"),
    ({"head_dim": 5}, "head_dim"),
    ({"head_dim": 64.0}, "head_dim"),
    ({"torch_dtype": "int8"}, "dtype"),
])
def test_bad_configs_are_rejected_naming_the_field(change, field, tmp_path):
    d = {**VALID, **change}
    with pytest.raises(ValueError, match=field):
        olmo.OlmoConfig.from_dict(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "config.json"))):  # errors name the file
        olmo.OlmoConfig.from_json(tmp_path / "config.json")


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


ROPE_BASE = dict(model_type="olmo", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64, eos_token_id=None, pad_token_id=1)


ROPE_CASES = {  # config.json's RoPE keys -> None when transformers 5's reading is well defined, else what is refused
    "a scaling added by an old guide": (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                             rope_scaling={"type": "linear", "factor": 2}), None),
    "and a top-level rope_theta": (dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                                        rope_scaling={"type": "dynamic", "factor": 2}, rope_theta=500000.0), None),
    "the same scaling twice": (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                                    rope_scaling={"type": "linear", "factor": 2.0}), None),
    "rope_type in rope_scaling": (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                                       rope_scaling={"rope_type": "dynamic", "factor": 2.0}), None),
    "a base only at the top": (dict(rope_parameters={"rope_type": "default"}, rope_theta=500000.0), None),
    "a null scaling": (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                            rope_scaling=None), None),
    "a base rope_scaling drops": (dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                                       rope_scaling={"type": "linear", "factor": 2}),
                                  "rope_parameters .* rope_scaling"),
    "two scalings": (dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
                          rope_scaling={"type": "linear", "factor": 2}), "rope_parameters .* rope_scaling"),
    "two bases": (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rope_theta=500000.0),
                  "rope_theta 500000.0 and rope_parameters' rope_theta 10000.0 disagree"),
    "OLMo 3 per layer type": (dict(model_type="olmo3", num_hidden_layers=4, rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 500000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 500000.0}},
        rope_scaling={"type": "linear", "factor": 2}), "rope_parameters .* rope_scaling"),
}


@pytest.mark.parametrize("module", TWIN_MODULES, ids=["olmo", "olmo_numpy"])
@pytest.mark.parametrize("case", ROPE_CASES)
def test_rope_parameters_beside_rope_theta_and_rope_scaling_read_as_transformers(module, case, tmp_path):
    """A config.json with both rope_parameters and 4.x's rope_theta / rope_scaling is read as transformers 5
    reads it where that is well defined (the unfixed twins ignored the old keys and ran unscaled RoPE); where
    transformers would silently drop a setting, or has no reading, it is refused naming both keys."""
    changes, refused = ROPE_CASES[case]
    (tmp_path / "config.json").write_text(json.dumps({**ROPE_BASE, **changes}))
    if refused:
        with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'config.json'))}: {refused}"):
            module.OlmoConfig.from_json(str(tmp_path / "config.json"))
        return
    ours = module.OlmoConfig.from_json(str(tmp_path / "config.json")).rope_parameters["full_attention"]
    theirs = transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters
    assert {k: v for k, v in ours.items() if v is not None} == {k: v for k, v in theirs.items() if k != "type"}


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
# What importing each twin pulls in


def test_import_olmo_needs_only_torch():
    code = ("import sys, olmo; extra = {'transformers', 'tokenizers', 'safetensors', 'huggingface_hub'}"
            " & set(sys.modules); assert not extra, extra")
    assert run_cli(code=code).returncode == 0


def test_numpy_never_imports_torch(cli_checkpoint):
    path, _ = cli_checkpoint
    result = run_cli(code="import olmo_numpy, sys; assert 'torch' not in sys.modules, 'torch imported'; "
                          f"olmo_numpy.main(['--model', {path!r}, '--prompt', 'hi', '--max-new-tokens', '2']); "
                          "assert 'torch' not in sys.modules, 'torch imported by the CLI path'")
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------------------------------------------
# The README's Python example


def test_readme_python_example_runs_as_written(cli_checkpoint, capsys):
    """The README's Python example, run as written against a test checkpoint (its path swapped in), so the README
    can't drift from the code: it must print one decoded continuation per prompt."""
    with open(os.path.join(HERE, "README.md")) as f:
        code, = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    assert "path/to/OLMo-1B-hf" in code
    exec(compile(code.replace("path/to/OLMo-1B-hf", cli_checkpoint[0]), "README.md", "exec"), {})
    printed = eval(capsys.readouterr().out)
    assert isinstance(printed, list) and len(printed) == 2 and all(isinstance(text, str) for text in printed)


def test_readme_example_runs_from_elsewhere_as_the_readme_says(cli_checkpoint, tmp_path):
    """The README's Python example, run as a script in another directory beside the clone -- whose
    directory olmo/ is imported in place of olmo.py unless told otherwise (an AttributeError before) -- finds
    olmo.py the way the README says."""
    code, = re.findall(r"```python\n(.*?)```", open(os.path.join(HERE, "README.md")).read(), re.S)
    assert 'sys.path.insert(0, "path/to/olmo")' in code, "the README says how `import olmo` finds olmo.py"
    clone = tmp_path / "olmo"  # what `git clone` names it
    clone.mkdir()
    for name in ("olmo.py", "cli.py"):
        (clone / name).write_bytes(open(os.path.join(HERE, name), "rb").read())
    script = code.replace("path/to/OLMo-1B-hf", cli_checkpoint[0]).replace("path/to/olmo", str(clone))
    (tmp_path / "example.py").write_text(script)
    proc = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-800:]
    printed = eval(proc.stdout)
    assert isinstance(printed, list) and len(printed) == 2
