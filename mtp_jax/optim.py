"""AdamW as in the paper: betas (0.9, 0.95), decoupled weight decay 0.1 (none on norm scales),
global-norm clipping 1.0, linear warmup then cosine decay to `final_lr_ratio` x peak."""

from __future__ import annotations

import jax
import optax

from mtp_jax.config import OptimConfig


def schedule(ocfg: OptimConfig, total_steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=ocfg.lr,
        warmup_steps=ocfg.warmup_steps,
        decay_steps=max(total_steps, ocfg.warmup_steps + 1),
        end_value=ocfg.lr * ocfg.final_lr_ratio,
    )


def decay_mask(axes_tree: dict) -> dict:
    """Weight decay on matrices only: a parameter whose logical axes include 'norm' is exempt."""
    return jax.tree.map(lambda axes: "norm" not in axes, axes_tree, is_leaf=lambda x: isinstance(x, tuple))


def make_optimizer(ocfg: OptimConfig, total_steps: int, axes_tree: dict) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(ocfg.clip_norm),
        optax.adamw(
            schedule(ocfg, total_steps),
            b1=ocfg.b1,
            b2=ocfg.b2,
            eps=ocfg.eps,
            weight_decay=ocfg.weight_decay,
            mask=decay_mask(axes_tree),
        ),
    )
