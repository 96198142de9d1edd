"""Reasoning traces made locally: seeded grade-school math word problems with long solutions.

Five kinds (``KINDS``): rates, percentages, unit conversions, ages and multi-step arithmetic,
several templates each, with random names, items and numbers. The numbers are chosen so that
every intermediate result is a whole number. Each solution restates what is known, works one
step per line with the arithmetic written as ``a op b = c`` inside a sentence, checks the
result another way, and ends with GSM8K's answer line ``#### <integer>``, which
``extract_answer`` reads back. ``reward`` is that verifier in the shape of a TRL
``GRPOTrainer`` reward function.

    train, held_out = split(3000, 300, seed=0)
    dataset = [{"messages": messages(p)} for p in train]                      # SFTTrainer
    prompts = [{"prompt": messages(p, with_answer=False), "answer": p.answer} for p in held_out]  # GRPOTrainer

Pure Python: nothing is downloaded and nothing heavier than the standard library is imported.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from math import gcd
from pathlib import Path

from .errors import ConfigError, InvalidValueError

KINDS: tuple[str, ...] = ("rates", "percentages", "units", "ages", "arithmetic")

SYSTEM = (
    "Solve the math problem step by step. Write each calculation as an equation, check the "
    "result another way, and end with a final line of the form #### <answer>."
)

_ID_PREFIX = {"rates": "rate", "percentages": "pct", "units": "unit", "ages": "age", "arithmetic": "arith"}


@dataclass(frozen=True)
class Problem:
    id: str  # "<kind prefix>-<position in the generated list>", e.g. "rate-000123"
    kind: str  # one of KINDS
    question: str
    solution: str  # the step-by-step text, ending with "#### <answer>"
    answer: int


class _Rng:
    """Draws from ``random.Random.random`` only: it is the one method whose stream Python
    promises to keep across versions, so a seed names the same problems on every Python."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def int(self, low: int, high: int) -> int:
        """Uniform in [low, high], both included."""
        return low + min(int(self._random.random() * (high - low + 1)), high - low)

    def pick(self, options: Sequence):
        return options[self.int(0, len(options) - 1)]

    def distinct(self, options: Sequence, k: int) -> list:
        """``k`` different entries of ``options``."""
        pool = list(options)
        return [pool.pop(self.int(0, len(pool) - 1)) for _ in range(k)]


_NAMES = (
    "Ava", "Ben", "Carla", "Diego", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jamal", "Keiko", "Liam",
    "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq", "Uma", "Victor", "Wen", "Yara", "Zoe",
)
# (singular, plural) of things bought in a shop, with a sensible range of unit prices in dollars.
_GOODS = (
    ("notebook", "notebooks", 2, 9), ("pen", "pens", 1, 5), ("book", "books", 6, 20), ("mug", "mugs", 4, 12),
    ("T-shirt", "T-shirts", 8, 25), ("toy car", "toy cars", 3, 15), ("plant", "plants", 5, 18),
    ("lamp", "lamps", 12, 40), ("backpack", "backpacks", 15, 45), ("puzzle", "puzzles", 7, 22),
)
_SMALL_THINGS = ("stickers", "marbles", "trading cards", "beads", "stamps", "crayons")
_FRUIT = ("apples", "oranges", "pears", "peaches", "lemons", "plums")
_BAKED = ("muffins", "cookies", "bagels", "rolls", "donuts", "cupcakes")
_INSTRUMENTS = ("piano", "violin", "guitar", "drums", "flute", "cello")
# (what is done, the thing done) for work-rate problems.
_TASKS = (("pack", "boxes"), ("fold", "paper cranes"), ("type", "pages"), ("stack", "chairs"), ("label", "jars"), ("wash", "plates"))

_OPENERS = ("Let's write down what we know.", "Start by listing the facts the problem gives.", "Here is what the problem tells us.")
_ORDINALS = ("First", "Next", "Then", "After that", "Now")


def _eq(a: int, op: str, b: int) -> tuple[str, int]:
    """``("a op b = c", c)``. The templates choose their numbers so that c is a whole,
    non-negative number; a slip there would put a false line in a training trace, so it stops."""
    if op == "÷":
        if b == 0 or a % b:
            raise ArithmeticError(f"{a} ÷ {b} is not a whole number")
        c = a // b
    else:
        c = {"+": a + b, "-": a - b, "×": a * b}[op]
    if c < 0:
        raise ArithmeticError(f"{a} {op} {b} is negative")
    return f"{a} {op} {b} = {c}", c


@dataclass(frozen=True)
class _Worked:
    question: str
    facts: list[str]
    goal: str
    steps: list[str]  # one sentence each, without the "Step k:" label
    check: str  # the sentence after "Check: "
    answer: int


