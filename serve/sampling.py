"""Sampling on device: greedy, temperature, top-k, top-p, with a per-request seed.

A request's randomness depends only on its own seed and the position of the token being drawn:
key = fold_in(key(seed), position). Its tokens are therefore the same whatever else shares the
batch, whichever row it lands in, and after a preemption recomputes it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


MAX_LOGPROBS = 20  # top-k alternatives every step can return (a fixed width: one compiled step)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request is decoded. temperature 0 is greedy (top_k, top_p and seed are then unused).

  Filters apply in order: temperature, then top-k, then top-p on the distribution renormalised
  over the top-k tokens (the Hugging Face order). Stop token ids and max_tokens end a request in
  the scheduler; stop strings need the engine's detokenize callback.
  """

  max_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0  # 0: no top-k filter
  top_p: float = 1.0  # 1.0: no top-p filter
  seed: int | None = None  # None: the engine draws one from its own seed
  stop_token_ids: tuple[int, ...] = ()
  stop: tuple[str, ...] = ()  # stop strings, matched in the detokenized output
  logprobs: int | None = None  # None: off; k: each token's logprob and the top k (<= MAX_LOGPROBS)
  prompt_logprobs: int | None = None  # None: off; k: the prompt's logprobs and top k, from the prefill
  grammar: Any = None  # a serve.grammar.Grammar: decoding constrained to it (token bitmasks)
  lora: str | None = None  # the name of a LoRA adapter loaded in the engine (None: the base model)
  speculate: bool = True  # False: never draft for it (an engine with speculative decoding; serve/speculative.py)

  def __post_init__(self):
    object.__setattr__(self, 'stop_token_ids', tuple(int(t) for t in self.stop_token_ids))
    if isinstance(self.stop, str):
      object.__setattr__(self, 'stop', (self.stop,))
    object.__setattr__(self, 'stop', tuple(self.stop))
    if self.max_tokens < 1:
      raise ValueError(f'SamplingParams.max_tokens={self.max_tokens}; generate at least 1 token.')
    if not self.temperature >= 0:
      raise ValueError(f'SamplingParams.temperature={self.temperature}; use 0 (greedy) or more.')
    if self.top_k < 0:
      raise ValueError(f'SamplingParams.top_k={self.top_k}; use 0 (off) or a positive count.')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'SamplingParams.top_p={self.top_p}; it must be in (0, 1] (1: off).')
    if self.seed is not None and not 0 <= self.seed < 2 ** 32:
      raise ValueError(f'SamplingParams.seed={self.seed}; use an integer in [0, 2**32).')
    for name in ('logprobs', 'prompt_logprobs'):
      k = getattr(self, name)
      if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise ValueError(f'SamplingParams.{name}={k}; use None (off) or 0 to {MAX_LOGPROBS}.')
    if any(not s for s in self.stop):
      raise ValueError(f'SamplingParams.stop={self.stop} holds an empty string; remove it.')


class SamplingBatch(NamedTuple):
  """Per-row sampling inputs of one step, [B] each; padding rows are greedy."""

  temperature_B: jax.Array  # float32
  top_k_B: jax.Array  # int32, 0: off
  top_p_B: jax.Array  # float32, 1.0: off
  seeds_B: jax.Array  # uint32
  positions_B: jax.Array  # int32: position of the token being drawn (its sequence's length)


def host_batch(rows: list[tuple[SamplingParams, int, int]], num_rows: int) -> SamplingBatch:
  """numpy arrays for (params, seed, position) per row, padded to num_rows greedy rows."""
  temperature, top_k = np.zeros(num_rows, np.float32), np.zeros(num_rows, np.int32)
  top_p, seeds = np.ones(num_rows, np.float32), np.zeros(num_rows, np.uint32)
  positions = np.zeros(num_rows, np.int32)
  for b, (params, seed, position) in enumerate(rows):
    temperature[b], top_k[b], top_p[b] = params.temperature, params.top_k, params.top_p
    seeds[b], positions[b] = seed, position
  return SamplingBatch(temperature, top_k, top_p, seeds, positions)


