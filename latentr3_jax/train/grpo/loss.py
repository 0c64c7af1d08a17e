"""LR-GRPO objective pieces (SPEC.md section 6), each a small pure function.

Shapes: a batch holds `P` prompts (groups) of `G` samples each; sample 0 of every group is
the noise-free latent (eps = 0). Rewards and advantages are [P, G]; per-token arrays are
[P * G, T] with the group's samples on consecutive rows (row p * G + k).

Every reduction "over the batch" here is a plain jnp reduction over the whole array. Inside
a jitted step whose inputs are sharded over a device mesh these are global reductions, so
the batch-level baseline and the L2 normalisation see every group of the global batch, on
every device and host, as SPEC.md section 6 asks.

`valid` [P] marks real prompts; filler rows (padding a ragged last batch) get advantage 0
and are left out of every mean and norm.

`sigma` is a Python number, or (with a decaying noise, `sigma_final` >= 0) an array that
broadcasts against the per-sample values: one value per prompt or per sample row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from latentr3_jax.train import setup

ADVANTAGES = ("batch", "group", "grpo", "rloo", "group_mean")
ESTIMATORS = ("ppo", "reinforce", "pathwise")
REWARDS = ("perplexity", "contrastive")
SIGMA_SCHEDULES = ("linear", "cosine")
ADV_EPS = 1e-6        # batch / group: A = (S - b) / (||S - b||_2 + ADV_EPS)
GRPO_STD_EPS = 1e-4   # grpo: A = (s - mean_g) / (std_g + GRPO_STD_EPS), as TRL 0.16


@dataclasses.dataclass(frozen=True)
class GRPOSettings:
    """The static choices a GRPO step is compiled for."""
    group_size: int = 8
    sigma: float = 1.5
    advantage: str = "batch"
    estimator: str = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.28
    kl_beta: float = 0.0
    iterations: int = 1
    train_llm: bool = False
    num_thoughts: int = 1
    latent_mode: str = "ratt"
    dtype: Any = jnp.float32
    num_micro_batches: int = 1
    fuse: bool = True   # one forward + backward when a batch is used once (step.make_fused_loss)
    sigma_final: float = -1.0     # >= 0: sigma decays to this at the last batch (sigma_at)
    sigma_schedule: str = "linear"
    latent_trust: float = 0.0     # weight of ||r - r_sft||^2 per unit of the objective
    diagnose_every: int = 0       # batches between pathwise-gradient cosines; 0 = never
    reward: str = "perplexity"    # perplexity (release) | contrastive (against in-batch titles)
    negatives: int = 0            # other titles scored per sample (contrastive)
    negative_source: str = "batch"   # batch (other prompts' titles) | model (mined, in the batch)

    @property
    def sigma_decays(self) -> bool:
        return self.sigma_final >= 0

    @property
    def fused(self) -> bool:
        return self.fuse and self.iterations == 1 and self.num_micro_batches == 1 and not self.kl_beta

    @property
    def forward_kw(self) -> dict:
        """The keyword arguments of the latent forward passes (rollout.group_logprobs)."""
        return dict(num_thoughts=self.num_thoughts, latent_mode=self.latent_mode,
                    dtype=self.dtype, train_llm=self.train_llm)

    @classmethod
    def from_config(cls, cfg, *, num_thoughts: int, latent_mode: str, num_micro_batches: int = 1):
        g = cfg.grpo
        return cls(group_size=int(g.group_size), sigma=float(g.sigma), advantage=str(g.advantage),
                   estimator=str(g.estimator), clip_low=float(g.clip_low),
                   clip_high=float(g.clip_high), kl_beta=float(g.kl_beta),
                   iterations=int(g.iterations), train_llm=bool(g.train_llm),
                   num_thoughts=int(num_thoughts), latent_mode=str(latent_mode),
                   dtype=setup.compute_dtype(cfg), num_micro_batches=int(num_micro_batches),
                   sigma_final=float(g.sigma_final), sigma_schedule=str(g.sigma_schedule),
                   latent_trust=float(g.latent_trust), diagnose_every=int(g.diagnose_every),
                   reward=str(g.get("reward", "perplexity")),
                   negatives=int(g.get("negatives", 0)),
                   negative_source=str(g.get("negative_source", "batch")))


def _valid_col(rewards: jax.Array, valid: Optional[jax.Array]) -> jax.Array:
    if valid is None:
        return jnp.ones((rewards.shape[0], 1), jnp.float32)
    return valid.astype(jnp.float32)[:, None]


def sigma_at(s: GRPOSettings, batch_index, total_batches: int):
    """The noise standard deviation of batch `batch_index` (0-based, may be traced) of a run
    of `total_batches`: `s.sigma` when it does not decay, else
    sigma_final + (sigma - sigma_final) * w(p), p = batch_index / (total_batches - 1) in
    [0, 1], w = 1 - p (linear) or (1 + cos(pi p)) / 2 (cosine): sigma at the first batch,
    sigma_final at the last."""
    if not s.sigma_decays:
        return s.sigma
    p = jnp.clip(jnp.asarray(batch_index, jnp.float32) / max(int(total_batches) - 1, 1), 0.0, 1.0)
    if s.sigma_schedule == "linear":
        w = 1.0 - p
    elif s.sigma_schedule == "cosine":
        w = 0.5 * (1.0 + jnp.cos(jnp.pi * p))
    else:
        raise ValueError(f"grpo.sigma_schedule must be one of {SIGMA_SCHEDULES}, "
                         f"got {s.sigma_schedule!r}")
    return s.sigma_final + (s.sigma - s.sigma_final) * w


# --------------------------------------------------------------------------- rewards


def negative_perplexity(token_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """s = -exp(-(1/|y|) sum_i log p(y_i)) per row: token_logp, mask [..., T] -> [...]."""
    m = mask.astype(jnp.float32)
    mean_logp = (token_logp.astype(jnp.float32) * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)
    return -jnp.exp(-mean_logp)


def title_score(token_logp: jax.Array, mask: jax.Array) -> jax.Array:
    """The mean token log-likelihood of each row, the score beam search ranks finished titles
    by (length_penalty 1): token_logp, mask [..., T] -> [...]."""
    m = mask.astype(jnp.float32)
    return (token_logp.astype(jnp.float32) * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)


def contrastive_reward(token_logp: jax.Array, mask: jax.Array, neg_valid: jax.Array) -> jax.Array:
    """The log-probability that a sample's own title wins a softmax over itself and other
    users' titles, all scored under the same prompt and latent:

    R = s_0 - log(exp(s_0) + sum_{j >= 1, neg_valid_j} exp(s_j)),  s_j = title_score of title j.

    token_logp, mask [..., J, T] (title 0 the sample's own, 1..J-1 the negatives);
    neg_valid [..., J - 1] (broadcasting). R <= 0, and 0 without a valid negative. A latent
    that makes every title likelier (a lower perplexity for all) leaves R unchanged; only
    one that favours the user's own title over the others raises it.
    """
    scores = title_score(token_logp, mask)                                  # [..., J]
    keep = jnp.concatenate([jnp.ones(scores.shape[:-1] + (1,), bool),
                            jnp.broadcast_to(neg_valid.astype(bool), scores[..., 1:].shape)], -1)
    return scores[..., 0] - jax.nn.logsumexp(jnp.where(keep, scores, -jnp.inf), axis=-1)


def sample_rewards(s: "GRPOSettings", token_logp: jax.Array, mask: jax.Array,
                   neg_valid: Optional[jax.Array] = None) -> jax.Array:
    """Each sample's reward under `s.reward`: the negative perplexity of its own title
    (token_logp, mask [..., T]) or the contrastive reward (token_logp, mask [..., J, T],
    neg_valid [..., J - 1])."""
    if s.reward == "perplexity":
        return negative_perplexity(token_logp, mask)
    if s.reward == "contrastive":
        return contrastive_reward(token_logp, mask, neg_valid)
    raise ValueError(f"grpo.reward must be one of {REWARDS}, got {s.reward!r}")


# --------------------------------------------------------------------------- advantages


def batch_advantage(rewards: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
    """Batch-level baseline (the paper's LR-GRPO).

    b = mean over the groups of each group's eps = 0 reward (column 0);
    A = (S - b) / (||S - b||_2 + 1e-6), the norm over every sample of the batch.
    rewards [P, G] -> advantages [P, G].
    """
    v = _valid_col(rewards, valid)
    baseline = (rewards[:, 0:1] * v).sum() / jnp.maximum(v.sum(), 1.0)
    centred = (rewards - baseline) * v
    return centred / (jnp.sqrt(jnp.sum(centred * centred)) + ADV_EPS)


def group_advantage(rewards: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
    """Group-level baseline (the paper's ablation): each group's own eps = 0 reward is its b.

    A = (s_pk - s_p0) / (||S - b||_2 + 1e-6), normalised over the whole batch like the
    batch-level variant, so the two differ only in the baseline. The eps = 0 sample of
    every group gets advantage 0.
    """
    v = _valid_col(rewards, valid)
    centred = (rewards - rewards[:, 0:1]) * v
    return centred / (jnp.sqrt(jnp.sum(centred * centred)) + ADV_EPS)


def grpo_advantage(rewards: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
    """GRPO normalisation per group: A = (s - mean_g) / (std_g + 1e-4), std with G - 1
    degrees of freedom (torch's default, as in the TRL trainer the release builds on)."""
    v = _valid_col(rewards, valid)
    G = rewards.shape[1]
    mean = rewards.mean(axis=1, keepdims=True)
    var = jnp.sum((rewards - mean) ** 2, axis=1, keepdims=True) / max(G - 1, 1)
    return (rewards - mean) / (jnp.sqrt(var) + GRPO_STD_EPS) * v


def rloo_advantage(rewards: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
    """Leave-one-out baseline over the noisy samples: for k >= 1,
    A_k = s_k - mean_{j >= 1, j != k} s_j, in reward units (no normalisation); the eps = 0
    sample gets 0. Each baseline is independent of its own sample's noise, so with the
    Gaussian score the estimate of the gradient of E[s(r + eps)] stays unbiased. Needs G >= 3.
    """
    G = rewards.shape[1]
    if G < 3:
        raise ValueError(f"the rloo advantage needs group_size >= 3, got {G}")
    v = _valid_col(rewards, valid)
    noisy = rewards[:, 1:]
    others = (noisy.sum(axis=1, keepdims=True) - noisy) / (G - 2)
    adv = jnp.concatenate([jnp.zeros_like(rewards[:, :1]), noisy - others], axis=1)
    return adv * v


def group_mean_advantage(rewards: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
    """Group-mean baseline: b_p = mean of the group's G rewards (eps = 0 sample included),
    A = (S - b) / (||S - b||_2 + 1e-6) over the whole batch, like `batch` and `group`, so the
    three differ only in the baseline (and `grpo` differs from this one only in scaling each
    group by its own std instead of the batch by one norm)."""
    v = _valid_col(rewards, valid)
    centred = (rewards - rewards.mean(axis=1, keepdims=True)) * v
    return centred / (jnp.sqrt(jnp.sum(centred * centred)) + ADV_EPS)


def compute_advantages(kind: str, rewards: jax.Array, valid: Optional[jax.Array] = None) -> jax.Array:
    if kind == "batch":
        return batch_advantage(rewards, valid)
    if kind == "group":
        return group_advantage(rewards, valid)
    if kind == "grpo":
        return grpo_advantage(rewards, valid)
    if kind == "rloo":
        return rloo_advantage(rewards, valid)
    if kind == "group_mean":
        return group_mean_advantage(rewards, valid)
    raise ValueError(f"grpo.advantage must be one of {ADVANTAGES}, got {kind!r}")


# --------------------------------------------------------------------------- losses


def ppo_clip(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, clip_low: float,
             clip_high: float) -> tuple:
    """Per-element PPO-clip loss and whether the clipped branch was taken.

    ratio = exp(logp - old_logp); loss = -min(ratio * A, clip(ratio, 1 - low, 1 + high) * A).
    `advantages` broadcasts against logp (e.g. [B, 1] against [B, T]).
    """
    ratio = jnp.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    return -jnp.minimum(unclipped, clipped), clipped < unclipped


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """k3 estimator of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def gaussian_log_density(x: jax.Array, mean: jax.Array, sigma) -> jax.Array:
    """log N(x; mean, sigma^2 I) over the last axis; an array `sigma` broadcasts against
    the result (x's shape without its last axis)."""
    d = x.shape[-1]
    sq = jnp.sum(jnp.square((x - mean).astype(jnp.float32)), axis=-1)
    if isinstance(sigma, (int, float)):
        return -0.5 * sq / sigma ** 2 - 0.5 * d * math.log(2 * math.pi * sigma ** 2)
    var = jnp.square(jnp.asarray(sigma, jnp.float32))
    return -0.5 * sq / var - 0.5 * d * jnp.log(2 * math.pi * var)


def ratio_deviation(logp: jax.Array, old_logp: jax.Array) -> jax.Array:
    """|ratio - 1| per element, ratio = exp(logp - old_logp), without gradient: how far the
    policy has moved from the one that sampled (0 on the first of `iterations` updates)."""
    return jax.lax.stop_gradient(jnp.abs(jnp.exp(logp - old_logp) - 1.0))


def latent_trust_sum(latent: jax.Array, ref_latent: jax.Array, units: jax.Array) -> jax.Array:
    """sum_p units_p * ||r_p - r_sft_p||^2: latent [P, d] (with gradient), ref_latent [P, d]
    (the starting weights' latent of the same prompt, a constant), units [P] the prompt's
    units of the objective (target tokens of its G samples for ppo, its G samples otherwise),
    so that divided by the global count it is the per-unit mean squared distance."""
    diff = latent.astype(jnp.float32) - jax.lax.stop_gradient(ref_latent).astype(jnp.float32)
    return jnp.sum(units.astype(jnp.float32) * jnp.sum(diff * diff, axis=-1))


def token_objective(logp, old_logp, ref_logp, advantages, mask, *, clip_low: float,
                    clip_high: float, kl_beta: float) -> dict:
    """Sums for the token-level PPO-clip objective (the release's LR-GRPO loss).

    logp, old_logp, ref_logp, mask: [B, T]; advantages [B]. Returns sums over the tokens
    of this (micro-)batch, so the caller divides by the global token count once:
    loss = sum_t m_t (ppo_t + beta * kl_t) / sum_t m_t over the whole batch.
    """
    m = mask.astype(jnp.float32)
    loss_t, clipped = ppo_clip(logp, old_logp, advantages[:, None], clip_low, clip_high)
    out = {"loss_sum": jnp.sum(loss_t * m), "clipped_sum": jnp.sum(clipped * m),
           "kl_sum": jnp.zeros((), jnp.float32),
           "ratio_dev_sum": jnp.sum(ratio_deviation(logp, old_logp) * m)}
    if kl_beta:
        kl = k3_kl(logp, ref_logp)
        out["kl_sum"] = jnp.sum(kl * m)
        out["loss_sum"] = out["loss_sum"] + kl_beta * out["kl_sum"]
    return out


def reinforce_objective(latent, sampled_latent, old_logdens, advantages, valid_rows, *,
                        sigma: float, clip_low: float, clip_high: float) -> dict:
    """Sums for the REINFORCE variant: the policy is the Gaussian N(r, sigma^2 I) over latents.

    The action is the stored noisy latent r_k = r_old + eps_k (no gradient); its log-density
    under the current mean r is log N(r_k; r, sigma^2). The per-sample ratio
    exp(log N(r_k; r) - log N(r_k; r_old)) is PPO-clipped like the token ratio, so with one
    iteration (ratio 1) the gradient is the score-function estimate
    A_k * (r_k - r) / sigma^2 = A_k * eps_k / sigma^2 pushed back through LatentRATT.
    latent, sampled_latent [B, d]; old_logdens, advantages, valid_rows [B]. Sums over samples.
    """
    logdens = gaussian_log_density(jax.lax.stop_gradient(sampled_latent), latent, sigma)
    loss, clipped = ppo_clip(logdens, old_logdens, advantages, clip_low, clip_high)
    v = valid_rows.astype(jnp.float32)
    return {"loss_sum": jnp.sum(loss * v), "clipped_sum": jnp.sum(clipped * v),
            "kl_sum": jnp.zeros((), jnp.float32),
            "ratio_dev_sum": jnp.sum(ratio_deviation(logdens, old_logdens) * v)}


def pathwise_objective(rewards, valid_rows) -> dict:
    """Sums for the pathwise variant: maximise the mean reward itself, differentiated through
    the frozen LLM at each noisy latent (the reparameterisation gradient of
    E_eps[s(r + eps)]; with the perplexity reward it weights every sample's log-likelihood
    gradient by its perplexity, never negatively). rewards [B] (with their gradient, from
    sample_rewards); valid_rows [B]."""
    s = rewards
    v = valid_rows.astype(jnp.float32)
    return {"loss_sum": -jnp.sum(s * v), "clipped_sum": jnp.zeros((), jnp.float32),
            "kl_sum": jnp.zeros((), jnp.float32), "ratio_dev_sum": jnp.zeros((), jnp.float32)}


def objective(s: GRPOSettings, *, valid_rows, logp=None, old_logp=None, ref_logp=None,
              advantages=None, mask=None, latent=None, sampled=None, old_logdens=None,
              sigma=None, rewards=None) -> tuple:
    """(loss sum, count, aux sums) of `s.estimator` over a (micro-)batch of samples; the step
    divides by the global count. Rows are samples [B = P * G]:

    - ppo: token PPO-clip on logp / old_logp [B, T] (+ beta * k3 KL to ref_logp), count =
      target tokens (`mask` [B, T]);
    - pathwise: the mean of `rewards` [B] (with gradient; by default the negative
      perplexity of logp), count = samples;
    - reinforce: PPO-clip of the Gaussian density of the stored `sampled` latents [B, d]
      around the current `latent` [B, d] (old density `old_logdens` [B]), count = samples;
      `sigma` (default s.sigma) may be one value per row [B] when the noise decays.

    aux sums: clipped elements, the KL term, |ratio - 1| (all over the same units as count).
    """
    if s.estimator == "ppo":
        out = token_objective(logp, old_logp, ref_logp, advantages, mask, clip_low=s.clip_low,
                              clip_high=s.clip_high, kl_beta=s.kl_beta)
        count = mask.sum()
    elif s.estimator == "pathwise":
        out = pathwise_objective(negative_perplexity(logp, mask) if rewards is None else rewards,
                                 valid_rows)
        count = valid_rows.astype(jnp.float32).sum()
    elif s.estimator == "reinforce":
        out = reinforce_objective(latent, sampled, old_logdens, advantages, valid_rows,
                                  sigma=s.sigma if sigma is None else sigma,
                                  clip_low=s.clip_low, clip_high=s.clip_high)
        count = valid_rows.astype(jnp.float32).sum()
    else:
        raise ValueError(f"grpo.estimator must be one of {ESTIMATORS}, got {s.estimator!r}")
    return out["loss_sum"], count, {"clipped": out["clipped_sum"], "kl_sum": out["kl_sum"],
                                    "ratio_dev": out["ratio_dev_sum"]}


def objective_units(s: GRPOSettings, target_mask: jax.Array, valid: jax.Array) -> jax.Array:
    """Units of the objective per prompt [P]: its G samples' target tokens (ppo) or its G
    samples (pathwise, reinforce); 0 for filler prompts. `count` is their sum."""
    v = valid.astype(jnp.float32)
    if s.estimator == "ppo":
        return s.group_size * target_mask.astype(jnp.float32).sum(-1) * v
    return s.group_size * v


def advantage_stats(advantages: jax.Array, valid: Optional[jax.Array] = None) -> dict:
    """Mean / std / max of the advantages of the real groups, and the share of positive
    ones among their noisy samples (k >= 1)."""
    v = jnp.broadcast_to(_valid_col(advantages, valid), advantages.shape)
    n = jnp.maximum(v.sum(), 1.0)
    mean = (advantages * v).sum() / n
    std = jnp.sqrt(((advantages - mean) ** 2 * v).sum() / n)
    vn = v[:, 1:]
    return {"adv_mean": mean, "adv_std": std,
            "adv_max": jnp.max(jnp.where(v > 0, advantages, -jnp.inf)),
            "adv_pos_frac": ((advantages[:, 1:] > 0) * vn).sum() / jnp.maximum(vn.sum(), 1.0)}