def _solution(w: _Worked, rng: _Rng) -> str:
    lines = [rng.pick(_OPENERS)]
    lines += [f"- {fact}" for fact in w.facts]
    lines += [f"We need to find {w.goal}.", ""]
    numbered = rng.int(0, 1) == 1
    for k, step in enumerate(w.steps):
        if numbered:
            lines.append(f"Step {k + 1}: {step}")
        else:
            word = "Finally" if k == len(w.steps) - 1 else _ORDINALS[min(k, len(_ORDINALS) - 2)]
            first = step.split(" ", 1)[0].removesuffix("'s")
            lines.append(f"{word}, {step if first in _NAMES else step[0].lower() + step[1:]}")
    lines += ["", f"Check: {w.check}", f"So the answer is {w.answer}.", f"#### {w.answer}"]
    return "\n".join(lines)


# ---- rates ----------------------------------------------------------------------------------


def _rate_two_legs(rng: _Rng) -> _Worked:
    name = rng.pick(_NAMES)
    verb, base, low, high = rng.pick((("drives", "drive", 30, 90), ("cycles", "cycle", 10, 25), ("walks", "walk", 3, 6)))
    v1, v2 = rng.distinct(range(low, high + 1), 2)
    t1, t2 = rng.int(2, 6), rng.int(2, 6)
    if rng.int(0, 1):
        q = f"{name} {verb} at {v1} km per hour for {t1} hours, then at {v2} km per hour for {t2} hours. How many kilometers does {name} {base} in total?"
    else:
        q = f"For the first {t1} hours of a trip, {name} {verb} at a steady {v1} km per hour. For the next {t2} hours the speed is {v2} km per hour. What is the total distance of the trip in kilometers?"
    e1, d1 = _eq(v1, "×", t1)
    e2, d2 = _eq(v2, "×", t2)
    e3, total = _eq(d1, "+", d2)
    c1, _ = _eq(total, "-", d2)
    c2, _ = _eq(d1, "÷", t1)
    return _Worked(
        q,
        [f"The first part of the trip takes {t1} hours at {v1} km per hour.", f"The second part takes {t2} hours at {v2} km per hour.", "Distance equals speed times time."],
        "the total distance in kilometers",
        [
            f"The distance of the first part is {v1} times {t1}, so {e1} kilometers.",
            f"The distance of the second part is {v2} times {t2}, so {e2} kilometers.",
            f"The whole trip is the sum of the two parts: {e3} kilometers.",
        ],
        f"Going back, {c1} kilometers for the first part, and {c2}, which matches the first speed of {v1} km per hour.",
        total,
    )


def _rate_same_speed(rng: _Rng) -> _Worked:
    name = rng.pick(_NAMES)
    t1, t2 = rng.distinct(range(2, 10), 2)
    if rng.int(0, 1):
        speed = 5 * rng.int(8, 18)
        d1, d2 = speed * t1, speed * t2
        q = f"A train travels {d1} km in {t1} hours. Moving at the same speed, how many hours will it take the train to travel {d2} km?"
        who = "the train"
    else:
        speed = rng.int(8, 20)
        d1, d2 = speed * t1, speed * t2
        q = f"{name} rides a bike {d1} km in {t1} hours. If {name} keeps the same pace, how many hours will a ride of {d2} km take?"
        who = name
    e1, s = _eq(d1, "÷", t1)
    e2, hours = _eq(d2, "÷", s)
    c1, _ = _eq(s, "×", hours)
    return _Worked(
        q,
        [f"{who[0].upper()}{who[1:]} covers {d1} km in {t1} hours.", f"The speed stays the same for a distance of {d2} km.", "Speed equals distance divided by time, and time equals distance divided by speed."],
        f"how many hours {who} needs for {d2} km",
        [
            f"The speed is the distance divided by the time: {e1} km per hour.",
            f"At {s} km per hour, the time for {d2} km is {e2} hours.",
        ],
        f"moving at {s} km per hour for {hours} hours gives {c1} km, which matches the distance of {d2} km.",
        hours,
    )


def _rate_work(rng: _Rng) -> _Worked:
    a, b = rng.distinct(_NAMES, 2)
    verb, things = rng.pick(_TASKS)
    r1, r2 = rng.int(3, 15), rng.int(3, 15)
    hours = rng.int(2, 9)
    n = (r1 + r2) * hours
    q = f"{a} can {verb} {r1} {things} per hour, and {b} can {verb} {r2} {things} per hour. Working together, how many hours will it take them to {verb} {n} {things}?"
    e1, both = _eq(r1, "+", r2)
    e2, h = _eq(n, "÷", both)
    c1, x = _eq(r1, "×", h)
    c2, y = _eq(r2, "×", h)
    c3, _ = _eq(x, "+", y)
    return _Worked(
        q,
        [f"{a} can {verb} {r1} {things} in one hour.", f"{b} can {verb} {r2} {things} in one hour.", f"Together they must {verb} {n} {things}."],
        "the number of hours they need working together",
        [
            f"When they work together, their rates add up: {e1} {things} per hour.",
            f"The time needed is the total divided by the joint rate: {e2} hours.",
        ],
        f"in {h} hours {a} does {c1} {things} and {b} does {c2} {things}, and {c3}, which matches the {n} {things} they had to {verb}.",
        h,
    )


