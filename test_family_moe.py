"""Tests: OLMoE and FlexOlmo (the mixture-of-experts models) in olmo.py and olmo_numpy.py, against transformers'
OlmoeForCausalLM and FlexOlmoForCausalLM.

Tolerances are those of conftest.py's module docstring (FP32_TOL for one float32 forward against float64, ATOL /
RTOL for two float32 computations): an MoE layer adds one rounding stage to a dense one -- the router's weighted
sum of at most 8 expert outputs, each within the dense MLP's error -- and the models here are as small (hidden <= 64,
intermediate <= 48, <= 2 layers, <= 24 tokens), so the same bounds hold. Measured over these tests: <= 200 U.

One thing is new: routing is discrete. Where a token's k-th and (k+1)-th experts have router logits within the
float32 error of each other (a near tie), two float32 computations may route it differently, and its output moves
by O(1) -- that is not a bug, and random weights produce it now and then. transformers' own float64 model routes
in float32 too (it takes the router's softmax in float32). So every comparison first measures the smallest routing
gap in the float64 reference over the real tokens and every layer (`routing_gap`), and skips the example (Hypothesis
draws another) where it is within twice the logit tolerance, the rule test_olmo.py's assert_same_greedy uses for
near-tied tokens.
"""

import copy
import json
import os
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import convert
import olmo
import olmo_numpy
import test_quantize
import transformers
from conftest import (ATOL, BF16_TOL, FP32_TOL, RTOL, assert_close, draw_head_dim, draw_shape, ids_for, randomize,
                      train_tokenizer)
from test_cli import main_in_process
from test_olmo import assert_packing_changes_nothing, assert_same_greedy, left_pad, np_step_logits, step_logits

FAMILIES = {"olmoe": ("OlmoeConfig", "OlmoeForCausalLM"), "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM")}


@st.composite
def moe_configs(draw, families=tuple(FAMILIES)):
    """A small OLMoE or FlexOlmo config: 1 to 8 experts, top-k from 1 to all of them, norm_topk_prob both ways,
    MHA/GQA/MQA, bias, tying, each activation, RoPE plain or scaled; OLMoE's clip_qkv."""
    kind = draw(st.sampled_from(families))
    heads = draw(st.sampled_from([1, 2, 4]))
    experts = draw(st.integers(1, 8))
    scaling = draw(st.sampled_from([None, "linear", "yarn"]))
    layers = draw(st.integers(1, 2))
    cfg = dict(
        model_type=kind,
        **draw_shape(draw, heads, intermediate=(4, 48), max_positions=[16, 64]),
        num_hidden_layers=layers,
        rms_norm_eps=draw(st.sampled_from([1e-5, 1e-6, 0.1])),
        rope_parameters={"rope_type": "default", "rope_theta": draw(st.sampled_from([10000.0, 500.0]))},
        num_experts=experts,
        num_experts_per_tok=draw(st.integers(1, experts)),
        norm_topk_prob=draw(st.booleans()),
        router_aux_loss_coef=draw(st.sampled_from([0.01, 0.5])),
        pad_token_id=1, bos_token_id=None, eos_token_id=None,
    )
    if scaling:
        cfg["rope_parameters"].update(rope_type=scaling, factor=draw(st.floats(1.5, 4.0)))
    if scaling == "yarn":
        cfg["rope_parameters"]["original_max_position_embeddings"] = 8
    if kind == "olmoe":
        cfg["clip_qkv"] = draw(st.none() | st.floats(0.3, 2.0))
    # OLMoE's q_norm spans hidden_size in transformers, so its attention runs only without a head_dim of its own
    return draw_head_dim(draw, cfg, allowed=kind == "flex_olmo")


def moe_reference(cfg, seed=0):
    """transformers' model of cfg's family with test_olmo.py's reference weights (unit-variance projections, norm
    weights 1 +- 0.3), experts included: the router's logits come out O(1), so routing really depends on the input.
    Its experts run transformers' "eager" implementation, the reference one (the default "grouped_mm" refuses
    float64 and, on the CPU, rows that aren't a multiple of 16 bytes)."""
    config_class, model_class = (getattr(transformers, name) for name in FAMILIES[cfg["model_type"]])
    model = model_class(config_class(**{k: v for k, v in cfg.items() if k != "model_type"}))
    model.set_experts_implementation("eager")
    return randomize(model, seed)


