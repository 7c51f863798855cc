"""Tests: --quantize int8 (olmo.py's Int8Linear, the NumPy twin's quantize_rows and linear).

Int8 weights are the checkpoint's, quantized at load: each row of each linear weight (the head's included) gets
one float32 scale = max |row| / 127 and int8 q = round(w / scale). So the int8 model is, exactly, a float model
whose linear weights are q * scale (the "dequantized" weights): the tests compare it with that float model,
loaded from a checkpoint holding q * scale, and bound how far quantization moves greedy tokens and perplexity.

INT8_TOL: on the CPU, olmo.py's int8 product (Int8Linear: torch's _weight_int8pack_mm) takes its activations and
scales as bfloat16 and returns bfloat16, whatever the model's dtype: each product rounds its input, its scale and
its output to 8 significant bits, 2^-9 relative each (bfloat16's unit roundoff; the sum itself is float32), so an
output moves by at most 3 x 2^-9 = 1.5 x 2^-8 of the sum of |terms| (activations O(1), conftest's docstring). A
float32 model with int8 weights has 7 products per layer and the head: 15 such stages for 2 layers, against the
~30 stages of 2^-8 each that BF16_TOL (conftest) allows a bfloat16 model, so BF16_TOL bounds it too: 15 x 1.5 =
22.5 x 2^-8 in the worst case without amplification, ~sqrt(15) x 1.5 = 6 x 2^-8 typically, inside BF16_TOL's
32 x 2^-8 absolute plus 8 x 2^-8 relative. A bfloat16 model with int8 weights is a bfloat16 model whose weights
carry a bfloat16 scale (2^-9, as a bfloat16 weight's own rounding): BF16_TOL as it stands. A wrong scale, row or
rounding moves the logits by O(1) (a weight off by a whole scale step is ~1% of the row's largest: see
test_quantize_rows_error_is_half_a_scale_step_in_both_twins, where it fails the bound outright).
"""

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import olmo
import olmo_numpy
from conftest import ATOL, BF16_TOL, RTOL, SMALL, assert_close, ids_for, reference_model, rewrite_weights, save

INT8_TOL = BF16_TOL  # see the module docstring


def dequantized_checkpoint(path, dest, tied):
    """A copy of the checkpoint whose linear weights are q * scale (quantize_rows, the head's included) in
    float32: the float model the int8 one stands for. Tied: the head is the embedding's quantized copy while the
    embedding itself stays as it was, so the copy is written untied."""
    def edit(sd):
        if tied:
            sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        for name in sd:  # every linear weight: 2-D, all but the embedding and OLMoE's router (its experts too)
            if sd[name].ndim == 2 and name != "model.embed_tokens.weight" and not name.endswith(".mlp.gate.weight"):
                q, scale = olmo.quantize_rows(sd[name])
                sd[name] = q.float() * scale[:, None]
        return {k: v.contiguous() for k, v in sd.items()}
    rewrite_weights(path, dest, edit)
    if tied:
        config = olmo.read_json_object(os.path.join(dest, "config.json"))
        with open(os.path.join(dest, "config.json"), "w") as f:
            json.dump(dict(config, tie_word_embeddings=False), f)
    return dest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (64, 48), (300, 130)])
def test_quantize_rows_error_is_half_a_scale_step_in_both_twins(shape, dtype):
    """|w - q * scale| <= scale / 2 for every weight, plus float32's rounding of w / scale: that quotient is at most
    127 in size and rounds by at most 127 U < 2^-17, so q is within 1/2 + 2^-17 of it (checked in float64). The
    scale is the row's own (its largest weight gets +-127), a row of zeros gives zeros, and the NumPy twin computes
    the same q and scale (the same float32 operations)."""
    g = torch.Generator().manual_seed(shape[0])
    w = (torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[0])[:, None]).to(dtype)  # rows of all sizes
    w[0] = 0  # a row of zeros
    q, scale = olmo.quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and q.shape == w.shape
    err = (w.double() - q.double() * scale.double()[:, None]).abs()
    assert (err <= scale.double()[:, None] * (0.5 + 2.0 ** -17)).all()
    assert (q[0] == 0).all()
    assert (q[1:].abs().amax(dim=1) == 127).all()  # a tight scale: the largest weight uses the whole range
    q_np, scale_np = olmo_numpy.quantize_rows(w.float().numpy())
    assert q_np.dtype == np.int8 and scale_np.dtype == np.float32
    np.testing.assert_array_equal(q_np, q.numpy())
    np.testing.assert_array_equal(scale_np, scale.numpy())


