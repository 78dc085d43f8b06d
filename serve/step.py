"""The engine's compiled device step and its inputs: one paged forward + sampling per budget bucket.

The host flattens a StepPlan into two packed buffers (`host_inputs`, `pack`; `unpack` inverts them
on device with static slices): two transfers instead of a dozen. `step` runs the paged forward
(serve/forward.py), samples, and returns the pools updated in place (donated).

Always-present step inputs and outputs, so that no feature compiles a variant of the step:
  - a token bitmask [B, ceil(V / 32)] applied to the logits before sampling (a device-resident
    all-allowed mask when no row is constrained; the masking runs only when some row is);
  - per row the sampled token's logprob and the MAX_LOGPROBS likeliest tokens' ids and logprobs,
    and per token the logprob of a host-given target (the next prompt token: prompt logprobs)
    with its top MAX_LOGPROBS. Each is computed in a branch taken only when some row asked, and
    fetched from the device only then: plain decoding pays two skipped branches;
  - each row's logits [B, V] (a draft model's q, serve/speculative.py), left on device;
  - with speculation configured (k drafts, S = EngineConfig.verify_slots sequences of K1 = k + 1
    verification rows, R = S K1): per row its token index (its draft is the step's next token),
    per slot its draft count and its row in the step (and, with a draft model, the drafter's
    logits q_RV [R, V] and draft tokens drafts_R [R], fed into the step's tokens on device).
    Speculating sequences take the slots in plan order. The verification (speculative.verify)
    runs in a branch taken only when some sequence has drafts, on K1 rows when only one has
    (batch 1: k + 1 rows, not R), else on all R; that branch runs the LM head once over the
    step's sampled rows and its verification rows together;
  - with LoRA slots, each token's slot id (the packed ints' last T) and the slot stacks;
  - for a mixture of experts, the assignments each layer's experts received from the step's
    tokens, int32 [L, E] (serve/forward.py); None for a dense model.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from serve import forward as forward_lib
from serve import lora as lora_lib
from serve import sampling, speculative
from serve.sampling import SamplingParams
from serve.scheduler import PLACEHOLDER, StepPlan


class InFlight(NamedTuple):
  """A dispatched step as the engine holds it until its tokens are collected: its plan, the requests
  it was planned for and the step's outputs on device."""

  plan: StepPlan
  requests: tuple  # per plan row, the engine's request it was planned for (None: gone)
  tokens_B: jax.Array | None  # None: not yet known (a draft model's chain, until DraftModel.settle)
  advanced: bool = False  # scheduler.advance(plan) ran: resolve, not update, applies the tokens
  row_lp: sampling.Logprobs | None = None  # device arrays; fetched only when someone asked
  token_lp: sampling.Logprobs | None = None
  logits_BV: jax.Array | None = None  # each row's logits (a draft model's q), on device
  verified: tuple[jax.Array, jax.Array] | None = None  # (tokens_BK1, accepted_B) when the plan has drafts
  expert_tokens_LE: jax.Array | None = None  # int32 [L, E]: a mixture of experts' assignments


def pack(batch: forward_lib.StepBatch, feed_T: np.ndarray, targets_T: np.ndarray,
          flags_3: np.ndarray, sampling_batch: sampling.SamplingBatch, lora_slots_T: np.ndarray,
          spec: tuple[np.ndarray, ...] = ()):
  """One int32 and one float32 host buffer for a step's inputs: two transfers instead of twelve.
  `spec`: the verification inputs (see unpack), when speculation is configured. The LoRA slot ids
  come last (`_lora_slots`)."""
  seeds = sampling_batch.seeds_B.astype(np.uint32).view(np.int32)
  ints = np.concatenate([np.ravel(x) for x in batch] + [
      feed_T, targets_T, flags_3, sampling_batch.top_k_B, seeds,
      sampling_batch.positions_B, *spec, lora_slots_T]).astype(np.int32)
  floats = np.concatenate([sampling_batch.temperature_B, sampling_batch.top_p_B]).astype(np.float32)
  return ints, floats


def unpack(ints_I, floats_F, T: int, B: int, M: int, S: int = 0, K1: int = 0):
  """The inverse of pack (on device): static slices of the two buffers. With S > 0 (speculation)
  also (verify_indices_R, num_draft_S, rows_S), R = S K1, else None."""
  R = S * K1
  sizes = (T, T, B * M, B, B + 1, 1, B, T, T, 3, B, B, B) + ((R, S, S) if S else ())
  parts, start = [], 0
  for n in sizes:
    parts.append(ints_I[start:start + n])
    start += n
  (tokens, positions, tables, kv_lens, cu, num_seqs, last, feed, targets, flags, top_k, seeds,
   sample_pos) = parts[:13]
  spec = tuple(parts[13:]) or None
  batch = forward_lib.StepBatch(tokens, positions, tables.reshape(B, M), kv_lens, cu, num_seqs,
                                last)
  seeds = jax.lax.bitcast_convert_type(seeds, jax.numpy.uint32)
  return batch, feed, targets, flags, sampling.SamplingBatch(floats_F[:B], top_k, floats_F[B:],
                                                             seeds, sample_pos), spec