def save_moe(ref, path, fused=False):
    """save_pretrained's default writes one tensor per expert, as the hub's checkpoints are (the layout both twins
    read); fused=True writes the experts as transformers 5 holds them in memory (save_original_format=False), a
    layout both twins refuse."""
    ref.save_pretrained(path, save_original_format=not fused)
    return str(path)


def routing_gap(ref, ids, mask=None, atol=ATOL, rtol=RTOL):
    """The smallest margin, over real tokens and layers, between a token's k-th and (k+1)-th router logits in the
    float64 reference, as a multiple of the tie allowance 2 (atol + rtol |logit|): below 1, float32 (for ATOL, RTOL)
    may route either way (see the module docstring). inf when every expert is chosen."""
    ref64 = copy.deepcopy(ref).double()
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        router_logits = ref64(ids, attention_mask=mask, output_router_logits=True).router_logits
    k, gap = ref.config.num_experts_per_tok, float("inf")
    for logits in router_logits:  # (B*T, experts) per layer
        top = logits[mask.flatten().bool()].sort(dim=-1, descending=True).values
        if k < top.shape[-1]:
            margin = (top[:, k - 1] - top[:, k]) / (2 * (atol + rtol * top.abs().max(dim=-1).values))
            gap = min(gap, margin.min().item())
    return gap


def padded_batch(cfg, lengths, seed):
    return left_pad([ids_for(cfg, 1, n, seed + i)[0] for i, n in enumerate(lengths)])


# ----------------------------------------------------------------------------------------------------------------
# olmo.py against transformers


@settings(max_examples=30)
@given(cfg=moe_configs(), lengths=st.lists(st.integers(1, 16), min_size=1, max_size=2), seed=st.integers(0, 99))
def test_moe_logits_and_loss_equal_transformers(cfg, lengths, seed):
    """Logits of a (padded) batch against float64; the loss with and without the
    router's load-balancing loss (output_router_logits from the argument or from config.json), against
    transformers' on the same labels."""
    ref = moe_reference(cfg, seed)
    ids, mask = padded_batch(cfg, lengths, seed)
    assume(routing_gap(ref, ids, mask) > 1)
    # labels only where the predicting position is a real token: logits at padding are meaningless in both
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    labels[0, :1] = -100
    with tempfile.TemporaryDirectory() as d:
        model = olmo.OlmoForCausalLM.from_pretrained(save_moe(ref, d))
    assert model.config.moe and model.config.num_experts == cfg["num_experts"]
    with torch.no_grad():
        exact = copy.deepcopy(ref).double()(ids, attention_mask=mask).logits
        expected = ref(ids, attention_mask=mask, labels=labels, output_router_logits=True)
        logits, loss = model(ids, attention_mask=mask, labels=labels)
        _, loss_aux = model(ids, attention_mask=mask, labels=labels, output_router_logits=True)
        model.config.output_router_logits = True
        _, loss_aux_config = model(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    assert_close(logits[real].double(), exact[real], **FP32_TOL)
    if not (labels[:, 1:] != -100).any():
        return  # nothing to predict: NaN both
    # each cross-entropy term within twice a logit's allowance (test_olmo.py); the aux loss is a sum of products of
    # float32 means of probabilities in [0, 1] and counts: a few U relative to its size (<= top_k * experts)
    allowance = 2 * (ATOL + RTOL * exact.abs().max().item())
    cross_entropy = expected.loss - cfg["router_aux_loss_coef"] * expected.aux_loss
    assert_close(loss, cross_entropy, atol=allowance, rtol=0)
    assert_close(loss_aux, expected.loss, atol=allowance, rtol=0)
    assert loss_aux_config == loss_aux
    assert loss_aux != loss or expected.aux_loss == 0


@settings(max_examples=20)
@given(cfg=moe_configs(), lengths=st.lists(st.integers(1, 10), min_size=2, max_size=3), new=st.integers(1, 10),
       seed=st.integers(0, 99))
def test_moe_cached_generation_equals_transformers_and_full_forward(cfg, lengths, new, seed):
    """A left-padded batch, greedy: transformers' tokens and per-step logits, and the logits of one full forward
    over the final sequence (cached decoding routes each new token as the full forward does)."""
    ref = moe_reference(cfg, seed)
    ids, mask = padded_batch(cfg, lengths, seed)
    with tempfile.TemporaryDirectory() as d:
        model = olmo.OlmoForCausalLM.from_pretrained(save_moe(ref, d))
    out = ref.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=1,
                       output_logits=True, return_dict_in_generate=True)
    tokens = model.generate(ids, new, attention_mask=mask)
    full_mask = torch.cat([mask, torch.ones(len(lengths), new, dtype=mask.dtype)], 1)
    assume(routing_gap(ref, out.sequences, full_mask) > 1 and routing_gap(ref, tokens, full_mask) > 1)
    T = ids.shape[1]
    steps = step_logits(model, ids, mask, tokens[:, T:])
    assert_same_greedy(tokens.numpy(), out.sequences.numpy(), steps.numpy(), T)
    same = (tokens == out.sequences).all(1)
    assert_close(steps[same], torch.stack(out.logits, 1)[same])
    with torch.no_grad():
        full = model(tokens[:, :-1], attention_mask=full_mask[:, :-1])[:, T - 1:]
    assert_close(full, steps)


