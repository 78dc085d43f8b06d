"""configs/grafana/stoker.json references only metrics the code exports: every metric name in every
panel's PromQL is a sample name of the training exporter (train/monitoring.py) or the server's
registry (serve/metrics.py), derived from their metric families and types."""

from __future__ import annotations

import json
import os
import re

import pytest

from serve.metrics import Metrics
from train import monitoring

DASHBOARD = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'grafana', 'stoker.json')
# Sample names a metric family of each type exposes (the text format's suffixes).
SUFFIXES = {'counter': ('_total', '_created'), 'gauge': ('',), 'histogram': ('_bucket', '_sum', '_count', '_created'),
            'summary': ('', '_sum', '_count', '_created'), 'info': ('_info',), 'unknown': ('',)}
PROMQL_KEYWORDS = {'by', 'without', 'on', 'ignoring', 'group_left', 'group_right', 'offset', 'bool',
                   'and', 'or', 'unless', 'inf', 'nan'}


def _exported(registry) -> set[str]:
  return {family.name + suffix for family in registry.collect() for suffix in SUFFIXES[family.type]}


@pytest.fixture(scope='module')
def exported() -> set[str]:
  with monitoring.Exporter(0, addr='127.0.0.1') as e:
    names = _exported(e.registry)
  return names | _exported(Metrics().registry)


def _panels(panels):
  for p in panels:
    yield p
    yield from _panels(p.get('panels', []))


def _metric_names(expr: str) -> set[str]:
  """Metric names in a PromQL expression: identifiers that are not functions, keywords or labels."""
  expr = re.sub(r'"(\\.|[^"\\])*"', '', expr)  # strings
  expr = re.sub(r'\{[^}]*\}|\[[^\]]*\]', '', expr)  # label matchers, ranges
  expr = re.sub(r'\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)', '', expr)
  names = set()
  for m in re.finditer(r'(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?', expr):
    if not m.group(2) and m.group(1).lower() not in PROMQL_KEYWORDS:
      names.add(m.group(1))
  return names


def _dashboard() -> dict:
  with open(DASHBOARD) as f:
    return json.load(f)


def test_the_parser_finds_metrics():
  assert _metric_names('histogram_quantile(0.99, sum by (le) (rate(a_bucket{x="y"}[$__rate_interval])))'
                       ' / on (pod) b + bool c offset 5m') == {'a_bucket', 'b', 'c'}


def test_dashboard_references_only_exported_metrics(exported):
  used, missing = set(), []
  for panel in _panels(_dashboard()['panels']):
    for target in panel.get('targets', []):
      for name in _metric_names(target['expr']):
        used.add(name)
        if name not in exported:
          missing.append(f'panel {panel["title"]!r}: {name}')
  assert not missing, 'not exported by train/monitoring.py or serve/metrics.py:\n' + '\n'.join(missing)
  # Both halves are on the dashboard, and it uses most of what is exported.
  assert {'stoker_train_loss', 'stoker_train_mfu', 'stoker_queue_length',
          'stoker_time_to_first_token_seconds_bucket'} <= used
  assert len(used) >= 30


def test_dashboard_is_well_formed():
  dash = _dashboard()
  panels = list(_panels(dash['panels']))
  ids = [p['id'] for p in panels]
  assert len(ids) == len(set(ids))
  assert [v['name'] for v in dash['templating']['list']] == ['datasource']
  for p in panels:
    assert 0 <= p['gridPos']['x'] and p['gridPos']['x'] + p['gridPos']['w'] <= 24, p['title']
    if p['type'] != 'row':
      assert p['datasource'] == {'type': 'prometheus', 'uid': '${datasource}'}
      assert p['targets'] and len({t['refId'] for t in p['targets']}) == len(p['targets'])
