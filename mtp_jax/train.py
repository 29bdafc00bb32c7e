"""The training loop: data -> jitted step -> metrics, checkpoints, preemption, final evaluation.

Follow one step: `mtp-train` (cli.py) -> `train(cfg)` here -> `build(cfg)` (run.py: model,
optimizer, mesh, step functions) -> `StepFns.train_step` (step.py) -> `mtp_loss` (loss.py) ->
`MTP.trunk` / `MTP.head` (model/transformer.py) -> the head kinds (model/heads.py) and blocks
(model/layers.py, model/attention.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from mtp_jax import distributed, interrupts, lock, sharding
from mtp_jax.capacity import check_training_fits
from mtp_jax.checkpoint import Checkpointer, quiet_save_failures
from mtp_jax.config import Config, ConfigError
from mtp_jax.data import pipeline
from mtp_jax.data.build import CACHE_DIR, dataset_folder
from mtp_jax.data.tokenizer import build_tokenizer
from mtp_jax.errors import EXIT_USER, denied_error, full_disk_in
from mtp_jax.evals.heldout import heldout_report
from mtp_jax.flops import model_flops_per_token, peak_flops
from mtp_jax.hooks import pause_point
from mtp_jax.loss import loss_weights
from mtp_jax.metrics import DivergenceGuard, MetricsWriter
from mtp_jax.model import attention
from mtp_jax.model.transformer import compute_dtype
from mtp_jax.optim import schedule
from mtp_jax.run import (RUN_FILES, StartUp, build, check_resume, foreign_entries, read_config, read_tokenizer,
                         resolve_vocab, unwritable_entries, write_run_files)


SETTLE_S = 3.0  # below interrupts.GRACE_S, after which the process is forced out


def log(message: str) -> None:
    if distributed.is_primary():
        print(message, file=sys.stderr, flush=True)


class Preemption:
    """Turns SIGTERM into a flag that every process agrees on before the coordinated final save."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        interrupts.STARTING.clear()  # from here SIGTERM saves a step instead of ending the start

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
    """The primary process builds (or trains) the tokenizer; the others wait for it, then load what it saved."""
    primary, several = distributed.is_primary(), jax.process_count() > 1
    if several and not primary:
        multihost_utils.sync_global_devices("tokenizer")
    tokenizer = build_tokenizer(cfg.data, run_dir)
    if several and primary:
        multihost_utils.sync_global_devices("tokenizer")
    return tokenizer


def _global_batch(local: dict[str, np.ndarray], batch_sharding: Any) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in local.items()}


@contextlib.contextmanager
def _unreadable_data() -> Iterator[None]:
    """A data file we may not read is a user error (the run directory itself was checked writable)."""
    try:
        yield
    except PermissionError as err:
        raise ConfigError(f"cannot read {err.filename} (permission denied); fix its permissions or data.path") from None


_TENSORSTORE_READ = re.compile(r'^[A-Z_]+: Error reading .*? in local file "([^"]+)": (.*)$')


def _damaged_data(error: ValueError, data_path: str) -> ConfigError | None:
    """A truncated or corrupt shard of prepared data (TensorStore cannot read it) is the user's to replace."""
    found = _TENSORSTORE_READ.match(str(error).splitlines()[0] if str(error) else "")
    if not found or not data_path or "://" in data_path:
        return None
    file = Path(found.group(1)).resolve()
    if not file.is_relative_to(Path(data_path).resolve()):
        return None
    reason = found.group(2).split(": ")[-1]
    return ConfigError(f"cannot read {file} in data.path={data_path}: it is damaged ({reason}); prepare the data "
                       f"again (mtp-prepare) or restore that file from a backup")


