"""Real English text without downloads, cut into training, calibration and held-out tokens.

The text is Python's own documentation: `pydoc_data.topics.topics` (about 80 help topics,
465k characters, shipped with CPython). Topics are concatenated in sorted key order,
separated by blank lines, tokenized in one piece; the last `EVAL_TOKENS` tokens are the
held-out evaluation split and everything before them is the training / calibration split.
`windows` cuts a stream into the non-overlapping `WINDOW`-token windows perplexity is
measured on (`vnm_recipes.llm.evaluation`); `calibration_batches` and `training_batch`
draw the windows calibration and training read.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from vnm_recipes.checks import check_positive_int

EVAL_TOKENS = 20480
WINDOW = 512


def pydoc_topics_text() -> str:
  """All of `pydoc_data.topics.topics`, in sorted key order, joined by blank lines."""
  from pydoc_data.topics import topics

  return "\n\n".join(topics[key] for key in sorted(topics))


class TokenSplit(NamedTuple):
  """A token stream cut into a training and a held-out evaluation part.

  Attributes:
    train: int32 (n_train,), the tokens before the evaluation part.
    eval: int32 (eval_tokens,), the last tokens of the stream.
  """

  train: np.ndarray
  eval: np.ndarray


def split_pydoc_topics(tokenizer, eval_tokens: int = EVAL_TOKENS) -> TokenSplit:
  """Tokenizes `pydoc_topics_text()` and holds out its last `eval_tokens` tokens.

  Args:
    tokenizer: anything with `encode(text).ids` (a `tokenizers.Tokenizer`).
    eval_tokens: size of the evaluation split; must leave at least one training token.
  """
  ids = np.asarray(tokenizer.encode(pydoc_topics_text()).ids, np.int32)
  if isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or \
      not 0 < eval_tokens < ids.size:
    raise ValueError(f"eval_tokens must be an int in [1, {ids.size - 1}] (the text has "
                     f"{ids.size} tokens), got {eval_tokens!r}")
  return TokenSplit(train=ids[:-eval_tokens], eval=ids[-eval_tokens:])


def windows(tokens: np.ndarray, length: int) -> np.ndarray:
  """Cuts a 1D token stream into non-overlapping windows, dropping the incomplete tail.

  Returns:
    (len(tokens) // length, length), same dtype.
  """
  tokens = np.asarray(tokens)
  if tokens.ndim != 1:
    raise ValueError(f"tokens must be 1D, got shape {tokens.shape}")
  if isinstance(length, bool) or not isinstance(length, int) or not 2 <= length <= tokens.size:
    raise ValueError(f"length must be an int in [2, {tokens.size}] (the number of tokens), "
                     f"got {length!r}")
  count = tokens.size // length
  return tokens[:count * length].reshape(count, length)


def calibration_batches(train_tokens: np.ndarray, count: int, length: int,
                        batch_size: int) -> list[np.ndarray]:
  """`count` windows of `length` tokens spread evenly over the training split, batched.

  Returns:
    A list of int32 (batch_size, length) arrays (the last may be smaller).
  """
  check_positive_int("count (calibration windows)", count)
  cut = windows(train_tokens, length)
  if count > len(cut):
    raise ValueError(f"count={count} calibration windows of {length} tokens do not fit the "
                     f"{len(train_tokens)} training tokens (at most {len(cut)})")
  chosen = cut[np.linspace(0, len(cut) - 1, count).round().astype(int)].astype(np.int32)
  return [chosen[i:i + batch_size] for i in range(0, count, batch_size)]


def training_batch(train_tokens: np.ndarray, rng: np.random.Generator, batch_size: int,
                   length: int) -> np.ndarray:
  """int32 (batch_size, length) windows of the training split at uniform random starts."""
  starts = rng.integers(0, len(train_tokens) - length + 1, size=batch_size)
  return np.stack([train_tokens[s:s + length] for s in starts]).astype(np.int32)
