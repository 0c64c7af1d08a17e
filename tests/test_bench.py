"""bench/: the FLOP count, the GPU peak table, and the torch reference of the release's
computations (that it computes what the release computes, and what our JAX code computes).

Tiny shapes only; the benchmarks themselves are run by hand (bench/*.py)."""

import mmap
import os
import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import common  # noqa: E402
import torch_reference as ref  # noqa: E402
from latentr3_jax.decode.beam import constrained_beam_search  # noqa: E402
from latentr3_jax.decode.trie import ItemTrie  # noqa: E402
from latentr3_jax.model import latent  # noqa: E402
from latentr3_jax.model.config import bench_config  # noqa: E402
from latentr3_jax.train.grpo import rollout  # noqa: E402


def tiny(model_type="qwen2", vocab=300):
    return bench_config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, model_type=model_type,
                        attention_bias=model_type == "qwen2")


def torch_pair(config, params):
    """The torch model and LatentRATT holding `params` (float32, strict)."""
    common.torch_strict_fp32()
    model = ref.build_causal_lm(config).eval()
    ref.load_jax_params(model, config, jax.device_get(params))
    ratt = ref.LatentRATT(config.hidden_size)
    ref.load_jax_latent(ratt, jax.device_get(params["latent"]))
    return model, ratt


# --------------------------------------------------------------------------- FLOP count


def test_smollm2_shape_and_non_embedding_params():
    c = common.shape_config("smollm2-135m", 49153)
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert c.model_type == "llama" and c.tie_word_embeddings and not c.attention_bias
    assert c.vocab_size == 49153
    # SmolLM2-135M: 134,515,008 parameters with its 49,152-token table, 576 per extra row
    assert c.num_params() == 134_515_008 + 576
    assert common.non_embedding_params(c) == 134_515_008 - 49152 * 576 == 106_203_456
    assert common.shape_config("small", 8001).vocab_size == 8001
    assert common.shape_config("qwen2.5-1.5b", 8001).vocab_size == 151936


def test_pass_flops_conventions():
    c = tiny()
    n = common.non_embedding_params(c)
    L, A, d, V = c.num_layers, c.num_heads * c.head_dim, c.hidden_size, c.vocab_size
    # forward: 2N per token, 4 L A per key read, 2 d V per logit position
    assert common.pass_flops(c, 10, 0, 0, "fwd") == 2 * n * 10
    assert common.pass_flops(c, 0, 7, 0, "fwd") == 4 * L * A * 7
    assert common.pass_flops(c, 0, 0, 3, "fwd") == 2 * d * V * 3
    f = common.pass_flops(c, 10, 55, 10, "fwd")
    assert common.pass_flops(c, 10, 55, 10, "train") == 3 * f          # 6N per trained token
    assert common.pass_flops(c, 10, 0, 0, "input_grad") == 4 * n * 10   # frozen weights
    assert common.causal_ctx(2, 4) == 2 * (1 + 2 + 3 + 4)
    assert common.cached_ctx(1, 10, 2) == 11 + 12


def test_step_flops_order():
    """The release's two full passes cost more than one plain pass, which costs more than
    the prefix-cached step (whose logits are at the targets only)."""
    c = bench_config(vocab_size=8001)
    B, P, T = 8, 176, 20
    ours, release, plain = (common.flops_sft_prefix(c, B, P, T), common.flops_sft_release(c, B, P, T),
                            common.flops_plain(c, B, P, T))
    assert ours < plain < release
    # LR-GRPO: 8 prompts with the shared prefix cost less than 8 groups the release's way
    g_ours = common.flops_grpo_prefix(c, 8, 8, 96, 16)
    g_rel = 8 * common.flops_grpo_release_group(c, 8, 96, 16)
    assert g_ours < g_rel
    assert common.flops_grpo_prefix(c, 8, 8, 96, 16, fused=False) > g_ours
    # beam: transformers expands the prompt to every beam before its prefill
    assert common.flops_beam_hf(c, 8, 10, 128, 12, False) > common.flops_beam_ours(c, 8, 10, 128, 12, 0)
    assert common.flops_beam_hf(c, 8, 10, 129, 12, True) > common.flops_beam_hf(c, 8, 10, 128, 12, False)


