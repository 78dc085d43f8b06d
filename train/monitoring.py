"""Training metrics for Prometheus (optional), and the estimated cost of a run.

`Exporter(port)` serves /metrics on `port` (0: any free port) from a registry of its own, and
`exporter.publish(record)` turns each record the training loop logs into gauge and counter values:

  record key          metric                                           kind
  step                stoker_train_step                                gauge
  loss, grad_norm, learning_rate, tokens_per_sec, mfu, step_time,
  val_loss, val_perplexity, estimated_cost_usd, device_hours
                      stoker_train_<key>                               gauge
  skipped_steps       stoker_train_skipped_steps (the run's total, kept in the train state)
                                                                       gauge
  restarts            stoker_train_restarts (restarts of this run so far)
                                                                       gauge
  checkpoint_saved    stoker_train_checkpoint_saves_total (+1)         counter
  just_in_time_saved  stoker_train_just_in_time_saves_total (+1)       counter
  rollback_to         stoker_train_rollbacks_total (+1)                counter

Other keys ('time', 'val_tokens', ...) are not exported. In a multi-host job either process 0 alone
runs an exporter and reports cost for all devices, or every process runs one and reports its own
devices: the dashboard (configs/grafana/stoker.json) takes max() of the run's values and sum() of cost.

Cost: `estimate_cost(device_kind, num_devices, seconds)` multiplies device-hours by PRICES.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

PREFIX = 'stoker_train_'

# (record key, help) of the values exported as gauges named PREFIX + key.
GAUGES: tuple[tuple[str, str], ...] = (
    ('step', 'Optimizer steps completed.'),
    ('loss', 'Training loss (mean cross-entropy) of the last logged step.'),
    ('grad_norm', 'Global gradient norm of the last logged step.'),
    ('learning_rate', 'Learning rate of the last logged step.'),
    ('tokens_per_sec', 'Training throughput over the last log window, tokens per second.'),
    ('mfu', 'Model FLOPs utilisation over the last log window (0..1).'),
    ('step_time', 'Mean seconds per step over the last log window.'),
    ('skipped_steps', 'Steps skipped for non-finite gradients, whole run.'),
    ('val_loss', 'Validation loss of the last evaluation.'),
    ('val_perplexity', 'Validation perplexity of the last evaluation.'),
    ('restarts', 'Restarts of this run so far (resumes after a failure).'),
    ('estimated_cost_usd', 'Estimated cost so far of the devices this exporter reports for, US dollars.'),
    ('device_hours', 'Device-hours so far of the devices this exporter reports for.'),
)
# (record key, counter name without the _total suffix, help): +1 for each record holding the key.
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ('checkpoint_saved', 'checkpoint_saves', 'Periodic and final checkpoints saved.'),
    ('just_in_time_saved', 'just_in_time_saves', 'Just-in-time checkpoints saved after a failure.'),
    ('rollback_to', 'rollbacks', 'Rollbacks after a streak of non-finite steps.'),
)

# On-demand list prices in US dollars per device-hour (a TPU chip, a GPU), matched against
# jax.Device.device_kind like train/flops.py PEAK_FLOPS (first match, case-insensitive).
# Sources (2025): Google Cloud TPU pricing (cloud.google.com/tpu/pricing), per chip-hour, us-central
# regions; GPUs: Google Cloud accelerator-optimized VM on-demand prices (cloud.google.com/compute/
# vm-instance-pricing) divided by their GPUs: a2-highgpu-1g (A100 40GB), a3-highgpu-8g (H100),
# a3-ultragpu-8g (H200). Commitments and Spot VMs cost less; edit the table or pass
# price_per_device_hour for your own rate. CPU: 0 (the host is not counted).
PRICE_SOURCE = ('Google Cloud on-demand list prices, 2025: cloud.google.com/tpu/pricing (TPU, per '
                'chip-hour); A2/A3 VM prices per GPU (cloud.google.com/compute/vm-instance-pricing)')
PRICES: tuple[tuple[str, float], ...] = (
    ('TPU v6 lite', 2.70),  # v6e (Trillium)
    ('TPU v5 lite', 1.20),  # v5e
    ('TPU v5p', 4.20),
    ('TPU v5', 4.20),  # v5p reports 'TPU v5' on some runtimes
    ('TPU v4', 3.22),
    ('H200', 10.60),
    ('H100', 11.03),
    ('A100', 3.67),
    ('cpu', 0.0),
)
# Short names (as in `stoker k8s train --tpu v5e-256`) -> a device_kind the table matches.
ALIASES = {'v6e': 'TPU v6 lite', 'v5e': 'TPU v5 lite', 'v5p': 'TPU v5p', 'v4': 'TPU v4'}


def device_price(device_kind: str) -> float:
  """US dollars per device-hour of `device_kind` (a jax.Device.device_kind, or an ALIASES key)."""
  kind = ALIASES.get(device_kind.lower(), device_kind)
  for name, price in PRICES:
    if name.lower() in kind.lower():
      return price
  raise ValueError(f'No price known for device kind {device_kind!r}; add it to train/monitoring.py '
                   f'PRICES (known: {", ".join(n for n, _ in PRICES)}) or pass '
                   'price_per_device_hour.')


def estimate_cost(device_kind: str, num_devices: int, seconds: float,
                  price_per_device_hour: float | None = None) -> float:
  """Estimated US dollars for `num_devices` devices of `device_kind` held for `seconds`."""
  if num_devices < 1 or not seconds >= 0:
    raise ValueError(f'estimate_cost needs num_devices >= 1 and seconds >= 0; got '
                     f'num_devices={num_devices}, seconds={seconds}.')
  price = device_price(device_kind) if price_per_device_hour is None else price_per_device_hour
  return price * num_devices * seconds / 3600


class Exporter:
  """A Prometheus /metrics endpoint for one training process. Use as a context manager, or
  call close(); `port` is the port it listens on (the one the OS chose when asked for 0)."""

  def __init__(self, port: int, addr: str = '0.0.0.0'):
    if not 0 <= port < 65536:
      raise ValueError(f'Exporter port must be in 0..65535 (0: any free port), got {port}.')
    self.registry = CollectorRegistry()
    self._gauges = {key: Gauge(PREFIX + key, help, registry=self.registry) for key, help in GAUGES}
    self._counters = {key: Counter(PREFIX + name, help, registry=self.registry)
                      for key, name, help in COUNTERS}
    self._lock = threading.Lock()  # the loop and its watchdog thread may both publish
    self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
    self.port = self._server.server_port

  def publish(self, record: dict) -> None:
    """Sets the gauges and counts the events of one logged record (see the module docstring)."""
    with self._lock:
      for key, value in record.items():
        if key in self._gauges:
          self._gauges[key].set(float(value))  # NaN stays NaN: a non-finite loss is news
        elif key in self._counters:
          self._counters[key].inc()

  def close(self) -> None:
    self._server.shutdown()
    self._server.server_close()
    self._thread.join()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

