"""Prometheus metrics of the server (prometheus_client), and the fluidity-index.

Request-level series are observed as things happen: HTTP requests by route and status, time to
first token (from the request's arrival), time between tokens, tokens in and out. Engine state
(queue length, running sequences, KV pages used/free/cached, preemptions, prefix-cache hits,
tokens per second, steps and the seconds spent in them, the rolling fluidity-index, speculative
decoding's acceptance rate, accepted tokens per verification and drafter time, a mixture of
experts' tokens per expert and its load imbalance) is read at
scrape time from the snapshot the engine driver publishes after every step, so a scrape never
touches the engine's own state.

Fluidity-index (Etalon, arXiv 2407.07000): every token has a deadline, the first D_p after the
request's arrival and each later one D_d after the token before it; time a token beats its
deadline by is banked as slack for later tokens. A token later than its deadline plus the slack
misses one or more deadline slots (how many D_d periods it overran) and empties the bank. The
index is 1 - missed slots / all slots: an early stall hurts, a late one can be absorbed. The
gauge is the mean over the last `window` finished sequences, with fixed deadlines
(ServerConfig.ttft_deadline_s, tbt_deadline_s); `stoker bench` measures the same from the client.
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Iterable, Sequence

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

from serve.bench import metrics as bench_metrics

# Histogram buckets in seconds, from sub-millisecond steps on an accelerator to CPU stalls.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TBT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


def fluidity_index(inter_token_s: Sequence[float], prefill_deadline_s: float,
                   decode_deadline_s: float) -> float:
  """The fluidity-index of one sequence from its inter-token times (the first: time to first token).

  The slot arithmetic is the benchmark's (serve/bench/metrics.py), in integer microseconds.
  """
  missed, total = bench_metrics.deadline_slots(
      [bench_metrics.to_us(t) for t in inter_token_s], bench_metrics.to_us(prefill_deadline_s),
      bench_metrics.to_us(decode_deadline_s))
  return 1.0 - missed / total if total else 1.0


class Metrics:
  """The server's registry. Thread-safe: the engine driver thread and the event loop both write."""

  def __init__(self, snapshot: Callable[[], dict] = dict, *, prefill_deadline_s: float = 1.0,
               decode_deadline_s: float = 0.1, window: int = 100):
    self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
    self.prefill_deadline_s, self.decode_deadline_s = prefill_deadline_s, decode_deadline_s
    r = self.registry
    self.requests = prometheus_client.Counter(
        'stoker_http_requests', 'HTTP requests answered, by route and status code.',
        ['route', 'status'], registry=r)
    self.ttft = prometheus_client.Histogram(
        'stoker_time_to_first_token_seconds', 'From a request arriving to its first token.',
        buckets=TTFT_BUCKETS, registry=r)
    self.tbt = prometheus_client.Histogram(
        'stoker_time_between_tokens_seconds', 'Between consecutive tokens of one sequence.',
        buckets=TBT_BUCKETS, registry=r)
    self.prompt_tokens = prometheus_client.Counter(
        'stoker_prompt_tokens', 'Prompt tokens of admitted sequences.', registry=r)
    self.generation_tokens = prometheus_client.Counter(
        'stoker_generation_tokens', 'Tokens generated.', registry=r)
    self.finished = prometheus_client.Counter(
        'stoker_sequences_finished', 'Sequences ended, by reason (stop, length, abort, error).',
        ['reason'], registry=r)
    self.rejected = prometheus_client.Counter(
        'stoker_requests_rejected', 'Requests refused with 429 because the waiting queue was full.',
        registry=r)
    self._fluidity = collections.deque(maxlen=window)
    self._lock = threading.Lock()
    self._snapshot = snapshot
    r.register(_EngineCollector(self))

  def observe_sequence(self, inter_token_s: Sequence[float]) -> None:
    """Records a finished sequence's fluidity-index (TTFT and TBT are observed token by token)."""
    if inter_token_s:
      value = fluidity_index(inter_token_s, self.prefill_deadline_s, self.decode_deadline_s)
      with self._lock:
        self._fluidity.append(value)

  def rolling_fluidity(self) -> float | None:
    with self._lock:
      return sum(self._fluidity) / len(self._fluidity) if self._fluidity else None

  def exposition(self) -> bytes:
    return prometheus_client.generate_latest(self.registry)


