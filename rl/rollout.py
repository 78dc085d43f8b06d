"""Sampling inside RL with the serving engine: which prompts a step takes, each sample's seed, and
the completions with the sampler's log-probabilities; and held-out greedy evaluation.

Determinism: step s takes global prompt indices [s P, (s + 1) P) of a sequence of epochs, each a
permutation of the prompts drawn from (seed, epoch); sample g of prompt p at step s draws with the
request seed from (seed, s, p, g). The engine's sampling is batch-invariant (a token's key is its
request's seed and its position, serve/sampling.py), requests are added in (p, g) order and each
step starts from an empty prefix cache (the loop flushes it), so a resumed run samples exactly what
the uninterrupted run did.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import NamedTuple, Sequence

import numpy as np

from serve.engine import Engine
from serve.sampling import SamplingParams


def read_rows(path: str) -> list[dict]:
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  if not rows or any('prompt' not in r for r in rows):
    raise ValueError(f'{path}: need JSONL rows with a "prompt" field (and what the rewards read).')
  return rows


def prompt_indices(num_rows: int, step: int, count: int, seed: int) -> list[int]:
  """The rows step `step` takes: the next `count` of per-epoch permutations from (seed, epoch)."""
  out, orders = [], {}
  for i in range(step * count, (step + 1) * count):
    epoch, k = divmod(i, num_rows)
    if epoch not in orders:
      orders[epoch] = np.random.default_rng([seed, epoch]).permutation(num_rows)
    out.append(int(orders[epoch][k]))
  return out


def request_seed(seed: int, step: int, prompt: int, sample: int) -> int:
  """A uint32 seed from (run seed, step, prompt index in the step, sample index in the group)."""
  return int(np.random.SeedSequence([seed, step, prompt, sample]).generate_state(1)[0])


class Samples(NamedTuple):
  prompts: list  # [P * G] prompt ids, group by group
  completions: list  # [P * G] generated ids (the stop token included when it came)
  logprobs: list  # [P * G] the sampler's logprob of each generated token
  texts: list  # [P * G] the completions decoded (the stop token dropped)
  tokens: int  # generated tokens in all
  seconds: float


def sample(engine: Engine, tokenizer, rows: Sequence[dict], group_size: int, *, step: int,
           seed: int, params: SamplingParams, indices: Sequence[int] | None = None) -> Samples:
  """`group_size` completions of each row's prompt, run to completion on `engine`. `indices`: the
  rows' places among the step's prompts (default 0, 1, ...), which name and seed their requests
  (a process sampling its share of a step passes its prompts' places in the whole step)."""
  start = time.perf_counter()
  prompts = [tokenizer.encode(r['prompt'], add_special_tokens=False).ids for r in rows]
  ids = []
  for p, prompt in zip(range(len(rows)) if indices is None else indices, prompts, strict=True):
    for g in range(group_size):
      ids.append(f'rl-{step}-{p}-{g}')
      engine.add_request(ids[-1], prompt, dataclasses.replace(
          params, seed=request_seed(seed, step, p, g), logprobs=0))
  tokens, logprobs = _run(engine, ids)
  seconds = time.perf_counter() - start
  stops = set(params.stop_token_ids)
  texts = [tokenizer.decode([t for t in c if t not in stops]) for c in tokens]
  return Samples([prompts[i // group_size] for i in range(len(ids))], tokens, logprobs, texts,
                 sum(map(len, tokens)), seconds)


def _run(engine: Engine, ids: list[str], logprobs_wanted: bool = True) -> tuple[list, list]:
  """Steps `engine` until it is idle; each request's tokens and their logprobs, in `ids` order."""
  tokens = {i: [] for i in ids}
  logprobs = {i: [] for i in ids}
  while engine.has_work:
    for out in engine.step():
      if out.request_id in tokens:
        tokens[out.request_id] += out.new_token_ids
        logprobs[out.request_id] += [lp.logprob for lp in (out.logprobs or ())]
  for i in ids:
    if logprobs_wanted and len(logprobs[i]) != len(tokens[i]):
      raise RuntimeError(f'request {i}: {len(tokens[i])} tokens but {len(logprobs[i])} logprobs.')
  return [tokens[i] for i in ids], [logprobs[i] for i in ids]


def greedy(engine: Engine, tokenizer, rows: Sequence[dict], max_tokens: int, stop_id: int
           ) -> list[str]:
  """Each row's greedy completion, decoded (the held-out evaluation)."""
  params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=(stop_id,))
  ids = [f'eval-{i}' for i in range(len(rows))]
  for i, r in zip(ids, rows):
    engine.add_request(i, tokenizer.encode(r['prompt'], add_special_tokens=False).ids, params)
  tokens, _ = _run(engine, ids, logprobs_wanted=False)
  return [tokenizer.decode([t for t in c if t != stop_id]) for c in tokens]
