"""train/monitoring.py: the exporter serves what was published, parsed by prometheus_client's own
text parser over real HTTP; the cost estimate against hand-computed cases."""

from __future__ import annotations

import math
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from train import monitoring
from train.config import TrainConfig


def _scrape(port: int) -> dict[str, float]:
  with urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics', timeout=10) as r:
    assert r.status == 200
    text = r.read().decode()
  return {s.name: s.value for family in text_string_to_metric_families(text)
          for s in family.samples}


@pytest.fixture(scope='module')
def exporter():
  with monitoring.Exporter(0, addr='127.0.0.1') as e:
    yield e


def test_exporter_serves_the_published_records(exporter):
  assert exporter.port > 0
  exporter.publish({'step': 20, 'loss': 5.25, 'grad_norm': 0.75, 'learning_rate': 3e-4,
                    'skipped_steps': 2.0, 'step_time': 0.5, 'tokens_per_sec': 4096.0, 'mfu': 0.375,
                    'time': 1.7e9})
  exporter.publish({'step': 20, 'val_loss': 5.5, 'val_perplexity': math.exp(5.5), 'val_tokens': 1e4})
  exporter.publish({'checkpoint_saved': 20})
  exporter.publish({'checkpoint_saved': 40, 'restarts': 1, 'estimated_cost_usd': 12.5,
                    'device_hours': 10.0})
  exporter.publish({'just_in_time_saved': 41})
  exporter.publish({'rollback_to': 40})
  got = _scrape(exporter.port)
  want = {'stoker_train_step': 20, 'stoker_train_loss': 5.25, 'stoker_train_grad_norm': 0.75,
          'stoker_train_learning_rate': 3e-4, 'stoker_train_skipped_steps': 2,
          'stoker_train_step_time': 0.5, 'stoker_train_tokens_per_sec': 4096,
          'stoker_train_mfu': 0.375, 'stoker_train_val_loss': 5.5,
          'stoker_train_val_perplexity': math.exp(5.5), 'stoker_train_restarts': 1,
          'stoker_train_estimated_cost_usd': 12.5, 'stoker_train_device_hours': 10,
          'stoker_train_checkpoint_saves_total': 2, 'stoker_train_just_in_time_saves_total': 1,
          'stoker_train_rollbacks_total': 1}
  for name, value in want.items():
    assert got[name] == pytest.approx(value, rel=1e-12), name
  # Keys that are not metrics are not exported.
  assert not any('time' == n.removeprefix('stoker_train_') or 'val_tokens' in n for n in got)


def test_a_nonfinite_loss_is_exported_as_nan(exporter):
  exporter.publish({'loss': float('nan')})
  assert math.isnan(_scrape(exporter.port)['stoker_train_loss'])
  exporter.publish({'loss': 4.0})
  assert _scrape(exporter.port)['stoker_train_loss'] == 4.0


def test_exporter_listens_on_this_machine_only_by_default():
  with monitoring.Exporter(0) as e:
    assert e._server.server_address[0] == '127.0.0.1'
  assert TrainConfig.__dataclass_fields__['monitoring_host'].default == '127.0.0.1'


def test_exporter_rejects_a_bad_port():
  with pytest.raises(ValueError, match='65535'):
    monitoring.Exporter(70000)


@pytest.mark.parametrize('kind, price', [
    ('TPU v5 lite', 1.20), ('v5e', 1.20), ('TPU v6 lite', 2.70), ('TPU v5p', 4.20), ('TPU v5', 4.20),
    ('TPU v4', 3.22), ('NVIDIA H100 80GB HBM3', 11.03), ('NVIDIA A100-SXM4-40GB', 3.67),
    ('NVIDIA H200', 10.60), ('cpu', 0.0)])
def test_device_price_matches_device_kinds(kind, price):
  assert monitoring.device_price(kind) == price


def test_estimate_cost_hand_computed():
  # v5e-256 for 2.5 hours: 256 chips x 2.5 h x $1.20 = $768.
  assert monitoring.estimate_cost('TPU v5 lite', 256, 2.5 * 3600) == pytest.approx(768.0)
  # 8 H100 for 45 minutes at $11.03: 8 x 0.75 x 11.03 = $66.18.
  assert monitoring.estimate_cost('NVIDIA H100 80GB HBM3', 8, 2700) == pytest.approx(66.18)
  assert monitoring.estimate_cost('cpu', 8, 3600) == 0.0
  # An own rate overrides the table, also for kinds it does not know.
  assert monitoring.estimate_cost('TPU v7', 4, 1800, price_per_device_hour=2.0) == pytest.approx(4.0)


def test_estimate_cost_errors_name_the_fix():
  with pytest.raises(ValueError, match='parallelism/devices.py'):
    monitoring.estimate_cost('TPU v7', 4, 60)
  with pytest.raises(ValueError, match='num_devices'):
    monitoring.estimate_cost('cpu', 0, 60)
