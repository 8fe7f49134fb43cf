"""Synthetic retrieval tasks: RULER-style needles, key-value fact memories, multi-hop chains.

Every generator is a pure function of its arguments and seed and returns text records, so
the same task can be tokenised by any tokenizer. Haystack documents are made of filler
sentences drawn from small word lists; needles use keys and values that never occur in
the filler, so a correct answer can only come from the needle document.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .records import Document, RetrievalDataset, RetrievalRecord

_SUBJECTS = [
    "the river",
    "a farmer",
    "the old tower",
    "our neighbour",
    "the committee",
    "a small boat",
    "the library",
    "the winter wind",
    "a travelling painter",
    "the village school",
    "the market",
    "an orchard",
    "the night train",
    "a quiet student",
    "the harbour",
    "the mountain road",
]
_VERBS = [
    "watches",
    "remembers",
    "carries",
    "follows",
    "describes",
    "paints",
    "crosses",
    "guards",
    "collects",
    "repairs",
    "visits",
    "measures",
    "ignores",
    "welcomes",
    "borrows",
    "counts",
]
_OBJECTS = [
    "the morning light",
    "a broken fence",
    "seven letters",
    "the autumn harvest",
    "an empty bench",
    "the long shadow",
    "a wooden bridge",
    "the distant hills",
    "a basket of apples",
    "the last bell",
    "a folded map",
    "the stone wall",
    "an open window",
    "the cold stream",
    "a forgotten song",
]
_ADVERBS = [
    "slowly",
    "every day",
    "without a word",
    "in the evening",
    "with great care",
    "once a year",
    "before noon",
    "after the rain",
    "quietly",
    "as always",
]

_KEY_SYLLABLES = ["zor", "quin", "vel", "trax", "mib", "oph", "kry", "dul", "syn", "wex", "plo", "gath"]
_CITIES = [
    "Amsterdam",
    "Lisbon",
    "Nairobi",
    "Osaka",
    "Quito",
    "Tallinn",
    "Hobart",
    "Windhoek",
    "Bergen",
    "Cusco",
    "Dakar",
    "Kyoto",
    "Perth",
    "Split",
    "Tartu",
    "Valparaiso",
]
_ATTRIBUTES = ["favourite colour", "lucky number", "home town", "pet's name", "secret code", "birth year"]
_COLOURS = ["crimson", "teal", "amber", "violet", "ochre", "indigo", "scarlet", "olive"]
_FIRST_NAMES = [
    "Alice",
    "Bruno",
    "Chen",
    "Dara",
    "Emeka",
    "Farah",
    "Goran",
    "Hana",
    "Ivo",
    "Jun",
    "Kofi",
    "Lena",
    "Mateo",
    "Nia",
    "Omar",
    "Priya",
    "Rui",
    "Sven",
    "Tara",
    "Umar",
    "Vera",
    "Yuki",
]
_LAST_NAMES = [
    "Abara",
    "Berg",
    "Costa",
    "Dubois",
    "Eriksen",
    "Fujita",
    "Garcia",
    "Haddad",
    "Ivanova",
    "Jensen",
    "Kowalski",
    "Lindqvist",
    "Moreau",
    "Novak",
    "Okafor",
    "Petrov",
]

NeedleKind = Literal["single", "multi_key", "multi_value", "multi_query"]


def _filler_sentence(rng: random.Random) -> str:
    sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ADVERBS)}."
    return sentence[0].upper() + sentence[1:]


def filler_text(rng: random.Random, num_words: int) -> str:
    """Haystack prose of roughly ``num_words`` words."""
    sentences: list[str] = []
    words = 0
    while words < num_words:
        sentence = _filler_sentence(rng)
        sentences.append(sentence)
        words += len(sentence.split())
    return " ".join(sentences)


def _random_key(rng: random.Random, taken: set[str]) -> str:
    while True:
        key = "-".join("".join(rng.choice(_KEY_SYLLABLES) for _ in range(2)) for _ in range(2))
        if key not in taken:
            taken.add(key)
            return key


def _random_number(rng: random.Random, taken: set[str]) -> str:
    while True:
        value = str(rng.randrange(1_000_000, 10_000_000))
        if value not in taken:
            taken.add(value)
            return value


def _full_name(rng: random.Random, taken: set[str]) -> str:
    while True:
        name = f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}"
        if name not in taken:
            taken.add(name)
            return name


def _needle_text(rng: random.Random, key: str, value: str, words_around: int) -> str:
    """A needle sentence hidden at a random place inside filler prose."""
    before = filler_text(rng, rng.randrange(0, words_around + 1)) if words_around else ""
    after = filler_text(rng, rng.randrange(0, words_around + 1)) if words_around else ""
    needle = f"The special magic number for {key} is: {value}."
    return " ".join(part for part in (before, needle, after) if part)


def haystack_doc_id(sample_prefix: str, index: int) -> str:
    return f"{sample_prefix}-hay{index}"


def is_haystack_doc(doc_id: str) -> bool:
    """Whether a `generate_needles` document is filler (not a needle)."""
    return doc_id.rpartition("-")[2].startswith("hay")


def generate_needles(
    kind: NeedleKind,
    num_samples: int,
    seed: int,
    haystack_docs: int = 20,
    words_per_doc: int = 40,
    num_keys: int = 4,
    num_values: int = 3,
    num_queries: int = 2,
    haystack_seed: int | None = None,
    stream: str = "",
) -> RetrievalDataset:
    """RULER-style needle-in-a-haystack samples, one memory (haystack + needles) per sample.

    - ``single``: one needle, asked for.
    - ``multi_key``: ``num_keys`` needles with different keys; one key is asked for, the
      other needles are hard negatives.
    - ``multi_value``: one key with ``num_values`` values in as many documents; all are asked for.
    - ``multi_query``: ``num_keys`` needles; ``num_queries`` keys are asked for at once.

    Each record's ``negatives`` are the other documents of its own memory.

    With ``haystack_seed``, the haystack's filler comes from its own random stream, so the
    needles, their texts and the question depend on ``seed`` alone: the same ``seed`` with
    another haystack size or ``haystack_seed`` asks the same questions of the same needles.
    Without it, one stream draws everything (the samples of earlier versions). A ``stream``
    name gives two callers with the same kind and seed (two single-needle subtasks) their own
    needles.
    """
    if kind not in ("single", "multi_key", "multi_value", "multi_query"):
        raise ValueError(f"unknown needle kind {kind!r}")
    stream_name = f"needles/{kind}/{seed}" + (f"/{stream}" if stream else "")
    rng = random.Random(stream_name)
    haystack_rng = rng if haystack_seed is None else random.Random(f"{stream_name}/haystack/{haystack_seed}")
    corpus: list[Document] = []
    records: list[RetrievalRecord] = []
    for sample_index in range(num_samples):
        prefix = f"{kind}-{sample_index}"
        keys_taken: set[str] = set()
        values_taken: set[str] = set()
        needle_docs: list[tuple[str, str, str]] = []  # (doc_id, key, value)
        if kind == "multi_value":
            key = _random_key(rng, keys_taken)
            for value_index in range(num_values):
                needle_docs.append((f"{prefix}-needle{value_index}", key, _random_number(rng, values_taken)))
        else:
            needle_count = 1 if kind == "single" else num_keys
            for needle_index in range(needle_count):
                needle_docs.append(
                    (f"{prefix}-needle{needle_index}", _random_key(rng, keys_taken), _random_number(rng, values_taken))
                )
        haystack_ids = [haystack_doc_id(prefix, i) for i in range(haystack_docs)]
        for doc_id in haystack_ids:
            corpus.append(Document(doc_id, filler_text(haystack_rng, words_per_doc)))
        for doc_id, key, value in needle_docs:
            corpus.append(Document(doc_id, _needle_text(rng, key, value, words_per_doc // 2)))

        if kind == "multi_query":
            asked = rng.sample(needle_docs, min(num_queries, len(needle_docs)))
        elif kind == "multi_value":
            asked = needle_docs
        else:
            asked = [rng.choice(needle_docs)]
        asked_keys = list(dict.fromkeys(key for _, key, _ in asked))
        if kind == "multi_value":
            query = f"What are all the special magic numbers for {asked_keys[0]}?"
        elif len(asked_keys) == 1:
            query = f"What is the special magic number for {asked_keys[0]}?"
        else:
            query = "What are the special magic numbers for " + " and ".join(asked_keys) + "?"
        positives = [doc_id for doc_id, _, _ in asked]
        negatives = haystack_ids + [doc_id for doc_id, _, _ in needle_docs if doc_id not in positives]
        records.append(
            RetrievalRecord(
                query=query,
                positives=positives,
                negatives=negatives,
                answer=", ".join(value for _, _, value in asked),
                query_id=prefix,
            )
        )
    return RetrievalDataset(corpus=corpus, records=records)


@dataclass(frozen=True)
class _Fact:
    doc_id: str
    entity: str
    attribute: str
    value: str


def _attribute_value(rng: random.Random, attribute: str) -> str:
    if attribute == "favourite colour":
        return rng.choice(_COLOURS)
    if attribute == "home town":
        return rng.choice(_CITIES)
    if attribute == "pet's name":
        return rng.choice(_FIRST_NAMES)
    if attribute == "birth year":
        return str(rng.randrange(1940, 2010))
    return str(rng.randrange(100, 100_000))


def generate_kv_facts(
    num_facts: int,
    num_queries: int,
    seed: int,
    filler_words: int = 20,
    attributes: Sequence[str] | None = None,
    memory_size: int | None = None,
) -> RetrievalDataset:
    """A shared memory of ``num_facts`` "The <attribute> of <entity> is <value>." documents.

    Each query asks for one fact; the fact's document is its only positive and every
    other fact is a negative, so all records share one corpus. ``attributes`` restricts the
    attributes drawn (default: all of them), e.g. to those whose value is one word.

    With ``memory_size``, the facts come in consecutive groups of that many (``num_facts`` must
    be a multiple of it): within a group, no two facts share a first name or a last name, and a
    record's negatives are the other facts of its group only, so each group is one memory.
    """
    if attributes is None:
        attributes = _ATTRIBUTES
    unknown = [a for a in attributes if a not in _ATTRIBUTES]
    if unknown or not attributes:
        raise ValueError(f"attributes must be a non-empty subset of {_ATTRIBUTES}, got {list(attributes)}")
    attributes = list(attributes)
    if memory_size is not None and not (
        0 < memory_size <= min(len(_FIRST_NAMES), len(_LAST_NAMES)) and num_facts % memory_size == 0
    ):
        raise ValueError(
            f"memory_size must divide num_facts ({num_facts}) and be at most "
            f"{min(len(_FIRST_NAMES), len(_LAST_NAMES))}, got {memory_size}"
        )
    rng = random.Random(f"kv/{seed}")
    entities_taken: set[str] = set()
    facts: list[_Fact] = []
    for fact_index in range(num_facts):
        attribute = rng.choice(attributes)
        if memory_size is not None:
            if fact_index % memory_size == 0:
                group_names = list(zip(rng.sample(_FIRST_NAMES, memory_size), rng.sample(_LAST_NAMES, memory_size)))
            entity = " ".join(group_names[fact_index % memory_size])
        # Past 300 of the 352 possible names, drawing an unused one would take ever longer.
        elif len(entities_taken) < 300:
            entity = _full_name(rng, entities_taken)
        else:
            entity = f"entity {fact_index}"
        facts.append(_Fact(f"fact-{fact_index}", entity, attribute, _attribute_value(rng, attribute)))
    corpus = []
    for fact in facts:
        statement = f"The {fact.attribute} of {fact.entity} is {fact.value}."
        corpus.append(Document(fact.doc_id, f"{statement} {filler_text(rng, filler_words)}"))
    records = []
    for query_index in range(num_queries):
        fact_index = rng.randrange(len(facts))
        fact = facts[fact_index]
        group = facts if memory_size is None else facts[fact_index - fact_index % memory_size :][:memory_size]
        records.append(
            RetrievalRecord(
                query=f"What is the {fact.attribute} of {fact.entity}?",
                positives=[fact.doc_id],
                negatives=[other.doc_id for other in group if other.doc_id != fact.doc_id],
                answer=fact.value,
                query_id=f"kv-{query_index}",
            )
        )
    return RetrievalDataset(corpus=corpus, records=records)


def generate_multihop_chains(
    num_chains: int,
    seed: int,
    hops: int = 2,
    distractors_per_chain: int = 6,
    filler_words: int = 20,
    hop_positives: bool = False,
) -> RetrievalDataset:
    """Chains "A works with B." -> "B works with C." -> ... -> "Z lives in <city>.".

    The query names A and asks where the last person of the chain lives; ``hops[i]`` is the
    document needed at retrieval step i. Distractors reuse the same sentence shapes with
    other people, so they are hard negatives.

    ``hop_positives``: also list every hop document as a positive, so that a ``retrieval`` or
    ``qa`` sample retrieves the whole chain in one round (the ablation without interleave
    steps); by default records have no positives and only ``interleave`` samples use them.
    """
    if hops < 1:
        raise ValueError("a chain needs at least one hop")
    rng = random.Random(f"multihop/{seed}/{hops}")
    corpus: list[Document] = []
    records: list[RetrievalRecord] = []
    names_taken: set[str] = set()

    def new_name() -> str:
        if len(names_taken) >= len(_FIRST_NAMES) * len(_LAST_NAMES) - 1:
            names_taken.clear()
        return _full_name(rng, names_taken)

    for chain_index in range(num_chains):
        prefix = f"chain-{chain_index}"
        people = [new_name() for _ in range(hops)]
        city = rng.choice(_CITIES)
        hop_ids: list[list[str]] = []
        for hop_index in range(hops):
            doc_id = f"{prefix}-hop{hop_index}"
            if hop_index + 1 < hops:
                statement = f"{people[hop_index]} works with {people[hop_index + 1]}."
            else:
                statement = f"{people[hop_index]} lives in {city}."
            corpus.append(Document(doc_id, f"{statement} {filler_text(rng, filler_words)}"))
            hop_ids.append([doc_id])
        distractor_ids = []
        for distractor_index in range(distractors_per_chain):
            doc_id = f"{prefix}-distractor{distractor_index}"
            if distractor_index % 2 == 0:
                statement = f"{new_name()} works with {new_name()}."
            else:
                statement = f"{new_name()} lives in {rng.choice(_CITIES)}."
            corpus.append(Document(doc_id, f"{statement} {filler_text(rng, filler_words)}"))
            distractor_ids.append(doc_id)
        relation = " of ".join(["the colleague"] * (hops - 1))
        subject = f"{relation} of {people[0]}" if hops > 1 else people[0]
        records.append(
            RetrievalRecord(
                query=f"In which city does {subject} live?",
                positives=[doc_id for hop in hop_ids for doc_id in hop] if hop_positives else [],
                negatives=distractor_ids,
                answer=city,
                hops=hop_ids,
                query_id=prefix,
            )
        )
    return RetrievalDataset(corpus=corpus, records=records)
