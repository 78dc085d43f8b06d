"""What the simulator and the step-time estimators agree on: the shape of one engine step.

An engine step computes, for each scheduled sequence, q_len query tokens whose keys/values are
written at positions [kv_len - q_len, kv_len) and which attend to kv_len cached tokens. A decode is
q_len 1; a prefill chunk has q_len > 1 (its kv_len - q_len tokens were cached by earlier chunks).
The engine pads the step's tokens to a bucket (EngineConfig.buckets()); estimators that know the
engine's config account for that.

StepTimeModel.step_time_s is the wall time of one engine iteration (Engine.step) in steady state:
the device step plus the host work that does not overlap it (scheduling, dispatch, applying tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from serve.scheduler import StepPlan


@dataclasses.dataclass(frozen=True)
class StepShape:
  q_lens: tuple[int, ...]  # query tokens per scheduled sequence
  kv_lens: tuple[int, ...]  # tokens cached after this step, per scheduled sequence
  # Tokens of the step run just before on the same engine (0: none, or not known). On a CPU a step after one of a
  # larger bucket runs slower (the tiny preset: a decode after a 256-token step 7-8 ms, after a 64-token one
  # 1-2 ms, of 17-25 on two VMs); estimators that know the engine's buckets charge for it.
  prev_tokens: int = 0

  def __post_init__(self):
    if len(self.q_lens) != len(self.kv_lens):
      raise ValueError(f'StepShape: {len(self.q_lens)} q_lens but {len(self.kv_lens)} kv_lens; '
                       'give one of each per scheduled sequence.')
    if any(q < 1 or kv < q for q, kv in zip(self.q_lens, self.kv_lens)):
      raise ValueError(f'StepShape: need 1 <= q_len <= kv_len per sequence; got q_lens {self.q_lens}, '
                       f'kv_lens {self.kv_lens}.')
    if self.prev_tokens < 0:
      raise ValueError(f'StepShape: prev_tokens {self.prev_tokens} < 0; give the previous step\'s tokens, or 0.')

  @classmethod
  def from_plan(cls, plan: StepPlan, prev_tokens: int = 0) -> StepShape:
    return cls(tuple(len(s.token_ids) for s in plan.seqs),
               tuple(s.start_pos + len(s.token_ids) for s in plan.seqs), prev_tokens)

  @property
  def num_tokens(self) -> int:
    return sum(self.q_lens)

  @property
  def num_decodes(self) -> int:
    return sum(q == 1 for q in self.q_lens)


class StepTimeModel(Protocol):
  """Predicts how long one engine iteration of a given shape takes, in seconds, on a busy machine. A model may
  also have `wake` (serve/sim/wake.Wake): how much slower steps run right after idling; the simulator reads it
  with getattr (none: the machine runs every step as busy)."""

  def step_time_s(self, shape: StepShape) -> float:
    ...