CASES = {  # each generation, with what quantization must handle: biases (OLMo 1), a tied head, GQA, no bias
    "olmo1-bias-tied": dict(SMALL, model_type="olmo", attention_bias=True, tie_word_embeddings=True, clip_qkv=1.0),
    "olmo2": dict(SMALL, model_type="olmo2", rms_norm_eps=1e-6),
    "olmo3": dict(SMALL, model_type="olmo3", sliding_window=4, rope_theta=500000.0),
    # OLMoE (experts int8, the router float): test_family_moe.py's test_int8_quantizes_the_experts_and_keeps_the_router,
    # on weights whose routing has no near tie at INT8_TOL
}


@pytest.mark.parametrize("case", CASES)
def test_int8_logits_equal_float_model_on_dequantized_weights(tmp_path, case):
    """Both twins' int8 models against the float32 model on q * scale: the NumPy twin dequantizes in its product
    ((x q^T) * scale, a float32 computation of the same logits: ATOL/RTOL); olmo.py rounds its products' inputs to
    bfloat16 (INT8_TOL, the module docstring), also with bfloat16 activations (BF16_TOL). Int8 on both sides:
    every linear weight, the head's too, the embedding in float."""
    cfg = CASES[case]
    seed = 3
    path = save(reference_model(cfg, seed), str(tmp_path / "float"))
    exact = dequantized_checkpoint(path, str(tmp_path / "dequantized"), cfg["tie_word_embeddings"])
    ids = ids_for(cfg, 2, 11, seed)
    expected = olmo.OlmoForCausalLM.from_pretrained(exact)(ids).detach()
    model = olmo.OlmoForCausalLM.from_pretrained(path, quantize="int8")
    linears = [m for m in model.modules() if isinstance(m, olmo.Int8Linear)]
    assert len(linears) == 7 * cfg["num_hidden_layers"] + 1 and model.lm_head in linears
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert model.model.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        assert_close(model(ids), expected, **INT8_TOL)
        model16 = olmo.OlmoForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantize="int8")
        assert_close(model16(ids).float(), expected, **BF16_TOL)
    twin = olmo_numpy.OlmoForCausalLM.from_pretrained(path, quantize="int8")
    assert twin.weights["lm_head.weight"].dtype == np.int8
    assert twin.weights["model.embed_tokens.weight"].dtype == np.float32
    assert_close(twin(ids.numpy()), expected.numpy(), atol=ATOL, rtol=RTOL)


def test_int8_greedy_tokens_and_perplexity_near_float32(tmp_path):
    """What quantization costs, reported (pytest -s prints it) and bounded: the mean negative log-likelihood of a
    sequence moves by |d| <= 0.05 nats. Why that bound: a weight moves by at most half a scale step, scale = max
    |row| / 127, i.e. ~1% of a row's largest weight at most, ~0.6% of a typical one as an rms (uniform error of
    width scale: scale / sqrt(12), against weights of std ~max / 2.5); ~15 products in quadrature move an O(1)
    logit by ~sqrt(15) x 0.6% ~ 2.5%, ~0.05 at the largest, and a mean log-likelihood by less. Greedy tokens
    differ only after a near-tie; the steps that agree are reported, not asserted."""
    cfg = dict(SMALL, model_type="olmo2", vocab_size=128)
    path = save(reference_model(cfg, seed=7), str(tmp_path / "float"))
    ids = ids_for(cfg, 1, 24, seed=7)
    float32 = olmo.OlmoForCausalLM.from_pretrained(path)
    int8 = olmo.OlmoForCausalLM.from_pretrained(path, quantize="int8")
    with torch.no_grad():
        nll = [model(ids, labels=ids)[1].item() for model in (float32, int8)]
        tokens = [model.generate(ids[:, :4], 20)[0, 4:] for model in (float32, int8)]
    same = int((tokens[0] == tokens[1]).cumprod(0).sum())
    print(f"\nint8 vs float32: perplexity {math.exp(nll[1]):.4f} vs {math.exp(nll[0]):.4f} "
          f"(mean NLL {nll[1] - nll[0]:+.5f} nats); greedy tokens equal for the first {same} of 20")
    assert abs(nll[1] - nll[0]) <= 0.05


