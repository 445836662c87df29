"""The demo task: two-number arithmetic asked in varied natural language, answered in a fixed human style.

The "human" distribution is known exactly: every response is
``"{a} {op} {b} = {c}. The answer is {c}."``. A model that is too small to carry
digits reliably answers in the right style with wrong digits, so its generations
differ visibly from the human ones, and a program can check them.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Optional

_ADD_TEMPLATES = (
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "Compute the sum of {a} and {b}.",
    "What do you get when you add {b} to {a}?",
    "{a} + {b} = ?",
    "Tom has {a} marbles and finds {b} more. How many marbles does he have?",
    "Please calculate {a} plus {b}.",
    "Find the total of {a} and {b}.",
)
_SUB_TEMPLATES = (
    "What is {a} minus {b}?",
    "Subtract {b} from {a}.",
    "Compute the difference between {a} and {b}.",
    "{a} - {b} = ?",
    "Anna had {a} apples and gave away {b}. How many are left?",
    "Please calculate {a} minus {b}.",
)

_ANSWER = re.compile(r"The answer is (-?\d+)\.")
_EQUATION = re.compile(r"^\s*(\d+) ([+-]) (\d+) = (-?\d+)\. The answer is (-?\d+)\.\s*$")


def human_response(a: int, b: int, op: str) -> str:
    """The reference ("human") answer for ``a op b``."""
    c = a + b if op == "+" else a - b
    return f"{a} {op} {b} = {c}. The answer is {c}."


def make_records(n: int, seed: int, max_operand: int = 99) -> list[dict]:
    """``n`` distinct records {id, prompt, response, answer}; seeded, subtraction never negative."""
    rng = random.Random(seed)
    seen: set[tuple] = set()
    records = []
    while len(records) < n:
        a, b = rng.randint(10, max_operand), rng.randint(10, max_operand)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        template = rng.choice(_ADD_TEMPLATES if op == "+" else _SUB_TEMPLATES)
        key = (a, b, op, template)
        if key in seen:
            continue
        seen.add(key)
        records.append({
            "id": f"arith-{len(records):05d}",
            "prompt": template.format(a=a, b=b),
            "response": human_response(a, b, op),
            "answer": a + b if op == "+" else a - b,
        })
    return records


def extract_answer(text: str) -> Optional[int]:
    """The integer after "The answer is", or None when the response has no parseable answer."""
    m = _ANSWER.search(text)
    return int(m.group(1)) if m else None


def parse_equation(text: str) -> Optional[tuple[int, bool]]:
    """(answer, whether "a op b = c" holds and c equals the answer) of a response in exactly
    :func:`human_response`'s form ("a op b = c. The answer is w.", surrounding whitespace allowed),
    or None for any other text."""
    m = _EQUATION.match(text)
    if m is None:
        return None
    a, op, b, c, answer = int(m[1]), m[2], int(m[3]), int(m[4]), int(m[5])
    return answer, (a + b if op == "+" else a - b) == c == answer


def is_correct(response: str, answer: int) -> bool:
    """Exact-match check used for held-out accuracy."""
    return extract_answer(response) == answer


def load_answers(path: str | Path) -> dict[str, int]:
    """{record id: integer answer} from a demo JSONL file (records without 'answer' are skipped)."""
    answers = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if "answer" in rec:
                answers[rec["id"]] = int(rec["answer"])
    return answers


def write_dataset(path: str | Path, n: int = 6000, seed: int = 2024) -> None:
    """Regenerate the shipped dataset file (deterministic)."""
    from spin_mcore.utils.io import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in make_records(n, seed)))
