"""Synthetic tasks of the paper's small-model findings: induction and polynomial arithmetic.

Here are their generators and answer scoring, pure Python and NumPy. Each is a `data.source`
(data/generated.py: generated, offline, deterministic under `data.task_seed`) and an evaluation
(evals/tasks.py: `mtp-eval RUN_DIR --task NAME`, and at the end of training).
"""
