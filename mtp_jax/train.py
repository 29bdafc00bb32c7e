"""The training loop: data -> jitted step -> metrics, checkpoints, preemption, final evaluation.

Follow one step: `mtp-train` (cli.py) -> `train(cfg)` here -> `StepFns.train_step` (step.py)
-> `mtp_loss` (loss.py) -> `MTP.trunk` / `MTP.head` (model/transformer.py).
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from mtp_jax import distributed, sharding
from mtp_jax.checkpoint import Checkpointer
from mtp_jax.config import Config
from mtp_jax.data import pipeline
from mtp_jax.evals.heldout import heldout_report
from mtp_jax.flops import model_flops_per_token, peak_flops
from mtp_jax.metrics import MetricsWriter, check_finite
from mtp_jax.optim import schedule
from mtp_jax.run import build, resolve_vocab, write_run_files


def log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


class Preemption:
    """Turns SIGTERM into a flag that every process agrees on before the coordinated final save."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self, sync_now: bool) -> bool:
        """Single process: every step. Several: only at `sync_now` steps, since agreeing costs a host sync."""
        if jax.process_count() == 1:
            return self.requested
        return sync_now and bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _tokenizer(cfg: Config, run_dir: Path):
    """The primary process builds (or trains) the tokenizer; the others load what it saved."""
    if jax.process_index() == 0:
        tokenizer = pipeline.build_tokenizer(cfg.data, run_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("tokenizer")
    if jax.process_index() != 0:
        tokenizer = pipeline.build_tokenizer(cfg.data, run_dir)
    return tokenizer


def _global_batch(local: dict[str, np.ndarray], batch_sharding: Any) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}


def train(cfg: Config) -> dict:
    """Trains (resuming if RUN_DIR has a checkpoint) and returns the final held-out evaluation."""
    distributed.initialize(cfg.distributed)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    primary = jax.process_index() == 0
    tokenizer = _tokenizer(cfg, run_dir)
    cfg = resolve_vocab(cfg, tokenizer.vocab_size)
    built = build(cfg)
    fns, tcfg = built.fns, cfg.train
    if primary:
        write_run_files(run_dir, cfg)
    replicated = sharding.unsharded_fraction(fns.state_shardings["params"], built.mtp.abstract_params())
    if jax.device_count() > 1 and replicated > 0.5:  # MaxText's guard against forgotten sharding rules
        log(f"warning: {replicated:.0%} of parameter bytes are replicated on every device; check mesh.rules")
    log(f"mesh {dict(fns.mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} process(es); "
        f"trunk {cfg.model.trunk_layers} blocks + {cfg.model.mtp_heads} {cfg.model.head_type} heads, "
        f"{sum(x.size for x in jax.tree.leaves(built.mtp.abstract_params())) / 1e6:.2f}M parameters")

    ckpt = Checkpointer(run_dir / "checkpoints", tcfg.keep_checkpoints, tcfg.checkpoint_every, tcfg.async_checkpoint)
    pidx, pcount = jax.process_index(), jax.process_count()
    data_iter = pipeline.make_train_iterator(cfg, tokenizer, run_dir, pidx, pcount)
    restored = ckpt.restore(fns.abstract_state)
    if restored is None:
        state, start = fns.init(jax.random.key(tcfg.seed)), 0
    else:
        start, state, data_state = restored
        data_iter.set_state(data_state)
        log(f"resumed from step {start} in {run_dir / 'checkpoints'}")

    writer = MetricsWriter(run_dir, primary, tcfg.tensorboard)
    lr = schedule(cfg.optim, tcfg.steps)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    flops_per_step = model_flops_per_token(cfg.model, tcfg.seq_len) * tokens_per_step
    peak = tcfg.peak_flops or (peak_flops(jax.devices()[0]) or 0.0) * jax.device_count()
    preemption = Preemption()
    bar = _progress(tcfg.steps, start, primary and tcfg.progress)
    pending: tuple[int, Any] | None = None
    window_start, window_steps = time.perf_counter(), 0
    step = start
    try:
        while step < tcfg.steps:
            batch = _global_batch(next(data_iter), fns.batch_sharding)
            state, metrics = fns.train_step(state, batch)
            step += 1
            window_steps += 1
            if step == start + 1:  # keep compilation out of the throughput figures
                jax.block_until_ready(metrics)
                window_start, window_steps = time.perf_counter(), 0
            # Pull the previous step's metrics only after dispatching this one: the device never waits on Python.
            if pending is not None:
                _report(pending, writer, bar)
                pending = None
            if step % tcfg.log_every == 0 or step == tcfg.steps:
                extra = {"lr": float(lr(step - 1))}
                if window_steps:  # throughput of the steps since the last log (none right after compiling)
                    elapsed = time.perf_counter() - window_start
                    extra["tokens_per_s"] = tokens_per_step * window_steps / elapsed
                    extra["flops_per_s"] = flops_per_step * window_steps / elapsed
                    if peak:
                        extra["mfu"] = extra["flops_per_s"] / peak
                pending = (step, (metrics, extra))
                window_start, window_steps = time.perf_counter(), 0
            ckpt.save(step, state, data_iter.get_state())
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps:
                _task_eval(cfg, built.mtp, state, tokenizer, run_dir, step)
            if preemption.agreed(sync_now=step % tcfg.log_every == 0):
                log(f"SIGTERM: saving step {step} and exiting")
                ckpt.save(step, state, data_iter.get_state(), force=True)
                ckpt.wait()
                return {"preempted_at": step}
        if pending is not None:
            _report(pending, writer, bar)
        ckpt.save(step, state, data_iter.get_state(), force=True)
        result = _final_eval(cfg, fns, state, tokenizer, run_dir)
        writer.write(step, {"loss": result["loss"], **{f"loss/head_{h['head']}": h["loss"] for h in result["heads"]}},
                     prefix="eval")
        _task_eval(cfg, built.mtp, state, tokenizer, run_dir, step)
        return result
    finally:
        preemption.restore()
        if bar is not None:
            bar.close()
        ckpt.wait()
        ckpt.close()
        writer.close()


def _report(pending: tuple[int, Any], writer: MetricsWriter, bar: Any) -> None:
    step, (metrics, extra) = pending
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()} | extra
    check_finite(step, scalars)
    writer.write(step, scalars)
    if bar is not None:
        bar.n = step
        bar.set_postfix(loss=f"{scalars['loss']:.3f}", tok_s=f"{scalars.get('tokens_per_s', 0):.0f}", refresh=False)
        bar.refresh()


def _progress(total: int, start: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)


def _task_eval(cfg: Config, mtp: Any, state: dict, tokenizer: Any, run_dir: Path, step: int) -> None:
    """The task metric of a generated task source (induction, polynomial), single process only."""
    from mtp_jax.tasks.evaluate import TASKS, evaluate_task

    if cfg.data.source in TASKS and jax.process_count() == 1:
        record = evaluate_task(cfg.data.source, cfg, mtp, state["params"], tokenizer, run_dir, step)
        log(f"{cfg.data.source} at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items()
                                                              if "/m_" not in k))


def _final_eval(cfg: Config, fns: Any, state: dict, tokenizer: Any, run_dir: Path) -> dict:
    place = lambda b: _global_batch(b, fns.batch_sharding)
    process = (jax.process_index(), jax.process_count())
    step = int(jax.device_get(state["step"]))
    return heldout_report(cfg, fns.eval_step, state["params"], tokenizer, run_dir, step, True, place, process)
