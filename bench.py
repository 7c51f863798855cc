"""Benchmark olmo.py and olmo_numpy.py against transformers, as ratios measured in one run.

Every implementation runs in a fresh process of its own (same checkpoint, same prompts), one process per
implementation and repetition, in an order that rotates with each repetition (A B C, B C A, C A B), so drifts in
clock speed or load hit all of them alike and no implementation's BLAS threads run beside another's; the tables
show medians. Each process loads the model (load time; peak memory to load and produce the first token), times
its long prompts (peak memory of the prefill above the loaded model, time to first token), warms up, then times
generate(prompt, budget) for each token budget (max_new_tokens), stopped after --new-tokens tokens:
prefill = time to the first token; decode = time per token after the first. Decode bandwidth is the bytes of
weights read per step x steps/s, next to this machine's own memory bandwidth (a 1 GiB copy): the fraction of the
roofline that decoding reaches (at batch 1 each step reads every weight once, so it is bound by memory bandwidth).
A last process times only a step's matrix-vector products ("weights alone"): no implementation's step can take
less, so transformers' step time over it is the largest speedup this machine allows any implementation.

    python bench.py --shape 160m                     # random weights in OLMo's shapes, built in a temp dir
    python bench.py --model path/to/OLMo-1B-hf --json results.json
    python bench.py --shape 7b --device cuda --dtype bfloat16 --compile

What each of the speed goals reads (any of these flags combine in one run):
    --shape 160m --compile --check-isolation         decode vs transformers, eager and compiled; and the same
                                                     ratio from a second schedule with olmo.py and transformers
                                                     alone, which must agree (no implementation slows another)
    --shape 160m                                     per-token decode at an 8192-token budget vs --new-tokens'
                                                     (the default --budgets 8192; a cache of 16 + 32 = 48 slots)
    --shape tiny --new-tokens 200 --budgets 20000,100000   seconds to the 200th token at each budget
    --shape 160m --long-prompt 256 --long-prompt 6000     prefill speed, and its peak memory vs olmo.py's
    --dtype float32 --dtype bfloat16                 bf16 rows beside fp32 (the NumPy twin: fp32 only)
    --numpy-threads 1 --numpy-threads 2              the twin with 1 and with 2 OpenBLAS threads
    --shape 1b | olmo2-1b                            OLMo-1B; OLMo-2-0425-1B

transformers' cache grows with the tokens, so its budget ratio stays near 1: a control for the measurement.
Numbers from a machine running other work are noisy: the header gives the load average before and after.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import cli
import olmo

# The shapes of OLMo 1 (with the real 50304-token vocabulary; "tiny" measures per-token overhead only), of
# OLMo-2-0425-1B, written as transformers' Olmo2Config describes it, and of OLMoE-1B-7B (64 experts of width 1024
# per layer, 8 run per token: 1.3B of its 6.9B parameters read per token; 28 GB in float32, 14 in bfloat16),
# with a smaller shape in its proportions (1 expert in 8 read, 0.6 GB in float32) for a laptop's CPU; and of
# Olmo-Hybrid-7B (transformers' OlmoHybridConfig defaults), with a smaller one of its head sizes (dk 96, dv 192)
# for the CPU: a long prompt's prefill is where its chunked Gated DeltaNet shows (--long-prompt 2048).
SHAPES = {
    "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=256, num_attention_heads=4),
    "160m": dict(num_hidden_layers=12, hidden_size=768, intermediate_size=3072, num_attention_heads=12),
    "1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=16,
               tie_word_embeddings=True),
    "7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32),
    "olmo2-1b": dict(model_type="olmo2", num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                     num_attention_heads=16, num_key_value_heads=16, vocab_size=100352, rms_norm_eps=1e-6,
                     rope_theta=500000.0, max_position_embeddings=4096, tie_word_embeddings=False,
                     pad_token_id=100277, bos_token_id=100257, eos_token_id=100257),
    "olmoe-1b-7b": dict(model_type="olmoe", num_hidden_layers=16, hidden_size=2048, intermediate_size=1024,
                        num_attention_heads=16, num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096),
    "olmoe-small": dict(model_type="olmoe", num_hidden_layers=8, hidden_size=512, intermediate_size=256,
                        num_attention_heads=8, num_experts=32, num_experts_per_tok=4, max_position_embeddings=4096),
    "olmo-hybrid-7b": dict(model_type="olmo_hybrid"),  # transformers' defaults: Olmo-Hybrid-7B's shape
    "olmo-hybrid-small": dict(model_type="olmo_hybrid", num_hidden_layers=8, hidden_size=1536, intermediate_size=4096,
                              num_attention_heads=12, linear_key_head_dim=96, linear_value_head_dim=192),
}
IMPLS = ["olmo.py", "olmo.py compiled", "olmo_numpy.py", "transformers"]


def log(message):
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# A checkpoint with random weights


def build_checkpoint(shape, directory, dtype=torch.float32, device="cpu", seed=0):
    """Write config.json + model.safetensors of a named shape, with random weights, into directory.

    Each tensor is drawn on its own (the model is built on the meta device: no init, no copy of the whole model),
    with std 1/sqrt(fan_in), so every projection keeps its input's scale and the logits have std ~1: greedy
    decoding then depends on the weights, as with a trained model, instead of being a near-tie. RMSNorm weights
    (OLMo 2) are ones, biases zeros."""
    from safetensors.torch import save_file

    spec = dict(SHAPES[shape])
    kind = spec.pop("model_type", "olmo")
    if kind == "olmo":
        config_json = {"architectures": ["OlmoForCausalLM"], "model_type": "olmo",
                       **dataclasses.asdict(olmo.OlmoConfig(**spec))}
    else:  # olmo2, olmoe, olmo_hybrid: transformers writes the reference config
        import transformers
        family = {"olmo2": "Olmo2", "olmoe": "Olmoe", "olmo_hybrid": "OlmoHybrid"}[kind]
        config = getattr(transformers, f"{family}Config")(**spec)
        config_json = {**config.to_dict(), "architectures": [f"{family}ForCausalLM"]}  # to_dict() has it None
    # olmo.py's names are the hub's (OLMoE: one tensor per expert), or (Olmo Hybrid) transformers' own, which it
    # reads as well: the convolution in one tensor, the norms named as its attention layers' are
    with torch.device("meta"):
        model = olmo.OlmoForCausalLM(olmo.OlmoConfig.from_dict(config_json))
    config_json.pop("dtype", None)  # the dtype written below, as torch_dtype
    generator = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and spec.get("tie_word_embeddings"):
            continue  # tied: the embedding matrix is the head (transformers doesn't save it twice either)
        if name.endswith(".bias"):
            t = torch.zeros(p.shape, dtype=dtype)
        elif name.endswith("norm.weight"):
            t = torch.ones(p.shape, dtype=dtype)
        else:  # Linear (out, in) -> fan_in = in; the embedding (vocab, hidden) doubles as the head when tied
            t = torch.randn(p.shape, generator=generator, device=device).mul_(p.shape[-1] ** -0.5)
            t = t.to(device="cpu", dtype=dtype)
        tensors[name] = t
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**config_json, "torch_dtype": str(dtype).removeprefix("torch.")}, f, indent=2)


def checkpoint_numels(path):
    """{tensor name: number of elements}, from the safetensors files' headers (no weight is read)."""
    return {name: math.prod(shape) for name, shape in checkpoint_shapes(path).items()}


