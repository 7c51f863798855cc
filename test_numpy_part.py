"""Tests of olmo_numpy.py, the NumPy twin: against olmo.py and transformers on the same random checkpoints, and its
own .safetensors reader against the safetensors package.

Tolerance (fp32, CPU): logits agree with olmo.py's and transformers' to atol = rtol = 2e-5 (logits of order 1).
The twin runs the same float32 arithmetic but through NumPy's OpenBLAS and its own reductions, so sums are taken
in another order (and gelu's erf is an approximation good to 1.5e-7): observed differences are a few 1e-6. Any
real bug (a wrong rotation, a missed clip or bias, a padding leak, a stale cache slot) moves logits by 1e-3 or more.
"""

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import olmo
import olmo_numpy

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

_NP_HERE = os.path.dirname(os.path.abspath(__file__))
_NP_TOL = 2e-5  # see the module docstring
_NP_SETTINGS = dict(derandomize=True, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_NP_ACTIVATIONS = ["silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"]


# ----------------------------------------------------------------------------------------------------------------
# Random small checkpoints, loaded three ways


@st.composite
def _np_configs(draw):
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
        hidden_act=draw(st.sampled_from(_NP_ACTIVATIONS)),
        max_position_embeddings=draw(st.sampled_from([8, 16, 64])),
        tie_word_embeddings=draw(st.booleans()),
        attention_bias=draw(st.booleans()),
        clip_qkv=draw(st.none() | st.floats(0.3, 2.0)),
        rope_theta=draw(st.sampled_from([10000.0, 500.0])),
        rope_scaling=scaling and {"rope_type": scaling, "factor": draw(st.floats(1.5, 4.0))},
        pad_token_id=1, bos_token_id=None, eos_token_id=None,
    )


# Explicit examples, so every run covers the rarest combination whatever hypothesis draws: dynamic RoPE past the
# trained length, with GQA, bias, clip_qkv, a tied head and exact gelu.
_NP_DYNAMIC = dict(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, hidden_act="gelu", max_position_embeddings=8, tie_word_embeddings=True,
                   attention_bias=True, clip_qkv=0.8, rope_theta=500.0,
                   rope_scaling={"rope_type": "dynamic", "factor": 2.5}, pad_token_id=1, bos_token_id=None,
                   eos_token_id=None)
_NP_SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, hidden_act="silu", max_position_embeddings=64, tie_word_embeddings=False,
                 attention_bias=False, clip_qkv=None, rope_theta=10000.0, rope_scaling=None, pad_token_id=1,
                 bos_token_id=None, eos_token_id=None)


def _np_reference(cfg, seed=0):
    """A transformers OlmoForCausalLM with weights large enough that activations matter: unit-variance
    projections (so clip_qkv really clips) and std-0.3 biases, instead of the std-0.02 init whose logits are ~0."""
    cfg = dict(cfg)
    scaling = cfg.pop("rope_scaling")
    rope = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    if scaling:
        rope.update(scaling)
    model = transformers.OlmoForCausalLM(transformers.OlmoConfig(**cfg, rope_parameters=rope))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else p.shape[-1] ** -0.5))
    return model.eval()


def _np_three_models(cfg, seed):
    """(transformers, olmo.py, olmo_numpy) models with the same weights, through a saved checkpoint."""
    ref = _np_reference(cfg, seed)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        return ref, olmo.OlmoForCausalLM.from_pretrained(d), olmo_numpy.OlmoForCausalLM.from_pretrained(d)


def _np_ids(cfg, batch, length, seed):
    return np.random.default_rng(seed).integers(0, cfg["vocab_size"], (batch, length))


def _np_left_pad(rows, pad=1):
    """Token rows of different lengths -> (ids, attention_mask), padded on the left as generate expects."""
    T = max(len(r) for r in rows)
    ids, mask = np.full((len(rows), T), pad), np.zeros((len(rows), T), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    return ids, mask


def _np_assert_close(actual, expected, tol=_NP_TOL):
    expected = expected.numpy() if isinstance(expected, torch.Tensor) else expected
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=tol, rtol=tol)


