"""GGUF -> Hugging Face folder conversion (`latentr3_jax.gguf_convert`).

Tiny files are written here with `gguf.GGUFWriter` from tiny random transformers models,
the way llama.cpp's convert script writes them (Llama q/k rows permuted, 1-D tensors in
F32, the vocabulary as tokens + merges); the real SmolLM2 file in ../shared/models is
checked against transformers' own GGUF loading.
"""

import json
import os
import pathlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

import jax  # noqa: E402

from hf_fixtures import hf_config, left_padded_batch, randomize_, torch_logits  # noqa: E402
from latentr3_jax import gguf_convert, hf  # noqa: E402
from latentr3_jax.data import load_tokenizer  # noqa: E402
from latentr3_jax.data.tokenizer import train_tokenizer  # noqa: E402
from latentr3_jax.errors import InputError  # noqa: E402
from latentr3_jax.model import logits  # noqa: E402

Q = gguf.GGMLQuantizationType
SHARED = pathlib.Path(__file__).resolve().parents[3] / "shared"
SMOL = SHARED / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CDS = SHARED / "data" / "amazon18" / "CDs_and_Vinyl"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Greatest Hits 1985 - The Best of the Righteous Brothers",
    "Pure 60's: The #1 Hits, Vol. 2 (Remastered)",
    "Ricky Nelson: Greatest Hits\n\n### Response: \n",
    "Café déjà vu; naïve résumé — 100% «quoted» text",
    "user\nHello there, how are you doing today?",
    "Numbers 0123456789 and   multiple   spaces",
] * 3
ROUND_TRIP = [
    "The quick brown fox jumps over the lazy dog.",
    "Unseen words: zebra xylophone quokka 2024!",
    "  leading spaces and a trailing one ",
    "Pure 60's: The #1 Hits<|endoftext|>next",
    "Café déjà vu ½ ² ∞ 日本語",
    "tabs\tand\nnewlines\r\n\n",
    "",
]
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8192)


