"""Golden probes: exactness tasks whose answers must not change when a model is quantized.

Each probe is a prompt with a short answer. The candidate agrees when its greedy answer (up to the first
newline) is the reference's answer, whatever that answer is: the probes measure faithfulness to the
full-precision model, not the model's skill. Prompts are generated from a seed, so every run sees the same set.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

_NAMES = ["Alice Moreno", "Bashir Okafor", "Chen Liwei", "Dagny Holm", "Esteban Ruiz", "Fatima Zahra",
          "Goran Petrovic", "Hana Sato", "Ivan Kowalski", "Jorge Almeida", "Keiko Mori", "Lars Eriksen"]
_WORDS = ["river", "lamp", "green", "quietly", "north", "stone", "bread", "window", "seven", "music", "garden",
          "copper", "winter", "ladder", "silver", "market", "orange", "pencil", "harbor", "little", "forest",
          "engine", "yellow", "cotton", "bridge", "candle", "summer", "rabbit", "mirror", "violet"]
_ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh"]


@dataclasses.dataclass(frozen=True)
class Probe:
    task: str
    prompt: str


def _arithmetic(rng: np.random.Generator) -> Probe:
    a, b = (int(x) for x in rng.integers(100, 10000, size=2))
    op = ["+", "-", "*"][int(rng.integers(3))]
    if op == "*":
        b = int(rng.integers(11, 99))
    examples = "Q: What is 23 + 58?\nA: 81\nQ: What is 140 - 37?\nA: 103\nQ: What is 12 * 11?\nA: 132\n"
    return Probe("arithmetic", f"{examples}Q: What is {a} {op} {b}?\nA:")


def _clause(rng: np.random.Generator) -> Probe:
    clauses, facts = [], []
    for section in range(1, 4):
        for sub in range(1, 4):
            amount = int(rng.integers(10, 99)) * 100
            days = int(rng.integers(5, 60))
            fact = f"a fee of ${amount:,} is due within {days} days"
            clauses.append(f"Clause {section}.{sub}: {fact}.")
            facts.append((section, sub))
    section, sub = facts[int(rng.integers(len(facts)))]
    contract = "\n".join(clauses)
    return Probe("clause", f"Contract:\n{contract}\n\nQuestion: What does Clause {section}.{sub} say?\n"
                           f"Answer: Clause {section}.{sub} says that")


def _kth_word(rng: np.random.Generator) -> Probe:
    sentences = []
    for _ in range(4):
        words = [str(w) for w in rng.choice(_WORDS, size=int(rng.integers(5, 8)), replace=False)]
        sentences.append(" ".join(words).capitalize() + ".")
    j = int(rng.integers(1, 5))
    k = int(rng.integers(1, 6))
    text = " ".join(sentences)
    return Probe("kth_word", f"Text: {text}\nQuestion: What is the {_ORDINALS[k - 1]} word of sentence {j}?\n"
                             "Answer: The word is")


def _copy(rng: np.random.Generator) -> Probe:
    name = _NAMES[int(rng.integers(len(_NAMES)))]
    record_id = f"{int(rng.integers(10000, 99999))}-{int(rng.integers(10, 99))}"
    phone = f"555-{int(rng.integers(1000, 9999))}"
    field, value_label = [("ID", "ID"), ("Phone", "phone number"), ("Name", "name")][int(rng.integers(3))]
    return Probe("copy", f"Record: Name: {name}; ID: {record_id}; Phone: {phone}.\n"
                         f"Copy the {value_label} exactly.\n{field}:")


PROBE_TASKS: dict[str, Callable[[np.random.Generator], Probe]] = {
    "arithmetic": _arithmetic, "clause": _clause, "kth_word": _kth_word, "copy": _copy}


def golden_probes(per_task: int = 5, seed: int = 0) -> list[Probe]:
    """``per_task`` prompts of each task, generated deterministically from ``seed``."""
    rng = np.random.default_rng(seed)
    return [make(rng) for make in PROBE_TASKS.values() for _ in range(per_task)]


def answer_of(tokens: list[int], decode: Callable[[list[int]], str]) -> str:
    """A generated answer: the text up to the first newline, stripped."""
    return decode(tokens).split("\n", 1)[0].strip()
