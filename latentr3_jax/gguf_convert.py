"""GGUF (llama.cpp) files -> Hugging Face model folders, without torch.

`convert_gguf(file, out_dir)` reads a GGUF of the Llama or Qwen2 family and writes what
`hf.load_pretrained` and `data.load_tokenizer` (and transformers) read:

- `config.json` (LlamaForCausalLM / Qwen2ForCausalLM) from the `<arch>.*` metadata;
- `model.safetensors` with the HF tensor names, every tensor dequantised by the `gguf`
  package (F32, F16, BF16, Q4_0 ... Q8_0, the K and IQ families: whatever
  `gguf.quants.dequantize` knows);
- `tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`, rebuilt from the
  `tokenizer.ggml.*` metadata;
- `generation_config.json` (bos/eos/pad ids).

Two things llama.cpp changes on the way in are undone here:

- Its convert script permutes the rows of Llama's `attn_q` / `attn_k` (and their biases)
  so that each head's rotary pairs are interleaved (GPT-J style) instead of split in halves
  (the HF "rotate_half" style). `_unpermute_qk` is the exact inverse: rows
  [head, pair, half] go back to [head, half, pair]. Qwen2 files are not permuted.
- A byte-level BPE vocabulary loses its pre-tokeniser (the regex that splits text before
  the merges apply); `tokenizer.ggml.pre` names it and `_PRE_TOKENIZERS` maps the names to
  the split llama.cpp uses for them.

The folder is written with `utils.atomic.atomic_files`: an interrupted conversion leaves
the previous contents (or nothing) in place. `resolve_model_path` converts a `.gguf` once
into a cache folder and reuses it while the source file is unchanged.

Every problem with the input raises `InputError` with one line naming the file and, where
it applies, the tensor or metadata key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import warnings
from typing import Optional

import gguf
import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from latentr3_jax.errors import InputError, one_line
from latentr3_jax.utils.atomic import atomic_files, atomic_write_text, file_mode

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
MARKER_FILE = "latentr3_gguf_source.json"
# Bumped when the output of a conversion changes, so cached folders are redone.
CONVERTER_VERSION = 1

_DTYPES = ("float32", "float16", "bfloat16")

# GGUF tensor name -> HF tensor name (per layer without the `blk.{i}.` prefix).
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_REQUIRED_LAYER = ("attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                   "attn_output.weight", "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight",
                   "ffn_down.weight")
_ROPE_FREQS = "rope_freqs.weight"
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")

# --------------------------------------------------------------------------- pre-tokenisers

# The split regexes llama.cpp applies before byte-level BPE (llama-vocab.cpp), by name.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"""
                 r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
                r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")

# name -> (kind, regex): 'gpt2' = GPT-2's own split; 'digits' = every digit on its own,
# then GPT-2's split (llama.cpp's STARCODER / SMOLLM group); 'regex' = that one regex.
_PRE_TOKENIZERS = {
    **{name: ("gpt2", None) for name in ("default", "gpt2", "gpt-2", "mpt", "olmo", "phi-2",
                                         "jina-es", "jina-de", "jina-v1-en", "jina-v2-es",
                                         "jina-v2-de", "jais")},
    **{name: ("digits", None) for name in ("smollm", "starcoder", "refact", "command-r",
                                           "codeshell", "exaone", "minerva-7b")},
    **{name: ("regex", _LLAMA3_SPLIT) for name in ("llama3", "llama-v3", "llama-bpe",
                                                   "falcon3", "smaug-bpe", "dbrx",
                                                   "pixtral")},
    **{name: ("regex", _QWEN2_SPLIT) for name in ("qwen2", "deepseek-r1-qwen", "megrez")},
}

# llama.cpp token types (gguf.TokenType)
_TT_CONTROL, _TT_USER_DEFINED = 3, 4


# --------------------------------------------------------------------------- reading


class _TensorProblem(Exception):
    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