def _lora_slots(ints_I, T: int):
  """Each token's LoRA slot id (0: the base): the packed ints' last T."""
  return ints_I[ints_I.shape[0] - T:]


def step(graphdef, backend, mesh, unroll, shape, inputs, params, pages, ints_I, floats_F,
          prev_tokens_B, mask_BW, *extra):
  """One step. Tokens with feed_T >= 0 are the previous step's sampled token in that row (a
  decode planned before its input was known on the host); feed_T = -2 - r, a draft model's draft
  token in verification row r (drafts_R, after q_RV in `extra`: fed on device, serve/drafting.py);
  the rest come from the host.
  flags: [some row wants its sampled token's logprobs, some row is grammar-masked, sequences with
  drafts to verify]. shape: (T, B, M, S, K1): B the rows this bucket samples (min(max_seqs, T);
  tokens_B comes back padded to prev_tokens_B's max_seqs rows), S the verification slots (0: none).
  inputs: (has_q: a draft model's logits q_RV and its draft tokens drafts_R come first in `extra`;
  has_lora: the LoRA adapter slots come last).
  Returns ((tokens_B, row_lp, token_lp, logits_BV, verified, expert_tokens_LE), pages); verified:
  (tokens_SK1, accepted_S) with S > 0 (serve/speculative.py: verify), else None; expert_tokens_LE:
  int32 [L, E] for a mixture of experts, else None."""
  has_q, has_lora = inputs
  T, B, _, S, K1 = shape
  batch, feed_T, targets_T, flags, sampling_batch, spec = unpack(ints_I, floats_F, *shape)
  fed_T = jnp.take(prev_tokens_B, jnp.maximum(feed_T, 0))
  tokens_T = jnp.where(feed_T >= 0, fed_T, batch.token_ids_T)
  if has_q:
    tokens_T = jnp.where(feed_T <= -2, jnp.take(extra[1], jnp.maximum(-2 - feed_T, 0)), tokens_T)
  batch = batch._replace(token_ids_T=tokens_T)
  slots_T = None
  if has_lora:
    params = lora_lib.attach(params, extra[-1])
    slots_T = _lora_slots(ints_I, T)
  with_head = None
  if spec is not None:
    verify_indices_R, num_draft_S, rows_S = spec
    # Row r's draft is the token after its verified position (rows past a slot's drafts: ignored).
    draft_R = jnp.take(tokens_T, jnp.minimum(verify_indices_R + 1, T - 1))
    q_RV = extra[0] if has_q else None
    slot_batch = sampling.SamplingBatch(*(x[rows_S] for x in sampling_batch))

    def with_head(head, indices_B):
      def verify(s):  # the first s slots: their rows after the B sampled ones, one LM head product
        logits_XV = head(jnp.concatenate([indices_B, verify_indices_R[:s * K1]]))
        tokens_sK1, accepted_s = speculative.verify(
            logits_XV[B:].astype(jnp.float32), None if q_RV is None else q_RV[:s * K1],
            draft_R[:s * K1], num_draft_S[:s], sampling.SamplingBatch(*(x[:s] for x in slot_batch)))
        pad = ((0, S - s), (0, 0))
        return logits_XV[:B], (jnp.pad(tokens_sK1, pad), jnp.pad(accepted_s, pad[:1]))

      def plain():
        return head(indices_B), (jnp.zeros((S, K1), jnp.int32), jnp.zeros(S, jnp.int32))

      branches = [plain, lambda: verify(1)] + ([lambda: verify(S)] if S > 1 else [])
      return jax.lax.switch(jnp.minimum(flags[2], len(branches) - 1), branches)
  out = forward_lib.forward_with_token_logprobs(
      graphdef, params, pages, batch, targets_T, backend=backend, mesh=mesh, unroll=unroll,
      lora_slots_T=slots_T, with_head=with_head)
  logits_BV, token_lp, pages = out[:3]
  verified = out[3] if spec is not None else None
  expert_tokens_LE = out[-1]
  tokens_B = sampling.sample(sampling.apply_mask(logits_BV, mask_BW[:B], flags[1] > 0), sampling_batch)
  row_lp = sampling.logprobs(logits_BV, tokens_B, flags[0] > 0, logits_BV.shape[-1])
  # Tokens go back as max_seqs rows whatever this bucket's B: the next step feeds from them.
  tokens_B = jnp.pad(tokens_B, (0, prev_tokens_B.shape[0] - B))
  return (tokens_B, row_lp, token_lp, logits_BV, verified, expert_tokens_LE), pages


