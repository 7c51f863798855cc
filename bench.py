"""Benchmark olmo.py against transformers' OlmoForCausalLM (and olmo_numpy.py, when it imports).

For each implementation: load time, peak memory while loading and producing the first token (each load in a fresh
subprocess, so peaks don't mix), prefill tokens/s, decode tokens/s, and decode bandwidth: bytes of weights read
per step x steps/s, next to this machine's own memory bandwidth (a 1 GiB copy), i.e. the fraction of the roofline
that decoding reaches (decoding one token reads every weight once, so at batch 1 it is bound by memory bandwidth).

    python bench.py --shape 160m                     # random weights in OLMo's shapes, built in a temp dir
    python bench.py --shape 7b --device cuda --dtype bfloat16 --compile
    python bench.py --model path/to/OLMo-1B-hf --json results.json

Timing is greedy decoding with no EOS stop. Prefill = time to first token (the prompt's forward and the first
token); decode = (time of generate(prompt, N) - prefill) / (N - 1), so decode excludes prefill. olmo.py and
olmo_numpy.py tell when their first token is ready (generate's callback); transformers' prefill is the time of its
generate(prompt, 1), the same generate with one token. After a warm-up, the implementations take turns
(round-robin) in each of --reps repetitions, so drifts in clock speed or load hit all of them alike; the table
shows medians. On a machine shared with other work, OMP_NUM_THREADS=1 keeps torch's threads from waiting on each
other (two threads on two busy cores can run several times slower than one).
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

import olmo

# The shapes of OLMo v1 (all with the real 50304-token vocabulary); "tiny" measures per-token overhead only.
SHAPES = {
    "tiny": dict(num_hidden_layers=2, hidden_size=64, intermediate_size=256, num_attention_heads=4),
    "160m": dict(num_hidden_layers=12, hidden_size=768, intermediate_size=3072, num_attention_heads=12),
    "1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=16,
               tie_word_embeddings=True),
    "7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32),
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
    decoding then depends on the weights, as with a trained model, instead of being a near-tie."""
    from safetensors.torch import save_file

    config = olmo.OlmoConfig(**SHAPES[shape])
    with torch.device("meta"):
        model = olmo.OlmoForCausalLM(config)
    generator = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied: the embedding matrix is the head (transformers doesn't save it twice either)
        if name.endswith(".bias"):
            t = torch.zeros(p.shape, dtype=dtype)
        else:  # Linear (out, in) -> fan_in = in; the embedding (vocab, hidden) doubles as the head when tied
            t = torch.randn(p.shape, generator=generator, device=device).mul_(p.shape[-1] ** -0.5)
            t = t.to(device="cpu", dtype=dtype)
        tensors[name] = t
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    dtype_name = str(dtype).removeprefix("torch.")
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"architectures": ["OlmoForCausalLM"], "model_type": "olmo", "torch_dtype": dtype_name,
                   **dataclasses.asdict(config)}, f, indent=2)
    return config


def weight_bytes(config, dtype):
    """(every weight, weights read per decode step): the step reads each parameter once except the embedding
    table, of which it reads one row per token; the head counts, also when it is the (tied) embedding."""
    with torch.device("meta"):
        model = olmo.OlmoForCausalLM(config)
    size = torch.finfo(dtype).bits // 8
    total = sum(p.numel() for p in model.parameters())  # tied weights once
    per_step = sum(p.numel() for name, p in model.named_parameters(remove_duplicate=False)
                   if name != "model.embed_tokens.weight")
    return total * size, per_step * size


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


# ----------------------------------------------------------------------------------------------------------------
# The implementations, behind one interface: generate(input_ids (B, T) on the CPU, n) -> (new tokens (B, n), the
# perf_counter() time the first new token was ready, or None where the implementation can't tell)


