"""Verifiable rewards: functions of (prompt row, completion text) -> float, named in gin (rl.reward_fns).

Shipped: the arithmetic task's exact answer and its format (rl/tasks.py writes rows with an
'answer'), and a length penalty. `score` runs every function on every completion; one that raises
is logged and scores 0 for that completion, so a bad row or a bug in a reward never ends a run.
"""

from __future__ import annotations

import logging
import re
from typing import Callable, Mapping, Sequence

import numpy as np

RewardFn = Callable[[Mapping, str], float]

# The answer format of the arithmetic task: the number alone, then the end of the completion.
ANSWER = re.compile(r'\s*(-?\d+)\s*')


def answer_format(row: Mapping, completion: str) -> float:
  """1 when the completion is a number and nothing else, else 0."""
  del row
  return float(ANSWER.fullmatch(completion) is not None)


def exact_answer(row: Mapping, completion: str) -> float:
  """1 when the completion, in the answer format, is the row's 'answer', else 0."""
  m = ANSWER.fullmatch(completion)
  return float(m is not None and int(m.group(1)) == int(row['answer']))


def length_penalty(row: Mapping, completion: str, limit: int = 16) -> float:
  """-(characters past `limit`) / limit, at most 0: long rambling answers cost."""
  del row
  return -max(0, len(completion) - limit) / limit


REWARDS: dict[str, RewardFn] = {
    'answer_format': answer_format, 'exact_answer': exact_answer, 'length_penalty': length_penalty}


def resolve(names: Sequence[str]) -> dict[str, RewardFn]:
  """Reward functions by name: a shipped one, or 'module.path:function'."""
  out = {}
  for name in names:
    if name in REWARDS:
      out[name] = REWARDS[name]
      continue
    module, _, attr = name.partition(':')
    if not attr:
      raise ValueError(f'unknown reward {name!r}: name a shipped one ({", ".join(REWARDS)}) or '
                       "'package.module:function'.")
    import importlib  # pylint: disable=g-import-not-at-top
    try:
      out[name] = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
      raise ValueError(f'reward {name!r} cannot be loaded: {e}.') from None
  return out


def score(fns: Mapping[str, RewardFn], rows: Sequence[Mapping], completions: Sequence[str]
          ) -> dict[str, np.ndarray]:
  """{name: [len(completions)] float32} of every function; a function that raises scores 0 there."""
  out = {}
  for name, fn in fns.items():
    values = np.zeros(len(completions), np.float32)
    for i, (row, text) in enumerate(zip(rows, completions)):
      try:
        values[i] = float(fn(row, text))
      except Exception as e:  # pylint: disable=broad-except  (a reward must never end the run)
        logging.warning('reward %s raised %s: %s (completion %d scores 0)', name, type(e).__name__,
                        e, i)
    out[name] = values
  return out