def checkpoint_shapes(path):
    """{tensor name: shape}, from the safetensors files' headers (no weight is read)."""
    from safetensors import SafetensorError, safe_open
    files = [f for f in sorted(os.listdir(path)) if f.endswith(".safetensors")]
    if not files:
        raise ValueError(f"{path} has no .safetensors file")
    shapes = {}
    for file in files:
        try:
            with safe_open(os.path.join(path, file), "pt") as f:
                shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
        except SafetensorError as e:
            raise ValueError(f"cannot read {file}: {e}") from None
    return shapes


def weight_bytes(numels, tied, dtype, experts_read=1.0):
    """(every weight, weights read per decode step): the step reads each parameter once except the embedding
    table, of which it reads one row per token; the head counts, also when it is the (tied) embedding. OLMoE:
    of the experts' weights, a batch-1 step reads the fraction experts_read (num_experts_per_tok / num_experts)."""
    size = torch.finfo(dtype).bits // 8
    total = sum(n for name, n in numels.items() if not (tied and name == "lm_head.weight"))  # tied ones once
    unread = sum(n for name, n in numels.items() if ".mlp.experts." in name) * (1 - experts_read)
    return total * size, round(total - (0 if tied else numels["model.embed_tokens.weight"]) - unread) * size


def quantized_bytes(shapes, tied, precision):
    """weight_bytes for 8-bit weights. "int8 <dtype>" (olmo.py's --quantize int8): each linear weight, the head
    included, as int8 with a float32 scale per row; the embedding and the norms stay in dtype (a tied head is an
    int8 copy of the embedding). "q8_0" (llama.cpp's): 34 bytes per block of 32 weights (32 int8 and a float16
    scale), the embedding too; norms in float32. OLMoE's routers stay float in both (llama.cpp keeps them float32).
    Of an OLMoE's experts this counts all, not the few a step reads."""
    embedding = shapes["model.embed_tokens.weight"]
    routers = sum(math.prod(shape) for name, shape in shapes.items() if name.endswith(".mlp.gate.weight"))
    linears = [shape for name, shape in shapes.items()  # OLMoE's routers (mlp.gate) stay float in both, and are read
               if len(shape) == 2 and name != "model.embed_tokens.weight" and not name.endswith(".mlp.gate.weight")]
    if tied:
        linears.append(embedding)
    others = sum(math.prod(shape) for name, shape in shapes.items() if len(shape) == 1)  # norms, biases
    if precision == "q8_0":
        read = sum(math.prod(shape) for shape in linears) * 34 // 32 + 4 * routers
        return read + (0 if tied else math.prod(embedding) * 34 // 32) + 4 * others, read
    size = torch.finfo(olmo.DTYPES[precision.split()[1]]).bits // 8
    read = sum(math.prod(shape) + 4 * shape[0] for shape in linears) + size * routers
    return read + (math.prod(embedding) + others) * size, read


# ----------------------------------------------------------------------------------------------------------------
# The machine


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    elif device.startswith("mps"):
        torch.mps.synchronize()


def memory_bandwidth(device, nbytes=1 << 30, reps=5):
    """Bytes/s of a large copy (read + write counted, as STREAM's copy does); the best of reps."""
    src = torch.ones(nbytes // 4, device=device)  # filled, so every page is touched before timing
    dst = torch.zeros_like(src)
    best = math.inf
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def reset_peak_rss():
    """Start a new peak from the current resident set (Linux: clear_refs 5 resets VmHWM); False where we can't."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss():
    """This process's peak resident set since the last reset_peak_rss() (else since it started), in bytes."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    try:
        import resource
    except ImportError:  # Windows
        import psutil
        return psutil.Process().memory_info().peak_wset
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def start_peak(device):
    """Start measuring peak memory (GPU: allocated; CPU: resident set); -> the baseline for peak_since."""
    synchronize(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    reset_peak_rss()
    return peak_rss()


def peak_since(device, base):
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else peak_rss()) - base


def openblas_info():
    """numpy's OpenBLAS kernel ("core") and thread count, read from the library itself; None where not found."""
    import ctypes
    import glob
    import numpy
    for lib in glob.glob(os.path.join(os.path.dirname(numpy.__file__) + ".libs", "*openblas*")):
        blas = ctypes.CDLL(lib)
        for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "")):
            try:
                corename, threads = (getattr(blas, f"{prefix}get_{what}{suffix}")
                                     for what in ("corename", "num_threads"))
            except AttributeError:
                continue
            corename.restype = ctypes.c_char_p
            return f"{corename().decode()}, {threads()} thread(s)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# llama.cpp, the peer (--peer llama.cpp, optional: nothing else needs it). Its Python binding, llama-cpp-python,
# runs the decode; the llama.cpp source tree that binding vendors (--llama-cpp-src) gives the converter,
# convert_hf_to_gguf.py with its gguf-py, which writes bench's checkpoint as a GGUF file at each precision.

GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0"}  # ours -> the converter's --outtype

