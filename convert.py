"""Convert an OLMo or OLMo 2 trainer checkpoint into a transformers checkpoint (config.json + safetensors), or
rewrite a transformers-layout OLMo, OLMo 2 or OLMo 3 checkpoint (as safetensors, in another dtype or shard size).
(Olmo Hybrid is published in the transformers layout only, and olmo.py and olmo_numpy.py read it as it is.)

    python convert.py SRC DST [--dtype float32|float16|bfloat16] [--shard-size 5GB]

SRC is a directory in one of three layouts, recognized by its files:

1. a checkpoint of AllenAI's OLMo trainer (ai2-olmo), which wrote OLMo 1 and OLMo 2: `config.yaml` (the model
   settings under `model:`; `layer_norm_type: rms` means OLMo 2) and `model.pt` or `model.safetensors` with the
   trainer's fused names (`transformer.blocks.N.att_proj.weight`, ...);
2. the pre-transformers `hf_olmo` layout: `config.json` with the trainer's field names (`d_model`, ...) and
   the same fused weights under `model.transformer.*`;
3. a transformers checkpoint (`config.json` with model_type "olmo", "olmo2", "olmo3", "olmoe" or "flex_olmo"),
   which is only rewritten: as safetensors, optionally in another dtype or shard size (e.g. so a NumPy-only
   reader can load a .bin), its config and every tensor kept as they are (only the config's dtype changes).
   OLMoE and FlexOlmo are published in this layout only (one tensor per expert, as the hub ships them and
   save_pretrained writes them; transformers 5's in-memory fused experts are refused). So is Olmo Hybrid, which is
   not rewritten: the hub stores its convolution in three parts (q_conv1d, k_conv1d, v_conv1d) under OLMo-core's
   norm names, which olmo.py and olmo_numpy.py join and rename as they load it.

DST gets `config.json`, `model.safetensors` (or shards and `model.safetensors.index.json`) and whatever
tokenizer files, chat template and `generation_config.json` SRC has, each checked to be what its name says (a
JSON object, UTF-8 text). Every file read must be a regular file inside SRC (or, for a snapshot of the hub's
cache, in its blobs): a link out of SRC, a FIFO, a device, an index naming `../` or absolute paths are
refused. Settings neither transformers' OLMo nor OLMo 2 can express (MLP biases, ALiBi, LayerNorm weights,
...) are refused, never converted into a different model. The model's tensors and config checks come from
olmo.py (this repo's copy of transformers' OLMo models). (OLMo 3 was trained with olmo-core, whose distributed
checkpoints its own converter turns into layout 3.) Tensors are streamed one at a time, so a 7B model converts
in far less memory than two copies of it, and DST appears only when complete: everything is written into a
directory beside it, renamed at the end, and removed on failure or when the process is asked to stop (SIGINT,
SIGTERM, SIGHUP); one left by a conversion that was killed (SIGKILL, a power cut) is removed by the next
conversion to the same DST. Tensors holding NaN or infinity are refused by name: a checkpoint with them is
corrupt, and would only generate garbage.
"""

import argparse
import base64
import dataclasses
import glob
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import stat
import struct
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors import safe_open

import olmo
from cli import Parser, read_file, shown  # the shared command line's pieces (cli.py imports no torch)

# safetensors' names for the dtypes we read and write.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Where each layout keeps its weights, in order of preference; an index names shards.
TRAINER_WEIGHT_FILES = ["model.safetensors", "model.pt"]
HF_WEIGHT_FILES = ["model.safetensors.index.json", "pytorch_model.bin.index.json", "model.safetensors",
                   "pytorch_model.bin"]
# The other files of a checkpoint, copied when SRC has them: JSON objects, and text.
EXTRA_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
              "generation_config.json")
EXTRA_TEXT = ("merges.txt", "chat_template.jinja")


class ConversionError(ValueError):
    """Bad input: reported as one line, never as a traceback."""