def _np_step_logits(model, ids, mask, new):
    """Per-step logits (B, n, vocab) of olmo_numpy's cached path, generate's own prefill / decode_one_token
    calls, fed the tokens new (B, n): step i predicts new[:, i]."""
    T = ids.shape[1]
    model.setup_cache(mask, T + new.shape[1])
    steps = [model.prefill(ids, mask)]
    for i in range(new.shape[1] - 1):
        steps.append(model.decode_one_token(new[:, i:i + 1], T + i, mask.sum(-1, keepdims=True) + i))
    return np.stack(steps, 1)


def _np_torch_step_logits(model, ids, mask, new):
    """The same through olmo.py's prefill / decode_one_token."""
    ids, mask, new = torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(new)
    T = ids.shape[1]
    model.setup_cache(mask, T + new.shape[1])
    with torch.no_grad():
        steps = [model.prefill(ids, mask)]
        for i in range(new.shape[1] - 1):
            position = mask.sum(-1, keepdim=True) + i
            steps.append(model.decode_one_token(new[:, i, None], torch.tensor([T + i]), position))
    return torch.stack(steps, 1).numpy()


def _np_assert_same_greedy(tokens, expected, logits, T):
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
            assert abs(gap) < 10 * _NP_TOL, f"row {b} step {i}: token {tokens[b, T + i]}, expected " \
                                            f"{expected[b, T + i]}, whose logit is {gap} lower"
            return  # a legitimate near tie: what follows is not comparable
    assert tokens.shape == expected.shape


def _np_dynamic_past_max(cfg, length):
    return (cfg["rope_scaling"] or {}).get("rope_type") == "dynamic" and length > cfg["max_position_embeddings"]


# ----------------------------------------------------------------------------------------------------------------
# The twin against olmo.py and transformers


@settings(max_examples=30, **_NP_SETTINGS)
@given(cfg=_np_configs(), length=st.integers(1, 24), seed=st.integers(0, 99))
@example(cfg=_NP_DYNAMIC, length=20, seed=0)
@example(cfg={**_NP_DYNAMIC, "hidden_act": "gelu_pytorch_tanh", "num_key_value_heads": 1}, length=12, seed=1)
def test_numpy_logits_equal_olmo_and_transformers(cfg, length, seed):
    ref, model, twin = _np_three_models(cfg, seed)
    ids = _np_ids(cfg, 2, length, seed)
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids)).logits
        ours = model(torch.from_numpy(ids))
    logits = twin(ids)
    assert isinstance(logits, np.ndarray) and logits.shape == (2, length, cfg["vocab_size"])
    _np_assert_close(logits, expected)
    _np_assert_close(logits, ours)
    if cfg["clip_qkv"] is not None:  # the weights are large enough that the clip changes the result
        twin.config.clip_qkv = None
        assert not np.allclose(twin(ids), logits, atol=1e-3)


@settings(max_examples=20, **_NP_SETTINGS)
@given(cfg=_np_configs(), lengths=st.lists(st.integers(1, 12), min_size=2, max_size=3), new=st.integers(1, 12),
       seed=st.integers(0, 99))
