"""Polynomial arithmetic over F_7[X]/(X^5): expressions, their values and the token format.

Format (one document per example, one character per token under the bytes tokenizer):

    expression "=" answer          e.g.  (31000o-01000)=34000

- an operand is its 5 coefficients, lowest degree first: `31024` = 3 + X + 2X^3 + 4X^4;
- `-A` is negation, `(A+B)` addition, `(A*B)` multiplication, `(AoB)` composition A(B(X));
- the answer is the 5 coefficients of the value, in the same order.

An expression with m operations applies m operators, each uniform over {-, +, *, o}, to a
growing expression; a binary operator takes a fresh uniform operand on a uniformly chosen side,
so composition appears in both orders. Values are computed while building, never by parsing.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

P = 7  # coefficients mod 7
DEG = 5  # truncated at X^5: 5 coefficients
OPERATORS = ("-", "+", "*", "o")
BINARY = {"+": "add", "*": "mul", "o": "compose"}
Poly = tuple[int, ...]


def add(a: Poly, b: Poly) -> Poly:
    return tuple((x + y) % P for x, y in zip(a, b))


def neg(a: Poly) -> Poly:
    return tuple(-x % P for x in a)


def mul(a: Poly, b: Poly) -> Poly:
    out = [0] * DEG
    for i, x in enumerate(a):
        for j, y in enumerate(b[: DEG - i]):
            out[i + j] = (out[i + j] + x * y) % P
    return tuple(out)


def compose(a: Poly, b: Poly) -> Poly:
    """a(b(X)) mod (7, X^5), by Horner's rule on a's coefficients."""
    out: Poly = (0,) * DEG
    for coef in reversed(a):
        out = add(mul(out, b), (coef,) + (0,) * (DEG - 1))
    return out


def fmt(p: Poly) -> str:
    return "".join(str(c) for c in p)


@dataclasses.dataclass(frozen=True)
class Example:
    expression: str
    value: Poly
    ops: int

    @property
    def prompt(self) -> str:
        return self.expression + "="

    @property
    def answer(self) -> str:
        return fmt(self.value)

    @property
    def text(self) -> str:
        return self.prompt + self.answer


def random_operand(rng: np.random.Generator) -> Poly:
    return tuple(int(c) for c in rng.integers(0, P, DEG))


def random_example(rng: np.random.Generator, ops: int) -> Example:
    """An expression of exactly `ops` operations, operators and operands uniform."""
    value = random_operand(rng)
    text = fmt(value)
    for _ in range(ops):
        op = OPERATORS[int(rng.integers(len(OPERATORS)))]
        if op == "-":
            value, text = neg(value), "-" + text
            continue
        other = random_operand(rng)
        fn = globals()[BINARY[op]]
        if rng.integers(2):  # the growing expression on the left
            value, text = fn(value, other), f"({text}{op}{fmt(other)})"
        else:
            value, text = fn(other, value), f"({fmt(other)}{op}{text})"
    return Example(text, value, ops)


TEST_STREAM = 7_000_001  # fixed seed stream of the test sets (independent of data.task_seed)
TRAIN_STREAM = 7_000_002


@functools.lru_cache(maxsize=2)  # evaluations during training reuse it; callers only read
def test_set(examples_per_m: int, max_ops: int) -> dict[int, list[Example]]:
    """The fixed test set: `examples_per_m` expressions for each m in 1..max_ops."""
    return {m: [random_example(np.random.default_rng([TEST_STREAM, m, i]), m) for i in range(examples_per_m)]
            for m in range(1, max_ops + 1)}


def train_set(count: int, max_ops: int, seed: int, exclude: set[str]) -> list[Example]:
    """`count` training expressions, m uniform in 1..max_ops, none of whose text is in `exclude`
    (the test expressions): disjoint by check, since short expressions do repeat."""
    rng = np.random.default_rng([TRAIN_STREAM, seed])
    out: list[Example] = []
    while len(out) < count:
        ex = random_example(rng, int(rng.integers(1, max_ops + 1)))
        if ex.expression not in exclude:
            out.append(ex)
    return out
