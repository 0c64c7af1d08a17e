"""Hugging Face checkpoints in and out: export, sharded / bf16 / .bin loading, vocab resizing,
errors that name the tensor, the Orbax params checkpoint and the `convert` command."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hf_fixtures import left_padded_batch, load_torch, make_hf_model, torch_logits  # noqa: E402
from latentr3_jax import cli, hf  # noqa: E402
from latentr3_jax.errors import InputError  # noqa: E402
from latentr3_jax.model import init_latent_params, init_params, logits, tiny_config  # noqa: E402
from latentr3_jax.model import params_io  # noqa: E402

SHAPE = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, vocab_size=120)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_io")


@pytest.fixture(scope="module")
def qwen_untied(root):
    return make_hf_model(root, "qwen2", tied=False, name="qwen_untied", **SHAPE)


@pytest.fixture(scope="module")
def llama_tied(root):
    return make_hf_model(root, "llama", tied=True, bias=True, name="llama_tied", seed=1, **SHAPE)


def _state(path):
    return {k: v.float().numpy() for k, v in load_torch(path).state_dict().items()}


def _assert_same_logits(path_a, path_b, atol=0.0):
    ids, mask = left_padded_batch(SHAPE["vocab_size"])
    a = torch_logits(load_torch(path_a), ids, mask)
    b = torch_logits(load_torch(path_b), ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(a[real], b[real], atol=atol, rtol=0)


# ----------------------------------------------------------------- export


@pytest.mark.parametrize("which", ["qwen_untied", "llama_tied"])
def test_export_reloads_in_transformers_with_identical_logits(which, request, tmp_path):
    src = request.getfixturevalue(which)
    config, params = hf.load_pretrained(src)
    hf.save_pretrained(config, params, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["architectures"] == [hf.ARCHITECTURES[config.model_type]]
    assert saved["torch_dtype"] == "float32" and saved["tie_word_embeddings"] == config.tie_word_embeddings
    assert saved["rope_parameters"]["rope_theta"] == config.rope_theta == saved["rope_theta"]
    a, b = _state(src), _state(tmp_path / "out")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    _assert_same_logits(src, tmp_path / "out")
    config2, params2 = hf.load_pretrained(tmp_path / "out")
    assert config2 == config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_export_of_our_own_model_with_latent(tmp_path):
    """A model made here (Qwen2 without biases, llama3 rope) exports, transformers agrees,
    and the LatentRATT weights come back from latent.safetensors."""
    config = tiny_config(vocab_size=96, hidden_size=32, intermediate_size=48, num_heads=4,
                         num_kv_heads=1, attention_bias=False, tie_word_embeddings=False,
                         rope_theta=3000.0, eos_token_id=5, pad_token_id=0,
                         rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 6})
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    params = init_params(config, k1, std=0.2)
    params["latent"] = init_latent_params(config, k2)
    hf.save_pretrained(config, params, tmp_path)
    assert (tmp_path / hf.LATENT_FILE).exists()
    ids, mask = left_padded_batch(config.vocab_size)
    ours = np.asarray(logits(config, params, ids, mask))
    ref = torch_logits(load_torch(tmp_path), ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)
    config2, params2 = hf.load_pretrained(tmp_path)
    assert config2 == config.replace(attention_bias=True)  # zero biases were written
    np.testing.assert_array_equal(params2["latent"]["q"]["kernel"], params["latent"]["q"]["kernel"])
    np.testing.assert_array_equal(params2["latent"]["v"]["bias"], params["latent"]["v"]["bias"])
    assert not params2["layers"]["attn"]["q"]["bias"].any()


# ----------------------------------------------------------------- loading variants


def test_legacy_config_keys_are_read(tmp_path):
    path = make_hf_model(tmp_path, "llama", tied=False, rope_theta=777.0, legacy_config=True,
                         rope_scaling={"rope_type": "linear", "factor": 2.0}, **SHAPE)
    cfg = json.loads(open(os.path.join(path, "config.json")).read())
    assert "rope_parameters" not in cfg and cfg["rope_theta"] == 777.0
    config, params = hf.load_pretrained(path)
    assert config.rope_theta == 777.0
    assert config.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
    ids, mask = left_padded_batch(config.vocab_size)
    ref = torch_logits(load_torch(path), ids, mask)
    ours = np.asarray(logits(config, params, ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint_loads(qwen_untied, tmp_path):
    path = make_hf_model(tmp_path, "qwen2", tied=False, max_shard_size="20KB", **SHAPE)
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 2
    _, sharded = hf.load_pretrained(path)
    _, single = hf.load_pretrained(qwen_untied)  # same seed and shape, one file
    jax.tree.map(np.testing.assert_array_equal, sharded, single)


def test_bfloat16_checkpoint_loads(tmp_path):
    path = make_hf_model(tmp_path, "qwen2", tied=True, dtype="bfloat16", **SHAPE)
    from safetensors import safe_open
    with safe_open(os.path.join(path, "model.safetensors"), framework="numpy") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
    config, params = hf.load_pretrained(path)
    assert params["embed"]["embedding"].dtype == np.float32
    state = _state(path)
    np.testing.assert_array_equal(params["embed"]["embedding"], state["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["layers"]["mlp"]["down"]["kernel"][1],
                                  state["model.layers.1.mlp.down_proj.weight"].T)
    ids, mask = left_padded_batch(config.vocab_size)
    ref = torch_logits(load_torch(path), ids, mask)  # float32 copy of the bf16 weights
    ours = np.asarray(logits(config, params, ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)


def test_pytorch_bin_checkpoint(qwen_untied, tmp_path, monkeypatch):
    shutil.copy(os.path.join(qwen_untied, "config.json"), tmp_path)
    torch.save(load_torch(qwen_untied).state_dict(), tmp_path / "pytorch_model.bin")
    _, from_bin = hf.load_pretrained(tmp_path)
    _, from_st = hf.load_pretrained(qwen_untied)
    jax.tree.map(np.testing.assert_array_equal, from_bin, from_st)
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # as if torch were absent
    with pytest.raises(InputError, match="needs torch"):
        hf.load_pretrained(tmp_path)


# ----------------------------------------------------------------- resize_vocab


@pytest.mark.parametrize("which", ["qwen_untied", "llama_tied"])
def test_resize_vocab_matches_resize_token_embeddings(which, request):
    path = request.getfixturevalue(which)
    config, params = hf.load_pretrained(path)
    n_new, V = 3, config.vocab_size
    model = load_torch(path)
    torch.manual_seed(0)
    model.resize_token_embeddings(V + n_new)
    ref_emb = model.get_input_embeddings().weight.detach().numpy()
    ref_head = model.get_output_embeddings().weight.detach().numpy()  # [V + n, d]

    new_config, new_params = hf.resize_vocab(config, params, n_new)
    assert new_config.vocab_size == V + n_new == model.config.vocab_size
    emb = np.asarray(new_params["embed"]["embedding"])
    np.testing.assert_array_equal(emb[:V], ref_emb[:V])  # kept rows exactly
    head = emb if config.tie_word_embeddings else np.asarray(new_params["lm_head"]["kernel"]).T
    np.testing.assert_array_equal(head[:V], ref_head[:V])
    # New rows: transformers draws around the old rows' mean with 1e-9 * covariance.
    spread = emb[:V].std()
    np.testing.assert_allclose(emb[V:], ref_emb[V:], atol=1e-3 * spread)
    np.testing.assert_allclose(head[V:], ref_head[V:], atol=1e-3 * spread)
    np.testing.assert_allclose(emb[V:], np.broadcast_to(emb[:V].mean(0), (n_new, emb.shape[1])),
                               atol=1e-6)
    _, noisy = hf.resize_vocab(config, params, n_new, seed=1)
    noisy_rows = np.asarray(noisy["embed"]["embedding"])[V:]
    assert not np.array_equal(noisy_rows, emb[V:])
    np.testing.assert_allclose(noisy_rows, ref_emb[V:], atol=1e-3 * spread)
    # The resized model still matches transformers' resized model on every old token.
    ids, mask = left_padded_batch(V)
    ref = torch_logits(model, ids, mask)
    ours = np.asarray(logits(new_config, new_params, ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real][:, :V], ref[real][:, :V], atol=1e-4, rtol=1e-4)
    assert hf.resize_vocab(config, params, 0) == (config, params)


# ----------------------------------------------------------------- errors name the tensor


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_tensors(path, edit):
    from safetensors.numpy import load_file, save_file
    f = os.path.join(path, "model.safetensors")
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _edit_config(path, **kw):
    f = os.path.join(path, "config.json")
    cfg = json.loads(open(f).read())
    cfg.update(kw)
    open(f, "w").write(json.dumps(cfg))


def test_missing_tensor_is_named(qwen_untied, tmp_path):
    path = _copy(qwen_untied, tmp_path / "m")
    _rewrite_tensors(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(InputError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        hf.load_pretrained(path)


def test_untied_checkpoint_without_lm_head_is_an_error(qwen_untied, tmp_path):
    path = _copy(qwen_untied, tmp_path / "m")
    _rewrite_tensors(path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(InputError, match=r"'lm_head\.weight'"):
        hf.load_pretrained(path)


def test_shape_mismatch_is_named(qwen_untied, tmp_path):
    path = _copy(qwen_untied, tmp_path / "m")
    _edit_config(path, intermediate_size=80)
    with pytest.raises(InputError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj"
                                         r"\.weight' has shape \[\d+, \d+\], expected"):
        hf.load_pretrained(path)


def test_unexpected_tensor_is_named(qwen_untied, tmp_path):
    path = _copy(qwen_untied, tmp_path / "m")
    _rewrite_tensors(path, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(InputError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra\.weight'"):
        hf.load_pretrained(path)


def test_unknown_architecture_is_named(qwen_untied, tmp_path):
    path = _copy(qwen_untied, tmp_path / "m")
    _edit_config(path, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(InputError, match=r"config\.json field 'architectures'.*MistralForCausalLM"):
        hf.load_pretrained(path)


def test_unsupported_rope_and_missing_files(qwen_untied, tmp_path):
    path = _copy(qwen_untied, tmp_path / "m")
    _edit_config(path, rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(InputError, match="rope type 'yarn'"):
        hf.load_pretrained(path)
    os.remove(os.path.join(path, "model.safetensors"))
    _edit_config(path, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    with pytest.raises(InputError, match="no model.safetensors"):
        hf.load_pretrained(path)
    with pytest.raises(InputError, match="config.json: missing"):
        hf.load_pretrained(tmp_path)


def test_nonzero_llama_o_proj_bias_is_refused(llama_tied, tmp_path):
    path = _copy(llama_tied, tmp_path / "m")
    _rewrite_tensors(path, lambda t: t["model.layers.1.self_attn.o_proj.bias"].__setitem__(0, 1.0))
    with pytest.raises(InputError, match=r"'model\.layers\.1\.self_attn\.o_proj\.bias' is non-zero"):
        hf.load_pretrained(path)


# ----------------------------------------------------------------- Orbax params + CLI


def test_params_checkpoint_round_trip(qwen_untied, tmp_path):
    config, params = hf.load_pretrained(qwen_untied)
    params["latent"] = jax.tree.map(np.asarray, init_latent_params(config, jax.random.PRNGKey(1)))
    out = tmp_path / "ckpt"
    params_io.save_params(out, params, config, extra={"source": "test"})
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp dirs left behind
    config2, params2 = params_io.load_params(out)
    assert config2 == config
    assert params_io.read_model_config(out)[1] == {"source": "test"}
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    with pytest.raises(InputError, match="already exists"):
        params_io.save_params(out, params, config)
    params_io.save_params(out, params2, config.replace(rope_theta=5.0), overwrite=True)
    assert params_io.load_params(out)[0].rope_theta == 5.0
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_convert_command_both_ways(llama_tied, tmp_path, capsys):
    ckpt, back = tmp_path / "orbax", tmp_path / "back"
    assert cli.main(["convert", "--hf", str(llama_tied), "--out", str(ckpt)]) == 0
    assert (ckpt / "model_config.json").exists() and (ckpt / "params").is_dir()
    assert cli.main(["convert", "--to-hf", "--from", str(ckpt), "--out", str(back)]) == 0
    _assert_same_logits(llama_tied, back)
    assert cli.main(["convert", "--hf", str(llama_tied), "--out", str(ckpt)]) == 2  # exists
    assert cli.main(["convert", "--out", str(tmp_path / "x")]) == 2
    assert cli.main(["convert", "--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")]) == 2
    assert cli.main(["convert", "--bogus"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "nowhere: not a directory" in err


def test_config_from_hf_variants():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=50, hidden_size=16,
                intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    c = hf.config_from_hf(dict(base, eos_token_id=[7, 8], rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 123.0}}))
    assert (c.rope_theta, c.rope_scaling, c.eos_token_id, c.num_kv_heads, c.head_dim) == (123.0, None, 7, 2, 8)
    assert hf.config_from_hf(dict(base)).rope_theta == 10000.0
    c = hf.config_from_hf(dict(base, max_position_embeddings=64, rope_theta=9.0,
                               rope_scaling={"type": "llama3", "factor": 2.0}))
    assert c.rope_theta == 9.0
    assert c.rope_scaling_dict["original_max_position_embeddings"] == 64
    assert hf.config_from_hf(hf.config_to_hf(c)) == c
    with pytest.raises(InputError, match="field 'hidden_size': missing"):
        hf.config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(InputError, match="field 'hidden_act'"):
        hf.config_from_hf(dict(base, hidden_act="gelu"))
    with pytest.raises(InputError, match="field 'use_sliding_window'"):
        hf.config_from_hf(dict(base, architectures=["Qwen2ForCausalLM"], use_sliding_window=True))
    with pytest.raises(InputError, match="field 'model_type'"):
        hf.config_from_hf({k: v for k, v in base.items() if k != "architectures"})