@example(cfg=_NP_DYNAMIC, lengths=[3, 10, 6], new=8, seed=0)
@example(cfg={**_NP_DYNAMIC, "hidden_act": "gelu_new", "rope_scaling": None}, lengths=[5, 2], new=12, seed=1)
def test_numpy_cached_generation_equals_olmo_and_full_forward(cfg, lengths, new, seed):
    """Left-padded batch, greedy: the same tokens as olmo.py's generate; the same per-step logits through the
    cache as olmo.py's; and -- except for dynamic RoPE past the trained length, where cached keys keep the
    rotation they were computed with -- the same logits as one full forward over the final sequence."""
    _, model, twin = _np_three_models(cfg, seed)
    ids, mask = _np_left_pad([_np_ids(cfg, 1, n, seed + i)[0] for i, n in enumerate(lengths)])
    T = ids.shape[1]
    tokens = twin.generate(ids, new, attention_mask=mask)
    assert tokens.shape == (len(lengths), T + new) and tokens.dtype == np.int64
    assert np.array_equal(tokens[:, :T], ids)
    steps = _np_step_logits(twin, ids, mask, tokens[:, T:])
    _np_assert_close(steps, _np_torch_step_logits(model, ids, mask, tokens[:, T:]))
    expected = model.generate(torch.from_numpy(ids), new, attention_mask=torch.from_numpy(mask))
    _np_assert_same_greedy(tokens, expected, steps, T)

    full_mask = np.concatenate([mask, np.ones((len(lengths), new - 1), dtype=mask.dtype)], 1)
    full = twin(tokens[:, :-1], attention_mask=full_mask)[:, T - 1:]
    if _np_dynamic_past_max(cfg, max(lengths) + new - 1):
        assume(new > 1)
        assert not np.allclose(full, steps, atol=1e-3)
    else:
        _np_assert_close(steps, full)


@settings(max_examples=15, **_NP_SETTINGS)
@given(cfg=_np_configs(), lengths=st.lists(st.integers(1, 10), min_size=2, max_size=3), seed=st.integers(0, 99))
def test_numpy_left_padded_rows_equal_prompts_alone(cfg, lengths, seed):
    # With dynamic RoPE past the trained length the frequencies depend on the longest row in the batch (as in
    # transformers), so a short row alone would legitimately differ.
    assume(not _np_dynamic_past_max(cfg, max(lengths) + 6))
    _, _, twin = _np_three_models(cfg, seed)
    rows = [_np_ids(cfg, 1, n, seed + i)[0] for i, n in enumerate(lengths)]
    ids, mask = _np_left_pad(rows)
    batch_logits = twin(ids, attention_mask=mask)
    batch_tokens = twin.generate(ids, 6, attention_mask=mask)
    for i, row in enumerate(rows):
        n = len(row)
        _np_assert_close(batch_logits[i, -n:], twin(row[None])[0])
        alone = twin.generate(row[None], 6)
        steps = _np_step_logits(twin, row[None], np.ones((1, n), dtype=np.int64), alone[:, n:])
        _np_assert_same_greedy(alone[:, n:], batch_tokens[i:i + 1, -6:], steps, 0)


def test_numpy_generation_stops_at_eos_like_olmo():
    _, model, twin = _np_three_models(_NP_SMALL, 3)
    ids, mask = _np_left_pad([_np_ids(_NP_SMALL, 1, n, n)[0] for n in (5, 9, 7)])
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
    for name in _NP_ACTIVATIONS:
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
    from dataclasses import asdict
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
# Loading: the .safetensors reader, sharded checkpoints, wrong tensors


def test_numpy_reads_f32_f16_bf16_like_torch(tmp_path):
    from safetensors.torch import save_file
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
    cfg = {**_NP_SMALL, "tie_word_embeddings": True}
    ref = _np_reference(cfg, 1)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 2
    twin = olmo_numpy.OlmoForCausalLM.from_pretrained(str(tmp_path / "sharded"))
    assert twin.weights["lm_head.weight"] is twin.weights["model.embed_tokens.weight"]
    ids = _np_ids(cfg, 1, 9, 0)
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids)).logits
    _np_assert_close(twin(ids), expected)
    # a tied checkpoint that also stores lm_head.weight (a copy) loads the same
    from safetensors.numpy import save_file
    path = shutil.copytree(tmp_path / "sharded", tmp_path / "with_head")
    save_file({"lm_head.weight": np.ascontiguousarray(twin.weights["lm_head.weight"])},
              str(path / "head.safetensors"))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "head.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    _np_assert_close(olmo_numpy.OlmoForCausalLM.from_pretrained(str(path))(ids), expected)
    # a bfloat16 checkpoint: the same weights rounded, widened to float32 at load
    half = _np_reference(cfg, 1).to(torch.bfloat16)
    half.save_pretrained(tmp_path / "bf16")
    twin = olmo_numpy.OlmoForCausalLM.from_pretrained(str(tmp_path / "bf16"))
    assert twin.weights["model.layers.0.mlp.up_proj.weight"].dtype == np.float32
    with torch.no_grad():
        expected = olmo.OlmoForCausalLM.from_pretrained(str(tmp_path / "bf16"))(torch.from_numpy(ids))
    _np_assert_close(twin(ids), expected)


