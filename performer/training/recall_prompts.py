"""Retrieval prompts for long-context evaluation: passkey and single needle.

Both follow published protocols word for word, so that our numbers compare with
theirs:

* passkey (Landmark Attention; LongLoRA): a 5-digit key in repeated filler text;
* needle (RULER's niah_single): "One of the special magic numbers for {word} is:
  {7 digits}." in a haystack of real prose.

A prompt is built at the token level to exactly `length` tokens: BOS (where the
vocabulary has one), the pieces tokenized one by one, the filler or haystack cut to
the budget that is left. The needle sits at `depth` (0 = right after the intro,
1 = right before the question), always between two whole filler units or sentences.
The answer is the tokens the model must produce after the prompt; a trial is right
only if greedy decoding reproduces every one of them.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

PASSKEY_INTRO = (
  'There is an important info hidden inside a lot of irrelevant text. Find it and memorize '
  'it. I will quiz you about the important information there.'
)
PASSKEY_FILLER = (
  ' The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.'
)
PASSKEY_NEEDLE = ' The pass key is {key}. Remember it. {key} is the pass key.'
PASSKEY_QUERY = ' What is the pass key? The pass key is'

NEEDLE = ' One of the special magic numbers for {word} is: {number}.'
NEEDLE_QUERY = (
  ' What is the special magic number for {word} mentioned in the provided text? The special '
  'magic number for {word} mentioned in the provided text is'
)
# RULER draws "adjective-noun" keys from a word list; a fixed list keeps this offline.
ADJECTIVES = (
  'able angry bright calm clever cold curious daring eager early fancy gentle giant happy '
  'honest hollow jolly kind lively lucky mellow modern noisy odd orange plain proud quiet '
  'rapid rare rich rustic shiny silent simple sleepy smooth solid spicy steady sturdy sunny '
  'swift tall tender tiny vivid warm wild wise young zealous'
).split()
NOUNS = (
  'anchor apple badger basket beacon bicycle blanket bridge candle canyon castle cellar '
  'comet compass cottage crystal desert dolphin dragon falcon feather forest fountain garden '
  'glacier harbor helmet island jacket kettle lantern meadow mirror mountain needle orchard '
  'parrot pebble pepper pillow pumpkin river saddle shadow tiger tunnel violin wagon window'
).split()


@dataclasses.dataclass(frozen=True)
class Trial:
  """One prompt of exactly `len(tokens)` tokens and the answer it asks for."""

  tokens: np.ndarray  # int32 [length]
  answer: np.ndarray  # int32 [answer tokens]
  depth: float  # where the needle sits: 0 = first, 1 = last among the filler units
  text_answer: str


def depths(trials: int) -> np.ndarray:
  """Evenly spaced needle depths: trial i of n at i / (n - 1) (0.5 for one trial)."""
  return np.linspace(0.0, 1.0, trials) if trials > 1 else np.array([0.5])


def _encode(vocab, text: str) -> list[int]:
  return [int(i) for i in vocab.encode(text)]


def answer_tokens(vocab, prompt_text: str, answer_text: str) -> list[int]:
  """What follows the prompt's tokens when prompt + answer is tokenized whole (BPE merges
  a leading space with the digits), else the answer tokenized alone."""
  prompt, whole = _encode(vocab, prompt_text), _encode(vocab, prompt_text + answer_text)
  if whole[: len(prompt)] == prompt and len(whole) > len(prompt):
    return whole[len(prompt) :]
  return _encode(vocab, answer_text)


def _assemble(vocab, length, head, units, needle, query, depth):
  """[BOS] head, as many whole `units` as fit with the needle among them at `depth`,
  then query. The few tokens left over are the end of one more unit, placed right after
  the head, so the text before the question is whole units, as in the published
  protocol, and every prompt is exactly `length` tokens (one compiled prefill)."""
  bos = getattr(vocab, 'bos_id', None)
  head_ids = ([int(bos)] if bos is not None else []) + head
  budget = length - len(head_ids) - len(needle) - len(query)
  if budget < 0:
    raise ValueError(
      f'length {length}: too short for the prompt without filler '
      f'({length - budget} tokens); use a longer length'
    )
  chosen, used, i = [], 0, 0
  while used + len(units[i % len(units)]) <= budget:
    chosen.append(units[i % len(units)])
    used += len(units[i % len(units)])
    i += 1
  spare = budget - used  # shorter than the next unit
  lead = units[i % len(units)][len(units[i % len(units)]) - spare :] if spare else []
  cut = int(round(depth * len(chosen)))
  before = [t for unit in chosen[:cut] for t in unit]
  after = [t for unit in chosen[cut:] for t in unit]
  tokens = np.asarray(head_ids + lead + before + needle + after + query, np.int32)
  assert len(tokens) == length, (len(tokens), length)
  return tokens


def passkey(vocab, length: int, depth: float, rng: np.random.Generator) -> Trial:
  """The passkey prompt of `length` tokens with a 5-digit key at `depth`."""
  key = str(int(rng.integers(10000, 100000)))
  unit = _encode(vocab, PASSKEY_FILLER)
  needle = _encode(vocab, PASSKEY_NEEDLE.format(key=key))
  query = _encode(vocab, PASSKEY_QUERY)
  answer = answer_tokens(vocab, PASSKEY_QUERY, ' ' + key)
  tokens = _assemble(vocab, length, _encode(vocab, PASSKEY_INTRO), [unit], needle, query, depth)
  return Trial(tokens, np.asarray(answer, np.int32), depth, key)


def sentences(documents) -> list[str]:
  """Prose split into sentences (each with its leading space), in order."""
  out = []
  for doc in documents:
    for sent in re.split(r'(?<=[.!?])\s+', ' '.join(doc.split())):
      if sent:
        out.append(' ' + sent)
  return out


def needle(vocab, length: int, depth: float, rng, haystack: list[list[int]]) -> Trial:
  """RULER's single needle at `depth` in a haystack of tokenized sentences (starting
  at a random sentence, wrapping around)."""
  word = f'{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}'
  number = str(int(rng.integers(1_000_000, 10_000_000)))
  start = int(rng.integers(len(haystack)))
  units = haystack[start:] + haystack[:start]
  query_text = NEEDLE_QUERY.format(word=word)
  needle_ids = _encode(vocab, NEEDLE.format(word=word, number=number))
  tokens = _assemble(vocab, length, [], units, needle_ids, _encode(vocab, query_text), depth)
  answer = answer_tokens(vocab, query_text, ' ' + number)
  return Trial(tokens, np.asarray(answer, np.int32), depth, number)
