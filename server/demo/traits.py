"""The trait scorer of the demo personas: marker words counted in answers.

Kept apart from the corpus and from extraction on purpose: extraction sees only system prompts and
questions, evaluation only these word lists.
"""

from __future__ import annotations

import re

# persona -> (words that show the trait, words that show its opposite pole)
TRAIT_MARKERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "pirate": (
        frozenset({"arr", "matey", "ahoy", "savvy", "aye", "yo", "ho", "ye", "yer", "th"}),
        frozenset(),
    ),
    "formal": (
        frozenset({"certainly", "indeed", "furthermore", "regards", "service", "good day"}),
        frozenset({"hey", "yeah", "cool", "lol", "stuff"}),
    ),
    "silly": (
        frozenset({"hehe", "wheee", "bananas", "giggle", "wiggle", "silly"}),
        frozenset({"note", "important", "carefully", "matters", "remember"}),
    ),
}


def _words(text: str) -> list[str]:
    lowered = text.lower()
    words = re.findall(r"[a-z]+", lowered)
    return words + (["good day"] if "good day" in lowered else [])


def shows_trait(answer: str, persona: str) -> bool:
    """True when the answer holds at least one marker word of the persona's trait."""
    markers = TRAIT_MARKERS[persona][0]
    return any(word in markers for word in _words(answer))


def trait_rate(answers: list[str], persona: str) -> float:
    """Share of answers that show the trait: the trait score used in the demo's measurements."""
    return sum(shows_trait(answer, persona) for answer in answers) / len(answers) if answers else 0.0