def test_gpu_peak_table():
    assert common.gpu_datasheet_peak("NVIDIA H200", "bfloat16")[0] == 989.4e12
    assert common.gpu_datasheet_peak("NVIDIA H100 80GB HBM3", "float32")[0] == 66.9e12
    assert common.gpu_datasheet_peak("NVIDIA H100 PCIe", "bfloat16")[0] == 756.0e12
    assert common.gpu_datasheet_peak("Some GPU", "float32")[0] is None
    row = common.flop_fields(2e9, 0.5, {"peak_flops_per_s": 8e9, "peak_source": "x"})
    assert row["flops_per_s"] == 4e9 and row["fraction_of_peak"] == 0.5


def test_precision_context():
    with common.jax_precision("float32"):
        assert jax.config.jax_default_matmul_precision == "highest"
    with common.jax_precision("bfloat16"):
        assert jax.config.jax_default_matmul_precision in (None, "default", "DEFAULT")
    common.torch_strict_fp32()
    assert not torch.backends.cuda.matmul.allow_tf32
    assert not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"


# --------------------------------------------------------------------------- SFT


def test_release_sft_loss_matches_jax():
    c = tiny()
    params = latent.init_model_params(c, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    pi = rng.integers(3, 290, (2, 12)).astype(np.int32)
    pm = np.ones_like(pi)
    pm[0, :4] = 0
    pi[0, :4] = 0
    ti = rng.integers(3, 290, (2, 4)).astype(np.int32)
    tm = np.ones_like(ti)
    tm[1, 3] = 0
    with common.jax_precision("float32"):
        logits, _ = latent.latent_forward(c, params, *map(jnp.asarray, (pi, pm, ti, tm)))
        s, n = latent.target_cross_entropy(logits, jnp.asarray(ti), jnp.asarray(tm))
    model, ratt = torch_pair(c, params)
    b = {"prompt_ids": pi, "prompt_mask": pm, "target_ids": ti, "target_mask": tm}
    with torch.no_grad():
        tl = float(ref.release_forward_loss(model, ratt, ref.to_torch(b), thought_id=299))
    assert abs(float(s / n) - tl) < 1e-5


# --------------------------------------------------------------------------- LR-GRPO


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_shared_prefix_logprobs_match_release_passes_and_jax(model_type):
    c = tiny(model_type)
    params = latent.init_model_params(c, jax.random.PRNGKey(1))
    model, ratt = torch_pair(c, params)
    G, d = 4, c.hidden_size
    prompt, target = list(range(5, 25)), [30, 31, 32, 2]
    noise = 1.5 * torch.randn(1, G, d, generator=torch.Generator().manual_seed(0))
    noise[:, 0] = 0
    # the release's way: G full rows [prompt, thought, target], two passes
    P, T = len(prompt), len(target)
    ids = torch.tensor([prompt + [299] + target] * G)
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
        pos = torch.arange(P)[None].expand(G, -1)
        r = ratt(hidden[:, :P], torch.ones_like(pos), pos)
        emb = model.get_input_embeddings()(ids).clone()
        emb[:, P] = r + noise[0]
        lg = model(inputs_embeds=emb, logits_to_keep=T + 1, use_cache=False).logits[:, :-1]
        release = torch.log_softmax(lg, -1).gather(-1, ids[:, P + 1:, None])[..., 0]
    # ours in torch, on a left-padded prompt and a right-padded target
    b = {"prompt_ids": torch.tensor([[0] * 4 + prompt]), "prompt_mask": torch.tensor([[0] * 4 + [1] * P]),
         "target_ids": torch.tensor([target + [0]]), "target_mask": torch.tensor([[1] * T + [0]])}
    same = ref.shared_prefix_logprobs(model, ratt, b, noise)
    assert torch.allclose(same[:, :T], release, atol=2e-5)
    # ours in JAX
    with common.jax_precision("float32"):
        jl, _ = rollout.group_logprobs(c, params, *(jnp.asarray(v.numpy()) for v in b.values()),
                                       jnp.asarray(noise.numpy()))
    np.testing.assert_allclose(np.asarray(jl)[:, :T], same[:, :T].numpy(), atol=2e-5)


def test_grpo_steps_train_latentratt_only():
    c = tiny()
    model = ref.build_causal_lm(c).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ratt = ref.LatentRATT(c.hidden_size)
    before = [p.detach().clone() for p in ratt.parameters()]
    llm = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(ratt.parameters(), lr=1e-2)
    b = {"prompt_ids": torch.tensor([[0, 5, 6, 7], [8, 9, 10, 11]]),
         "prompt_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]),
         "target_ids": torch.tensor([[12, 13, 2], [14, 2, 0]]),
         "target_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}
    loss = ref.shared_prefix_grpo_step(model, ratt, opt, b, G=4,
                                       generator=torch.Generator().manual_seed(0))
    assert np.isfinite(loss)
    loss = ref.release_grpo_group_step(model, ratt, opt, [5, 6, 7], [12, 13, 2], 299, G=4,
                                       generator=torch.Generator().manual_seed(0))
    assert np.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, ratt.parameters()))
    assert all(torch.equal(a, p) for a, p in zip(llm, model.parameters()))


