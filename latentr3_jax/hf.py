"""Hugging Face checkpoints in and out (Qwen2 and Llama causal LMs).

The weight mapping is a table (`WEIGHT_TABLE`): each row names an HF tensor (with `{i}` for
the layer index), our path in the params tree, and one of four layouts saying how the HF
array becomes ours. Layer weights are stacked on a leading axis. Reading safetensors needs
no torch; bfloat16 and float16 checkpoints are cast to the requested dtype on the host.

`load_pretrained` returns host (numpy) arrays so the caller can place each one straight
onto its target sharding.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Iterable, Optional

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from latentr3_jax.errors import InputError, one_line, where
from latentr3_jax.gguf_convert import resolve_model_path
from latentr3_jax.model.config import ARCHITECTURES, DecoderConfig
from latentr3_jax.model.decoder import param_shapes
from latentr3_jax.utils.atomic import atomic_files

HF_ARCHITECTURES = {arch: model_type for model_type, arch in ARCHITECTURES.items()}

# Layouts (HF stores nn.Linear weights as [out, in]):
#   copy       same array
#   dense_out  HF [out, in]   -> ours [in, *out]   (q/k/v, gate/up/down, lm_head)
#   dense_in   HF [out, in]   -> ours [*in, out]   (o_proj: heads x head_dim are the input)
#   bias       HF [out]       -> ours [*out]
WEIGHT_TABLE = (
    ("model.embed_tokens.weight", ("embed", "embedding"), "copy"),
    ("model.layers.{i}.input_layernorm.weight", ("layers", "input_norm", "scale"), "copy"),
    ("model.layers.{i}.self_attn.q_proj.weight", ("layers", "attn", "q", "kernel"), "dense_out"),
    ("model.layers.{i}.self_attn.q_proj.bias", ("layers", "attn", "q", "bias"), "bias"),
    ("model.layers.{i}.self_attn.k_proj.weight", ("layers", "attn", "k", "kernel"), "dense_out"),
    ("model.layers.{i}.self_attn.k_proj.bias", ("layers", "attn", "k", "bias"), "bias"),
    ("model.layers.{i}.self_attn.v_proj.weight", ("layers", "attn", "v", "kernel"), "dense_out"),
    ("model.layers.{i}.self_attn.v_proj.bias", ("layers", "attn", "v", "bias"), "bias"),
    ("model.layers.{i}.self_attn.o_proj.weight", ("layers", "attn", "o", "kernel"), "dense_in"),
    ("model.layers.{i}.post_attention_layernorm.weight", ("layers", "post_attn_norm", "scale"), "copy"),
    ("model.layers.{i}.mlp.gate_proj.weight", ("layers", "mlp", "gate", "kernel"), "dense_out"),
    ("model.layers.{i}.mlp.up_proj.weight", ("layers", "mlp", "up", "kernel"), "dense_out"),
    ("model.layers.{i}.mlp.down_proj.weight", ("layers", "mlp", "down", "kernel"), "dense_out"),
    ("model.norm.weight", ("final_norm", "scale"), "copy"),
    ("lm_head.weight", ("lm_head", "kernel"), "dense_out"),
)

# Tensors some checkpoints carry that hold nothing we need.
_IGNORED = (
    re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"),
)
# Llama's `attention_bias` also gives o_proj a bias, which our decoder does not have: it is
# accepted only when it is all zeros (and written as zeros on export).
_O_BIAS = "model.layers.{i}.self_attn.o_proj.bias"

LATENT_FILE = "latent.safetensors"
_SUPPORTED_ROPE = ("default", "linear", "llama3")


# --------------------------------------------------------------------------- layouts


def _hf_shape(layout: str, shape: tuple) -> tuple:
    """HF tensor shape for our (per-layer) shape."""
    if layout == "copy":
        return tuple(shape)
    if layout == "dense_out":
        return (math.prod(shape[1:]), shape[0])
    if layout == "dense_in":
        return (shape[-1], math.prod(shape[:-1]))
    if layout == "bias":
        return (math.prod(shape),)
    raise ValueError(f"unknown layout {layout!r}")


def _from_hf(layout: str, x: np.ndarray, shape: tuple) -> np.ndarray:
    if layout in ("dense_out", "dense_in"):
        x = x.T
    return x.reshape(shape)


def _to_hf(layout: str, x: np.ndarray) -> np.ndarray:
    shape = x.shape
    if layout == "dense_out":
        return np.ascontiguousarray(x.reshape(shape[0], -1).T)
    if layout == "dense_in":
        return np.ascontiguousarray(x.reshape(-1, shape[-1]).T)
    if layout == "bias":
        return np.ascontiguousarray(x.reshape(-1))
    return np.ascontiguousarray(x)


def _get(tree: dict, path: tuple):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _has(tree: dict, path: tuple) -> bool:
    try:
        _get(tree, path)
        return True
    except (KeyError, TypeError):
        return False


def expected_tensors(config: DecoderConfig) -> dict:
    """HF tensor name -> (our path, layer index or None, layout, our per-layer shape)."""
    shapes = param_shapes(config)
    out = {}
    for template, path, layout in WEIGHT_TABLE:
        if not _has(shapes, path):
            continue
        shape = _get(shapes, path)
        if "{i}" in template:
            for i in range(config.num_layers):
                out[template.format(i=i)] = (path, i, layout, tuple(shape[1:]))
        else:
            out[template] = (path, None, layout, tuple(shape))
    return out


# --------------------------------------------------------------------------- config


def _rope_from_hf(hf: dict, source: str) -> tuple:
    """(rope_theta, rope_scaling dict or None) from either transformers 4 or 5 config keys."""
    params = hf.get("rope_parameters") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        # Per-layer-type rope (transformers 5 nested form); only one kind of layer is supported.
        kinds = [k for k, v in params.items() if v is not None]
        if kinds != ["full_attention"]:
            raise InputError(f"{where(source, field='rope_parameters')}: per-layer rope for {kinds} "
                             "is not supported (only full_attention)")
        params = params["full_attention"]
    legacy = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", legacy.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = dict(legacy or params)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if float(scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) or 1.0) != 1.0:
        raise InputError(f"{where(source, field='partial_rotary_factor')}: partial rotary "
                         "embeddings are not supported")
    if kind not in _SUPPORTED_ROPE:
        raise InputError(f"{where(source, field='rope_type')}: rope type {kind!r} is not supported "
                         f"(supported: {', '.join(_SUPPORTED_ROPE)})")
    if kind == "default":
        return float(theta), None
    try:
        out = {"rope_type": kind, "factor": float(scaling["factor"])}
        if kind == "llama3":
            out["low_freq_factor"] = float(scaling.get("low_freq_factor", 1.0))
            out["high_freq_factor"] = float(scaling.get("high_freq_factor", 4.0))
            out["original_max_position_embeddings"] = int(scaling.get(
                "original_max_position_embeddings", hf.get("max_position_embeddings")))
    except (KeyError, TypeError) as e:
        raise InputError(f"{where(source, field='rope_parameters')}: {kind} rope scaling is "
                         f"missing {e}") from None
    return float(theta), out


def _first_id(v):
    if isinstance(v, (list, tuple)):
        return int(v[0]) if v else None
    return None if v is None else int(v)


def config_from_hf(hf: dict, source: str = "config.json") -> DecoderConfig:
    """DecoderConfig from the dict of an HF `config.json`; unsupported features are errors."""
    try:
        return _config_from_hf(hf, source)
    except InputError:
        raise
    except (TypeError, ValueError, ArithmeticError, AttributeError, KeyError) as e:
        raise InputError(f"{source}: bad value ({type(e).__name__}: {one_line(e)})") from None


def _config_from_hf(hf: dict, source: str) -> DecoderConfig:
    archs = hf.get("architectures") or []
    model_type = None
    for arch in archs:
        if arch in HF_ARCHITECTURES:
            model_type = HF_ARCHITECTURES[arch]
            break
    else:
        if archs:
            raise InputError(f"{where(source, field='architectures')}: unsupported architecture "
                             f"{archs[0]!r}; supported: {', '.join(sorted(HF_ARCHITECTURES))}")
        model_type = hf.get("model_type")
        if model_type not in ARCHITECTURES:
            raise InputError(f"{where(source, field='model_type')}: unsupported model type "
                             f"{model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}")

    def need(key):
        if hf.get(key) is None:
            raise InputError(f"{where(source, field=key)}: missing")
        return hf[key]

    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise InputError(f"{where(source, field='hidden_act')}: {act!r} is not supported (silu only)")
    if hf.get("mlp_bias"):
        raise InputError(f"{where(source, field='mlp_bias')}: MLP biases are not supported")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise InputError(f"{where(source, field='use_sliding_window')}: sliding-window attention "
                         "is not supported")
    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    theta, scaling = _rope_from_hf(hf, source)
    try:
        return DecoderConfig(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            # Qwen2's q/k/v projections always have biases; Llama's follow `attention_bias`.
            attention_bias=True if model_type == "qwen2" else bool(hf.get("attention_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            model_type=model_type,
            max_position_embeddings=int(hf.get("max_position_embeddings") or 32768),
            bos_token_id=_first_id(hf.get("bos_token_id")),
            eos_token_id=_first_id(hf.get("eos_token_id")),
            pad_token_id=_first_id(hf.get("pad_token_id")),
        )
    except ValueError as e:
        raise InputError(f"{source}: {e}") from None


def config_to_hf(config: DecoderConfig) -> dict:
    """HF `config.json` dict; rope written both the transformers 5 way and the older way."""
    c = config
    scaling = c.rope_scaling_dict
    rope_parameters = {"rope_type": "default", "rope_theta": c.rope_theta}
    if scaling:
        rope_parameters.update(scaling)
        rope_parameters["rope_type"] = scaling.get("rope_type", scaling.get("type"))
        rope_parameters.pop("type", None)
    legacy_scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"} if scaling else None
    out = {
        "architectures": [ARCHITECTURES[c.model_type]],
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": legacy_scaling,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    if c.model_type == "qwen2":
        out.update(use_sliding_window=False, sliding_window=None,
                   max_window_layers=c.num_layers,
                   layer_types=["full_attention"] * c.num_layers)
    else:
        out.update(attention_bias=c.attention_bias, mlp_bias=False, pretraining_tp=1)
    return out


# --------------------------------------------------------------------------- reading tensors


class _SafetensorsReader:
    """Lazy access to the tensors of one .safetensors file, without torch."""

    def __init__(self, path: str):
        self.path = path
        try:
            self._f = safe_open(path, framework="numpy")
        except Exception as e:  # corrupt header, not a safetensors file, ...
            raise InputError(f"{path}: cannot read safetensors file: {one_line(e)}") from None
        self._jax = None

    def keys(self) -> list:
        return list(self._f.keys())

    def shape(self, name: str) -> tuple:
        return tuple(self._f.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        try:
            try:
                return self._f.get_tensor(name)
            except (TypeError, ValueError):
                # Older safetensors cannot make numpy bfloat16 arrays; go through jax instead.
                if self._jax is None:
                    self._jax = safe_open(self.path, framework="flax")
                return np.asarray(self._jax.get_tensor(name).astype("float32"))
        except Exception as e:  # truncated or damaged data
            raise InputError(f"{self.path}: cannot read tensor {name!r}: {one_line(e)}") from None


class _TorchReader:
    """A pytorch_model.bin file (needs torch)."""

    def __init__(self, path: str):
        try:
            import torch   # optional: only pytorch_model.bin checkpoints need it
        except ImportError:
            raise InputError(f"{path}: reading pytorch_model.bin needs torch, which is not "
                             "installed; convert the checkpoint to safetensors or install torch") from None
        self.path = path
        try:
            self._state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, not a torch file, unsafe pickle, ...
            raise InputError(f"{path}: cannot read pytorch_model.bin: {one_line(e)}") from None

    def keys(self) -> list:
        return list(self._state)

    def shape(self, name: str) -> tuple:
        return tuple(self._state[name].shape)

    def get(self, name: str) -> np.ndarray:
        t = self._state[name]
        if not t.dtype.is_floating_point:
            return t.numpy()
        return t.float().numpy()


def _weight_files(path: str) -> tuple:
    """(name -> file map, index-or-file used in messages, reader class)."""
    for index_name, reader in (("model.safetensors.index.json", _SafetensorsReader),
                               ("pytorch_model.bin.index.json", _TorchReader)):
        index_path = os.path.join(path, index_name)
        if os.path.exists(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                        isinstance(v, str) for v in weight_map.values()):
                    raise ValueError("expected an object of tensor name -> file name")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise InputError(f"{where(index_path, field='weight_map')}: cannot read: {e}") from None
            files = {k: os.path.join(path, v) for k, v in weight_map.items()}
            for fname in sorted(set(files.values())):
                if not os.path.exists(fname):
                    raise InputError(f"{index_path}: shard {os.path.basename(fname)} is missing")
            return files, index_path, reader
    for fname, reader in (("model.safetensors", _SafetensorsReader),
                          ("pytorch_model.bin", _TorchReader)):
        fpath = os.path.join(path, fname)
        if os.path.exists(fpath):
            return {k: fpath for k in reader(fpath).keys()}, fpath, reader
    raise InputError(f"{path}: no model.safetensors, model.safetensors.index.json or "
                     "pytorch_model.bin found")


# --------------------------------------------------------------------------- load


def read_hf_config(path: str) -> DecoderConfig:
    """The DecoderConfig of a Hugging Face checkpoint directory (or a .gguf file, converted
    once into a folder beside it: gguf_convert.resolve_model_path)."""
    path = resolve_model_path(os.fspath(path))
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise InputError(f"{path}: not a directory")
    if not os.path.exists(cfg_path):
        raise InputError(f"{cfg_path}: missing (not a Hugging Face checkpoint directory)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            hf = json.load(f)
    except ValueError as e:
        raise InputError(f"{cfg_path}: not valid JSON: {e}") from None
    if not isinstance(hf, dict):
        raise InputError(f"{cfg_path}: expected a JSON object, found {type(hf).__name__}")
    if "text_config" in hf and "hidden_size" not in hf:
        raise InputError(f"{where(cfg_path, field='text_config')}: multimodal checkpoints are not supported")
    return config_from_hf(hf, cfg_path)


def load_pretrained(path: str, dtype=np.float32) -> tuple:
    """(DecoderConfig, params) from a local HF checkpoint directory (or a .gguf file).

    Params are numpy arrays of `dtype`, layers stacked on axis 0. A `latent.safetensors`
    written by `save_pretrained` comes back as `params['latent']`.
    """
    path = resolve_model_path(os.fspath(path))
    config = read_hf_config(path)
    files, source, reader_cls = _weight_files(path)
    expected = expected_tensors(config)

    o_bias = set()
    if config.model_type == "llama" and config.attention_bias:
        o_bias = {_O_BIAS.format(i=i) for i in range(config.num_layers)}
    for name in sorted(files):
        if name in expected or name in o_bias or any(p.fullmatch(name) for p in _IGNORED):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # tied checkpoints sometimes store the (identical) head anyway
        raise InputError(f"{files[name]}: unexpected tensor {name!r} for a {config.model_type} "
                         f"model with this config.json")
    for name in list(expected) + sorted(o_bias):
        if name not in files:
            raise InputError(f"{source}: missing tensor {name!r}")

    readers: dict = {}

    def read(name, want_shape, check_only=False):
        fname = files[name]
        if fname not in readers:
            readers[fname] = reader_cls(fname)
        r = readers[fname]
        got = r.shape(name)
        if got != tuple(want_shape):
            raise InputError(f"{fname}: tensor {name!r} has shape {list(got)}, expected "
                             f"{list(want_shape)} from config.json")
        return None if check_only else r.get(name)

    # every shape first: a config.json that disagrees with the tensors is an error before
    # anything is allocated
    for name, (_, _, layout, shape) in expected.items():
        read(name, _hf_shape(layout, shape), check_only=True)
    shapes = param_shapes(config)
    params: dict = {}
    for leaf_path in _leaf_paths(shapes):
        _set(params, leaf_path, np.empty(_get(shapes, leaf_path), dtype))

    for name, (leaf_path, layer, layout, shape) in expected.items():
        arr = _from_hf(layout, read(name, _hf_shape(layout, shape)), shape)
        target = _get(params, leaf_path)
        if layer is None:
            target[...] = arr
        else:
            target[layer] = arr
    for name in sorted(o_bias):
        b = read(name, (config.hidden_size,))
        if np.any(b != 0):
            raise InputError(f"{files[name]}: tensor {name!r} is non-zero; an o_proj bias is "
                             "not supported")

    latent_path = os.path.join(path, LATENT_FILE)
    if os.path.exists(latent_path):
        r = _SafetensorsReader(latent_path)
        latent: dict = {}
        for name in r.keys():
            _set(latent, tuple(name.split(".")), r.get(name).astype(dtype))
        params["latent"] = latent
    return config, params


def _leaf_paths(tree: dict, prefix: tuple = ()) -> Iterable[tuple]:
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaf_paths(v, prefix + (k,))
        else:
            yield prefix + (k,)


# --------------------------------------------------------------------------- save


def _host(x, dtype=np.float32) -> np.ndarray:
    return np.asarray(x, dtype=dtype)


def hf_state_dict(config: DecoderConfig, params: dict) -> dict:
    """HF tensor name -> float32 numpy array (the inverse of the loading table)."""
    out = {}
    for name, (leaf_path, layer, layout, shape) in expected_tensors(config).items():
        arr = _host(_get(params, leaf_path))
        if layer is not None:
            arr = arr[layer]
        if arr.shape != shape:
            raise ValueError(f"params{''.join(f'[{k!r}]' for k in leaf_path)} has shape "
                             f"{arr.shape}, expected {shape} per layer")
        out[name] = _to_hf(layout, arr)
    d, hd = config.hidden_size, config.head_dim
    for i in range(config.num_layers):
        if config.model_type == "qwen2" and not config.attention_bias:
            # HF Qwen2 always has q/k/v biases: zeros keep the function unchanged.
            for proj, heads in (("q", config.num_heads), ("k", config.num_kv_heads),
                                ("v", config.num_kv_heads)):
                out[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = np.zeros(heads * hd, np.float32)
        if config.model_type == "llama" and config.attention_bias:
            out[_O_BIAS.format(i=i)] = np.zeros(d, np.float32)
    return out


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = np.ascontiguousarray(_host(v))
    return out


def save_pretrained(config: DecoderConfig, params: dict, path: str) -> None:
    """Write `config.json` + `model.safetensors` (float32) that transformers loads.

    `params['latent']`, which transformers has no place for, goes to `latent.safetensors`.
    The files replace an earlier export together: an interrupted export leaves the folder
    as it was.
    """


    path = os.fspath(path)
    tensors = hf_state_dict(config, params)
    gen = {k: v for k, v in (("bos_token_id", config.bos_token_id),
                             ("eos_token_id", config.eos_token_id),
                             ("pad_token_id", config.pad_token_id)) if v is not None}
    with atomic_files(path) as fs:
        save_file(tensors, fs.temp_path("model.safetensors"), metadata={"format": "pt"})
        if params.get("latent"):
            save_file(_flatten(params["latent"]), fs.temp_path(LATENT_FILE))
        fs.write_text("config.json", json.dumps(config_to_hf(config), indent=2, sort_keys=True) + "\n")
        fs.write_text("generation_config.json", json.dumps(gen, indent=2, sort_keys=True) + "\n")
    stale = ["model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"]
    if not params.get("latent"):
        stale.append(LATENT_FILE)
    for name in stale:
        if os.path.exists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))


# --------------------------------------------------------------------------- vocab


def _added_rows(old: np.ndarray, n_new: int, seed: Optional[int]) -> np.ndarray:
    """New rows like transformers' mean resizing: mean of the old rows, plus (when `seed` is
    given) a draw from N(0, 1e-9 * covariance of the old rows)."""
    old64 = old.astype(np.float64)
    mean = old64.mean(axis=0)
    rows = np.repeat(mean[None], n_new, axis=0)
    if seed is not None:
        centered = old64 - mean
        cov = 1e-9 * (centered.T @ centered) / old.shape[0]
        try:
            chol = np.linalg.cholesky(cov)
        except np.linalg.LinAlgError:
            chol = None  # not positive definite: transformers then uses the mean alone
        if chol is not None:
            rows = rows + np.random.default_rng(seed).standard_normal(rows.shape) @ chol.T
    return rows


def resize_vocab(config: DecoderConfig, params: dict, n_new: int,
                 seed: Optional[int] = None) -> tuple:
    """Append `n_new` token rows to the embedding (and the untied lm_head).

    Kept rows are unchanged. New rows follow transformers' `resize_token_embeddings`
    (default `mean_resizing=True`): the mean of the old rows; transformers adds noise from
    N(0, 1e-9 * covariance), about 3e-5 of the rows' spread, which is added here only when
    `seed` is given. Returns (new config, new params); other params are shared, not copied.
    """
    if n_new < 0:
        raise ValueError(f"n_new must be >= 0, got {n_new}")
    if n_new == 0:
        return config, params
    emb = params["embed"]["embedding"]
    xp = np if isinstance(emb, np.ndarray) else jnp
    new = dict(params)
    rows = _added_rows(np.asarray(emb), n_new, seed).astype(emb.dtype)
    new["embed"] = {**params["embed"], "embedding": xp.concatenate([emb, xp.asarray(rows)], axis=0)}
    if not config.tie_word_embeddings:
        head = params["lm_head"]["kernel"]  # [d, V]
        rows = _added_rows(np.asarray(head).T, n_new, None if seed is None else seed + 1)
        cols = xp.asarray(rows.T.astype(head.dtype))
        new["lm_head"] = {**params["lm_head"], "kernel": xp.concatenate([head, cols], axis=1)}
    return config.replace(vocab_size=config.vocab_size + n_new), new


# --------------------------------------------------------------------------- CLI