class _Reader(gguf.GGUFReader):
    """GGUFReader that names the tensor whose type is unknown or whose data is cut off,
    instead of failing on the whole file."""

    def _build_tensors(self, start_offs, fields):
        size = len(self.data)
        for field in fields:
            try:
                _, name_data, _, dims, raw_dtype, offset_tensor = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                raw = int(raw_dtype[0])
            except (ValueError, TypeError, IndexError):
                break  # an unexpected layout of the private fields: let the reader judge
            try:
                qtype = gguf.GGMLQuantizationType(raw)
            except ValueError:
                raise _TensorProblem(name, f"unknown tensor type {raw}") from None
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n_elems = int(np.prod([int(d) for d in dims], dtype=np.float64))
            if n_elems % block:
                raise _TensorProblem(name, f"{n_elems} elements is not a whole number of "
                                           f"{qtype.name} blocks of {block}")
            end = int(start_offs) + int(offset_tensor[0]) + n_elems // block * type_size
            if end > size:
                raise _TensorProblem(name, f"data ends at byte {end} but the file has only "
                                           f"{size} bytes (truncated file?)")
        super()._build_tensors(start_offs, fields)


def _open(path: str) -> gguf.GGUFReader:
    if not os.path.isfile(path):
        raise InputError(f"{path}: GGUF file not found")
    try:
        return _Reader(path, "r")
    except _TensorProblem as e:
        raise InputError(f"{path}: tensor {e.name}: {one_line(e)}") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or one_line(e)})") from None
    except Exception as e:  # the reader fails with ValueError/IndexError/... on bad bytes
        raise InputError(f"{path}: not a readable GGUF file (truncated or corrupt?): "
                         f"{type(e).__name__}: {one_line(e)}") from None


