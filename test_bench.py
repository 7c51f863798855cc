"""Tests of bench.py: the report holds every figure, and the checkpoints it builds load in olmo.py and
transformers alike. No test here times anything: speed is bench.py's output, not a test."""

import json
import types

import pytest
import torch
import transformers

import bench
import olmo
from conftest import assert_close, load_keys, one_error_line


# ----------------------------------------------------------------------------------------------------------------
# bench.py: the benchmark end to end, and the checkpoints it builds
#
# No test here times anything: speed is measured (and compared with transformers) by bench.py itself.


def bench_in_process(args, monkeypatch, capfd):
    """bench.py's main() in this process, each variant still in a process of its own (a bench.py process around
    them would cost seconds of torch import more): its exit status, stdout and stderr, as run_cli's."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # quick on a busy machine: the variants' processes inherit it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as run_cli's
    status = bench.main(args)
    out, err = capfd.readouterr()
    return types.SimpleNamespace(returncode=status, stdout=out, stderr=err)


def test_bench_tiny_end_to_end(tmp_path, monkeypatch, capfd):
    """The whole benchmark on the tiny shape: every implementation in its own process, a token budget, a long
    prompt, the NumPy twin's BLAS threads set in its process; the report holds every figure, and greedy tokens
    agree across implementations (timings are only checked to exist: speed is bench.py's output, not a test)."""
    out = tmp_path / "bench.json"  # on the default device
    proc = bench_in_process(["--shape", "tiny", "--prompt-len", "8", "--new-tokens", "4", "--reps", "1",
                             "--budgets", "6", "--long-prompt", "12", "--numpy-threads", "1", "--json", str(out)],
                            monkeypatch, capfd)
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


def test_bench_bad_model_is_one_line(tmp_path, capsys):
    """bench.main in this process (a subprocess costs seconds of torch import; an exception escaping main fails the
    test as a traceback would)."""
    for path in (tmp_path / "missing", tmp_path):  # no such directory; a directory without config.json
        status = bench.main(["--model", str(path), "--device", "cpu"])
        err = capsys.readouterr().err
        assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_bench_flag_errors_are_one_line(capsys):
    """bench.py's flag errors are one `error:` line, as the other tools', not argparse's usage block."""
    for argv in (["--prompt-len", "x"], ["--shape", "nope"], ["--new-tokens", "1"]):
        with pytest.raises(SystemExit) as info:
            bench.parse_args(argv)
        assert info.value.code == 2
        assert one_error_line(capsys.readouterr().err)


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


def test_bench_olmo2_shape(tmp_path, monkeypatch, capfd):
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
    proc = bench_in_process(["--model", str(tmp_path), "--device", "cpu", "--impl", "olmo.py", "--impl",
                             "transformers", "--reps", "1", "--new-tokens", "3", "--budgets", "none", "--prompt-len",
                             "4", "--json", str(out)], monkeypatch, capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "error" not in report["results"]["transformers"], report["results"]["transformers"]
    assert report["results"]["olmo.py"]["same_tokens"], report["results"]["olmo.py"]


SHAPES_OLMO2_TINY = dict(model_type="olmo2", num_hidden_layers=1, hidden_size=32, intermediate_size=64,
                         num_attention_heads=2, vocab_size=50304, rms_norm_eps=1e-6, rope_theta=500000.0)


def test_bench_olmoe_shape(tmp_path, monkeypatch, capfd):
    """An OLMoE shape is written as the hub ships it (one tensor per expert), transformers reads it with nothing
    missing or left over; a step reads top_k of num_experts experts' weights (weight_bytes and the floor's
    products count exactly those), and bench's olmo.py and the twin give transformers' greedy tokens on it."""
    monkeypatch.setitem(bench.SHAPES, "tiny-olmoe", SHAPES_OLMOE_TINY)
    bench.build_checkpoint("tiny-olmoe", tmp_path)
    assert "model.layers.0.mlp.experts.5.down_proj.weight" in load_keys(tmp_path)
    ref, info = transformers.OlmoeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    total, per_step = bench.weight_bytes(bench.checkpoint_numels(tmp_path), False, torch.float32, 2 / 6)
    # q, k, v, o; q_norm, k_norm; the two layer norms; the router. 6 experts' gate, up, down. The head.
    attention, experts, head = 4 * 32 * 32 + 2 * 32 + 2 * 32 + 6 * 32, 6 * 3 * 32 * 16, 50304 * 32
    assert total == 4 * (attention + experts + 2 * head + 32)
    assert per_step == 4 * (attention + experts * 2 // 6 + head + 32)
    seen, linear = [], torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w: seen.append(w) or linear(x, w))
    bench.floor_step_s(str(tmp_path), "cpu", torch.float32, reps=1)
    per_pass = 4 + 1 + 2 * 3 + 1  # q, k, v, o; the router; 2 experts' gate, up, down; the head
    assert len(seen) == 3 * 2 * per_pass
    out = tmp_path / "bench.json"
    proc = bench_in_process(["--model", str(tmp_path), "--device", "cpu", "--impl", "olmo.py", "--impl",
                             "olmo_numpy.py", "--impl", "transformers", "--reps", "1", "--new-tokens", "3", "--budgets",
                             "none", "--prompt-len", "4", "--json", str(out)], monkeypatch, capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["weight_bytes_per_step"]["float32"] == per_step
    for impl in ("olmo.py", "olmo_numpy.py"):
        assert report["results"][impl]["same_tokens"], report["results"][impl]


SHAPES_OLMOE_TINY = dict(model_type="olmoe", num_hidden_layers=1, hidden_size=32, intermediate_size=16,
                         num_attention_heads=2, num_experts=6, num_experts_per_tok=2)
# ----------------------------------------------------------------------------------------------------------------
# bench.py's 8-bit rows (--quantize int8) and its peer (--peer llama.cpp)


def test_bench_int8_rows(tmp_path, monkeypatch, capfd):
    """--quantize int8: both twins again with int8 weights (transformers skipped, named), each row's bytes those
    of its int8 model, and the int8 weights alone timed in a process of its own with the kernels it tried."""
    out = tmp_path / "bench.json"
    proc = bench_in_process(["--shape", "tiny", "--prompt-len", "8", "--new-tokens", "4", "--reps", "1", "--budgets",
                             "none", "--quantize", "int8", "--json", str(out)], monkeypatch, capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert {"olmo.py int8", "olmo_numpy.py int8", "olmo.py", "transformers"} <= set(results), results
    assert "transformers int8" in report["skipped"]
    for label in ("olmo.py int8", "olmo_numpy.py int8"):
        assert "error" not in results[label] and results[label]["decode_tok_s"] > 0, results[label]
    # tiny: 2 layers of q, k, v, o (64 x 64), gate, up (256 x 64), down (64 x 256), and the 50304 x 64 head read
    # as int8 with a float32 scale per row; the untied embedding stays float32 and is not read per step
    numel = 2 * (4 * 64 * 64 + 3 * 256 * 64) + 50304 * 64
    rows = 2 * (4 * 64 + 2 * 256 + 64) + 50304
    assert report["weight_bytes_per_step"]["int8 float32"] == numel + 4 * rows
    assert report["weight_bytes"]["int8 float32"] == numel + 4 * rows + 4 * 50304 * 64  # OLMo 1: no norm weights
    floor = report["floor"]["int8 float32"]
    assert floor["step_s"] > 0 and "olmo.py's Int8Linear" in floor["kernels"], floor
    assert "weights alone in int8 float32" in proc.stdout


def test_bench_q8_0_bytes():
    """llama.cpp's q8_0: 34 bytes per block of 32 weights (32 int8 and a float16 scale), the embedding too, norms
    float32; a step reads the linear weights and the head (the embedding when tied)."""
    shapes = {"model.embed_tokens.weight": [64, 32], "model.layers.0.mlp.up_proj.weight": [96, 32],
              "model.norm.weight": [32], "lm_head.weight": [64, 32]}
    total, step = bench.quantized_bytes(shapes, False, "q8_0")
    assert step == (96 * 32 + 64 * 32) // 32 * 34 and total == step + 64 * 32 // 32 * 34 + 4 * 32
    del shapes["lm_head.weight"]
    total, step = bench.quantized_bytes(shapes, True, "q8_0")
    assert step == (96 * 32 + 64 * 32) // 32 * 34 and total == step + 4 * 32


def test_bench_peer_missing_is_one_line(tmp_path, capsys):
    """--peer llama.cpp without the binding, or without its source tree: one line, exit status 2, before any
    checkpoint is built."""
    status = bench.main(["--shape", "tiny", "--peer", "llama.cpp", "--llama-cpp-src", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: --peer llama.cpp needs ") and err.count("\n") == 1, err


def test_bench_olmo_hybrid_shape(tmp_path, monkeypatch, capfd):
    """An Olmo Hybrid shape is written in transformers' own layout (the convolution in one tensor), which
    transformers reads with nothing missing or left over; bench's olmo.py and the twin give transformers' greedy
    tokens on it, and time a long prompt in each (70 tokens: two chunks of the Gated DeltaNet)."""
    monkeypatch.setitem(bench.SHAPES, "tiny-hybrid", dict(
        model_type="olmo_hybrid", num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=2,
        linear_key_head_dim=8, linear_value_head_dim=16, layer_types=["linear_attention", "full_attention"]))
    bench.build_checkpoint("tiny-hybrid", tmp_path)
    assert "model.layers.0.linear_attn.conv1d.weight" in load_keys(tmp_path)
    ref, info = transformers.OlmoHybridForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    out = tmp_path / "bench.json"
    proc = bench_in_process(["--model", str(tmp_path), "--device", "cpu", "--impl", "olmo.py", "--impl",
                             "olmo_numpy.py", "--impl", "transformers", "--reps", "1", "--new-tokens", "3", "--budgets",
                             "none", "--prompt-len", "4", "--long-prompt", "70", "--json", str(out)],
                            monkeypatch, capfd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for impl in ("olmo.py", "olmo_numpy.py"):
        assert report["results"][impl]["same_tokens"], report["results"][impl]
