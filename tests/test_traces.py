"""The math-trace generator: its arithmetic, answers, verifier and data handling, each checked
against a computation of its own (Fraction arithmetic, numbers parsed back from the text)."""

import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction

import pytest

from corrpo import traces
from corrpo.errors import ConfigError, InvalidValueError

PER_KIND = 500


@pytest.fixture(scope="module")
def problems():
    return traces.generate(PER_KIND * len(traces.KINDS), seed=1)


# "a op b = c" with whole numbers; the look-arounds keep a number from being read in part.
EQUATION = re.compile(r"(?<![\d.,])(\d+) ([-+x×*/÷]) (\d+) = (\d+)(?![.,]?\d)")
OPS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "x": lambda a, b: a * b,
    "×": lambda a, b: a * b,
    "*": lambda a, b: a * b,
    "/": lambda a, b: a / b,
    "÷": lambda a, b: a / b,
}


def test_every_equation_is_true(problems):
    assert Counter(p.kind for p in problems) == {kind: PER_KIND for kind in traces.KINDS}
    for p in problems:
        found = EQUATION.findall(p.solution)
        # Every "=" in the text belongs to an equation the pattern read, so none goes unchecked.
        assert len(found) == p.solution.count("=") >= 3, p.solution
        for a, op, b, c in found:
            assert OPS[op](Fraction(a), Fraction(b)) == Fraction(c), f"{a} {op} {b} = {c} in {p.id}"


def test_answer_line_and_verifier(problems):
    for p in problems:
        assert p.solution.rsplit("\n", 1)[1] == f"#### {p.answer}"
        assert "Check:" in p.solution
        assert traces.extract_answer(p.solution) == p.answer
        assert traces.verify(p.solution, p.answer) == 1.0
        assert traces.verify(p.solution, p.answer + 1) == 0.0


def test_solution_lengths(problems):
    words = [len(p.solution.split()) for p in problems]
    assert 80 <= min(words) and max(words) <= 200


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 45.\n#### 45", 45),
        ("#### 1,200.", 1200),
        ("#### $45", 45),
        ("####  $ 1,234,567 ", 1234567),
        ("#### -3", -3),
        ("#### 7\nmore text after the line", 7),
        ("#### 12\nwait, redo\n#### 13", 13),
        ("the answer is 45", None),
        ("#### abc", None),
        ("#### 45 apples", None),
        ("#### 12,00", None),
        ("#### 4.5", None),
        ("####", None),
        ("#### 12\n####", None),  # the last answer line decides, even when it is empty
    ],
)
def test_extract_answer(text, expected):
    assert traces.extract_answer(text) == expected


def numbers(pattern, question):
    match = re.fullmatch(pattern, question)
    return None if match is None else [int(g) for g in match.groups()]


def test_answers_recomputed_from_the_question(problems):
    """Three templates' answers from the numbers in their questions, by the problem's own logic."""
    recompute = {
        # change = bill - (a * p1 + b * p2)
        r"\w+ buys (\d+) [\w -]+ at \$(\d+) each and (\d+) [\w -]+ at \$(\d+) each\. \w+ pays with \$(\d+)\..*": lambda a, p1, b, p2, bill: bill - a * p1 - b * p2,
        # the younger age = (sum - gap) / 2
        r"The ages of \w+ and \w+ add up to (\d+) years\. \w+ is (\d+) years older than \w+\. How old is \w+\?": lambda s, d: Fraction(s - d, 2),
        # the amount paid = k * price * (100 - off) / 100
        r"A [\w -]+ costs \$(\d+)\. During a sale the store takes (\d+)% off the price\. \w+ buys (\d+) [\w -]+ on sale\..*": lambda price, off, k: Fraction(k * price * (100 - off), 100),
    }
    matched = Counter()
    for p in problems:
        for pattern, answer in recompute.items():
            found = numbers(pattern, p.question)
            if found is not None:
                matched[pattern] += 1
                assert answer(*found) == p.answer, p.question
    assert len(matched) == len(recompute) and min(matched.values()) >= 50, matched