class _Meta:
    """Typed access to a reader's metadata, errors naming the file and the key."""

    def __init__(self, reader, path: str):
        self.reader, self.path = reader, path

    def get(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise InputError(f"{self.path}: metadata {key}: unreadable value ({one_line(e)})") from None

    def need(self, key: str):
        v = self.get(key)
        if v is None:
            raise InputError(f"{self.path}: metadata {key} is missing")
        return v

    def get_int(self, key: str, default=None, *, required=False):
        v = self.need(key) if required else self.get(key, default)
        if v is None:
            return None
        if isinstance(v, list):  # per-layer values (some converters write arrays)
            if not v or any(x != v[0] for x in v):
                raise InputError(f"{self.path}: metadata {key}: per-layer values {v[:8]} are "
                                 "not supported (all layers must agree)")
            v = v[0]
        try:
            return int(v)
        except (TypeError, ValueError):
            raise InputError(f"{self.path}: metadata {key}: expected an integer, got {v!r}") from None

    def get_float(self, key: str, default=None):
        v = self.get(key, default)
        if v is None:
            return None
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise InputError(f"{self.path}: metadata {key}: expected a number, got {v!r}") from None
        # GGUF stores float32: write its shortest decimal form (1e-05, not 9.99999974e-06)
        short = float(np.format_float_positional(np.float32(v), unique=True, trim="-")) \
            if math.isfinite(v) else v
        return short if np.float32(short) == np.float32(v) else v


def _numpy_shape(t) -> tuple:
    """GGUF lists dimensions innermost first; numpy (and HF) order is the reverse."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def _dequantize(path: str, t) -> np.ndarray:
    """float32 array of a GGUF tensor in numpy/HF order ([out, in] for matrices)."""
    qtype = t.tensor_type
    shape = _numpy_shape(t)
    try:
        if qtype == gguf.GGMLQuantizationType.F32:
            arr = np.asarray(t.data, dtype=np.float32)
        elif qtype == gguf.GGMLQuantizationType.F64:
            arr = np.asarray(t.data, dtype=np.float64).astype(np.float32)
        elif qtype in (gguf.GGMLQuantizationType.I8, gguf.GGMLQuantizationType.I16,
                       gguf.GGMLQuantizationType.I32, gguf.GGMLQuantizationType.I64):
            raise NotImplementedError
        else:
            arr = gguf.quants.dequantize(np.asarray(t.data), qtype)
        return np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)
    except NotImplementedError:
        raise InputError(f"{path}: tensor {t.name}: unsupported quantisation type "
                         f"{qtype.name}") from None
    except InputError:
        raise
    except Exception as e:  # bad block data, a shape that does not fit, ...
        raise InputError(f"{path}: tensor {t.name}: cannot dequantise {qtype.name} data "
                         f"({type(e).__name__}: {one_line(e)})") from None


# --------------------------------------------------------------------------- model


def _unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's permutation of Llama's q/k rows (weights [rows, in] or biases [rows]).

    llama.cpp's convert script maps each head's rows [half, pair] -> [pair, half]
    (reshape(n_head, 2, d/2, ...) then swap the two middle axes); this maps them back.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows cannot be split into {n_head} heads of rotary pairs")
    half = rows // n_head // 2
    return np.ascontiguousarray(
        w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _llama3_inv_freq(dim: int, theta: float, factor: float, low: float, high: float,
                     old_ctx: float) -> np.ndarray:
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_ctx / low, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return np.where(is_mid, mid, scaled)


def _rope_from_freqs(path, freqs: np.ndarray, head_dim: int, theta: float, meta: _Meta,
                     arch: str) -> dict:
    """llama3 rope scaling whose per-frequency factors equal the file's `rope_freqs`.

    llama.cpp stores Llama 3.1+ rope scaling only as that tensor (inv_freq / factor); the
    llama3 parameters are found by trying the published ones."""
    freqs = np.asarray(freqs, np.float64).reshape(-1)
    if freqs.shape[0] != head_dim // 2:
        raise InputError(f"{path}: tensor {_ROPE_FREQS}: has {freqs.shape[0]} values, expected "
                         f"{head_dim // 2} (head_dim / 2)")
    base = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    target = base / freqs
    given = meta.get_float(f"{arch}.rope.scaling.factor")
    old_ctx = meta.get_int(f"{arch}.rope.scaling.original_context_length") or 8192
    factors = ([given] if given else []) + [8.0, 32.0, 16.0, 4.0, 2.0]
    for factor in factors:
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
            got = _llama3_inv_freq(head_dim, theta, factor, low, high, old_ctx)
            if np.allclose(got, target, rtol=1e-4, atol=0):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": old_ctx}
    raise InputError(f"{path}: tensor {_ROPE_FREQS}: per-frequency rope factors that match no "
                     "llama3 rope scaling are not supported")


def _read_config(path: str, meta: _Meta, arch: str, tensors: dict) -> dict:
    """HF config.json dict from the `<arch>.*` metadata and the tensors present."""
    def key(k):
        return f"{arch}.{k}"

    layers = meta.get_int(key("block_count"), required=True)
    hidden = meta.get_int(key("embedding_length"), required=True)
    ffn = meta.get_int(key("feed_forward_length"), required=True)
    heads = meta.get_int(key("attention.head_count"), required=True)
    kv_heads = meta.get_int(key("attention.head_count_kv"), heads)
    if min(layers, hidden, ffn, heads, kv_heads) <= 0:
        raise InputError(f"{path}: metadata {arch}.*: sizes must be positive (block_count "
                         f"{layers}, embedding_length {hidden}, feed_forward_length {ffn}, "
                         f"head_count {heads}, head_count_kv {kv_heads})")
    if heads % kv_heads:
        raise InputError(f"{path}: metadata {key('attention.head_count')}: {heads} heads is not "
                         f"a multiple of {kv_heads} key/value heads")
    head_dim = meta.get_int(key("attention.key_length"))
    if head_dim is None:
        if hidden % heads:
            raise InputError(f"{path}: metadata {key('embedding_length')}: {hidden} is not "
                             f"divisible by {heads} heads (and no attention.key_length)")
        head_dim = hidden // heads
    value_dim = meta.get_int(key("attention.value_length"), head_dim)
    if value_dim != head_dim:
        raise InputError(f"{path}: metadata {key('attention.value_length')}: {value_dim} != "
                         f"key_length {head_dim} is not supported")
    rope_dim = meta.get_int(key("rope.dimension_count"), head_dim)
    if rope_dim != head_dim:
        raise InputError(f"{path}: metadata {key('rope.dimension_count')}: partial rotary "
                         f"embeddings ({rope_dim} of {head_dim} dims) are not supported")
    theta = meta.get_float(key("rope.freq_base"), 1000000.0 if arch == "qwen2" else 10000.0)
    eps = meta.get_float(key("attention.layer_norm_rms_epsilon"), 1e-6 if arch == "qwen2" else 1e-5)
    ctx = meta.get_int(key("context_length"), 32768 if arch == "qwen2" else 2048)

    scaling = None
    kind = meta.get(key("rope.scaling.type"))
    factor = meta.get_float(key("rope.scaling.factor")) or meta.get_float(key("rope.scale_linear"))
    if kind in (None, "none") and meta.get(key("rope.scale_linear")) is not None:
        kind = "linear"
    if _ROPE_FREQS in tensors:
        scaling = _rope_from_freqs(path, _dequantize(path, tensors[_ROPE_FREQS]), head_dim,
                                   theta, meta, arch)
    elif kind == "linear":
        if factor and factor != 1.0:
            scaling = {"rope_type": "linear", "factor": float(factor)}
    elif kind not in (None, "none"):
        raise InputError(f"{path}: metadata {key('rope.scaling.type')}: rope scaling {kind!r} is "
                         "not supported (none, linear, llama3)")

    emb = tensors.get("token_embd.weight")
    vocab = _numpy_shape(emb)[0] if emb is not None and len(emb.shape) == 2 else None
    if vocab is None:
        vocab = meta.get_int(key("vocab_size"))
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens else None
    if vocab is None:
        raise InputError(f"{path}: tensor token_embd.weight: missing (required for a {arch} model)")

    attn_bias = arch == "qwen2" or "blk.0.attn_q.bias" in tensors
    cfg = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": ffn,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": ctx,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "rope_scaling": dict(scaling) if scaling else None,
        "rope_parameters": {"rope_theta": theta, **(scaling or {"rope_type": "default"})},
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": meta.get_int("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get_int("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get_int("tokenizer.ggml.padding_token_id"),
        "attention_bias": attn_bias,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    if arch == "qwen2":
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=layers,
                   layer_types=["full_attention"] * layers)
    else:
        cfg.update(mlp_bias=False, pretraining_tp=1)
    return cfg


def _expected_shapes(cfg: dict) -> dict:
    """GGUF tensor name -> numpy shape, for every tensor the model may hold."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = {
        "attn_norm.weight": (d,), "ffn_norm.weight": (d,),
        "attn_q.weight": (q, d), "attn_k.weight": (kv, d), "attn_v.weight": (kv, d),
        "attn_output.weight": (d, q),
        "attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,), "attn_output.bias": (d,),
        "ffn_gate.weight": (f, d), "ffn_up.weight": (f, d), "ffn_down.weight": (d, f),
    }
    out = {"token_embd.weight": (v, d), "output_norm.weight": (d,), "output.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        for k, shape in per_layer.items():
            out[f"blk.{i}.{k}"] = shape
    return out


def _hf_name(gguf_name: str) -> Optional[str]:
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_TENSORS:
        return f"model.layers.{m.group(1)}.{_LAYER_TENSORS[m.group(2)]}"
    return None


def _check_tensors(path: str, arch: str, cfg: dict, tensors: dict) -> None:
    expected = _expected_shapes(cfg)
    required = ["token_embd.weight", "output_norm.weight"]
    for i in range(cfg["num_hidden_layers"]):
        required += [f"blk.{i}.{k}" for k in _REQUIRED_LAYER]
        if arch == "qwen2":
            required += [f"blk.{i}.attn_{p}.bias" for p in "qkv"]
        elif cfg["attention_bias"]:
            required += [f"blk.{i}.attn_{p}.bias" for p in "qkv"]
    for name in required:
        if name not in tensors:
            raise InputError(f"{path}: tensor {name}: missing (required for a {arch} model "
                             f"with {cfg['num_hidden_layers']} layers)")
    for name, t in tensors.items():
        if name == _ROPE_FREQS:
            continue
        if name not in expected:
            raise InputError(f"{path}: tensor {name}: unexpected for a {arch} model with "
                             f"{cfg['num_hidden_layers']} layers (not supported)")
        got = _numpy_shape(t)
        if got != expected[name]:
            raise InputError(f"{path}: tensor {name}: shape {list(got)} does not match the "
                             f"metadata (expected {list(expected[name])})")


def _read_tensors(path: str, arch: str, cfg: dict, tensors: dict) -> dict:
    """HF tensor name -> float32 array."""
    out = {}
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for name, t in tensors.items():
        if name == _ROPE_FREQS:
            continue
        arr = _dequantize(path, t)
        if arch == "llama":
            m = _LAYER_RE.fullmatch(name)
            part = m.group(2) if m else ""
            if part.startswith(("attn_q.", "attn_k.")):
                arr = _unpermute_qk(arr, heads if part.startswith("attn_q.") else kv_heads)
        out[_hf_name(name)] = arr
    if arch == "llama" and cfg["attention_bias"]:
        # HF Llama's attention_bias gives o_proj a bias too; llama.cpp drops an all-zero one.
        for i in range(cfg["num_hidden_layers"]):
            out.setdefault(f"model.layers.{i}.self_attn.o_proj.bias",
                           np.zeros(cfg["hidden_size"], np.float32))
    return out


# --------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_level_backend(path: str, meta: _Meta, tokens: list, types: list):

    spell = _bytes_to_unicode()
    alphabet = set(spell.values())
    vocab = {}
    spelled = []
    for i, tok in enumerate(tokens):
        # Byte-level vocabularies spell every byte with the printable alphabet; a token
        # written with raw characters (seen in some files) is respelled the same way.
        s = tok if set(tok) <= alphabet else "".join(spell[b] for b in tok.encode("utf-8"))
        spelled.append(s)
        vocab.setdefault(s, i)
    merges_raw = meta.get("tokenizer.ggml.merges") or []
    merges = []
    for j, m in enumerate(merges_raw):
        parts = m.split(" ")
        if len(parts) != 2:
            raise InputError(f"{path}: metadata tokenizer.ggml.merges[{j}]: {m!r} is not two "
                             "tokens separated by one space")
        merges.append((parts[0], parts[1]))
    try:
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None,
                                       continuing_subword_prefix="", end_of_word_suffix="",
                                       fuse_unk=False, ignore_merges=False))
    except Exception as e:
        raise InputError(f"{path}: metadata tokenizer.ggml.merges: cannot build the BPE "
                         f"({one_line(e)})") from None

    pre = meta.get("tokenizer.ggml.pre")
    kind, regex = _PRE_TOKENIZERS.get(pre, (None, None))
    if kind is None:
        warnings.warn(f"{path}: tokenizer.ggml.pre={pre!r} is not known here; using GPT-2's "
                      "split (token ids may differ from llama.cpp's)", stacklevel=3)
        kind = "gpt2"
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                          use_regex=kind != "regex")
    if kind == "gpt2":
        backend.pre_tokenizer = byte_level
    elif kind == "digits":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(regex), behavior="isolated"), byte_level])
    backend.decoder = decoders.ByteLevel()
    return backend, spelled, alphabet


