"""deploy/templates.py: placeholders keep their values' types, None drops, lists splice, and a
missing or unused value fails loudly."""

from __future__ import annotations

import os

import pytest
import yaml

from deploy import templates

TEMPLATE = """\
# ${not_a_placeholder}: comments are not read
kind: Thing
metadata:
  name: ${name}
  note: job ${name} on ${hosts} hosts
spec:
  replicas: ${hosts}
  optional: ${nothing}
  items:
  - first
  - ${more}
  - ${gone}
  - last
"""


@pytest.fixture
def directory(tmp_path):
  (tmp_path / 't.yaml').write_text(TEMPLATE)
  return str(tmp_path)


def test_values_keep_their_types(directory):
  (doc,) = templates.render('t.yaml', {'name': 'x', 'hosts': 64, 'nothing': None,
                                       'more': ['a', {'b': 1}], 'gone': None}, directory)
  assert doc == {'kind': 'Thing', 'metadata': {'name': 'x', 'note': 'job x on 64 hosts'},
                 'spec': {'replicas': 64, 'items': ['first', 'a', {'b': 1}, 'last']}}
  assert yaml.safe_load(templates.dump([doc], 'a header\nof two lines')) == doc


def test_missing_and_unused_values_fail(directory):
  values = {'name': 'x', 'hosts': 1, 'nothing': None, 'more': [], 'gone': None}
  with pytest.raises(ValueError, match=r'\$\{hosts\} has no value'):
    templates.render('t.yaml', {k: v for k, v in values.items() if k != 'hosts'}, directory)
  with pytest.raises(ValueError, match='no placeholder for'):
    templates.render('t.yaml', {**values, 'typo': 1}, directory)


def test_shipped_templates_parse():
  names = sorted(os.listdir(templates.TEMPLATE_DIR))
  assert names == ['pod-monitoring.yaml', 'serve.yaml', 'train-jobset.yaml']
  for name in names:
    with open(os.path.join(templates.TEMPLATE_DIR, name)) as f:
      assert all(isinstance(d, dict) and 'kind' in d for d in yaml.safe_load_all(f))
