"""Olmo Hybrid (model_type "olmo_hybrid") in both twins, against transformers' OlmoHybridForCausalLM.

The reference. transformers' model in float64 is not float64 in these layers: its Gated DeltaNet kernels
(torch_chunk_gated_delta_rule, torch_recurrent_gated_delta_rule), its decay (A_log.float(), a_proj(x).float()) and
its RMSNorms cast to float32 whatever the model's dtype. exact_logits runs transformers' own code with those casts
made float64 (each function's source with torch.float32 -> torch.float64 and .float() -> .double()), restoring the
originals afterwards: the exact logits, as conftest's float64_model gives them for the other generations.

The tolerance: conftest's analysis, plus what these layers add. A Gated DeltaNet layer has as many rounding stages
as an attention layer (norm, q/k/v, convolution, activation, two L2 norms, beta, decay, the update's and the
read's dot products over dk <= 16, gated norm, o_proj), ~100 U per layer as there; over <= 24 tokens the state's
error is a random walk of <= 24 updates, ~5 x 8 U. One stage amplifies: the gated norm divides each head's output
o (dv numbers) by sqrt(mean(o^2) + 1e-5), so where a head's output is tiny (|o| well under 1e-5^(1/2) = 3e-3: a
query nearly orthogonal to what the state holds) o's absolute rounding error, ~8 U, is multiplied by up to 1 /
sqrt(1e-5) = 316: ~2500 U. Hence HYBRID_TOL = 4096 U = 2^-12, absolute plus as much relative, for one float32
forward against the exact logits, and twice that between two float32 computations (HYBRID_ATOL). Measured here
over 150 random configs (<= 24 tokens, <= 4 layers): 20-200 U typically, 3150 U at worst, with transformers' own
float32 forward as far off on the same examples (1822 U where olmo.py was 1736 U). Still far below what a bug
does: over 30 random configs (12 tokens, 2-4 layers), beta not doubled with linear_allow_neg_eigval moved the
logits by >= 0.79, the convolution's taps reversed by >= 3.7, value heads grouped the wrong way by >= 3.7, the
decay ignored by >= 2.1, the L2 norm of the queries left out by >= 0.057, rms_norm_eps for the gated norm's fixed
1e-5 by >= 0.019, padding entering the state by >= 1.4, while the largest allowance is 2 x 2.4e-4 x (1 + 5) =
2.9e-3.
"""

import contextlib
import copy
import inspect
import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest
import torch
import transformers
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import olmo
import olmo_numpy
from conftest import (HERE, U, assert_close, draw_head_dim, draw_shape, ids_for, randomize, rewrite_weights, run_cli,
                      train_tokenizer)
from test_cli import CHAT_LINES, chat_reference, train_chat_tokenizer, write_chat_config
from test_olmo import assert_packing_changes_nothing, assert_same_greedy, left_pad, np_step_logits, step_logits

from transformers.models.olmo_hybrid import modeling_olmo_hybrid as reference_code

HYBRID_TOL = dict(atol=4096 * U, rtol=4096 * U)  # one float32 forward against the exact logits: see above
HYBRID_ATOL = HYBRID_RTOL = 2 * 4096 * U  # two float32 computations of the same logits


