"""`python -m mtp_jax.convert.check_logits RUN_DIR REFERENCE.npz [OUT.npz]`: a converted run's
logits on the reference's tokens against the reference's logits (what a user checks after
converting), optionally saved with the tokenizer's ids of a fixed text for an export check."""

from __future__ import annotations

import sys

import jax.numpy as jnp
import numpy as np

from mtp_jax.run import load_run

TEXT = "def add(a, b):\n    return a + b\n"


def run_logits(run_dir: str, tokens_BT: np.ndarray) -> np.ndarray:
    """(N, B, T, V) float32 logits of every head."""
    _, _, model, params = load_run(run_dir)
    return np.asarray(model.forward(params, jnp.asarray(tokens_BT)))


def main(argv: list[str]) -> None:
    run_dir, reference = argv[0], np.load(argv[1])
    logits = run_logits(run_dir, reference["tokens"])
    print(f"max |logits - reference| = {np.abs(logits - reference['logits']).max():.3g} "
          f"(logits up to {np.abs(reference['logits']).max():.3g})")
    if len(argv) > 2:
        ids = load_run(run_dir)[1].encode(TEXT)
        np.savez(argv[2], tokens=reference["tokens"], logits=logits, text_ids=np.asarray(ids))


if __name__ == "__main__":
    main(sys.argv[1:])
