"""Synthetic tasks: the polynomial format and values against a NumPy reference that parses the
text, hand-worked cases, induction names and metric on hand-made stories, determinism and
train/test disjointness, and that one teacher-forced pass gives the greedy answer."""

from __future__ import annotations

import re
import string
from pathlib import Path

import numpy as np
import pytest

from mtp_jax.config import ConfigError, DataConfig
from mtp_jax.data.generated import task_texts
from mtp_jax.data.tokenizer import ByteTokenizer
from mtp_jax.tasks import induction, polynomial
from mtp_jax.tasks.metrics import answer_scores, induction_counts


# --- an independent reference: parse the text, compute with numpy polynomial products ---------
def ref_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.convolve(a, b)[:5] % 7


def ref_compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum_i a_i b^i, powers by repeated products, everything mod 7 and cut at X^5."""
    out, power = np.zeros(5, np.int64), np.eye(5, dtype=np.int64)[0]
    for coef in a:
        out = (out + coef * power) % 7
        power = ref_mul(power, b)
    return out


def ref_eval(text: str) -> np.ndarray:
    def parse(i: int) -> tuple[np.ndarray, int]:
        if text[i] == "-":
            value, i = parse(i + 1)
            return (-value) % 7, i
        if text[i] == "(":
            left, i = parse(i + 1)
            op = text[i]
            right, i = parse(i + 1)
            assert text[i] == ")"
            fn = {"+": lambda a, b: (a + b) % 7, "*": ref_mul, "o": ref_compose}[op]
            return fn(left, right), i + 1
        assert re.fullmatch(r"[0-6]{5}", text[i:i + 5]), text[i:]
        return np.array([int(c) for c in text[i:i + 5]]), i + 5

    value, end = parse(0)
    assert end == len(text)
    return value


def count_ops(text: str) -> int:
    return text.count("-") + sum(text.count(op) for op in "+*o")


def test_polynomial_matches_numpy_reference_on_random_expressions() -> None:
    rng = np.random.default_rng(123)
    for _ in range(400):
        m = int(rng.integers(1, 11))
        ex = polynomial.random_example(rng, m)
        assert count_ops(ex.expression) == m == ex.ops
        assert ex.answer == "".join(str(c) for c in ref_eval(ex.expression)), ex.text
        assert ex.text == ex.expression + "=" + ex.answer and re.fullmatch(r"[0-6]{5}", ex.answer)


@pytest.mark.parametrize("text, answer", [
    ("(31000o-01000)", "36000"),  # (3 + X) o (-X) = 3 - X
    ("(-01000o31000)", "46000"),  # (-X) o (3 + X) = -3 - X: composition order matters
    ("(00100o11000)", "12100"),   # X^2 o (1 + X) = 1 + 2X + X^2
    ("(11000o00100)", "10100"),   # (1 + X) o X^2 = 1 + X^2
    ("(00010o01100)", "00013"),   # (X + X^2)^3 = X^3 + 3X^4 + (X^5 and up, cut)
    ("(00001*01000)", "00000"),   # X^4 * X = X^5 = 0 in F_7[X]/(X^5)
    ("(60000+20000)", "10000"),   # 6 + 2 = 1 mod 7
    ("--12345", "12345"),
    ("-(10000*65432)", "12345"),
])
def test_hand_worked_cases(text: str, answer: str) -> None:
    assert "".join(str(c) for c in ref_eval(text)) == answer


def test_module_arithmetic_by_hand() -> None:
    """The same cases through the module's own functions (a o b = a(b(X)))."""
    x, three_plus_x = (0, 1, 0, 0, 0), (3, 1, 0, 0, 0)
    assert polynomial.compose(three_plus_x, polynomial.neg(x)) == (3, 6, 0, 0, 0)
    assert polynomial.compose(polynomial.neg(x), three_plus_x) == (4, 6, 0, 0, 0)
    assert polynomial.compose((0, 0, 1, 0, 0), (1, 1, 0, 0, 0)) == (1, 2, 1, 0, 0)
    assert polynomial.compose((1, 1, 0, 0, 0), (0, 0, 1, 0, 0)) == (1, 0, 1, 0, 0)
    assert polynomial.compose((0, 0, 0, 1, 0), (0, 1, 1, 0, 0)) == (0, 0, 0, 1, 3)
    assert polynomial.mul((0, 0, 0, 0, 1), x) == (0, 0, 0, 0, 0)
    assert polynomial.add((6, 0, 0, 0, 0), (2, 0, 0, 0, 0)) == (1, 0, 0, 0, 0)
    assert polynomial.fmt((3, 1, 0, 2, 4)) == "31024"