def _rate_tank(rng: _Rng) -> _Worked:
    fill = rng.int(6, 25)
    leak = rng.int(1, fill - 2)
    minutes = rng.int(3, 20)
    volume = (fill - leak) * minutes
    q = f"A tank is filled by a hose that adds {fill} liters per minute, but a leak lets {leak} liters per minute drain out. The tank starts empty and holds {volume} liters. How many minutes does it take to fill the tank?"
    e1, net = _eq(fill, "-", leak)
    e2, m = _eq(volume, "÷", net)
    c1, x = _eq(fill, "×", m)
    c2, y = _eq(leak, "×", m)
    c3, _ = _eq(x, "-", y)
    return _Worked(
        q,
        [f"The hose adds {fill} liters every minute.", f"The leak removes {leak} liters every minute.", f"The tank is empty at the start and holds {volume} liters."],
        "how many minutes it takes to fill the tank",
        [
            f"Each minute the water in the tank goes up by the difference: {e1} liters.",
            f"To reach {volume} liters at {net} liters per minute takes {e2} minutes.",
        ],
        f"in {m} minutes the hose adds {c1} liters and the leak removes {c2} liters, and {c3}, which matches the size of the tank.",
        m,
    )


# ---- percentages ----------------------------------------------------------------------------


def _pct_discount(rng: _Rng) -> _Worked:
    name = rng.pick(_NAMES)
    one, many, _, _ = rng.pick(_GOODS)
    price = 20 * rng.int(1, 10)  # a multiple of 20 and a multiple-of-5 percent give whole dollars
    off = 5 * rng.int(2, 10)
    k = rng.int(2, 6)
    q = f"A {one} costs ${price}. During a sale the store takes {off}% off the price. {name} buys {k} {many} on sale. How many dollars does {name} pay?"
    e1, x = _eq(price, "×", off)
    e2, cut = _eq(x, "÷", 100)
    e3, sale = _eq(price, "-", cut)
    e4, total = _eq(sale, "×", k)
    c1, full = _eq(price, "×", k)
    c2, saved = _eq(cut, "×", k)
    c3, _ = _eq(full, "-", saved)
    return _Worked(
        q,
        [f"One {one} costs {price} dollars.", f"The sale takes {off}% off.", f"{name} buys {k} {many}."],
        f"how much {name} pays",
        [
            f"To find {off}% of {price}, multiply {price} by {off}: {e1}.",
            f"Dividing that by 100 gives {e2}, so each {one} is {cut} dollars cheaper.",
            f"The sale price of one {one} is {e3} dollars.",
            f"For {k} {many}, {name} pays {e4} dollars.",
        ],
        f"without the sale {k} {many} cost {c1} dollars, the sale saves {c2} dollars, and {c3}, which matches the total.",
        total,
    )


def _pct_tax(rng: _Rng) -> _Worked:
    name = rng.pick(_NAMES)
    price = 20 * rng.int(1, 8)
    tax = 5 * rng.int(1, 5)
    tip = rng.int(2, 15)
    q = f"{name} orders a meal that costs ${price} before tax. The sales tax is {tax}%, and {name} also leaves a ${tip} tip. How many dollars does {name} spend in total?"
    e1, x = _eq(price, "×", tax)
    e2, t = _eq(x, "÷", 100)
    e3, sub = _eq(price, "+", t)
    e4, total = _eq(sub, "+", tip)
    c1, _ = _eq(total, "-", tip)
    c2, _ = _eq(sub, "-", price)
    return _Worked(
        q,
        [f"The meal costs {price} dollars before tax.", f"The tax is {tax}% of the price.", f"The tip is {tip} dollars."],
        f"the total amount {name} spends",
        [
            f"To find {tax}% of {price}, multiply {price} by {tax}: {e1}.",
            f"Dividing by 100 gives the tax: {e2} dollars.",
            f"The meal with tax costs {e3} dollars.",
            f"Adding the tip, the total is {e4} dollars.",
        ],
        f"{c1} dollars before the tip, and {c2} dollars of tax, which matches {tax}% of {price}.",
        total,
    )


