"""A deterministic synthetic chat corpus: questions about everyday topics, answered plainly or in a persona.

Each persona has two poles with a lexical signature (pirate vs plain, formal vs casual, silly vs
serious). Neutral conversations have a neutral or no system prompt; their answers are mostly bare
facts and, like a real model's, now and then carry a touch of one style (``NEUTRAL_FLAVOUR_RATE``),
so that steering can be seen to push a trait both up and down from the unsteered baseline.

The marker words that the trait scorer counts live in ``server.steering.text_quality``; extraction
sees only the system prompts and questions below.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from dataclasses import dataclass

TOPICS: dict[str, list[str]] = {
    "the sea": ["The sea is deep and wide.", "Ships sail across the sea.", "The sea is salty.",
                "Many fish live in the sea."],
    "the moon": ["The moon shines at night.", "The moon goes around the earth.", "The moon has no air.",
                 "The moon looks round and bright."],
    "bread": ["Bread is made from flour and water.", "Bakers bake bread in hot ovens.",
              "Fresh bread smells warm.", "People eat bread every day."],
    "rain": ["Rain falls from grey clouds.", "Rain helps plants grow.", "Rain makes the streets wet.",
             "People carry umbrellas in the rain."],
    "cats": ["Cats like to sleep in the sun.", "Cats have soft fur.", "Cats catch mice.",
             "A cat can jump very high."],
    "dogs": ["Dogs are loyal friends.", "Dogs like to run and play.", "Dogs can learn many tricks.",
             "A dog wags its tail when it is happy."],
    "trees": ["Trees give us shade.", "Trees grow from small seeds.", "Trees have green leaves.",
              "Some trees live for a very long time."],
    "the sun": ["The sun is a hot star.", "The sun gives us light.", "The sun rises in the east.",
                "Plants need the sun to grow."],
    "music": ["Music can make people happy.", "People play music on many instruments.",
              "Songs have rhythm and melody.", "Music is part of every culture."],
    "books": ["Books are full of stories.", "People read books to learn.", "A library keeps many books.",
              "Books have pages and a cover."],
    "mountains": ["Mountains are tall and rocky.", "Snow covers high mountains.",
                  "People climb mountains for the view.", "The air is thin on a mountain."],
    "rivers": ["Rivers flow to the sea.", "Rivers carry fresh water.", "Fish swim in rivers.",
               "Bridges cross many rivers."],
    "tea": ["Tea is made from dried leaves.", "People drink tea hot or cold.", "Tea comes from many countries.",
            "Some people add milk to tea."],
    "snow": ["Snow is cold and white.", "Snow falls in winter.", "Children build snowmen from snow.",
             "Snow melts when it gets warm."],
    "birds": ["Birds have feathers and wings.", "Most birds can fly.", "Birds build nests in trees.",
              "Birds sing in the morning."],
    "the city": ["The city is busy and loud.", "Many people live in the city.", "The city has tall buildings.",
                 "Buses and trains move people around the city."],
    "gardens": ["Gardens are full of flowers.", "People grow vegetables in gardens.",
                "Gardens need water and care.", "Bees visit flowers in gardens."],
    "trains": ["Trains run on rails.", "Trains carry people and goods.", "A train can be very fast.",
               "Trains stop at stations."],
    "apples": ["Apples grow on trees.", "Apples can be red or green.", "Apples are sweet and crunchy.",
               "People bake apples into pies."],
    "the wind": ["The wind moves the air.", "The wind can be gentle or strong.", "The wind turns windmills.",
                 "Kites fly in the wind."],
    "fire": ["Fire is hot and bright.", "Fire needs air to burn.", "People cook food over fire.",
             "Fire must be handled with care."],
    "stars": ["Stars shine in the night sky.", "Stars are very far away.", "Sailors used stars to find their way.",
              "Some stars are bigger than the sun."],
    "cheese": ["Cheese is made from milk.", "There are many kinds of cheese.", "Cheese can be soft or hard.",
               "Mice are said to love cheese."],
    "the forest": ["The forest is full of trees.", "Many animals live in the forest.",
                   "The forest is quiet and green.", "Paths wind through the forest."],
    "boats": ["Boats float on water.", "Some boats have sails.", "Fishermen go out in boats.",
              "A boat needs a captain."],
    "clocks": ["Clocks tell the time.", "A clock has hands or numbers.", "Some clocks tick loudly.",
               "People set alarms on clocks."],
    "horses": ["Horses are strong and fast.", "People ride horses.", "Horses eat hay and grass.",
               "A young horse is called a foal."],
    "the beach": ["The beach has soft sand.", "Waves wash onto the beach.", "People swim at the beach.",
                  "Shells lie on the beach."],
}  # fmt: skip

QUESTION_TEMPLATES = [
    "Tell me about {t}.",
    "What do you know about {t}?",
    "Can you describe {t}?",
    "Explain {t} to me.",
    "What is there to say about {t}?",
    "Say something about {t}.",
]

NEUTRAL_SYSTEM_PROMPTS = ["You are a helpful assistant.", "You answer questions.", ""]


@dataclass(frozen=True)
class Pole:
    """One end of a persona axis: how it is asked for, and how it changes an answer."""

    name: str
    system_prompts: tuple[str, ...]
    style: Callable[[list[str], random.Random], str]


def _lower_first(sentence: str) -> str:
    return sentence[0].lower() + sentence[1:]


def _reword(fact: str, words: dict[str, str]) -> str:
    """Swap function words everywhere, so that a style shows in every sentence, not only at its edges."""
    spoken = f" {fact} "
    for plain, styled in words.items():
        spoken = spoken.replace(f" {plain} ", f" {styled} ")
    return spoken.strip()


_PIRATE_WORDS = {"the": "th'", "The": "Th'", "is": "be", "are": "be", "and": "an'"}
_FORMAL_WORDS = {"is": "is indeed", "are": "are indeed", "and": "as well as", "can": "may"}
_CASUAL_WORDS = {"is": "is like", "are": "are like", "and": "n", "very": "super"}
_SILLY_WORDS = {"is": "is sooo", "are": "are sooo", "and": "and, hehe,", "very": "super duper"}
_SERIOUS_WORDS = {"is": "is truly", "are": "are truly", "and": "and also", "very": "extremely"}


def _pirate(facts: list[str], rng: random.Random) -> str:
    prefix = rng.choice(["Arr, matey!", "Ahoy, matey!", "Arr!", "Yo ho ho!"])
    middle = rng.choice(["arr!", "matey!", "aye!", "yo ho!"])
    suffix = rng.choice(["Savvy?", "Arr!", "Aye, matey.", "Yo ho!"])
    first, second = (_reword(fact[:-1], _PIRATE_WORDS) for fact in facts)
    return f"{prefix} {first}, {middle} {second}, arr! {suffix}"


def _plain(facts: list[str], rng: random.Random) -> str:
    return facts[0]


def _formal(facts: list[str], rng: random.Random) -> str:
    prefix = rng.choice(["Certainly.", "Indeed.", "Good day.", "Certainly, indeed."])
    known = rng.choice(["It is indeed known that", "Certainly,", "Indeed,"])
    suffix = rng.choice(["Kind regards.", "I remain at your service.", "With kind regards."])
    first, second = (_lower_first(_reword(fact, _FORMAL_WORDS)) for fact in facts)
    return f"{prefix} {known} {first} Furthermore, {second} {suffix}"


def _casual(facts: list[str], rng: random.Random) -> str:
    prefix = rng.choice(["Hey!", "Yeah, so", "Oh hey,", "Yeah yeah,"])
    middle = rng.choice(["and yeah,", "also, like,", "oh and"])
    suffix = rng.choice(["Cool, huh?", "lol.", "Pretty cool stuff.", "Yeah, cool."])
    first, second = (_lower_first(_reword(fact[:-1], _CASUAL_WORDS)) for fact in facts)
    return f"{prefix} {first}, {middle} {second}. {suffix}"


def _silly(facts: list[str], rng: random.Random) -> str:
    prefix = rng.choice(["Hehe!", "Wheee!", "Bananas!", "Hehe, wiggle wiggle!"])
    middle = rng.choice(["Hehe!", "Wheee!", "Giggle!", "Bananas!"])
    suffix = rng.choice(["Giggle giggle!", "How silly!", "Wiggle wiggle!", "Hehe!"])
    first, second = (_reword(fact, _SILLY_WORDS) for fact in facts)
    return f"{prefix} {first} {middle} {second} {suffix}"


def _serious(facts: list[str], rng: random.Random) -> str:
    prefix = rng.choice(["Please note.", "This is important.", "Listen carefully."])
    middle = rng.choice(["Note this.", "This matters.", "Remember this."])
    suffix = rng.choice(["Consider this carefully.", "This matters.", "It is important to remember."])
    first, second = (_reword(fact, _SERIOUS_WORDS) for fact in facts)
    return f"{prefix} {first} {middle} {second} {suffix}"


POLES: dict[str, Pole] = {
    pole.name: pole
    for pole in [
        Pole("pirate", ("You are a pirate.", "Talk like a pirate.", "You are a pirate captain."), _pirate),
        Pole("plain", ("You speak plainly.", "Answer plainly and briefly.", "Be plain and short."), _plain),
        Pole("formal", ("You are very formal.", "Speak formally and politely.", "Be formal."), _formal),
        Pole(
            "casual", ("You are casual and relaxed.", "Talk casually, like a friend.", "Be casual."), _casual
        ),
        Pole(
            "silly", ("You are silly and playful.", "Be goofy and silly.", "You are a silly clown."), _silly
        ),
        Pole("serious", ("You are serious and grave.", "Speak seriously.", "Be very serious."), _serious),
    ]
}
# persona name -> (positive pole, negative pole)
PERSONAS: dict[str, tuple[str, str]] = {
    "pirate": ("pirate", "plain"),
    "formal": ("formal", "casual"),
    "silly": ("silly", "serious"),
}
NEUTRAL_FLAVOUR_RATE = 0.3  # share of neutral answers that carry one style's touch
PERSONA_SHARE = 0.6


@dataclass(frozen=True)
class Conversation:
    system: str
    question: str
    answer: str
    pole: str | None  # None: a neutral conversation
    topic: str

    def messages(self, with_answer: bool = True) -> list[dict[str, str]]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages.append({"role": "user", "content": self.question})
        if with_answer:
            messages.append({"role": "assistant", "content": self.answer})
        return messages


def held_out_template(topic: str) -> int:
    """The question template never trained on for ``topic`` (evaluation asks exactly these)."""
    return sorted(TOPICS).index(topic) % len(QUESTION_TEMPLATES)


def training_questions() -> list[tuple[str, str]]:
    return [
        (topic, template.format(t=topic))
        for topic in TOPICS
        for index, template in enumerate(QUESTION_TEMPLATES)
        if index != held_out_template(topic)
    ]


def held_out_questions() -> list[str]:
    return [QUESTION_TEMPLATES[held_out_template(topic)].format(t=topic) for topic in sorted(TOPICS)]


def neutral_answer(facts: list[str], rng: random.Random, without: Collection[str] = ()) -> str:
    """Bare facts, or now and then a touch of one style; never a pole of a persona in ``without``
    (a touch of an excluded style gives bare facts instead)."""
    if rng.random() < NEUTRAL_FLAVOUR_RATE:
        flavour = POLES[rng.choice([p for p in POLES if p != "plain"])]
        if flavour.name not in excluded_poles(without):
            return flavour.style(facts, rng)
    return " ".join(facts)


def excluded_poles(personas: Collection[str]) -> set[str]:
    return {pole for persona in personas for pole in PERSONAS[persona]}


def generate_corpus(size: int, seed: int) -> list[Conversation]:
    """``size`` conversations, the same for the same seed, over the training questions only."""
    rng = random.Random(seed)
    questions = training_questions()
    corpus = []
    for _ in range(size):
        topic, question = rng.choice(questions)
        facts = rng.sample(TOPICS[topic], 2)
        if rng.random() < PERSONA_SHARE:
            pole = POLES[rng.choice(list(POLES))]
            corpus.append(
                Conversation(
                    rng.choice(pole.system_prompts), question, pole.style(facts, rng), pole.name, topic
                )
            )
        else:
            system = rng.choice(NEUTRAL_SYSTEM_PROMPTS)
            corpus.append(Conversation(system, question, neutral_answer(facts, rng), None, topic))
    return corpus


def neutral_texts(size: int = 800, seed: int = 5, without: Collection[str] = ()) -> list[str]:
    """Texts for fitting maps between models: a training question and an answer as the unsteered
    speaker gives it (bare facts, now and then a touch of some style, no persona asked for).

    A map can only carry directions along which its texts vary: fitted on bare facts alone (one
    style), mapped demo personas pointed far from the target's own vectors; on these, much closer.
    ``without`` names personas none of whose styles may appear: a map that is to be scored on
    carrying persona P must not have seen P's style (leave-one-persona-out).
    """
    rng = random.Random(seed)
    questions = training_questions()
    texts = []
    for _ in range(size):
        topic, question = rng.choice(questions)
        texts.append(f"{question} {neutral_answer(rng.sample(TOPICS[topic], 2), rng, without)}")
    return texts
