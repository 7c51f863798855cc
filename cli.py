"""The command line of olmo.py and olmo_numpy.py, written once.

    python olmo.py --model DIR --prompt "Language models are"        (PyTorch)
    python olmo_numpy.py --model DIR --prompt "Language models are"  (NumPy)

The story of one run: parse and check the flags -> load the model -> read generation_config.json for the sampling
defaults -> encode the prompt as transformers' AutoTokenizer would -> stream the continuation to stdout, whole
characters only -> one line of stats on stderr. Anything a user can get wrong ends in one `error: ...` line on
stderr and exit status 2, never a traceback.

This file imports neither torch nor numpy: each twin's `__main__` calls `main(backend)` with a small object that
knows its framework:

    backend.name                    for --help and the "loaded" line ("PyTorch", "NumPy"); load() may add detail
    backend.add_arguments(parser)   the twin's own flags (olmo.py: --device, --dtype, --compile), after --model
                                    and --revision; the other flags both take (--quantize, --prompt, ...) follow
    backend.load(args, path)        -> model, from the checkpoint directory `path` (fetch_checkpoint resolves
                                    --model and --revision to it), its random numbers seeded with args.seed (always
                                    an int here: drawn, and printed, when --seed is not given); of model.config
                                    (the twin's OlmoConfig) this file reads vocab_size, eos_token_id,
                                    max_position_embeddings and dynamic_rope
    backend.generate(model, ids, max_new_tokens, callback, temperature, top_k, top_p, eos_token_id)
                                    ids: list[int]; callback(token_id: int) for each new token

`main(backend, argv=None)` returns the exit status: 0; 2 after an `error: ...` line (bad flags, files, checkpoints,
a closed stdout: the user's to fix); 130 after Ctrl-C; 141 when whoever reads stdout stops reading (`| head`).
The checkpoint's files are read only when they are regular files of sane size (read_file): a FIFO or /dev/zero
in a checkpoint directory is an error, never a wait or a read without end.

Chat mode (`--chat`) is `chat_session(backend, model, path, tokenizer, args, settings)` in the Chat section at the
end; it reuses the pieces of a --prompt run: `load_tokenizer`, `Stream` and `sampling_settings`.
"""

import argparse
import contextlib
import json
import math
import os
import secrets
import signal
import stat
import sys
import time