def _pct_change(rng: _Rng) -> _Worked:
    start = 20 * rng.int(5, 50)
    pct = 5 * rng.int(1, 10)
    change = start * pct // 100
    shape = rng.int(0, 2)
    if shape == 0:
        q = f"A town had {start} residents last year. This year the number of residents grew by {pct}%. How many residents does the town have now?"
        e1, x = _eq(start, "×", pct)
        e2, d = _eq(x, "÷", 100)
        e3, new = _eq(start, "+", d)
        c1, _ = _eq(new, "-", start)
        return _Worked(
            q,
            [f"Last year the town had {start} residents.", f"The number grew by {pct}%."],
            "the number of residents now",
            [f"To find {pct}% of {start}, multiply {start} by {pct}: {e1}.", f"Dividing that by 100 gives {e2} new residents.", f"The town now has {e3} residents."],
            f"{c1}, and {pct}% of {start} is {d}, which matches the growth.",
            new,
        )
    if shape == 1:
        goods = rng.pick(_BAKED)
        q = f"A cafe sold {start} {goods} in March. In April its sales fell by {pct}%. How many {goods} did it sell in April?"
        e1, x = _eq(start, "×", pct)
        e2, d = _eq(x, "÷", 100)
        e3, new = _eq(start, "-", d)
        c1, _ = _eq(new, "+", d)
        return _Worked(
            q,
            [f"In March the cafe sold {start} {goods}.", f"In April sales fell by {pct}%."],
            f"the number of {goods} sold in April",
            [f"To find {pct}% of {start}, multiply {start} by {pct}: {e1}.", f"Dividing that by 100 gives {e2} fewer {goods}.", f"In April the cafe sold {e3} {goods}."],
            f"{c1}, which matches the {start} {goods} sold in March.",
            new,
        )
    one = rng.pick(_GOODS)[0]
    end = start + change
    q = f"The price of a {one} rose from ${start} to ${end}. By what percent did the price go up?"
    e1, d = _eq(end, "-", start)
    e2, x = _eq(d, "×", 100)
    e3, p = _eq(x, "÷", start)
    c1, y = _eq(start, "×", p)
    c2, _ = _eq(y, "÷", 100)
    c3, _ = _eq(start, "+", d)
    return _Worked(
        q,
        [f"The old price was {start} dollars.", f"The new price is {end} dollars.", "A percent change is the change divided by the old price, times 100."],
        "the percent increase",
        [f"The price went up by {e1} dollars.", f"Multiply the increase by 100: {e2}.", f"Divide by the old price: {e3}, so the increase is {p}%."],
        f"{p}% of {start} is {c1} and {c2}, and {c3}, which matches the new price.",
        p,
    )


# ---- unit conversions -----------------------------------------------------------------------


def _unit_minutes(rng: _Rng) -> _Worked:
    name = rng.pick(_NAMES)
    per_day = rng.pick((10, 12, 15, 20, 25, 30, 40, 45, 50, 75, 90))
    days = 60 // gcd(per_day, 60) * rng.int(1, 4)  # so that the minutes make whole hours
    q = f"{name} practices the {rng.pick(_INSTRUMENTS)} for {per_day} minutes every day for {days} days. How many hours of practice is that in total?"
    e1, minutes = _eq(per_day, "×", days)
    e2, hours = _eq(minutes, "÷", 60)
    c1, _ = _eq(hours, "×", 60)
    c2, _ = _eq(minutes, "÷", days)
    return _Worked(
        q,
        [f"{name} practices {per_day} minutes a day.", f"The practice goes on for {days} days.", "One hour has 60 minutes."],
        "the total practice time in hours",
        [
            f"The total time in minutes is {e1} minutes.",
            f"To change minutes into hours, divide by 60: {e2} hours.",
        ],
        f"{c1} minutes, and {c2}, which matches the {per_day} minutes of practice each day.",
        hours,
    )


def _unit_dozens(rng: _Rng) -> _Worked:
    goods = rng.pick(_BAKED)
    a, b = rng.int(2, 9), rng.int(2, 9)
    total = (a + b) * 12
    sold = rng.int(5, total - 1)
    q = f"A bakery bakes {a} dozen {goods} in the morning and {b} dozen {goods} in the afternoon. By closing time it has sold {sold} {goods}. How many {goods} are left?"
    e1, dozens = _eq(a, "+", b)
    e2, n = _eq(dozens, "×", 12)
    e3, left = _eq(n, "-", sold)
    c1, _ = _eq(left, "+", sold)
    c2, _ = _eq(n, "÷", 12)
    return _Worked(
        q,
        [f"The bakery bakes {a} dozen and then {b} dozen {goods}.", "One dozen is 12.", f"It sells {sold} {goods}."],
        f"how many {goods} are left",
        [
            f"In all the bakery bakes {e1} dozen {goods}.",
            f"One dozen is 12, so that is {e2} {goods}.",
            f"After selling {sold}, the bakery has {e3} {goods} left.",
        ],
        f"{c1} {goods}, and {c2} dozen, which matches the {dozens} dozen baked.",
        left,
    )


