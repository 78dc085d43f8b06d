"""parallelism/devices.py is the one device table: MFU (train/flops.py), cost logging
(train/monitoring.py), `stoker k8s` (deploy/) and the simulator (serve/sim/) all read it, so a figure
changed in it changes what each of them reports, and no other module holds a table of its own."""

from __future__ import annotations

import dataclasses
import os
import re
import types

import pytest

from deploy import serving
from models.presets import preset
from parallelism import devices
from serve.sim import devices as sim_devices
from serve.sim import plan_space
from train import flops, monitoring

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBRARIES = ('configs', 'data', 'deploy', 'models', 'parallelism', 'serve', 'train')


@pytest.fixture
def h100_at(monkeypatch):
  """The table with the H100 at a made-up price and peak, as an edit of the table would leave it."""
  edited = dataclasses.replace(devices.DEVICES['h100'], price_usd_per_hour=7.25, peak_flops=123e12)
  monkeypatch.setitem(devices.DEVICES, 'h100', edited)
  return edited


def test_every_user_reads_the_edited_table(h100_at):
  chip = types.SimpleNamespace(device_kind='NVIDIA H100 80GB HBM3', platform='gpu', process_index=0)
  assert flops.device_peak_flops(chip) == 123e12  # MFU
  assert flops.total_peak_flops([chip, chip]) == 2 * 123e12
  assert monitoring.device_price('NVIDIA H100 80GB HBM3') == 7.25  # cost logging and the exporter
  assert monitoring.estimate_cost('NVIDIA H100 80GB HBM3', 8, 1800) == pytest.approx(8 * 0.5 * 7.25)
  job = serving.ServeJob(name='chat', image='img:1', checkpoint='gs://b/m', gpu='nvidia-h100-80gb', gpus=2)
  assert '$14.50 per replica-hour' in serving.serve_summary(job)  # stoker k8s serve
  assert sim_devices.DEVICES is devices.DEVICES and sim_devices.device('h100') is h100_at  # simulator
  (hardware,) = plan_space.roofline_hardware(preset('tiny'), ['h100'])
  assert hardware.name == 'h100' and hardware.price_usd_per_hour == 7.25


def test_device_kinds_and_aliases_find_their_rows():
  expect = {'TPU v6 lite': 'tpu-v6e', 'TPU v5 lite': 'tpu-v5e', 'v5e': 'tpu-v5e', 'TPU v5p': 'tpu-v5p',
            'TPU v5': 'tpu-v5p', 'TPU v4': 'tpu-v4', 'NVIDIA H100 80GB HBM3': 'h100', 'NVIDIA H200': 'h200',
            'NVIDIA A100-SXM4-40GB': 'a100-40g', 'NVIDIA A100-SXM4-80GB': 'a100-80g', 'h200': 'h200'}
  for kind, name in expect.items():
    assert devices.for_kind(kind) is devices.DEVICES[name], kind
  assert devices.for_kind('cpu') is None and devices.for_kind('TPU v7') is None
  with pytest.raises(ValueError, match='tpu-v5e'):
    devices.device('v9')


def test_no_other_module_holds_device_figures():
  # Each row's peak FLOP/s and price as written in parallelism/devices.py: a copy of either anywhere
  # else in the libraries is a second table.
  with open(os.path.join(REPO, 'parallelism', 'devices.py')) as f:
    table = f.read()
  rows = re.findall(r"Device\('([\w-]+)', ([\d.e]+), .*?, ([\d.]+(?: / 8)?), \d+,", table)
  assert sorted(r[0] for r in rows) == sorted(devices.DEVICES)
  figures = {fig for _, peak, price in rows for fig in (peak, price) if len(fig) > 3}
  offenders = []
  for package in LIBRARIES:
    for root, _, files in os.walk(os.path.join(REPO, package)):
      for name in files:
        path = os.path.join(root, name)
        if not name.endswith('.py') or path.endswith(os.path.join('parallelism', 'devices.py')):
          continue
        with open(path) as f:
          text = f.read()
        offenders += [f'{os.path.relpath(path, REPO)}: {fig}' for fig in figures
                      if re.search(rf'(?<![\w.]){re.escape(fig)}(?![\w])', text)]
        if re.search(r'^(PEAK_FLOPS|PRICES)\b', text, re.M):
          offenders.append(f'{os.path.relpath(path, REPO)}: a PEAK_FLOPS or PRICES table')
  assert not offenders, offenders