@st.composite
def hybrid_configs(draw):
    """A small Olmo Hybrid: 2-4 layers of either kind (at least one of each; transformers' default pattern when
    layer_types is None), every convolution width from 1 to 4, grouped value heads (Hv a multiple of Hk), both
    beta ranges, GQA in the attention layers, biases, tying, each activation (the MLP's and the convolution's),
    RoPE plain, linear or YaRN."""
    heads = draw(st.sampled_from([1, 2, 4]))
    layers = draw(st.integers(2, 4))
    types = draw(st.none() | st.lists(st.sampled_from(["linear_attention", "full_attention"]), min_size=layers,
                                      max_size=layers).filter(lambda t: len(set(t)) == 2))
    key_heads = draw(st.sampled_from([1, 2]))
    scaling = draw(st.sampled_from([None, "linear", "yarn"]))
    rope = {"rope_type": scaling or "default", "rope_theta": draw(st.sampled_from([10000.0, 500.0]))}
    if scaling:
        rope["factor"] = draw(st.floats(1.5, 4.0))
    cfg = dict(
        **draw_shape(draw, heads, intermediate=(8, 64), max_positions=[16, 64]),
        num_hidden_layers=layers,
        rope_parameters=rope,
        rms_norm_eps=draw(st.sampled_from([1e-5, 1e-6, 0.1])),
        layer_types=types,
        linear_num_key_heads=key_heads,
        linear_num_value_heads=key_heads * draw(st.sampled_from([1, 2, 3])),
        linear_key_head_dim=draw(st.sampled_from([4, 8, 16])),
        linear_value_head_dim=draw(st.sampled_from([4, 8, 16])),
        linear_conv_kernel_dim=draw(st.integers(1, 4)),
        linear_allow_neg_eigval=draw(st.booleans()),
        pad_token_id=1, bos_token_id=None, eos_token_id=None,
    )
    return draw_head_dim(draw, cfg)


LINEAR_FIRST_AND_LAST = dict(
    vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2,
    num_key_value_heads=1, hidden_act="silu", max_position_embeddings=64, tie_word_embeddings=False,
    attention_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6,
    layer_types=["linear_attention", "full_attention", "linear_attention"], linear_num_key_heads=2,
    linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8, linear_conv_kernel_dim=4,
    linear_allow_neg_eigval=True, pad_token_id=1, bos_token_id=None, eos_token_id=None)


def hybrid_reference(cfg, seed=0):
    """transformers' OlmoHybridForCausalLM for cfg with conftest.reference_model's weights (unit-variance
    projections, norm weights 1 +- 0.3; A_log and dt_bias ~ N(0, 0.3), so decays exp(g) spread over (0, 1))."""
    model = transformers.OlmoHybridForCausalLM(transformers.OlmoHybridConfig(
        **{k: v for k, v in cfg.items() if v is not None or k != "layer_types"}))
    return randomize(model, seed)


def hybrid_models(cfg, seed, **save_options):
    """(transformers, olmo.py, olmo_numpy) on the same weights, through a checkpoint save_pretrained wrote (the
    hub's layout by default: OLMo-core's norm names, the convolution in three parts)."""
    ref = hybrid_reference(cfg, seed)
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d, **save_options)
        return ref, olmo.OlmoForCausalLM.from_pretrained(d), olmo_numpy.OlmoForCausalLM.from_pretrained(d)


@contextlib.contextmanager
def float64_reference():
    """transformers' Olmo Hybrid code with its float32 casts made float64, inside the block only (see above)."""
    functions = ["torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule"]
    classes = [reference_code.OlmoHybridRMSNormGated, reference_code.OlmoHybridRMSNorm,
               reference_code.OlmoHybridGatedDeltaNet]
    saved = {name: getattr(reference_code, name) for name in functions}
    forwards = {cls: cls.forward for cls in classes}
    try:
        for name in functions:
            source = inspect.getsource(getattr(reference_code, name)).replace("torch.float32", "torch.float64")
            assert "float64" in source
            namespace = dict(vars(reference_code))
            exec("\n".join(line for line in source.splitlines() if not line.startswith("@")), namespace)
            setattr(reference_code, name, namespace[name])
        for cls in classes:
            source = textwrap.dedent(inspect.getsource(cls.forward))
            source = source.replace("torch.float32", "torch.float64").replace(".float()", ".double()")
            assert "float64" in source or "double" in source
            namespace = dict(vars(reference_code))
            exec("\n".join(line for line in source.splitlines() if not line.startswith("@")), namespace)
            cls.forward = namespace["forward"]
        yield
    finally:
        for name, function in saved.items():
            setattr(reference_code, name, function)
        for cls, forward in forwards.items():
            cls.forward = forward


def exact_logits(ref, ids, mask=None):
    with torch.no_grad(), float64_reference():
        return copy.deepcopy(ref).double()(ids, attention_mask=mask).logits


