"""Where metrics go: metrics.jsonl and TensorBoard (primary process only), behind one call."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import jax

from mtp_jax.errors import DivergenceError, naming


class MetricsWriter:
    """Appends one JSON line per logged step and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self._path = run_dir / "metrics.jsonl"
        self._jsonl = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666) if enabled else None
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, scalars: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        finite = {k: float(v) for k, v in scalars.items() if math.isfinite(float(v))}  # a skipped step's loss is NaN
        row = {"step": step, **{f"{prefix}/{k}": v for k, v in finite.items()}}
        self._append(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step":
                    self._tb.add_scalar(key, value, step)

    def _append(self, line: str) -> None:
        """A whole line or nothing: half a line (a full disk mid-write) would glue onto the resumed run's first line,
        and a run directory whose metrics.jsonl is not JSON lines is refused as someone else's."""
        data = line.encode()
        with naming(self._path):
            end = os.lseek(self._jsonl, 0, os.SEEK_END)
            try:
                while data:
                    data = data[os.write(self._jsonl, data):]
            except OSError:
                os.ftruncate(self._jsonl, end)
                raise

    def close(self) -> None:
        if self._jsonl is not None:
            os.close(self._jsonl)
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()


# What counts as divergence besides a non-finite step (docs/failures.md): a loss at or above the uniform
# distribution's after warm-up (optim.warmup_steps, and at least UNIFORM_AFTER steps: a fresh model starts near
# it), a loss above SPIKE_FACTOR x the mean of the previous SPIKE_WINDOW losses (once
# SPIKE_MIN of them are known), or a parameter norm above NORM_FACTOR x its value when this run started.
SPIKE_FACTOR, SPIKE_WINDOW, SPIKE_MIN = 4.0, 32, 8
UNIFORM_AFTER = 20
NORM_FACTOR = 100.0


class DivergenceGuard:
    """Counts the steps the jitted guard skipped (`step.keep_if_finite`) and watches the loss. Each step's flag and
    loss stay on the device until `check`, which the loop calls before a save or a log of that step, so the loop
    never waits on them and no checkpoint after the step where the divergence began is written."""

    def __init__(self, allowed: int, uniform_loss: float = math.inf, warmup_steps: int = 0, advised_lr: float = 0.0):
        """`advised_lr`: the optim.lr the stop line tells the user to rerun with."""
        self.allowed, self.skipped, self.first = allowed, 0, None
        self.uniform, self.warmup, self.lr = uniform_loss, warmup_steps, advised_lr
        self._flags: list[tuple[int, Any, Any]] = []
        self._recent: list[float] = []
        self._start_norm: float | None = None

    def add(self, step: int, skipped_flag: Any, loss: Any = None) -> None:
        self._flags.append((step, skipped_flag, loss))

    def check(self, upto: int, last_good: int | None) -> None:
        """Raises DivergenceError once more than `allowed` steps up to `upto` were skipped, or a loss diverged."""
        ready = [(s, f, l) for s, f, l in self._flags if s <= upto]
        self._flags = [(s, f, l) for s, f, l in self._flags if s > upto]
        values = jax.device_get([(f, l) for _, f, l in ready])
        for (step, _, _), (flag, loss) in zip(ready, values):
            if float(flag) > 0:
                self.skipped += 1
                self.first = step if self.first is None else self.first
            elif loss is not None:
                self._loss(step, float(loss), last_good)
        if self.skipped > self.allowed:
            self._stop(self.first, f"non-finite loss or gradient ({self.skipped} step(s) skipped, "
                                   f"train.max_skipped_steps={self.allowed})", last_good)

    def check_norm(self, step: int, norm: float, last_good: int | None) -> None:
        """The parameter norm before a save: the first call records the run's starting norm."""
        if self._start_norm is None:
            self._start_norm = norm
        elif norm > NORM_FACTOR * self._start_norm:
            self._stop(step, f"parameter norm {norm:.3g} is over {NORM_FACTOR:g}x its {self._start_norm:.3g} at the "
                             f"start", last_good)

    def _loss(self, step: int, loss: float, last_good: int | None) -> None:
        if step > max(self.warmup, UNIFORM_AFTER) and loss >= self.uniform:
            self._stop(step, f"loss {loss:.4g} is at or above the uniform distribution's {self.uniform:.4g} after "
                             f"warm-up", last_good)
        if len(self._recent) >= SPIKE_MIN and loss > SPIKE_FACTOR * (mean := sum(self._recent) / len(self._recent)):
            self._stop(step, f"loss {loss:.4g} is over {SPIKE_FACTOR:g}x its recent mean {mean:.4g}", last_good)
        self._recent = (self._recent + [loss])[-SPIKE_WINDOW:]

    def _stop(self, step: int | None, why: str, last_good: int | None) -> None:
        lower = f"optim.lr={self.lr:g}" if self.lr else "a lower optim.lr"
        if last_good is None:
            kept = f"no checkpoint was written; rerun with {lower} (or a larger optim.warmup_steps) to start afresh"
        else:
            kept = (f"the newest checkpoint, step {last_good}, is from before it; rerun with {lower} (or a larger "
                    f"optim.warmup_steps) to resume from there")
        raise DivergenceError(f"training diverged at step {step}: {why}; {kept}")
