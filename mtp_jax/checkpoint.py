"""Orbax checkpoints of the train state plus the data-iterator state, safe against crashes mid-save.

Layout: DIR/<step>/{state,data}/. Orbax writes DIR/<step>.orbax-checkpoint-tmp-<n>/ and renames it
to DIR/<step>/ only once every file is written (on GCS: a `commit_success.txt` marks it instead),
so a save killed midway leaves a temporary directory that Orbax never lists (the next trainer deletes
it before its first save; nothing is deleted while a writer may still be running). A committed step
whose files were damaged later is only found when reading it fails: restore then falls back to
the next older step and moves the broken one to DIR/<step>.unreadable-<time>/ (never deleted);
read-only users (mtp-eval, mtp-generate) fall back the same way but move nothing, and when a live
trainer rotated out every step they listed while they read, they read the newest step committed since.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from mtp_jax import distributed
from mtp_jax.config import ConfigError
from mtp_jax.errors import denied_error, full_disk_errno, full_disk_error
from mtp_jax.hooks import pause_point


# Rounds a read-only reader (mtp-eval, mtp-generate) makes when every step it listed was rotated out while it read
# them (a live trainer with train.keep_checkpoints=1 saving every step): each round reads the newest step committed.
LIVE_READS = 5


def _warn(message: str) -> None:
    if distributed.is_primary():
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _reason(error: BaseException) -> str:
    """The innermost cause's first line: Orbax wraps TensorStore errors in pages of spec dumps."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = (str(error).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
    return f"{type(error).__name__}: {text[:400]}"