class _EngineCollector:
  """Engine-state series, computed from the driver's latest snapshot at scrape time."""

  def __init__(self, metrics: Metrics):
    self._metrics = metrics

  def describe(self) -> Iterable:
    return []

  def collect(self) -> Iterable:
    s = self._metrics._snapshot() or {}  # pylint: disable=protected-access
    yield _gauge('stoker_queue_length', 'Requests waiting to run (not yet admitted by the scheduler).',
                 s.get('waiting', 0))
    yield _gauge('stoker_running_sequences', 'Sequences holding a slot in the running batch.',
                 s.get('running', 0))
    pages = GaugeMetricFamily('stoker_kv_pages', 'KV-cache pages by state (page 0, the null page, '
                              'is not counted).', labels=['state'])
    for state in ('used', 'free', 'cached'):
      pages.add_metric([state], s.get(f'pages_{state}', 0))
    yield pages
    yield _gauge('stoker_kv_pages_total', 'Usable KV-cache pages.', s.get('pages_total', 0))
    yield _gauge('stoker_tokens_per_second', 'Generated tokens per second over the last '
                 f'{s.get("rate_window_s", 0):g} s.', s.get('tokens_per_second', 0.0))
    hits, queried = s.get('prefix_hit_tokens', 0), s.get('prefix_query_tokens', 0)
    yield _gauge('stoker_prefix_cache_hit_rate', 'Share of prompt tokens found in the prefix cache '
                 'when their request arrived.', hits / queried if queried else 0.0)
    yield _counter('stoker_prefix_cache_hit_tokens', 'Prompt tokens found in the prefix cache.', hits)
    yield _counter('stoker_preemptions', 'Sequences preempted (recomputed later) by the scheduler.',
                   s.get('preemptions', 0))
    yield _counter('stoker_engine_steps', 'Device steps dispatched.', s.get('steps', 0))
    yield _gauge('stoker_lora_adapters', 'LoRA adapters loaded (served beside the base).',
                 s.get('lora_adapters', 0))
    yield _gauge('stoker_lora_resident', 'LoRA adapters in device slots.', s.get('lora_resident', 0))
    yield _counter('stoker_lora_swaps', 'LoRA adapters copied into a device slot.', s.get('lora_swaps', 0))
    drafted, accepted = s.get('spec_drafted', 0), s.get('spec_accepted', 0)
    verifications = s.get('spec_verifications', 0)
    yield _gauge('stoker_spec_decode_acceptance_rate', 'Speculative decoding: share of draft tokens the '
                 'target accepted (0 before any).', accepted / drafted if drafted else 0.0)
    yield _gauge('stoker_spec_decode_mean_accepted_tokens', 'Speculative decoding: draft tokens accepted per '
                 'verification (each also yields one token of the target\'s own).',
                 accepted / verifications if verifications else 0.0)
    yield _counter('stoker_spec_decode_draft_tokens', 'Draft tokens verified.', drafted)
    yield _counter('stoker_spec_decode_accepted_tokens', 'Draft tokens accepted.', accepted)
    yield _counter('stoker_spec_decode_verifications', 'Sequences verified (one per speculating sequence and '
                   'step).', verifications)
    yield _counter('stoker_spec_decode_drafter_seconds', 'Seconds spent drafting (prompt lookup or the draft '
                   'model\'s steps).', s.get('spec_draft_s', 0.0))
    yield _counter('stoker_spec_decode_backoff_steps', 'Steps that did not speculate because more than '
                   'speculative_max_batch requests were in the engine.', s.get('spec_backoffs', 0))
    yield _counter('stoker_spec_decode_paused_drafts', 'Tokens sampled without drafting by requests paused '
                   'while their verifications kept fewer than speculative_min_accepted drafts (a moving average).',
                   s.get('spec_paused', 0))
    yield _counter('stoker_spec_decode_undrafted', 'Steps in which a request that could draft found no draft '
                   '(prompt lookup: no match); the acceptance back-off counts them as keeping none.',
                   s.get('spec_undrafted', 0))
    yield _counter('stoker_engine_step_seconds', 'Seconds spent in Engine.step, waiting for the device '
                   'included (its rate: the engine\'s busy fraction).', s.get('step_seconds', 0.0))
    fluidity = self._metrics.rolling_fluidity()
    yield _gauge('stoker_fluidity_index', 'Mean fluidity-index of the last finished sequences '
                 f'(deadlines: first token {self._metrics.prefill_deadline_s:g} s, then '
                 f'{self._metrics.decode_deadline_s:g} s per token); 1 before any.',
                 1.0 if fluidity is None else fluidity)
    yield from _expert_load(s.get('expert_tokens'))
    yield _gauge('stoker_ready', '1 while the server admits requests (loaded and compiled, not '
                 'draining, not failed).', s.get('ready', 0))
    # Why a replica is not ready (a failed engine's error), for alerts: stoker_server_info{state="failed"}.
    yield InfoMetricFamily('stoker_server', 'The server state (loading, ready, draining, failed) and '
                           'the reason when it is not ready.',
                           value={'state': str(s.get('state', 'loading')),
                                  'reason': str(s.get('reason', ''))[:300]})


def _expert_load(tokens_LE) -> Iterable:
  """A mixture of experts' load balance (nothing for a dense model): the tokens each layer's
  experts received (each token counts once for each of its k experts), and per layer the busiest
  expert's share over the mean (1: balanced; 0 before any token)."""
  if tokens_LE is None:
    return
  tokens = CounterMetricFamily('stoker_moe_expert_tokens', 'Tokens routed to each expert of each '
                               'MoE layer (a token counts for each of its k experts).',
                               labels=['layer', 'expert'])
  imbalance = GaugeMetricFamily('stoker_moe_expert_load_imbalance', 'Per MoE layer: the busiest '
                                "expert's tokens over the mean expert's (1: balanced; 0 before any).",
                                labels=['layer'])
  for layer, row in enumerate(tokens_LE):
    row = [int(n) for n in row]
    for expert, n in enumerate(row):
      tokens.add_metric([str(layer), str(expert)], n)
    imbalance.add_metric([str(layer)], max(row) * len(row) / sum(row) if sum(row) else 0.0)
  yield tokens
  yield imbalance


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
  return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
  return CounterMetricFamily(name, doc, value=value)
