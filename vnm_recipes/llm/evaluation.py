"""Perplexity of a causal language model on a token stream.

Perplexity is measured on non-overlapping windows of `WINDOW` tokens
(`vnm_recipes.data.text.windows`): each window is one sequence from position 0, and
every token after the first of a window is predicted (window - 1 predictions per
window). Perplexity = exp(mean negative log-likelihood).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from vnm_recipes.checks import check_positive_int
from vnm_recipes.data.text import WINDOW, windows


def token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Negative log-likelihood of each next token.

  Args:
    logits: (batch, length, vocab) next-token logits of `tokens`.
    tokens: int (batch, length).

  Returns:
    float32 (batch, length - 1): nll[:, t] = -log p(tokens[:, t + 1] | tokens[:, :t + 1]).
  """
  logits = logits[:, :-1].astype(jnp.float32)
  # logsumexp minus the target logit: one pass over the vocabulary, not a full log_softmax.
  target = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - target


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _window_nll_sum(graphdef, state, tokens, weights):
  model = nnx.merge(graphdef, state)
  return jnp.sum(token_nll(model(tokens), tokens).sum(axis=1) * weights)


class Perplexity(NamedTuple):
  """Result of `evaluate_perplexity`.

  Attributes:
    mean_nll: mean negative log-likelihood per predicted token (nats).
    perplexity: exp(mean_nll).
    predictions: number of predicted tokens averaged over.
  """

  mean_nll: float
  perplexity: float
  predictions: int


def evaluate_perplexity(model: nnx.Module, tokens: np.ndarray, *, window: int = WINDOW,
                        batch_size: int = 2, progress: bool = True) -> Perplexity:
  """Perplexity of a causal LM on non-overlapping windows of a token stream.

  One jitted program scores `batch_size` windows at a time (the last batch is padded with
  zero-weight copies so it compiles once).

  Args:
    model: maps int (batch, window) tokens to (batch, window, vocab) logits.
    tokens: 1D int token stream; the tail shorter than a window is dropped.
    window: tokens per window.
    batch_size: windows per call (memory: batch_size * window * vocab float32 logits).
    progress: show a progress bar.
  """
  check_positive_int("batch_size", batch_size)
  cut = windows(tokens, window)
  graphdef, state = nnx.split(model)
  total = 0.0
  for start in tqdm(range(0, len(cut), batch_size), desc="perplexity", disable=not progress,
                    leave=False):
    batch = cut[start:start + batch_size]
    weights = np.zeros(batch_size, np.float32)
    weights[:len(batch)] = 1.0
    batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - len(batch), axis=0)])
    total += float(_window_nll_sum(graphdef, state, jnp.asarray(batch, jnp.int32),
                                   jnp.asarray(weights)))
  predictions = len(cut) * (window - 1)
  mean_nll = total / predictions
  return Perplexity(mean_nll=mean_nll, perplexity=math.exp(mean_nll), predictions=predictions)
