"""Induction: procedurally generated children's stories whose character names are random and
exactly two tokens (two ASCII letters under the bytes tokenizer, e.g. `Qe`), drawn fresh per story.

The grammar is all lower case, so a capital letter always starts a name; the characters of one
story have distinct first letters, so at a repeated occurrence the name's second token is
determined by copying from its earlier occurrence, and only by that. The paper's induction score
is head 1's accuracy on that second token at repeated occurrences.
"""

from __future__ import annotations

import dataclasses
import functools
import string

import numpy as np

KINDS = ("girl", "boy", "cat", "dog", "rabbit", "bird", "bear", "fox", "frog", "mouse")
ADJECTIVES = ("little", "happy", "brave", "kind", "small", "big", "shy", "clever", "sleepy", "funny")
PLACES = ("the park", "the forest", "a small town", "the garden", "the beach", "the farm", "the village", "the hill")
OBJECTS = ("ball", "kite", "box", "hat", "book", "cake", "apple", "shell", "toy", "map", "flower", "key")
COLORS = ("red", "blue", "green", "yellow", "shiny", "old", "new", "tiny")
ACTIONS = ("played", "ran", "sang", "danced", "laughed", "jumped", "walked", "talked")
FEELINGS = ("happy", "sad", "surprised", "excited", "scared", "proud", "tired", "curious")

# Sentence templates: {a}, {b} are names; the rest are drawn from the word lists above.
OPENINGS = (
    "once upon a time there was a {adj} {kind} named {a}.",
    "there once lived a {adj} {kind} called {a} in {place}.",
)
MIDDLE = (
    "{a} had a friend named {b}.",
    "{a} and {b} went to {place}.",
    "one day {a} found a {color} {obj} near the tree.",
    "{a} said to {b}, \"look at my {color} {obj}!\"",
    "{b} was {feel} because {a} had a {obj}.",
    "{a} gave the {obj} to {b}.",
    "{b} and {a} {act} all day.",
    "{a} {act} with {b} in {place}.",
    "\"can i have the {obj}?\" asked {b}.",
    "{a} felt {feel} and smiled at {b}.",
    "then {b} {act} to {place}.",
    "{b} thanked {a} for the {color} {obj}.",
)
ENDINGS = ("from that day on, {a} and {b} were best friends.", "{a} went home and slept. the end.")


@dataclasses.dataclass(frozen=True)
class Story:
    text: str
    names: tuple[str, ...]
    spans: tuple[tuple[int, str], ...]  # (character offset, name) of every name occurrence, in order


def random_names(rng: np.random.Generator, count: int) -> list[str]:
    """`count` two-letter names with distinct first letters: upper case then lower case."""
    firsts = rng.choice(26, size=count, replace=False)
    return [string.ascii_uppercase[f] + string.ascii_lowercase[int(rng.integers(26))] for f in firsts]


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def random_story(rng: np.random.Generator, sentences: int = 8) -> Story:
    """A story of an opening, `sentences` middle sentences and an ending, about 2 or 3 characters."""
    names = random_names(rng, int(rng.integers(2, 4)))
    templates = [_pick(rng, OPENINGS)] + [_pick(rng, MIDDLE) for _ in range(sentences)] + [_pick(rng, ENDINGS)]
    parts: list[str] = []
    spans: list[tuple[int, str]] = []
    offset = 0
    for template in templates:
        a, b = (names[i] for i in rng.choice(len(names), size=2, replace=False))
        words = {"adj": _pick(rng, ADJECTIVES), "kind": _pick(rng, KINDS), "place": _pick(rng, PLACES),
                 "obj": _pick(rng, OBJECTS), "color": _pick(rng, COLORS), "act": _pick(rng, ACTIONS),
                 "feel": _pick(rng, FEELINGS), "a": a, "b": b}
        sentence = template.format(**words)
        _collect_spans(template, words, offset, spans)
        parts.append(sentence)
        offset += len(sentence) + 1  # the joining space
    return Story(" ".join(parts), tuple(names), tuple(spans))


def _collect_spans(template: str, words: dict[str, str], offset: int, spans: list[tuple[int, str]]) -> None:
    """Offsets of {a}/{b} in the formatted template, found by formatting its pieces in order."""
    pos = offset
    for literal, field, _, _ in string.Formatter().parse(template):
        pos += len(literal)
        if field is None:
            continue
        if field in ("a", "b"):
            spans.append((pos, words[field]))
        pos += len(words[field])


def repeated(spans: tuple[tuple[int, str], ...]) -> list[tuple[int, str]]:
    """The occurrences of names already seen earlier in the story: the ones the score counts."""
    seen: set[str] = set()
    out = []
    for offset, name in spans:
        if name in seen:
            out.append((offset, name))
        seen.add(name)
    return out


TEST_STREAM = 9_000_001
TRAIN_STREAM = 9_000_002


@functools.lru_cache(maxsize=2)  # evaluations during training reuse it; callers only read
def test_set(count: int) -> list[Story]:
    return [random_story(np.random.default_rng([TEST_STREAM, i])) for i in range(count)]


def train_set(count: int, seed: int, exclude: set[str]) -> list[Story]:
    """`count` training stories; any whose text is a test story's is dropped (disjoint by check)."""
    rng = np.random.default_rng([TRAIN_STREAM, seed])
    out: list[Story] = []
    while len(out) < count:
        story = random_story(rng)
        if story.text not in exclude:
            out.append(story)
    return out
