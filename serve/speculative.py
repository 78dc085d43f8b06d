"""Speculative decoding: drafters propose k tokens per sequence; the target verifies them in one step.

A speculating sequence contributes its last token and its k' <= k draft tokens to the target's step
(serve/scheduler.py: `schedule(drafts)`); the step computes the target's logits at all k' + 1 positions
(p_0 .. p_k'; p_j predicts the token after the sequence's j-th draft) and `verify` picks the tokens to
keep, on device:

  greedy (temperature 0)  the longest prefix of drafts equal to the target's argmax, then the argmax
                          after it: exactly the tokens plain greedy decoding gives.
  temperature > 0         exact rejection sampling (Leviathan et al. 2023; Chen et al. 2023): draft d_j
                          drawn from q is accepted with probability min(1, p(d_j) / q(d_j)); at the first
                          rejection a token is drawn from norm(max(0, p - q)); after k' acceptances one more
                          from p. p and q are both the filtered distributions (temperature, then top-k,
                          then top-p: sampling.filter_logits), so the output follows the target's filtered
                          distribution exactly. Randomness is the request's own: key fold_in(key(seed),
                          position) as in plain sampling (the bonus draw uses exactly that key: with no
                          draft a row samples as it would without speculation), folded with 1 for the
                          acceptance test and 2 for the residual draw.

The scheduler then rolls back: only the accepted drafts' keys/values stay, pages left empty return to
the pool (in the draft model's cache too: `DraftModel` rewinds its requests to the target's tokens).

Drafters:
  NgramDrafter  prompt lookup: the tokens that followed the most recent earlier occurrence of the
                sequence's last n tokens (n = NGRAM_MAX down to NGRAM_MIN), in the prompt or the output.
                A point mass: q(d) = 1, so d is accepted with probability p(d).
  DraftModel    a small model of the same vocabulary run by its own Engine (own paged cache, no
                prefix cache): k steps per verification, planned ahead and run as one device call
                (DraftModel._steps, serve/programs.py: chain), each sampling with the request's
                temperature/top-k/top-p and a seed derived from the request's; its logits stay on
                device and are gathered into the target's step as q.

Back-off: speculation runs in a step only while the engine holds at most
EngineConfig.speculative_max_batch requests (running or waiting). A verification step computes
k + 1 tokens per sequence: while the step is bound by reading the weights (small batches) that
costs little more than one token; at large batches it costs about k + 1 times more, more than the
(1 - a^(k+1)) / (1 - a) tokens it yields for an acceptance rate a. Requests that ask for logprobs,
use a grammar, or set SamplingParams.speculate=False never draft.

Acceptance back-off, per request: each verification updates a moving average of the drafts it kept
(weight KEPT_WEIGHT on the latest; it starts at k), and so does a step for which the drafter found no
draft (prompt lookup without a match), as keeping none: such a step gains nothing and is synchronous.
While that average is below EngineConfig.speculative_min_accepted (default 0.5) the request decodes its next speculative_pause
(16) tokens plainly (steps overlap while every request that may draft is paused; a draft model
forgets it and prefills it afresh), then drafts again to re-measure. A verification costs ~1.3-1.5
plain steps on XLA:CPU, so a request whose verifications keep under ~0.5 drafts loses by drafting:
prompt lookup while sampling at temperature 0.8 kept ~0.1 of its 3 drafts per verification before
this back-off (benchmarks/speculative.py). Whether to draft depends only on the request's own past
(its verifications and its tokens), so its output distribution stays the target's.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from serve import programs, sampling
from serve.plans import PLACEHOLDER

SPECULATIVE = ('ngram', 'draft')  # EngineConfig.speculative: prompt lookup, or a draft model
NGRAM_MAX, NGRAM_MIN = 3, 1  # prompt lookup matches the last 3, then 2, then 1 tokens
KEPT_WEIGHT = 0.3  # the acceptance back-off's moving average: the latest verification's weight
DRAFT_SEED_SALT = 0x9E3779B9  # a request's drafter seed: its seed xor this (drafts independent of verification)


class Context(NamedTuple):
  """What a drafter sees of one request: its tokens so far, its sampling, its seed, the outputs it may still add."""

  tokens: Sequence[int]
  params: sampling.SamplingParams
  seed: int
  remaining: int


def expected_tokens(a: float, k: int) -> float:
  """Tokens per verification for a per-token acceptance rate a and k drafts: (1 - a^(k+1)) / (1 - a)."""
  return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def predicted_speedup(a: float, k: int, c: float, verify_cost: float = 1.0) -> float:
  """Leviathan et al.'s speed-up over plain decoding: tokens per verification over the time of k drafter steps
  (c: drafter/target step-time ratio) and one verification step (verify_cost: its time over a plain step's)."""
  return expected_tokens(a, k) / (k * c + verify_cost)


def verify(p_logits_RV: jax.Array, q_logits_RV: jax.Array | None, draft_R: jax.Array,
           num_draft_B: jax.Array, batch: sampling.SamplingBatch) -> tuple[jax.Array, jax.Array]:
  """Verifies each row's drafts (see the module docstring); rows r = b * K1 + j, K1 = k + 1.

  p_logits_RV: the target's logits at row b's j-th verified position (j <= num_draft_B[b]; rows past
  it are ignored). q_logits_RV: the drafter's logits when it drew draft_R[r] (None: a point mass on
  the draft, prompt lookup). draft_R: the draft token following position j (rows past num_draft_B[b]:
  ignored).
  batch.positions_B: the position of the token drawn after the last draft (a sequence of length N
  with n drafts: N + n). Returns (tokens_BK1, accepted_B): row b keeps tokens_BK1[b, :accepted_B[b] + 1].
  """
  R, V = p_logits_RV.shape
  B = num_draft_B.shape[0]
  K1 = R // B
  rep = lambda x_B: jnp.repeat(x_B, K1, total_repeat_length=R)
  j_R = jnp.tile(jnp.arange(K1, dtype=jnp.int32), B)
  has_draft_R = j_R < rep(num_draft_B)
  temperature_R, top_k_R, top_p_R = rep(batch.temperature_B), rep(batch.top_k_B), rep(batch.top_p_B)
  seeds_R = rep(batch.seeds_B)
  positions_R = rep(batch.positions_B - num_draft_B) + j_R
  draft_safe_R = jnp.maximum(draft_R, 0)
  greedy_R = sampling.argmax(p_logits_RV)
  random_R = temperature_R > 0
  filtering = jnp.any(random_R & ((top_k_R > 0) | (top_p_R < 1.0)))

  def filtered(logits_RV):
    def on():
      return sampling.filter_logits(logits_RV, temperature_R, top_k_R, top_p_R)

    def off():
      return logits_RV.astype(jnp.float32) / jnp.where(random_R, temperature_R, 1.0)[:, None]
    return jax.lax.cond(filtering, on, off)

  def sampled():
    p_filtered_RV = filtered(p_logits_RV)
    p_RV = jax.nn.softmax(p_filtered_RV, axis=-1)
    if q_logits_RV is None:
      q_RV = jax.nn.one_hot(draft_safe_R, V, dtype=jnp.float32)
    else:
      q_RV = jax.nn.softmax(filtered(q_logits_RV), axis=-1)
    p_d_R = jnp.take_along_axis(p_RV, draft_safe_R[:, None], axis=-1)[:, 0]
    q_d_R = jnp.take_along_axis(q_RV, draft_safe_R[:, None], axis=-1)[:, 0]
    residual_RV = jnp.maximum(p_RV - q_RV, 0.0)
    # p == q leaves no residual; a rejection then has probability 0, so any draw will do.
    residual_RV = jnp.where(jnp.sum(residual_RV, axis=-1, keepdims=True) > 0, residual_RV, p_RV)

    keys_R = sampling.row_keys(seeds_R, positions_R)
    u_R = sampling.uniforms(keys_R, 1)
    accept_R = u_R * q_d_R < p_d_R  # u < p / q without dividing by a q of 0
    # A row needs one draw: from the residual where it holds a draft (used if rejected), else the
    # bonus token from p, with the key sampling.sample draws with at this position.
    drawn_R = sampling.inverse_cdf(jnp.where(has_draft_R, sampling.uniforms(keys_R, 2), sampling.uniforms(keys_R)),
                                   jnp.where(has_draft_R[:, None], residual_RV, p_RV))
    return accept_R, jnp.where(has_draft_R & accept_R, draft_safe_R, drawn_R)

  def greedy():
    return jnp.zeros(R, bool), greedy_R

  accept_s_R, tokens_s_R = jax.lax.cond(jnp.any(random_R), sampled, greedy)
  accept_R = has_draft_R & jnp.where(random_R, accept_s_R, draft_R == greedy_R)
  tokens_R = jnp.where(random_R, tokens_s_R, greedy_R)
  accepted_B = jnp.sum(jnp.cumprod(accept_R.reshape(B, K1).astype(jnp.int32), axis=1), axis=1)
  return tokens_R.reshape(B, K1), accepted_B


def ngram_draft(tokens: Sequence[int] | np.ndarray, k: int, max_n: int = NGRAM_MAX,
                min_n: int = NGRAM_MIN) -> list[int]:
  """Prompt lookup: up to k tokens that followed the most recent earlier occurrence of the last n tokens
  (longest n first); [] when none recurs. One pass: every earlier position of the last token, then how
  many tokens before it also match (up to max_n), not a window scan per n (0.2 ms a call at 250 tokens)."""
  seq = np.asarray(tokens, dtype=np.int64)
  L = len(seq)
  ends_E = np.flatnonzero(seq[:L - 1] == seq[L - 1]) if L > 1 else ()
  if not len(ends_E):
    return []
  matched_E = np.ones(len(ends_E), np.int64)  # tokens matched backwards from each end
  for j in range(1, min(max_n, L - 1)):  # an earlier end is at most L - 2: j <= L - 2
    more_E = (matched_E == j) & (ends_E >= j)
    more_E[more_E] = seq[ends_E[more_E] - j] == seq[L - 1 - j]
    matched_E += more_E
  n = matched_E.max()
  if n < min_n:
    return []
  start = int(ends_E[matched_E == n][-1]) + 1
  return seq[start:start + k].tolist()


class NgramDrafter:
  """Prompt lookup drafts; no model, q a point mass (see the module docstring)."""

  point_mass = True

  def propose(self, contexts: Mapping[str, Context], k: int) -> dict[str, list[int]]:
    return {rid: ngram_draft(c.tokens, k) for rid, c in contexts.items()}

  def forget(self, request_id: str) -> None:
    pass


class DraftModel:
  """A draft model on its own Engine (see the module docstring). `engine`: built with
  draft_engine_config(target config); propose() rewinds each request to the target's tokens first."""

  point_mass = False

  def __init__(self, engine, target_cfg):
    cfg = engine.config
    if cfg.prefix_caching or cfg.async_scheduling or cfg.speculative:
      raise ValueError('the draft model\'s EngineConfig must have prefix_caching=False (its requests roll back '
                       'over their pages), async_scheduling=False and speculative=None; build it with '
                       'serve.speculative.draft_engine_config(target_config).')
    if cfg.max_seqs < target_cfg.max_seqs or cfg.max_pages_per_seq < draft_engine_config(
        target_cfg).max_pages_per_seq:
      raise ValueError(f'the draft engine holds {cfg.max_seqs} sequences of {cfg.max_pages_per_seq} pages; the '
                       'target needs draft_engine_config(target_config)\'s; build it with that.')
    self.engine = engine
    self._live: set[str] = set()
    self._logits: jax.Array | None = None  # the last k steps' logits [n, B, V]
    self._tokens: jax.Array | None = None  # and their tokens [n, B]
    self._pending: list = []  # their InFlights, until settle()
    self._rows: dict[str, list[int]] = {}  # per request, its draft tokens' rows in the stacked logits
    B = cfg.max_seqs
    # A step of a small bucket has fewer rows than B (serve/engine.py): padded, every step stacks alike.
    self._stack = jax.jit(functools.partial(programs.stack_rows, B=B))
    self._stack_tokens = jax.jit(jnp.stack)
    # Rows of a stack [n, B, ...] by their flat index j * B + b.
    self._gather = jax.jit(lambda stack, idx_R: jnp.take(stack.reshape((-1,) + stack.shape[2:]), idx_R, axis=0))
    self._num_rows = B

  def propose(self, contexts: Mapping[str, Context], k: int) -> dict[str, list[int]]:
    """Up to k draft tokens per request id, as PLACEHOLDERs: the drafter's k steps are dispatched, not
    waited for; the target's verification takes their tokens on device (feed) and settle() applies
    them to the drafter's own requests while it runs. The drafter forgets its other requests (a
    paused one is prefilled afresh when it drafts again: a request left in the drafter's engine
    would decode on)."""
    self.settle()
    engine = self.engine
    for rid in list(self._live):
      if rid not in contexts:
        self.forget(rid)
    for rid, c in contexts.items():
      if rid in self._live:
        engine.scheduler.rewind(rid, c.tokens)
      else:
        # Its outputs count from these tokens: the target's remaining ones and k drafts past them.
        engine.add_request(rid, c.tokens, sampling.SamplingParams(
            max_tokens=max(c.remaining, 1) + k + 1, temperature=c.params.temperature, top_k=c.params.top_k,
            top_p=c.params.top_p, seed=(c.seed ^ DRAFT_SEED_SALT) % 2 ** 32))
        self._live.add(rid)
    self._rows = {rid: [] for rid in contexts}
    self._pending = self._steps(k)
    for j, inflight in enumerate(self._pending):
      for rid, row in inflight.plan.sample_rows().items():
        if rid in self._rows:
          self._rows[rid].append(j * self._num_rows + row)
    return {rid: [PLACEHOLDER] * len(rows) for rid, rows in self._rows.items()}

  def settle(self) -> None:
    """Applies the dispatched drafter steps' tokens to its requests (waiting for them if need be)."""
    engine, pending, self._pending = self.engine, self._pending, []
    if pending and pending[0].tokens_B is None:  # a chain: its tokens [n, B] in one transfer
      clock = time.perf_counter()
      tokens_nB = np.asarray(self._tokens)
      engine.stats['wait_s'] += time.perf_counter() - clock
      pending = [f._replace(tokens_B=tokens_nB[j]) for j, f in enumerate(pending)]
    for inflight in pending:
      _, finished = engine._collect(inflight)  # pylint: disable=protected-access
      for f in finished:
        engine._drop(f.request_id)  # pylint: disable=protected-access
        self._live.discard(f.request_id)

  def _steps(self, k: int) -> list:
    """The engine's next k steps (fewer if it runs out of work), planned ahead of their tokens
    (scheduler.advance: each step decodes the tokens the one before samples, fed on device),
    dispatched, to collect in order (advanced but the last); their logits go to self._logits,
    their tokens to self._tokens [n, B]. Run as one device call (Engine._launch_chain; tokens_B None
    in what it returns) when the first step catches up at most 2 tokens a sequence and the rest
    each decode a token: the common round; else (a new request's prompt) step by step. Steps are
    padded alike, (2T, T, ..., T): one program per decode bucket T."""
    engine = self.engine
    if engine._inflight is not None:  # pylint: disable=protected-access
      raise RuntimeError('a draft model\'s engine has a step in flight; drive it with step() or as a '
                         'drafter, not both.')
    plans = []
    while len(plans) < k and engine.scheduler.has_work:
      if plans:
        engine.scheduler.advance(plans[-1])
      plan = engine._plan(ahead=bool(plans))  # pylint: disable=protected-access
      if plan is None:
        break
      plans.append(plan)
    sizes = [engine._bucket(p.num_tokens) for p in plans]  # pylint: disable=protected-access
    T = sizes[-1] if len(plans) > 1 else 0
    first = min(2 * T, engine.config.token_budget)  # the budget is a bucket too
    if T and all(t == T for t in sizes[1:]) and sizes[0] <= first:
      inflight, self._tokens, self._logits = engine._launch_chain(plans, [first] + sizes[1:])  # pylint: disable=protected-access
    else:
      inflight, prev = [], None
      for plan in plans:
        prev = engine._launch(plan, prev)  # pylint: disable=protected-access
        inflight.append(prev)
      self._tokens = self._stack_tokens(tuple(f.tokens_B for f in inflight)) if inflight else None
      self._logits = self._stack(tuple(f.logits_BV for f in inflight)) if inflight else None
    return [f._replace(advanced=j + 1 < len(inflight)) for j, f in enumerate(inflight)]

  def feed(self, rows: Sequence[tuple[str, int, int]], R: int, with_q: bool):
    """The target step's verification inputs from the drafter's dispatched steps, on device:
    (q_RV: its logits [R, V], None unless with_q; drafts_R: its draft tokens [R]), row r of a
    verification slot whose rows start at `first` holding the request's r - first th draft.
    rows: (request id, first row, drafts)."""
    idx_R = np.zeros(R, np.int32)
    for rid, r, n in rows:
      idx_R[r:r + n] = self._rows[rid][:n]
    return self._gather(self._logits, idx_R) if with_q else None, self._gather(self._tokens, idx_R)

  def forget(self, request_id: str) -> None:
    self.settle()
    if request_id in self._live:
      self._live.discard(request_id)
      self.engine.abort(request_id)


def draft_engine_config(target_cfg, weight_dtype: str | None = 'auto'):
  """The draft model's EngineConfig for a target's: the same slots and budget, block tables k + 1 tokens
  longer (drafts run past the target's tokens), no prefix cache, synchronous steps, no speculation,
  layers unrolled (a drafter decodes small batches: a scanned 2-layer drafter's step slices its
  stacked weights each layer, 0.35 ms a step against 0.21 ms unrolled on a 2-core CPU), and weights
  in `weight_dtype` (EngineConfig.weight_dtype, or 'auto'). 'auto' is int8 on CPU: each round the
  target's step flushes the caches, so the drafter's k steps read its weights from memory again, and
  int8 cut their time 16% (a 1M drafter, k = 3, 680 rounds: 1.47-1.53 s vs 1.74-1.84 s, interleaved
  runs, measured with out-major weights, before engine_config.OUT_MAJOR_MIN_WIDTH) at the same
  acceptance (0.634 vs 0.638); elsewhere the target's. Any drafter keeps the output exact:
  verification decides."""
  k = target_cfg.num_speculative_tokens
  extra = -(-(k + 1) // target_cfg.page_size)
  if weight_dtype == 'auto':
    weight_dtype = 'int8' if jax.default_backend() == 'cpu' else target_cfg.weight_dtype
  return dataclasses.replace(
      target_cfg, max_pages_per_seq=target_cfg.max_pages_per_seq + extra,
      num_pages=target_cfg.num_pages + target_cfg.max_seqs * extra, prefix_caching=False,
      async_scheduling=False, speculative=None, num_speculative_tokens=0, max_loras=0, layer_loop='unroll',
      weight_dtype=weight_dtype, compilation_cache_dir=None)


@dataclasses.dataclass
class SpecStats:
  """Counters for /metrics: verifications (sequences verified), drafted and accepted tokens, rejections
  (verifications that rejected a draft), drafter seconds, steps that speculated and steps that backed off."""

  verifications: int = 0
  drafted: int = 0
  accepted: int = 0
  rejections: int = 0
  draft_s: float = 0.0
  steps: int = 0
  backoffs: int = 0
  paused: int = 0  # tokens sampled without drafting by requests paused by the acceptance back-off
  undrafted: int = 0  # times a request that could draft found no draft (prompt lookup: no match)

  def as_dict(self) -> dict:
    return {f'spec_{k}': v for k, v in dataclasses.asdict(self).items()}

  def since(self, before: 'SpecStats') -> 'SpecStats':
    """The counts accumulated after `before` (a copy taken earlier)."""
    return SpecStats(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in dataclasses.fields(self)})

  def per_token_acceptance(self) -> float:
    """Leviathan et al.'s a, the chance that a draft token is accepted given those before it were: each draft
    up to the first rejection is a trial, so accepted / (accepted + rejections). accepted / drafted (vLLM's
    acceptance rate) is lower: it also counts the drafts after a rejection, which are never tried."""
    trials = self.accepted + self.rejections
    return self.accepted / trials if trials else 0.0