@settings(max_examples=15)
@given(cfg=moe_configs(), lengths=st.lists(st.integers(1, 10), min_size=2, max_size=3), seed=st.integers(0, 99))
def test_moe_left_padded_rows_equal_prompts_alone(cfg, lengths, seed):
    """Padding never reaches a real token's routing: each row of a padded batch gets the logits and the greedy
    tokens it gets alone."""
    ref = moe_reference(cfg, seed)
    rows = [ids_for(cfg, 1, n, seed + i)[0] for i, n in enumerate(lengths)]
    ids, mask = left_pad(rows)
    with tempfile.TemporaryDirectory() as d:
        model = olmo.OlmoForCausalLM.from_pretrained(save_moe(ref, d))
    batch_tokens = model.generate(ids, 6, attention_mask=mask)
    assume(routing_gap(ref, batch_tokens, torch.cat([mask, torch.ones(len(rows), 6, dtype=mask.dtype)], 1)) > 1)
    with torch.no_grad():
        batch_logits = model(ids, attention_mask=mask)
        for i, row in enumerate(rows):
            n = len(row)
            assert_close(batch_logits[i, -n:], model(row[None])[0])
            alone = model.generate(row[None], 6)
            steps = step_logits(model, row[None], torch.ones(1, n, dtype=torch.long), alone[:, n:])
            assert_same_greedy(alone[:, n:].numpy(), batch_tokens[i:i + 1, -6:].numpy(), steps.numpy(), 0)


# ----------------------------------------------------------------------------------------------------------------
# The NumPy twin


@settings(max_examples=15)
@given(cfg=moe_configs(), lengths=st.lists(st.integers(1, 12), min_size=1, max_size=2), new=st.integers(1, 6),
       seed=st.integers(0, 99))
def test_moe_numpy_equals_olmo_and_transformers(cfg, lengths, new, seed):
    """The twin's logits against float64 and olmo.py's; its greedy tokens and per-step
    logits (prefill, then one token at a time) against olmo.py's on a padded batch."""
    ref = moe_reference(cfg, seed)
    ids, mask = padded_batch(cfg, lengths, seed)
    with tempfile.TemporaryDirectory() as d:
        save_moe(ref, d)
        model, twin = olmo.OlmoForCausalLM.from_pretrained(d), olmo_numpy.OlmoForCausalLM.from_pretrained(d)
    tokens = model.generate(ids, new, attention_mask=mask)
    full_mask = torch.cat([mask, torch.ones(len(lengths), new, dtype=mask.dtype)], 1)
    assume(routing_gap(ref, tokens, full_mask) > 1)
    real = mask.bool().numpy()
    with torch.no_grad():
        exact = copy.deepcopy(ref).double()(ids, attention_mask=mask).logits.numpy()
        logits = model(ids, attention_mask=mask).numpy()
    twin_logits = twin(ids.numpy(), mask.numpy())
    assert_close(torch.from_numpy(twin_logits[real]).double(), torch.from_numpy(exact[real]), **FP32_TOL)
    assert_close(twin_logits[real], logits[real])
    twin_tokens = twin.generate(ids.numpy(), new, attention_mask=mask.numpy())
    T = ids.shape[1]
    twin_steps = np_step_logits(twin, ids.numpy(), mask.numpy(), twin_tokens[:, T:])
    assert_same_greedy(twin_tokens, tokens.numpy(), twin_steps, T)
    same = (twin_tokens == tokens.numpy()).all(1)
    assert_close(twin_steps[same], step_logits(model, ids, mask, tokens[:, T:]).numpy()[same])


# ----------------------------------------------------------------------------------------------------------------
# Only the chosen experts are read