# convert_hf_to_gguf.py as it is, but for the vocabulary: bench's checkpoints have random weights and no tokenizer,
# so the GGUF gets llama.cpp's "none" tokenizer with vocab_size placeholder tokens, enough to decode token ids.
CONVERT = """
import sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
import convert_hf_to_gguf
from conversion.base import TextModel

def set_vocab(self):
    self._set_vocab_none()
    self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])

TextModel.set_vocab = set_vocab
sys.argv = ["convert_hf_to_gguf.py"] + sys.argv[2:]
convert_hf_to_gguf.main()
"""


def peer_source(src):
    """Check the peer is installed: the binding importable here, the converter at src. -> llama.cpp's version."""
    import importlib.metadata
    import importlib.util
    if importlib.util.find_spec("llama_cpp") is None:
        raise ValueError("--peer llama.cpp needs llama-cpp-python in this Python (see BENCHMARKS.md)")
    if not src or not os.path.isfile(os.path.join(src, "convert_hf_to_gguf.py")):
        raise ValueError(f"--peer llama.cpp needs --llama-cpp-src, a llama.cpp source tree with "
                         f"convert_hf_to_gguf.py (got {src!r}; see BENCHMARKS.md)")
    return importlib.metadata.version("llama-cpp-python")


def to_gguf(src, path, outtype, directory):
    """Our checkpoint at path -> a GGUF file of this type (f32, bf16, q8_0), by llama.cpp's own converter."""
    out = os.path.join(directory, f"model-{outtype}.gguf")
    proc = subprocess.run([sys.executable, "-c", CONVERT, src, path, "--outtype", outtype, "--outfile", out],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise ValueError(f"llama.cpp's converter failed on {path}: {last}")
    return out


def load_llama_cpp(path, threads, n_ctx):
    """A GGUF file in llama.cpp, through the binding's C API (what llama-bench calls): generate() prefills the
    prompt in one llama_decode, then decodes one token per llama_decode, greedy (the argmax of the logits)."""
    import logging
    import numpy as np
    import llama_cpp as ll
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's log: its errors only
    ll.llama_backend_init()
    model = ll.llama_model_load_from_file(path.encode(), ll.llama_model_default_params())
    params = ll.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = n_ctx  # the longest prompt in one batch, as ours
    params.n_threads = params.n_threads_batch = threads
    context = ll.llama_init_from_model(model, params)
    if not model or not context:
        raise RuntimeError(f"llama.cpp cannot load {path}")
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(model))

    def generate(ids, budget, on_token):
        (tokens,) = ids  # batch 1
        ll.llama_memory_clear(ll.llama_get_memory(context), True)  # a fresh cache, as each of ours is
        for _ in range(budget):
            batch = (ll.llama_token * len(tokens))(*tokens)
            if ll.llama_decode(context, ll.llama_batch_get_one(batch, len(tokens))) != 0:
                raise RuntimeError("llama_decode failed")
            logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(context, -1), shape=(n_vocab,))
            tokens = [int(logits.argmax())]
            on_token(torch.tensor(tokens))
    return generate


# ----------------------------------------------------------------------------------------------------------------
# What each child process runs. The implementations, behind one interface: generate(ids (B, T) as lists, budget,
# on_token) calls on_token(tokens (B,)) with each new token.


class Stop(Exception):
    """Raised from on_token to end a generate early (after the tokens we time, well inside a large budget)."""


class Streamer:
    """transformers' streamer interface: put() gets the prompt first, then each step's tokens."""

    def __init__(self, on_token):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value):
        if self.prompt_seen:
            self.on_token(value)
        self.prompt_seen = True

    def end(self):
        pass


def load(impl, compiled, path, device, dtype, n_ctx=None, quantize=None):
    """Load one implementation (llama.cpp: path is its GGUF file, n_ctx its cache's length; quantize: ours'
    --quantize); return its generate function."""
    if impl == "llama.cpp":
        return load_llama_cpp(path, torch.get_num_threads(), n_ctx)
    if impl == "olmo.py":  # through its CLI's own loader: the same defaults and torch.compile settings
        args = argparse.Namespace(device=device, seed=None, compile=compiled, dtype=str(dtype).removeprefix("torch."),
                                  quantize=quantize)
        model = olmo.Backend().load(args, path)
        return lambda ids, budget, on_token: model.generate(torch.tensor(ids, device=device), budget,
                                                            callback=on_token)
    if impl == "olmo_numpy.py":
        import numpy as np
        import olmo_numpy
        model = olmo_numpy.OlmoForCausalLM.from_pretrained(path, quantize=quantize)
        return lambda ids, budget, on_token: model.generate(np.array(ids), budget, callback=on_token)
    if impl == "transformers":
        import transformers
        transformers.logging.set_verbosity_error()
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

        def generate(ids, budget, on_token):
            ids = torch.tensor(ids, device=device)
            with torch.no_grad():  # min_new_tokens = budget: no EOS stop, like ours with eos_token_id=None
                model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=budget,
                               min_new_tokens=budget, pad_token_id=model.config.pad_token_id,
                               streamer=Streamer(on_token))
        return generate
    raise ValueError(f"unknown implementation {impl!r}")


def timed(generate, ids, budget, n, device):
    """generate(ids, budget), stopped after n tokens -> {first_s: time to the first token, last_s: to the n-th,
    decode_step_s: per token after the first, tokens: n x (B,)}."""
    stamps, tokens = [], []

    def on_token(token):
        synchronize(device)
        stamps.append(time.perf_counter())
        tokens.append(token.tolist())
        if len(stamps) == n and budget > n:
            raise Stop

    synchronize(device)
    t0 = time.perf_counter()
    try:
        generate(ids, budget, on_token)
    except Stop:
        pass
    first, last = stamps[0] - t0, stamps[-1] - t0
    return {"first_s": first, "last_s": last, "decode_step_s": (last - first) / max(n - 1, 1), "tokens": tokens}


def floor_step_s(path, device, dtype, reps=7):
    """The least time a decode step takes on this machine: the fastest kernel of floor_kernels()."""
    return min(floor_kernels(path, device, dtype, reps=reps).values())