def _sentencepiece_backend(path: str, meta: _Meta, tokens: list, types: list):
    """tokenizer.ggml.model 'llama': SentencePiece BPE with byte fallback."""

    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    merges_raw = meta.get("tokenizer.ggml.merges")
    if merges_raw:
        merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if not scores or len(scores) != len(tokens):
            raise InputError(f"{path}: metadata tokenizer.ggml.scores: needed (one per token) to "
                             "rebuild a SentencePiece vocabulary without merges")
        # Merges implied by the vocabulary: every split of a token into two tokens, the
        # merged token's score deciding the order (best first), then the pieces' ids.
        cands = []
        for tok, i in vocab.items():
            if types and types[i] != 1:
                continue
            for k in range(1, len(tok)):
                a, b = tok[:k], tok[k:]
                if a in vocab and b in vocab:
                    cands.append((-float(scores[i]), vocab[a], vocab[b], a, b))
        cands.sort()
        merges = [(a, b) for _, _, _, a, b in cands]
    unk_id = meta.get_int("tokenizer.ggml.unknown_token_id", 0)
    unk = tokens[unk_id] if 0 <= unk_id < len(tokens) else None
    try:
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                       byte_fallback=True, dropout=None))
    except Exception as e:
        raise InputError(f"{path}: metadata tokenizer.ggml.tokens: cannot build the BPE "
                         f"({one_line(e)})") from None
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if add_prefix else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend, list(tokens), None


