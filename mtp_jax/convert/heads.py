"""NTP <-> MTP: a run's parameters with fewer or more heads, the trunk unchanged.

Dropping heads (`--keep 1`) is the paper's best CodeContests recipe: pretrain with n = 4, then
fine-tune the next-token model (trunk + head 1) with n' = 1. Adding heads to a trained model
(`--add-heads N`) starts each new head as a copy of the last one (for an n = 1 model, its last
block), as Hugging Face imports do. Head blocks are not trunk blocks, so `model.n_layers` (the
total depth) changes by the number of heads dropped or added.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mtp_jax.config import Config
from mtp_jax.errors import UserError
from mtp_jax.model.head_kinds import head_kind


def new_head_count(n: int, keep: int | None, add: int | None) -> int:
    if (keep is None) == (add is None):
        raise UserError("give exactly one of --keep K (heads 1..K stay) or --add-heads N (N copies of the last head)")
    if keep is not None and not 1 <= keep <= n:
        raise UserError(f"--keep={keep} must be between 1 and the run's {n} heads")
    if add is not None and add < 1:
        raise UserError(f"--add-heads={add} must be >= 1")
    return keep if keep is not None else n + add


def resize_heads(heads: dict, n_new: int) -> dict:
    """Heads 1..n_new of the stacked head parameters, the last head repeated where n_new > n."""

    def resize(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        extra = np.repeat(x[-1:], max(n_new - x.shape[0], 0), axis=0)
        return np.concatenate([x[:n_new], extra], axis=0)

    return {k: resize_heads(v, n_new) if isinstance(v, dict) else resize(v) for k, v in heads.items()}


def resized_config(cfg: Config, n_new: int, run_dir: str) -> tuple[Config, list[str]]:
    """The run's config for n_new heads in `run_dir` (trunk depth kept), and notes on what changed."""
    m, t = cfg.model, cfg.train
    n_layers = m.trunk_layers + n_new if head_kind(m.head_type).block else m.n_layers
    notes = []
    weights = t.loss_weights
    if weights and len(weights) != n_new:
        notes.append(f"train.loss_weights {weights} dropped (one per head was given for {m.mtp_heads} heads)")
        weights = []
    seq_len = t.seq_len
    if seq_len < 2 * n_new:
        raise UserError(f"train.seq_len={seq_len} is too short for {n_new} heads; "
                        f"fine-tune with seq_len >= {2 * n_new}")
    model = dataclasses.replace(m, mtp_heads=n_new, n_layers=n_layers)
    train = dataclasses.replace(t, run_dir=run_dir, loss_weights=weights)
    return dataclasses.replace(cfg, model=model, train=train), notes