def _open_run(cfg: Config, run_dir: Path, ckpt: Checkpointer, startup: StartUp) -> tuple[Config, Any, float | None]:
    """Validates everything that can be checked against RUN_DIR before writing to it; returns the config
    (vocab resolved), the tokenizer and the checkpoint's optim.lr (None if not resuming). A resume needs its
    tokenizer/; a run with no checkpoint starts afresh."""
    primary = distributed.is_primary()
    denied = unwritable_entries(run_dir) if primary else []
    if denied:
        raise denied_error(run_dir, ", ".join(denied), left=" (nothing there was changed)")
    resuming = ckpt.latest_step() is not None
    if resuming and not (run_dir / "tokenizer").is_dir():
        raise ConfigError(f"{run_dir} has checkpoints but no tokenizer/ folder; restore it from a backup (a new "
                          f"tokenizer would not match the checkpoint's embeddings) or use a new train.run_dir")
    if resuming:
        read_tokenizer(run_dir / "tokenizer")  # damaged: one line now, not a traceback from the tokenizers library
    saved = read_config(run_dir) if resuming and (run_dir / "config.yaml").is_file() else None
    # Converted weights (a params-only checkpoint) hold no data position: fine-tuning them may bring new data.
    converted = resuming and ckpt.params_only()
    if saved is not None:
        check_resume(saved, dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=saved.model.vocab_size)),
                     allow_data_change=converted)
    if not resuming and primary:
        foreign = foreign_entries(run_dir)
        if foreign:
            raise ConfigError(f"train.run_dir={run_dir} holds {', '.join(foreign)}, which mtp-train did not write; "
                              f"choose a new or empty train.run_dir (nothing there was changed)")
        gone = startup.set_aside(list(RUN_FILES))
        if gone:
            log(f"note: {run_dir} holds {', '.join(gone)} of a run that saved no checkpoint; starting afresh")
    with _unreadable_data():
        tokenizer = _tokenizer(cfg, run_dir)
    cfg = resolve_vocab(cfg, tokenizer.vocab_size)
    if saved is not None:
        changed = check_resume(saved, cfg, allow_data_change=converted)
        if changed:
            log(f"warning: resuming with changed settings: {'; '.join(changed)}")
    if cfg.optim.warmup_steps > cfg.train.steps:
        log(f"warning: optim.warmup_steps={cfg.optim.warmup_steps} is longer than train.steps={cfg.train.steps}: "
            f"the learning rate never reaches optim.lr")
    return cfg, tokenizer, None if saved is None else saved.optim.lr


def train(cfg: Config) -> dict:
    """Trains (resuming if RUN_DIR has a checkpoint) and returns the final held-out evaluation."""
    distributed.initialize(cfg.distributed)
    # The platform is known only now: an attention it cannot run is refused before RUN_DIR is written.
    attention.resolve(cfg.model.attention, cfg.train.seq_len, compute_dtype(cfg.model.dtype))
    check_training_fits(cfg)  # before anything is allocated or written
    run_dir = Path(cfg.train.run_dir)
    primary = distributed.is_primary()
    startup = StartUp(run_dir)
    lock.prepare_run_dir(run_dir)
    if primary:
        lock.acquire(run_dir)
        startup.begin()  # under the lock: what is here now is this start's to keep or undo
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("run_dir")
    tcfg = cfg.train
    ckpt = Checkpointer(run_dir / "checkpoints", tcfg.keep_checkpoints, tcfg.checkpoint_every, tcfg.async_checkpoint)
    try:
        pause_point("startup")
        with quiet_save_failures():
            result = _train(cfg, run_dir, ckpt, startup)
            ckpt.close()  # the last async save's failure (full disk) surfaces here, inside the handlers below
            return result
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM before the first step (interrupts.Terminated)
        pause_point("interrupted")
        if primary:
            startup.undo()  # before the first step: as if never started
        ckpt.settle(SETTLE_S)  # Ctrl-C starts no save; one in flight commits within SETTLE_S or is abandoned
        interrupts.exit_for(stop)
    except ConfigError as err:
        if ckpt.failed:  # a full disk mid-save: Orbax's failed threads must not be waited on or torn down
            interrupts.exit_now(str(err), EXIT_USER)
        raise
    except ValueError as err:  # not a UserError (handled above): TensorStore's read errors are ValueErrors
        damaged = _damaged_data(err, cfg.data.path)
        if damaged is None:
            raise  # a full disk (errors.guarded says it in one line naming the file), or a bug
        raise damaged from None
    finally:
        if primary:
            startup.undo()  # a start that failed before its first step leaves RUN_DIR as it was (no-op after)
        ckpt.wait()
        ckpt.close()


