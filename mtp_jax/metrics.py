"""Where metrics go: metrics.jsonl and TensorBoard (primary process only), behind one call."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mtp_jax.errors import DivergenceError


class MetricsWriter:
    """Appends one JSON line per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self._jsonl = open(run_dir / "metrics.jsonl", "a") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, scalars: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, **{f"{prefix}/{k}": float(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step":
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def check_finite(step: int, scalars: dict[str, float]) -> None:
    """Stops a diverged run loudly rather than training on NaNs for a month."""
    bad = {k: v for k, v in scalars.items() if not math.isfinite(v)}
    if bad:
        raise DivergenceError(
            f"non-finite metrics at step {step}: {bad}; lower optim.lr or raise optim.warmup_steps, "
            f"then resume from the last checkpoint"
        )