class Reads(dict):
    """The twin's weight dict, noting each name read."""

    def __init__(self, weights):
        super().__init__(weights)
        self.read = set()

    def __getitem__(self, name):
        self.read.add(name)
        return super().__getitem__(name)

    def get(self, name, default=None):
        self.read.add(name)
        return super().get(name, default)


@pytest.mark.parametrize("kind", FAMILIES)
def test_one_token_reads_only_its_experts(kind, tmp_path):
    """At batch-1 decode, each layer reads the weights of exactly the top_k experts the reference router picks for
    that token (olmo.py: the experts run; the twin: the weight names read), and no other expert's."""
    cfg = {"model_type": kind, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 8, "num_experts_per_tok": 3,
           "pad_token_id": 1, "eos_token_id": None}
    ref = moe_reference(cfg, 1)
    ids = ids_for(cfg, 1, 6, 1)
    assert routing_gap(ref, ids) > 1
    with torch.no_grad():
        router_logits = ref(ids, output_router_logits=True).router_logits
    picked = [set(logits[-1].topk(3).indices.tolist()) for logits in router_logits]  # the last token's, per layer
    save_moe(ref, tmp_path)
    model, twin = olmo.OlmoForCausalLM.from_pretrained(tmp_path), olmo_numpy.OlmoForCausalLM.from_pretrained(tmp_path)
    ran = [set() for _ in model.model.layers]
    for i, layer in enumerate(model.model.layers):
        for e, expert in enumerate(layer.mlp.experts):
            expert.register_forward_hook(lambda module, args, out, i=i, e=e: ran[i].add(e))
    model.setup_cache(torch.ones_like(ids), 6)
    twin.setup_cache(np.ones((1, 6), dtype=np.int64), 6)
    with torch.no_grad():
        model.prefill(ids[:, :5], torch.ones(1, 5, dtype=torch.long))
    twin.prefill(ids[:, :5].numpy(), np.ones((1, 5), dtype=np.int64))
    for r in ran:
        r.clear()
    twin.weights = Reads(twin.weights)
    with torch.no_grad():
        model.decode_one_token(ids[:, 5:], torch.tensor([5]), torch.tensor([[5]]))
    twin.decode_one_token(ids[:, 5:].numpy(), np.array([5]), np.array([[5]]))
    assert ran == picked
    for i, experts in enumerate(picked):
        prefix = f"model.layers.{i}.mlp.experts."
        read = {int(name.split(".")[5]) for name in twin.weights.read if name.startswith(prefix)}
        assert read == experts


# ----------------------------------------------------------------------------------------------------------------
# Config and checkpoints


@pytest.mark.parametrize("kind", FAMILIES)
def test_moe_config_defaults_are_transformers_defaults(kind):
    """For the keys a config.json leaves out, each family's transformers defaults (they differ from OLMo's)."""
    theirs = getattr(transformers, FAMILIES[kind][0])()
    for module in (olmo, olmo_numpy):
        ours = module.OlmoConfig.from_dict({"model_type": kind})
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "pad_token_id",
                     "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_bias", "clip_qkv",
                     "num_experts", "num_experts_per_tok", "norm_topk_prob", "output_router_logits",
                     "router_aux_loss_coef"):
            if hasattr(theirs, name):
                assert getattr(ours, name) == getattr(theirs, name), (module.__name__, name)
        assert ours.rope_parameters["full_attention"] == theirs.rope_parameters


MOE_VALID = dict(model_type="olmoe", hidden_size=32, num_attention_heads=4, num_experts=4, num_experts_per_tok=2)


