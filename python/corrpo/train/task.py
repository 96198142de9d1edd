"""The verifiable reasoning task: column addition with a written scratchpad.

A prompt is two zero-padded numbers, ``0347+0285=``; a solution works the columns from the
right, carrying as on paper, then states the sum after ``>``:

    7+5+0=12 4+8+1=13 3+2+1=6 0+0+0=0 >632

The verifier checks the stated sum only (outcome reward), exactly: digits, no leading zero,
nothing after it, and the response must have ended (a truncated one is wrong). The
scratchpad is the model's own business, which is what gives RL something to shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PAD, BOS, EOS = 0, 1, 2
_SPECIALS = 3
ALPHABET = "0123456789+= >"


class Tokenizer:
    """One token per character of ``ALPHABET``, after PAD, BOS and EOS."""

    def __init__(self, alphabet: str = ALPHABET) -> None:
        self.alphabet = alphabet
        self._ids = {c: i + _SPECIALS for i, c in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return _SPECIALS + len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as err:
            raise ValueError(f"{text!r}: character {err.args[0]!r} is not in the task's alphabet") from None

    def decode(self, ids: list[int]) -> str:
        """Text up to the first EOS or PAD (BOS is skipped)."""
        out = []
        for i in ids:
            if i in (EOS, PAD):
                break
            if i >= _SPECIALS:
                out.append(self.alphabet[i - _SPECIALS])
        return "".join(out)


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b


class AdditionTask:
    """``digits``-digit addition. Problems are drawn uniformly; the held-out split is a
    fixed set drawn with ``data_seed`` and the training split is every other problem."""

    name = "add"

    def __init__(self, digits: int = 4, data_seed: int = 0, eval_size: int = 256) -> None:
        if digits < 1 or digits > 9:
            raise ValueError(f"digits must be in 1..9, got {digits}")
        self.digits = digits
        self.tokenizer = Tokenizer()
        space = 10 ** (2 * digits)
        if eval_size > space // 2:
            raise ValueError(f"eval_size {eval_size} is more than half of the {space} problems of {digits} digits")
        rng = np.random.default_rng([data_seed, 0x5EED])
        held: set[int] = set()
        while len(held) < eval_size:
            held.update(int(k) for k in rng.integers(0, space, eval_size - len(held)))
        self._held_out_keys = held
        self.held_out = [self._problem(k) for k in sorted(held)]

    def _problem(self, key: int) -> Problem:
        return Problem(*divmod(key, 10**self.digits))

    def train_problems(self, n: int, rng: np.random.Generator) -> list[Problem]:
        """``n`` training problems (never one of the held-out split)."""
        out: list[Problem] = []
        while len(out) < n:
            key = int(rng.integers(0, 10 ** (2 * self.digits)))
            if key not in self._held_out_keys:
                out.append(self._problem(key))
        return out

    @property
    def prompt_len(self) -> int:
        return 2 * self.digits + 3  # BOS a + b =

    @property
    def max_response_len(self) -> int:
        """Room for a well-formed solution (each column ``d+d+c=ss `` is at most 9
        characters, the sum ``digits + 1``, then EOS) and a few tokens to spare."""
        return 9 * self.digits + self.digits + 1 + 1 + 4

    def prompt(self, p: Problem) -> str:
        return f"{p.a:0{self.digits}d}+{p.b:0{self.digits}d}="

    def solution(self, p: Problem) -> str:
        a, b = f"{p.a:0{self.digits}d}", f"{p.b:0{self.digits}d}"
        steps, carry = [], 0
        for x, y in zip(reversed(a), reversed(b)):
            s = int(x) + int(y) + carry
            steps.append(f"{x}+{y}+{carry}={s}")
            carry = s // 10
        return " ".join(steps) + f" >{p.answer}"

    def prompt_ids(self, p: Problem) -> list[int]:
        return [BOS, *self.tokenizer.encode(self.prompt(p))]

    def solution_ids(self, p: Problem) -> list[int]:
        return [*self.tokenizer.encode(self.solution(p)), EOS]

    def verify(self, p: Problem, response: str, finished: bool = True) -> bool:
        """True when the response ended and states exactly the right sum after its last ``>``."""
        if not finished or ">" not in response:
            return False
        stated = response.rsplit(">", 1)[1]
        return stated == str(p.answer)

    def verify_ids(self, p: Problem, response_ids: list[int]) -> bool:
        """``verify`` on token ids: finished means an EOS was emitted."""
        return self.verify(p, self.tokenizer.decode(response_ids), EOS in response_ids)


TASKS = {AdditionTask.name: AdditionTask}