# ----------------------------------------------------------------------------------------------------------------
# Logits, loss, and the two twins


@settings(max_examples=12)
@given(cfg=hybrid_configs(), length=st.integers(1, 24), seed=st.integers(0, 99))
@example(cfg=LINEAR_FIRST_AND_LAST, length=24, seed=0)
def test_logits_and_loss_equal_transformers(cfg, length, seed):
    ref, model, twin = hybrid_models(cfg, seed)
    ids = ids_for(cfg, 2, length, seed)
    labels = ids.clone()
    labels[0, : length // 2] = -100
    exact = exact_logits(ref, ids)
    with torch.no_grad():
        expected = ref(ids, labels=labels)
        logits, loss = model(ids, labels=labels)
    numpy_logits = twin(ids.numpy())
    assert_close(logits.double(), exact, **HYBRID_TOL)
    assert_close(torch.from_numpy(numpy_logits).double(), exact, **HYBRID_TOL)
    assert_close(expected.logits.double(), exact, **HYBRID_TOL)  # the tolerance's premise, on this CPU
    assert_close(numpy_logits, logits, atol=HYBRID_ATOL, rtol=HYBRID_RTOL)
    if (labels[:, 1:] != -100).any():  # each term of the mean within twice a logit's allowance
        assert_close(loss, expected.loss, atol=2 * (HYBRID_ATOL + HYBRID_RTOL * exact.abs().max().item()), rtol=0)


@pytest.mark.parametrize("twin", ["olmo.py", "olmo_numpy.py"])
def test_chunks_equal_the_recurrence_over_long_prompts(twin):
    """150 tokens (two chunks of 64 and a partial one) from a nonzero state, slow to fast forgetting, beta up to 2:
    the recurrence and the chunked form, float32, against transformers' one-token recurrence in float64. Each
    output and the final state within 64 U of the largest: the chunk's sums run over <= 64 + dk terms, ~9 U each
    (conftest's random walk), some four deep (the triangular solve, the products within the chunk, the state's
    read and update), and the solve carries an early error into later rows. Measured: <= 21 U."""
    module = olmo if twin == "olmo.py" else olmo_numpy
    g = torch.Generator().manual_seed(0)
    B, H, T, dk, dv = 2, 3, 150, 8, 12
    q = torch.nn.functional.normalize(torch.randn(B, T, H, dk, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, dk, generator=g), dim=-1)
    v = torch.randn(B, T, H, dv, generator=g)
    decay = -torch.rand(B, T, H, generator=g) * torch.tensor([0.02, 0.5, 4.0])  # per head
    beta = 2 * torch.rand(B, T, H, generator=g)
    state = torch.randn(B, H, dk, dv, generator=g)
    with float64_reference():
        exact, exact_state = reference_code.torch_recurrent_gated_delta_rule(
            *(x.double() for x in (q, k, v)), g=decay.double(), beta=beta.double(), initial_state=state.double(),
            output_final_state=True)  # it scales the queries by dk^-1/2 itself
    exact = exact.transpose(1, 2)  # (B, H, T, dv), as ours
    args = [x.transpose(1, 2) for x in (q * dk ** -0.5, k, v, decay, beta)] + [state]
    args = [x.contiguous() if twin == "olmo.py" else x.numpy() for x in args]
    for rule in (module.gated_delta_rule, module.chunked_gated_delta_rule):
        out, final = (torch.as_tensor(x) for x in rule(*args))
        assert out.dtype == final.dtype == torch.float32
        assert (out.double() - exact).abs().max() <= 64 * U * exact.abs().max()
        assert (final.double() - exact_state).abs().max() <= 64 * U * exact_state.abs().max()


# ----------------------------------------------------------------------------------------------------------------
# Generation: cached, padded, greedy


@settings(max_examples=6)
@given(cfg=hybrid_configs(), lengths=st.lists(st.integers(1, 12), min_size=2, max_size=3), new=st.integers(1, 10),
       seed=st.integers(0, 99))
@example(cfg=LINEAR_FIRST_AND_LAST, lengths=[12, 3], new=10, seed=0)
def test_cached_generation_equals_transformers_and_full_forward(cfg, lengths, new, seed):
    """Left-padded batch, greedy: the tokens of transformers' generate (which keeps the same conv and recurrent
    states), each step's logits equal to one full forward over the final sequence, and each row equal to its prompt
    alone: padding enters neither the convolution nor the state. Both twins."""
    ref, model, twin = hybrid_models(cfg, seed)
    rows = [ids_for(cfg, 1, n, seed + i)[0] for i, n in enumerate(lengths)]
    ids, mask = left_pad(rows)
    T = ids.shape[1]
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=1)
    tokens = model.generate(ids, new, attention_mask=mask)
    numpy_tokens = twin.generate(ids.numpy(), new, attention_mask=mask.numpy())
    full_mask = torch.cat([mask, torch.ones(len(rows), tokens.shape[1] - T, dtype=torch.long)], 1)
    with torch.no_grad():
        full = model(tokens, attention_mask=full_mask)[:, T - 1:-1]
    steps = step_logits(model, ids, mask, tokens[:, T:])
    numpy_steps = np_step_logits(twin, ids.numpy(), mask.numpy(), tokens[:, T:].numpy())
    assert_same_greedy(tokens, expected, steps, T, HYBRID_ATOL, HYBRID_RTOL)
    assert_same_greedy(numpy_tokens, tokens, numpy_steps, T, HYBRID_ATOL, HYBRID_RTOL)
    assert_close(steps, full, atol=HYBRID_ATOL, rtol=HYBRID_RTOL)
    assert_close(numpy_steps, steps, atol=HYBRID_ATOL, rtol=HYBRID_RTOL)
    for i, row in enumerate(rows):  # padded vs alone
        with torch.no_grad():
            alone = model(row[None])[0]
        assert_close(model(ids, attention_mask=mask)[i, T - len(row):].detach(), alone,
                     atol=HYBRID_ATOL, rtol=HYBRID_RTOL)
        assert_close(twin(ids.numpy(), mask.numpy())[i, T - len(row):], alone, atol=HYBRID_ATOL, rtol=HYBRID_RTOL)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="torch's oneDNN has no bf16 here")
