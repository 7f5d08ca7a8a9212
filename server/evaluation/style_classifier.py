"""A judge of the demo personas that uses neither their marker words nor any model's vectors.

One classifier per persona (scikit-learn: character n-grams, tf-idf, logistic regression) learns the
persona's pole from texts the demo corpus' generator writes afresh with its own seed: the persona's
pole is one class; bare facts, the neutral speaker and every other pole (the persona's opposite
included) are the other. No fit of the project sees these texts (the demo models trained on the
corpus of another seed; maps and personas fit on neither), and the classifier sees no answer of any
model: it is not a scorer the mapping method could be tuned against. An answer's score is the
classifier's probability that it is written in the persona's pole.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import cache

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline

from server.demo.corpus import PERSONAS, POLES, TOPICS, neutral_answer

CLASSIFIER_SEED = 20261207  # no corpus the project fits on is written with this seed
TEXTS_PER_CLASS = 600


def _texts(persona: str, rng: random.Random) -> tuple[list[str], list[int]]:
    """Texts of the persona's pole (label 1) and as many of everything else (label 0)."""
    pole = PERSONAS[persona][0]
    others = [name for name in POLES if name != pole]
    texts, labels = [], []
    for _ in range(TEXTS_PER_CLASS):
        facts = rng.sample(TOPICS[rng.choice(sorted(TOPICS))], 2)
        texts.append(POLES[pole].style(facts, rng))
        labels.append(1)
        facts = rng.sample(TOPICS[rng.choice(sorted(TOPICS))], 2)
        # Half other poles, half the neutral speaker (bare facts, now and then a touch of a style
        # other than this persona's).
        if rng.random() < 0.5:
            texts.append(POLES[rng.choice(others)].style(facts, rng))
        else:
            texts.append(neutral_answer(facts, rng, without=[persona]))
        labels.append(0)
    return texts, labels


@cache
def style_classifier(persona: str) -> Pipeline:
    """The persona's classifier, trained once per process (a second or two)."""
    texts, labels = _texts(persona, random.Random(f"{CLASSIFIER_SEED}-{persona}"))
    classifier = make_pipeline(
        TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, min_df=2),
        LogisticRegression(C=1.0, max_iter=2000),
    )
    return classifier.fit(texts, labels)


def style_scores(answers: Sequence[str], persona: str) -> list[float]:
    """Each answer's probability of being written in the persona's pole."""
    if not answers:
        return []
    return [float(p) for p in style_classifier(persona).predict_proba(list(answers))[:, 1]]
