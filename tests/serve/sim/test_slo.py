"""serve/sim/slo.py: the SLO grammar, its errors, and verdicts that agree with the benchmark's own."""

import numpy as np
import pytest

from serve.bench import analysis
from serve.bench.client import RequestRecord
from serve.sim import slo


def test_parse_items_units_and_percentiles():
  parsed = slo.parse('ttft_p90<2s, tbt_p99<=200ms,tpot_p50<0.05,E2E_p99.9<1500ms')
  assert parsed.targets == (slo.Target('ttft', 0.9, 2.0), slo.Target('tbt', 0.99, 0.2),
                            slo.Target('tpot', 0.5, 0.05), slo.Target('e2e', 0.999, 1.5))
  assert slo.parse(str(parsed)) == parsed  # the string form parses back
  assert slo.parse('tbt_p99<250us').targets == (slo.Target('tbt', 0.99, 250e-6),)


@pytest.mark.parametrize('text, says', [
    ('', 'empty'),
    ('ttft<2s', "item 'ttft<2s': not METRIC_pQ<VALUE[UNIT]"),
    ('ttft_p90>2s', "item 'ttft_p90>2s'"),
    ('latency_p90<2s', "unknown metric 'latency'"),
    ('ttft_p90<2h', "unknown unit 'h'"),
    ('ttft_p0<2s', 'percentile 0 is not in (0, 100]'),
    ('ttft_p101<2s', 'percentile 101 is not in (0, 100]'),
    ('ttft_p90<0ms', 'the limit must be > 0'),
    ('ttft_p90<2s,tbt_p99<fast', "item 'tbt_p99<fast'"),
    ('ttft_p90<2s,ttft_p99<5s', 'a second target for ttft'),
])
def test_parse_errors_name_the_item_and_show_the_grammar(text, says):
  with pytest.raises(ValueError) as e:
    slo.parse(text)
  assert says in str(e.value)
  assert "Example: 'ttft_p90<2s,tbt_p99<200ms'" in str(e.value)


def _records(seed=0, n=40, failed=()):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    gaps = np.concatenate([rng.uniform(0.05, 2.0, 1), rng.uniform(0.001, 0.3, rng.integers(1, 20))])
    r = RequestRecord(i, 0.1 * i, 32, len(gaps), sent_us=int(1e5 * i),
                      token_offsets_us=[int(t) for t in np.cumsum(gaps) * 1e6])
    if i in failed:
      r.error, r.error_message, r.token_offsets_us = 'http_5xx', 'boom', []
    out.append(r)
  return out


@pytest.mark.parametrize('text', ['ttft_p90<1.5s,tbt_p99<0.25s', 'ttft_p50<1s', 'tbt_p90<0.3s',
                                  'ttft_p90<3s,tbt_p99<1s', 'ttft_p10<0.01s'])
@pytest.mark.parametrize('failed', [(), (3,)])
def test_ttft_tbt_verdict_matches_the_benchmarks_summarize(text, failed):
  records, parsed = _records(failed=failed), slo.parse(text)
  bench = parsed.bench_slo()
  summary = analysis.summarize(records, analysis.request_rows(records, bench), bench, wall_s=10.0)
  got = parsed.check(records)
  assert got['passed'] == summary['slo']['passed']
  for name, check in summary['slo']['checks'].items():
    assert got['values'][name[:-2]] == pytest.approx(check['value'], rel=1e-12)


def test_tpot_and_e2e_against_hand_computed_quantiles():
  records = _records(seed=1)
  tpot = [(r.token_offsets_us[-1] - r.token_offsets_us[0]) / (len(r.token_offsets_us) - 1) / 1e6
          for r in records if len(r.token_offsets_us) > 1]
  e2e = [r.token_offsets_us[-1] / 1e6 for r in records]
  parsed = slo.parse('tpot_p90<1s,e2e_p50<100s')
  values = parsed.values(records)
  assert values['tpot'] == pytest.approx(np.quantile(tpot, 0.9), rel=1e-9)
  assert values['e2e'] == pytest.approx(np.quantile(e2e, 0.5), rel=1e-9)
  assert parsed.check(records)['passed']
  tight = slo.parse(f'e2e_p50<{np.quantile(e2e, 0.5) * 0.99}s')
  assert tight.check(records) == {'passed': False, 'values': {'e2e': values['e2e']}, 'failed': ['e2e']}
  assert not parsed.check(_records(seed=1, failed=(0,)))['passed']  # a failed request fails the run


def test_undefined_metric_fails_as_in_summarize():
  one_token = [RequestRecord(i, 0.0, 8, 1, token_offsets_us=[1000]) for i in range(3)]
  check = slo.parse('ttft_p90<1s,tbt_p99<1s').check(one_token)
  assert check['values'] == {'ttft': 0.001, 'tbt': None} and check['failed'] == ['tbt']