def floor_kernels(path, device, dtype, quantize=None, reps=7):
    """{kernel: seconds}: one matrix-vector product per weight the step reads (every projection and the head; of
    the embedding only a row), nothing else, the best of reps passes over all of them (a pass over fewer would be
    served from the CPU's cache). The kernels, in turn: torch's F.linear by rows (transformers'), the head by
    columns (olmo.py's in float32 on the CPU), all by columns; on the CPU also oneDNN's linear with each weight
    prepacked for one row of input (its blocked layout: olmo.py's PackedLinear, in bfloat16), and in float32
    NumPy's BLAS (OpenBLAS): kernels torch does not pick by itself. quantize "int8": each weight quantized as
    olmo.py does, multiplied by olmo.py's Int8Linear, and on the CPU by fbgemm's int8 linear, which quantizes the
    activations too (as q8_0 does). At batch 1 that is the step's memory traffic, so the fastest bounds any
    implementation's step here, whatever its overheads, and transformers' step time / it bounds what one can gain
    over transformers. OLMoE: of each
    layer's experts, num_experts_per_tok (the first ones: every expert is as large as the ones a token picks;
    fused experts, as transformers 5 can save them, are left out: bench writes one tensor per expert, as the hub
    does)."""
    from safetensors import safe_open
    config = olmo.OlmoConfig.from_json(os.path.join(path, "config.json"))
    top_k = config.num_experts_per_tok if config.moe else None

    def read_by_a_step(name):  # OLMoE: "model.layers.N.mlp.experts.E.gate_proj.weight", E < top_k
        parts = name.split(".")
        return top_k is None or "experts" not in parts or int(parts[parts.index("experts") + 1]) < top_k
    weights = {}
    for file in sorted(f for f in os.listdir(path) if f.endswith(".safetensors")):
        with safe_open(os.path.join(path, file), "pt") as f:  # each a copy in memory, not the file's mapping
            weights.update((n, f.get_tensor(n).to(device, dtype)) for n in f.keys()
                           if len(f.get_slice(n).get_shape()) == 2 and read_by_a_step(n))
    head = "model.embed_tokens.weight"  # tied: the embedding is the head
    if "lm_head.weight" in weights:  # untied: the head is read, the embedding is not
        head = "lm_head.weight"
        del weights["model.embed_tokens.weight"]
    x = {w.shape[1]: torch.randn(1, w.shape[1], dtype=dtype, device=device) for w in weights.values()}
    if quantize:
        return int8_floor_kernels(weights, x, device, reps)

    def best_pass(product, weights):
        times = []
        for _ in range(reps + 1):  # the first warms up
            synchronize(device)
            t0 = time.perf_counter()
            for w in weights.values():
                product(x[w.shape[1]], w)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        return min(times[1:])

    def relayout(names, how):
        for n in names:  # one at a time: the old layout is freed as the new one is made
            weights[n] = how(weights[n])
    by_columns = lambda w: w.t().contiguous().t()  # noqa: E731
    linear = lambda x, w: torch.nn.functional.linear(x, w)  # noqa: E731 (looked up per call: tests count it)
    cpu = device == "cpu"
    with torch.no_grad():
        times = {"F.linear by rows": best_pass(linear, weights)}
        if cpu and dtype == torch.float32:  # the same memory, seen by NumPy
            arrays = {n: w.numpy() for n, w in weights.items()}
            times["NumPy (OpenBLAS) by rows"] = best_pass(lambda x, w: x.numpy() @ w.T, arrays)
            del arrays
        relayout([head], by_columns)
        times["F.linear, head by columns"] = best_pass(linear, weights)
        relayout([n for n in weights if n != head], by_columns)
        times["F.linear by columns"] = best_pass(linear, weights)
        if cpu and torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16):
            relayout(weights, lambda w: torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1))
            times["oneDNN prepacked"] = best_pass(
                lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), weights)
    return times


def int8_floor_kernels(weights, x, device, reps):
    """floor_kernels' int8 kernels, on weights quantized one at a time (the float ones freed as they go)."""
    import warnings
    for n, w in weights.items():
        q, scale = olmo.quantize_rows(w)
        weights[n] = [olmo.Int8Linear(q.to(device), scale.to(device), None)]
    kernels = {"olmo.py's Int8Linear": lambda x, w: w[0](x)}
    if device == "cpu" and torch.backends.quantized.engine in ("fbgemm", "x86"):
        warnings.filterwarnings("ignore", ".*quantize_per_channel")  # deprecated, still the fastest here
        for n, (linear,) in weights.items():
            scale = linear.scale.double()
            zero = torch.zeros(len(scale), dtype=torch.long)
            w = torch.quantize_per_channel((linear.weight * scale[:, None]).float(), scale, zero, 0, torch.qint8)
            weights[n].append(torch.ops.quantized.linear_prepack(w, None))
        kernels["fbgemm's dynamic int8 linear"] = lambda x, w: torch.ops.quantized.linear_dynamic(x.float(), w[1])
    times = {}
    with torch.no_grad():
        for name, product in kernels.items():
            passes = []
            for _ in range(reps + 1):  # the first warms up
                synchronize(device)
                t0 = time.perf_counter()
                for w in weights.values():
                    product(x[w[0].weight.shape[1]], w)
                synchronize(device)
                passes.append(time.perf_counter() - t0)
            times[name] = min(passes[1:])
    return times