def test_polynomial_format_is_pinned() -> None:
    ex = polynomial.random_example(np.random.default_rng(0), 2)
    assert ex.text == polynomial.random_example(np.random.default_rng(0), 2).text
    assert set(ex.text) <= set("0123456-+*o()=")
    assert ByteTokenizer().encode(ex.answer) == [ord(c) for c in ex.answer]  # one token per digit


def test_polynomial_sets_are_deterministic_and_disjoint() -> None:
    tests = polynomial.test_set(50, 10)
    assert [e.text for e in tests[3]] == [e.text for e in polynomial.test_set(50, 10)[3]]
    assert all(e.ops == m for m, examples in tests.items() for e in examples)
    exclude = {e.expression for examples in tests.values() for e in examples}
    train = polynomial.train_set(3000, 5, seed=0, exclude=exclude)
    assert [e.text for e in train[:20]] == [e.text for e in polynomial.train_set(20, 5, 0, exclude)]
    assert [e.text for e in train[:20]] != [e.text for e in polynomial.train_set(20, 5, 1, exclude)]
    assert not {e.expression for e in train} & exclude
    assert {e.ops for e in train} == {1, 2, 3, 4, 5}
    # the check really removes: excluding the first expression drawn moves the list up by one
    first = polynomial.train_set(1, 5, 0, set())[0].expression
    assert polynomial.train_set(1, 5, 0, {first})[0].expression != first


def test_names_are_two_tokens_and_the_only_capitals() -> None:
    tok = ByteTokenizer()
    for story in induction.test_set(60):
        assert story.spans and len({n[0] for n in story.names}) == len(story.names)
        for offset, name in story.spans:
            assert len(tok.encode(name)) == 2 and story.text[offset:offset + 2] == name
            assert not story.text[offset + 2:offset + 3].isalpha()  # a whole word
        capitals = [i for i, c in enumerate(story.text) if c in string.ascii_uppercase]
        assert capitals == [offset for offset, _ in story.spans]
        assert induction.repeated(story.spans)  # every story has something to score


def test_induction_sets_are_deterministic_and_disjoint() -> None:
    test = [s.text for s in induction.test_set(30)]
    assert test == [s.text for s in induction.test_set(30)]
    train = induction.train_set(200, seed=0, exclude=set(test))
    assert [s.text for s in train[:5]] == [s.text for s in induction.train_set(5, 0, set(test))]
    assert [s.text for s in train[:5]] != [s.text for s in induction.train_set(5, 1, set(test))]
    assert not {s.text for s in train} & set(test)
    names = [s.names for s in train]
    assert len(set(names)) > 150  # fresh names per story, not a fixed cast


def test_induction_metric_counts_only_repeated_occurrences() -> None:
    text = "Ab met Cd. Ab saw Cd and Ab."
    tokens = np.array([ord(c) for c in text])
    spans = ((0, "Ab"), (7, "Cd"), (11, "Ab"), (18, "Cd"), (25, "Ab"))
    repeats = [o for o, _ in induction.repeated(spans)]
    assert repeats == [11, 18, 25]
    pred = np.full((2, len(text)), ord("?"))
    pred[0, 0] = ord("b")      # first occurrence: right, but must not count
    pred[0, 11] = ord("b")     # repeat 1: second token right
    pred[0, 18] = ord("x")     # repeat 2: second token wrong
    pred[0, 25] = ord("b")     # repeat 3: second token right
    pred[0, 10] = ord("A")     # first token of repeat 1 right (predicted from the space before)
    pred[1, 17] = ord("d")     # head 2 from before "Cd" gets its second token
    counts = induction_counts(pred, tokens, repeats)
    assert counts == {"repeats": 3, "second": 2, "first": 1, "second_head_2": 1}


