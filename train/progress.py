"""What a training run reports as it goes: metrics.jsonl and TensorBoard (train/metrics.py), the
Prometheus exporter (train/monitoring.py), the progress bar and one console line per logged step,
and the estimated cost of the devices.

Only process 0 of a multi-process job writes metrics, serves the exporter and prints.
"""

from __future__ import annotations

import contextlib
import logging
import time

import jax
import numpy as np
from tqdm import tqdm

from train import monitoring
from train.config import TrainConfig
from train.flops import total_peak_flops
from train.metrics import MetricsWriter


class Progress(contextlib.ExitStack):
  """Turns each finished step's metrics into a logged record (every cfg.log_every steps) and
  keeps the records this run logged in `logged`. Use as a context manager."""

  def __init__(self, cfg: TrainConfig, workdir: str, mesh, start: int, progress: bool = True):
    super().__init__()
    self.cfg, self.workdir, self.mesh, self.start = cfg, workdir, mesh, start
    self.primary = jax.process_index() == 0
    self.progress = progress and self.primary
    self.flops_per_step = cfg.model.flops_per_token(cfg.seq_len) * cfg.tokens_per_step
    self.peak_flops = total_peak_flops(mesh.devices.flat)
    self.logged: list[dict] = []
    self._window: list[dict] = []  # per-step metrics since the last logged record

  def __enter__(self) -> Progress:
    super().__enter__()
    try:
      self._open()
    except BaseException:
      self.close()
      raise
    return self

  def _open(self) -> None:
    cfg = self.cfg
    self.metrics_file = self.enter_context(
        MetricsWriter(self.workdir, resume_step=self.start, enabled=self.primary))
    self.exporter = (self.enter_context(monitoring.Exporter(cfg.monitoring_port, cfg.monitoring_host))
                     if self.primary and cfg.monitoring_port else None)
    self.bar = self.enter_context(
        tqdm(total=cfg.steps, initial=self.start, disable=None if self.progress else True,
             unit='step', dynamic_ncols=True))
    self.started = time.time()
    self._last_done = time.perf_counter()

  def write(self, step: int, scalars: dict) -> None:
    """One record to metrics.jsonl + TensorBoard, and the exporter when there is one."""
    self.metrics_file.write(step, scalars)
    if self.exporter is not None:
      seconds = time.time() - self.started
      cost = self.cost(seconds)
      self.exporter.publish({'step': step, **scalars,
                             'device_hours': self.mesh.devices.size * seconds / 3600,
                             **({} if cost is None else {'estimated_cost_usd': cost})})

  def event(self, name: str) -> None:
    """Counts a checkpoint event on the exporter (the metrics file keeps only curves)."""
    if self.exporter is not None:
      self.exporter.publish({name: 1})

  def finish(self, step: int, metrics) -> int:
    """Takes step `step`'s metrics (waiting for the step); returns its non-finite streak."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    values['step_time'] = now - self._last_done
    self._last_done = now
    self._window.append(values)
    self.bar.update(1)
    self.bar.set_postfix(loss=f"{values['loss']:.4f}")
    if (step + 1) % self.cfg.log_every == 0 or step + 1 == self.cfg.steps:
      self._log(step + 1, values)
    return int(values['nonfinite_streak'])

  def _log(self, step: int, values: dict) -> None:
    step_time = float(np.mean([w['step_time'] for w in self._window]))
    record = {
        'loss': values['loss'],
        'grad_norm': values['grad_norm'],
        'learning_rate': values['learning_rate'],
        'skipped_steps': values['skipped_steps'],
        **{k: values[k] for k in ('kl', 'ce') if k in values},  # distilling (train/distill.py)
        **{k: values[k] for k in ('reward_accuracy', 'reward_margin', 'logp_chosen', 'logp_rejected')
           if k in values},  # DPO (train/dpo.py)
        **{k: values[k] for k in ('moe_loss', 'expert_load_max', 'expert_load_min')
           if k in values},  # mixtures of experts (models/moe.py)
        'step_time': step_time,
        'tokens_per_sec': self.cfg.tokens_per_step / step_time,
        'mfu': self.flops_per_step / step_time / self.peak_flops,
        'time': time.time(),
    }
    self.write(step, record)
    self.logged.append({'step': step, **record})
    self._window.clear()
    if self.progress:
      self.bar.write(f"step {step:>6}  loss {record['loss']:.4f}  "
                     f"grad_norm {record['grad_norm']:.3f}  lr {record['learning_rate']:.2e}  "
                     f"{record['tokens_per_sec']:,.0f} tok/s  MFU {record['mfu']:.1%}")

  def validation(self, step: int, record: dict) -> None:
    """Logs a validation record; the time it took is not counted as step time."""
    self.write(step, record)
    self.logged.append({'step': step, **record})
    if self.progress:
      self.bar.write(f"step {step:>6}  validation loss {record['val_loss']:.4f}  "
                     f"perplexity {record['val_perplexity']:.2f}  ({record['val_tokens']:,.0f} tokens)")
    self._last_done = time.perf_counter()

  def cost(self, seconds: float) -> float | None:
    """Estimated US dollars of `seconds` on the mesh's devices; None for a device without a price."""
    try:
      return monitoring.estimate_cost(self.mesh.devices.flat[0].device_kind,
                                      self.mesh.devices.size, seconds)
    except ValueError:
      return None

  def summary(self) -> None:
    """Logs the run's device-hours and estimated cost."""
    seconds = time.time() - self.started
    cost = self.cost(seconds)
    logging.info('%.3f device-hours on %d x %s%s.', self.mesh.devices.size * seconds / 3600,
                 self.mesh.devices.size, self.mesh.devices.flat[0].device_kind,
                 '' if cost is None else f': about ${cost:.2f} at list price (train/monitoring.py)')