def _train(cfg: Config, run_dir: Path, ckpt: Checkpointer, startup: StartUp) -> dict:
    primary = distributed.is_primary()
    cfg, tokenizer, saved_lr = _open_run(cfg, run_dir, ckpt, startup)
    built = build(cfg)
    fns, tcfg = built.fns, cfg.train
    pidx, pcount = jax.process_index(), jax.process_count()
    if ckpt.params_only():  # a converted checkpoint: fine-tune its weights with a fresh optimizer
        weights = ckpt.restore({"params": fns.abstract_state["params"]}, partial=True)[1]["params"]
        restored = (0, {**fns.init(jax.random.key(tcfg.seed)), "params": weights}, None)
        log(f"fine-tuning the parameters in {run_dir / 'checkpoints'} with a fresh optimizer")
    else:
        restored = ckpt.restore(fns.abstract_state)  # checks the checkpoint's shapes against this model
    with _unreadable_data(), full_disk_in(run_dir / CACHE_DIR, "the data cache"):
        data_dir = dataset_folder(cfg, tokenizer, run_dir)  # the one store every batch and evaluation reads
        data_iter = pipeline.make_train_iterator(cfg, tokenizer, data_dir, pidx, pcount)
    if primary:
        write_run_files(run_dir, cfg)
    replicated = sharding.unsharded_fraction(fns.state_shardings["params"], built.mtp.abstract_params())
    if jax.device_count() > 1 and replicated > 0.5:  # MaxText's guard against forgotten sharding rules
        log(f"warning: {replicated:.0%} of parameter bytes are replicated on every device; check mesh.rules")
    log(f"mesh {dict(fns.mesh.shape)} over {jax.device_count()} devices, {jax.process_count()} process(es); "
        f"trunk {cfg.model.trunk_layers} blocks + {cfg.model.mtp_heads} {cfg.model.head_type} heads, "
        f"{sum(x.size for x in jax.tree.leaves(built.mtp.abstract_params())) / 1e6:.2f}M parameters")
    if restored is None:
        state, start = fns.init(jax.random.key(tcfg.seed)), 0
    else:
        start, state, data_state = restored
        if data_state is not None:
            data_iter.set_state(data_state)
            log(f"resumed from step {start} in {run_dir / 'checkpoints'}")

    writer = MetricsWriter(run_dir, primary, tcfg.tensorboard)
    if primary:
        startup.commit()
    guard = _divergence_guard(cfg, saved_lr)
    guard.check_norm(start, float(fns.param_norm(state["params"])), ckpt.latest_step())
    lr = schedule(cfg.optim, tcfg.steps)
    tokens_per_step = tcfg.batch_size * tcfg.seq_len
    flops_per_step = model_flops_per_token(cfg.model, tcfg.seq_len) * tokens_per_step
    peak = tcfg.peak_flops or (peak_flops(jax.devices()[0]) or 0.0) * jax.device_count()
    preemption = Preemption()
    bar = _progress(tcfg.steps, start, primary and tcfg.progress)
    pending: tuple[int, Any] | None = None
    window_start, window_steps = time.perf_counter(), 0
    step = start

    def save(force: bool = False) -> None:
        """No checkpoint holding a diverged state: the skipped-step count is checked first (a host sync the save needs anyway)."""
        if force or ckpt.should_save(step):
            guard.check(step, ckpt.latest_step())
            guard.check_norm(step, float(fns.param_norm(state["params"])), ckpt.latest_step())
            ckpt.save(step, state, data_iter.get_state(), force=force)

    def flush() -> None:
        """Writes the pending step's metrics line once its divergence flags are checked."""
        nonlocal pending
        if pending is not None:
            guard.check(pending[0], ckpt.latest_step())
            _report(pending, writer, bar)
            pending = None

    try:
        while step < tcfg.steps:
            batch = _global_batch(next(data_iter), fns.batch_sharding)
            state, metrics = fns.train_step(state, batch)
            step += 1
            window_steps += 1
            guard.add(step, metrics["skipped"], metrics["loss"])
            stopping = preemption.agreed(sync_now=step % tcfg.log_every == 0)
            if step == start + 1:  # keep compilation out of the throughput figures
                jax.block_until_ready(metrics)
                window_start, window_steps = time.perf_counter(), 0
            flush()  # the previous step's, only after dispatching this one: the device never waits on Python
            if step % tcfg.log_every == 0 or step == tcfg.steps or stopping:  # the SIGTERM step's line too
                extra = {"lr": float(lr(step - 1))}
                if window_steps:  # throughput of the steps since the last log (none right after compiling)
                    elapsed = time.perf_counter() - window_start
                    extra["tokens_per_s"] = tokens_per_step * window_steps / elapsed
                    extra["flops_per_s"] = flops_per_step * window_steps / elapsed
                    if peak:
                        extra["mfu"] = extra["flops_per_s"] / peak
                pending = (step, (metrics, extra))
                window_start, window_steps = time.perf_counter(), 0
            save()
            pause_point("step", step)
            if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps and not stopping:
                guard.check(step, ckpt.latest_step())
                _evaluate(cfg, fns, state, tokenizer, data_dir, run_dir, final=False)
                _task_eval(cfg, built.mtp, state, tokenizer, run_dir, step)
            if stopping:
                log(f"SIGTERM: saving step {step} and exiting")
                flush()
                save(force=True)
                ckpt.wait()
                return {"preempted_at": step}
        flush()
        save(force=True)
        ckpt.wait()  # a failed last save (full disk) stops here: eval.json never names a step that was not saved
        result = _evaluate(cfg, fns, state, tokenizer, data_dir, run_dir, final=True)
        writer.write(step, {"loss": result["loss"], **{f"loss/head_{h['head']}": h["loss"] for h in result["heads"]}},
                     prefix="eval")
        _task_eval(cfg, built.mtp, state, tokenizer, run_dir, step)
        return result
    finally:
        preemption.restore()
        if bar is not None:
            bar.close()
        writer.close()


