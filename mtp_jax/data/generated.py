"""The generated task sources (`mtp_jax/tasks/`) as documents: training documents from
data.task_seed, and the fixed test set as the validation split (so held-out loss is measured on
the test documents too)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path

from mtp_jax.config import ConfigError, DataConfig
from mtp_jax.tasks import induction, polynomial

SOURCES = ("induction", "polynomial")  # the data.source values generated here


def task_texts(cfg: DataConfig) -> dict[str, list[str]]:
    """Document texts per split ('train', 'val') of a generated source."""
    if cfg.tokenizer != "bytes":
        raise ConfigError(f"data.source={cfg.source} needs data.tokenizer=bytes (names and digits are one token per "
                          f"character only under it); set data.tokenizer=bytes")
    if min(cfg.task_train_examples, cfg.task_test_examples) < 1:
        raise ConfigError("data.task_train_examples and data.task_test_examples must be >= 1")
    if cfg.source == "induction":
        test = [s.text for s in induction.test_set(cfg.task_test_examples)]
        train = [s.text for s in induction.train_set(cfg.task_train_examples, cfg.task_seed, set(test))]
        return {"train": train, "val": test}
    if not 1 <= cfg.task_train_ops <= cfg.task_test_ops:
        raise ConfigError(f"data.task_train_ops={cfg.task_train_ops} must be in 1..data.task_test_ops={cfg.task_test_ops}")
    tests = polynomial.test_set(cfg.task_test_examples, cfg.task_test_ops)
    exclude = {ex.expression for examples in tests.values() for ex in examples}
    train = polynomial.train_set(cfg.task_train_examples, cfg.task_train_ops, cfg.task_seed, exclude)
    in_domain = [ex.text for m in range(1, cfg.task_train_ops + 1) for ex in tests[m]]
    return {"train": [ex.text for ex in train], "val": in_domain}


def task_files(cfg: DataConfig) -> list[tuple[str, Path]]:
    """The generated documents as one JSONL file per split, named by the split (sources.py reads
    them like any JSONL, with the split fixed): written once per task setting to the system's
    temporary folder, atomically, since several processes may ask at once."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k == "source" or k.startswith("task_")}
    key = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / "mtp_jax_tasks" / f"{cfg.source}-{key}"
    files = [(split, folder / f"{split}.jsonl") for split in ("train", "val")]
    if not all(path.is_file() for _, path in files):
        folder.mkdir(parents=True, exist_ok=True)
        for split, texts in task_texts(cfg).items():
            tmp = folder / f".{split}.{os.getpid()}.tmp"
            tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
            os.replace(tmp, folder / f"{split}.jsonl")
    return files
