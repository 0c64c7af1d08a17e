"""LR-GRPO (SPEC.md section 6), by concept: the objective (loss), latent rollouts
(rollout), the jitted step (step) and the training stage (train)."""

from latentr3_jax.train.grpo.loss import ADVANTAGES, ESTIMATORS, SIGMA_SCHEDULES, GRPOSettings
from latentr3_jax.train.grpo.rollout import ROLLOUT_SALT, make_rollout_fn
from latentr3_jax.train.grpo.step import (GRPOStep, make_fused_loss, make_grpo_loss,
                                          make_pathwise_probe)
from latentr3_jax.train.grpo.train import train_grpo

__all__ = ["ADVANTAGES", "ESTIMATORS", "SIGMA_SCHEDULES", "GRPOSettings", "GRPOStep",
           "ROLLOUT_SALT", "make_fused_loss", "make_grpo_loss", "make_pathwise_probe",
           "make_rollout_fn", "train_grpo"]
