"""Synthetic tasks of the paper's small-model findings: induction and polynomial arithmetic.

Each is a `data.source` (generated, offline, deterministic under `data.task_seed`) and an
evaluation (`mtp-eval RUN_DIR --task NAME`, and at the end of training).
"""