def load(impl, path, device, dtype):
    """Load one implementation; return its generate function."""
    if impl.startswith("olmo.py"):
        model = olmo.OlmoForCausalLM.from_pretrained(path, device=device, dtype=dtype)
        if impl == "olmo.py compiled":  # as olmo.py's CLI does
            mode = "reduce-overhead" if device.startswith("cuda") else "default"
            model.decode_one_token = torch.compile(model.decode_one_token, mode=mode, fullgraph=True)

        def generate(input_ids, n):
            first = []
            out = model.generate(input_ids.to(device), n, callback=first_token_clock(first, device))
            return out[:, input_ids.shape[1]:].cpu(), first[0]
    elif impl == "olmo_numpy.py":
        import numpy as np
        import olmo_numpy
        model = olmo_numpy.OlmoForCausalLM.from_pretrained(path)

        def generate(input_ids, n):
            first = []
            out = np.asarray(model.generate(input_ids.numpy(), n, callback=first_token_clock(first, "cpu")))
            return torch.from_numpy(out[:, input_ids.shape[1]:].astype(np.int64)), first[0]
    elif impl == "transformers":
        import transformers
        transformers.logging.set_verbosity_error()
        model = transformers.OlmoForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()

        def generate(input_ids, n):
            ids = input_ids.to(device)
            with torch.no_grad():  # min_new_tokens = n: no EOS stop, like ours with eos_token_id=None
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                     min_new_tokens=n, pad_token_id=model.config.pad_token_id)
            return out[:, ids.shape[1]:].cpu(), None  # its prefill is timed as generate(prompt, 1)
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    return generate


def first_token_clock(first, device):
    """A generate callback that notes when the first token is ready (the time to first token = prefill)."""
    def callback(token):
        if not first:
            synchronize(device)
            first.append(time.perf_counter())
    return callback