# --------------------------------------------------------------------------- writing GGUFs


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's permutation of Llama q/k rows (HF halves -> pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_metadata(tok):
    """(tokens, token types, merges) of a byte-level BPE as llama.cpp stores them."""
    backend = tok.backend
    vocab = backend.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    assert None not in tokens
    special = {a.content for a in backend.get_added_tokens_decoder().values() if a.special}
    types = [3 if t in special else 1 for t in tokens]
    merges = json.loads(backend.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    return tokens, types, merges


def _quantized(w: np.ndarray, qtype) -> tuple:
    """(array for GGUFWriter.add_tensor, raw_dtype, the values a reader gets back)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype == Q.F32:
        return w, None, w
    if qtype == Q.F16:
        h = w.astype(np.float16)
        return h, None, h.astype(np.float32)
    data = gguf.quants.quantize(w, qtype)
    return data, qtype, gguf.quants.dequantize(data, qtype).reshape(w.shape)


def write_gguf(path, model, tok, *, arch="llama", qtype=Q.F32, pre="gpt2", rope_freqs=None,
               omit=(), replace=None, extra_tensors=None, arch_name=None,
               tokenizer_writer=None) -> dict:
    """Write `model` (a transformers Llama/Qwen2) as llama.cpp would; returns the HF state
    dict a converter must give back (float32, after the quantisation round trip).

    omit: GGUF tensor names to leave out; replace: {gguf name: (array, raw_dtype)} written
    as given; extra_tensors: {gguf name: array}; arch_name: general.architecture to state;
    tokenizer_writer(writer): writes the tokenizer metadata instead of `tok`'s.
    """
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch_name or arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(int(qtype))
    if tokenizer_writer is not None:
        tokenizer_writer(w)
    else:
        tokens, types, merges = _tokenizer_metadata(tok)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tok.eos_id)
        w.add_eos_token_id(tok.eos_id)
        w.add_pad_token_id(tok.pad_id)
        w.add_add_bos_token(False)

    names = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    per_layer = {"input_layernorm.weight": "attn_norm.weight",
                 "post_attention_layernorm.weight": "ffn_norm.weight",
                 "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
                 "mlp.down_proj.weight": "ffn_down.weight",
                 "self_attn.o_proj.weight": "attn_output.weight",
                 "self_attn.o_proj.bias": "attn_output.bias"}
    for p in "qkv":
        per_layer[f"self_attn.{p}_proj.weight"] = f"attn_{p}.weight"
        per_layer[f"self_attn.{p}_proj.bias"] = f"attn_{p}.bias"
    for i in range(cfg.num_hidden_layers):
        for k, v in list(per_layer.items()):
            names[f"model.layers.{i}.{k}"] = f"blk.{i}.{v}"

    expected = {}
    replace = replace or {}
    for hf_name, arr in sd.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = names[hf_name]
        if name in omit:
            continue
        if name in replace:
            data, raw = replace[name]
            w.add_tensor(name, data, raw_dtype=raw)
            continue
        # 1-D tensors stay F32, as llama.cpp keeps them.
        data, raw, back = _quantized(arr, qtype if arr.ndim == 2 else Q.F32)
        expected[hf_name] = back
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            # q/k rows are permuted whole; quantisation blocks run along rows, so quantising
            # the permuted matrix gives the permuted quantised rows.
            data = np.ascontiguousarray(_llama_cpp_permute(data, heads))
        w.add_tensor(name, data, raw_dtype=raw)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizers_():
    """Tiny byte-level BPEs (GPT-2 split and Qwen2 split), <|endoftext|> and <|Thought|>."""
    return {"gpt2": train_tokenizer(SENTENCES, 300, min_frequency=1, split="gpt2"),
            "qwen2": train_tokenizer(SENTENCES, 300, min_frequency=1, split="qwen")}


def _torch_model(arch, vocab, tied, seed=0, bias=None, rope_scaling=None):
    import transformers
    torch.manual_seed(seed)
    config = hf_config(arch, tied, bias, 10000.0 if rope_scaling is None else 5e5, rope_scaling,
                       vocab_size=vocab, **SHAPE)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    return model.eval()


def _rope_freqs_llama3(cfg):
    """llama.cpp's rope_freqs tensor for a llama3-scaled model: base inv_freq / scaled."""
    from latentr3_jax.model.decoder import rope_inv_freq
    theta, hd = cfg.rope_parameters["rope_theta"], cfg.hidden_size // cfg.num_attention_heads
    scaled = rope_inv_freq(hd, theta, LLAMA3).astype(np.float64)
    return (rope_inv_freq(hd, theta).astype(np.float64) / scaled).astype(np.float32)


# name -> (arch, qtype, tied, extra): exact weights for every type; logits against the
# original model within a tolerance for what the type loses.
VARIANTS = {
    "llama_f32_untied": ("llama", Q.F32, False, {}),
    "llama_f16_tied": ("llama", Q.F16, True, {}),
    "llama_bf16_untied": ("llama", Q.BF16, False, {}),
    "llama_q8_0_tied": ("llama", Q.Q8_0, True, {}),
    "llama_q4_1_untied": ("llama", Q.Q4_1, False, {}),
    "llama_q5_0_tied": ("llama", Q.Q5_0, True, {}),
    "llama_f32_bias_llama3": ("llama", Q.F32, True, {"bias": True, "rope_scaling": LLAMA3}),
    "qwen2_f16_tied": ("qwen2", Q.F16, True, {}),
    "qwen2_q8_0_untied": ("qwen2", Q.Q8_0, False, {}),
}
# max |logit difference| to the unquantised model per type, as a fraction of the largest
# logit (F32: 1e-4 absolute). A sanity bound only: these random weights (std 0.15,
# embeddings 0.5) are harsh on 4/5-bit blocks; the exact check is on the weights.
TO_ORIGINAL = {Q.F16: 5e-3, Q.BF16: 3e-2, Q.Q8_0: 0.1, Q.Q5_0: 0.5, Q.Q4_1: 0.6}


class Converted:
    def __init__(self, tmp, name, toks):
        arch, qtype, tied, extra = VARIANTS[name]
        tok = toks["qwen2" if arch == "qwen2" else "gpt2"]
        self.tok, self.qtype = tok, qtype
        self.original = _torch_model(arch, tok.vocab_size, tied, **extra)
        freqs = _rope_freqs_llama3(self.original.config) if extra.get("rope_scaling") else None
        self.gguf = tmp / f"{name}.gguf"
        self.expected = write_gguf(self.gguf, self.original, tok, arch=arch, qtype=qtype,
                                   pre="qwen2" if arch == "qwen2" else "gpt2", rope_freqs=freqs)
        self.out = gguf_convert.convert_gguf(str(self.gguf), str(tmp / name))
        self.config, self.params = hf.load_pretrained(self.out)


@pytest.fixture(scope="module")
def convert(tmp_path_factory, tokenizers_):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = Converted(tmp_path_factory.mktemp("gguf"), name, tokenizers_)
        return cache[name]
    return get


# --------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("name", list(VARIANTS))
def test_tiny_gguf_weights_config_and_logits(convert, name):
    c = convert(name)
    arch, qtype, tied, extra = VARIANTS[name]
    from safetensors.numpy import load_file
    got = load_file(os.path.join(c.out, "model.safetensors"))
    # every tensor is what a reader of the GGUF gets back, q/k rows un-permuted exactly
    assert set(got) == set(c.expected)
    for k, v in c.expected.items():
        assert got[k].dtype == np.float32
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    with open(os.path.join(c.out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]]
    assert cfg["tie_word_embeddings"] is tied and c.config.tie_word_embeddings is tied
    assert (c.config.num_layers, c.config.hidden_size, c.config.num_heads, c.config.num_kv_heads,
            c.config.head_dim) == (2, 64, 4, 2, 16)
    assert c.config.vocab_size == c.tok.vocab_size
    assert c.config.rope_scaling_dict == (LLAMA3 if extra.get("rope_scaling") else None)
    assert c.config.attention_bias is (arch == "qwen2" or bool(extra.get("bias")))

    import transformers
    dequantised = transformers.AutoModelForCausalLM.from_pretrained(c.out, dtype=torch.float32).eval()
    ids, mask = left_padded_batch(c.config.vocab_size, lengths=(9, 5, 7), seed=1)
    ours = np.asarray(logits(c.config, c.params, ids, mask))
    real = mask.astype(bool)
    ref = torch_logits(dequantised, ids, mask)
    assert np.abs(ref[real]).max() > 1.0
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=1e-4)
    orig = torch_logits(c.original, ids, mask)
    bound = 1e-4 if qtype == Q.F32 else TO_ORIGINAL[qtype] * np.abs(orig[real]).max()
    assert np.abs(ours[real] - orig[real]).max() <= bound


