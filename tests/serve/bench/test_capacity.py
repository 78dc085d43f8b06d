"""serve/bench/capacity.py: the search against probes with a known capacity."""

import pytest

from serve.bench import capacity


def threshold_probe(limit, log):
  def probe(rate):
    log.append(rate)
    return {'passed': rate <= limit, 'value': rate / limit}
  return probe


@pytest.mark.parametrize('limit', [0.3, 1.0, 3.7, 11.0, 100.0])
def test_search_brackets_then_bisects_to_tolerance(limit):
  log = []
  cfg = capacity.SearchConfig(start_rate=1.0, tolerance=0.05, max_probes=30)
  found, curve = capacity.search(threshold_probe(limit, log), cfg)
  assert [p['rate'] for p in curve] == log
  assert found <= limit  # only passing rates are reported
  failing = min(p['rate'] for p in curve if not p['passed'])
  assert failing > limit and failing - found <= 0.05 * found
  assert all(p['passed'] == (p['rate'] <= limit) for p in curve)


def test_search_hand_traced():
  # Capacity 3: 1 pass, 2 pass, 4 fail (bracketed); 3 pass, 3.5 fail, 3.25 fail, 3.125 fail:
  # 3.125 - 3 = 0.125 <= 0.05 * 3 = 0.15, done.
  log = []
  found, _ = capacity.search(threshold_probe(3.0, log), capacity.SearchConfig(tolerance=0.05, max_probes=20))
  assert log == [1, 2, 4, 3, 3.5, 3.25, 3.125]
  assert found == 3


def test_search_limits():
  log = []
  found, _ = capacity.search(threshold_probe(0.01, log), capacity.SearchConfig(min_rate=0.25))
  assert found is None and log == [1, 0.5, 0.25]
  found, _ = capacity.search(threshold_probe(1e9, []), capacity.SearchConfig(max_rate=8))
  assert found == 8
  log = []
  found, curve = capacity.search(threshold_probe(5.0, log), capacity.SearchConfig(max_probes=4))
  assert len(curve) == 4 and found == 4 and log == [1, 2, 4, 8]
  with pytest.raises(ValueError, match='--min-rate'):
    capacity.SearchConfig(start_rate=0.01, min_rate=0.1)
