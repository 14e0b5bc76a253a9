"""The reasoning benchmark: problems with exactly checkable answers.

Four families (arithmetic, variable tracking, comparison, word problems) at five
difficulty levels. Difficulty grows with the number of reasoning steps, the size
of the numbers and the distractors, not simply with the prompt's length.

Every problem is a prompt and a worked target. The target is a chain of small
steps followed by ``ANSWER_MARKER`` and the final answer, so an answer is
checked exactly by comparing the text after the marker.

Splits never overlap: a prompt belongs to exactly one split, decided by a hash
of its text, so the same question can never be drawn for train and test.
Generation is deterministic for a (seed, split) pair.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Iterator

ANSWER_MARKER = "####"
LEVELS = (1, 2, 3, 4, 5)
FAMILIES = ("arith", "vars", "compare", "word")
SPLITS = ("train", "calib", "test")
# Share of the hash space (out of 100) each split owns: train 80, calib 10, test 10.
_SPLIT_BUCKETS = {"train": range(0, 80), "calib": range(80, 90), "test": range(90, 100)}
MAX_VALUE = 99  # every intermediate value stays in [0, MAX_VALUE]


@dataclass(frozen=True)
class Problem:
    family: str
    level: int  # 1 (easy) .. 5 (hard)
    prompt: str  # what a client sends, ends with "A:"
    target: str  # worked chain + ANSWER_MARKER + answer
    answer: str  # the exact final answer

    @property
    def text(self) -> str:
        return self.prompt + self.target


def split_of(prompt: str) -> str:
    """The one split a prompt belongs to (stable across runs and machines)."""
    bucket = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big") % 100
    for name, owned in _SPLIT_BUCKETS.items():
        if bucket in owned:
            return name
    raise AssertionError(f"bucket {bucket} owned by no split")


def extract_answer(completion: str) -> str | None:
    """The final answer in a model's completion, or None when there is no marker."""
    if ANSWER_MARKER not in completion:
        return None
    tail = completion.rsplit(ANSWER_MARKER, 1)[1]
    return tail.split("\n", 1)[0].strip()


def is_correct(problem: Problem, completion: str) -> bool:
    return extract_answer(completion) == problem.answer


# ---------------------------------------------------------------- families
# Each maker takes (rng, level) and returns (question, chain, answer) or None to
# ask for another draw (a value left [0, MAX_VALUE]).


def _arith(rng: random.Random, level: int):
    """Multi-step arithmetic on one-digit numbers, worked left to right.

    Each step takes the running value and the next term; a product term is
    worked inside its step (`7+4*5=7+20=27`), so products still come before
    sums and every step reads only the previous result and the next term.
    """
    n_ops = level
    nums = [rng.randint(0, 9) for _ in range(n_ops + 1)]
    ops = [rng.choice("+-*") if level > 1 else rng.choice("+-") for _ in range(n_ops)]
    if any(a == b == "*" for a, b in zip(ops, ops[1:])):
        return None  # no chained products: keep each step one table look-up
    # terms: (sign, a, b) with b None for a plain number
    terms, i = [], 0
    signs = ["+", *[op for op in ops if op != "*"]]
    while i < len(nums):
        if i < len(ops) and ops[i] == "*":
            terms.append((nums[i], nums[i + 1]))
            i += 2
        else:
            terms.append((nums[i], None))
            i += 1
    steps = []
    a, b = terms[0]
    acc = a if b is None else a * b
    if b is not None:
        steps.append(f"{a}*{b}={acc}")
    for sign, (a, b) in zip(signs[1:], terms[1:]):
        term = a if b is None else a * b
        new = acc + term if sign == "+" else acc - term
        if not 0 <= new <= MAX_VALUE:
            return None
        steps.append(f"{acc}{sign}{a}={new}" if b is None else f"{acc}{sign}{a}*{b}={acc}{sign}{term}={new}")
        acc = new
    expr = str(nums[0]) + "".join(f"{op}{n}" for op, n in zip(ops, nums[1:]))
    return f"{expr}=?", ";".join(steps), str(acc)


_VAR_NAMES = "abcdefghjkmnpqrstuvwxyz"