def _divergence_guard(cfg: Config, saved_lr: float | None) -> DivergenceGuard:
    """The loss thresholds of this model, and the learning rate to advise: a tenth of this one, or the resumed
    checkpoint's own if lower (a run that diverged right after raising optim.lr recovers at the old one)."""
    uniform = float(np.sum(loss_weights(cfg.model.mtp_heads, cfg.train.loss_weights))) * math.log(cfg.model.vocab_size)
    advised = min(cfg.optim.lr / 10, saved_lr if saved_lr is not None else math.inf)
    return DivergenceGuard(cfg.train.max_skipped_steps, uniform, cfg.optim.warmup_steps, advised)


def _report(pending: tuple[int, Any], writer: MetricsWriter, bar: Any) -> None:
    step, (metrics, extra) = pending
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()} | extra
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
    from mtp_jax.evals.tasks import TASKS, evaluate_task

    if cfg.data.source in TASKS and jax.process_count() == 1:
        record = evaluate_task(cfg.data.source, cfg, mtp, state["params"], tokenizer, run_dir, step)
        log(f"{cfg.data.source} at step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in record["metrics"].items()
                                                              if "/m_" not in k))


def _evaluate(cfg: Config, fns: Any, state: dict, tokenizer: Any, data_dir: Path, run_dir: Path, final: bool) -> dict:
    """Held-out evaluation of the store in `data_dir` into evals/heldout/step_N.json (every train.eval_every
    steps, and at the end)."""
    place = lambda b: _global_batch(b, fns.batch_sharding)
    process = (jax.process_index(), jax.process_count())
    step = int(jax.device_get(state["step"]))
    result = heldout_report(cfg, fns.eval_step, state["params"], tokenizer, data_dir, run_dir, step, final, place,
                            process)
    if final and process == (0, 1):  # a sample under the table; one process holds every parameter
        from mtp_jax.decode.prompts import print_sample_completion

        print_sample_completion(cfg, tokenizer, data_dir, jax.device_get(state["params"]))
    return result