@pytest.mark.parametrize("change, field", [
    ({"num_experts": 0}, "num_experts"),
    ({"num_experts": 2.0}, "num_experts"),
    ({"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ({"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ({"num_experts_per_tok": None}, "num_experts_per_tok"),
    ({"norm_topk_prob": "true"}, "norm_topk_prob"),
    ({"output_router_logits": 1}, "output_router_logits"),
    ({"router_aux_loss_coef": float("nan")}, "router_aux_loss_coef"),
    ({"router_aux_loss_coef": "0.01"}, "router_aux_loss_coef"),
    ({"router_jitter_noise": 0.1}, "router_jitter_noise"),
    ({"router_z_loss_coef": 0.001}, "router_z_loss_coef"),
    ({"moe_layer_freq": 2}, "moe_layer_freq"),
    ({"topk_method": "group_limited_greedy"}, "topk_method"),
    ({"num_local_experts": 4}, "num_local_experts"),  # an alias transformers reads but never writes
    ({"model_type": "flex_olmo", "clip_qkv": 8.0}, "clip_qkv"),
])
def test_bad_moe_configs_are_rejected_naming_the_field(change, field):
    for module in (olmo, olmo_numpy):
        with pytest.raises(ValueError, match=field):
            module.OlmoConfig.from_dict({**MOE_VALID, **change})


def test_dense_models_ignore_the_moe_fields():
    assert not olmo.OlmoConfig.from_dict({"model_type": "olmo2", "num_experts": 0}).moe


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    cfg = {"model_type": "olmoe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 16,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4,
           "num_experts_per_tok": 2, "pad_token_id": 1, "eos_token_id": None}
    ref = moe_reference(cfg, 2)
    return save_moe(ref, tmp_path_factory.mktemp("experts")), ref


def rewrite(path, dest, edit):
    """A copy of the checkpoint at path with its tensors edited: edit(dict of name -> tensor)."""
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(path, "config.json")) as f, open(os.path.join(dest, "config.json"), "w") as g:
        g.write(f.read())
    tensors = load_file(os.path.join(path, "model.safetensors"))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(dest, "model.safetensors"),
              metadata={"format": "pt"})
    return str(dest)


def both_refuse(path, message):
    for module in (olmo, olmo_numpy):
        with pytest.raises(ValueError, match=message):
            module.OlmoForCausalLM.from_pretrained(path)


def test_experts_load_as_the_hub_ships_them_and_bad_ones_are_named(moe_checkpoint, tmp_path):
    """One tensor per expert, as the hub and save_pretrained write them: each lands in its expert unchanged. A
    missing expert, swapped shapes, transformers' in-memory fused layout and a dense model_type are refused by
    name."""
    path, ref = moe_checkpoint
    tensors = load_file(os.path.join(path, "model.safetensors"))
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    for module in (olmo, olmo_numpy):
        model = module.OlmoForCausalLM.from_pretrained(path)
        weights = model.state_dict() if module is olmo else model.weights
        assert np.array_equal(np.asarray(weights[name]), tensors[name])
    both_refuse(rewrite(path, tmp_path / "three", lambda t: t.pop(name)), f"missing tensor {name}")

    def swap(t):  # up_proj (16, 32) and down_proj (32, 16) trade names: the shapes tell
        t[name], t[name.replace("up_proj", "down_proj")] = t[name.replace("up_proj", "down_proj")], t[name]
    both_refuse(rewrite(path, tmp_path / "swap", swap), "has shape")
    fused = save_moe(ref, tmp_path / "fused", fused=True)
    assert "model.layers.1.mlp.experts.gate_up_proj" in load_file(os.path.join(fused, "model.safetensors"))
    both_refuse(fused, r"missing tensor model\.layers\.0\.mlp\.experts\.0\.gate_proj\.weight")
    with open(os.path.join(path, "config.json")) as f:
        dense = {**json.load(f), "model_type": "olmo2"}
    (tmp_path / "dense").mkdir()
    os.link(os.path.join(path, "model.safetensors"), tmp_path / "dense" / "model.safetensors")
    (tmp_path / "dense" / "config.json").write_text(json.dumps(dense))
    both_refuse(str(tmp_path / "dense"), "missing tensor|unexpected tensor")


@pytest.mark.parametrize("kind", FAMILIES)
def test_convert_rewrites_moe_checkpoints(kind, tmp_path):
    """convert.py's transformers layout takes OLMoE and FlexOlmo as the hub ships them (one tensor per expert):
    bf16 out, every tensor and config key kept; transformers' fused layout is refused, naming what it lacks."""
    cfg = {"model_type": kind, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
           "pad_token_id": 1, "eos_token_id": None}
    ref = moe_reference(cfg, 4)
    convert.convert(save_moe(ref, tmp_path / "src"), tmp_path / "dst", dtype="bfloat16")
    src, out = load_file(tmp_path / "src" / "model.safetensors"), load_file(tmp_path / "dst" / "model.safetensors")
    assert out.keys() == src.keys() and "model.layers.1.mlp.experts.3.up_proj.weight" in out
    assert all(torch.equal(t, src[name].to(torch.bfloat16)) for name, t in out.items())
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config == {**json.loads((tmp_path / "src" / "config.json").read_text()), "dtype": "bfloat16"}
    with pytest.raises(convert.ConversionError, match=r"lacks 24 tensor.*experts\.0\.gate_proj\.weight"):
        convert.convert(save_moe(ref, tmp_path / "fused", fused=True), tmp_path / "dst2")