def _vars(rng: random.Random, level: int):
    """Variable tracking: a chain of assignments (`a=3;b=a+4;c=b*2;c=?`), the last one asked.

    Each assignment reads the one before it; from level 3 on, a literal may restart
    the chain (`f=12`), and levels add steps and larger values. The worked chain walks
    the assignments in order: it restates each one (`e=p+9`), so the next one is found
    by matching the last restated one in the question; a value is stored as a fact
    `e:26` (right after the number it copies) and read back as `p?17`, so storing is a
    local copy and reading a look-up by key, never confused: `e=p+9;p?17+9=26;e:26`.

    Reading a variable assigned arbitrarily far back (any earlier source, any asked
    variable) was tried and dropped: no model this project can train in its CPU budget
    learnt it (about 55% on levels 3-5 vars for the teacher, whatever the chain format,
    positions, training mix or attention supervision; see docs/ARCHITECTURE.md).
    """
    n_assign = level + 1
    names = rng.sample(_VAR_NAMES, n_assign)
    values: dict[str, int] = {}
    decls, steps = [], []
    for i, name in enumerate(names):
        if i == 0 or (level >= 3 and rng.random() < 0.25):
            v = rng.randint(0, 9 if level < 3 else 20)
            decls.append(f"{name}={v}")
            steps.append(f"{name}={v};{name}:{v}")
            values[name] = v
            continue
        src = names[i - 1]  # the chain runs through every assignment; a literal restarts it
        op = rng.choice("+-*" if values[src] <= 9 else "+-")  # products stay one table look-up
        k = rng.randint(1, 9)
        v = {"+": values[src] + k, "-": values[src] - k, "*": values[src] * k}[op]
        if not 0 <= v <= MAX_VALUE:
            return None
        decls.append(f"{name}={src}{op}{k}")
        steps.append(f"{name}={src}{op}{k};{src}?{values[src]}{op}{k}={v};{name}:{v}")
        values[name] = v
    asked = names[-1]
    steps.append(f"{asked}?{values[asked]}")
    return ";".join(decls) + f";{asked}=?", ";".join(steps), str(values[asked])


def _compare(rng: random.Random, level: int):
    """Largest or smallest of a list, by a running comparison."""
    n = level + 1
    hi = (9, 50, 99, 99, 99)[level - 1]
    xs = [rng.randint(0, hi) for _ in range(n)]
    if len(set(xs)) != n:
        return None
    kind = rng.choice(("max", "min"))
    pick = max if kind == "max" else min
    best, steps = xs[0], []
    for x in xs[1:]:
        new = pick(best, x)
        steps.append(f"{kind}({best},{x})={new}")
        best = new
    return f"{kind}({','.join(map(str, xs))})=?", ";".join(steps), str(best)


_NAMES = ("Tom", "Ann", "Bob", "Eva", "Max", "Sue", "Leo", "Mia")
_ITEMS = ("apples", "pens", "cards", "coins", "books", "eggs")


def _word(rng: random.Random, level: int):
    """A short story of gains and losses with distractor sentences.

    The worked chain restates every sentence in order (so the next one is found by
    matching the last restated one in the story), then works it if it concerns the
    question (`Ann gets 7 apples:12+7=19`) or marks it `-` if not
    (`Mia gets 3 apples:-`). The first sentence gives the start value
    (`Ann has 12 apples:12`).
    """
    n_events = (1, 1, 2, 2, 3)[level - 1]
    n_distract = (0, 1, 1, 2, 2)[level - 1]
    hi = (9, 9, 20, 20, 20)[level - 1]
    who, other = rng.sample(_NAMES, 2)
    item, other_item = rng.sample(_ITEMS, 2)
    have = rng.randint(0, hi)
    # sentences as (text, work); the story's first sentence gives the start value
    first = (f"{who} has {have} {item}", str(have))
    events = []
    for _ in range(n_events):
        k = rng.randint(1, 9)
        gets = rng.random() < 0.5
        new = have + k if gets else have - k
        if not 0 <= new <= MAX_VALUE:
            return None
        verb, op = ("gets", "+") if gets else ("gives", "-")
        events.append((f"{who} {verb} {k} {item}", f"{have}{op}{k}={new}"))
        have = new
    distract = []
    for _ in range(n_distract):
        d = rng.choice(
            (
                f"{other} has {rng.randint(0, hi)} {item}",
                f"{who} has {rng.randint(0, hi)} {other_item}",
                f"{other} gets {rng.randint(1, 9)} {item}",
            )
        )
        distract.append((d, "-"))
    # distractors go anywhere after the first sentence; events keep their order
    body = events[:]
    for d in distract:
        body.insert(rng.randint(0, len(body)), d)
    story = [first, *body]
    question = " ".join(f"{text}." for text, _ in story) + f" How many {item} has {who}?"
    return question, ";".join(f"{text}:{work}" for text, work in story), str(have)


_MAKERS: dict[str, Callable] = {"arith": _arith, "vars": _vars, "compare": _compare, "word": _word}


def make_problem(rng: random.Random, family: str, level: int) -> Problem:
    """One problem of a family and level (any split)."""
    if family not in _MAKERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    while True:
        made = _MAKERS[family](rng, level)
        if made is not None:
            question, chain, answer = made
            return Problem(family, level, f"Q:{question}\nA:", f"{chain}{ANSWER_MARKER}{answer}", answer)


def iter_problems(split: str, seed: int, levels=LEVELS, families=FAMILIES) -> Iterator[Problem]:
    """An endless, deterministic stream of the split's problems, levels and families in turn."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = random.Random(f"{seed}:{split}")
    i = 0
    while True:
        level = levels[i % len(levels)]
        family = families[(i // len(levels)) % len(families)]
        p = make_problem(rng, family, level)
        if split_of(p.prompt) == split:
            i += 1
            yield p


def generate(split: str, n: int, seed: int = 0, levels=LEVELS, families=FAMILIES) -> list[Problem]:
    """``n`` problems of a split, balanced over levels and families."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    stream = iter_problems(split, seed, levels, families)
    return [next(stream) for _ in range(n)]
