"""The trainer's task: the verifier on hand-written answers, the written-out solutions,
the tokenizer and the seeded splits."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from corrpo.train.task import BOS, EOS, PAD, AdditionTask, Problem, Tokenizer


@pytest.fixture(scope="module")
def task() -> AdditionTask:
    return AdditionTask(digits=3, data_seed=0, eval_size=64)


P = Problem(347, 285)  # 632


@pytest.mark.parametrize(
    "response",
    [
        "7+5+0=12 4+8+1=13 3+2+1=6 >632",  # the written-out solution
        ">632",  # no scratchpad: the verifier judges the outcome only
        "7+5=12 4+9=13 >632",  # sloppy work, right outcome
        "wrong work >100 >632",  # the last stated answer counts
    ],
)
def test_right_answers_pass(task: AdditionTask, response: str) -> None:
    assert task.verify(P, response)


@pytest.mark.parametrize(
    "response, finished",
    [
        ("7+5+0=12 4+8+1=13 3+2+1=6 >631", True),  # off by one
        ("7+5+0=12 4+8+1=13 3+2+1=6 >0632", True),  # leading zero
        ("7+5+0=12 4+8+1=13 3+2+1=6 > 632", True),  # stray space
        ("7+5+0=12 4+8+1=13 3+2+1=6 >632 ", True),  # trailing space
        ("7+5+0=12 4+8+1=13 3+2+1=6 632", True),  # no answer marker
        ("7+5+0=12 4+8+1=13 3+2+1=6 >632", False),  # never emitted EOS: truncated
        (">632>", True),  # an empty final answer
        ("", True),
        (">6320", True),
    ],
)
def test_wrong_answers_fail(task: AdditionTask, response: str, finished: bool) -> None:
    assert not task.verify(P, response, finished)


def test_written_solutions_are_right_and_carry_like_on_paper(task: AdditionTask) -> None:
    assert task.prompt(P) == "347+285="
    assert task.solution(P) == "7+5+0=12 4+8+1=13 3+2+1=6 >632"
    assert task.solution(Problem(999, 1)) == "9+1+0=10 9+0+1=10 9+0+1=10 >1000"
    assert task.solution(Problem(5, 7)) == "5+7+0=12 0+0+1=1 0+0+0=0 >12"
    rng = np.random.default_rng(1)
    for p in task.train_problems(500, rng):
        ids = task.solution_ids(p)
        assert ids[-1] == EOS and len(ids) <= task.max_response_len
        assert task.verify_ids(p, ids)
        assert task.verify_ids(Problem(p.a, p.b + 1), ids) is False


def test_token_ids(task: AdditionTask) -> None:
    tok = Tokenizer()
    text = "0123456789+= >"
    assert tok.decode(tok.encode(text)) == text
    assert len(set(tok.encode(text))) == len(text) and min(tok.encode(text)) > max(PAD, BOS, EOS)
    assert tok.decode([BOS, *tok.encode("12"), EOS, *tok.encode("34")]) == "12"
    with pytest.raises(ValueError, match="'x' is not in the task's alphabet"):
        tok.encode("1x")
    ids = task.prompt_ids(P)
    assert ids[0] == BOS and len(ids) == task.prompt_len
    # A response cut off before its EOS fails; the same text with EOS passes.
    body = tok.encode(task.solution(P))
    assert not task.verify_ids(P, body) and task.verify_ids(P, body + [EOS, PAD])


def test_splits_are_seeded_and_disjoint() -> None:
    a, b, c = (AdditionTask(2, seed, 200) for seed in (0, 0, 1))
    assert a.held_out == b.held_out and a.held_out != c.held_out
    assert len(set(a.held_out)) == 200
    train = a.train_problems(5000, np.random.default_rng(0))
    assert not set(train) & set(a.held_out)
    assert train[:50] == a.train_problems(50, np.random.default_rng(0))
    with pytest.raises(ValueError, match="more than half"):
        AdditionTask(1, 0, 60)