@settings(max_examples=5)
@given(cfg=hybrid_configs(), seed=st.integers(0, 99))
@example(cfg=LINEAR_FIRST_AND_LAST, seed=0)
def test_packed_bfloat16_hybrid_equals_unpacked(cfg, seed):
    """In bfloat16 on the CPU every linear layer is packed for oneDNN, the Gated DeltaNet's too (a_proj and b_proj
    have Hv outputs, as few as 1), and changes no product beyond a float32 summation order (test_olmo.py's
    assert_packing_changes_nothing). The convolution is no linear layer: it stays as it is."""
    with tempfile.TemporaryDirectory() as d:
        hybrid_reference(cfg, seed).to(torch.bfloat16).save_pretrained(d)
        assert_packing_changes_nothing(d, ids_for(cfg, 2, 10, seed), prompt=4, new=8)


@pytest.mark.parametrize("twin", ["olmo.py", "olmo_numpy.py"])
def test_a_chat_resumes_from_kept_states_exactly(twin, monkeypatch):
    """A chat's turns: each prompt is the conversation so far. The replies equal recomputing from scratch, and each
    turn prefills only from a kept point: the end of the last reply when the prompt extends it, the end of the last
    prompt when the prompt changes the reply (a chat template re-tokenising it): never the whole conversation."""
    ref, model, numpy_model = hybrid_models(LINEAR_FIRST_AND_LAST, 3)
    model = model if twin == "olmo.py" else numpy_model
    as_array = torch.as_tensor if twin == "olmo.py" else np.asarray
    starts = []
    prefill = model.prefill
    monkeypatch.setattr(model, "prefill", lambda ids, mask, start=0: starts.append(start) or prefill(ids, mask, start))
    g = torch.Generator().manual_seed(0)
    conversation = torch.randint(2, 61, (1, 10), generator=g)
    expected_starts = [0]
    for turn in range(4):
        reply = model.generate(as_array(conversation.numpy()), 6)
        kept = model.cached_ids, model.kept_states
        model.cached_ids, model.kept_states = [], {}
        assert np.array_equal(model.generate(as_array(conversation.numpy()), 6), reply)  # recomputed
        model.cached_ids, model.kept_states = kept
        starts.pop()  # the recomputation's
        following = torch.as_tensor(np.asarray(reply)).clone()
        if turn == 2:  # the template changes the reply's second-to-last token: back to the prompt's end
            following[0, -2] = (following[0, -2] + 1) % 61
            expected_starts.append(conversation.shape[1])
        else:  # the reply but its last token (never fed) is kept
            expected_starts.append(following.shape[1] - 1)
        conversation = torch.cat([following, torch.randint(2, 61, (1, 5), generator=g)], 1)
    assert starts == expected_starts[:-1]