def _build_tokenizer(path: str, meta: _Meta, context_length: int) -> Optional[dict]:
    """{file name: text} of the tokenizer files, or None when the file has no tokenizer."""

    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None and tokens is None:
        return None
    if not tokens:
        raise InputError(f"{path}: metadata tokenizer.ggml.tokens is missing or empty")
    types = meta.get("tokenizer.ggml.token_type") or []
    if types and len(types) != len(tokens):
        raise InputError(f"{path}: metadata tokenizer.ggml.token_type: {len(types)} types for "
                         f"{len(tokens)} tokens")
    if model == "gpt2":
        backend, spelled, alphabet = _byte_level_backend(path, meta, tokens, types)
    elif model == "llama":
        backend, spelled, alphabet = _sentencepiece_backend(path, meta, tokens, types)
    else:
        raise InputError(f"{path}: metadata tokenizer.ggml.model: tokenizer {model!r} is not "
                         "supported (gpt2 = byte-level BPE, llama = SentencePiece BPE)")

    def tok(key):
        i = meta.get_int(f"tokenizer.ggml.{key}")
        if i is None:
            return None
        if not 0 <= i < len(tokens):
            raise InputError(f"{path}: metadata tokenizer.ggml.{key}: id {i} is outside the "
                             f"vocabulary of {len(tokens)}")
        return spelled[i]

    special = {"bos_token": tok("bos_token_id"), "eos_token": tok("eos_token_id"),
               "unk_token": tok("unknown_token_id"), "pad_token": tok("padding_token_id")}
    # Control tokens (<|endoftext|>, <|im_start|>, ...) and the named special tokens stay
    # whole and are skipped by decode(skip_special_tokens); user-defined ones stay whole.
    # In a byte-level vocabulary a "control" token spelled outside the byte alphabet is a
    # mislabel of llama.cpp's and stays an ordinary token.
    control, user = [], []
    for i, t in enumerate(tokens):
        kind = types[i] if types else 1
        if kind == _TT_CONTROL and (alphabet is None or set(t) <= alphabet):
            control.append(spelled[i])
        elif kind == _TT_USER_DEFINED:
            user.append(spelled[i])
    named = [t for t in special.values() if t is not None]
    specials = list(dict.fromkeys(control + named))
    if specials:
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if user:
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    bos = special["bos_token"] if add_bos else None
    eos = special["eos_token"] if add_eos else None
    if bos or eos:
        head, tail = [bos] if bos else [], [eos] if eos else []
        backend.post_processor = processors.TemplateProcessing(
            single=head + ["$A"] + tail,
            pair=head + ["$A"] + tail + [f"{t}:1" for t in head] + ["$B:1"] + [f"{t}:1" for t in tail],
            special_tokens=[(t, backend.token_to_id(t)) for t in dict.fromkeys(head + tail)])

    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **special,
           "add_bos_token": add_bos, "add_eos_token": add_eos,
           "clean_up_tokenization_spaces": False, "model_max_length": int(context_length)}
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        cfg["chat_template"] = template
    specials_map = {k: v for k, v in special.items() if v is not None}
    return {
        "tokenizer.json": backend.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(specials_map, indent=2, ensure_ascii=False) + "\n",
    }