@pytest.mark.parametrize("script", ["olmo.py", "olmo_numpy.py"])
def test_cli_quantize_int8(cli_checkpoint, script, capsys):
    """--quantize int8 on the command line: the CLI prints the int8 model's own greedy continuation (from
    from_pretrained(..., quantize="int8"), a second path to it)."""
    path, tok = cli_checkpoint
    module = olmo if script == "olmo.py" else olmo_numpy
    prompt = "The cat sat"
    ids = tok.encode(prompt, add_special_tokens=False).ids
    array = torch.tensor if module is olmo else np.array
    model = module.OlmoForCausalLM.from_pretrained(path, quantize="int8")
    new = model.generate(array([ids]), 6, eos_token_id=0)
    expected = prompt + tok.decode([int(t) for t in new[0, len(ids):]], skip_special_tokens=True) + "\n"
    device = ["--device", "cpu"] if module is olmo else []
    status = module.main(["--model", path, "--prompt", prompt, "--max-new-tokens", "6", "--quantize", "int8",
                          *device])
    out, err = capsys.readouterr()
    assert status in (0, None) and out == expected, err
    assert "int8" in err or module is olmo_numpy  # olmo.py's "loaded" line names the weights


def test_int8_load_peak_memory(tmp_path):
    """Quantizing at load holds the int8 model and one float tensor at a time: the peak resident memory of
    from_pretrained(quantize="int8") on a float32 checkpoint stays within 1.15x the int8 model's bytes plus its
    largest float tensor (each float weight is unmapped once quantized: with the whole file kept mapped, the
    peak would add the checkpoint's bytes). Measured in a fresh process, from its resident set before loading."""
    cfg = dict(SMALL, model_type="olmo2", hidden_size=512, intermediate_size=4096, num_hidden_layers=8,
               num_attention_heads=8, num_key_value_heads=8, vocab_size=4096)  # mostly linear weights
    path = save(reference_model(cfg, seed=1), str(tmp_path / "float"))
    code = f"""
import sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import torch, bench, olmo
torch.ones(1) @ torch.ones(1)  # the libraries' own buffers, before the baseline
bench.reset_peak_rss()
base = bench.peak_rss()
model = olmo.OlmoForCausalLM.from_pretrained({path!r}, quantize="int8")
print(bench.peak_rss() - base)
print(sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())))
"""
    # glibc's malloc raises its mmap threshold as blocks are freed and may then keep freed heap memory (0-50 MB
    # here, run to run, for the same load): a fixed threshold measures what the model holds, not that retention
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    peak, int8_bytes = map(int, proc.stdout.split())
    largest = 4 * cfg["intermediate_size"] * cfg["hidden_size"]  # an MLP weight, in float32
    print(f"\nint8 load: peak {peak / 1e6:.0f} MB for an int8 model of {int8_bytes / 1e6:.0f} MB "
          f"(bound {(1.15 * int8_bytes + largest) / 1e6:.0f} MB)")
    assert peak <= 1.15 * int8_bytes + largest


def test_int8_compiled_decode_gives_eager_tokens(tmp_path):
    """--compile --quantize int8 through the CLI's own loader: the compiled step (inductor lowers Int8Linear's
    kernel) gives the eager int8 model's greedy tokens. (A scale cast inside the step failed to compile.)"""
    cfg = dict(SMALL, model_type="olmo2")
    path = save(reference_model(cfg, seed=2), str(tmp_path / "float"))
    ids = ids_for(cfg, 1, 5, seed=2)
    tokens = []
    for compile in (False, True):
        args = argparse.Namespace(device="cpu", seed=None, compile=compile, dtype="float32", quantize="int8")
        model = olmo.Backend().load(args, path)
        tokens.append(model.generate(ids, 8))
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("in_features", [16, 24, 40, 100])
@pytest.mark.parametrize("tokens", [1, 70])
def test_int8_linear_any_width(in_features, tokens):
    """Int8Linear's product for any input width: torch 2.13's CPU int8 kernel returns garbage or crashes the process
    (SIGSEGV) unless the width is a multiple of 16, so other widths must take the dequantizing product. Against
    x @ (q * scale)^T in float64: the kernel rounds x to bfloat16 (relative 2^-9 per element: 2^-9 sum_i |x_i w_i|
    at most), sums in float32 (in_features * 2^-24 times that sum, Higham's bound) and rounds the result to
    bfloat16 (2^-9 |y| <= 2^-9 sum_i |x_i w_i|); the float32 fallback is far inside that."""
    g = torch.Generator().manual_seed(in_features)
    q, scale = olmo.quantize_rows(torch.randn(33, in_features, generator=g))
    layer = olmo.Int8Linear(q, scale, None)
    x = torch.randn(tokens, in_features, generator=g)
    w = q.double() * layer.scale.double()[:, None]  # the scale as the layer holds it (bfloat16)
    exact = x.double() @ w.T
    bound = (2.0 ** -8 + in_features * 2.0 ** -24) * (x.double().abs() @ w.abs().T)
    assert ((layer(x).double() - exact).abs() <= bound).all()