# ----------------------------------------------------------------------------------------------------------------
# Flags


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, instead of usage + error
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def make_parser(backend):
    p = Parser(description=f"Generate text with OLMo ({backend.name}). Sampling flags left out take "
                           "generation_config.json's values, as transformers does.")
    p.add_argument("--model", default="allenai/OLMo-1B-hf", help="checkpoint directory or hub id (default: "
                                                                 "%(default)s)")
    p.add_argument("--revision", help="hub revision: branch, tag or commit, e.g. an intermediate training checkpoint "
                                      "such as step1000-tokens4B (default: the latest)")
    backend.add_arguments(p)
    p.add_argument("--quantize", choices=["int8"], help="int8: linear weights as 8-bit integers, quantized at load, "
                                                      "a quarter of float32's memory (default: off)")
    p.add_argument("--prompt", help="the text to continue (no default: give --prompt, --prompt-file or --chat)")
    p.add_argument("--prompt-file", metavar="PATH", help="the text to continue, read from a file (- for stdin; "
                                                         "one line end at its end is dropped) (default: none)")
    p.add_argument("--chat", action="store_true",
                   help="talk to an Instruct model: one message per line of stdin; a line ending in \\ goes on "
                        "on the next line (default: off)")
    p.add_argument("--system", help="chat mode: a system message (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="at most this many new tokens (default: 100)")
    p.add_argument("--temperature", type=float, help="0 = greedy (default: generation_config.json's if it sets "
                                                     "do_sample, else 0)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens only; 0 = off (default: "
                                             "generation_config.json's if it sets do_sample, else off)")
    p.add_argument("--top-p", type=float, help="sample from the most likely tokens up to this probability mass "
                                               "(default: generation_config.json's if it sets do_sample, else off)")
    p.add_argument("--seed", type=int, help="seed for sampling, 0 <= seed < 2**64 (default: a random seed, "
                                            "printed on stderr)")
    return p


def parse_args(backend, argv=None):
    p = make_parser(backend)
    args = p.parse_args(argv)

    inputs = {"--prompt TEXT": args.prompt, "--prompt-file PATH": args.prompt_file, "--chat": args.chat or None}
    given = [flag for flag, value in inputs.items() if value is not None]
    if not given:
        p.error("--prompt TEXT, --prompt-file PATH or --chat is required")
    if len(given) > 1:
        p.error(f"give either {' or '.join(given)}")
    if args.system is not None and not args.chat:
        p.error("--system is for --chat")
    for flag, text in (("--prompt", args.prompt), ("--system", args.system)):
        if text is not None and not is_utf8(text):
            p.error(f"{flag} is not valid UTF-8 text")
    if args.max_new_tokens < 0:
        p.error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature >= 0):
        p.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 0:
        p.error(f"--top-k must be >= 0, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:  # also refuses nan: every comparison with it is False
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.seed is not None and not 0 <= args.seed < 2**64:  # what both torch and NumPy accept
        p.error(f"--seed must be in [0, 2**64), got {args.seed}")
    return args


def is_utf8(text):
    """Bytes that aren't UTF-8 reach Python (argv, stdin) as lone surrogates, which no tokenizer can take."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# generation_config.json: the checkpoint's sampling defaults
#
# transformers' rules: sampling happens only if do_sample is true, and then with temperature (default 1.0), top_k
# (default 50; 0 = off) and top_p (default 1.0 = off); otherwise decoding is greedy. A null is the same as a missing
# key (transformers 5 writes its defaults that way). Flags win over the file.


# Config, tokenizer and template files run to tens of megabytes at most (tokenizer.json of the largest vocabularies);
# one of gigabytes (a sparse file, /dev/zero linked in) would only exhaust memory while it is read.
MAX_FILE_BYTES = 2**27  # 128 MiB

FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a device"),
              (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def read_file(file, limit=MAX_FILE_BYTES):
    """The text of file, which must be a regular file (a symbolic link to one is fine: the hub's cache is made of
    them) of at most `limit` bytes, in UTF-8. Anything else raises ValueError naming the file: a FIFO would wait
    forever for a writer and /dev/zero never ends. O_NONBLOCK lets even a FIFO's open() return at once, and the
    checks look at what was opened, so nothing can be swapped in between."""
    try:
        fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ValueError(f"cannot read {file}: {e.strerror}") from None
    with open(fd, "rb") as f:  # closes fd
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            kind = next((what for test, what in FILE_KINDS if test(status.st_mode)), "not a regular file")
            raise ValueError(f"{file} is {kind}; expected a regular file")
        if status.st_size > limit:
            raise ValueError(f"{file} is {status.st_size / 1e6:,.0f} MB, far more than a file of its kind holds "
                             f"(at most {limit / 1e6:,.0f} MB is read)")
        data = f.read(limit + 1)  # a file that grew since fstat is cut off here, and refused below
    if len(data) > limit:
        raise ValueError(f"{file} grew past {limit / 1e6:,.0f} MB while it was read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"cannot read {file}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def fetch_checkpoint(path, revision=None):
    """--model and --revision -> a checkpoint directory, for both twins (whose from_pretrained reads directories
    only). A local directory is used as is; "org/name" that isn't one is fetched from the Hugging Face hub. What
    goes wrong is said in words: no such repository, no such revision, a login needed, no network."""
    if os.path.isdir(path):
        if revision is not None:
            raise ValueError(f"{path} is a local directory: a revision ({revision}) is for hub ids only")
        return path
    if os.path.exists(path) or path.count("/") != 1 or path.startswith((".", "/")):
        raise ValueError(f"{path} is not a checkpoint directory")
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise ValueError(f"{path} is not a directory; to fetch it from the hub, pip install huggingface_hub") from None
    at = f" at revision {revision!r}" if revision else ""
    try:  # one request, not retried (listing the files would retry a dead network for half a minute)
        files = [f.rfilename for f in huggingface_hub.model_info(path, revision=revision).siblings or []]
    except errors.GatedRepoError:
        raise ValueError(f"{path} is gated: accept its terms on huggingface.co, then `hf auth login`") from None
    except errors.RepositoryNotFoundError:
        raise ValueError(f"the hub has no repository {path} (a private one needs `hf auth login`)") from None
    except errors.RevisionNotFoundError:
        raise ValueError(f"{path} has no revision {revision!r} on the hub") from None
    except Exception as e:  # no network, HF_HUB_OFFLINE, the hub down: whatever the cache holds
        try:
            return huggingface_hub.snapshot_download(path, revision=revision, local_files_only=True)
        except Exception:
            why = "HF_HUB_OFFLINE is set" if isinstance(e, errors.OfflineModeIsEnabled) else first_line(e)
            raise ValueError(f"cannot fetch {path}{at}: the hub can't be reached ({why}) and the local cache "
                             "doesn't have it; check the network, or pass a local directory") from None
    # one weight format: safetensors if the repo has them (as transformers prefers), else the .bin files
    weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
    patterns = ["*.json", "tokenizer*", "*.jinja", *weights]  # config, tokenizer, chat template, weights
    try:
        return huggingface_hub.snapshot_download(path, revision=revision, allow_patterns=patterns)
    except Exception as e:  # the connection lost on the way, a full disk: one line, not a traceback
        raise ValueError(f"cannot fetch {path}{at} from the hub ({first_line(e)})") from None


def first_line(e):
    """An exception as an error message shows it: its type and the first line of its text (the hub's run to
    many lines)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def read_json_object(file):
    """A JSON object from file, {} if there is no such file."""
    if not os.path.lexists(file):  # a dangling symbolic link is an error below, not a missing file
        return {}
    text = read_file(file)
    try:
        d = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise ValueError(f"cannot read {file}: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    return d


def read_generation_config(path, vocab_size):
    """The checkpoint's generation_config.json as {field: value} with only the fields we use, checked; {} if the
    file is absent. Anything we can't interpret raises ValueError naming the file, the field and the value."""
    file = os.path.join(path, "generation_config.json")
    d = read_json_object(file)

    def integer(x):  # in JSON, true is not 1 (in Python, bool is a subclass of int)
        return type(x) is int

    def token_id(x):
        return integer(x) and 0 <= x < vocab_size

    rules = {
        "do_sample": (lambda x: type(x) is bool, "a boolean"),
        "temperature": (lambda x: type(x) in (int, float) and math.isfinite(x) and x >= 0, "a finite number >= 0"),
        "top_k": (lambda x: integer(x) and x >= 0, "an integer >= 0"),
        "top_p": (lambda x: type(x) in (int, float) and 0 < x <= 1, "a number in (0, 1]"),
        "eos_token_id": (lambda x: token_id(x) or type(x) is list and all(map(token_id, x)),
                         f"a token id or a list of token ids in [0, {vocab_size})"),
    }
    gen = {}
    for field, (valid, what) in rules.items():
        if d.get(field) is None:
            continue
        if not valid(d[field]):
            raise ValueError(f"{file}: {field} must be {what}, got {shown(d[field])}")
        gen[field] = d[field]
    return gen


def shown(value, limit=60):
    """A JSON value (or YAML: a date is shown as its text) as an error message shows it: short. Encoded only as far
    as it is shown (iterencode's pure-Python encoder is lazy), so a value built to be huge -- a YAML alias nested
    ten deep is 10**9 values -- costs no more than its first line."""
    text = ""
    try:
        for piece in json.JSONEncoder(default=str).iterencode(value):
            text += piece
            if len(text) > limit:
                return text[:limit - 3] + "..."
    except (RecursionError, ValueError):
        return type(value).__name__
    return text


def sampling_settings(args, path, config):
    """Flags win; then generation_config.json (sampling only if do_sample); then greedy. EOS ids come from
    generation_config.json, else config.json. Returns the keyword arguments of generate()."""
    gen = read_generation_config(path, config.vocab_size)
    if gen.get("do_sample"):
        defaults = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, **gen}
    else:  # greedy: transformers ignores the sampling fields without do_sample
        defaults = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
    flags = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    chosen = {name: defaults[name] if flag is None else flag for name, flag in flags.items()}
    return dict(temperature=float(chosen["temperature"]), top_k=chosen["top_k"] or None,  # top_k 0, top_p 1: off
                top_p=None if chosen["top_p"] == 1 else chosen["top_p"],
                eos_token_id=gen.get("eos_token_id", config.eos_token_id))


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer: the prompt's ids exactly as transformers' AutoTokenizer.from_pretrained(path) gives them
#
# Which BOS/EOS tokens a prompt gets depends only on the class AutoTokenizer picks (transformers 5, read in
# tokenization_auto.py and tokenization_utils_tokenizers.py): with a tokenizer.json present, tokenizer_config.json's
# add_bos_token / add_eos_token are dropped, and config.json's bos_token_id is never consulted.
# - OLMo 1 (model_type "olmo", tokenizer_config.json naming GPTNeoXTokenizer or no class): GPTNeoXTokenizer rebuilds
#   the pipeline around tokenizer.json's vocabulary -- NFC normalization, byte-level pre-tokenization -- and a
#   post-processor that adds nothing: no BOS.
# - model_type "olmo" with GPT2Tokenizer: the same rebuild without NFC, keeping tokenizer.json's post-processor.
# - otherwise (OLMo 2 and 3 always): tokenizer.json as it is, its post-processor included -- a template that
#   prepends BOS prepends it.


def load_tokenizer(path):
    """The checkpoint's tokenizers.Tokenizer, set up so that tokenizer.encode(text).ids are AutoTokenizer's ids."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors

    file = os.path.join(path, "tokenizer.json")
    text = read_file(file)  # not Tokenizer.from_file: it would wait forever on a FIFO, with Ctrl-C ignored
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as e:  # the tokenizers library raises its own exception types
        raise ValueError(f"cannot read {file}: {e}") from None
    settings_file = os.path.join(path, "tokenizer_config.json")
    settings = read_json_object(settings_file)
    tokenizer_class = settings.get("tokenizer_class") or "GPTNeoXTokenizer"
    if not isinstance(tokenizer_class, str):
        raise ValueError(f"{settings_file}: tokenizer_class must be a string, got {shown(tokenizer_class)}")
    tokenizer_class = tokenizer_class.removesuffix("Fast")  # transformers 5 has only the fast classes
    model_type = read_json_object(os.path.join(path, "config.json")).get("model_type", "olmo")
    if model_type != "olmo" or tokenizer_class in ("TokenizersBackend", "PreTrainedTokenizer"):
        return tokenizer
    if tokenizer_class not in ("GPTNeoXTokenizer", "GPT2Tokenizer"):
        raise ValueError(f"{settings_file}: tokenizer_class {tokenizer_class!r} is not supported (use "
                         "GPTNeoXTokenizer, GPT2Tokenizer or TokenizersBackend)")
    add_prefix_space = settings.get("add_prefix_space", False)
    if not isinstance(add_prefix_space, bool):
        raise ValueError(f"{settings_file}: add_prefix_space must be a boolean, got {shown(add_prefix_space)}")
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    if tokenizer_class == "GPTNeoXTokenizer":
        tokenizer.normalizer = normalizers.NFC()
        tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    else:
        tokenizer.normalizer = None
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Streaming: print each new token's text as soon as it is whole


class Stream:
    """Call with each new token id; prints the text to stdout as it grows, then finish() ends the line.

    Byte-level BPE can split one character (an emoji, CJK) over several tokens; until the rest arrives the decoded
    text ends in U+FFFD, so a chunk is printed only once its text is whole. Decoding always restarts one printed
    chunk back (ids[prefix:]) rather than at the new token: some decoders (SentencePiece's) treat the start of a
    sequence specially, and decoding everything each step would cost O(n^2) over a long generation."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer = tokenizer
        self.out = out or sys.stdout
        self.ids = []  # every token id received
        self.prefix = self.read = 0  # ids[prefix:read] decode to the end of what was printed

    def __call__(self, token_id):
        self.ids.append(token_id)
        printed, text = self.decode(self.ids[self.prefix:self.read]), self.decode(self.ids[self.prefix:])
        if len(text) > len(printed) and not text.endswith("\ufffd"):
            self.write(text[len(printed):])
            self.prefix, self.read = self.read, len(self.ids)

    def finish(self):
        """Print the rest (a character cut off by the end of generation shows as U+FFFD) and a newline."""
        printed, text = self.decode(self.ids[self.prefix:self.read]), self.decode(self.ids[self.prefix:])
        self.write(text[len(printed):] + "\n")
        self.prefix = self.read = len(self.ids)

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def write(self, text):
        self.out.write(text)
        self.out.flush()


# ----------------------------------------------------------------------------------------------------------------
# One run


def read_prompt_file(file):
    """--prompt-file: the text of a file, or of stdin for "-", without one line end at its end (the one an editor
    or `echo` adds), as llama-cli's -f reads it. Unlike a checkpoint's files, a pipe is fine here (`<(command)`);
    Ctrl-C stops a wait for its writer."""
    try:
        if file == "-":
            data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        else:
            with open(file, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ValueError(f"cannot read --prompt-file {file}: {e.strerror or e}") from None
    name = "stdin" if file == "-" else file
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"--prompt-file {name} holds more than {MAX_FILE_BYTES / 1e6:,.0f} MB: far more than a "
                         "prompt")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {name} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text.removesuffix("\n").removesuffix("\r")


def run(backend, args):
    if args.prompt_file is not None:
        args.prompt = read_prompt_file(args.prompt_file)
    # Sampling without --seed draws a seed of its own and says which, so that a good sample can be had again.
    drawn = args.seed is None
    if drawn:
        args.seed = secrets.randbits(64)
    t0 = time.perf_counter()
    path = fetch_checkpoint(args.model, args.revision)
    model = backend.load(args, path)  # seeds the backend's random numbers with args.seed
    tokenizer = load_tokenizer(path)
    settings = sampling_settings(args, path, model.config)
    print(f"loaded {args.model} ({backend.name}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    if drawn and settings["temperature"] > 0:
        print(f"sampling with seed {args.seed} (--seed {args.seed} gives this sample again)", file=sys.stderr)
    if getattr(args, "compile", False):
        print("compiling the decode step (torch.compile): the first tokens wait for it", file=sys.stderr)
    if args.chat:
        return chat_session(backend, model, path, tokenizer, args, settings)

    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise ValueError("the prompt is empty")
    trained = trained_context(model.config)
    if trained is not None and len(ids) + args.max_new_tokens > trained:
        print(f"warning: the prompt ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} go past the "
              f"{trained} positions the model was trained on; text past them degrades", file=sys.stderr)

    stream, times = Stream(tokenizer), []

    def on_token(token_id):
        times.append(time.perf_counter())
        stream(token_id)

    print(args.prompt, end="", flush=True)
    t0 = time.perf_counter()
    try:
        backend.generate(model, ids, args.max_new_tokens, on_token, **settings)
    except MemoryError:  # the cache grows with the tokens produced: memory can run out on the way
        stream.finish()
        raise ValueError(f"out of memory after {len(stream.ids)} new tokens (the text above is complete "
                         "up to there)") from None
    stream.finish()
    print(stats(t0, times, getattr(args, "compile", False)), file=sys.stderr)
    return 0


def trained_context(config):
    """The positions the model was trained on (linear and YaRN scaling included); None with dynamic RoPE, which
    rescales its frequencies to any length."""
    return None if config.dynamic_rope else config.max_position_embeddings


def stats(t0, times, compiled):
    """One line: tokens and speed, from the time generation started (t0) and each token's arrival. With --compile
    the first decode step (between the first and second token) is where torch.compile compiles: it is reported
    apart and left out of tokens/s."""
    n, end = len(times), times[-1] if times else t0
    line = f"{n} tokens in {end - t0:.2f}s"
    start, counted = t0, n
    if compiled and n >= 3:
        line += f" (compiling the decode step took {times[1] - times[0]:.1f}s)"
        start, counted = times[1], n - 2
    return line + (f", {counted / (end - start):.1f} tokens/s" if end > start else "")


def main(backend, argv=None):
    """Parse argv (default: sys.argv[1:]), run, and return the exit status: 0, 2 for an error the user can fix,
    130 after Ctrl-C, 141 when the reader of stdout went away (as for a process killed by SIGPIPE)."""
    if sys.stdout is None:  # started with stdout closed (`>&-`): nowhere to print the text
        if sys.stderr is not None:
            print("error: stdout is closed, so there is nowhere to print the text", file=sys.stderr)
        return 2
    try:
        args = parse_args(backend, argv)
    except SystemExit as e:  # --help (0) or a bad flag (2, its error line already printed)
        return e.code
    try:
        return run(backend, args)
    except BrokenPipeError:
        # `... | head -c 20`: the reader has what it wanted. Stop quietly, with the status a shell shows for a
        # writer killed by SIGPIPE (`yes | head` gives 141 too), so `set -o pipefail` scripts still see that the
        # output was cut short. stdout now points at /dev/null: Python's final flush would fail again otherwise.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, OSError) as e:  # a bad path, config or checkpoint: the user's to fix, so no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: keep what was printed, end the line
        print(flush=True)
        return 130


# ----------------------------------------------------------------------------------------------------------------
# Chat
#
# A chat front end is three things. A template: Jinja code shipped with the checkpoint that turns a conversation
# (a list of {"role", "content"} messages) into the text the model was fine-tuned on. A conversation: the messages
# so far, the model's replies included as the text it printed. And a cache that remembers it: each turn renders the
# whole conversation again and hands generate all of its token ids; generate keeps the cached keys and values of
# the longest prefix those ids share with the previous call's (the previous prompt and the reply) and prefills
# only the rest, so a turn costs its new tokens, not the whole history.

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def find_chat_template(path):
    """(template source, the file it came from), found by transformers' rules (AutoTokenizer.from_pretrained and
    get_chat_template): chat_template.jinja, with any additional_chat_templates/NAME.jinja, takes priority over
    tokenizer_config.json's "chat_template" (a string, or a list of {"name", "template"}); of several named
    templates the one named "default" is used. chat_template.json, the legacy file of multimodal processors, which
    a tokenizer doesn't read, is the last place looked."""
    files = {"default": os.path.join(path, "chat_template.jinja")}
    extra = os.path.join(path, "additional_chat_templates")
    if os.path.isdir(extra):
        files.update({name.removesuffix(".jinja"): os.path.join(extra, name)
                      for name in sorted(os.listdir(extra)) if name.endswith(".jinja")})
    files = {name: file for name, file in files.items() if os.path.lexists(file)}  # read_file refuses a FIFO
    if files:
        if "default" not in files:
            raise ValueError(f"{extra} holds chat templates {', '.join(files)} but none named 'default' (and there "
                             "is no chat_template.jinja)")
        return read_file(files["default"]), files["default"]
    config_file = os.path.join(path, "tokenizer_config.json")
    template = read_json_object(config_file).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in template):
            raise ValueError(f"{config_file}: chat_template is a list but not of {{\"name\", \"template\"}} objects")
        template = {t["name"]: t.get("template") for t in template}
    if isinstance(template, dict):
        if "default" not in template:
            raise ValueError(f"{config_file} has chat templates {', '.join(map(str, template))} but none named "
                             "'default'")
        template = template["default"]
    if template is not None:
        if not isinstance(template, str):
            raise ValueError(f"{config_file}: chat_template is {shown(template)}, not a string")
        return template, config_file
    json_file = os.path.join(path, "chat_template.json")
    if os.path.lexists(json_file):
        template = read_json_object(json_file).get("chat_template")
        if not isinstance(template, str):
            raise ValueError(f"{json_file}: chat_template is {shown(template)}, not a string")
        return template, json_file
    raise ValueError(f"{path} has no chat template (use --prompt for plain text)")


def special_token_variables(path):
    """The template's variables bos_token, eos_token, ...: transformers' special_tokens_map, read from
    tokenizer_config.json, where a token is a string or an object with its "content" (null or absent: the variable
    stays undefined, which renders as nothing). Other "*_token" strings (a model's own, like image_token) are
    variables too, as in transformers."""
    file = os.path.join(path, "tokenizer_config.json")
    variables = {}
    for name, value in read_json_object(file).items():
        if name in SPECIAL_TOKENS and isinstance(value, dict):
            value = value.get("content")
            if not isinstance(value, str):
                raise ValueError(f"{file}: {name} is an object without a string \"content\"")
        if name in SPECIAL_TOKENS and value is not None and not isinstance(value, str):
            raise ValueError(f"{file}: {name} is {shown(value)}, not a string or a token object")
        if isinstance(value, str) and name.endswith("_token"):
            variables[name] = value
    return variables


def compile_chat_template(source, file):
    """The template compiled as transformers compiles it: a sandbox that refuses Python internals (a template is
    code from a download), trim_blocks and lstrip_blocks (a block tag's own line leaves no whitespace), {% break %}
    and {% continue %}, and transformers' helpers."""
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # {% generation %}...{% endgeneration %} marks the assistant's text for training masks; it renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):  # how a template refuses a conversation it can't format
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):  # Jinja's own escapes HTML
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:  # dict(...) and dict.fromkeys(...) without the class itself (no type tricks)
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # namespace(...) refusing attribute names starting with "_"
        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                TemplateNamespace.check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with '_': {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"{file}: the chat template does not compile: {e}") from None


# What one render may build. A template is code from a download, and the sandbox stops it reaching Python's
# internals but not making `'{:>999999999}'.format('x')` or `'x'.center(10**9)`: a gigabyte that the tokenizer then
# aborts the process on. So a render may produce at most ten times its messages' text plus a megabyte (a template
# adds markup around the messages, never that much); while it runs the process may take only so much more memory
# (Linux's address-space limit, lowered for the render and restored after: the one bound that covers every way of
# building a string); and all its range() calls together may count at most MAX_RANGE numbers (nested loops over
# jinja2's own per-call limit of 100000 would run for hours).
MAX_RANGE = 100_000


def render_chat(template, messages, variables):
    """The conversation as the prompt text, ending with the header of the assistant's reply. Raises ValueError
    when the template builds more than a prompt can be (see above)."""
    limit = 10 * sum(len(str(m["content"])) for m in messages) + 10**6  # characters
    counted = []

    def bounded_range(*args):  # shadows jinja2's range for this render
        numbers = range(*args)
        try:
            counted.append(len(numbers))
        except OverflowError:  # more numbers than an index can count
            counted.append(math.inf)
        if sum(counted) > MAX_RANGE:
            raise ValueError(f"its range() calls count more than {MAX_RANGE} numbers in one render")
        return numbers

    pieces, size = [], 0
    with memory_limit(256 * 2**20 + 16 * limit):
        for piece in template.generate(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                       range=bounded_range, **variables):
            size += len(piece)
            if size > limit:
                raise ValueError(f"it renders more than {limit:,} characters for {len(messages)} messages: "
                                 "far more than a prompt")
            pieces.append(piece)
    return "".join(pieces)


@contextlib.contextmanager
def memory_limit(extra):
    """`with memory_limit(n):` the process may map at most n more bytes than it has now, else MemoryError (Linux's
    RLIMIT_AS; where there is no /proc/self/statm or no resource module, no limit)."""
    try:
        import resource
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        yield
        return
    limit = mapped + extra
    for bound in (soft, hard):
        if bound != resource.RLIM_INFINITY:
            limit = min(limit, bound)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def chat_messages(system, turns, message):
    """[system] + (user, assistant) for each earlier turn + the new user message, as apply_chat_template takes
    them."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    for user, reply in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return messages + [{"role": "user", "content": message}]


def chat_prompt(template, file, variables, tokenizer, messages):
    """messages -> the prompt's token ids, as apply_chat_template(messages, add_generation_prompt=True) gives them:
    the rendered text tokenized with add_special_tokens=False (the template writes BOS itself if the model has
    one)."""
    try:
        text = render_chat(template, messages, variables)
    except MemoryError:
        raise ValueError(f"{file}: the chat template builds a string of hundreds of megabytes: no prompt is "
                         "that long") from None
    except Exception as e:  # the template's own refusal (raise_exception), a sandbox violation, or a bug in it
        raise ValueError(f"{file}: the chat template failed: {' '.join(str(e).split())}") from None
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if not ids:  # a sandbox violation that merely renders as nothing ends here too
        raise ValueError(f"{file}: the chat template renders the conversation as empty text")
    return ids


def read_line(prompt, terminal, editing):
    """One line of stdin without its line end, or None at the end of input (Ctrl-D). editing: input() edits the
    line through readline (Left/Right, Up/Down through this session's lines; a paste of several lines is one
    line), which it does only when stdin and stdout are both the terminal, and it writes the prompt there.
    Otherwise the prompt goes to stderr on a terminal, and to nowhere from a pipe. A line that isn't UTF-8 is
    skipped with a notice."""
    while True:
        if editing:
            try:
                line = input(prompt)
            except EOFError:
                line = None
            except UnicodeDecodeError:
                line = "\udcff"  # not UTF-8: refused below like a line read as bytes
        else:
            if terminal:
                print(prompt, end="", file=sys.stderr, flush=True)
            raw = sys.stdin.buffer.readline()
            line = raw.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8", "surrogateescape") if raw else None
        if line is None:
            if terminal:
                print(file=sys.stderr)  # end the prompt's line
            return None
        if is_utf8(line):
            return line
        print("that line is not UTF-8 text; skipped", file=sys.stderr)


def read_message(terminal, editing):
    """The next message: a line of stdin, and the lines after it while a line ends in a backslash (llama-cli's
    convention: the backslash becomes a line break); None at the end of input."""
    lines = []
    while True:
        line = read_line("... " if lines else "> ", terminal, editing)
        if line is None:
            return "\n".join(lines) if lines else None
        if not line.endswith("\\"):
            return "\n".join(lines + [line])
        lines.append(line[:-1])


def stream_reply(backend, model, ids, tokenizer, max_new_tokens, settings, compiled=False):
    """Generate one reply to the prompt ids, streaming it to stdout; returns its text as printed. Then on stderr:
    its tokens and speed, and a note when --max-new-tokens cut it off.

    Ctrl-C while the prompt is being read (prefill: minutes for a long paste to a big model) stops it at once:
    generate leaves its cache consistent wherever it is stopped (it counts tokens as cached only once their keys
    and values are written). Once tokens flow, Ctrl-C only sets a flag that the next token's callback turns into
    KeyboardInterrupt, so that what was printed and what is kept as the reply stay the same. An interrupted reply
    ends with the last whole text printed: the tokens of a character cut off are dropped."""
    stream, interrupted, times = Stream(tokenizer), [], []

    def on_token(token_id):
        if interrupted:
            raise KeyboardInterrupt
        times.append(time.perf_counter())
        stream(token_id)

    def on_ctrl_c(signum, frame):
        if not stream.ids:  # still reading the prompt, nothing printed: stop now
            raise KeyboardInterrupt
        interrupted.append(True)

    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    t0 = time.perf_counter()
    try:
        backend.generate(model, ids, max_new_tokens, on_token, **settings)
        stream.finish()
    except KeyboardInterrupt:  # the reply ends here and stays in the conversation as far as it was printed
        stream.write("\n")
    except MemoryError:
        stream.finish()
        raise ValueError(f"out of memory after {len(stream.ids)} tokens of this reply") from None
    finally:
        signal.signal(signal.SIGINT, previous)
    print(stats(t0, times, compiled), file=sys.stderr)
    eos = settings.get("eos_token_id")  # None, an id or a list of ids
    if eos is None:
        eos = []
    elif isinstance(eos, int):
        eos = [eos]
    if not interrupted and len(stream.ids) == max_new_tokens > 0 and stream.ids[-1] not in eos:
        print(f"(the reply was cut off at --max-new-tokens {max_new_tokens})", file=sys.stderr)
    return stream.decode(stream.ids[:stream.read])  # what was printed (byte-level BPE decodes alike in pieces)


def chat_session(backend, model, path, tokenizer, args, settings):
    """--chat: talk to the model through its chat template, one user message per line of stdin. Returns the exit
    status: 0 at the end of input, 130 after Ctrl-C at the prompt."""
    source, file = find_chat_template(path)
    template, variables = compile_chat_template(source, file), special_token_variables(path)
    context = trained_context(model.config)  # None: the RoPE scales (dynamic) to any length
    if context is not None and args.max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a message in the {context} "
                         "positions the model was trained on")

    def prompt(turns, message):
        return chat_prompt(template, file, variables, tokenizer, chat_messages(args.system, turns, message))

    terminal = sys.stdin.isatty()
    editing = terminal and sys.stdout.isatty()  # see read_line
    if editing:
        try:
            import readline  # noqa: F401 -- once imported, input() edits lines through it
        except ImportError:  # Python built without it (Windows)
            editing = False
    compiled = getattr(args, "compile", False)  # only the first reply's first decode step compiles
    turns = []  # [(user message, reply as printed)], oldest first
    while True:
        try:
            message = read_message(terminal, editing)
        except KeyboardInterrupt:  # Ctrl-C at the prompt ends the session
            if terminal:
                print(file=sys.stderr)  # end the prompt's line
            return 130
        if message is None:
            return 0
        if message.strip() == "/reset":  # a new conversation; --system stays
            turns = []
            if terminal:
                print("(new conversation)", file=sys.stderr)
            continue
        if not message.strip():
            continue
        # The prompt and a whole reply must fit in the trained context: drop the oldest turns until they do.
        ids = prompt(turns, message)
        dropped = 0
        while context is not None and len(ids) + args.max_new_tokens > context and dropped < len(turns):
            dropped += 1
            ids = prompt(turns[dropped:], message)
        if context is not None and len(ids) + args.max_new_tokens > context:
            print(f"this message makes a prompt of {len(ids)} tokens; with --max-new-tokens {args.max_new_tokens} "
                  f"for the reply that is more than the {context} positions the model was trained on: not sent",
                  file=sys.stderr)
            continue
        if dropped:
            print(f"dropped the oldest {dropped} turn{'s' * (dropped > 1)} of the conversation to fit the "
                  f"{context} positions the model was trained on", file=sys.stderr)
            turns = turns[dropped:]
        reply = stream_reply(backend, model, ids, tokenizer, args.max_new_tokens, settings, compiled)
        turns.append((message, reply))
        compiled = False
