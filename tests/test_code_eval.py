"""The whole code-evaluation pipeline: scripted decoders (the canonical solution followed by junk
the stop strings must cut reaches pass@1 = 1; `pass` reaches 0), resuming after a crash, a tiny
random model through the real KV-cached decoder (plain and speculative), and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mtp_jax.cli import eval_main
from mtp_jax.data.tokenizer import ByteTokenizer, encode_prompt
from mtp_jax.evals.code import benchmarks
from mtp_jax.evals.code.cli import ModelDecoder
from mtp_jax.evals.code.evaluate import (Settings, decoder_calls, estimate_line, estimated_seconds, evaluate,
                                         read_samples, samples_path)
from mtp_jax.evals.code.sandbox import Sandbox
from mtp_jax.evals.results import read_results
from mtp_jax.model.transformer import MTP

ROOT = Path(__file__).resolve().parents[1]
JUNK = {"humaneval": "\ndef junk():", "mbpp": "\n[DONE]\ndef junk():"}  # each benchmark's stop, then junk


class ScriptedDecoder:
    """A decoder (the `Decoder` interface) that writes a fixed text for each prompt, token by token
    through the tokenizer, up to max_new_tokens; counts the prompts it was asked for."""

    def __init__(self, tokenizer, text_for_prompt: dict[str, str], fail_after_calls: int | None = None):
        # Keyed by the prompt's ids as the tokenizer's document convention lays them out: any other ids miss.
        self.text_for_ids = {tuple(encode_prompt(tokenizer, p)): t for p, t in text_for_prompt.items()}
        self.tokenizer, self.fail_after_calls = tokenizer, fail_after_calls
        self.prompts_seen = 0
        self.calls = 0

    def __call__(self, prompts, max_new_tokens, sampling, seed, stop_tokens):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.prompts_seen += len(prompts)
        texts = [self.text_for_ids[tuple(p)] for p in prompts]
        return [self.tokenizer.encode(t)[:max_new_tokens] + [stop_tokens[0]] for t in texts]


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(workers=2) as box:
        yield box


def scripted(task: str, limit: int, completion=None, **kw) -> ScriptedDecoder:
    problems = benchmarks.load(task, limit)
    texts = {p.prompt: (p.reference + JUNK[task] if completion is None else completion) for p in problems}
    return ScriptedDecoder(ByteTokenizer(), texts, **kw)


@pytest.mark.parametrize("task", ["humaneval", "mbpp"])
def test_canonical_solution_then_junk_scores_one(task, sandbox, tmp_path):
    settings = Settings(task, samples=2, temperatures=(0.8,), ks=(1, 2, 10), limit=3, max_new_tokens=2048)
    record = evaluate(tmp_path, 7, settings, scripted(task, 3), ByteTokenizer(), sandbox)
    assert record["metrics"]["pass@1"] == 1.0 and record["metrics"]["pass@2"] == 1.0
    assert "pass@10" not in record["metrics"]  # k > samples is not reported
    assert [r["metrics"] for r in read_results(tmp_path, task)] == [record["metrics"]]
    rows = [json.loads(line) for line in samples_path(tmp_path, settings, 7).read_text().splitlines()]
    assert len(rows) == 6 and all("junk" not in r["completion"] for r in rows)


def test_pass_scores_zero(sandbox, tmp_path):
    settings = Settings("humaneval", samples=2, temperatures=(0.2, 0.8), ks=(1, 2), limit=3)
    record = evaluate(tmp_path, 1, settings, scripted("humaneval", 3, completion="pass"), ByteTokenizer(), sandbox)
    m = record["metrics"]
    assert m["pass@1"] == 0.0 and m["pass@2"] == 0.0 and m["pass@1/ci90_high"] == 0.0
    assert record["details"]["per_temperature"]["0.2"]["statuses"] == {"fail": 6}


def test_best_temperature_per_k_and_greedy_single_sample(sandbox, tmp_path):
    """Problem 0 solved, 1 and 2 not: at every temperature pass@1 = 1/3; greedy takes one sample."""
    problems = benchmarks.load("humaneval", 3)
    texts = {p.prompt: (p.reference if i == 0 else "    return None\n") for i, p in enumerate(problems)}
    decoder = ScriptedDecoder(ByteTokenizer(), texts)
    settings = Settings("humaneval", samples=3, temperatures=(0.0, 0.6), ks=(1, 3), limit=3)
    record = evaluate(tmp_path, 1, settings, decoder, ByteTokenizer(), sandbox)
    m = record["metrics"]
    assert m["pass@1"] == pytest.approx(1 / 3) and m["pass@1/temperature"] == 0.0  # ties go to the lower temperature
    assert m["pass@3/temperature"] == 0.6 and "pass@3/t0" not in m  # greedy has one sample: no pass@3
    assert decoder.prompts_seen == 3 * 1 + 3 * 3
    assert record["details"]["per_problem"]["HumanEval/0"]["0.6"] == {"n": 3, "passed": 3}


def test_interrupted_evaluation_resumes_where_it_stopped(sandbox, tmp_path):
    settings = Settings("mbpp", samples=2, temperatures=(0.8,), ks=(1,), limit=4, rows=2, max_new_tokens=2048)
    with pytest.raises(KeyboardInterrupt):
        evaluate(tmp_path, 3, settings, scripted("mbpp", 4, fail_after_calls=2), ByteTokenizer(), sandbox)
    assert sum(len(v) for v in read_samples(samples_path(tmp_path, settings, 3)).values()) == 4  # two problems done
    with open(samples_path(tmp_path, settings, 3), "a") as f:
        f.write('{"task_id": "mbpp/13", "temper')  # a line cut by the kill
    resumed = scripted("mbpp", 4)
    record = evaluate(tmp_path, 3, settings, resumed, ByteTokenizer(), sandbox)
    assert resumed.prompts_seen == 4 and record["metrics"]["pass@1"] == 1.0
    assert record["details"]["per_problem"]["mbpp/11"]["0.8"] == {"n": 2, "passed": 2}


def test_other_settings_use_their_own_samples_file(tmp_path):
    a, b = Settings("mbpp", samples=2), Settings("mbpp", samples=3)
    assert samples_path(tmp_path, a, 1) != samples_path(tmp_path, b, 1)
    assert samples_path(tmp_path, a, 1) == samples_path(tmp_path, Settings("mbpp", samples=2, temperatures=(0.1,)), 1)


def tiny_model(tiny):
    cfg = tiny(model__vocab_size=384, model__n_layers=3, model__mtp_heads=2)
    mtp = MTP(cfg.model)
    rng = np.random.default_rng(0)
    leaf = lambda path, x: np.ones(x.shape, np.float32) if path[-1].key == "scale" else (
        0.02 * rng.standard_normal(x.shape)).astype(np.float32)
    return mtp, jax.tree_util.tree_map_with_path(leaf, mtp.abstract_params())


@pytest.mark.slow
def test_tiny_random_model_through_the_pipeline_plain_and_speculative(tiny, sandbox, tmp_path):
    mtp, params = tiny_model(tiny)
    settings = Settings("humaneval", samples=2, temperatures=(0.0, 0.8), ks=(1, 2), limit=2, max_new_tokens=8, rows=4)
    record = evaluate(tmp_path / "plain", 5, settings, ModelDecoder(mtp, params, rows=4), ByteTokenizer(), sandbox)
    assert 0.0 <= record["metrics"]["pass@1"] <= 1.0 and record["details"]["per_temperature"]["0.8"]["statuses"]
    spec = Settings(**{**settings.__dict__, "speculative": 2, "temperatures": (0.0,)})
    evaluate(tmp_path / "spec", 5, spec, ModelDecoder(mtp, params, speculative=2, rows=4), ByteTokenizer(), sandbox)
    greedy = lambda root, s: {u: [r["completion"] for r in rows] for u, rows in read_samples(samples_path(root, s, 5)).items()
                              if u[1] == 0.0}
    assert greedy(tmp_path / "plain", settings) == greedy(tmp_path / "spec", spec)  # identical greedy outputs
    assert all(r["new_tokens"] <= 9 for rows in read_samples(samples_path(tmp_path / "plain", settings, 5)).values()
               for r in rows)


def mtp_eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtp_jax.cli", "eval", *args], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)


@pytest.mark.parametrize("flags, message", [
    (["--samples", "0"], "--samples 0"),
    (["--k", "1,x"], "--k '1,x'"),
    (["--temperature", "-1"], "temperature"),
    (["--limit", "0"], "--limit 0"),
    (["--task", "apps"], "invalid choice"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        eval_main([str(tmp_path), "--task", "mbpp", *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_cli_on_a_trained_run(tmp_path):
    train = [sys.executable, "-m", "mtp_jax.cli", "train", str(ROOT / "experiments" / "quickstart.yaml"),
             "model.d_model=32", "model.n_layers=3", "model.attn_heads=2", "model.mtp_heads=2", "data.tokenizer=bytes",
             "data.max_bytes=300000", "data.val_fraction=0.3", "train.batch_size=2", "train.seq_len=32", "train.steps=2", "train.eval_batches=1",
             "train.progress=false", "train.tensorboard=false", f"train.run_dir={tmp_path}"]
    done = subprocess.run(train, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    done = mtp_eval(str(tmp_path), "--task", "humaneval", "--limit", "2", "--samples", "2", "--temperature", "0.8",
                    "--k", "1,2", "--max-new-tokens", "8", "--workers", "2")
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(metrics) >= {"pass@1", "pass@2", "pass@1/ci90_low", "pass@1/temperature"}
    assert read_results(tmp_path, "humaneval")[0]["metrics"] == metrics and "humaneval" in done.stderr  # progress bar


def test_time_estimate_counts_decoding_calls_by_hand() -> None:
    """The paper's HumanEval protocol at --rows 32: 200 samples make one problem per batch in 7 calls
    (6 x 32 + 8), greedy makes batches of 32 problems in one call each (5 x 32 + 4: 6 calls)."""
    settings = Settings("humaneval", samples=200, temperatures=(0.1, 0.4, 0.8, 0.0), rows=32)
    assert decoder_calls(164, 200, 32) == 164 * 7 and decoder_calls(164, 1, 32) == 6
    assert decoder_calls(164, 10, 32) == 55  # 3 problems (30 sequences) per call: ceil(164 / 3)
    todo = {0.1: 164, 0.4: 164, 0.8: 164, 0.0: 164}
    assert estimated_seconds(2.0, todo, settings) == 2.0 * (3 * 164 * 7 + 6)
    assert estimated_seconds(2.0, {0.1: 0, 0.4: 10, 0.8: 164, 0.0: 0}, settings) == 2.0 * (10 + 164) * 7
    assert "about 1.9 h (an estimate" in estimate_line(2.0, todo, settings)


def test_estimate_is_reported_once_after_the_second_batch(sandbox, tmp_path):
    lines: list[str] = []
    settings = Settings("humaneval", samples=2, temperatures=(0.8,), ks=(1,), limit=3, rows=2)  # 3 batches
    evaluate(tmp_path, 1, settings, scripted("humaneval", 3), ByteTokenizer(), sandbox, report=lines.append)
    assert len(lines) == 1 and lines[0].startswith("estimated time left: about ") and "an estimate" in lines[0]


def test_model_decoder_calls_hold_at_most_rows_sequences():
    """More prompts than --rows take several calls of rows + 1 sequences (the padding row), each its own seed."""
    calls = []

    class Result:
        def __init__(self, prompts):
            self.prompts = prompts

        def completions(self):
            return [[p[0]] for p in self.prompts]

    decoder = ModelDecoder(None, None, rows=2, bucket=4)
    decoder.decode = lambda mtp, params, prompts, seed, **kw: calls.append((len(prompts), seed)) or Result(prompts)
    out = decoder([[i, 9] for i in range(5)], max_new_tokens=3, sampling=None, seed=10, stop_tokens=[0])
    assert out == [[i] for i in range(5)] and calls == [(3, 10), (3, 11), (3, 12)]
