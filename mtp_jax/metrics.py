"""Where metrics go: metrics.jsonl and TensorBoard (primary process only), behind one call."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax

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
        finite = {k: float(v) for k, v in scalars.items() if math.isfinite(float(v))}  # a skipped step's loss is NaN
        row = {"step": step, **{f"{prefix}/{k}": v for k, v in finite.items()}}
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


class DivergenceGuard:
    """Counts the steps the jitted guard skipped (`step.keep_if_finite`). Each step's flag stays on the device
    until `check`, which the loop calls before a save or a log of that step, so the loop never waits on it."""

    def __init__(self, allowed: int):
        self.allowed, self.skipped, self.first = allowed, 0, None
        self._flags: list[tuple[int, Any]] = []

    def add(self, step: int, skipped_flag: Any) -> None:
        self._flags.append((step, skipped_flag))

    def check(self, upto: int, last_good: int | None) -> None:
        """Raises DivergenceError once more than `allowed` steps up to `upto` were skipped."""
        ready = [(s, f) for s, f in self._flags if s <= upto]
        self._flags = [(s, f) for s, f in self._flags if s > upto]
        for step, flag in zip((s for s, _ in ready), jax.device_get([f for _, f in ready])):
            if float(flag) > 0:
                self.skipped += 1
                self.first = step if self.first is None else self.first
        if self.skipped > self.allowed:
            kept = f"the newest checkpoint, step {last_good}, is good" if last_good is not None else "no checkpoint was written"
            raise DivergenceError(
                f"training diverged at step {self.first}: non-finite loss or gradient ({self.skipped} step(s) skipped, "
                f"train.max_skipped_steps={self.allowed}); {kept}; lower optim.lr or raise optim.warmup_steps, "
                f"then rerun to resume"
            )