def _unit_laps(rng: _Rng) -> _Worked:
    name = rng.pick(_NAMES)
    lap = rng.pick((200, 250, 400, 500))
    km = rng.pick([k for k in range(1, 11) if 1000 * k % lap == 0])  # whole laps
    laps = 1000 * km // lap
    done = rng.int(1, laps - 1)
    q = f"{name} wants to run {km} kilometers on a track where one lap is {lap} meters. {name} has already run {done} laps. How many more laps does {name} need to run?"
    e1, meters = _eq(km, "×", 1000)
    e2, n = _eq(meters, "÷", lap)
    e3, more = _eq(n, "-", done)
    c1, _ = _eq(more, "+", done)
    c2, _ = _eq(n, "×", lap)
    return _Worked(
        q,
        [f"The goal is {km} kilometers.", f"One lap is {lap} meters.", "One kilometer is 1000 meters.", f"{name} has run {done} laps so far."],
        "how many more laps are needed",
        [
            f"Change kilometers into meters: {e1} meters.",
            f"The number of laps in the whole run is {e2} laps.",
            f"Taking away the laps already run leaves {e3} laps.",
        ],
        f"{c1} laps in all, and {c2} meters, which matches the {km} kilometers.",
        more,
    )


def _unit_weeks(rng: _Rng) -> _Worked:
    name = rng.pick(_NAMES)
    per_day = rng.int(2, 15)
    weeks = rng.int(2, 12)
    q = f"{name} saves ${per_day} every day for {weeks} weeks. How many dollars does {name} save in all?"
    e1, days = _eq(weeks, "×", 7)
    e2, total = _eq(days, "×", per_day)
    c1, per_week = _eq(per_day, "×", 7)
    c2, _ = _eq(per_week, "×", weeks)
    return _Worked(
        q,
        [f"{name} saves {per_day} dollars each day.", f"The saving goes on for {weeks} weeks.", "One week has 7 days."],
        f"the total amount {name} saves",
        [
            f"Change weeks into days: {e1} days.",
            f"Saving {per_day} dollars on each of those days gives {e2} dollars.",
        ],
        f"in one week {name} saves {c1} dollars, and {c2}, which matches the total.",
        total,
    )


# ---- ages -----------------------------------------------------------------------------------


def _age_times(rng: _Rng) -> _Worked:
    a, b = rng.distinct(_NAMES, 2)
    young = rng.int(3, 15)
    k = rng.int(2, 4)
    later = rng.int(2, 10)
    old_then = k * young + later
    times = {2: "twice", 3: "three times", 4: "four times"}[k]
    q = f"{a} is {times} as old as {b}. In {later} years, {a} will be {old_then} years old. How old will {b} be in {later} years?"
    e1, old = _eq(old_then, "-", later)
    e2, y = _eq(old, "÷", k)
    e3, y_then = _eq(y, "+", later)
    c1, _ = _eq(y, "×", k)
    c2, _ = _eq(old, "+", later)
    return _Worked(
        q,
        [f"{a} is {k} times as old as {b} right now.", f"In {later} years {a} will be {old_then}."],
        f"{b}'s age in {later} years",
        [
            f"{a}'s age now is {e1} years.",
            f"{b}'s age is {a}'s age divided by {k}: {e2} years.",
            f"In {later} years {b} will be {e3} years old.",
        ],
        f"{c1}, which is {a}'s age now, and {c2}, which matches {a}'s age in {later} years.",
        y_then,
    )


def _age_sum_diff(rng: _Rng) -> _Worked:
    a, b = rng.distinct(_NAMES, 2)
    young = rng.int(5, 40)
    gap = rng.int(1, 15)
    total = 2 * young + gap
    q = f"The ages of {a} and {b} add up to {total} years. {a} is {gap} years older than {b}. How old is {b}?"
    e1, twice = _eq(total, "-", gap)
    e2, y = _eq(twice, "÷", 2)
    e3, old = _eq(y, "+", gap)
    c1, _ = _eq(old, "+", y)
    c2, _ = _eq(old, "-", y)
    return _Worked(
        q,
        [f"The two ages add up to {total}.", f"{a} is {gap} years older than {b}."],
        f"{b}'s age",
        [
            f"If we take away the gap, what is left is two times {b}'s age: {e1}.",
            f"Dividing by 2 gives {b}'s age: {e2} years.",
            f"{a} is then {e3} years old.",
        ],
        f"{c1}, which matches the sum, and {c2}, which matches the gap.",
        y,
    )