# ----------------------------------------------------------------------------------------------------------------
# Loading and config


def test_the_hub_layout_and_transformers_layout_load_alike(tmp_path):
    """The hub's checkpoints (OLMo-core's norm names; q_conv1d, k_conv1d, v_conv1d of q's, k's and v's channels),
    transformers' save_pretrained (the same names, the convolution in three equal thirds) and transformers' own
    layout (save_original_format=False) give the same model; an mtp.* tensor is dropped; a missing part is named."""
    cfg = LINEAR_FIRST_AND_LAST
    ref = hybrid_reference(cfg, 1)
    ref.save_pretrained(tmp_path / "thirds")
    ref.save_pretrained(tmp_path / "fused", save_original_format=False)
    key = cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"]

    def hub(tensors):  # the thirds joined, then split by q, k and v, plus a multi-token-prediction tensor
        out = dict(tensors)
        for name in [n for n in out if n.endswith("q_conv1d.weight")]:
            prefix = name.removesuffix("q_conv1d.weight")
            joined = torch.cat([out[f"{prefix}{p}_conv1d.weight"] for p in "qkv"])
            thirds = joined.split([key, key, len(joined) - 2 * key])
            out.update(zip([f"{prefix}{p}_conv1d.weight" for p in "qkv"], thirds))
        out["mtp.0.weight"] = torch.zeros(3)
        return out

    rewrite_weights(str(tmp_path / "thirds"), str(tmp_path / "hub"), hub)
    names = load_file(tmp_path / "hub" / "model.safetensors")
    assert "model.layers.0.attention_layer_norm.weight" in names
    assert "model.layers.0.linear_attn.q_conv1d.weight" in names
    ids = ids_for(cfg, 1, 9, 0)
    with torch.no_grad():
        expected = ref(ids).logits
    for layout in ("thirds", "fused", "hub"):
        assert_close(olmo.OlmoForCausalLM.from_pretrained(str(tmp_path / layout))(ids).detach(), expected)
        assert_close(olmo_numpy.OlmoForCausalLM.from_pretrained(str(tmp_path / layout))(ids.numpy()), expected)
    rewrite_weights(str(tmp_path / "hub"), str(tmp_path / "broken"),
                    lambda t: {k: v for k, v in t.items() if k != "model.layers.2.linear_attn.v_conv1d.weight"})
    for module in (olmo, olmo_numpy):
        with pytest.raises(ValueError, match="model.layers.2.linear_attn.q_conv1d.weight but no k_conv1d and v_conv1d"):
            module.OlmoForCausalLM.from_pretrained(str(tmp_path / "broken"))


