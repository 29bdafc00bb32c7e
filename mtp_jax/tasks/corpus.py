"""The generated sources as a Corpus: training documents from data.task_seed, and the fixed test
set as the validation split (so held-out loss is measured on the test documents too)."""

from __future__ import annotations

from mtp_jax.config import ConfigError, DataConfig
from mtp_jax.data.sources import Corpus, Document
from mtp_jax.tasks import induction, polynomial

TASKS = ("induction", "polynomial")


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


def generated_corpus(cfg: DataConfig) -> Corpus:
    docs = [Document(f"{cfg.source}/{split}/{i}", text, split, len(text), True)
            for split, texts in task_texts(cfg).items() for i, text in enumerate(texts)]
    return Corpus(docs)
