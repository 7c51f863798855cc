"""Shared by the tests: the tolerances and their derivation, random small configs and the models built from
them, and the checkpoints more than one test file reads. The tests import what they use from here (`from conftest
import ...`); pytest finds the fixtures by name.

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

import contextlib
import copy
import json
import os
import resource
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
import torch
import transformers  # the reference: a test dependency only, never imported by the code under test
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file


transformers.logging.set_verbosity_error()


# Deterministic in CI: the same examples every run, no per-example deadline (model building is slow-ish).
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")

HERE = os.path.dirname(os.path.abspath(__file__))
U = 2.0 ** -24  # float32's unit roundoff: every +, -, *, / of float32 numbers is exact times (1 + d), |d| <= U
LIB = 32 * U  # what we grant a float32 library exp, tanh or erf: see test_olmo.py's test_numpy_erf_and_activations
FP32_TOL = dict(atol=512 * U, rtol=512 * U)  # one float32 forward against float64: see the module docstring
ATOL = RTOL = 2 * 512 * U  # two float32 computations against each other: see the module docstring
BF16_TOL = dict(atol=32 * 2.0 ** -8, rtol=8 * 2.0 ** -8)  # bf16: test_olmo.py's test_sharded_bin_and_dtype_loading
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
        # OLMo 3 keeps YaRN's truncate: transformers 5.23 reads truncate off the top of rope_parameters, which OLMo 3
        # nests per layer type, so it truncates whatever the key says; olmo.py takes the key as written (as for
        # every other generation, where transformers does too)
        rope_scaling.update(original_max_position_embeddings=draw(st.sampled_from([4, 8])),
                            truncate=draw(st.booleans()) or kind == "olmo3",
                            beta_fast=draw(st.sampled_from([32.0, 4.0])), beta_slow=draw(st.sampled_from([1.0, 0.5])),
                            attention_factor=draw(st.none() | st.floats(0.5, 1.5)))
    cfg = dict(
        model_type=kind,
        **draw_shape(draw, heads, intermediate=(8, 64), max_positions=[8, 16, 64]),
        num_hidden_layers=layers,
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
    return draw_head_dim(draw, cfg)


def draw_shape(draw, heads, intermediate, max_positions):
    """The fields every config strategy (these, test_family_moe.py's, test_family_hybrid.py's) draws alike, in this
    order: vocabulary and widths, MHA/GQA/MQA for `heads` query heads, each activation, the trained length (from
    max_positions: each strategy's sequences run past some), tying and biases. intermediate: (low, high)."""
    return dict(
        vocab_size=draw(st.integers(40, 130)),
        hidden_size=heads * draw(st.sampled_from([4, 8, 16])),
        intermediate_size=draw(st.integers(*intermediate)),
        num_attention_heads=heads,
        num_key_value_heads=draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])),
        hidden_act=draw(st.sampled_from(ACTIVATIONS)),
        max_position_embeddings=draw(st.sampled_from(max_positions)),
        tie_word_embeddings=draw(st.booleans()),
        attention_bias=draw(st.booleans()),
    )


def draw_head_dim(draw, cfg, allowed=True):
    """cfg with head_dim in about half the draws (when allowed), the key transformers reads when config.json gives
    it (absent: hidden_size // num_attention_heads); drawn either way, so `allowed` changes no other draw."""
    head_dim = draw(st.none() | st.sampled_from([6, 12]))
    if head_dim is not None and allowed:
        cfg["head_dim"] = head_dim
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
    return randomize(model, seed)


def randomize(model, seed):
    """reference_model's weights, for any transformers model: unit-variance projections (std 1/sqrt(fan_in)),
    norm weights 1 +- 0.3, other vectors (biases, ...) ~ N(0, 0.3); drawn in named_parameters' order."""
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


def load_keys(path):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return set(f.keys())


def rewrite_weights(path, dest, edit):
    """Copy a checkpoint, passing its tensors through edit(dict) -> dict."""
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(path):
        if name != "model.safetensors":
            with open(os.path.join(path, name), "rb") as src, open(os.path.join(dest, name), "wb") as dst:
                dst.write(src.read())
    save_file(edit(load_file(os.path.join(path, "model.safetensors"))), os.path.join(dest, "model.safetensors"))
    return dest


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and processes shared by several test files


@pytest.fixture(autouse=True)
def torch_threads():
    """Every test starts with the process's own torch thread count: loading a float32 model with pack=True sets it
    to 1 (olmo.PackedLinear: NumPy's BLAS runs the products), and the tests after it would run on one core."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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


@pytest.fixture(scope="session")
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


# ----------------------------------------------------------------------------------------------------------------
# Files that aren't what they seem, and bounds that make a hang or a memory blow-up fail instead
#
# The tests of FIFOs, /dev/zero linked in and sparse 6 GB files set up the real thing. One that would hang or
# exhaust memory on broken code is bounded instead (a FIFO is released after a while, memory is capped, a
# subprocess has a timeout), so that it fails rather than takes the machine down.


@contextlib.contextmanager
def fifo_released(path, seconds=10):
    """Should something wait on the FIFO at path (a bug), a separate process opens it for writing every
    `seconds` and closes it: each waiting reader sees an empty file, and the test fails instead of hanging. (A
    thread of this process can't do it: a reader blocked in Rust code, the tokenizers library's, holds the GIL.)"""
    releaser = subprocess.Popen([sys.executable, "-c", f"""
import os, time
while True:
    time.sleep({seconds})
    try:
        os.close(os.open({str(path)!r}, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader waiting
        pass
"""])
    try:
        yield
    finally:
        releaser.kill()
        releaser.wait()


@contextlib.contextmanager
def memory_cap(extra=2**30):
    """This process may map at most `extra` more bytes for the duration: a reader of /dev/zero or of a sparse
    6 GB file (a bug) gets a MemoryError instead of taking the machine's memory."""
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def capped(limit=2**32):
    """preexec_fn for a subprocess: at most `limit` bytes of address space (torch and a tiny model fit in 4 GiB)."""
    return lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def one_error_line(err):
    lines = [line for line in err.splitlines() if not line.startswith(("loaded ", "converting ", "["))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def transformers_source(cli_checkpoint, path):
    """A copy of cli_checkpoint (transformers layout, with tokenizer.json and generation_config.json)."""
    path.mkdir(parents=True)
    for name in os.listdir(cli_checkpoint[0]):
        (path / name).write_bytes(open(os.path.join(cli_checkpoint[0], name), "rb").read())
    return path


def make_fifo(path):
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def link_dev_zero(path):
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


def sparse(path, size=6 * 10**9):
    with open(path, "r+b" if path.exists() else "wb") as f:
        f.truncate(size)
