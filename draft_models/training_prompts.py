"""The prompts `pipeinfer train-draft` has the target answer: people's
own requests and questions, from a package registry (nothing from a model
hub), none of the bench's prompts.

Two blocks, in this order, each shuffled with a fixed seed:
1. requests (prompts/requests.jsonl): the everyday requests written for this
   project (recipes, emails, code, advice, stories, sums) and the free-form
   English requests of OpenAI's `evals` 3.0.1.post1 (MIT; only files outside
   the datasets its LICENSE lists under other terms; the file names each
   prompt's source);
2. questions people asked each other in conversation: the `chitchat-dataset`
   0.9.0 package (MIT, the BYU PCC lab's Chit-Chat Challenge: 7,168
   human-human conversations), every turn that is a question of five words
   or more, deduplicated.
A tenth of each block, from its start, is held out.

`train-draft --target-prompts N` adds a third block that the target writes
itself: given a list of four of the project's requests, it continues the
list with one more, sampled, and that request is then answered like the
others.
"""

from __future__ import annotations

import json
import random
import re
from functools import cache
from pathlib import Path

Messages = list[dict[str, str]]

REQUESTS_FILE = Path(__file__).parent / "prompts" / "requests.jsonl"
OWN_SOURCE = "pipeinfer"  # requests.jsonl's source for the project's own
MIN_QUESTION_WORDS = 5


@cache
def _requests() -> tuple[tuple[str, str], ...]:
    """(prompt, source) of requests.jsonl, in the file's order."""
    rows = [json.loads(line) for line in REQUESTS_FILE.read_text().splitlines() if line.strip()]
    return tuple((row["prompt"], row["source"]) for row in rows)


@cache
def _questions() -> tuple[str, ...]:
    """chitchat-dataset's questions: a turn (its messages joined) ending in
    "?", of MIN_QUESTION_WORDS words or more, mostly ASCII; first occurrence
    of each, compared without case, spacing or punctuation."""
    from chitchat_dataset import Dataset

    data = Dataset()
    seen, questions = set(), []
    for conversation in (data[key] for key in sorted(data)):
        for turn in conversation["messages"]:
            text = " ".join(message["text"].strip() for message in turn).strip()
            if not text.endswith("?") or len(text.split()) < MIN_QUESTION_WORDS:
                continue
            if sum(c.isascii() for c in text) < 0.95 * len(text):
                continue
            key = re.sub(r"[\W_]+", " ", text.lower()).strip()
            if key not in seen:
                seen.add(key)
                questions.append(text)
    return tuple(questions)


def _blocks() -> tuple[list[str], list[str]]:
    requests = [text for text, _ in _requests()]
    random.Random(1234).shuffle(requests)
    questions = list(_questions())
    random.Random(4321).shuffle(questions)
    return requests, questions


def training_prompts() -> list[Messages]:
    """The whole set, in its fixed order (see the module's docstring)."""
    return [[{"role": "user", "content": text}] for block in _blocks() for text in block]


def block_sizes() -> tuple[int, ...]:
    return tuple(len(block) for block in _blocks())


def held_out(count: int, written: int = 0) -> list[int]:
    """The indices held out among the set's first `count` prompts followed
    by `written` target-written ones: the first tenth of each block there
    (at least one)."""
    held, start = [], 0
    for size in block_sizes():
        present = min(size, count - start)
        if present <= 0:
            break
        held += range(start, start + max(1, present // 10))
        start += size
    if written:
        held += range(count, count + max(1, written // 10))
    return held


# How the target is asked to write a request of its own (--target-prompts):
# a list it continues, begun with a few of the project's requests (a small
# model imitates examples far better than it follows an instruction to write
# a request).
WRITING_HEADER = "Messages people sent to an AI assistant:\n"
WRITING_EXAMPLES = 4


def writing_asks(count: int) -> list[tuple[str, str]]:
    """The first `count` asks for target-written requests: (raw text, ending
    where the next request goes; the first example, a request to use if
    the target writes none), each with its own examples."""
    own = [text for text, source in _requests() if source == OWN_SOURCE]
    asks = []
    for i in range(count):
        examples = random.Random(5678 + i).sample(own, WRITING_EXAMPLES)
        listed = "".join(f"{n}. {example}\n" for n, example in enumerate(examples, 1))
        asks.append((f"{WRITING_HEADER}{listed}{WRITING_EXAMPLES + 1}.", examples[0]))
    return asks