def load_child(impl, path, device, dtype, prompt):
    """Run in a fresh process: load, then produce one token (which touches every weight, so memory-mapped weights
    count too). Reports load time and the peak memory that took, above what the process held before loading."""
    import numpy as np
    if impl == "transformers":
        import transformers  # resolve the lazy imports before the baseline: they are code, not the model
        transformers.OlmoForCausalLM, transformers.GenerationConfig
    if impl == "olmo_numpy.py":
        import olmo_numpy  # noqa: F401
    # Warm up the math libraries too (thread pools, per-thread buffers), which any model would allocate.
    a = torch.randn(256, 256, dtype=dtype, device=device)
    torch.nn.functional.scaled_dot_product_attention(a[None, None], a[None, None], a[None, None]) @ a
    np.ones((256, 256), dtype=np.float32) @ np.ones((256, 256), dtype=np.float32)
    ids = torch.tensor(prompt)
    synchronize(device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        reset_peak_rss()
        base = peak_rss()
    t0 = time.perf_counter()
    generate = load(impl, path, device, dtype)
    synchronize(device)
    load_s = time.perf_counter() - t0
    generate(ids, 1)
    synchronize(device)
    first_token_s = time.perf_counter() - t0 - load_s
    peak = (torch.cuda.max_memory_allocated(device) if cuda else peak_rss()) - base
    return {"load_s": load_s, "first_token_s": first_token_s, "peak_bytes": peak}


def measure_load(impl, path, device, dtype, prompt):
    cmd = [sys.executable, os.path.abspath(__file__), "--load-child", impl, "--model", path, "--device", device,
           "--dtype", str(dtype).removeprefix("torch."), "--prompt-ids", json.dumps(prompt)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"loading {impl} in a subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------------
# The benchmark


def timed(generate, input_ids, n, device):
    """-> (seconds to the first token or None, seconds in all, new tokens)."""
    synchronize(device)
    t0 = time.perf_counter()
    tokens, first = generate(input_ids, n)
    synchronize(device)
    return None if first is None else first - t0, time.perf_counter() - t0, tokens


def bench(args):
    device = args.device or olmo.default_device()
    dtype = olmo.DTYPES[args.dtype] if args.dtype else torch.float32 if device == "cpu" else torch.bfloat16
    long_prompt = args.long_prompt if args.long_prompt is not None else 2048 if device.startswith("cuda") else 0
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="olmo-bench-") as tmp:
        if args.model:
            path, name = args.model, os.path.basename(os.path.normpath(args.model))
            config = olmo.OlmoConfig.from_json(os.path.join(path, "config.json"))
        else:
            path, name = tmp, args.shape
            log(f"building a {args.shape} checkpoint with random weights ({str(dtype).removeprefix('torch.')})")
            t0 = time.perf_counter()
            config = build_checkpoint(args.shape, tmp, dtype, device if device.startswith("cuda") else "cpu")
            log(f"built in {time.perf_counter() - t0:.1f}s")
        return run_bench(args, path, name, config, device, dtype, long_prompt)


def run_bench(args, path, name, config, device, dtype, long_prompt):
    impls = [i for i in args.impl or IMPLS if i != "olmo.py compiled" or args.compile or args.impl]
    skipped = {}
    if "olmo_numpy.py" in impls and (device != "cpu" or dtype != torch.float32):
        skipped["olmo_numpy.py"] = "CPU and float32 only"
    if "transformers" in impls:
        try:
            import transformers  # noqa: F401
        except ImportError:
            skipped["transformers"] = "not installed"
    impls = [i for i in impls if i not in skipped]
    total_bytes, step_bytes = weight_bytes(config, dtype)
    vocab = min(config.vocab_size, 50280)  # real tokens only
    prompt = torch.randint(0, vocab, (args.batch, args.prompt_len))
    long_ids = torch.randint(0, vocab, (args.batch, long_prompt)) if long_prompt else None
    N = args.new_tokens

    log(f"measuring memory bandwidth on {device} (1 GiB copy)")
    bandwidth = memory_bandwidth(device)
    results = {impl: {} for impl in impls}
    for impl in impls:
        if impl == "olmo.py compiled":
            continue  # loads exactly as olmo.py; its compile time is reported as warmup_s
        log(f"loading {impl} in a subprocess (load time, peak memory)")
        r = measure_load(impl, path, device, dtype, prompt.tolist())
        results[impl].update(r, peak_ratio=r["peak_bytes"] / total_bytes)

    generators = {}
    for impl in impls:
        log(f"loading {impl}, warming up" + (" (compiling)" if "compiled" in impl else ""))
        generators[impl] = load(impl, path, device, dtype)
        t0 = time.perf_counter()
        for _ in range(2):  # compiled: the first call compiles, CUDA graphs record on a later one
            timed(generators[impl], prompt, N, device)
        results[impl]["warmup_s"] = time.perf_counter() - t0
        if impl == "transformers":
            timed(generators[impl], prompt, 1, device)

    # Our implementations report when their first token was ready, so one generate(prompt, N) gives both prefill
    # and decode, with the KV cache sized for N throughout; transformers' prefill is its generate(prompt, 1).
    times = {impl: {"first": [], "all": [], "long": []} for impl in impls}
    tokens = {}
    for rep in range(args.reps):
        for impl in impls:  # round-robin: each repetition runs every implementation once
            log(f"rep {rep + 1}/{args.reps}: {impl}")
            first, seconds, tokens[impl] = timed(generators[impl], prompt, N, device)
            if first is None:
                first = timed(generators[impl], prompt, 1, device)[1]
            times[impl]["first"].append(first)
            times[impl]["all"].append(seconds)
    if long_ids is not None:  # after the short prompts: a cache sized for these mustn't alternate with theirs
        for impl in impls:
            timed(generators[impl], long_ids, 1, device)  # warm-up
        for rep in range(args.reps):
            for impl in impls:
                log(f"rep {rep + 1}/{args.reps}: {impl}, prompt of {long_prompt} tokens")
                times[impl]["long"].append(timed(generators[impl], long_ids, 1, device)[1])

    reference = "transformers" if "transformers" in impls else impls[0] if impls else None
    for impl in impls:
        r, t = results[impl], times[impl]
        first, everything = statistics.median(t["first"]), statistics.median(t["all"])
        decode_step = max(everything - first, 1e-9) / (N - 1)
        r.update(prefill_s=first, prefill_tok_s=args.batch * args.prompt_len / first, generate_s=everything,
                 decode_step_s=decode_step, decode_tok_s=args.batch / decode_step,
                 decode_bytes_s=step_bytes / decode_step, roofline=step_bytes / decode_step / bandwidth,
                 same_tokens_as=reference, same_tokens=bool(torch.equal(tokens[impl], tokens[reference])),
                 times=t)
        if t["long"]:
            long_s = statistics.median(t["long"])
            r.update(long_prefill_s=long_s, long_prefill_tok_s=args.batch * long_prompt / long_s)
    if "transformers" in impls:
        hf = results["transformers"]
        for impl in impls:
            r = results[impl]
            r["vs_transformers"] = {k: r[k] / hf[k] for k in ("prefill_tok_s", "decode_tok_s", "long_prefill_tok_s")
                                    if k in r}
    return {
        "model": name, "config": dataclasses.asdict(config), "device": device, "device_name": device_name(device),
        "dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": N, "long_prompt_len": long_prompt,
        "reps": args.reps, "weight_bytes": total_bytes, "weight_bytes_per_step": step_bytes,
        "memory_bandwidth_bytes_s": bandwidth, "skipped": skipped, "results": results,
    }


def device_name(device):
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    import platform
    return platform.processor() or platform.machine()


def table(report):
    """The report as readable text."""
    r0 = report["results"]
    GB = 1e9
    lines = [f"{report['model']}: {report['weight_bytes'] / GB:.3f} GB of weights "
             f"({report['weight_bytes_per_step'] / GB:.3f} GB read per decode step), {report['dtype']}, "
             f"on {report['device']} ({report['device_name']}, {report['threads']} threads, torch {report['torch']})",
             f"batch {report['batch']}, prompt {report['prompt_len']} tokens, {report['new_tokens']} new tokens, "
             f"medians of {report['reps']} reps; memory bandwidth (1 GiB copy): "
             f"{report['memory_bandwidth_bytes_s'] / GB:.1f} GB/s", ""]
    hf = "transformers" in r0
    head = ["implementation", "load s", "peak mem", "prefill tok/s", "decode tok/s", "decode GB/s", "roofline",
            "warmup s", "same tokens"]
    rows = []
    for impl, r in r0.items():
        vs = r.get("vs_transformers", {})

        def with_ratio(key, fmt):
            return f"{r[key]:{fmt}}" + (f" ({vs[key]:.2f}x)" if hf and impl != "transformers" else "")
        rows.append([impl, f"{r['load_s']:.2f}" if "load_s" in r else "-",
                     f"{r['peak_ratio']:.2f}x" if "peak_ratio" in r else "-",
                     with_ratio("prefill_tok_s", ".0f"), with_ratio("decode_tok_s", ".1f"),
                     f"{r['decode_bytes_s'] / GB:.1f}", f"{r['roofline']:.0%}", f"{r['warmup_s']:.1f}",
                     "yes" if r["same_tokens"] else f"no (vs {r['same_tokens_as']})"])
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    for row in [head] + rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    if report["long_prompt_len"]:
        lines += ["", f"prompt of {report['long_prompt_len']} tokens: time to first token"]
        for impl, r in r0.items():
            vs = r.get("vs_transformers", {}).get("long_prefill_tok_s")
            lines.append(f"  {impl:<18} {r['long_prefill_s'] * 1000:8.1f} ms  {r['long_prefill_tok_s']:10.0f} tok/s"
                         + (f"  ({vs:.2f}x)" if vs and impl != "transformers" else ""))
    lines += ["", "peak mem: peak memory to load and produce the first token, in a fresh process, / the weights' "
              "bytes" + (" (GPU: max_memory_allocated)" if report["device"].startswith("cuda") else
                         " (resident set above the process's before loading)"),
              "decode GB/s: weights read per step x steps/s; roofline: that / the measured bandwidth"
              + ("; (Nx): vs transformers" if hf else "")]
    for impl, why in report["skipped"].items():
        lines.append(f"skipped {impl}: {why}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# CLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Benchmark olmo.py against transformers (and olmo_numpy.py).")
    p.add_argument("--shape", choices=SHAPES, default="160m", help="random weights of this shape (default 160m)")
    p.add_argument("--model", help="a checkpoint directory instead of --shape")
    p.add_argument("--device", help="default: cuda, then mps, then cpu")
    p.add_argument("--dtype", choices=olmo.DTYPES, help="default: float32 on the CPU, bfloat16 on a GPU")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per generate, >= 2")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time olmo.py with torch.compile'd decode steps")
    p.add_argument("--impl", action="append", choices=IMPLS, help="only these (repeatable; default: all present)")
    p.add_argument("--long-prompt", type=int, help="also time the prefill of a prompt this long (default: 2048 "
                                                   "on CUDA, none elsewhere; 0 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the raw figures here")
    p.add_argument("--load-child", choices=IMPLS, help=argparse.SUPPRESS)  # internal: one load, in a subprocess
    p.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag in ("prompt_len", "batch", "reps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode speed is measured from the tokens after the first)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.load_child:
        dtype = olmo.DTYPES[args.dtype]
        print(json.dumps(load_child(args.load_child, args.model, args.device, dtype, json.loads(args.prompt_ids))))
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
