"""Tests of bench.py, and of what speed work on olmo.py could break (to be merged into test_olmo.py)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch

import bench
import olmo

_BN_ROOT = os.path.dirname(os.path.abspath(__file__))


def _bn_tiny_model(seed=0, **overrides):
    """A small fresh olmo model (small vocabulary, so it runs and compiles fast)."""
    torch.manual_seed(seed)
    config = olmo.OlmoConfig(**{**dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64), **overrides})
    model = olmo.OlmoForCausalLM(config).eval()
    for p in model.parameters():  # std 0.02 makes near-flat logits; scale up so greedy picks are clear-cut
        p.data.normal_(0, p.shape[-1] ** -0.5)
    return model


def test_bn_bench_tiny_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(_BN_ROOT, "bench.py"), "--shape", "tiny", "--device", "cpu",
                           "--prompt-len", "8", "--new-tokens", "4", "--reps", "1", "--json", str(out)],
                          capture_output=True, text=True, cwd=_BN_ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # quick on a busy machine too
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("model", "device", "dtype", "batch", "prompt_len", "new_tokens", "reps", "weight_bytes",
                "weight_bytes_per_step", "memory_bandwidth_bytes_s", "results", "skipped"):
        assert key in report, key
    assert report["model"] == "tiny" and report["dtype"] == "float32" and report["new_tokens"] == 4
    assert report["memory_bandwidth_bytes_s"] > 0
    # The head counts, the embedding table doesn't: tiny is 2 layers of 64 wide over 50304 tokens, untied.
    layer = 4 * 64 * 64 + 3 * 64 * 256
    assert report["weight_bytes_per_step"] == 4 * (2 * layer + 50304 * 64)
    assert report["weight_bytes"] == 4 * (2 * layer + 2 * 50304 * 64)
    results = report["results"]
    assert "olmo.py" in results
    if "transformers" not in report["skipped"]:
        assert "transformers" in results
    for impl, r in results.items():
        for key in ("load_s", "peak_bytes", "peak_ratio", "prefill_tok_s", "decode_tok_s", "decode_bytes_s",
                    "roofline", "warmup_s"):
            assert r[key] > 0, (impl, key, r[key])
        assert len(r["times"]["all"]) == 1
        assert r["same_tokens"], f"{impl}'s greedy tokens differ from {r['same_tokens_as']}'s"
        if "transformers" in results:
            assert r["vs_transformers"]["decode_tok_s"] > 0
    for impl in results:
        assert impl in proc.stdout  # the table names every implementation
    assert "roofline" in proc.stdout and "[bench]" in proc.stderr  # progress goes to stderr


def test_bn_checkpoint_builds_tied_and_loads_in_both(tmp_path, monkeypatch):
    """A tied shape (like 1b) is written without lm_head.weight, loads in olmo.py with the head = the embedding,
    and transformers reads the same config.json and gives the same logits."""
    monkeypatch.setitem(bench.SHAPES, "tiny-tied", dict(num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                                                        num_attention_heads=2, tie_word_embeddings=True))
    bench.build_checkpoint("tiny-tied", tmp_path)
    from safetensors import safe_open
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = olmo.OlmoForCausalLM.from_pretrained(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    total, per_step = bench.weight_bytes(model.config, torch.float32)
    layer = 4 * 32 * 32 + 3 * 32 * 64
    assert (total, per_step) == (4 * (layer + 50304 * 32), 4 * (layer + 50304 * 32))
    ids = torch.tensor([[5, 17, 300, 9000, 42]])
    logits = model(ids)
    assert 0.3 < logits.std() < 3  # not degenerate
    transformers = pytest.importorskip("transformers")
    reference = transformers.OlmoForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, reference(ids).logits, rtol=1e-4, atol=1e-4)


def test_bn_compiled_decode_matches_eager():
    model = _bn_tiny_model()
    ids = torch.tensor([[3, 14, 15, 92, 65], [35, 89, 79, 32, 38]])
    eager = model.generate(ids, 12)
    torch._dynamo.reset()
    model.decode_one_token = torch.compile(model.decode_one_token, mode="default", fullgraph=True)
    t0 = time.perf_counter()
    compiled = model.generate(ids, 12)
    print(f"compiling the tiny decode step took {time.perf_counter() - t0:.1f}s")
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    # Left padding goes through the same compiled step (different positions, same shapes: no recompile needed).
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    padded = model.generate(ids, 12, attention_mask=mask)
    del model.decode_one_token  # back to the eager method
    torch.testing.assert_close(padded, model.generate(ids, 12, attention_mask=mask), rtol=0, atol=0)


@pytest.mark.parametrize("padded", [False, True])
def test_bn_prefill_last_position_matches_full_forward(padded):
    """prefill computes the head only at the last position; it must equal the full forward's last position."""
    model = _bn_tiny_model(seed=1)
    ids = torch.randint(0, 128, (3, 7))
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :3] = 0
        mask[2, :1] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask)  # (B, T, vocab)
        model.setup_cache(mask, ids.shape[1] + 4)
        last = model.prefill(ids, mask)  # (B, vocab)
    assert last.shape == (3, 128)
    torch.testing.assert_close(last, full[:, -1], rtol=1e-5, atol=1e-5)


def test_bn_memory_mapped_load_equals_copying_load(tmp_path):
    from safetensors.torch import load
    bench.build_checkpoint("tiny", tmp_path)
    with open(tmp_path / "model.safetensors", "rb") as f:
        copied = load(f.read())  # every byte read into memory, no mapping
    model = olmo.OlmoForCausalLM.from_pretrained(tmp_path)
    loaded = model.state_dict()
    assert set(loaded) == set(copied)
    for name, tensor in copied.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    assert copied["model.embed_tokens.weight"].std() > 0.1  # random, not zeros