def _np_write_safetensors(path, header, data, n=None):
    """Write a raw .safetensors file: the 8-byte length (n, default the true one), the JSON header, the data."""
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if n is None else n) + raw + data)
    return str(path)


_NP_F32 = np.arange(6, dtype="<f4").tobytes()  # 24 bytes


@pytest.mark.parametrize("header, data, n, message", [
    ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, _NP_F32[:20], None,
     "end by 20"),  # truncated data
    ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, _NP_F32, 10 ** 6,
     "header length 1000000 runs past the end of the file"),
    ({"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, _NP_F32, 2 ** 63,
     "runs past the end"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
      "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, _NP_F32, None,
     "tensor b has data_offsets \\[8, 24\\), expected to start at 16"),  # overlap
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, _NP_F32, None,
     "tensor b has data_offsets \\[16, 24\\), expected to start at 8"),  # a gap
    ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 24]}}, _NP_F32, None,
     "tensor a has 24 bytes, but shape \\[2, 2\\] of F32 needs 16"),
    ({"a": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 24]}}, _NP_F32, None,
     "tensor a has 24 bytes, but shape \\[2, 3\\] of F16 needs 12"),
    ({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, _NP_F32, None,
     "8 bytes after the last tensor"),
    ({"a": {"dtype": "F64", "shape": [3], "data_offsets": [0, 24]}}, _NP_F32, None,
     "tensor a has dtype 'F64'; only F32, F16, BF16 are supported"),
    ({"a": {"dtype": "Q4", "shape": [3], "data_offsets": [0, 24]}}, _NP_F32, None, "tensor a has dtype 'Q4'"),
    ({"a": {"dtype": "F32", "shape": [-2, -3], "data_offsets": [0, 24]}}, _NP_F32, None, "malformed"),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": [0]}}, _NP_F32, None, "tensor a has a malformed"),
    ({"a": {"dtype": "F32", "shape": [6], "data_offsets": ["0", "24"]}}, _NP_F32, None, "malformed"),
    ({"a": [1, 2]}, _NP_F32, None, "tensor a has a malformed"),
    ([1, 2], _NP_F32, None, "not a JSON object"),
])
def test_numpy_corrupt_safetensors_raise_naming_file_and_tensor(tmp_path, header, data, n, message):
    path = _np_write_safetensors(tmp_path / "bad.safetensors", header, data, n)
    with pytest.raises(ValueError, match=message) as e:
        olmo_numpy.load_safetensors(path)
    assert str(e.value).startswith(f"cannot read {path}: ")


