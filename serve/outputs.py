"""What the engine hands back per step: RequestOutput, and the host work that turns a step's sampled
tokens into it (serve/engine.py calls these while the next step runs on the device).

  spans                 each sequence of a plan with its row and the index of its first token;
  fill_prompt_logprobs  the prompt logprobs a step's prefill chunks scored, stored by position;
  new_tokens            each live sampled sequence's new tokens (its verified drafts and one more,
                        when it speculated) with the sampled token's logprob when asked for;
  stop_strings          a request's stop strings over its new tokens: a hit ends it there;
  request_output        the RequestOutput of one request (prompt logprobs sent once, with the first
                        token).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from serve import sampling
from serve.scheduler import Finished, Scheduler, StepPlan
from serve.text import TextStream


class TokenLogprob(NamedTuple):
  """A token's logprob and the top alternatives asked for: ((id, logprob), ...), likeliest first."""

  token_id: int
  logprob: float
  top: tuple[tuple[int, float], ...]


@dataclasses.dataclass(frozen=True)
class RequestOutput:
  """What one step produced for one request: its new tokens, and whether it finished."""

  request_id: str
  new_token_ids: tuple[int, ...]
  finished: bool = False
  finish_reason: str | None = None  # 'stop' | 'length' | 'abort'
  output_ids: tuple[int, ...] | None = None  # every generated token, once finished
  logprobs: tuple[TokenLogprob, ...] | None = None  # per new token, when params.logprobs is set
  # Per prompt token (the first None: nothing predicts it), with the first output, when
  # params.prompt_logprobs is set.
  prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


def spans(plan: StepPlan, requests) -> list:
  """(row, seq, request, index of its first token in the step) per sequence of a plan."""
  out, t = [], 0
  for b, (s, r) in enumerate(zip(plan.seqs, requests)):
    out.append((b, s, r, t))
    t += len(s.token_ids)
  return out


def fill_prompt_logprobs(token_lp: sampling.Logprobs, live) -> None:
  """Stores the prompt logprobs that a step's prefill chunks scored, by position (a chunk
  recomputed after a preemption scores the same values again). live: spans of live requests."""
  scored = [(s, r, t) for _, s, r, t in live if r.prompt_lp is not None]
  if not scored:
    return
  chosen_T, ids_TK, lp_TK = (np.asarray(x) for x in token_lp)
  for s, r, t in scored:
    k = r.params.prompt_logprobs
    for i in range(min(len(s.token_ids), len(r.prompt_ids) - 1 - s.start_pos)):
      pos = s.start_pos + i + 1  # token t + i predicts the prompt token at pos
      r.prompt_lp[pos] = TokenLogprob(r.prompt_ids[pos], float(chosen_T[t + i]),
                                      tuple(zip(ids_TK[t + i, :k].tolist(), lp_TK[t + i, :k].tolist())))


def new_tokens(live, sampled: dict, before: dict, ended: dict[str, Finished], scheduler: Scheduler,
               row_lp: sampling.Logprobs | None) -> list[tuple[str, tuple[int, ...], TokenLogprob | None]]:
  """(request id, new tokens, logprob or None) per live sequence that sampled. sampled: its token
  by request id; before: outputs before the step of those that verified drafts (their new tokens
  are what the scheduler kept); ended: the requests the step finished; row_lp: the step's
  per-row logprobs (device arrays), when some row asked."""
  row_lp = None if row_lp is None else [np.asarray(x) for x in row_lp]
  new = []
  for b, s, r, _ in live:
    if not s.sample:
      continue
    if s.request_id in before:  # verified drafts: the tokens the scheduler kept
      f = ended.get(s.request_id)
      outputs = f.output_ids if f is not None else scheduler.output_ids(s.request_id)
      new.append((s.request_id, tuple(outputs[before[s.request_id]:]), None))
      continue
    token, lp = sampled[s.request_id], None
    if row_lp is not None and r.params.logprobs is not None:
      k = r.params.logprobs
      lp = TokenLogprob(token, float(row_lp[0][b]),
                        tuple(zip(row_lp[1][b, :k].tolist(), row_lp[2][b, :k].tolist())))
    new.append((s.request_id, (token,), lp))
  return new


def stop_strings(scheduler: Scheduler, request_id: str, stream: TextStream, tokens: tuple[int, ...],
                 done: dict[str, Finished]) -> tuple[int, ...]:
  """Pushes a step's new tokens through the request's stop strings (incremental detokenization,
  a search of the new text only: O(1) per token); on a hit the request ends there ('stop', put in
  `done`; tokens verified past it are dropped) and the tokens up to it are returned."""
  for i, token in enumerate(tokens):
    stream.push((token,))
    if stream.stopped:
      if i == len(tokens) - 1 and request_id in done:
        break  # it ended on this very token anyway (stop token or max_tokens): keep that reason
      f = done.get(request_id) or scheduler.finish(request_id, 'stop')
      cut = len(tokens) - 1 - i
      done[request_id] = Finished(request_id, f.output_ids[:len(f.output_ids) - cut], 'stop')
      return tokens[:i + 1]
  return tokens


def request_output(request_id: str, request, tokens: tuple[int, ...], lp: TokenLogprob | None,
                   finished: Finished | None) -> RequestOutput:
  """One request's output of a step; its prompt logprobs go with the first one (then cleared)."""
  extra = {}
  if lp is not None:
    extra['logprobs'] = (lp,)
  if request.prompt_lp is not None:
    extra['prompt_logprobs'] = tuple(request.prompt_lp)
    request.prompt_lp = None
  if finished is None:
    return RequestOutput(request_id, tokens, **extra)
  return RequestOutput(request_id, tokens, True, finished.reason, finished.output_ids, **extra)