def filter_logits(logits_BV: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array,
                  top_p_B: jax.Array) -> jax.Array:
  """Temperature-scaled float32 logits with -inf outside each row's top-k/top-p support.

  Ties are ranked by token id (lower first), so the support is always exactly top_k tokens.
  Top-p keeps the smallest prefix of the ranked tokens whose probability reaches top_p: a token
  stays when the mass ranked before it is below top_p. Rows with temperature 0 are not scaled.
  """
  B, V = logits_BV.shape
  scale_B = jnp.where(temperature_B > 0, temperature_B, 1.0)
  scaled_BV = logits_BV.astype(jnp.float32) / scale_B[:, None]
  order_BV = jnp.argsort(-scaled_BV, axis=-1, stable=True)
  sorted_BV = jnp.take_along_axis(scaled_BV, order_BV, axis=-1)
  rank_V = jnp.arange(V, dtype=jnp.int32)
  k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, V), V)
  keep_BV = rank_V[None, :] < k_B[:, None]
  probs_BV = jax.nn.softmax(jnp.where(keep_BV, sorted_BV, -jnp.inf), axis=-1)
  mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
  # top_p == 1 must filter nothing, even where rounding makes the mass before a token reach 1.
  keep_BV &= (mass_before_BV < top_p_B[:, None]) | (top_p_B[:, None] >= 1.0)
  keep_in_vocab_BV = jnp.zeros_like(keep_BV).at[jnp.arange(B)[:, None], order_BV].set(keep_BV)
  return jnp.where(keep_in_vocab_BV, scaled_BV, -jnp.inf)


def argmax(x: jax.Array) -> jax.Array:
  """jnp.argmax(x, axis=-1) as int32 (the first of equal maxima; the first NaN if any), in two
  passes XLA:CPU vectorises, a max then a min over indices: its argmax is a (value, index) reduce
  it does not, 1.30 -> 0.33 ms for [16, 32768] and 158 -> 26 us for [1, 32768] (2-core CPU)."""
  m = jnp.max(x, axis=-1, keepdims=True)
  first = (x == m) | jnp.isnan(x)
  V = x.shape[-1]
  return jnp.min(jnp.where(first, jnp.arange(V, dtype=jnp.int32), V), axis=-1)


def row_keys(seeds_R: jax.Array, positions_R: jax.Array) -> jax.Array:
  """Each row's key: fold_in(key(seed), position)."""
  return jax.vmap(lambda seed, position: jax.random.fold_in(jax.random.key(seed), position))(
      seeds_R, positions_R)


def uniforms(keys_R: jax.Array, salt: int | None = None) -> jax.Array:
  """One float32 uniform in [0, 1) per key (per fold_in(key, salt) when salt is given)."""
  if salt is not None:
    keys_R = jax.vmap(jax.random.fold_in, (0, None))(keys_R, salt)
  return jax.vmap(jax.random.uniform)(keys_R)


