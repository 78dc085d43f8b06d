"""What the scheduler is configured with and what it hands the engine: SchedulerConfig (its limits and
Policy), StepPlan (one step's ScheduledSeqs), Finished (a request that ended), and PLACEHOLDER (a sampled token not
yet on the host). Plain data; serve/scheduler.py says what they mean for scheduling."""

from __future__ import annotations

import dataclasses
import enum


PLACEHOLDER = -1  # a sampled token not yet known on the host (see advance/resolve)


class Policy(enum.Enum):
  CHUNKED = 'chunked'
  PREFILL_FIRST = 'prefill_first'
  STATIC = 'static'


def _check_int(name: str, value, minimum: int, fix: str) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f'SchedulerConfig.{name} must be an int >= {minimum}; got {value!r}. {fix}')


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """Limits of the scheduler. num_pages counts the null page 0; page_size is G; max_seqs the slots B;
  max_pages_per_seq the block-table width M; token_budget the tokens one step computes."""
  num_pages: int
  page_size: int
  max_seqs: int
  max_pages_per_seq: int
  token_budget: int
  policy: Policy = Policy.CHUNKED
  watermark: float = 0.01
  prefix_caching: bool = True
  max_adapters: int = 0  # distinct LoRA adapters among running requests (0: no limit)

  def __post_init__(self):
    _check_int('num_pages', self.num_pages, 2, 'Page 0 is the null page; give the pool at least one more.')
    _check_int('page_size', self.page_size, 1, 'Use the tokens per page of the KV pools (e.g. 16).')
    _check_int('max_seqs', self.max_seqs, 1, 'Set the number of sequence slots (rows of the block table).')
    _check_int('max_pages_per_seq', self.max_pages_per_seq, 1, 'Set the block-table width M.')
    _check_int('token_budget', self.token_budget, 1, 'Set the tokens one step computes (e.g. 512).')
    _check_int('max_adapters', self.max_adapters, 0, 'Use the LoRA slots of the device (0: no limit).')
    if isinstance(self.policy, str):
      try:
        object.__setattr__(self, 'policy', Policy(self.policy))
      except ValueError:
        pass
    if not isinstance(self.policy, Policy):
      raise ValueError(f'SchedulerConfig.policy must be one of {[p.value for p in Policy]}; got {self.policy!r}.')
    if isinstance(self.watermark, bool) or not isinstance(self.watermark, (int, float)) or not (
        0 <= self.watermark < 1):
      raise ValueError(f'SchedulerConfig.watermark must be a fraction of the pool in [0, 1); got '
                       f'{self.watermark!r}. Use e.g. 0.01, or 0 to admit until the pool is full.')
    if not isinstance(self.prefix_caching, bool):
      raise ValueError(f'SchedulerConfig.prefix_caching must be a bool; got {self.prefix_caching!r}.')

  @property
  def watermark_pages(self) -> int:
    return int(self.watermark * (self.num_pages - 1))


@dataclasses.dataclass(frozen=True)
class ScheduledSeq:
  request_id: str
  slot: int
  token_ids: tuple[int, ...]
  start_pos: int
  block_table: tuple[int, ...]  # the sequence's pages only; the engine pads the row with the null page 0
  sample: bool
  num_draft: int = 0  # the last num_draft of token_ids are draft tokens to verify (speculative decoding)


@dataclasses.dataclass(frozen=True)
class StepPlan:
  seqs: tuple[ScheduledSeq, ...]
  preempted: tuple[str, ...]

  @property
  def num_tokens(self) -> int:
    return sum(len(s.token_ids) for s in self.seqs)

  def sample_rows(self) -> dict[str, int]:
    """Request id -> its row in the step's sampled tokens, for each sequence that samples."""
    return {s.request_id: b for b, s in enumerate(self.seqs) if s.sample}


@dataclasses.dataclass(frozen=True)
class Finished:
  request_id: str
  output_ids: tuple[int, ...]
  reason: str  # 'stop' | 'length' | 'abort'