def test_induction_window_holds_whole_stories_and_scores_every_repeat() -> None:
    """The shipped induction config: 100+ test stories, each inside train.seq_len, and the
    evaluation scores every repeated name, counted here from the text (capital + letter)."""
    import jax

    from mtp_jax.config import load_config
    from mtp_jax.model.transformer import MTP
    from mtp_jax.evals.tasks import eval_induction

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "experiments" / "induction" / "base.yaml",
                      ["model.d_model=32", "model.n_layers=2", "model.attn_heads=2", "model.vocab_size=384"])
    stories = induction.test_set(cfg.data.task_test_examples)
    assert len(stories) >= 100 and max(len(s.text) for s in stories) < cfg.train.seq_len
    want = 0
    for story in stories:
        names = re.findall(r"[A-Z][a-z]", story.text)
        want += len(names) - len(set(names))
    mtp = MTP(cfg.model)
    metrics, details = eval_induction(cfg, mtp, mtp.init(jax.random.key(0)), ByteTokenizer(), final=True)
    assert details["repeats"] == want and details["stories"] == len(stories)
    assert details["longest_story_tokens"] == max(len(s.text) for s in stories) <= cfg.train.seq_len
    assert 0 <= metrics["second_token_accuracy"] <= 1


def test_answer_scores_by_hand() -> None:
    exact, correct, loss = answer_scores(np.array([1, 2, 0]), np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0]))
    assert not exact and correct.tolist() == [True, True, False] and loss == pytest.approx(2.0)
    assert answer_scores(np.array([1, 2, 3]), np.array([1, 2, 3]), np.zeros(3))[0]


def test_generated_sources_need_bytes() -> None:
    with pytest.raises(ConfigError, match="data.tokenizer=bytes"):
        task_texts(DataConfig(source="induction", tokenizer="bpe"))
    texts = task_texts(DataConfig(source="polynomial", task_train_examples=30, task_test_examples=4))
    assert len(texts["train"]) == 30 and len(texts["val"]) == 4 * 5  # val: the in-domain test set


@pytest.mark.slow
def test_whole_sequence_passes_give_the_greedy_answer() -> None:
    """greedy_answers against token-by-token decoding (`generate`, KV cache) with a random model,
    whose answers are wrong and change between passes, so every pass is exercised; and its
    teacher-forced loss is head 1's loss on the reference answer."""
    import jax

    from mtp_jax.config import load_config
    from mtp_jax.decode.generate import generate
    from mtp_jax.model.transformer import MTP
    from mtp_jax.evals.tasks import greedy_answers, predictions
    from tests.conftest import tiny_overrides

    cfg = load_config(None, tiny_overrides(model__vocab_size=384, model__mtp_heads=2))
    mtp = MTP(cfg.model)
    params = mtp.init(jax.random.key(3))
    examples = [ex for m in (1, 2, 7) for ex in polynomial.test_set(4, 7)[m]]
    prompts = [np.array([ord(c) for c in ex.prompt], np.int32) for ex in examples]
    references = [np.array([ord(c) for c in ex.answer], np.int32) for ex in examples]
    want = generate(mtp, params, [p.tolist() for p in prompts], 5).completions()
    greedy, losses = greedy_answers(mtp, params, prompts, references)
    assert [g.tolist() for g in greedy] == [list(w) for w in want]
    full = predictions(mtp, params, [np.concatenate([p, r]) for p, r in zip(prompts, references)])
    for prompt, loss, (_, nll_T) in zip(prompts, losses, full):
        np.testing.assert_allclose(loss, nll_T[len(prompt) - 1: len(prompt) + 4], rtol=1e-5)


def test_eval_cli_unknown_task_is_one_line(capsys) -> None:
    from mtp_jax.cli import eval_main

    with pytest.raises(SystemExit) as exit_:
        eval_main(["runs/nowhere", "--task", "bogus"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "invalid choice: 'bogus'" in err
    assert all(task in err for task in ("heldout", "induction", "polynomial", "humaneval", "mbpp"))
    assert err.count("\n") == 1