# --------------------------------------------------------------------------- convert


def _cast(arrays: dict, dtype: str) -> dict:
    if dtype == "float32":
        return arrays
    if dtype == "float16":
        return {k: v.astype(np.float16) for k, v in arrays.items()}
    import ml_dtypes  # comes with jax
    return {k: v.astype(ml_dtypes.bfloat16) for k, v in arrays.items()}


def _open_model(path: str) -> tuple:
    """(metadata, architecture, {name: tensor info}, HF config dict) of a GGUF file, its
    tensors checked against the config; no weights are read."""
    reader = _open(path)
    meta = _Meta(reader, path)
    arch = meta.get("general.architecture")
    if arch is None:
        raise InputError(f"{path}: metadata general.architecture is missing")
    if arch not in ARCHITECTURES:
        raise InputError(f"{path}: metadata general.architecture: {arch!r} is not supported "
                         f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    tensors = {t.name: t for t in reader.tensors}
    cfg = _read_config(path, meta, arch, tensors)
    _check_tensors(path, arch, cfg, tensors)
    return meta, arch, tensors, cfg


def read_gguf_config(gguf_path: str) -> dict:
    """The HF config dict of a GGUF file from its metadata and tensor table alone (no
    dequantising, no conversion): for sizing a model before loading it."""
    return _open_model(os.fspath(gguf_path))[3]


def read_gguf(gguf_path: str) -> tuple:
    """(HF config dict, {HF tensor name: float32 array}, {tokenizer file: text} or None)."""
    path = os.fspath(gguf_path)
    meta, arch, tensors, cfg = _open_model(path)
    tok_files = _build_tokenizer(path, meta, cfg["max_position_embeddings"])
    arrays = _read_tensors(path, arch, cfg, tensors)
    return cfg, arrays, tok_files


def convert_gguf(gguf_path: str, out_dir: str, *, dtype: str = "float32") -> str:
    """Write the Hugging Face folder of a Llama / Qwen2 GGUF file to `out_dir`; returns it.

    dtype: 'float32' (default), 'float16' or 'bfloat16' for model.safetensors (the GGUF is
    always dequantised to float32 first). Existing files of the same names in `out_dir`
    are replaced together; an interrupted conversion changes nothing.
    """


    if dtype not in _DTYPES:
        raise InputError(f"dtype={dtype!r}: expected one of {', '.join(_DTYPES)}")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise InputError(f"{out_dir}: exists and is not a directory")
    cfg, arrays, tok_files = read_gguf(gguf_path)
    arrays = _cast(arrays, dtype)
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
           if cfg[k] is not None}

    created = not os.path.exists(out_dir)
    try:
        with atomic_files(out_dir) as fs:
            save_file(arrays, fs.temp_path("model.safetensors"),
                      metadata={"format": "pt", "source": os.path.basename(os.fspath(gguf_path))})
            fs.write_text("config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            fs.write_text("generation_config.json", json.dumps(gen, indent=2, sort_keys=True) + "\n")
            for name, text in (tok_files or {}).items():
                fs.write_text(name, text)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)  # only if empty: nothing half-written stays behind
        raise
    mode = file_mode()  # temp files are created 0600; give them the usual mode
    for name in ["model.safetensors", "config.json", "generation_config.json", *(tok_files or {})]:
        with contextlib.suppress(OSError):
            os.chmod(os.path.join(out_dir, name), mode)
    # Files of an earlier checkpoint in the folder that loaders would prefer to ours.
    for name in ("model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json", "latent.safetensors"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, name))
    return out_dir