@contextlib.contextmanager
def _no_aborted_read_dumps() -> Iterator[None]:
    """When one array read fails, Orbax 0.12.8 aborts the others and each prints 'Exception ignored in
    <coroutine _read_array_index_and_device_put>' with a page of TensorStore spec; our warning says it in a line."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: None if "_read_array_index_and_device_put" in repr(u.object) else previous(u)
    try:
        yield
    finally:
        gc.collect()  # finalize the aborted reads while the filter is on
        sys.unraisablehook = previous


class _DropOrbaxErrorLogs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


def _aborted_write(kind: type[BaseException] | None, value: BaseException | None) -> bool:
    return kind is RuntimeError and str(value) == "Event loop is closed"


@contextlib.contextmanager
def quiet_save_failures() -> Iterator[None]:
    """A failed save reaches the main thread as an exception (the trainer reports it in one line; a bug keeps its
    traceback), but Orbax also logs it from every thread (a page each) and TensorStore's callbacks into the closed
    event loop of the aborted writes print 'Event loop is closed' tracebacks: both are dropped while this is active."""
    drop, absl_logger, previous = _DropOrbaxErrorLogs(), logging.getLogger("absl"), sys.unraisablehook
    absl_logger.addFilter(drop)
    sys.unraisablehook = lambda u: None if _aborted_write(u.exc_type, u.exc_value) else previous(u)
    try:
        yield
    finally:
        sys.unraisablehook = previous
        absl_logger.removeFilter(drop)


def _failed_processes(ok: bool) -> list[int]:
    """Processes read different shards, so one may fail where the others succeed: all must agree."""
    if jax.process_count() == 1:
        return [] if ok else [0]
    return [i for i, fine in enumerate(multihost_utils.process_allgather(np.asarray(ok))) if not fine]


def _shapes(tree: Any) -> dict[str, tuple]:
    """Leaf path -> shape; namedtuple fields and dict keys compare equal (Orbax stores both as dicts)."""
    name = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(map(name, path)): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def _first_difference(saved: Any, target: Any, partial: bool = False) -> str | None:
    """Checked before reading, so a different model config is a clear error rather than Orbax's.
    `partial` reads a subtree (the parameters without the optimizer state): extra saved leaves are fine."""
    saved, target = _shapes(saved), _shapes(target)
    for key in sorted(saved.keys() | target.keys()):
        if key not in target:
            if partial:
                continue
            return f"{key} is in the checkpoint but not in the model"
        if key not in saved:
            return f"{key} is in the model but not in the checkpoint"
        if saved[key] != target[key]:
            return f"{key} has shape {saved[key]} in the checkpoint, {target[key]} in the model"
    return None


class Checkpointer:
    """Saves every `save_every` steps (or when forced), keeps the newest `keep`, restores the newest readable."""

    def __init__(self, directory: str | Path, keep: int, save_every: int, async_save: bool = True,
                 read_only: bool = False):
        """`read_only` (mtp-eval, mtp-generate): never create, rename or delete anything in `directory`."""
        local = "://" not in str(directory)  # Orbax needs absolute paths; train.run_dir is often relative
        self.directory = epath.Path(Path(directory).absolute() if local else directory)
        policy = policies.AnySavePolicy(  # no Orbax "initial save": step 1 is not a save step
            [policies.FixedIntervalPolicy(save_every), policies.PreemptionCheckpointingPolicy()]
        )
        # Orbax deletes old steps only when saving, which read-only users never do; the folder is created by the
        # first save, so a refused start leaves none. The writer thread pauses
        # at "save_commit" (tests only) after writing everything and before the rename that commits the step.
        commit_hook = ocp.AsyncOptions(post_finalization_callback=lambda: pause_point("save_commit", self._saving))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, save_decision_policy=policy, create=False,
            async_options=commit_hook if async_save else None,
        )
        self._saving: int | None = None
        self.read_only = read_only
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
        self._swept = False
        self._failed = False  # a save failed: Orbax re-raises it on every later wait, so we stop waiting
        self._closed = False

    def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
        """True if a save started. A step already saved is skipped (the final forced save after a periodic one)."""
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            return False
        self._check_writable(step)
        if not self._swept:
            if distributed.is_primary():
                self.directory.mkdir(parents=True, exist_ok=True)
            self._remove_unfinished()
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        pause_point("save_begin", step)
        with self._writing(step):  # also where an async save's earlier failure surfaces
            self._manager.wait_until_finished()  # Orbax waits for the previous save anyway; its commit hook reads _saving
            self._saving = step
            started = self._manager.save(step, args=args, force=force)
        if started:
            pause_point("save", step)
        return started

    def _check_writable(self, step: int) -> None:
        """A folder this process may not write is refused before a save starts: Orbax's writer would wait minutes
        for the step folder it failed to create, then fail with pages of tracebacks."""
        folder = str(self.directory)
        if "://" not in folder and os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
            newest = self.latest_step()
            kept = f"; the newest checkpoint is step {newest}" if newest is not None else "; no checkpoint yet"
            raise denied_error(folder, f"checkpoint step {step}", left=kept)

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` would write: the loop checks for divergence first on exactly these steps."""
        latest = self._manager.latest_step()
        return (latest is None or step > latest) and self._manager.should_save(step)

    def settle(self, timeout_s: float) -> None:
        """After Ctrl-C: lets an in-flight async save commit for up to `timeout_s`, and deletes nothing. Orbax's
        wait can return before its rename, so a delete here raced the writer (a half-deleted step was committed).
        Process exit stops a writer still running; its temporary folder is never read, and the next trainer
        deletes it before its first save, when no writer can be running."""
        def wait() -> None:
            with contextlib.suppress(Exception):  # a failed save commits nothing; the next trainer deletes its folder
                self._manager.wait_until_finished()

        waiter = threading.Thread(target=wait, name="mtp-settle", daemon=True)
        waiter.start()
        waiter.join(timeout_s)

    def discard_unfinished(self) -> None:
        """Deletes half-written saves (the run's lock says no one else writes here)."""
        if distributed.is_primary():
            for path in self._unfinished():
                path.rmtree()

    def restore(self, abstract_state: Any, step: int | None = None, partial: bool = False) -> tuple[int, Any, dict] | None:
        """(step, state, data_state) of `step` or the newest readable checkpoint; None if there is none.

        `abstract_state` holds jax.ShapeDtypeStructs with the current shardings, which is what lets a
        checkpoint written on one mesh be read onto another. `partial` reads only the leaves it names
        (evaluation and decoding read {"params": ...}: no optimizer state, a third of the memory).
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        if step is not None:
            return self._restore_given(abstract_state, step, steps, partial)
        self._warn_unfinished(steps[0] if steps else None)
        broken: list[int] = []
        for again in range(LIVE_READS if self.read_only else 1):
            if again:
                self._manager.reload()
                steps = sorted(set(self._manager.all_steps()) - set(broken), reverse=True)
                if not steps:
                    break
                _warn(f"a trainer committed step {steps[0]} meanwhile (and rotated older steps out); reading that")
            restored = self._newest_readable(steps, abstract_state, partial, broken)
            if restored is not None:
                if not self.read_only:
                    self._set_aside(broken)
                return restored
        if broken and self.read_only:
            raise ConfigError(
                f"no readable checkpoint in {self.directory} (tried steps {broken}); if a trainer is writing there "
                f"faster than this reads, rerun; otherwise restore a backup"
            )
        if broken:
            raise ConfigError(
                f"no readable checkpoint in {self.directory} (tried steps {broken}); "
                f"move that directory away to start afresh, or restore a backup"
            )
        return None

    def _newest_readable(self, steps: list[int], abstract_state: Any, partial: bool,
                         broken: list[int]) -> tuple[int, Any, dict] | None:
        """The first of `steps` (newest first) that restores; each that does not is named and added to `broken`."""
        for i, candidate in enumerate(steps):
            restored, reason = self._attempt(candidate, abstract_state, partial)
            if restored is not None:
                return restored
            older = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no older checkpoint"
            _warn(f"checkpoint step {candidate} is unreadable ({reason}); {older}")
            broken.append(candidate)
        return None

    def _newest_metadata(self) -> Any | None:
        """The state tree of array metadata (shapes, dtypes) of the newest checkpoint whose metadata reads,
        without the arrays. A step whose metadata is unreadable is skipped here; `restore` names it and falls back."""
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                with contextlib.closing(ocp.StandardCheckpointHandler()) as handler:
                    return handler.metadata(self.directory / str(step) / "state")
            except Exception:  # noqa: BLE001 - any failure to read the metadata makes the step unusable
                continue
        return None

    def params_only(self) -> bool:
        """True when the newest readable checkpoint holds parameters without optimizer state (mtp-convert's)."""
        saved = self._newest_metadata()
        return saved is not None and not any(key.startswith("opt_state") for key in _shapes(saved))

    def params_dtype(self) -> str:
        """The dtype the newest checkpoint holds its parameters in (the widest of them; float32 when there is none)."""
        saved = self._newest_metadata()
        leaves = jax.tree_util.tree_flatten_with_path(saved)[0] if saved is not None else []
        dtypes = [np.dtype(leaf.dtype) for path, leaf in leaves if str(getattr(path[0], "key", path[0])) == "params"]
        return max(dtypes, key=lambda d: d.itemsize, default=np.dtype(np.float32)).name

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def wait(self) -> None:
        """Blocks until async saves are on disk; call before exiting or the last save may be lost."""
        if not self._failed and not self._closed:
            with self._writing(None):
                self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the last save and releases Orbax's threads. Orbax can report a failed async save here first
        (its finalize thread logs a commit error instead of raising it), so a full disk is one line here too."""
        if not self._failed and not self._closed:
            self._closed = True
            with self._writing(None):
                self._manager.close()

    @contextlib.contextmanager
    def _writing(self, step: int | None) -> Iterator[None]:
        """A full disk (or quota, or file-size limit) while saving becomes one line; the unfinished save is deleted
        so nothing half-written remains, and the committed checkpoints stay (Orbax rotates only after a commit)."""
        try:
            yield
        except Exception as error:
            code = full_disk_errno(error)
            if code is None or self.read_only:
                raise
            self._failed = True
            unfinished = [int(m.group()) for p in self._unfinished() if (m := re.match(r"\d+", p.name))]
            self.discard_unfinished()
            kept = sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
            left = f"; the unfinished save was deleted, the newest checkpoint is step {kept[-1]}" if kept else \
                "; the unfinished save was deleted, no checkpoint yet"
            failed = max(unfinished, default=step)
            what = f"checkpoint step {failed}" if failed is not None else "a checkpoint"
            raise full_disk_error(code, self.directory, what, left) from None

    @property
    def failed(self) -> bool:
        """A save failed (full disk): the caller should leave without waiting on Orbax's threads."""
        return self._failed

    def _attempt(self, step: int, abstract_state: Any, partial: bool = False) -> tuple[tuple[int, Any, dict] | None, str]:
        """(restored, "") or (None, why it failed), the same on every process."""
        pause_point("restore", step)  # tests hold a reader here while a live trainer rotates the step out
        restored, reason = None, ""
        with _no_aborted_read_dumps():  # outside the `except`, so the error and its coroutines are gone by the gc
            try:
                restored = self._restore_step(step, abstract_state, partial)
            except ConfigError:
                raise
            except Exception as error:  # noqa: BLE001 - any failure to read makes the step unusable
                reason = _reason(error)
        failed = _failed_processes(restored is not None)
        if failed and not reason:
            reason = f"the read failed on process {', '.join(map(str, failed))}"
        return (None, reason) if failed else (restored, "")

    def _restore_step(self, step: int, abstract_state: Any, partial: bool) -> tuple[int, Any, dict]:
        """Reads with Orbax's item handlers, not manager.restore: that ends in a cross-process barrier which
        a process whose read failed would skip, so the processes' next collectives would not match."""
        path = self.directory / str(step)
        with contextlib.closing(ocp.StandardCheckpointHandler()) as handler:
            difference = _first_difference(handler.metadata(path / "state"), abstract_state, partial)
            if difference:
                raise ConfigError(
                    f"checkpoint at {self.directory} step {step} does not match this model ({difference}); "
                    f"use a new train.run_dir or the same model config"
                )
            if not partial:
                state = handler.restore(path / "state", args=ocp.args.StandardRestore(abstract_state))
        if partial:
            with contextlib.closing(ocp.PyTreeCheckpointHandler()) as tree_handler:
                restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
                state = tree_handler.restore(path / "state", args=ocp.args.PyTreeRestore(
                    abstract_state, restore_args=restore_args, partial_restore=True))
        data = ocp.JsonCheckpointHandler().restore(path / "data", args=ocp.args.JsonRestore())
        return step, state, data

    def _restore_given(self, abstract_state: Any, step: int, steps: list[int], partial: bool) -> tuple[int, Any, dict]:
        """An explicitly requested step: no fallback, since the caller asked for exactly this one."""
        if step not in steps:
            raise ConfigError(f"no checkpoint at step {step} in {self.directory}; available steps: {sorted(steps)}")
        restored, reason = self._attempt(step, abstract_state, partial)
        if restored is None:
            raise ConfigError(
                f"checkpoint step {step} in {self.directory} is unreadable ({reason}); pick another of {sorted(steps)}"
            )
        return restored

    def _unfinished(self) -> list[epath.Path]:
        return [p.get() for p in ocp.path.step.all_temporary_paths(self.directory)]

    def _warn_unfinished(self, newest: int | None) -> None:
        """A save killed midway is no checkpoint at all, but the user should know that progress was lost."""
        for path in self._unfinished():
            digits = re.match(r"\d+", path.name)
            step = int(digits.group()) if digits else None
            if newest is None or step is None or step > newest:
                fallback = f"falling back to step {newest}" if newest is not None else "no older checkpoint"
                _warn(f"checkpoint step {step} is unreadable (unfinished save {path.name}: "
                      f"interrupted, or still being written); {fallback}")

    def _remove_unfinished(self) -> None:
        """Deletes saves a dead process left half-written, before our first save (never on restore-only use,
        where a live trainer may be writing one right now)."""
        self.discard_unfinished()
        ocp.multihost.sync_global_processes("mtp_jax_checkpoint_remove_unfinished")
        self._swept = True

    def _set_aside(self, steps: list[int]) -> None:
        """Moves unreadable steps out of Orbax's sight: left in place they would block saving those steps again."""
        if not steps:
            return
        if distributed.is_primary():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                target = self.directory / f"{step}.unreadable-{stamp}"
                (self.directory / str(step)).rename(target)
                _warn(f"moved unreadable checkpoint step {step} to {target}; delete it once inspected")
        ocp.multihost.sync_global_processes("mtp_jax_checkpoint_set_aside")
        self._manager.reload()