@pytest.mark.parametrize("split", ["gpt2", "qwen2"])
def test_tiny_tokenizer_round_trip(convert, tokenizers_, split):
    c = convert("qwen2_f16_tied" if split == "qwen2" else "llama_q8_0_tied")
    original = tokenizers_[split]
    rebuilt = load_tokenizer(c.out)
    assert rebuilt.vocab_size == original.vocab_size
    assert (rebuilt.eos_id, rebuilt.pad_id, rebuilt.thought_id) == \
        (original.eos_id, original.pad_id, original.thought_id)
    for s in ROUND_TRIP + SENTENCES[:7]:
        assert rebuilt.encode(s) == original.encode(s), s
        assert rebuilt.decode(rebuilt.encode(s)) == original.decode(original.encode(s))
    # the control tokens stay whole
    assert rebuilt.encode("a<|Thought|>b")[1] == rebuilt.thought_id
    with open(os.path.join(c.out, "tokenizer_config.json")) as f:
        assert json.load(f)["eos_token"] == "<|endoftext|>"


def test_converted_folder_loads_in_transformers_tokenizer(convert, tokenizers_):
    import transformers
    c = convert("llama_f32_untied")
    hf_tok = transformers.AutoTokenizer.from_pretrained(c.out)
    for s in ROUND_TRIP:
        assert hf_tok(s, add_special_tokens=False)["input_ids"] == tokenizers_["gpt2"].encode(s)


