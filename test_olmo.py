"""Tests: olmo.py (and its NumPy twin, the converter and the benchmark) against transformers, the reference.

Every check compares against transformers' OlmoForCausalLM on the same weights, or against a second computation
of the same quantity (cached vs uncached, padded vs alone) -- never against numbers copied from our own output.
Tolerances (fp32 on the CPU): logits agree to 1e-5. The two implementations run the same float32 operations,
mostly in the same order, so they typically agree bit for bit; 1e-5 on logits of order 1 leaves room for a
different kernel's summation order (~1e-6) while any real bug (a wrong rotation, a missed clip, a padding leak)
moves logits by 1e-3 or more.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import olmo

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
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


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
    step_logits = []
    tokens = model.generate(ids, new, attention_mask=mask, callback=lambda t: None)
    assert torch.equal(tokens, out.sequences)

    # the per-step logits, through the same prefill / decode_one_token path generate uses
    T = ids.shape[1]
    model.setup_cache(mask, T + new)
    with torch.no_grad():
        step_logits.append(model.prefill(ids, mask))
        for i in range(new - 1):
            position = mask.sum(-1, keepdim=True) + i
            step_logits.append(model.decode_one_token(tokens[:, T + i, None], torch.tensor([T + i]), position))
    assert_close(torch.stack(step_logits, 1), torch.stack(out.logits, 1))

    full_mask = torch.cat([mask, torch.ones(len(lengths), new - 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        full = model(tokens[:, :-1], attention_mask=full_mask)[:, T - 1:]
    dynamic_past_max = (cfg["rope_scaling"] or {}).get("rope_type") == "dynamic" and \
        max(lengths) + new - 1 > cfg["max_position_embeddings"]
    if dynamic_past_max:
        # Dynamic NTK changes the frequencies as the sequence grows, but cached keys keep the rotation they got
        # when they were computed; transformers behaves exactly so (checked above), and a full forward differs.
        assume(new > 1)
        assert not torch.allclose(full, torch.stack(step_logits, 1), atol=1e-3)
    else:
        assert_close(full, torch.stack(step_logits, 1))


def left_pad(rows, pad=1):
    """Token rows of different lengths -> (ids, attention_mask), padded on the left as generate expects."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    return ids, mask


@settings(max_examples=20)
@given(cfg=configs(), lengths=st.lists(st.integers(1, 10), min_size=2, max_size=3), seed=st.integers(0, 99))
def test_left_padded_rows_equal_prompts_alone(cfg, lengths, seed):
    scaling = cfg["rope_scaling"] or {}
    # With dynamic RoPE past the trained length the frequencies depend on the longest row in the batch (as in
    # transformers), so a short row alone would legitimately differ.
    assume(scaling.get("rope_type") != "dynamic" or max(lengths) + 6 <= cfg["max_position_embeddings"])
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
    from safetensors import safe_open
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
    from safetensors.torch import load_file, save_file
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(path):
        if name != "model.safetensors":
            with open(os.path.join(path, name), "rb") as src, open(os.path.join(dest, name), "wb") as dst:
                dst.write(src.read())
    save_file(edit(load_file(os.path.join(path, "model.safetensors"))), os.path.join(dest, "model.safetensors"))
    return dest