@pytest.mark.parametrize("where", ["rope_parameters", "top level"])
def test_a_null_rope_theta_means_no_rope_as_in_transformers(where, tmp_path):
    """transformers runs Olmo Hybrid's attention without RoPE when rope_theta is given as null; absent, the
    base is 10000. Both twins equal it either way (NoPE's logits differ from RoPE's: the test can fail)."""
    cfg = {**LINEAR_FIRST_AND_LAST, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    ref = hybrid_reference(cfg, 2)
    ids = ids_for(cfg, 1, 12, 0)
    with torch.no_grad():
        with_rope = ref(ids).logits
    ref.config.rope_parameters = {"rope_type": "default", "rope_theta": None}
    ref.model.rotary_emb = None  # what OlmoHybridModel builds for that config
    with torch.no_grad():
        expected = ref(ids).logits
    assert (expected - with_rope).abs().max() > 0.01
    ref.save_pretrained(tmp_path)
    config_json = json.loads((tmp_path / "config.json").read_text())
    if where == "top level":
        config_json.pop("rope_parameters")
        config_json["rope_theta"] = None
    (tmp_path / "config.json").write_text(json.dumps(config_json))
    assert transformers.AutoConfig.from_pretrained(tmp_path).rope_parameters["rope_theta"] is None
    assert_close(olmo.OlmoForCausalLM.from_pretrained(str(tmp_path))(ids).detach(), expected)
    assert_close(olmo_numpy.OlmoForCausalLM.from_pretrained(str(tmp_path))(ids.numpy()), expected)


LINEAR_FIELDS = ("layer_types", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                 "linear_value_head_dim", "linear_conv_kernel_dim", "linear_allow_neg_eigval")


def test_config_defaults_are_transformers_defaults():
    """For the keys a config.json leaves out: Olmo-Hybrid-7B's shape, as OlmoHybridConfig fills it (it differs
    from OLMo's)."""
    theirs = transformers.OlmoHybridConfig()
    for module in (olmo, olmo_numpy):
        ours = module.OlmoConfig.from_dict({"model_type": "olmo_hybrid"})
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "pad_token_id",
                     "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_bias", *LINEAR_FIELDS):
            assert getattr(ours, name) == getattr(theirs, name), (module.__name__, name)
        assert ours.rope_parameters == {"full_attention": theirs.rope_parameters}


@pytest.mark.parametrize("layers", range(1, 10))
def test_layer_pattern_and_sizes_default_as_in_transformers(layers):
    """The layer pattern (three Gated DeltaNet layers then attention, the last layer attention at least) and the
    Gated DeltaNet's sizes, as OlmoHybridConfig fills them from the other fields."""
    d = {"model_type": "olmo_hybrid", "num_hidden_layers": layers, "num_attention_heads": 6, "hidden_size": 96,
         "vocab_size": 100, "pad_token_id": 1, "eos_token_id": 0}
    for module in (olmo, olmo_numpy):
        if layers == 1:  # the default makes it an attention layer, leaving no Gated DeltaNet layer: both refuse
            with pytest.raises(Exception, match="expects at least one 'linear_attention' layer"):
                transformers.OlmoHybridConfig(**d)
            with pytest.raises(ValueError, match="layer_types must be of both kinds"):
                module.OlmoConfig.from_dict(d)
            continue
        config = module.OlmoConfig.from_dict(d)
        expected = transformers.OlmoHybridConfig(**d)
        for name in LINEAR_FIELDS:
            assert getattr(config, name) == getattr(expected, name), name


@pytest.mark.parametrize("change, message", [
    ({"layer_types": ["linear_attention", "linear_attention"]}, "layer_types must be of both kinds"),
    ({"layer_types": ["full_attention", "full_attention"]}, "layer_types must be of both kinds"),
    ({"layer_types": ["linear_attention", "sliding_attention"]},
     "layer_types must be 2 of 'full_attention' or 'linear_attention'"),
    ({"linear_num_key_heads": 2, "linear_num_value_heads": 3}, "linear_num_value_heads must be a multiple of"),
    ({"linear_conv_kernel_dim": 0}, "linear_conv_kernel_dim must be in"),
    ({"linear_key_head_dim": 0}, "linear_key_head_dim must be in"),
    ({"linear_allow_neg_eigval": 1}, "linear_allow_neg_eigval must be bool"),
])
def test_bad_configs_are_refused_naming_the_field(change, message):
    d = {"model_type": "olmo_hybrid", "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 16,
         "vocab_size": 100, "pad_token_id": 1, "eos_token_id": 0, **change}
    for module in (olmo, olmo_numpy):
        with pytest.raises(ValueError, match=message):
            module.OlmoConfig.from_dict(d)


