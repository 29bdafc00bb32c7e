"""Per-head loss weights as a function of the training step: weight schedules and n-curricula.

w_i(s) = base_i * schedule_i(s) * active_i(s), for head i = 1..n at step s (0-based: the step
being taken), base_i = `train.loss_weights` (default 1):
- `train.loss_schedule=constant`: schedule_i = 1 (the paper's unweighted sum);
- `linear`: schedule_i = 1 - (i - 1) / n, decaying across heads (head 1: 1, head n: 1/n);
- `deepseek`: DeepSeek-V3's (lambda / D) sum_k L^k beside the next-token loss: head 1 gets 1,
  heads 2..n lambda / (n - 1), lambda = `loss_lambda_start` (0.3) before `loss_lambda_step` and
  `loss_lambda_end` (0.1) from it on (`loss_lambda_step=0`: never switch);
- `train.n_curriculum=forward`: heads 1..a(s) train, a(s) = min(n, 1 + s // curriculum_every)
  (start as a next-token model, add one head every `curriculum_every` steps); `reverse`: a(s) =
  max(1, n - s // curriculum_every) (start with all n heads, end as a next-token model).
Heads outside the curriculum keep their parameters (so checkpoints hold all n heads throughout)
and get weight 0: they still run forward and backward, and weight decay still shrinks them.

The weights are computed from the traced step inside the jitted train step (no retrace when
they change); `weights_at` is also callable eagerly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtp_jax.config import TrainConfig
from mtp_jax.loss import loss_weights


class LossSchedule:
    def __init__(self, n: int, tcfg: TrainConfig):
        self.n, self.t = n, tcfg
        self.base_N = loss_weights(n, tcfg.loss_weights)

    def _schedule(self, step: jax.Array) -> jax.Array:
        n, t = self.n, self.t
        head_N = jnp.arange(1, n + 1, dtype=jnp.float32)
        if t.loss_schedule == "linear":
            return 1.0 - (head_N - 1.0) / n
        if t.loss_schedule == "deepseek":
            switched = (t.loss_lambda_step > 0) & (step >= t.loss_lambda_step)
            lam = jnp.where(switched, t.loss_lambda_end, t.loss_lambda_start)
            return jnp.where(head_N == 1, 1.0, lam / max(n - 1, 1))
        return jnp.ones((n,), jnp.float32)

    def _active(self, step: jax.Array) -> jax.Array:
        n, t = self.n, self.t
        stage = step // t.curriculum_every
        if t.n_curriculum == "forward":
            count = jnp.minimum(n, 1 + stage)
        elif t.n_curriculum == "reverse":
            count = jnp.maximum(1, n - stage)
        else:
            count = n
        return (jnp.arange(n) < count).astype(jnp.float32)

    def weights_at(self, step: jax.Array | int) -> jax.Array:
        """(n,) float32 loss weights of the train step taken at `step` (0-based)."""
        step = jnp.asarray(step, jnp.int32)
        return self.base_N * self._schedule(step) * self._active(step)