def test_deterministic_and_seeded():
    first = traces.generate(40, seed=3)
    assert traces.generate(40, seed=3) == first
    assert traces.generate(15, seed=3) == first[:15]  # a prefix of a longer list
    other = traces.generate(40, seed=4)
    assert not {p.question for p in first} & {p.question for p in other}


def test_kinds_cycled_no_duplicates_ids(problems):
    assert [p.kind for p in problems[:10]] == list(traces.KINDS) * 2
    assert len({p.question for p in problems}) == len(problems)
    assert len({p.id for p in problems}) == len(problems)
    assert all(re.fullmatch(r"[a-z]+-\d{6}", p.id) for p in problems)
    only = traces.generate(9, seed=0, kinds=("ages", "units"))
    assert [p.kind for p in only] == ["ages", "units"] * 4 + ["ages"]


def test_generate_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="'algebra'") as e:
        traces.generate(3, seed=0, kinds=("ages", "algebra"))
    assert e.value.field == "kinds"
    with pytest.raises(ConfigError, match="non-negative") as e:
        traces.generate(-1, seed=0)
    assert e.value.field == "n"


def test_split_is_disjoint():
    train, held_out = traces.split(60, 25, seed=2)
    assert (len(train), len(held_out)) == (60, 25)
    assert not {p.question for p in train} & {p.question for p in held_out}
    assert not {p.id for p in train} & {p.id for p in held_out}
    assert set(traces.KINDS) == {p.kind for p in held_out}


def test_messages():
    p = traces.generate(1, seed=0)[0]
    chat = traces.messages(p)
    assert [m["role"] for m in chat] == ["user", "assistant"]  # no system role: Gemma's template has none
    assert chat[0]["content"] == traces.SYSTEM + "\n\n" + p.question
    assert chat[1]["content"] == p.solution
    assert traces.messages(p, with_answer=False) == chat[:1]


def test_reward_takes_both_completion_shapes():
    answers = [12, 7, 300]
    strings = ["... so 12\n#### 12", "#### 8", "Check: fine.\n#### $300."]
    assert traces.reward(["q"] * 3, strings, answers) == [1.0, 0.0, 1.0]
    chats = [[{"role": "assistant", "content": text}] for text in strings]
    assert traces.reward(["q"] * 3, chats, answers, completion_ids=[[1]] * 3, trainer_state=None) == [1.0, 0.0, 1.0]
    parts = [[{"role": "assistant", "content": [{"type": "text", "text": "#### 12"}]}]]
    assert traces.reward(["q"], parts, [12]) == [1.0]
    with pytest.raises(InvalidValueError, match="3 completions but 2 answers"):
        traces.reward(["q"] * 3, strings, answers[:2])
    with pytest.raises(InvalidValueError, match=r"answer\[1\] must be an integer") as e:
        traces.reward(["q"] * 3, strings, [12, "7", 300])
    assert e.value.index == 1


def test_jsonl_round_trip(tmp_path, problems):
    path = tmp_path / "traces.jsonl"
    traces.to_jsonl(problems[:30], path)
    assert traces.from_jsonl(path) == problems[:30]
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text(lines[0] + "\n" + lines[1].replace('"answer"', '"answr"') + "\n", encoding="utf-8")
    with pytest.raises(InvalidValueError, match=r":2: missing field 'answer'") as e:
        traces.from_jsonl(path)
    assert (e.value.row, e.value.field) == (2, "answer")
    path.write_text(lines[0].replace(f'"answer": {problems[0].answer}', '"answer": "5"') + "\n", encoding="utf-8")
    with pytest.raises(InvalidValueError, match=r":1: field 'answer' must be int") as e:
        traces.from_jsonl(path)


def test_imports_no_torch():
    code = "import sys, corrpo.traces; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