def child(spec):
    """One implementation in this fresh process: load, long prompts, then each budget. -> a JSON-able dict."""
    import numpy as np
    impl, device, dtype = spec["impl"], spec["device"], olmo.DTYPES[spec["dtype"]]
    if impl == "floor":
        kernels = floor_kernels(spec["path"], device, dtype, spec["quantize"])
        return {"step_s": min(kernels.values()), "kernel": min(kernels, key=kernels.get), "kernels": kernels}
    if impl == "transformers":
        import transformers  # resolve the lazy imports before the baseline: they are code, not the model
        transformers.AutoModelForCausalLM, transformers.GenerationConfig
    if impl == "olmo_numpy.py":
        import olmo_numpy  # noqa: F401
    # Warm up the math libraries too (thread pools, per-thread buffers), which any model would allocate.
    a = torch.randn(256, 256, dtype=dtype, device=device)
    torch.nn.functional.scaled_dot_product_attention(a[None, None], a[None, None], a[None, None]) @ a
    np.ones((256, 256), dtype=np.float32) @ np.ones((256, 256), dtype=np.float32)
    # olmo.py's float32 products on an x86 CPU are NumPy's too, when packed (olmo.PackedLinear)
    packed = impl == "olmo.py" and device == "cpu" and not (spec["compiled"] or spec["quantize"])
    numpy_products = packed and dtype == torch.float32 and olmo.PackedLinear.packs(dtype)
    out = {"blas": openblas_info() if impl == "olmo_numpy.py" or numpy_products else None}

    # Each call's prompt starts with a token of its own (olmo.py reuses the cached keys of a prefix shared with the
    # previous call; every call here prefills its whole prompt). The timed ones are the same in every process.
    budgets, n = [spec["new_tokens"]] + spec["budgets"], spec["new_tokens"]
    untimed = iter(range(len(budgets), 1 << 30))

    def prompt(ids, first=None):
        first = next(untimed) if first is None else first
        return [[first] + row[1:] for row in ids]

    base = start_peak(device)
    t0 = time.perf_counter()
    path = spec["gguf"][GGUF_TYPES[spec["quantize"] or spec["dtype"]]] if impl == "llama.cpp" else spec["path"]
    n_ctx = max(len(ids[0]) for ids in [spec["prompt"]] + spec["long_prompts"]) + n  # enough for every call
    generate = load(impl, spec["compiled"], path, device, dtype, n_ctx, spec["quantize"])
    synchronize(device)
    out["load_s"] = time.perf_counter() - t0
    out["first_token_s"] = timed(generate, prompt(spec["prompt"]), 1, 1, device)["first_s"]  # reads every weight
    out["peak_bytes"] = peak_since(device, base)

    out["long"] = {}
    for ids in spec["long_prompts"]:  # memory first, while the process holds little more than the model
        base = start_peak(device)
        timed(generate, prompt(ids), 1, 1, device)
        peak = peak_since(device, base)
        first = timed(generate, prompt(ids), 1, 1, device)["first_s"]
        out["long"][len(ids[0])] = {"peak_bytes": peak, "first_s": first}

    t0 = time.perf_counter()
    for _ in range(2 if spec["compiled"] else 1):  # compiled: the first call compiles, CUDA graphs record later
        timed(generate, prompt(spec["prompt"]), n, n, device)
    out["warmup_s"] = time.perf_counter() - t0
    out["budgets"] = {}
    for i, budget in enumerate(budgets):
        if spec["compiled"] and budget != n:  # a cache of a new length recompiles: not what the budget costs
            timed(generate, prompt(spec["prompt"]), budget, n, device)
        out["budgets"][budget] = timed(generate, prompt(spec["prompt"], i), budget, n, device)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The parent: variants, the schedule of processes, the report


@dataclasses.dataclass
class Variant:
    label: str  # the table's name for it
    impl: str  # "olmo.py" | "olmo_numpy.py" | "transformers"
    dtype: str
    compiled: bool = False
    blas_threads: int | None = None  # OPENBLAS_NUM_THREADS in the NumPy twin's process
    quantize: str | None = None  # "int8": olmo.py's --quantize int8; llama.cpp's q8_0

    @property
    def precision(self):
        """What its weights are stored as: the dtype, "int8 <dtype>" (activations in dtype), or "q8_0"."""
        if self.quantize and self.impl == "llama.cpp":
            return GGUF_TYPES[self.quantize]
        return f"{self.quantize} {self.dtype}" if self.quantize else self.dtype

    def run(self, spec):
        """This variant in a fresh process: child()'s dict, or {"error": the child's last line of stderr}."""
        env = dict(os.environ)
        if self.blas_threads:
            env["OPENBLAS_NUM_THREADS"] = str(self.blas_threads)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"], env=env, text=True,
                              capture_output=True, input=json.dumps({**spec, **dataclasses.asdict(self)}))
        if proc.returncode != 0:
            return {"error": (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]}
        return json.loads(proc.stdout.strip().splitlines()[-1])


def variants(args, device, dtypes, unreadable):
    """The variants to run, and {label: why not} for those skipped: each implementation in each dtype; with
    --quantize, each again with int8 weights (llama.cpp: q8_0, once)."""
    chosen, skipped = [], {}
    for quantize in [None] + ([args.quantize] if args.quantize else []):
        for dtype in dtypes:
            suffix = ("" if dtype == dtypes[0] else f" {dtype}") + (f" {quantize}" if quantize else "")
            for impl in args.impl or IMPLS:
                if impl == "olmo.py compiled" and not (args.compile or args.impl):
                    continue
                label, base = impl + suffix, impl.removesuffix(" compiled")
                if base in unreadable:
                    skipped[label] = unreadable[base]
                elif base == "olmo_numpy.py" and (device != "cpu" or dtype != "float32"):
                    skipped[label] = "CPU and float32 only"
                elif base == "transformers" and quantize:
                    skipped[label] = "no 8-bit weights on the CPU without packages beyond requirements.txt"
                elif base == "olmo_numpy.py" and args.numpy_threads:
                    chosen += [Variant(f"{label} {t} thread{'s' * (t > 1)}", base, dtype, blas_threads=t,
                                       quantize=quantize) for t in args.numpy_threads]
                else:
                    chosen.append(Variant(label, base, dtype, compiled=impl.endswith("compiled"), quantize=quantize))
            peer = "llama.cpp " + GGUF_TYPES[quantize] if quantize else "llama.cpp" + suffix
            if args.peer and device != "cpu":
                skipped[peer] = "the CPU only, here"
            elif args.peer and not (quantize and dtype != dtypes[0]):  # q8_0's activations are llama.cpp's own
                chosen.append(Variant(peer, "llama.cpp", dtype, quantize=quantize))
    return chosen, skipped


def schedule(labels, reps):
    """Rep r starts at the r-th label and goes round (A B C, B C A, C A B, ...): each runs once per rep, and
    each runs first as often as the others."""
    return [labels[r % len(labels):] + labels[:r % len(labels)] for r in range(reps)]


def run_all(chosen, spec, reps):
    """Every variant, reps times, each time in its own process -> {label: [child dicts]}, or {"error"} after a
    failure (a failed variant is not run again)."""
    by_label = {v.label: v for v in chosen}
    runs = {label: [] for label in by_label}
    failed = {}
    for rep, order in enumerate(schedule(list(by_label), reps)):
        for label in order:
            if label in failed:
                continue
            log(f"rep {rep + 1}/{reps}: {label} (a fresh process)")
            r = by_label[label].run(spec)
            if "error" in r:
                log(f"{label} failed: {r['error']}")
                failed[label] = r
            else:
                runs[label].append(r)
    return {label: failed.get(label) or summarize(rs) for label, rs in runs.items()}