def test_sentencepiece_vocabulary_matches_transformers_gguf(tmp_path):
    """tokenizer.ggml.model 'llama' (SentencePiece BPE: tokens + scores, byte fallback, no
    merges, BOS added) gives transformers' GGUF tokenizer's ids, with and without BOS."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                split=False)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    bk.train_from_iterator(SENTENCES, trainers.BpeTrainer(
        vocab_size=400, min_frequency=1, special_tokens=specials, show_progress=False))
    vocab = bk.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    # llama.cpp types: 2 unknown, 3 control, 6 byte, 1 normal; scores rank the pieces
    types = [2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t.startswith("<0x") else 1
             for t in tokens]
    scores = [-float(i) if ty == 1 else 0.0 for i, ty in enumerate(types)]

    def spm(w):
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_bos_token(True)

    path = tmp_path / "spm.gguf"
    write_gguf(path, _torch_model("llama", len(tokens), True), None, tokenizer_writer=spm)
    ours = load_tokenizer(gguf_convert.convert_gguf(str(path), str(tmp_path / "hf")))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    assert (ours.eos_id, ours.bos_id) == (2, 1)
    for s in ROUND_TRIP + SENTENCES[:7] + [" hello", "hello  world", "ünïcödé ✓"]:
        assert ours.backend.encode(s).ids == ref(s)["input_ids"], s
        ids = ours.encode(s)
        assert ids == ref(s, add_special_tokens=False)["input_ids"], s
        assert ours.decode(ids) == ref.decode(ids), s


def test_dtype_option(tmp_path, convert):
    c = convert("llama_f16_tied")
    out = gguf_convert.convert_gguf(str(c.gguf), str(tmp_path / "bf16"), dtype="bfloat16")
    with open(os.path.join(out, "model.safetensors"), "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    cfg, params = hf.load_pretrained(out)
    np.testing.assert_allclose(params["final_norm"]["scale"], c.params["final_norm"]["scale"],
                               rtol=1e-2)
    with pytest.raises(InputError, match="dtype"):
        gguf_convert.convert_gguf(str(c.gguf), str(tmp_path / "x"), dtype="int8")


def test_interrupted_convert_leaves_no_half_folder(tmp_path, convert, monkeypatch):
    c = convert("llama_f16_tied")

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "save_file", broken_save)
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        gguf_convert.convert_gguf(str(c.gguf), str(fresh))
    assert not fresh.exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt):
        gguf_convert.convert_gguf(str(c.gguf), str(old))
    assert sorted(os.listdir(old)) == ["config.json"] and (old / "config.json").read_text() == "{}"


def test_resolve_model_path(tmp_path, convert, monkeypatch):
    c = convert("llama_f16_tied")
    assert gguf_convert.resolve_model_path("/some/hf/folder") == "/some/hf/folder"
    src = tmp_path / "m.gguf"
    src.write_bytes(c.gguf.read_bytes())

    # beside the file when that is writable
    out = gguf_convert.resolve_model_path(str(src))
    assert out == str(src) + ".hf"
    assert hf.read_hf_config(out).num_layers == 2

    calls = []
    real = gguf_convert.convert_gguf
    monkeypatch.setattr(gguf_convert, "convert_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert gguf_convert.resolve_model_path(str(src)) == out and calls == []  # reused
    os.utime(src, ns=(1, 1))  # the source changed: converted again
    assert gguf_convert.resolve_model_path(str(src)) == out and len(calls) == 1

    # an explicit cache root, then the user cache when beside is not writable
    cached = gguf_convert.resolve_model_path(str(src), cache_dir=str(tmp_path / "cache"))
    assert os.path.dirname(cached) == str(tmp_path / "cache") and len(calls) == 2
    assert gguf_convert.resolve_model_path(str(src), cache_dir=str(tmp_path / "cache")) == cached
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    real_writable = gguf_convert._writable
    monkeypatch.setattr(gguf_convert, "_writable", lambda p: not p.endswith(".hf") and real_writable(p))
    src2 = tmp_path / "n.gguf"
    src2.write_bytes(c.gguf.read_bytes())
    user = gguf_convert.resolve_model_path(str(src2))
    assert user.startswith(str(tmp_path / "xdg" / "latentr3_jax" / "gguf"))
    assert load_tokenizer(user).vocab_size == c.tok.vocab_size

    with pytest.raises(InputError, match="not found"):
        gguf_convert.resolve_model_path(str(tmp_path / "missing.gguf"))


# --------------------------------------------------------------------------- errors


def _one_line_error(fn, *parts) -> str:
    with pytest.raises(InputError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, msg
    return msg


@pytest.fixture(scope="module")
def small(tokenizers_):
    return _torch_model("llama", tokenizers_["gpt2"].vocab_size, False)


def test_error_truncated_file(tmp_path, small, tokenizers_):
    path = tmp_path / "model.gguf"
    write_gguf(path, small, tokenizers_["gpt2"])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    msg = _one_line_error(lambda: gguf_convert.convert_gguf(str(path), str(tmp_path / "o")),
                          str(path), "tensor blk.", "truncated")
    assert not (tmp_path / "o").exists(), msg
    path.write_bytes(data[:100])  # cut inside the metadata
    _one_line_error(lambda: gguf_convert.convert_gguf(str(path), str(tmp_path / "o")),
                    str(path), "not a readable GGUF file")
    path.write_bytes(b"")
    _one_line_error(lambda: gguf_convert.convert_gguf(str(path), str(tmp_path / "o")), str(path))
    _one_line_error(lambda: gguf_convert.convert_gguf(str(tmp_path / "nope.gguf"), str(tmp_path / "o")),
                    "nope.gguf", "not found")


def test_error_unknown_architecture(tmp_path, small, tokenizers_):
    path = tmp_path / "model.gguf"
    write_gguf(path, small, tokenizers_["gpt2"], arch_name="mamba")
    _one_line_error(lambda: gguf_convert.convert_gguf(str(path), str(tmp_path / "o")),
                    str(path), "general.architecture", "'mamba'")


def test_error_unknown_tensor_type(tmp_path, small, tokenizers_):
    path = tmp_path / "model.gguf"
    write_gguf(path, small, tokenizers_["gpt2"])
    data = bytearray(path.read_bytes())
    name = b"blk.1.attn_q.weight"
    at = data.index(name) + len(name)               # tensor info: name, n_dims, dims, type
    n_dims = int.from_bytes(data[at:at + 4], "little")
    at += 4 + 8 * n_dims
    assert int.from_bytes(data[at:at + 4], "little") == int(Q.F32)
    data[at:at + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    _one_line_error(lambda: gguf_convert.convert_gguf(str(path), str(tmp_path / "o")),
                    str(path), "tensor blk.1.attn_q.weight", "unknown tensor type 99")


def test_error_unsupported_quantisation(tmp_path, small, tokenizers_):
    path = tmp_path / "model.gguf"
    rows, cols = 128, 64            # ffn_up [intermediate, hidden] as Q8_1 (no dequantiser)
    block, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    raw = np.random.default_rng(0).integers(0, 255, (rows, cols // block * type_size), dtype=np.uint8)
    write_gguf(path, small, tokenizers_["gpt2"], replace={"blk.0.ffn_up.weight": (raw, Q.Q8_1)})
    _one_line_error(lambda: gguf_convert.convert_gguf(str(path), str(tmp_path / "o")),
                    str(path), "tensor blk.0.ffn_up.weight", "unsupported quantisation type Q8_1")


def test_error_missing_or_unexpected_tensor(tmp_path, small, tokenizers_):
    path = tmp_path / "model.gguf"
    write_gguf(path, small, tokenizers_["gpt2"], omit=("blk.1.ffn_gate.weight",))
    _one_line_error(lambda: gguf_convert.convert_gguf(str(path), str(tmp_path / "o")),
                    str(path), "tensor blk.1.ffn_gate.weight", "missing")
    path2 = tmp_path / "model2.gguf"
    write_gguf(path2, small, tokenizers_["gpt2"],
               extra_tensors={"blk.0.attn_k_norm.weight": np.ones(16, np.float32)})
    _one_line_error(lambda: gguf_convert.convert_gguf(str(path2), str(tmp_path / "o")),
                    str(path2), "tensor blk.0.attn_k_norm.weight", "unexpected")
    path3 = tmp_path / "model3.gguf"
    bad = np.zeros((64, 63), np.float32)
    write_gguf(path3, small, tokenizers_["gpt2"], replace={"blk.0.attn_v.weight": (bad, None)})
    _one_line_error(lambda: gguf_convert.convert_gguf(str(path3), str(tmp_path / "o")),
                    str(path3), "tensor blk.0.attn_v.weight", "shape")


# --------------------------------------------------------------------------- SmolLM2 (real)


STEPS = 16
SMOL_PROMPTS = [
    "The capital of France is",
    "Here is a list of classic rock albums:\n1.",
    "<|im_start|>user\nRecommend a jazz record.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """torch on one thread: on a small shared machine its OpenMP threads spin against
    everything else (a SmolLM2 forward took 7 s on two threads and 0.4 s on one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    if not SMOL.exists():
        pytest.skip(f"real model not found at {SMOL} (../shared/models is absent)")
    import transformers
    out = gguf_convert.convert_gguf(str(SMOL), str(tmp_path_factory.mktemp("smol") / "hf"))
    config, params = hf.load_pretrained(out)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(SMOL.parent), gguf_file=SMOL.name, dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name)
    return dict(out=out, config=config, params=jax.device_put(params), ref=ref, ref_tok=ref_tok,
                tok=load_tokenizer(out))


