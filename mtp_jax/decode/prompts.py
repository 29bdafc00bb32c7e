"""Prompts that decoding can be judged on: starts of held-out documents, as training saw them."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from mtp_jax.config import ConfigError


def document_starts(cfg: Any, tokenizer: Any, run_dir: str | Path, length: int, count: int) -> np.ndarray:
    """(count, length) ids: the first `length` tokens of the first `count` val documents that
    long. No prompt crosses a document boundary (decoding masks none) or starts mid-document."""
    from mtp_jax.data.pipeline import dataset_folder
    from mtp_jax.data.store import SplitStream

    stream = SplitStream(dataset_folder(cfg, tokenizer, run_dir), "val")
    long_enough = itertools.islice((start for start, end in stream.documents() if end - 1 - start >= length), count)
    starts = list(long_enough)
    if len(starts) < count:
        raise ConfigError(f"only {len(starts)} held-out documents have {length} tokens; "
                          "ask for shorter or fewer prompts")
    return np.stack(stream.read_many([(s, s + length) for s in starts])).astype(np.int32)


def print_sample_completion(cfg: Any, tokenizer: Any, run_dir: str | Path, params: Any,
                            prompt_len: int = 24, new_tokens: int = 48) -> list[int]:
    """Prints head 1's greedy completion of the first held-out document start (the end of
    training shows what the model learned in words, not only in nats); returns it, or nothing
    when no held-out document is that long (tiny corpora)."""
    from mtp_jax.decode.generate import generate
    from mtp_jax.model.transformer import MTP

    try:
        prompt = document_starts(cfg, tokenizer, run_dir, prompt_len, 1)[0].tolist()
    except ConfigError:
        return []
    completion = generate(MTP(cfg.model), params, [prompt], new_tokens, stop_tokens=[tokenizer.eot_id]).completions()[0]
    print(f"greedy completion of a held-out document start ({prompt_len} prompt tokens, then {new_tokens} new):")
    print(f"{tokenizer.decode(prompt)}\u2502{tokenizer.decode([t for t in completion if t != tokenizer.eot_id])}",
          flush=True)
    return completion