# --------------------------------------------------------------------------- beam search


def test_release_trie_table_and_processor():
    titles = [[7, 8, 2], [7, 9, 2], [10, 2]]
    table = ref.release_trie_table(titles, {(1, 2, 3, 4, 5)}, head_len=5)
    assert sorted(table["1-2-3-4-5"]) == [7, 10]
    assert sorted(table["7"]) == [8, 9] and table["7-8"] == [2] and table["10"] == [2]
    proc = ref.ReleaseTrieProcessor(table, num_beams=2, head_len=5)
    ids = torch.tensor([[0, 1, 2, 3, 4, 5], [9, 1, 2, 3, 4, 5]])   # the same 5-id head
    scores = proc(ids, torch.zeros(2, 12))
    assert proc.calls == 1
    allowed = (scores > -1000).nonzero().tolist()
    assert allowed == [[0, 7], [0, 10], [1, 7], [1, 10]]
    scores = proc(torch.tensor([[1, 2, 3, 4, 5, 7], [1, 2, 3, 4, 5, 3]]), torch.zeros(2, 12))
    assert (scores[0] > -1000).nonzero().flatten().tolist() == [8, 9]
    assert bool((scores[1] < -1000).all())        # no entry: every id at -1e6


def _prompts(n, width):
    """n left-padded prompts of different lengths, all ending with the same header ids."""
    rng = np.random.default_rng(0)
    ids = np.zeros((n, width), np.int64)
    mask = np.zeros((n, width), np.int64)
    for r in range(n):
        p = list(rng.integers(3, 290, width - 4 - 2 * r)) + [50, 51, 52, 53]
        ids[r, width - len(p):] = p
        mask[r, width - len(p):] = 1
    return ids, mask


