"""The reasoning benchmark: deterministic, checkable, splits that never overlap."""

import random

import pytest

from tierline_shared.tasks.problems import (
    ANSWER_MARKER,
    FAMILIES,
    LEVELS,
    extract_answer,
    generate,
    is_correct,
    make_problem,
    split_of,
)


def test_same_seed_same_problems_other_seed_others():
    assert generate("test", 50, seed=3) == generate("test", 50, seed=3)
    assert generate("test", 50, seed=3) != generate("test", 50, seed=4)


def test_splits_never_overlap():
    prompts = {s: {p.prompt for p in generate(s, 3000, seed=0)} for s in ("train", "calib", "test")}
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["calib"]
    assert not prompts["calib"] & prompts["test"]
    # a fresh seed draws fresh problems, still inside its own split
    for p in generate("test", 500, seed=99):
        assert split_of(p.prompt) == "test"
        assert p.prompt not in prompts["train"]


def test_balanced_over_levels_and_families():
    ps = generate("calib", 400, seed=1)
    for level in LEVELS:
        assert sum(p.level == level for p in ps) == 80
    for fam in FAMILIES:
        assert sum(p.family == fam for p in ps) == 100


@pytest.mark.parametrize("family", FAMILIES)
def test_worked_chain_ends_in_the_answer(family):
    rng = random.Random(5)
    for level in LEVELS:
        for _ in range(50):
            p = make_problem(rng, family, level)
            assert p.prompt.endswith("\nA:")
            assert p.target.endswith(ANSWER_MARKER + p.answer)
            assert is_correct(p, p.target)
            assert 0 <= int(p.answer) <= 99


def test_answers_are_computed_not_copied():
    # arithmetic answers recomputed with Python's own evaluation
    rng = random.Random(11)
    for level in LEVELS:
        for _ in range(50):
            p = make_problem(rng, "arith", level)
            expr = p.prompt[len("Q:"):].split("=?")[0]
            assert str(eval(expr)) == p.answer, p.prompt  # noqa: S307 - our own generated digits and + - *


def test_difficulty_grows_with_level():
    ps = generate("train", 1000, seed=0)
    steps = {lv: sum(p.target.count(";") + 1 for p in ps if p.level == lv) for lv in LEVELS}
    assert steps[1] < steps[3] < steps[5]


def test_extract_answer_exact():
    assert extract_answer("1+2=3####3") == "3"
    assert extract_answer("####3\nmore") == "3"
    assert extract_answer("no marker 3") is None
    p = make_problem(random.Random(0), "compare", 1)
    assert not is_correct(p, p.target + "0")


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        generate("dev", 3)
    with pytest.raises(ValueError, match="n must be positive"):
        generate("test", 0)
    with pytest.raises(ValueError, match="level"):
        make_problem(random.Random(0), "arith", 6)