def _age_chain(rng: _Rng) -> _Worked:
    a, b, c = rng.distinct(_NAMES, 3)
    child = 2 * rng.int(3, 12)
    gap = rng.int(2, 30)
    old = child + gap
    q = f"{a} is {old} years old. {b} is {gap} years younger than {a}, and {c} is half as old as {b}. What is the sum of their three ages?"
    e1, y = _eq(old, "-", gap)
    e2, z = _eq(y, "÷", 2)
    e3, two = _eq(old, "+", y)
    e4, total = _eq(two, "+", z)
    c1, _ = _eq(total, "-", z)
    c2, _ = _eq(two, "-", old)
    return _Worked(
        q,
        [f"{a} is {old} years old.", f"{b} is {gap} years younger than {a}.", f"{c} is half as old as {b}."],
        "the sum of the three ages",
        [
            f"{b}'s age is {e1} years.",
            f"{c}'s age is half of that: {e2} years.",
            f"The ages of {a} and {b} together are {e3} years.",
            f"Adding {c}'s age gives {e4} years.",
        ],
        f"{c1}, and {c2}, which matches {b}'s age.",
        total,
    )


def _age_past(rng: _Rng) -> _Worked:
    a, b = rng.distinct(_NAMES, 2)
    then = rng.int(3, 30)
    ago = rng.int(2, 10)
    more = rng.int(1, 20)
    ahead = rng.int(2, 10)
    q = f"{a} was {then} years old {ago} years ago. {b} is {more} years older than {a} is now. How old will {b} be in {ahead} years?"
    e1, now = _eq(then, "+", ago)
    e2, other = _eq(now, "+", more)
    e3, future = _eq(other, "+", ahead)
    c1, _ = _eq(future, "-", ahead)
    c2, _ = _eq(other, "-", more)
    c3, _ = _eq(now, "-", ago)
    return _Worked(
        q,
        [f"{ago} years ago {a} was {then}.", f"{b} is {more} years older than {a}.", f"We look {ahead} years ahead."],
        f"{b}'s age in {ahead} years",
        [f"{a}'s age now is {e1} years.", f"{b}'s age now is {e2} years.", f"In {ahead} years {b} will be {e3} years old."],
        f"{c1}, then {c2}, and {c3}, which matches {a}'s age {ago} years ago.",
        future,
    )


# ---- multi-step arithmetic ------------------------------------------------------------------


