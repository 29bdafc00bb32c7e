"""Prompts that decoding can be judged on: starts of held-out documents, as training saw them."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from mtp_jax.config import ConfigError


def document_starts(data_dir: str | Path, length: int, count: int) -> np.ndarray:
    """(count, length) ids: the first `length` tokens of the first `count` val documents that long, in
    the prepared store in `data_dir` (`build.dataset_folder`). No prompt crosses a document boundary
    (decoding masks none) or starts mid-document."""
    from mtp_jax.data import store

    stream = store.SplitStream(data_dir, "val")
    long_enough = itertools.islice((start for start, end in stream.documents() if end - 1 - start >= length), count)
    starts = list(long_enough)
    if len(starts) < count:
        raise ConfigError(f"only {len(starts)} held-out documents have {length} tokens; "
                          "ask for shorter or fewer prompts")
    return np.stack(stream.read_many([(s, s + length) for s in starts])).astype(np.int32)


SAMPLE_SAMPLING = (0.8, 0.95)  # (temperature, top-p) of the sampled completion: the paper's code-eval settings


def print_sample_completion(cfg: Any, tokenizer: Any, data_dir: str | Path, params: Any,
                            prompt_len: int = 24, new_tokens: int = 48, seed: int = 0) -> list[int]:
    """Prints head 1's greedy completion of the first held-out document start and one sampled
    completion beside it (the end of training shows what the model learned in words, not only
    in nats), each the exact text that follows the prompt; returns the greedy ids, or nothing
    when no held-out document is that long (tiny corpora)."""
    from mtp_jax.data.tokenizer import completion_text
    from mtp_jax.decode.generate import Sampling, generate
    from mtp_jax.model.transformer import MTP

    try:
        prompt = document_starts(data_dir, prompt_len, 1)[0].tolist()
    except ConfigError:
        return []
    temperature, top_p = SAMPLE_SAMPLING
    run = lambda sampling: generate(MTP(cfg.model), params, [prompt], new_tokens, sampling, seed,
                                    stop_tokens=[tokenizer.eot_id]).completions()[0]
    greedy, sampled = run(Sampling()), run(Sampling(temperature, 0, top_p))
    print(f"completions of a held-out document start ({prompt_len} prompt tokens, then up to {new_tokens} new):")
    print(f"greedy:  {tokenizer.decode(prompt)}\u2502{completion_text(tokenizer, prompt, greedy)}")
    print(f"sampled (temperature {temperature}, top-p {top_p}):  {tokenizer.decode(prompt)}\u2502"
          f"{completion_text(tokenizer, prompt, sampled)}", flush=True)
    return greedy