# ----------------------------------------------------------------------------------------------------------------
# The command lines


def test_convert_says_olmo_hybrid_loads_as_it_is(tmp_path):
    """convert.py doesn't rewrite Olmo Hybrid (published in the transformers layout only): one line, exit 2,
    nothing written; its --help says so."""
    hybrid_reference(LINEAR_FIRST_AND_LAST, 0).save_pretrained(tmp_path / "src")
    result = run_cli(str(tmp_path / "src"), str(tmp_path / "dst"), script="convert.py")
    assert result.returncode == 2 and not (tmp_path / "dst").exists()
    assert result.stderr.count("\n") == 1
    assert "is an Olmo Hybrid checkpoint, published in the transformers layout only" in result.stderr
    help_text = " ".join(run_cli("--help", script="convert.py").stdout.split())  # argparse rewraps it
    assert "Olmo Hybrid is published in the transformers layout only" in help_text


@pytest.mark.parametrize("script", ["olmo.py", "olmo_numpy.py"])
def test_cli_with_a_tokenizer_gives_transformers_greedy_text(script, tmp_path):
    cfg = {**LINEAR_FIRST_AND_LAST, "vocab_size": 300, "eos_token_id": 0}
    ref = hybrid_reference(cfg, 5)
    ref.save_pretrained(tmp_path)
    tok = train_tokenizer(str(tmp_path), 300)
    prompt = "Language models are"
    ids = torch.tensor([tok.encode(prompt).ids])
    expected = ref.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=1)
    text = tok.decode(expected[0, ids.shape[1]:].tolist())
    args = ["--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"]
    result = run_cli(*args, *(["--device", "cpu"] if script == "olmo.py" else []), script=script)
    assert result.returncode == 0, result.stderr
    assert text in result.stdout


@pytest.fixture(scope="module")
def hybrid_chat_checkpoint(tmp_path_factory):
    """A random tiny Olmo Hybrid (linear layers first and last) with test_cli's trained tokenizer and OLMo 1
    Instruct's template, and a 96-position context, so a conversation soon outgrows it."""
    path = tmp_path_factory.mktemp("hybrid_chat")
    tok = train_chat_tokenizer(str(path))
    cfg = {**LINEAR_FIRST_AND_LAST, "vocab_size": 300, "eos_token_id": 0, "max_position_embeddings": 96}
    ref = hybrid_reference(cfg, 7)
    ref.save_pretrained(path)
    write_chat_config(str(path), "tulu")
    return str(path), ref, tok, transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def hybrid_chat_expected(hybrid_chat_checkpoint):
    return chat_reference(hybrid_chat_checkpoint, [line for line in CHAT_LINES if line], 8, system="Be brief.")


@pytest.mark.parametrize("script", ["olmo.py", "olmo_numpy.py"])
def test_chat_through_a_pipe_equals_transformers(hybrid_chat_checkpoint, hybrid_chat_expected, script):
    """test_cli's chat, on Olmo Hybrid: each turn's reply equals transformers' greedy reply to the conversation
    recomputed from scratch, while the CLI's generate resumes from the states it kept (see reuse_prefix), across
    /reset and turns dropped to fit the context."""
    expected, notices = hybrid_chat_expected
    device = ["--device", "cpu"] if script == "olmo.py" else []
    result = subprocess.run([sys.executable, os.path.join(HERE, script), "--model", hybrid_chat_checkpoint[0], *device,
                             "--chat", "--system", "Be brief.", "--max-new-tokens", "8"], input="\n".join(CHAT_LINES),
                            capture_output=True, text=True, cwd=HERE, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected
    assert result.stderr.count("dropped the oldest") == notices.count("dropped") > 0