class Stopped(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived (see main). A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way out swallows it before the staging directory is removed."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def convert(src, dst, dtype=None, shard_size="5GB"):
    """Convert the checkpoint directory `src` into a transformers OLMo checkpoint directory `dst`.

    dtype: "float32", "float16" or "bfloat16"; None keeps the source's (that of its embedding; float64 becomes
    float32).
    shard_size: the largest shard, in bytes or as "5GB", "500MB", "2GiB", ...
    """
    src, dst = Path(src), Path(dst)
    out_dtype = parse_dtype(dtype)
    max_shard_bytes = parse_size(shard_size)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConversionError(f"{dst} exists and is not an empty directory; choose a new or empty one")
    not_dirs = [p for p in dst.absolute().parents if p.exists() and not p.is_dir()]
    if not_dirs:
        raise ConversionError(f"{dst}: can't be created, since {not_dirs[0]} is a file, not a directory")

    layout, config, tensors = read_checkpoint(src)
    extras = read_extra_files(src)
    # float64 is no model's dtype (and the NumPy twin refuses it): such sources become float32.
    out_dtype = out_dtype or (torch.float32 if tensors[0].dtype == torch.float64 else tensors[0].dtype)
    log(f"converting {src} ({layout} layout, {len(tensors)} tensors) to {str(out_dtype).removeprefix('torch.')}")

    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(dst)
    staging = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    staging.mkdir()
    try:
        write_weights(staging, tensors, out_dtype, max_shard_bytes)
        write_config(staging, config, out_dtype)
        for name, data in extras.items():
            (staging / name).write_bytes(data)
        os.replace(staging, dst)  # atomic; on POSIX it also replaces an empty directory
    except BaseException:  # Stopped and KeyboardInterrupt too: never leave a half-written result behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"wrote {dst}")


def remove_stale_staging(dst):
    """Remove the staging directories (.DST.partial-PID) that conversions to dst left when they were killed too
    hard to clean up (SIGKILL); name those of a conversion still running, and leave them."""
    for old in dst.parent.glob(f".{glob.escape(dst.name)}.partial-*"):
        pid = old.name.rpartition("-")[2]
        if not pid.isdigit() or old.is_symlink() or not old.is_dir():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(old)
            log(f"removed {old}, left by a conversion (process {pid}) that was killed before it finished")
            continue
        except (PermissionError, OverflowError):  # someone else's process (or no possible pid): not ours to judge
            pass
        log(f"note: {old} is the staging directory of a conversion (process {pid}) that is still running")


# ---------------------------------------------------------------------------------------------------------
# Reading SRC's files: only regular files inside SRC.


def checked_path(src, path):
    """path, if it is a regular file inside src (a symbolic link may point to one there); else ConversionError.
    A checkpoint is often a download: a link to ~/.ssh/id_rsa or an index naming ../../secret must not make this
    program copy that file into DST. The hub's own cache links snapshots/COMMIT/NAME to ../../blobs/HASH, so for
    a snapshot directory the repository's blobs count as inside."""
    root = src.resolve()
    real = path.resolve()
    inside = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(real.is_relative_to(place) for place in inside):
        raise ConversionError(f"{path} links to {real}, outside {src}; copy the file into {src} if it belongs to "
                              "the checkpoint")
    try:
        mode = real.stat().st_mode
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(mode):
        raise ConversionError(f"{path} is not a regular file (a FIFO, a device or a directory), so it can't be "
                              "part of a checkpoint")
    return path


def read_text(src, path):
    """The text of a small file of src (config, tokenizer, template), read with the same checks as the CLIs'."""
    checked_path(src, path)
    try:
        return read_file(str(path))
    except ValueError as e:
        raise ConversionError(str(e)) from None


def read_extra_files(src):
    """{name: bytes} of the tokenizer files, chat template and generation_config.json that src has, each checked:
    a JSON file must hold a JSON object, a text file UTF-8. Read before anything is written, copied as read."""
    extras = {}
    for name in EXTRA_JSON + EXTRA_TEXT:
        if os.path.lexists(src / name):
            text = read_text(src, src / name)
            if name in EXTRA_JSON:
                check_json_object(text, src / name)
            extras[name] = text.encode("utf-8")  # strict UTF-8 decodes and encodes back to the same bytes
    return extras


def read_json(path, src):
    """A JSON object of src, read by olmo.py; a file we can't read is the input's fault (a ConversionError)."""
    checked_path(src, path)
    try:
        return olmo.read_json_object(path)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def check_json_object(text, path):
    try:
        d = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from None
    if not isinstance(d, dict):
        raise ConversionError(f"{path}: expected a JSON object")


# ---------------------------------------------------------------------------------------------------------
# Detecting the layout. Each reader returns the transformers config.json (a dict) and the list of output
# tensors, having checked both, so that bad input fails before anything is written.


def read_checkpoint(src: Path):
    if not src.exists():
        raise ConversionError(f"{src}: no such directory")
    if not src.is_dir():
        raise ConversionError(f"{src}: expected a checkpoint directory, got a file")
    if (src / "model_and_optim").is_dir():  # olmo-core (OLMo 3's trainer) writes distributed checkpoints
        raise ConversionError(f"{src} is an olmo-core checkpoint; convert it with olmo-core's own "
                              "src/examples/huggingface/convert_checkpoint_to_hf.py")
    if os.path.lexists(src / "config.json"):  # not is_file(): a FIFO or a broken link is an error, not absent
        raw = read_json(src / "config.json", src)
        if "d_model" in raw:  # hf_olmo wrote the trainer's fields (its model_type was "olmo" in early versions)
            return "hf_olmo", *read_trainer_layout(src / "config.json", raw, HF_WEIGHT_FILES, "model.transformer.")
        if raw.get("model_type") == "olmo_hybrid":  # Olmo Hybrid: its hub layout is read as it is
            raise ConversionError(f"{src} is an Olmo Hybrid checkpoint, published in the transformers layout only: "
                                  "olmo.py and olmo_numpy.py read it as it is, with no conversion")
        if raw.get("model_type") in olmo.FAMILIES:
            return "transformers", *read_transformers_layout(src, raw)
        raise ConversionError(f"{src / 'config.json'}: model_type {raw.get('model_type')!r} is not one of "
                              f"{', '.join(olmo.FAMILIES)}")
    if os.path.lexists(src / "config.yaml"):
        model = read_yaml_model(src / "config.yaml", src)
        # config.yaml holds only the trainer's settings, so one it doesn't know may be a newer feature.
        # (hf_olmo's config.json also holds transformers' own fields: architectures, torch_dtype, ...)
        unknown = set(model) - set(TRAINER_DEFAULTS) - TRAINER_IGNORED
        if unknown:
            raise ConversionError(f"{src / 'config.yaml'}: unknown model settings "
                                  f"{', '.join(sorted(map(str, unknown)))}")
        return "OLMo trainer", *read_trainer_layout(src / "config.yaml", model, TRAINER_WEIGHT_FILES, "transformer.")
    raise ConversionError(f"{src}: neither config.json nor config.yaml found; not an OLMo checkpoint")


def read_yaml_model(path, src):
    """config.yaml's `model:` section. Anchors and aliases (&a / *a) are refused: ten nested aliases expand a
    small file into billions of values, and OmegaConf, which writes the trainer's configs, never writes them.
    A key written twice is refused too (YAML would silently keep the last), and a syntax error is one line."""
    import yaml  # only trainer checkpoints need it

    class Loader(yaml.SafeLoader):  # numbers as the trainer reads them (OmegaConf): 1e-5 is a float (YAML 1.2)
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.composer.ComposerError(None, None, f"the alias *{event.anchor} is not supported (write "
                                                  "the value out)", event.start_mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    twice = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: PyYAML refuses it below
                    continue
                if twice:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {shown(key)} appears twice",
                                                            key_node.start_mark)
            return super().construct_mapping(node, deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    text = read_text(src, path)
    try:
        model = (yaml.load(text, Loader) or {}).get("model")
    except yaml.MarkedYAMLError as e:  # one line: where, and what (PyYAML's own message adds the line and a caret)
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConversionError(f"{path}: {where}{e.problem or e.context}") from None
    except (yaml.YAMLError, AttributeError, RecursionError) as e:
        raise ConversionError(f"cannot read {path}: {' '.join(str(e).split()) or type(e).__name__}") from None
    if not isinstance(model, dict):
        raise ConversionError(f"{path}: no `model:` section")
    return model


# ---------------------------------------------------------------------------------------------------------
# Trainer settings (olmo/config.py, ModelConfig, ai2-olmo 0.6.0). A file leaves out whatever it doesn't
# change, so absent settings take the trainer's defaults, which are GPT-2's, not OLMo's: e.g. rope is off,
# biases and norm weights are on, and the embedding is padded to 50304 rows.

TRAINER_DEFAULTS = {
    "d_model": 768, "n_heads": 12, "n_kv_heads": None, "multi_query_attention": None, "n_layers": 12,
    "mlp_ratio": 4, "mlp_hidden_size": None, "max_sequence_length": 1024, "rope_theta": 10_000,
    "clip_qkv": None, "vocab_size": 50257, "embedding_size": 50304, "weight_tying": True,
    "eos_token_id": 50256, "pad_token_id": 50256, "block_group_size": 1, "layer_norm_type": "default",
    "layer_norm_eps": 1e-5, "rope": False, "alibi": False, "activation_type": "swiglu", "block_type": "sequential",
    "include_bias": True, "layer_norm_with_affine": True, "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True, "embedding_layer_norm": False, "norm_after": False,
    "scale_logits": False,
}
# The values each setting may take, read strictly (a bool is not an int, "64" is not a number, 64.0 is not a
# size): (Python types, the bound a number must exceed, what to say).
SIZE, SIZE_OR_NULL = ((int,), 0, "a positive integer"), ((int, type(None)), 0, "a positive integer or null")
POSITIVE = ((int, float), 0, "a positive number")
TRAINER_TYPES = {
    "d_model": SIZE, "n_heads": SIZE, "n_layers": SIZE, "mlp_ratio": SIZE, "max_sequence_length": SIZE,
    "vocab_size": SIZE, "block_group_size": SIZE, "n_kv_heads": SIZE_OR_NULL, "mlp_hidden_size": SIZE_OR_NULL,
    "embedding_size": SIZE_OR_NULL, "rope_theta": POSITIVE, "layer_norm_eps": POSITIVE,
    "clip_qkv": ((int, float, type(None)), 0, "a positive number or null"),
    "multi_query_attention": ((bool, type(None)), None, "true, false or null"),
    "weight_tying": ((bool,), None, "true or false"),
    "eos_token_id": ((int,), -1, "an integer >= 0"), "pad_token_id": ((int,), -1, "an integer >= 0"),
}
# Settings transformers' models fix: setting -> (the value needed, what the model has instead). Both
# generations share these ...
REQUIRED = {
    "rope": (True, "rotary position embeddings"), "alibi": (False, "no ALiBi"),
    "activation_type": ("swiglu", "a SwiGLU MLP"),
    "block_type": ("sequential", "the sequential block (fused att_proj and ff_proj)"),
    "include_bias": (False, "no biases"), "embedding_layer_norm": (False, "no embedding norm"),
    "scale_logits": (False, "unscaled logits"),
}
# ... and differ in OLMo 2's three coupled changes: RMSNorm with weights, also on the whole q and k
# projections, after each sublayer instead of before. layer_norm_type says which generation a file means.
GENERATIONS = {  # layer_norm_type -> (model_type, the model's name, its other requirements)
    "default": ("olmo", "transformers' OLMo", {
        "layer_norm_with_affine": (False, "norms without weights or biases"),
        "layer_norm_eps": (1e-5, "norms with eps 1e-5"), "attention_layer_norm": (False, "no q/k norms"),
        "norm_after": (False, "norms before attention and MLP, not after")}),
    "rms": ("olmo2", "transformers' OLMo 2 (layer_norm_type: rms)", {
        "layer_norm_with_affine": (True, "norms with weights"),
        "attention_layer_norm": (True, "norms on q and k"),
        "attention_layer_norm_with_affine": (True, "q/k norms with weights"),
        "norm_after": (True, "norms after attention and MLP, not before"),
        "clip_qkv": (None, "no q/k/v clipping")}),
}
# "low_precision" is the same LayerNorm, only run at autocast precision while training.
GENERATIONS["low_precision"] = GENERATIONS["default"]
# Settings that only matter for training, or for features refused above. (bias_for_layer_norm only adds norm
# biases, tensors the weight check refuses by name.)
TRAINER_IGNORED = {
    "flash_attention", "attention_dropout", "residual_dropout", "embedding_dropout", "init_device", "init_fn",
    "init_std", "init_cutoff_factor", "precision", "scale_emb_init", "emb_init_std", "rope_full_precision",
    "alibi_bias_max", "bias_for_layer_norm",
}
# transformers' names for the trainer's, to report olmo.py's config errors in the trainer's terms.
TRAINER_NAMES = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads",
                 "num_hidden_layers": "n_layers", "max_position_embeddings": "max_sequence_length"}


def read_trainer_layout(config_path, raw, weight_names, prefix):
    """Layouts 1 and 2: the trainer's settings and its fused tensors, `prefix` before every name."""
    config = trainer_to_transformers_config(raw, config_path)
    weights = Weights(weight_files(config_path.parent, weight_names))
    shapes = model_shapes(config, config_path, weights, TRAINER_NAMES)
    return config, trainer_tensors(weights, shapes, prefix, config["num_hidden_layers"],
                                   raw.get("block_group_size", 1), config_path)


def trainer_to_transformers_config(raw, where):
    norm = raw.get("layer_norm_type", "default")
    if not isinstance(norm, str) or norm not in GENERATIONS:
        raise ConversionError(f"{where} sets layer_norm_type: {shown(norm)}; transformers' OLMo has a LayerNorm "
                              f"(\"default\") and OLMo 2 an RMSNorm (\"rms\")")
    model_type, model, required = GENERATIONS[norm]
    for key, (needed, instead) in {**REQUIRED, **required}.items():
        value = raw.get(key, TRAINER_DEFAULTS[key])
        if type(value) is not type(needed) or value != needed:
            what = f"sets {key}: {shown(value)}" if key in raw else \
                f"leaves {key} unset, so the trainer's default {shown(value)} applies"
            raise ConversionError(f"{where} {what}; {model} has {instead} ({key}: {shown(needed)})")
    get = {}
    for key, (types, bound, kind) in TRAINER_TYPES.items():
        value = get[key] = raw.get(key, TRAINER_DEFAULTS[key])
        if type(value) not in types or None is not bound and None is not value and not bound < value < math.inf:
            raise ConversionError(f"{where}: {key} must be {kind}, got {shown(value)}")

    n_heads, n_kv_heads, mqa = get["n_heads"], get["n_kv_heads"], get["multi_query_attention"]
    if mqa is not None and n_kv_heads is not None and n_kv_heads != (1 if mqa else n_heads):
        raise ConversionError(f"{where} sets both multi_query_attention and n_kv_heads, and they disagree")
    if n_kv_heads is None:
        n_kv_heads = 1 if mqa else n_heads
    # ff_proj holds both halves of the SwiGLU input, so the trainer's MLP size is twice transformers'.
    fused_mlp = get["mlp_hidden_size"] or get["mlp_ratio"] * get["d_model"]
    if fused_mlp % 2:
        raise ConversionError(f"{where}: the MLP size {fused_mlp} is odd, so it can't be split for SwiGLU")
    vocab = get["embedding_size"] or get["vocab_size"]
    if vocab < get["vocab_size"]:
        raise ConversionError(f"{where}: embedding_size {vocab} is smaller than vocab_size {get['vocab_size']}")
    config = {
        "architectures": ["Olmo2ForCausalLM" if model_type == "olmo2" else "OlmoForCausalLM"],
        "model_type": model_type, "vocab_size": vocab, "hidden_size": get["d_model"],
        "intermediate_size": fused_mlp // 2, "num_hidden_layers": get["n_layers"], "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads, "hidden_act": "silu", "max_position_embeddings": get["max_sequence_length"],
        "rope_theta": float(get["rope_theta"]), "rope_scaling": None, "attention_bias": False,
        "attention_dropout": 0.0, "tie_word_embeddings": get["weight_tying"], "pad_token_id": get["pad_token_id"],
        "bos_token_id": None, "eos_token_id": get["eos_token_id"],
    }
    if model_type == "olmo2":
        config["rms_norm_eps"] = float(get["layer_norm_eps"])
    else:
        config["clip_qkv"] = None if get["clip_qkv"] is None else float(get["clip_qkv"])
    return config


def read_transformers_layout(src, raw):
    """Layout 3: already transformers' names and config, both kept as they are."""
    weights = Weights(weight_files(src, HF_WEIGHT_FILES))
    expected = model_shapes(raw, src / "config.json", weights)
    # A tied model may still carry a copy of the embedding as lm_head; transformers ignores it, and so do we.
    weights.check(expected, src / "config.json", ignore={"lm_head.weight"} - expected.keys())
    return raw, [weights.take(name, name) for name in expected]


def model_shapes(config, where, weights, names=None):
    """Check a transformers config.json with olmo.py and return the tensors a checkpoint of it holds (name ->
    shape, in transformers' order), read off olmo's model of one layer built on the meta device, which costs
    nothing. `names` translates olmo.py's field names in error messages (for trainer configs)."""
    n_layers = config.get("num_hidden_layers")
    if type(n_layers) is int and n_layers > len(weights.tensors):  # every layer has tensors of its own
        raise ConversionError(f"{where}: {(names or {}).get('num_hidden_layers', 'num_hidden_layers')} "
                              f"{n_layers}, but the checkpoint holds only {len(weights.tensors)} tensors")
    try:
        cfg = olmo.OlmoConfig.from_dict(config, where)
    except ValueError as e:
        message = str(e)
        for name, trainer_name in (names or {}).items():
            message = re.sub(rf"\b{name}\b", trainer_name, message)
        raise ConversionError(message) from None
    with torch.device("meta"):
        model = olmo.OlmoForCausalLM(dataclasses.replace(cfg, num_hidden_layers=1, layer_types=None))
    # One layer's tensors, repeated for every layer; the rest (the final norm, the head) after them.
    one = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    layer = {n.removeprefix("model.layers.0."): s for n, s in one.items() if n.startswith("model.layers.0.")}
    shapes = {"model.embed_tokens.weight": one["model.embed_tokens.weight"]}
    shapes |= {f"model.layers.{i}.{n}": s for i in range(cfg.num_hidden_layers) for n, s in layer.items()}
    shapes |= {n: s for n, s in one.items() if not n.startswith(("model.layers.", "model.embed_tokens."))}
    if cfg.tie_word_embeddings:  # transformers writes a tied head once, as the embedding
        del shapes["lm_head.weight"]
    return shapes


# ---------------------------------------------------------------------------------------------------------
# Reading tensors lazily.


class OutTensor(NamedTuple):
    name: str  # transformers' name
    shape: tuple
    dtype: torch.dtype  # in the source
    read: Callable[[], torch.Tensor]


def weight_files(src, candidates):
    """The weight files of `src`: the first candidate present; an index names its shards."""
    for name in candidates:
        path = src / name
        if os.path.lexists(path):
            if not name.endswith(".index.json"):
                return [checked_path(src, path)]
            weight_map = read_json(path, src).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConversionError(f"{path}: no weight_map of tensor names to file names")
            shards = sorted(set(weight_map.values()))
            if not all(shard and os.path.basename(shard) == shard and shard not in (".", "..") for shard in shards):
                raise ConversionError(f"{path}: weight_map names files outside {src} (the values must be file "
                                      "names in the same directory)")
            return [checked_path(src, src / shard) for shard in shards]
    raise ConversionError(f"{src}: no weights found (looked for {', '.join(candidates)})")


class Weights:
    """A checkpoint's tensors by name, each read from disk only when used: .pt/.bin files are memory-mapped
    (torch.load(mmap=True, weights_only=True): no code from the file runs), safetensors read by slices."""

    def __init__(self, files):
        self.tensors = {}  # name -> mmap'd torch.Tensor or safetensors slice; both index like tensors
        self._handles = []  # open safetensors files, kept open while their slices are in use
        for path in files:
            for name, tensor in self._open(path):
                if name in self.tensors:
                    raise ConversionError(f"{path}: tensor {name} is also in another weight file")
                self.tensors[name] = tensor

    def _open(self, path):
        try:
            if path.suffix == ".safetensors":
                handle = safe_open(path, framework="pt")
                self._handles.append(handle)
                return [(decode_trainer_key(key), handle.get_slice(key)) for key in handle.keys()]
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as e:  # corrupt, truncated or not a weight file at all
            raise ConversionError(f"cannot read {path}: {e}".splitlines()[0]) from None
        if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
            raise ConversionError(f"{path}: expected a dict of tensors (a state dict)")
        return list(state.items())

    def shape(self, name):
        t = self.tensors[name]
        return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t.get_shape())

    def dtype(self, name):
        t = self.tensors[name]
        if isinstance(t, torch.Tensor):
            dtype = t.dtype
        else:
            dtype = SAFETENSORS_DTYPES.get(t.get_dtype())
        if dtype not in SAFETENSORS_DTYPES.values():
            raise ConversionError(f"tensor {name} has dtype {t.dtype if isinstance(t, torch.Tensor) else t.get_dtype()}"
                                  ", not a floating-point type; only floating-point tensors are weights")
        return dtype

    def check(self, expected, where, ignore=frozenset()):
        """Fail before writing anything unless the tensors are exactly `expected` (name -> shape), which the
        config file `where` implies."""
        missing = [n for n in expected if n not in self.tensors]
        unexpected = sorted(set(self.tensors) - set(expected) - set(ignore))
        if missing:
            raise ConversionError(f"the checkpoint lacks {len(missing)} tensor(s) that {where} implies: "
                                  f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
        if unexpected:
            raise ConversionError(f"the checkpoint has {len(unexpected)} tensor(s) that {where} does not "
                                  f"explain: {', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}")
        for name, shape in expected.items():
            if self.shape(name) != shape:
                raise ConversionError(f"tensor {name} has shape {self.shape(name)}, but {where} implies {shape}")

    def take(self, out_name, name, start=None, stop=None):
        """Output tensor `out_name`: rows start:stop of source tensor `name` (all rows by default)."""
        rows = range(self.shape(name)[0])[start:stop]
        shape = (len(rows),) + self.shape(name)[1:]
        return OutTensor(out_name, shape, self.dtype(name), lambda: self.tensors[name][start:stop])


class _NoObjectsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # every class, function or reducer goes through here
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def decode_trainer_key(key):
    """The trainer's model.safetensors names each tensor by base64(pickle((name,), is_pickled)) (see
    olmo/safetensors_util.py). Decode such names with an unpickler that builds only strs, tuples and bools;
    any other name is returned as it is."""
    try:
        names, is_pickled = _NoObjectsUnpickler(io.BytesIO(base64.urlsafe_b64decode(key))).load()
    except Exception:  # not base64, not a pickle, or not a pair: a plain name
        return key
    if not isinstance(names, tuple) or not all(isinstance(n, str) for n in names) or is_pickled is not False:
        return key
    return ".".join(names)


def trainer_tensors(weights, shapes, prefix, n_layers, group_size, where):
    """The trainer's fused tensors, split into transformers' `shapes`; no q/k permutation is needed since both
    apply RoPE in the rotate-half layout (first half of each head against the second)."""
    # Each trainer tensor -> the transformers tensors stacked in its rows, in order.
    stacked = {prefix + "wte.weight": ["model.embed_tokens.weight"]}
    for i in range(n_layers):
        # block_group_size only wraps blocks for FSDP; it changes the names, not the model.
        block = prefix + (f"blocks.{i}." if group_size == 1 else f"block_groups.{i // group_size}.{i % group_size}.")
        attn, mlp = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        stacked.update({
            # att_proj's rows are q, then k, then v (OLMoSequentialBlock.fused_dims).
            block + "att_proj.weight": [attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"],
            block + "attn_out.weight": [attn + "o_proj.weight"],
            # The trainer's SwiGLU does `x, gate = ff_proj(h).chunk(2)`; silu(gate) * x: up first, gate second.
            block + "ff_proj.weight": [mlp + "up_proj.weight", mlp + "gate_proj.weight"],
            block + "ff_out.weight": [mlp + "down_proj.weight"]})
        # OLMo 2's norm weights. With norm_after, the trainer's attn_norm and ff_norm normalise the sublayers'
        # outputs (not their inputs), which is what transformers calls post_*_layernorm.
        for trainer, ours in [("q_norm", attn + "q_norm"), ("k_norm", attn + "k_norm"),
                              ("attn_norm", f"model.layers.{i}.post_attention_layernorm"),
                              ("ff_norm", f"model.layers.{i}.post_feedforward_layernorm")]:
            if ours + ".weight" in shapes:
                stacked[block + trainer + ".weight"] = [ours + ".weight"]
    if "model.norm.weight" in shapes:
        stacked[prefix + "ln_f.weight"] = ["model.norm.weight"]
    if "lm_head.weight" in shapes:  # untied
        stacked[prefix + "ff_out.weight"] = ["lm_head.weight"]
    weights.check({name: (sum(shapes[p][0] for p in parts), *shapes[parts[0]][1:])
                   for name, parts in stacked.items()}, where)
    tensors = {}
    for name, parts in stacked.items():
        row = 0
        for part in parts:
            tensors[part] = weights.take(part, name, row, row + shapes[part][0])
            row += shapes[part][0]
    return [tensors[name] for name in shapes]


# ---------------------------------------------------------------------------------------------------------
# Writing.


def write_weights(out_dir, tensors, dtype, max_shard_bytes):
    """model.safetensors, or shards of at most max_shard_bytes (a bigger tensor gets one to itself) + index."""
    shards, size = [[]], 0
    for t in tensors:
        nbytes = nbytes_of(t.shape, dtype)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    if len(shards) == 1:
        write_safetensors(out_dir / "model.safetensors", shards[0], dtype, 0, len(tensors))
        return
    weight_map, done = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out_dir / name, shard, dtype, done, len(tensors))
        weight_map.update({t.name: name for t in shard})
        done += len(shard)
    total = sum(nbytes_of(t.shape, dtype) for t in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def nbytes_of(shape, dtype):
    n = dtype.itemsize
    for size in shape:
        n *= size
    return n


def write_safetensors(path, tensors, dtype, done, total):
    """The safetensors format written by hand so that only one tensor is ever in memory: an 8-byte header
    length, a JSON header of names, dtypes, shapes and byte ranges (padded to 8 bytes), then the raw data."""
    st_dtype = {v: k for k, v in SAFETENSORS_DTYPES.items()}[dtype]
    header, offset = {}, 0
    for t in tensors:
        nbytes = nbytes_of(t.shape, dtype)
        header[t.name] = {"dtype": st_dtype, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for i, t in enumerate(tensors, start=done + 1):
            log(f"[{i}/{total}] {t.name} {list(t.shape)} -> {path.name}")
            source = t.read()
            # NaN or infinity in a weight is a corrupt checkpoint (its model generates garbage): refuse it here,
            # where every tensor is read anyway; a finite value the new dtype can't hold is refused alike.
            if not torch.isfinite(source).all():
                raise ConversionError(f"tensor {t.name} holds NaN or infinite values: the checkpoint is corrupt")
            data = source.to(dtype).contiguous()
            if not torch.isfinite(data).all():
                raise ConversionError(f"tensor {t.name} has values beyond {str(dtype).removeprefix('torch.')}'s "
                                      "range; convert to float32 or bfloat16 instead")
            assert tuple(data.shape) == t.shape, (t.name, data.shape, t.shape)
            f.write(data.reshape(-1).view(torch.uint8).numpy().data)


def write_config(out_dir, config, dtype):
    """config.json with the output dtype, under the name the config already uses (transformers 5: "dtype")."""
    keys = [key for key in ("torch_dtype", "dtype") if key in config] or ["torch_dtype"]
    config = {**config, **{key: str(dtype).removeprefix("torch.") for key in keys}}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Options and the command line.


def parse_dtype(dtype):
    if dtype is None or dtype in olmo.DTYPES:
        return olmo.DTYPES.get(dtype)
    raise ConversionError(f"--dtype must be one of {', '.join(olmo.DTYPES)}, got {dtype!r}")


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size):
    """Bytes, from an int or a string like "5GB" (10**9, as in transformers) or "2GiB" (2**30)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
    unit = SIZE_UNITS.get(match.group(2).upper()) if match else None
    if unit is None or float(match.group(1)) * unit < 1:
        raise ConversionError(f"--shard-size must be a size such as 5GB, 500MB or 2GiB, got {size!r}")
    return int(float(match.group(1)) * unit)


def log(message):
    sys.stderr.write(message + "\n")  # one write: a signal can't fall between a line and its newline
    sys.stderr.flush()


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop(signum, frame):
    """Turn a request to stop into an exception, so that convert() removes its staging directory on the way out.
    Later signals are ignored: a second Ctrl-C must not cut that cleanup short."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)


def main(argv=None):
    parser = Parser(description=__doc__.split("\n\n")[0])  # a bad flag: one `error:` line, exit status 2
    parser.add_argument("src", help="checkpoint directory (OLMo trainer, hf_olmo or transformers layout)")
    parser.add_argument("dst", help="new or empty output directory")
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: keep the source's)")
    parser.add_argument("--shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB (default 5GB)")
    args = parser.parse_args(argv)
    # Handlers only while converting (main may run inside another program); an ignored signal stays ignored
    # (under nohup, SIGHUP).
    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        convert(args.src, args.dst, dtype=args.dtype, shard_size=args.shard_size)
    except ConversionError as e:
        log(f"error: {e}")
        sys.exit(2)
    except OSError as e:  # e.g. a full disk: the environment, not the input
        log(f"error: {e}")
        sys.exit(1)
    except Stopped as e:  # the shell's convention for "ended by signal N": 128 + N (SIGINT 130, SIGTERM 143)
        # The stop signals stay ignored from here on: the process is on its way out, and a third quick Ctrl-C
        # must not land, as a KeyboardInterrupt, in the interpreter's own shutdown ("Exception ignored in ...").
        previous = {}
        log(f"error: stopped by {signal.Signals(e.signum).name}; nothing was written")
        sys.exit(128 + e.signum)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    main()
