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
    """Multi-step arithmetic on one-digit numbers; products first, then left to right.

    Each worked step is one fact (a two-digit running value plus or minus a digit,
    or a product of two digits), so the difficulty is the number of steps.
    """
    n_ops = level
    nums = [rng.randint(0, 9) for _ in range(n_ops + 1)]
    ops = [rng.choice("+-*") if level > 1 else rng.choice("+-") for _ in range(n_ops)]
    if any(a == b == "*" for a, b in zip(ops, ops[1:])):
        return None  # no chained products: keep each step one table look-up
    steps = []
    vals, rest_ops = [nums[0]], []
    for op, n in zip(ops, nums[1:]):
        if op == "*":
            prod = vals[-1] * n
            steps.append(f"{vals[-1]}*{n}={prod}")
            vals[-1] = prod
        else:
            vals.append(n)
            rest_ops.append(op)
    acc = vals[0]
    for op, n in zip(rest_ops, vals[1:]):
        new = acc + n if op == "+" else acc - n
        steps.append(f"{acc}{op}{n}={new}")
        acc = new
        if not 0 <= acc <= MAX_VALUE:
            return None
    expr = str(nums[0]) + "".join(f"{op}{n}" for op, n in zip(ops, nums[1:]))
    return f"{expr}=?", ";".join(steps), str(acc)


_VAR_NAMES = "abcdefghjkmnpqrstuvwxyz"


def _vars(rng: random.Random, level: int):
    """Variable tracking: a chain of assignments, one asked for."""
    n_assign = level + 1
    names = rng.sample(_VAR_NAMES, n_assign)
    values: dict[str, int] = {}
    decls, steps = [], []
    for i, name in enumerate(names):
        if i == 0 or (level >= 3 and rng.random() < 0.25):
            v = rng.randint(0, 9 if level < 3 else 20)
            decls.append(f"{name}={v}")
            values[name] = v
            continue
        src = rng.choice(names[:i]) if level >= 3 else names[i - 1]
        op = rng.choice("+-*" if values[src] <= 9 else "+-")  # products stay one table look-up
        k = rng.randint(1, 9)
        v = {"+": values[src] + k, "-": values[src] - k, "*": values[src] * k}[op]
        if not 0 <= v <= MAX_VALUE:
            return None
        decls.append(f"{name}={src}{op}{k}")
        steps.append(f"{name}={values[src]}{op}{k}={v}")
        values[name] = v
    asked = names[-1] if level < 4 else rng.choice(names[1:])
    if not steps:
        return None
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
    """A short story of gains and losses with distractor sentences."""
    n_events = (1, 1, 2, 2, 3)[level - 1]
    n_distract = (0, 1, 1, 2, 2)[level - 1]
    hi = (9, 9, 20, 20, 20)[level - 1]
    who, other = rng.sample(_NAMES, 2)
    item, other_item = rng.sample(_ITEMS, 2)
    have = rng.randint(0, hi)
    story = [f"{who} has {have} {item}."]
    steps = []
    events = []
    for _ in range(n_events):
        k = rng.randint(1, 9)
        if rng.random() < 0.5:
            events.append(f"{who} gets {k} {item}.")
            new = have + k
            steps.append(f"{have}+{k}={new}")
        else:
            events.append(f"{who} gives {k} {item}.")
            new = have - k
            steps.append(f"{have}-{k}={new}")
        if not 0 <= new <= MAX_VALUE:
            return None
        have = new
    distract = []
    for _ in range(n_distract):
        d = rng.choice(
            (
                f"{other} has {rng.randint(0, hi)} {item}.",
                f"{who} has {rng.randint(0, hi)} {other_item}.",
                f"{other} gets {rng.randint(1, 9)} {item}.",
            )
        )
        distract.append(d)
    # distractors go anywhere after the first sentence; events keep their order
    body = events[:]
    for d in distract:
        body.insert(rng.randint(0, len(body)), d)
    story += body
    return " ".join(story) + f" How many {item} has {who}?", ";".join(steps), str(have)


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