# --------------------------------------------------------------------------- cache


def _source_stamp(path: str) -> dict:
    st = os.stat(path)
    return {"source": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "converter_version": CONVERTER_VERSION}


def _is_complete(folder: str, stamp: dict) -> bool:
    try:
        with open(os.path.join(folder, MARKER_FILE), encoding="utf-8") as f:
            got = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(got, dict):
        return False
    same = all(got.get(k) == stamp[k] for k in ("size", "mtime_ns", "converter_version"))
    return same and all(os.path.isfile(os.path.join(folder, n))
                        for n in ("config.json", "model.safetensors"))


def _writable(folder: str) -> bool:
    """Whether `folder` exists and is writable, or could be created."""
    probe = folder
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return False
        probe = parent
    return os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK)


def default_cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "latentr3_jax", "gguf")


def resolve_model_path(path: str, cache_dir: Optional[str] = None) -> str:
    """A Hugging Face folder for `path`: `path` itself unless it names a `.gguf` file, which
    is converted once (float32) and the folder returned.

    The folder is `<path>.hf/` beside the file when that is writable, else
    `~/.cache/latentr3_jax/gguf/<key>/` ($XDG_CACHE_HOME respected); with `cache_dir`,
    `<cache_dir>/<key>/`. `<key>` hashes the file's absolute path, size and mtime. A folder
    whose marker file (`latentr3_gguf_source.json`, written last) records the same size
    and mtime is reused as it is.
    """
    p = os.fspath(path)
    if not p.lower().endswith(".gguf"):
        return p
    if not os.path.isfile(p):
        raise InputError(f"{p}: GGUF file not found")
    stamp = _source_stamp(p)
    key = hashlib.sha256(json.dumps([stamp["source"], stamp["size"], stamp["mtime_ns"]])
                         .encode("utf-8")).hexdigest()[:24]
    if cache_dir is not None:
        candidates = [os.path.join(os.fspath(cache_dir), key)]
    else:
        candidates = [stamp["source"] + ".hf", os.path.join(default_cache_root(), key)]
    for folder in candidates:
        if _is_complete(folder, stamp):
            return folder
    for folder in candidates:
        if not _writable(folder):
            continue
        marker = os.path.join(folder, MARKER_FILE)
        with contextlib.suppress(FileNotFoundError):
            os.remove(marker)  # stale: the folder is incomplete until the new one is written
        convert_gguf(p, folder)
        atomic_write_text(marker, json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        return folder
    raise InputError(f"{p}: no writable place to convert it to ({', '.join(candidates)})")
