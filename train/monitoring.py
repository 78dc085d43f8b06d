"""Training metrics for Prometheus (optional), and the estimated cost of a run.

`Exporter(port)` serves /metrics on 127.0.0.1:`port` (0: any free port; `addr` to listen elsewhere)
from a registry of its own, and `exporter.publish(record)` turns each record the training loop logs
into gauge and counter values:

  record key          metric                                           kind
  step                stoker_train_step                                gauge
  loss, grad_norm, learning_rate, tokens_per_sec, mfu, step_time,
  val_loss, val_perplexity, estimated_cost_usd, device_hours,
  moe_loss, expert_load_max, expert_load_min (mixtures of experts)
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

Cost: `estimate_cost(device_kind, num_devices, seconds)` multiplies device-hours by the list price of
the one device table (parallelism/devices.py).
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from parallelism import devices

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
    ('moe_loss', 'Mixture of experts: the weighted router losses (load balance + z-loss) per target '
     'token, last logged step.'),
    ('expert_load_max', "Mixture of experts: the busiest expert's tokens over the mean expert's, "
     'busiest layer, last logged step (1: balanced).'),
    ('expert_load_min', "Mixture of experts: the idlest expert's tokens over the mean expert's, "
     'idlest layer, last logged step (1: balanced).'),
)
# (record key, counter name without the _total suffix, help): +1 for each record holding the key.
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ('checkpoint_saved', 'checkpoint_saves', 'Periodic and final checkpoints saved.'),
    ('just_in_time_saved', 'just_in_time_saves', 'Just-in-time checkpoints saved after a failure.'),
    ('rollback_to', 'rollbacks', 'Rollbacks after a streak of non-finite steps.'),
)

PRICE_SOURCE = devices.PRICE_SOURCE  # the prices are the device table's (parallelism/devices.py)


def device_price(device_kind: str) -> float:
  """US dollars per device-hour of `device_kind` (a jax.Device.device_kind, or a name or alias of
  parallelism/devices.py such as 'v5e'); 0 for a CPU (the host is not counted)."""
  if device_kind.lower() == 'cpu':
    return 0.0
  known = devices.for_kind(device_kind)
  if known is None:
    raise ValueError(f'No price known for device kind {device_kind!r}; add it to '
                     f'parallelism/devices.py DEVICES (known: {", ".join(devices.DEVICES)}) or pass '
                     'price_per_device_hour.')
  return known.price_usd_per_hour


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
  call close(); `port` is the port it listens on (the one the OS chose when asked for 0). It
  listens on `addr`, by default this machine only (train.monitoring_host): a scraper on another
  machine (a Kubernetes pod's Prometheus, deploy/training.py) needs '0.0.0.0'."""

  def __init__(self, port: int, addr: str = '127.0.0.1'):
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