def _smol_batch(s):
    """Left-padded prompt ids [B, P] + STEPS free slots on the right (mask 0 there)."""
    seqs = [s["tok"].encode(p) for p in SMOL_PROMPTS]
    P = max(len(x) for x in seqs)
    pad = s["tok"].pad_id
    ids = np.full((len(seqs), P + STEPS), pad, np.int64)
    mask = np.zeros_like(ids)
    for b, x in enumerate(seqs):
        ids[b, P - len(x):P] = x
        mask[b, P - len(x):P] = 1
    return ids, mask, P


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf(smol):
    cfg = smol["config"]
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.vocab_size, cfg.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 49152, True)
    assert cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
    ids, mask, P = _smol_batch(smol)
    ours = np.asarray(logits(cfg, smol["params"], ids, mask))[:, :P]
    ref = torch_logits(smol["ref"], ids[:, :P], mask[:, :P])
    real = mask[:, :P].astype(bool)
    assert np.abs(ref[real]).max() > 5.0
    assert np.abs(ours[real] - ref[real]).max() <= 1e-3


@pytest.mark.slow
def test_smollm2_greedy_continuations_match(smol):
    cfg, params = smol["config"], smol["params"]
    ids, mask, P = _smol_batch(smol)
    with torch.no_grad():
        ref = smol["ref"].generate(input_ids=torch.from_numpy(ids[:, :P]),
                                   attention_mask=torch.from_numpy(mask[:, :P]),
                                   max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                                   pad_token_id=smol["tok"].pad_id, eos_token_id=None)
    ref = ref[:, P:].numpy()
    # our greedy loop: one full forward per token over a fixed [B, P + STEPS] buffer (the
    # causal mask keeps the empty slots on the right out of every earlier position)
    for t in range(STEPS):
        out = np.asarray(logits(cfg, params, ids, mask))
        ids[:, P + t] = out[:, P + t - 1].argmax(-1)
        mask[:, P + t] = 1
    np.testing.assert_array_equal(ids[:, P:], ref)
    text = smol["tok"].decode(ids[0, P:])
    assert "Paris" in text, text