def test_numpy_unreadable_safetensors(tmp_path):
    for content in (b"", b"\x01\x00", b"\x04\x00\x00\x00\x00\x00\x00\x00{{{{"):
        (tmp_path / "x.safetensors").write_bytes(content)
        with pytest.raises(ValueError, match="cannot read .*x.safetensors: "):
            olmo_numpy.load_safetensors(str(tmp_path / "x.safetensors"))
    # and a valid raw file reads back (the writer above is right, so the failures are the checks)
    path = _np_write_safetensors(tmp_path / "ok.safetensors", {"__metadata__": {"k": "v"}, "a": {
        "dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}}, _NP_F32)
    assert np.array_equal(olmo_numpy.load_safetensors(path)["a"], np.arange(6).reshape(2, 3))


@pytest.fixture(scope="module")
def _np_small_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("np_small"))
    _np_reference(_NP_SMALL, 2).save_pretrained(path)
    return path


def _np_rewrite_weights(path, dest, edit):
    """Copy a checkpoint, passing its tensors through edit(dict) -> dict."""
    from safetensors.numpy import load_file, save_file
    shutil.copytree(path, dest)
    save_file(edit(load_file(os.path.join(path, "model.safetensors"))), os.path.join(dest, "model.safetensors"))
    return str(dest)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"},
     "missing tensor model.layers.1.mlp.up_proj.weight"),
    (lambda sd: {**sd, "model.layers.0.self_attn.rotary.weight": np.zeros(1, np.float32)},
     "unexpected tensor model.layers.0.self_attn.rotary.weight"),
    (lambda sd: {**sd, "model.layers.0.self_attn.k_proj.weight": np.zeros((32, 32), np.float32)},
     r"model.layers.0.self_attn.k_proj.weight has shape \(32, 32\), expected \(16, 32\)"),
    (lambda sd: {k: v for k, v in sd.items() if k != "lm_head.weight"}, "missing tensor lm_head.weight"),
])
def test_numpy_wrong_tensors_are_named_like_olmo(_np_small_checkpoint, tmp_path, edit, message):
    path = _np_rewrite_weights(_np_small_checkpoint, tmp_path / "bad", edit)
    with pytest.raises(ValueError, match=message) as ours:
        olmo_numpy.OlmoForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError) as expected:
        olmo.OlmoForCausalLM.from_pretrained(path)
    assert str(ours.value) == str(expected.value)


def test_numpy_missing_paths_and_bin_checkpoints(tmp_path, _np_small_checkpoint):
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
# No torch, and the CLI


def _np_train_tokenizer(path, vocab_size):
    """A tiny byte-level BPE tokenizer.json, as OLMo's (GPT-NeoX style) is, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|padding|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Language models are fun. 🙂 日本語も少し。"] * 20, trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    return tok


@pytest.fixture(scope="module")
def _np_cli_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("np_cli"))
    tok = _np_train_tokenizer(path, 300)
    cfg = {**_NP_SMALL, "vocab_size": tok.get_vocab_size(), "eos_token_id": 0}
    _np_reference(cfg, 5).save_pretrained(path)
    return path, tok


def _np_run(*args, code=None):
    """olmo_numpy.py's CLI as a user runs it (or `python -c code`): a fresh process, so exit status, output and
    tracebacks are real."""
    command = ["-c", code] if code else [os.path.join(_NP_HERE, "olmo_numpy.py"), *args]
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=_NP_HERE, timeout=120)


def test_numpy_never_imports_torch(_np_cli_checkpoint):
    path, _ = _np_cli_checkpoint
    result = _np_run(code="import olmo_numpy, sys; assert 'torch' not in sys.modules, 'torch imported'; "
                          f"olmo_numpy.main(['--model', {path!r}, '--prompt', 'hi', '--max-new-tokens', '2']); "
                          "assert 'torch' not in sys.modules, 'torch imported by the CLI path'")
    assert result.returncode == 0, result.stderr


def test_numpy_cli_streams_prompt_and_continuation(_np_cli_checkpoint):
    path, tok = _np_cli_checkpoint
    prompt = "Language 🙂 models"
    result = _np_run("--model", path, "--prompt", prompt, "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr
    ids = tok.encode(prompt, add_special_tokens=False).ids
    new = olmo.OlmoForCausalLM.from_pretrained(path).generate(torch.tensor([ids]), 24, eos_token_id=0)
    new = new[0, len(ids):].tolist()
    assert result.stdout == prompt + tok.decode(new, skip_special_tokens=True) + "\n"
    assert "tokens/s" in result.stderr and "Traceback" not in result.stderr


def _np_break_checkpoint(path, dest, breakage):
    shutil.copytree(path, dest)
    if breakage == "missing path":
        shutil.rmtree(dest)
    elif breakage in ("bad config.json", "model_type"):
        text = "{not json" if breakage == "bad config.json" else json.dumps({"model_type": "llama"})
        with open(os.path.join(dest, "config.json"), "w") as f:
            f.write(text)
    else:
        from safetensors.numpy import load_file, save_file
        sd = load_file(os.path.join(path, "model.safetensors"))
        if breakage == "missing tensor":
            del sd["model.layers.0.mlp.up_proj.weight"]
        else:
            sd["model.layers.0.mlp.up_proj.weight"] = np.zeros((3, 3), np.float32)
        save_file(sd, os.path.join(dest, "model.safetensors"))
    return str(dest)


@pytest.mark.parametrize("breakage, flags, message", [
    ("missing path", [], "is not a checkpoint directory"),
    ("bad config.json", [], "cannot read .*config.json"),
    ("model_type", [], "model_type is 'llama', not 'olmo'"),
    ("missing tensor", [], "missing tensor model.layers.0.mlp.up_proj.weight"),
    ("mis-shaped tensor", [], r"model.layers.0.mlp.up_proj.weight has shape \(3, 3\)"),
    (None, ["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
    (None, ["--top-p", "0"], r"--top-p must be in \(0, 1\]"),
    (None, ["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (None, ["--temperature", "-1"], "--temperature must be >= 0"),
    (None, ["--top-k", "0"], "--top-k must be >= 1"),
    (None, ["--device", "cpu"], "unrecognized arguments: --device"),
])
def test_numpy_cli_bad_input_one_line_exit_2(_np_cli_checkpoint, tmp_path, breakage, flags, message):
    path, _ = _np_cli_checkpoint
    if breakage:
        path = _np_break_checkpoint(path, tmp_path / "broken", breakage)
    result = _np_run("--model", path, "--prompt", "hi", *flags)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert __import__("re").search(message, lines[0]), lines[0]


def test_numpy_cli_honours_generation_config(_np_cli_checkpoint, tmp_path, capsys):
    """generation_config.json's sampling settings apply unless a flag overrides them, as in olmo.py."""
    path, _ = _np_cli_checkpoint
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
    outs = [_np_run("--model", str(path), "--prompt", "Language", "--max-new-tokens", "8", "--seed", "3").stdout
            for _ in range(2)]
    assert outs[0] == outs[1] and outs[0].startswith("Language")