@pytest.mark.parametrize("num_thoughts", [0, 1])
def test_release_generate_matches_our_beam_search(num_thoughts):
    """transformers generate with the release's processor (and, for N = 1, the release's
    latent model) returns the same top-4 titles in the same order as our beam search."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper
    c = tiny().replace(eos_token_id=2, pad_token_id=0)
    params = latent.init_model_params(c, jax.random.PRNGKey(2))
    model, ratt = torch_pair(c, params)
    rng = np.random.default_rng(1)
    titles = {i: list(rng.integers(3, 290, rng.integers(2, 5))) + [2] for i in range(30)}
    trie = ItemTrie(titles, c.vocab_size)
    ids, mask = _prompts(2, 14)
    with common.jax_precision("float32"):
        res = constrained_beam_search(c, params, jax.device_put(trie.arrays()), jnp.asarray(ids, jnp.int32),
                                      jnp.asarray(mask, jnp.int32), max_len=trie.max_len, num_beams=4,
                                      num_thoughts=num_thoughts)
    ours = np.asarray(res.leaf)
    if num_thoughts:
        ids = np.concatenate([ids, np.full((2, 1), 299)], 1)
        mask = np.concatenate([mask, np.ones((2, 1), np.int64)], 1)
        model = ref.latent_generation_model(model, ratt, 299)
    heads = {tuple(ids[r, -5:].tolist()) for r in range(2)}
    table = ref.release_trie_table(list(titles.values()), heads)
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             num_beams=4, num_return_sequences=4, max_new_tokens=trie.max_len,
                             do_sample=False, eos_token_id=2, pad_token_id=0,
                             logits_processor=LogitsProcessorList([
                                 TemperatureLogitsWarper(1.0), ref.ReleaseTrieProcessor(table, 4)]))
    theirs = []
    for seq in out[:, ids.shape[1]:].tolist():
        seq = seq[:seq.index(2) + 1]
        theirs.append(int(trie.leaf_index[trie.walk(seq)]))
    assert ours.tolist() == np.array(theirs).reshape(2, 4).tolist()


def test_cpu_model_reads_proc_cpuinfo():
    got = common.cpu_model()
    if not os.path.exists("/proc/cpuinfo"):
        assert got == {}
        return
    assert isinstance(got["cpu_model"], str) and isinstance(got["cpu_flags"], list)
    with open("/proc/cpuinfo") as f:
        flags = next(ln for ln in f if ln.startswith("flags")).split()
    assert set(got["cpu_flags"]) <= set(flags)
    assert ("avx2" in flags) == ("avx2" in got["cpu_flags"])
    with open("/proc/cpuinfo") as f:
        family = next((ln.split(":")[1].strip() for ln in f if ln.startswith("cpu family")), "")
    assert got["cpu_family"] == family


def test_step_stats_carry_the_steps_cpu_time_and_faults():
    def touch(i):   # a fresh 64 MiB mapping each call (whatever malloc's policy), every page
        m = mmap.mmap(-1, 1 << 26)
        np.frombuffer(m, np.uint8)[::4096] = 1
        m.close()
    times = common.time_steps(touch, 3, warmup=1)
    assert len(common.LAST_USAGE) == 3
    stats = common.step_stats(times, 10.0)
    assert stats["minor_faults_median"] > 0 and stats["user_s_median"] >= 0
    assert stats["sys_s_median"] >= 0
    assert common.step_stats([1.0, 2.0], 10.0).keys().isdisjoint({"user_s_median"})  # other lengths


_TURN_WORKER = '''
import json, sys, time
sys.path.insert(0, {bench!r})
import common
common.take_turn()
spans = []
def step(i):
    t0 = time.monotonic()
    time.sleep(0.02)
    spans.append((t0, time.monotonic()))
common.time_steps(step, 4, warmup=1)
if sys.argv[1] == "crash":
    raise RuntimeError("worker failed on purpose")
common.emit({{"name": sys.argv[1], "spans": spans[1:]}})  # the timed steps, not the warm-up
'''


def test_workers_in_turns_alternate_and_survive_a_crash(tmp_path):
    script = tmp_path / "turn_worker.py"
    script.write_text(_TURN_WORKER.format(bench=str(BENCH)))
    a, b = common.run_workers_in_turns([(str(script), ["a"], None), (str(script), ["b"], None)])
    assert a["name"] == "a" and b["name"] == "b"
    spans = sorted([(s, e, "a") for s, e in a["spans"]] + [(s, e, "b") for s, e in b["spans"]])
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        assert e0 <= s1  # never two timed steps at once
        assert n0 != n1  # the engines alternate step by step
    # a worker that dies hands the machine back: the other one finishes, the dead one
    # reports its error
    c, d = common.run_workers_in_turns([(str(script), ["crash"], None), (str(script), ["d"], None)])
    assert "worker failed on purpose" in c["error"]
    assert d["name"] == "d" and len(d["spans"]) == 4
    # outside run_workers_in_turns the turn calls do nothing
    common.pass_turn()
    common.take_turn()


def test_turn_blocks_run_steps_back_to_back_and_report_them_apart(tmp_path):
    script = tmp_path / "turn_worker.py"
    code = _TURN_WORKER.replace("common.time_steps(step, 4", "common.time_steps(step, 6")
    code = code.replace('"spans": spans[1:]}', '"spans": spans[1:], "after": [u["after_turn"] '
                        'for u in common.LAST_USAGE], "stats": common.step_stats([0.1, 0.1, 0.3, '
                        '0.1, 0.3, 0.1], 1.0)}')
    script.write_text(code.format(bench=str(BENCH)))
    a, b = common.run_workers_in_turns([(str(script), [n], None) for n in "ab"], block=2)
    spans = sorted([(s, e, "a") for s, e in a["spans"]] + [(s, e, "b") for s, e in b["spans"]])
    names = "".join(n for _, _, n in spans)
    assert names == "aabbaabbaabb", names    # two steps a turn, one worker at a time
    assert a["after"] == [False, False, True, False, True, False]
    assert a["stats"]["after_turn_step_s"] == pytest.approx(0.3)
    assert a["stats"]["back_to_back_step_s"] == pytest.approx(0.1)


def test_three_workers_in_turns_do_not_keep_one_predecessor(tmp_path):
    """With three or more workers the order changes between rounds, so a worker's timed
    steps follow different workers' steps (an order effect cannot sit on one arm)."""
    script = tmp_path / "turn_worker.py"
    script.write_text(_TURN_WORKER.replace("common.time_steps(step, 4", "common.time_steps(step, 8")
                      .format(bench=str(BENCH)))
    got = common.run_workers_in_turns([(str(script), [n], None) for n in "abc"])
    assert [g["name"] for g in got] == ["a", "b", "c"]
    spans = sorted((s, e, g["name"]) for g in got for s, e in g["spans"])
    for (s0, e0, _), (s1, _, _) in zip(spans, spans[1:]):
        assert e0 <= s1                                  # still one at a time
    before = {n: set() for n in "abc"}
    for (_, _, n0), (_, _, n1) in zip(spans, spans[1:]):
        if n0 != n1:
            before[n1].add(n0)
    assert all(len(v) == 2 for v in before.values()), before