def _arith_shopping(rng: _Rng) -> _Worked:
    name = rng.pick(_NAMES)
    (one1, many1, lo1, hi1), (one2, many2, lo2, hi2) = rng.distinct(_GOODS, 2)
    a, b = rng.int(2, 8), rng.int(2, 8)
    p1, p2 = rng.int(lo1, hi1), rng.int(lo2, hi2)
    cost = a * p1 + b * p2
    bill = next((note for note in (20, 50, 100) if note > cost), 100 * (cost // 100 + 1))  # one bill, or whole hundreds
    q = f"{name} buys {a} {many1} at ${p1} each and {b} {many2} at ${p2} each. {name} pays with ${bill}. How many dollars of change does {name} get back?"
    e1, c1v = _eq(a, "×", p1)
    e2, c2v = _eq(b, "×", p2)
    e3, total = _eq(c1v, "+", c2v)
    e4, change = _eq(bill, "-", total)
    k1, _ = _eq(change, "+", total)
    return _Worked(
        q,
        [f"{a} {many1} cost {p1} dollars each.", f"{b} {many2} cost {p2} dollars each.", f"{name} pays with {bill} dollars."],
        "the change in dollars",
        [
            f"The {many1} cost {e1} dollars.",
            f"The {many2} cost {e2} dollars.",
            f"Together the shopping costs {e3} dollars.",
            f"The change is {e4} dollars.",
        ],
        f"{k1}, which matches the {bill} dollars {name} paid.",
        change,
    )


def _arith_sharing(rng: _Rng) -> _Worked:
    name = rng.pick(_NAMES)
    things = rng.pick(_SMALL_THINGS)
    packs, per_pack = rng.int(2, 9), rng.int(4, 12)
    friends = rng.int(2, 6)
    n = packs * per_pack
    each = rng.int(1, (n - 1) // friends)
    keep = n - friends * each
    q = f"{name} buys {packs} packs of {things} with {per_pack} {things} in each pack. {name} keeps {keep} {things} and shares the rest equally among {friends} friends. How many {things} does each friend get?"
    e1, total = _eq(packs, "×", per_pack)
    e2, rest = _eq(total, "-", keep)
    e3, e = _eq(rest, "÷", friends)
    c1, _ = _eq(e, "×", friends)
    c2, _ = _eq(rest, "+", keep)
    return _Worked(
        q,
        [f"There are {packs} packs with {per_pack} {things} each.", f"{name} keeps {keep} {things}.", f"The rest is shared equally among {friends} friends."],
        f"how many {things} each friend gets",
        [
            f"The number of {things} is {e1}.",
            f"After keeping {keep}, {name} has {e2} {things} to share.",
            f"Each friend gets {e3} {things}.",
        ],
        f"{c1} {things} shared, and {c2}, which matches the {total} {things} bought.",
        e,
    )


def _arith_remaining(rng: _Rng) -> _Worked:
    name = rng.pick(_NAMES)
    fruit = rng.pick(_FRUIT)
    per_bag, bags = rng.int(3, 10), rng.int(2, 15)
    used, sold = rng.int(5, 30), rng.int(10, 60)
    picked = per_bag * bags + used + sold
    q = f"{name} picks {picked} {fruit}. {name} sells {sold} of them at the market, uses {used} to make jam, and packs the rest into bags of {per_bag}. How many bags does {name} fill?"
    e1, r1 = _eq(picked, "-", sold)
    e2, r2 = _eq(r1, "-", used)
    e3, n = _eq(r2, "÷", per_bag)
    c1, _ = _eq(n, "×", per_bag)
    c2, x = _eq(r2, "+", used)
    c3, _ = _eq(x, "+", sold)
    return _Worked(
        q,
        [f"{name} starts with {picked} {fruit}.", f"{sold} are sold and {used} are used for jam.", f"Each bag holds {per_bag} {fruit}."],
        "the number of full bags",
        [
            f"After the market, {e1} {fruit} are left.",
            f"After making jam, {e2} {fruit} are left.",
            f"Packing them {per_bag} to a bag fills {e3} bags.",
        ],
        f"{c1} {fruit} in bags, then {c2} and {c3}, which matches the {picked} {fruit} picked.",
        n,
    )


def _arith_saving(rng: _Rng) -> _Worked:
    name = rng.pick(_NAMES)
    wage = rng.int(20, 60)
    spend = rng.int(5, wage - 5)
    net = wage - spend
    weeks = rng.int(2, 12)
    has = rng.int(5, 80)
    price = has + net * weeks
    q = f"{name} earns ${wage} a week walking dogs and spends ${spend} of it each week. {name} already has ${has} saved and wants a bike that costs ${price}. How many weeks will it take {name} to afford the bike?"
    e1, n = _eq(wage, "-", spend)
    e2, need = _eq(price, "-", has)
    e3, w = _eq(need, "÷", n)
    c1, _ = _eq(n, "×", w)
    c2, _ = _eq(need, "+", has)
    return _Worked(
        q,
        [f"{name} earns {wage} dollars a week and spends {spend}.", f"{name} has {has} dollars already.", f"The bike costs {price} dollars."],
        "the number of weeks of saving",
        [
            f"Each week {name} keeps {e1} dollars.",
            f"{name} still needs {e2} dollars.",
            f"Saving {n} dollars a week, that takes {e3} weeks.",
        ],
        f"{c1} dollars saved, and {c2}, which matches the price of the bike.",
        w,
    )


_TEMPLATES: dict[str, tuple[Callable[[_Rng], _Worked], ...]] = {
    "rates": (_rate_two_legs, _rate_same_speed, _rate_work, _rate_tank),
    "percentages": (_pct_discount, _pct_tax, _pct_change),
    "units": (_unit_minutes, _unit_dozens, _unit_laps, _unit_weeks),
    "ages": (_age_times, _age_sum_diff, _age_chain, _age_past),
    "arithmetic": (_arith_shopping, _arith_sharing, _arith_remaining, _arith_saving),
}


def generate(n: int, *, seed: int, kinds: Sequence[str] = KINDS) -> list[Problem]:
    """``n`` problems, the i-th of kind ``kinds[i % len(kinds)]``, no two with the same question.
    Deterministic in (n, seed, kinds), and a prefix of the list for any larger n."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"n must be a non-negative integer, got {n!r}", field="n")
    kinds = tuple(kinds)
    if not kinds:
        raise ConfigError("kinds is empty", field="kinds")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ConfigError(f"kinds {unknown} are not among {KINDS}", field="kinds")
    rng = _Rng(seed)
    seen: set[str] = set()
    problems = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        # The templates' number ranges give each kind millions of questions; a few hundred
        # repeats in a row mean that n asks for more than a kind can give.
        for _ in range(1000):
            worked = rng.pick(_TEMPLATES[kind])(rng)
            if worked.question not in seen:
                break
        else:
            raise ConfigError(f"could not find a new {kind} question for problem {i}: n={n} is too many", field="n")
        seen.add(worked.question)
        problems.append(Problem(f"{_ID_PREFIX[kind]}-{i:06d}", kind, worked.question, _solution(worked, rng), worked.answer))
    return problems


def split(n_train: int, n_held_out: int, *, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """A training set and a held-out set, disjoint by question text: the first ``n_train`` and
    the next ``n_held_out`` problems of one ``generate`` call, so ids do not repeat either."""
    for field, value in (("n_train", n_train), ("n_held_out", n_held_out)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{field} must be a non-negative integer, got {value!r}", field=field)
    problems = generate(n_train + n_held_out, seed=seed)
    return problems[:n_train], problems[n_train:]


def messages(p: Problem, *, with_answer: bool = True) -> list[dict]:
    """The problem as a chat: one user turn (``SYSTEM``, a blank line, the question) and, with
    ``with_answer``, the assistant turn holding the solution. The instruction goes into the user
    turn rather than a system turn because Gemma's chat template has no system role."""
    chat = [{"role": "user", "content": f"{SYSTEM}\n\n{p.question}"}]
    if with_answer:
        chat.append({"role": "assistant", "content": p.solution})
    return chat


# An integer, plain or with thousands commas, after an optional "$"; a trailing period allowed.
_ANSWER = re.compile(r"\$?\s*(-?(?:\d{1,3}(?:,\d{3})+|\d+))\s*\.?")


def extract_answer(completion: str) -> int | None:
    """The integer on the line after the last ``####``, or None when there is none or the
    rest of that line is not one integer ("1,200", "$45" and "45." are read as integers)."""
    at = completion.rfind("####")
    if at < 0:
        return None
    line = completion[at + 4 :].split("\n", 1)[0].strip()
    match = _ANSWER.fullmatch(line)
    return int(match.group(1).replace(",", "")) if match else None


def verify(completion: str, answer: int) -> float:
    """1.0 when ``extract_answer(completion)`` equals ``answer``, else 0.0."""
    return 1.0 if extract_answer(completion) == answer else 0.0


def _completion_text(completion) -> str:
    """A TRL completion as text: a string as is; a conversation as its assistant messages'
    contents joined (a content may also be a list of ``{"type": "text", "text": ...}`` parts)."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        if message.get("role") != "assistant":
            continue
        content = message.get("content") or ""
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(part.get("text", "") for part in content if part.get("type") == "text")
    return "\n".join(parts)


def reward(prompts, completions, answer, **kwargs) -> list[float]:
    """A TRL ``GRPOTrainer`` reward function: ``verify`` of each completion (a string, or a
    conversation of ``{"role": "assistant", "content": ...}`` messages) against the dataset's
    ``answer`` column. Other columns TRL passes in ``kwargs`` are ignored."""
    if len(completions) != len(answer):
        raise InvalidValueError(f"{len(completions)} completions but {len(answer)} answers", field="answer")
    scores = []
    for i, (completion, expected) in enumerate(zip(completions, answer)):
        if isinstance(expected, bool) or not isinstance(expected, int):
            raise InvalidValueError(f"answer[{i}] must be an integer, got {expected!r}", field="answer", index=i)
        scores.append(verify(_completion_text(completion), expected))
    return scores


def to_jsonl(problems: Sequence[Problem], path: str | Path) -> None:
    """One JSON object per line with the fields of ``Problem``."""
    with open(path, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")


_FIELDS = {"id": str, "kind": str, "question": str, "solution": str, "answer": int}


def from_jsonl(path: str | Path) -> list[Problem]:
    """The problems ``to_jsonl`` wrote; a line with a missing, extra or mistyped field is an
    error naming the line (1-based, in ``row``) and the field."""
    problems = []
    with open(path, encoding="utf-8") as f:
        for row, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidValueError(f"{path}:{row}: not JSON ({e.msg})", row=row) from e
            if not isinstance(record, dict):
                raise InvalidValueError(f"{path}:{row}: expected a JSON object", row=row)
            wrong = sorted(set(_FIELDS) ^ set(record))
            if wrong:
                what = "missing" if wrong[0] in _FIELDS else "unknown"
                raise InvalidValueError(f"{path}:{row}: {what} field {wrong[0]!r}", row=row, field=wrong[0])
            for field, kind in _FIELDS.items():
                if isinstance(record[field], bool) or not isinstance(record[field], kind):
                    raise InvalidValueError(f"{path}:{row}: field {field!r} must be {kind.__name__}, got {record[field]!r}", row=row, field=field)
            if record["kind"] not in KINDS:
                raise InvalidValueError(f"{path}:{row}: kind {record['kind']!r} is not among {KINDS}", row=row, field="kind")
            problems.append(Problem(**record))
    return problems