def test_int8_quantizes_the_experts_and_keeps_the_router(tmp_path):
    """--quantize int8: every expert's weights become int8 while the router stays as the checkpoint has it (as
    llama.cpp keeps it), in both twins; the logits are those of the float model whose linear weights are the
    dequantized ones, within test_quantize.py's INT8_TOL (olmo.py) and ATOL / RTOL (the twin, which dequantizes
    in float32), on weights whose routing has no near tie at INT8_TOL."""
    cfg = {"model_type": "olmoe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 3,
           "pad_token_id": 1, "eos_token_id": None}
    path = save_moe(moe_reference(cfg, 8), tmp_path / "float")
    dequantized = test_quantize.dequantized_checkpoint(path, str(tmp_path / "dequantized"), False)
    ids = ids_for(cfg, 1, 5, 8)  # with these weights, a routing far from any tie at INT8_TOL (1.5 x the allowance)
    reference = transformers.OlmoeForCausalLM.from_pretrained(dequantized).eval()
    reference.set_experts_implementation("eager")
    assert routing_gap(reference, ids, **test_quantize.INT8_TOL) > 1
    model = olmo.OlmoForCausalLM.from_pretrained(path, quantize="int8")
    twin = olmo_numpy.OlmoForCausalLM.from_pretrained(path, quantize="int8")
    router = load_file(os.path.join(path, "model.safetensors"))["model.layers.1.mlp.gate.weight"]
    layer = model.model.layers[1].mlp
    assert type(layer.gate) is torch.nn.Linear and torch.equal(layer.gate.weight, router)
    assert all(isinstance(expert.down_proj, olmo.Int8Linear) for expert in layer.experts)
    assert np.array_equal(twin.weights["model.layers.1.mlp.gate.weight"], router.numpy())
    assert twin.weights["model.layers.1.mlp.experts.3.down_proj.weight"].dtype == np.int8
    with torch.no_grad():
        expected = olmo.OlmoForCausalLM.from_pretrained(dequantized)(ids)
        assert_close(model(ids).float(), expected, **test_quantize.INT8_TOL)
    assert_close(twin(ids.numpy()), expected.numpy())


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="torch's oneDNN has no bf16 here")
def test_packed_bfloat16_moe_equals_unpacked(tmp_path):
    """In bfloat16 on the CPU every linear layer is packed for oneDNN, the router's and each expert's included,
    and changes no product beyond a float32 summation order (test_olmo.py's assert_packing_changes_nothing). Two
    bfloat16 computations that differ by that may route a token differently where its k-th and (k+1)-th router
    logits tie within BF16_TOL: these weights route every token of the prompt, and of the greedy continuation,
    far from such a tie."""
    cfg = {"model_type": "olmoe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 3,
           "pad_token_id": 1, "eos_token_id": None}
    ref = moe_reference(cfg, 8).to(torch.bfloat16)
    path = save_moe(ref, tmp_path / "bf16")
    ids = ids_for(cfg, 1, 5, 8)
    tokens = olmo.OlmoForCausalLM.from_pretrained(path).generate(ids[:, :4], 3)
    assert min(routing_gap(ref, ids, **BF16_TOL), routing_gap(ref, tokens[:, :-1], **BF16_TOL)) > 1
    assert_packing_changes_nothing(path, ids, prompt=4, new=3)


# ----------------------------------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize("kind", FAMILIES)
def test_cli_generates_transformers_tokens(kind, tmp_path, capsys):
    """Both twins' command lines, with a tokenizer, print the prompt and transformers' own greedy continuation."""
    cfg = {"model_type": kind, "vocab_size": 300, "hidden_size": 32, "intermediate_size": 16,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 6,
           "num_experts_per_tok": 2, "norm_topk_prob": kind == "flex_olmo", "pad_token_id": 1, "eos_token_id": 0}
    ref = moe_reference(cfg, 3)
    save_moe(ref, tmp_path)
    tok = train_tokenizer(str(tmp_path), 300)
    prompt = "Language models"
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
    out = ref.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=1, eos_token_id=0)
    assert routing_gap(ref, out) > 1
    expected = prompt + tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True) + "\n"
    for module in (olmo, olmo_numpy):
        args = ["--model", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "12"]
        status, printed, err = main_in_process(module.main, args + ["--device", "cpu"] * (module is olmo), capsys)
        assert status == 0 and printed == expected, (module.__name__, err)