def inverse_cdf(u_R: jax.Array, weights_RV: jax.Array) -> jax.Array:
  """Row r's token (int32 [R]): the first v whose cumulative weight exceeds u_R[r] x the row's
  total, from unnormalised weights (>= 0, some > 0 in every row); a token of weight 0 is never drawn.

  Inverse transform sampling, one uniform per row, as FlashInfer's sampling from probabilities:
  a Gumbel-max draw needs V random numbers per row, and at V = 4096 on a 2-core CPU their threefry
  bits cost ~110 us per row. The cumulative sum runs in two levels (sum each of ~sqrt(V) blocks,
  walk the blocks' cumulative sums, then the chosen block's): XLA:CPU's cumsum over 4096 is
  ~90 us a row, the two levels 12 (and rounding piles up over sqrt(V) terms, not V). A float32
  uniform is a multiple of 2^-23 (jax.random.uniform): a token of probability below ~1e-7 is drawn
  with a probability rounded to that grid (a Gumbel draw has float32 limits of its own).
  """
  R, V = weights_RV.shape
  C = 1 << max(0, (int(V) - 1).bit_length() + 1) // 2  # blocks: about sqrt(V), a power of two
  L = -(-V // C)  # tokens per block
  w_RCL = jnp.pad(weights_RV.astype(jnp.float32), ((0, 0), (0, C * L - V))).reshape(R, C, L)
  block_RC = jnp.sum(w_RCL, axis=-1)
  upto_RC = jnp.cumsum(block_RC, axis=-1)
  target_R = u_R * upto_RC[:, -1]

  def first(cum_RX, weight_RX, bound_R):
    """The first index of positive weight whose cumulative sum passes bound_R; where rounding
    carries bound_R past the last sum, the last index of positive weight. Never one of weight 0,
    however a backend rounds sums over zeros."""
    x_X = jnp.arange(cum_RX.shape[-1], dtype=jnp.int32)
    positive_RX = weight_RX > 0
    passed_R = jnp.min(jnp.where((cum_RX > bound_R[:, None]) & positive_RX, x_X, cum_RX.shape[-1]), axis=-1)
    last_R = jnp.max(jnp.where(positive_RX, x_X, 0), axis=-1)
    return jnp.minimum(passed_R, last_R)

  c_R = first(upto_RC, block_RC, target_R)
  w_RL = jnp.take_along_axis(w_RCL, c_R[:, None, None], axis=1)[:, 0]
  rest_R = target_R - jnp.take_along_axis(upto_RC - block_RC, c_R[:, None], axis=1)[:, 0]
  return c_R * L + first(jnp.cumsum(w_RL, axis=-1), w_RL, rest_R)


def sample(logits_BV: jax.Array, batch: SamplingBatch) -> jax.Array:
  """One token id per row (int32 [B]): argmax where temperature is 0, else a draw from the
  filtered distribution with the row's own key, fold_in(key(seed), position).

  The sort behind top-k/top-p is slow on CPU (~20 ms for 16 x 4096), so it runs only when some
  row filters, and nothing random runs for an all-greedy batch. A row's draw is the same on every
  branch (unfiltered rows come out of filter_logits unchanged), so it never depends on its batch.
  """
  greedy_B = argmax(logits_BV)
  random_B = batch.temperature_B > 0
  filtering = jnp.any(random_B & ((batch.top_k_B > 0) | (batch.top_p_B < 1.0)))

  def draw(filtered_BV):
    return inverse_cdf(uniforms(row_keys(batch.seeds_B, batch.positions_B)),
                       jax.nn.softmax(filtered_BV, axis=-1))

  def filtered():
    return draw(filter_logits(logits_BV, batch.temperature_B, batch.top_k_B, batch.top_p_B))

  def unfiltered():
    scale_B = jnp.where(random_B, batch.temperature_B, 1.0)
    return draw(logits_BV.astype(jnp.float32) / scale_B[:, None])

  drawn_B = jax.lax.cond(
      filtering, filtered,
      lambda: jax.lax.cond(jnp.any(random_B), unfiltered, lambda: greedy_B))
  return jnp.where(random_B, drawn_B, greedy_B)


def allowed(mask_BW: jax.Array, V: int) -> jax.Array:
  """bool [B, V] from a token bitmask [B, ceil(V / 32)] int32: token v is bit v % 32 of word v // 32
  (llguidance's and xgrammar's layout)."""
  v_V = jnp.arange(V, dtype=jnp.int32)
  words_BV = jnp.take(mask_BW, v_V >> 5, axis=1)
  return ((words_BV >> (v_V & 31)[None, :]) & 1).astype(bool)


def apply_mask(logits_BV: jax.Array, mask_BW: jax.Array, masked: jax.Array) -> jax.Array:
  """-inf where a row's grammar bitmask forbids a token; only computed when `masked` (a scalar
  bool: some row is constrained), so unconstrained steps pay one branch."""
  V = logits_BV.shape[-1]
  return jax.lax.cond(masked, lambda: jnp.where(allowed(mask_BW, V), logits_BV, -jnp.inf),
                      lambda: logits_BV)


class Logprobs(NamedTuple):
  """Log-probabilities of the model's own distribution (float32 log_softmax of the raw logits:
  before temperature, top-k/top-p and grammar masks, as vLLM's default), per row: the chosen token's
  and the MAX_LOGPROBS likeliest tokens, sorted (ties: lower id first)."""

  chosen_R: jax.Array  # float32
  top_ids_RK: jax.Array  # int32
  top_RK: jax.Array  # float32


def logprobs(logits_RV, chosen_R: jax.Array, wanted: jax.Array, V: int) -> Logprobs:
  """Logprobs of `chosen_R` and the top MAX_LOGPROBS of each row; zeros unless `wanted` (a scalar
  bool), so a step where nobody asked pays one branch and no [R, V] work. `logits_RV`: the float
  logits, or a function computing them (then only computed when wanted)."""
  R = chosen_R.shape[0]
  K = min(MAX_LOGPROBS, V)

  def compute():
    lp_RV = jax.nn.log_softmax((logits_RV() if callable(logits_RV) else logits_RV).astype(jnp.float32),
                               axis=-1)
    top_RK, ids_RK = jax.lax.top_k(lp_RV, K)
    chosen = jnp.take_along_axis(lp_RV, jnp.maximum(chosen_R, 0)[:, None], axis=-1)[:, 0]
    return Logprobs(chosen, ids_RK.astype(jnp.int32), top_RK)

  def skip():
    return Logprobs(jnp.zeros(R, jnp.float32), jnp.zeros((R, K), jnp.int32),
                    jnp.zeros((R, K), jnp.float32))
  return jax.lax.cond(wanted, compute, skip)