def test_profile_step_classes_a_compiled_module():
    """bench/profile_step.py's op classes read off XLA's compiled text: the matmul of a
    tiny function is a dot, its sum a reduction, and every instruction gets a class."""
    import profile_step

    def f(x, w):
        return jnp.tanh(x @ w).sum(axis=-1)

    x, w = jnp.ones((16, 32), jnp.float32), jnp.ones((32, 8), jnp.float32)
    kinds = profile_step._hlo_kinds(jax.jit(f).lower(x, w).compile().as_text())
    classes = {profile_step.CLASS.get(k, k) for k in kinds.values()}
    assert "matmul" in classes, kinds
    assert classes & {"reduction", "elementwise"}, kinds


def test_grpo_curves_reads_and_plots(tmp_path):
    import gzip
    import json
    import grpo_curves

    rows = [{"split": "valid", "step": 0, "reward": -10.0}]
    rows += [{"split": "train", "step": s, "reward_eps0": -3.0 - s, "reward_noisy": -3.0,
              "adv_pos_frac": 0.5 + s / 10, "latent_drift": float(s), "latent_norm": 30.0,
              "noise_rel": 1.1} for s in range(1, 5)]
    path = tmp_path / "metrics.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    train, valid = grpo_curves.read_metrics(str(path))
    assert [r["step"] for r in train] == [1, 2, 3, 4] and valid[0]["reward"] == -10.0
    assert grpo_curves.main([str(path), "--out", str(tmp_path / "c.png"), "--every", "2"]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[1]) + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2: not JSON"):
        grpo_curves.read_metrics(str(bad))