def test_numpy_cli_ctrl_c_keeps_what_was_printed(_np_cli_checkpoint):
    import signal
    path, _ = _np_cli_checkpoint
    proc = subprocess.Popen([sys.executable, os.path.join(_NP_HERE, "olmo_numpy.py"), "--model", path, "--prompt",
                             "Go", "--max-new-tokens", "3000", "--temperature", "1", "--seed", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.read(2)  # the prompt is printed before generation starts
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert first == "Go" and proc.returncode == 130
    assert "Traceback" not in err and (first + rest).endswith("\n")


def test_numpy_cli_streaming_never_splits_a_character(_np_cli_checkpoint, monkeypatch):
    """Feed the streamer tokens that split multi-byte characters: every chunk it prints must be whole text."""
    path, tok = _np_cli_checkpoint
    ids = tok.encode("🙂日本語🙂", add_special_tokens=False).ids
    byte_ids = [tok.token_to_id(c) for c in "".join(tok.id_to_token(i) for i in ids)]  # one byte per token
    assert len(byte_ids) > len(ids) and None not in byte_ids

    def scripted_generate(self, input_ids, max_new_tokens, callback=None, **kw):  # "generates" the byte tokens
        for t in byte_ids:
            callback(np.array([t]))

    chunks = []
    monkeypatch.setattr(olmo_numpy.OlmoForCausalLM, "generate", scripted_generate)
    monkeypatch.setattr("builtins.print", lambda *a, file=None, end="\n", flush=False:
                        file is None and chunks.append((a[0] if a else "") + end))
    olmo_numpy.run(olmo_numpy.parse_args(["--model", path, "--prompt", "x", "--max-new-tokens", "50"]))
    assert "".join(chunks) == "x🙂日本語🙂\n"
    assert all("\ufffd" not in c for c in chunks) and len(chunks) > 3