def summarize(rs):
    """One variant's child dicts -> medians (and the raw figures)."""
    med = lambda get: statistics.median(get(r) for r in rs)  # noqa: E731
    out = {k: med(lambda r: r[k]) for k in ("load_s", "first_token_s", "peak_bytes", "warmup_s")}
    out["blas"] = rs[0]["blas"]
    out["tokens"] = rs[0]["budgets"][min(rs[0]["budgets"], key=int)]["tokens"]
    out["budgets"] = {b: {k: med(lambda r: r["budgets"][b][k]) for k in ("first_s", "last_s", "decode_step_s")}
                      for b in rs[0]["budgets"]}
    out["long"] = {n: {k: med(lambda r: r["long"][n][k]) for k in ("first_s", "peak_bytes")} for n in rs[0]["long"]}
    out["runs"] = [{k: v for k, v in r.items() if k != "budgets"} | {"budgets": {
        b: {k: v for k, v in x.items() if k != "tokens"} for b, x in r["budgets"].items()}} for r in rs]
    return out


def derive(results, chosen, args, step_bytes, total_bytes, bandwidth):
    """Per-variant figures and ratios: vs transformers of the same dtype, and each budget vs --new-tokens'."""
    reference = {v.dtype: v.label for v in chosen if v.impl == "transformers" and "error" not in results[v.label]}
    peer = {v.quantize or v.dtype: v.label for v in chosen if v.impl == "llama.cpp" and "error" not in results[v.label]}
    eager = {v.dtype: v.label for v in chosen if v.impl == "olmo.py" and not v.compiled}  # long prompts' yardstick
    n = str(args.new_tokens)
    for v in chosen:
        r = results[v.label]
        r["variant"] = dataclasses.asdict(v)
        if "error" in r:
            continue
        main = r["budgets"][n]
        r.update(prefill_s=main["first_s"], prefill_tok_s=args.batch * args.prompt_len / main["first_s"],
                 decode_step_s=main["decode_step_s"], decode_tok_s=args.batch / main["decode_step_s"],
                 decode_bytes_s=step_bytes[v.precision] / main["decode_step_s"],
                 peak_ratio=r["peak_bytes"] / total_bytes[v.precision])
        r["roofline"] = r["decode_bytes_s"] / bandwidth
        for b in r["budgets"].values():
            b["vs_new_tokens"] = b["decode_step_s"] / main["decode_step_s"]
        for length, x in r["long"].items():
            x["tok_s"] = args.batch * int(length) / x["first_s"]
    for v in chosen:
        r, ref = results[v.label], results.get(reference.get(v.dtype))
        if "error" in r:
            continue
        r["same_tokens_as"] = reference.get(v.dtype)
        r["same_tokens"] = ref is None or r["tokens"] == ref["tokens"]
        if ref is not None:
            r["vs_transformers"] = {k: r[k] / ref[k] for k in ("prefill_tok_s", "decode_tok_s")}
        if (v.quantize or v.dtype) in peer and v.impl != "llama.cpp":
            theirs = results[peer[v.quantize or v.dtype]]
            r["vs_llama.cpp"] = {k: r[k] / theirs[k] for k in ("prefill_tok_s", "decode_tok_s")}
        ours = results.get(eager.get(v.dtype))
        for length, x in r["long"].items():
            if ours and "error" not in ours and length in ours["long"]:
                x["peak_vs_olmo.py"] = x["peak_bytes"] / ours["long"][length]["peak_bytes"]


def bench(args):
    device = args.device or olmo.available_devices()[0]  # olmo.py's default: cuda, then mps, then cpu
    dtypes = args.dtype or ["float32" if device == "cpu" else "bfloat16"]
    long_prompts = args.long_prompt
    if long_prompts is None:  # by default, one long prompt on a GPU and none on the CPU
        long_prompts = [2048] if device.startswith("cuda") else []
    long_prompts = [n for n in long_prompts if n]
    peer = peer_source(args.llama_cpp_src) if args.peer else None  # before a checkpoint is built for nothing
    with tempfile.TemporaryDirectory(prefix="olmo-bench-") as tmp:
        if args.model:
            path, name = args.model, os.path.basename(os.path.normpath(args.model))
            if not os.path.isdir(path):
                raise ValueError(f"{path} is not a checkpoint directory")
        else:
            path, name = tmp, args.shape
            log(f"building a {args.shape} checkpoint with random weights ({dtypes[0]})")
            t0 = time.perf_counter()
            build_checkpoint(args.shape, tmp, olmo.DTYPES[dtypes[0]], device if device.startswith("cuda") else "cpu")
            log(f"built in {time.perf_counter() - t0:.1f}s")
        return run_bench(args, path, name, device, dtypes, long_prompts, peer, tmp)