@pytest.mark.parametrize("edit, message", [
    (lambda sd: {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"},
     "missing tensor model.layers.1.mlp.up_proj.weight"),
    (lambda sd: {**sd, "model.layers.0.self_attn.rotary.weight": torch.zeros(1)},
     "unexpected tensor model.layers.0.self_attn.rotary.weight"),
    (lambda sd: {**sd, "model.layers.0.self_attn.k_proj.weight": torch.zeros(32, 32)},
     r"model.layers.0.self_attn.k_proj.weight has shape \(32, 32\), expected \(16, 32\)"),
    (lambda sd: {k: v for k, v in sd.items() if k != "lm_head.weight"}, "missing tensor lm_head.weight"),
])
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
def cli_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cli"))
    cfg = {**SMALL, "vocab_size": 300, "eos_token_id": 0}
    save(reference_model(cfg, 5), path)
    tok = train_tokenizer(path, 300)
    return path, tok


def run_cli(*args, script="olmo.py", env=None):
    """The CLI as a user runs it: a fresh process, so exit status, stdout/stderr and tracebacks are real."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=120)


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
    model = olmo.OlmoForCausalLM.from_pretrained(path)
    ids = tok.encode(prompt, add_special_tokens=False).ids
    new = model.generate(torch.tensor([ids]), 24, eos_token_id=0)[0, len(ids):].tolist()
    assert result.stdout == prompt + tok.decode(new, skip_special_tokens=True) + "\n"
    assert "tokens/s" in result.stderr and "Traceback" not in result.stderr


def test_cli_streaming_never_splits_a_character(cli_checkpoint, monkeypatch):
    """Feed the streamer tokens that split multi-byte characters: every chunk it prints must be whole text."""
    path, tok = cli_checkpoint
    ids = tok.encode("🙂日本語🙂", add_special_tokens=False).ids
    byte_ids = [tok.token_to_id(c) for c in "".join(tok.id_to_token(i) for i in ids)]  # one byte per token
    assert len(byte_ids) > len(ids) and None not in byte_ids

    def scripted_generate(self, input_ids, max_new_tokens, callback=None, **kw):  # "generates" the byte tokens
        for t in byte_ids:
            callback(torch.tensor([t]))

    chunks = []
    monkeypatch.setattr(olmo.OlmoForCausalLM, "generate", scripted_generate)
    monkeypatch.setattr("builtins.print", lambda *a, file=None, end="\n", flush=False:
                        file is None and chunks.append((a[0] if a else "") + end))
    olmo.run(olmo.parse_args(["--model", path, "--prompt", "x", "--max-new-tokens", "50"]))
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
    assert subprocess.run([sys.executable, "-c", code], cwd=HERE).returncode == 0


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
    ("missing_tensor", "missing tensor model.norm"),
    ("bad_shape", "model.embed_tokens.weight has shape"),
    ("no_tokenizer", "tokenizer.json"),
])
def test_cli_bad_checkpoints_one_line_exit_2(cli_checkpoint, tmp_path, breakage, message, capsys):
    path, _ = cli_checkpoint
    bad = rewrite_weights(path, str(tmp_path / "bad"), {
        "missing_tensor": lambda sd: {**{k: v for k, v in sd.items() if k != "model.layers.0.mlp.up_proj.weight"}},
        "bad_shape": lambda sd: {**sd, "model.embed_tokens.weight": torch.zeros(3, 32)},
    }.get(breakage, lambda sd: sd))
    config = os.path.join(bad, "config.json")
    if breakage == "no_config":
        os.remove(config)
    if breakage == "bad_json":
        open(config, "w").write("{not json")
    if breakage == "not_olmo":
        d = json.load(open(config))
        open(config, "w").write(json.dumps({**d, "model_type": "llama"}))
    if breakage == "no_tokenizer":
        os.remove(os.path.join(bad, "tokenizer.json"))
    if breakage == "missing_tensor":
        message = "missing tensor model.layers.0.mlp.up_proj.weight"
    status, out, err = main_in_process(olmo.main, ["--model", bad, "--prompt", "hi"], capsys)
    assert status == 2 and out == ""
    assert message in err and err.count("\n") == 1


def test_cli_ctrl_c_keeps_what_was_printed(cli_checkpoint):
    path, _ = cli_checkpoint
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "olmo.py"), "--model", path, "--prompt", "Go",
                             "--max-new-tokens", "3000", "--temperature", "1", "--seed", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stdout.read(2)  # the prompt is printed before generation starts
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert first == "Go" and proc.returncode == 130
    assert "Traceback" not in err and (first + rest).endswith("\n")


# ----------------------------------------------------------------------------------------------------------------
# GPU (skipped without CUDA)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_7b_shape_bf16_on_gpu_equals_transformers(tmp_path):
    """The OLMo-7B shape with random bf16 weights. bf16 keeps 8 mantissa bits, and the two implementations
    round intermediate results at different points (e.g. transformers' eager vs SDPA attention), so logits
    agree to ~1e-2 relative, not 1e-5: tolerance 0.05 absolute on logits of order 1, plus 1% relative."""
    config = transformers.OlmoConfig(num_hidden_layers=4)  # 4 of the 32 layers keep the test fast
    ref = transformers.OlmoForCausalLM(config).to("cuda", torch.bfloat16).eval()
    ref.save_pretrained(tmp_path)
    model = olmo.OlmoForCausalLM.from_pretrained(str(tmp_path), device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 50280, (2, 64), device="cuda")
    with torch.no_grad():
        assert_close(model(ids).float(), ref(ids).logits.float(), atol=0.05, rtol=0.01)


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