def tokens_only(executable, *args):
  """The compiled step as (tokens_B, pages): what serve/sim/probe.py times."""
  (tokens_B, *_), pages = executable(*args)
  return tokens_B, pages

def host_inputs(plan: StepPlan, T: int, B: int, M: int, S: int, K1: int, requests, slot_of,
                mask_words: int, prev_rows: dict[str, int] | None):
  """The plan as packed numpy buffers (ints, floats; see pack) padded to T tokens and B rows, the
  grammar bitmask [B, mask_words] (None: no row constrained) and the seconds spent filling it.
  requests: the engine's live requests by id; slot_of: adapter key -> LoRA slot; prev_rows: the
  rows of the step in flight by request id (None: no step in flight); S, K1: verification slots
  and rows per slot (0: no speculation)."""
  tokens, positions = np.zeros(T, np.int32), np.zeros(T, np.int32)
  tables, kv_lens = np.zeros((B, M), np.int32), np.zeros(B, np.int32)
  cu, last = np.zeros(B + 1, np.int32), np.zeros(B, np.int32)
  feed = np.full(T, -1, np.int32)
  targets = np.full(T, -1, np.int32)
  lora_slots = np.zeros(T, np.int32)
  flags = np.zeros(3, np.int32)
  verify_idx = np.zeros(S * K1, np.int32)
  num_draft, verify_rows = np.zeros(S, np.int32), np.zeros(S, np.int32)
  mask, mask_s = None, 0.0
  rows = []
  t = 0
  for b, seq in enumerate(plan.seqs):
    n, start = len(seq.token_ids), seq.start_pos
    tokens[t:t + n] = seq.token_ids
    d = seq.num_draft
    if seq.token_ids[n - 1 - d] == PLACEHOLDER:  # a decode's input
      tokens[t + n - 1 - d] = 0  # re-timing a plan without `prev` (serve/sim/probe.py): any token
      if prev_rows is not None:
        feed[t + n - 1 - d] = prev_rows[seq.request_id]
    if d and seq.token_ids[-1] == PLACEHOLDER:  # a draft model's drafts, fed on device (step)
      tokens[t + n - d:t + n] = 0
      feed[t + n - d:t + n] = -2 - (flags[2] * K1 + np.arange(d))
    positions[t:t + n] = np.arange(start, start + n)
    tables[b, :len(seq.block_table)] = seq.block_table
    kv_lens[b], last[b] = start + n, t + n - 1
    t += n
    cu[b + 1] = t
    if d:  # verification rows: the last token, then each draft
      s = flags[2]
      if s >= S:
        raise ValueError(f'a plan with more than {S} drafted sequences (EngineConfig.verify_slots); '
                         'draft for at most that many.')
      verify_idx[s * K1:s * K1 + d + 1] = np.arange(t - d - 1, t)
      num_draft[s], verify_rows[s] = d, b
      flags[2] += 1
    request = requests.get(seq.request_id)
    if request is not None and request.adapter is not None:
      lora_slots[t - n:t] = slot_of.get(request.adapter.key, 0)
    if request is not None and request.prompt_lp is not None:
      # Token start + i predicts the prompt token at start + i + 1 (the prompt's last token
      # predicts the first output: the sampled row's logprob).
      count = min(n, len(request.prompt_ids) - 1 - start)
      if count > 0:
        targets[t - n:t - n + count] = request.prompt_ids[start + 1:start + 1 + count]
    if request is not None and seq.sample:
      rows.append((request.params, request.seed, start + n))
      flags[0] |= request.params.logprobs is not None
      if request.matcher is not None:
        clock = time.perf_counter()
        if mask is None:
          mask = np.full((B, mask_words), -1, np.int32)
        request.params.grammar.fill_bitmask(request.matcher, mask, b)
        mask_s += time.perf_counter() - clock
    else:
      rows.append((SamplingParams(), 0, 0))  # not sampled: the token is discarded
  cu[len(plan.seqs) + 1:] = t
  flags[1] = mask is not None
  batch = forward_lib.StepBatch(tokens, positions, tables, kv_lens, cu,
                                np.array([len(plan.seqs)], np.int32), last)
  spec = (verify_idx, num_draft, verify_rows) if S else ()
  ints, floats = pack(batch, feed, targets, flags, sampling.host_batch(rows, B), lora_slots, spec)
  return ints, floats, mask, mask_s