def run_bench(args, path, name, device, dtypes, long_prompts, peer, scratch):
    config_file = os.path.join(path, "config.json")
    config = olmo.read_json_object(config_file)  # as written, for the results
    import olmo_numpy
    for module in (olmo, olmo_numpy):  # a config either twin refuses is the error, in one line
        module.OlmoConfig.from_json(config_file)
    unreadable = {}
    try:
        import transformers  # noqa: F401
    except ImportError:
        unreadable["transformers"] = "not installed"
    shapes = checkpoint_shapes(path)
    tied = bool(config.get("tie_word_embeddings", False))
    parsed = olmo.OlmoConfig.from_json(config_file)
    experts_read = parsed.num_experts_per_tok / parsed.num_experts if parsed.moe else 1.0  # OLMoE, at batch 1
    chosen, skipped = variants(args, device, dtypes, unreadable)
    sizes = {d: weight_bytes(checkpoint_numels(path), tied, olmo.DTYPES[d], experts_read) for d in dtypes}
    sizes |= {v.precision: quantized_bytes(shapes, tied, v.precision) for v in chosen if v.quantize}
    total_bytes, step_bytes = {d: s[0] for d, s in sizes.items()}, {d: s[1] for d, s in sizes.items()}
    gguf = {}
    for v in chosen:
        if v.impl == "llama.cpp":
            outtype = GGUF_TYPES[v.quantize or v.dtype]
            log(f"llama.cpp's converter: the checkpoint as GGUF {outtype}")
            gguf[outtype] = to_gguf(args.llama_cpp_src, path, outtype, scratch)

    torch.manual_seed(args.seed)
    vocab = min(config.get("vocab_size", 50304), 50280)  # real tokens of OLMo 1's tokenizer
    spec = {"path": path, "device": device, "new_tokens": args.new_tokens, "budgets": args.budgets,
            "prompt": torch.randint(0, vocab, (args.batch, args.prompt_len)).tolist(),
            "long_prompts": [torch.randint(0, vocab, (args.batch, n)).tolist() for n in long_prompts],
            "gguf": gguf}
    log(f"measuring memory bandwidth on {device} (1 GiB copy)")
    bandwidth = memory_bandwidth(device)
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    results = run_all(chosen, spec, args.reps)
    derive(results, chosen, args, step_bytes, total_bytes, bandwidth)
    floor = {}
    for v in [Variant("weights alone", "floor", d) for d in dtypes] + [
            Variant("weights alone", "floor", v.dtype, quantize=v.quantize) for v in chosen
            if v.quantize and v.impl == "olmo.py" and not v.compiled]:
        log(f"weights alone in {v.precision}: the matrix-vector products of a step, nothing else (a fresh process)")
        floor[v.precision] = v.run(spec)

    isolation = None
    pair = [v for v in chosen if v.label in ("olmo.py", "transformers")]
    if args.check_isolation and len(pair) == 2 and len(chosen) > 2:
        log("isolation check: olmo.py and transformers again, without the others")
        alone = run_all(pair, {**spec, "budgets": [], "long_prompts": []}, args.reps)
        derive(alone, pair, args, step_bytes, total_bytes, bandwidth)
        isolation = {"with": [v.label for v in chosen], "alone": alone,
                     "ratios": {k: [results["olmo.py"]["vs_transformers"][k], alone["olmo.py"]["vs_transformers"][k]]
                                for k in ("prefill_tok_s", "decode_tok_s")}}
    return {
        "model": name, "config": config, "device": device, "device_name": device_name(device), "dtypes": dtypes,
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "openblas_env": {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                                                    "OMP_NUM_THREADS") if k in os.environ},
        "load_average": [load_before, os.getloadavg()] if load_before else None,  # other work on the machine
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "budgets": args.budgets,
        "long_prompt_lens": long_prompts, "reps": args.reps, "weight_bytes": total_bytes,
        "weight_bytes_per_step": step_bytes, "memory_bandwidth_bytes_s": bandwidth, "skipped": skipped,
        "results": results, "isolation": isolation, "floor": floor,
        "peer": peer and f"llama-cpp-python {peer} (the llama.cpp it vendors), GGUF files by its convert_hf_to_gguf.py",
    }


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    import platform
    return platform.processor() or platform.machine()


def columns(head, rows):
    """Aligned text: the first column left, the others right."""
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in [head] + rows]