def _digit_after_spaces(text: str) -> bool:
    return any(ch.isnumeric() and (not ch.isascii() or (i >= 2 and text[i - 2:i].isspace()))
               for i, ch in enumerate(text))


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf(smol):
    if not (CDS / "test.csv").exists():
        pytest.skip(f"real data not found at {CDS} (../shared/data/amazon18 is absent)")
    from latentr3_jax.data.d3 import read_d3
    from latentr3_jax.data.prompts import build_prompt, format_target
    ds = read_d3(CDS, splits=("test",))
    samples = ds.splits["test"][:200]
    prompts = [build_prompt(s.history_titles, ds.category_word) for s in samples]
    tok, ref = smol["tok"], smol["ref_tok"]
    ours = tok.encode_batch(prompts)
    theirs = ref(prompts, add_special_tokens=False)["input_ids"]
    assert len(prompts) == 200 and all(len(x) > 40 for x in ours)
    for text, a, b in zip(prompts, ours, theirs):
        assert a == b, text
    # Titles: identical except where a digit follows two or more white-space characters,
    # the one place the "smollm" split (below) and transformers' differ.
    titles = [format_target(s.target_title) for s in samples]
    theirs = ref(titles, add_special_tokens=False)["input_ids"]
    for text, a, b in zip(titles, tok.encode_batch(titles), theirs):
        assert a == b or _digit_after_spaces(text), text
    assert tok.eos_id == 2 and tok.thought_id == 49152 and tok.vocab_size == 49153
    # SmolLM2's known ids
    assert tok.encode("Hello world! 123") == [19556, 905, 17, 216, 33, 34, 35]
    assert tok.encode("Café déjà vu.") == [51, 1939, 2756, 32564, 90, 16739, 386, 101, 30]
    # "smollm" splits every digit off first (llama.cpp, and SmolLM2's own tokenizer.json:
    # Digits then ByteLevel), so two spaces before a number stay one "ĠĠ" token;
    # transformers' GGUF tokenizer ignores tokenizer.ggml.pre here and splits "Ġ" + "Ġ".
    vocab = tok.backend.get_vocab()
    assert tok.encode("Hits:  20") == tok.encode("Hits:") + [vocab["ĠĠ"], vocab["2"], vocab["0"]]


@pytest.mark.parametrize("name", ["llama_f32_untied", "qwen2_f16_tied"])
def test_cli_model_size_hint_reads_the_metadata(convert, name, monkeypatch):
    """The host allocator's `auto` policy sizes a GGUF model from its metadata and an HF
    folder from its config.json, without loading weights: both give the parameter count
    of the converted model with its `<|Thought|>` row."""
    from latentr3_jax import cli
    monkeypatch.delenv("LATENTR3_CPU_MALLOC", raising=False)
    c = convert(name)
    conv = hf.read_hf_config(c.out)
    want = conv.replace(vocab_size=conv.vocab_size + 1).num_params()
    assert cli._model_size_hint("sft", [f"--config.model.hf_path={c.gguf}"]) == want
    assert cli._model_size_hint("sft", [f"--config.model.hf_path={c.out}"]) == want
