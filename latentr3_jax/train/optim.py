"""Optimizers and learning-rate schedules for both stages."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import optax


def linear_warmup_decay(peak_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """0 -> peak over `warmup_steps`, then linearly down to 0 at `total_steps` (the HF
    Trainer's 'linear' schedule used by the SFT release)."""
    warmup_steps = max(int(warmup_steps), 0)
    total_steps = max(int(total_steps), warmup_steps + 1)
    warm = optax.linear_schedule(0.0, peak_lr, max(warmup_steps, 1))
    decay = optax.linear_schedule(peak_lr, 0.0, total_steps - warmup_steps)
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([warm, decay], [warmup_steps])


def cosine_warmup(peak_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warmup then cosine decay to 0 (the GRPO stage's schedule)."""
    warmup_steps = max(int(warmup_steps), 0)
    total_steps = max(int(total_steps), warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, total_steps, end_value=0.0)


def decay_mask(params) -> Any:
    """Weight decay on matrices only (no biases, norm scales)."""
    def keep(path, _):
        return path[-1].key not in ("bias", "scale")
    return jax.tree_util.tree_map_with_path(keep, params)


def latent_only(params) -> Any:
    """Trainable mask selecting params['latent'] (LR-GRPO trains only LatentRATT)."""
    return {k: jax.tree.map(lambda _: k == "latent", v) for k, v in params.items()}


def latent_lr_scales(scale: float) -> Callable[[Any], Any]:
    """params -> float tree: `scale` on params['latent'] (LatentRATT), 1 elsewhere."""
    def scales(params):
        return {k: jax.tree.map(lambda _: float(scale) if k == "latent" else 1.0, v)
                for k, v in params.items()}
    return scales


def scale_updates(scales: Callable[[Any], Any]) -> optax.GradientTransformation:
    """Multiply each leaf's update by a constant from `scales(updates)` (a float tree of the
    same structure): a per-group learning-rate multiplier after any optimizer."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        s = scales(updates)
        return jax.tree.map(lambda u, c: u if c == 1.0 else u * c, updates, s), state

    return optax.GradientTransformation(init, update)


def adamw(schedule: optax.Schedule, *, weight_decay: float = 0.0, grad_clip: float = 1.0,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          trainable: Optional[Callable[[Any], Any]] = None,
          lr_scales: Optional[Callable[[Any], Any]] = None) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW.

    `trainable(params) -> bool tree` freezes the False leaves: they get zero updates and no
    optimizer moments, and do not count in the clipping norm. `lr_scales(params) -> float
    tree` multiplies each leaf's learning rate (and so its decoupled weight decay).
    """
    parts = []
    if grad_clip and grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=decay_mask))
    if lr_scales is not None:
        parts.append(scale_updates(lr_scales))
    tx = optax.chain(*parts)
    if trainable is None:
        return tx

    def labels(params):
        return jax.tree.map(lambda t: "train" if t else "freeze", trainable(params))

    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