def table(report):
    """The report as readable text."""
    results, GB, MB = report["results"], 1e9, 1e6
    ok = {label: r for label, r in results.items() if "error" not in r}
    first = report["dtypes"][0]
    lines = [f"{report['model']}: {report['weight_bytes'][first] / GB:.3f} GB of weights "
             f"({report['weight_bytes_per_step'][first] / GB:.3f} GB read per decode step) in {first}, "
             f"on {report['device']} ({report['device_name']}, torch {report['torch']} with "
             f"{report['torch_threads']} threads)",
             f"batch {report['batch']}, prompt {report['prompt_len']} tokens, {report['new_tokens']} new tokens, "
             f"medians of {report['reps']} reps, each implementation in its own process; memory bandwidth (1 GiB "
             f"copy): {report['memory_bandwidth_bytes_s'] / GB:.1f} GB/s"
             + (" (1-minute load average {:.1f} before, {:.1f} after: other work competes)".format(
                 report["load_average"][0][0], report["load_average"][1][0])
                if report["load_average"] else ""), ""]

    def ratio(r, key):
        vs = r.get("vs_transformers", {}).get(key)
        return f" ({vs:.2f}x)" if vs is not None and r["same_tokens_as"] != label else ""
    rows = []
    for label, r in ok.items():
        loads = not r["variant"]["compiled"]  # compiled loads as olmo.py does, then imports the compiler
        rows.append([label, f"{r['load_s']:.2f}" if loads else "-", f"{r['peak_ratio']:.2f}x" if loads else "-",
                     f"{r['prefill_tok_s']:.0f}{ratio(r, 'prefill_tok_s')}",
                     f"{r['decode_tok_s']:.1f}{ratio(r, 'decode_tok_s')}", f"{r['decode_bytes_s'] / GB:.1f}",
                     f"{r['roofline']:.0%}", f"{r['warmup_s']:.1f}",
                     "yes" if r["same_tokens"] else f"no (vs {r['same_tokens_as']})"])
        if report["peer"]:  # decode (prefill) vs llama.cpp of the same precision
            vs = r.get("vs_llama.cpp")
            rows[-1].append(f"{vs['decode_tok_s']:.2f}x ({vs['prefill_tok_s']:.2f}x)" if vs else "-")
    lines += columns(["implementation", "load s", "peak mem", "prefill tok/s", "decode tok/s", "decode GB/s",
                      "roofline", "warmup s", "same tokens"] + ["vs llama.cpp"] * bool(report["peer"]), rows)

    for precision, f in report["floor"].items():
        if "error" in f:
            lines.append(f"weights alone in {precision} failed: {f['error']}")
            continue
        ref = next((r for r in ok.values() if r["variant"]["impl"] == "transformers"
                    and r["variant"]["dtype"] == precision.split()[-1]), None)  # "int8 float32": float32's
        step_bytes = report["weight_bytes_per_step"][precision]
        gb_s = step_bytes / f["step_s"] / GB
        lines.append(f"weights alone in {precision} (each weight's matrix-vector product, nothing else): "
                     f"{f['step_s'] * 1000:.2f} ms per step, {gb_s:.1f} GB/s with {f['kernel']}"
                     + (f": no implementation decodes faster than {ref['decode_step_s'] / f['step_s']:.2f}x "
                        f"transformers here" if ref and report["batch"] == 1 else ""))
        lines.append("    " + ", ".join(f"{kernel} {step_bytes / s / GB:.1f}" for kernel, s in f["kernels"].items())
                     + " GB/s")

    n = str(report["new_tokens"])
    if report["budgets"]:
        budgets = [n] + [str(b) for b in report["budgets"]]
        lines += ["", f"token budget (max_new_tokens), generate stopped after {n} tokens: ms per decoded token "
                      f"(x vs budget {n}) | seconds to token {n}"]
        rows = [[label] + [f"{r['budgets'][b]['decode_step_s'] * 1000:.2f}"
                           + (f" ({r['budgets'][b]['vs_new_tokens']:.2f}x)" if b != n else "")
                           + f" | {r['budgets'][b]['last_s']:.2f}" for b in budgets] for label, r in ok.items()]
        lines += columns(["implementation"] + [f"budget {b}" for b in budgets], rows)
    if report["long_prompt_lens"]:
        lengths = [str(n) for n in report["long_prompt_lens"]]
        lines += ["", "long prompts: time to first token in ms (tok/s) | peak memory of that prefill above the "
                      "loaded model, MB (x vs olmo.py)"]
        rows = [[label] + [f"{r['long'][n]['first_s'] * 1000:.1f} ({r['long'][n]['tok_s']:.0f})"
                           f" | {r['long'][n]['peak_bytes'] / MB:.0f}"
                           + (f" ({r['long'][n]['peak_vs_olmo.py']:.2f}x)" if "peak_vs_olmo.py" in r['long'][n]
                              else "") for n in lengths] for label, r in ok.items()]
        lines += columns(["implementation"] + [f"{n} tokens" for n in lengths], rows)
    if report["isolation"]:
        lines.append("")
        for key, name in (("decode_tok_s", "decode"), ("prefill_tok_s", "prefill")):
            together, alone = report["isolation"]["ratios"][key]
            lines.append(f"isolation: olmo.py {name} vs transformers {together:.2f}x in the run with "
                         f"{len(report['isolation']['with'])} implementations, {alone:.2f}x with only these two")
    lines += ["", "peak mem: peak memory to load and produce the first token, in a fresh process, / the weights' "
              "bytes" + (" (GPU: max_memory_allocated)" if report["device"].startswith("cuda") else
                         " (resident set above the process's before loading)"),
              "decode GB/s: weights read per step x steps/s; roofline: that / the measured bandwidth; "
              "(Nx): vs transformers of the same dtype"]
    if report["peer"]:
        lines.append(f"vs llama.cpp: decode (prefill) tok/s / llama.cpp's of the same precision; {report['peer']}")
    for label, r in ok.items():
        if r["blas"]:
            lines.append(f"{label}: numpy's OpenBLAS runs {r['blas']}")
    if report["openblas_env"]:
        lines.append("environment: " + " ".join(f"{k}={v}" for k, v in report["openblas_env"].items()))
    for label, why in report["skipped"].items():
        lines.append(f"skipped {label}: {why}")
    for label, r in results.items():
        if "error" in r:
            lines.append(f"failed {label}: {r['error']}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = cli.Parser(description="Benchmark olmo.py against transformers (and olmo_numpy.py).")  # errors: one line
    p.add_argument("--shape", choices=SHAPES,
                   help="random weights of this shape (default 160m; with --peer, olmo2-1b)")
    p.add_argument("--model", help="a checkpoint directory (safetensors) instead of --shape")
    p.add_argument("--device", help="default: cuda, then mps, then cpu")
    p.add_argument("--dtype", choices=olmo.DTYPES, action="append",
                   help="repeatable: each dtype's rows beside the first's (default: float32 on the CPU, "
                        "bfloat16 on a GPU)")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens timed per generate, >= 2")
    p.add_argument("--budgets", default="8192",
                   help="comma-separated max_new_tokens (each > --new-tokens) timed beside --new-tokens' own, "
                        "stopped after --new-tokens tokens; 'none' for none (default 8192)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=3, help="processes per implementation")
    p.add_argument("--compile", action="store_true", help="also time olmo.py with torch.compile'd decode steps")
    p.add_argument("--impl", action="append", choices=IMPLS, help="only these (repeatable; default: all present)")
    p.add_argument("--numpy-threads", type=int, action="append",
                   help="repeatable: time olmo_numpy.py with this many OpenBLAS threads (OPENBLAS_NUM_THREADS)")
    p.add_argument("--long-prompt", type=int, action="append",
                   help="repeatable: also time the prefill of a prompt this long, and its peak memory (default: "
                        "2048 on CUDA, none elsewhere; 0 = none)")
    p.add_argument("--check-isolation", action="store_true",
                   help="run olmo.py and transformers again without the others: their ratio must not change")
    p.add_argument("--quantize", choices=["int8"],
                   help="also time each implementation with 8-bit weights (olmo.py's --quantize int8, llama.cpp's "
                        "q8_0) in each --dtype")
    p.add_argument("--peer", choices=["llama.cpp"],
                   help="also time llama.cpp (llama-cpp-python) on the same checkpoint, converted to GGUF at each "
                        "precision; see BENCHMARKS.md to install it")
    p.add_argument("--llama-cpp-src", default=os.environ.get("LLAMA_CPP_SRC"),
                   help="with --peer: the llama.cpp source tree that gives convert_hf_to_gguf.py and gguf-py "
                        "(default: $LLAMA_CPP_SRC)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the raw figures here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # internal: one process's work
    args = p.parse_args(argv)
    if args.shape is None:
        args.shape = "olmo2-1b" if args.peer else "160m"
    for flag in ("prompt_len", "batch", "reps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode speed is measured from the tokens after the first)")
    try:
        args.budgets = [] if args.budgets == "none" else [int(b) for b in args.budgets.split(",")]
    except ValueError:
        p.error(f"--budgets must be comma-separated integers or 'none', got {args.budgets!r}")
    if any(b <= args.new_tokens for b in args.budgets):
        p.error(f"each of --budgets must be > --new-tokens ({args.new_tokens})")
    if any(t < 1 for t in args.numpy_threads or []) or any(n < 0 for n in args.long_prompt or []):
        p.error("--numpy-threads must be >= 1 and --long-prompt >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(json.load(sys.stdin))))
        return 0
    try:
        report = bench(args)
    except (ValueError, OSError) as e:  # a bad --model path or checkpoint: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
