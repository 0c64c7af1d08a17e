"""LR-GRPO (SPEC.md section 6), by concept: the objective (loss), latent rollouts
(rollout), the jitted step (step) and the training stage (train)."""

from latentr3_jax.train.grpo.loss import ADVANTAGES, ESTIMATORS, GRPOSettings
from latentr3_jax.train.grpo.rollout import ROLLOUT_SALT, make_rollout_fn
from latentr3_jax.train.grpo.step import GRPOStep, make_fused_loss, make_grpo_loss
from latentr3_jax.train.grpo.train import train_grpo

__all__ = ["ADVANTAGES", "ESTIMATORS", "GRPOSettings", "GRPOStep", "ROLLOUT_SALT",
           "make_fused_loss", "make_grpo_loss", "make_rollout_fn", "train_grpo"]
