"""Code-generation evaluation: HumanEval and MBPP pass@k of a run, with every program in a sandbox.

benchmarks.py (problems, prompts, stop strings) -> evaluate.py (sampling with the KV-cached
decoder, resumable sample log, scoring) -> sandbox.py (+ _boot.py: the cage each program runs
in) -> passk.py (unbiased pass@k, bootstrap intervals); cli.py adds `mtp-eval --task`.
"""
