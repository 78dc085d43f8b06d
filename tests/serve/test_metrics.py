"""Server metrics (serve/metrics.py): the fluidity-index against the hand-computed cases of the
Etalon reference, and the registry's exposition read back with Prometheus' own text parser."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve.metrics import Metrics, fluidity_index


def test_fluidity_index_hand_computed_cases():
  # D_p = 0.2 s, D_d = 0.1 s; the first token at 0.1 s banks 0.1 s, each 0.05 s token 0.05 s more.
  # A 0.3 s stall as the second token: 0.3 - 0.1 slack = 0.2 s late -> 2 missed slots of 11.
  assert fluidity_index([0.1, 0.3] + [0.05] * 8, 0.2, 0.1) == pytest.approx(1 - 2 / 11)
  # The same stall last: 0.1 + 8 * 0.05 = 0.5 s banked absorbs it.
  assert fluidity_index([0.1] + [0.05] * 8 + [0.3], 0.2, 0.1) == 1.0
  # A first token 0.25 s late: 1 + (0.45 - 0.2) // 0.1 = 3 missed slots, then 4 on time.
  assert fluidity_index([0.45] + [0.1] * 4, 0.2, 0.1) == pytest.approx(1 - 3 / 7)
  assert fluidity_index([], 0.2, 0.1) == 1.0


def test_exposition_parses_and_reads_the_snapshot():
  snapshot = dict(ready=1, waiting=3, running=2, pages_used=5, pages_free=50, pages_cached=8,
                  pages_total=63, preemptions=4, steps=100, step_seconds=2.5, tokens_per_second=12.5,
                  rate_window_s=10.0, prefix_hit_tokens=16, prefix_query_tokens=64)
  m = Metrics(lambda: snapshot, prefill_deadline_s=0.2, decode_deadline_s=0.1)
  m.requests.labels('/v1/completions', '200').inc(3)
  m.ttft.observe(0.04)
  m.tbt.observe(0.01)
  m.observe_sequence([0.1, 0.3] + [0.05] * 8)
  m.observe_sequence([0.1] + [0.05] * 8 + [0.3])
  samples = {}
  for family in text_string_to_metric_families(m.exposition().decode()):
    for s in family.samples:
      samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
  assert samples[('stoker_http_requests_total', (('route', '/v1/completions'), ('status', '200')))] == 3
  assert samples[('stoker_time_to_first_token_seconds_count', ())] == 1
  assert samples[('stoker_queue_length', ())] == 3 and samples[('stoker_running_sequences', ())] == 2
  assert [samples[('stoker_kv_pages', (('state', k),))] for k in ('used', 'free', 'cached')] == [5, 50, 8]
  assert samples[('stoker_prefix_cache_hit_rate', ())] == 0.25
  assert samples[('stoker_preemptions_total', ())] == 4
  assert samples[('stoker_engine_steps_total', ())] == 100
  assert samples[('stoker_engine_step_seconds_total', ())] == 2.5
  assert samples[('stoker_fluidity_index', ())] == pytest.approx((1 - 2 / 11 + 1) / 2)
  assert samples[('stoker_tokens_per_second', ())] == 12.5


def test_before_the_engine_exists_the_exposition_is_still_valid():
  families = {f.name for f in text_string_to_metric_families(Metrics().exposition().decode())}
  assert {'stoker_queue_length', 'stoker_kv_pages', 'stoker_fluidity_index', 'stoker_ready'} <= families


def test_a_failed_server_says_so_and_why():
  snapshot = {'ready': 0, 'state': 'failed', 'reason': 'the engine failed: RuntimeError: ' + 'x' * 500}
  text = Metrics(snapshot=lambda: snapshot).exposition().decode()
  samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
  assert samples['stoker_ready'].value == 0
  info = samples['stoker_server_info']
  assert info.value == 1 and info.labels['state'] == 'failed'
  assert info.labels['reason'].startswith('the engine failed: RuntimeError: xxx')
  assert len(info.labels['reason']) <= 300  # a label, not a log: the log has the whole error
