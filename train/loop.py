"""The training loop: build the mesh and sharded state (or resume it), compile once, step, log,
checkpoint, and survive failures.

Host-side metrics lag one step: step N is dispatched before step N-1's metrics are read, so
the device never waits for the host to log.

Just-in-time checkpointing (cfg.checkpoint.just_in_time, the default). The step is compiled as
two computations (train/step.py: compile_split_step): the long forward/backward pass reads the
state and donates nothing; the short optimizer update is the only computation that consumes and
replaces it, and it is dispatched only once the gradients are complete. So until the update of
step N is dispatched, the state before step N is intact on the devices, and the loop keeps a
reference to it with the data iterator's state from before batch N: "the last consistent state".
A failure saves that state at once and exits with a code of its own (train/faults.py):
  * an exception in step N (device/runtime error) -> the state before N; restart replays batch N;
  * SIGTERM/SIGINT -> step N finishes, the state after it is saved; restart replays nothing;
  * a hang (no progress for hang_timeout_s) -> the watchdog thread saves the state before the
    stuck step (it is not donated, so still readable) and hard-exits; restart replays batch N;
  * more than max_nonfinite_steps consecutive non-finite steps -> in-process rollback to the newest
    checkpoint from before the streak (or the initial state), replaying its data once; if the same
    step fails again the data is taken as the cause, and its batches are skipped.
The price is one extra dispatch per step and waiting for the gradients before dispatching the
update; the next step's gradient pass is dispatched right behind the update, before any other
host work, so the devices idle only for that wake-up and the two dispatches
(benchmarks/checkpoint_overhead.py measures it against the fused step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import time
from typing import Iterable

import jax
import numpy as np
from tqdm import tqdm

from data.synthetic import Batch
from parallelism import sharding
from parallelism.mesh import make_mesh
from parallelism.rules import DEFAULT_RULES, Rules
from train import datasets, emergency, faults, monitoring
from train.checkpoint import Checkpoints
from train.config import TrainConfig
from train.evaluate import compile_eval_step, evaluate
from train.flops import total_peak_flops
from train.metrics import MetricsWriter
from train.optimizer import make_optimizer
from train.step import (abstract_state, batch_spec, compile_split_step, compile_train_step,
                        fresh_state, init_train_state)


def train(cfg: TrainConfig, workdir: str, batches: Iterable[Batch] | None = None,
          rules: Rules = DEFAULT_RULES, progress: bool = True, config_text: str = '') -> list[dict]:
  """Trains up to `cfg.steps` steps, resuming from <workdir>/checkpoints if it holds any; returns
  the metrics logged by this call (also in <workdir>/metrics.jsonl).

  `batches` overrides cfg.data (tests); otherwise cfg.data.source decides, and validation runs
  every cfg.data.eval_every steps and after the last step. `config_text` (the operative gin
  config) is stored in each checkpoint. Raises faults.TrainingInterrupted after a just-in-time
  save (its exit_code says why).
  """
  os.makedirs(workdir, exist_ok=True)
  directory = datasets.data_dir(cfg) if batches is None else None
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(dataclasses.asdict(cfg), f, indent=2, default=str)
  mesh = make_mesh(cfg.mesh)
  tx = make_optimizer(cfg.optimizer, cfg.steps)
  state_shardings = sharding.logical_shardings(
      jax.eval_shape(functools.partial(fresh_state, cfg, tx)), mesh, rules)
  target = abstract_state(cfg, tx, state_shardings)
  data = iter(datasets.train_batches(cfg, directory) if batches is None else batches)
  data_state = data.get_state if hasattr(data, 'get_state') else lambda: None
  ckpts = Checkpoints(workdir, cfg.checkpoint, cfg, config_text)
  try:
    return _run(cfg, workdir, mesh, tx, state_shardings, target, data, data_state, ckpts,
                directory, rules, progress)
  finally:
    ckpts.close()
    if hasattr(data, 'close'):
      data.close()


def _run(cfg, workdir, mesh, tx, state_shardings, target, data, data_state, ckpts, directory,
         rules, progress) -> list[dict]:
  ckpt_cfg = cfg.checkpoint
  initial_data = data_state()
  multi = jax.process_count() > 1
  start = ckpts.latest_step()
  resumed = _restore_emergency(workdir, start, target, data) if multi else None
  if resumed is not None:
    start, state = resumed
  elif start is None:
    start = 0
    state, _ = init_train_state(cfg, mesh, tx, rules)
  else:
    state, _ = ckpts.restore(start, target, data)
    logging.info('Resumed from the checkpoint of step %d in %s.', start, ckpts.manager.directory)
  if start >= cfg.steps:
    logging.info('Nothing to do: the checkpoint is at step %d of %d.', start, cfg.steps)
    return []

  clock = time.perf_counter()
  if ckpt_cfg.just_in_time:
    split = compile_split_step(cfg, mesh, tx, state_shardings, rules)
  else:
    step_fn = compile_train_step(cfg, mesh, tx, state_shardings, rules)
  logging.info('Compiled the train step in %.1f s on mesh %s.', time.perf_counter() - clock,
               dict(mesh.shape))
  shardings = {k: v.sharding for k, v in batch_spec(cfg, mesh, rules).items()}
  eval_step = None
  if directory is not None and cfg.data.eval_every:
    eval_step = compile_eval_step(cfg, mesh, state_shardings.params, rules)
  flops_per_step = cfg.model.flops_per_token(cfg.seq_len) * cfg.tokens_per_step
  peak_flops = total_peak_flops(mesh.devices.flat)
  injector = faults.FaultInjector(cfg.fault, start)

  def to_device(host_batch):
    return {k: jax.make_array_from_process_local_data(s, np.asarray(host_batch[k]))
            for k, s in shardings.items()}

  # (step, state before it, data state before its batch): what a failure saves.
  consistent = None

  def save_consistent() -> int:
    step, st, ds = consistent
    ckpts.save(step, st, ds, wait=True)
    if writer is not None:
      writer.event('just_in_time_saved')
    logging.warning('Just-in-time checkpoint of step %d saved.', step)
    return step

  def save_emergency() -> None:  # a peer process died: no collective can complete
    step, st, _ = consistent
    emergency.save(workdir, step, st)

  def nothing_to_save() -> None:
    logging.error('No just-in-time save: checkpoint.just_in_time is off, and the fused step '
                  'donated the state. The restart resumes from the newest periodic checkpoint.')

  # Every process's data state before the next steps, for the survivors of a process's death.
  data_states = emergency.DataStates(workdir) if multi and ckpt_cfg.just_in_time else None
  on_hang = (save_emergency if data_states else
             save_consistent if ckpt_cfg.just_in_time else nothing_to_save)

  writer = None  # set below, once the metrics file is open
  logged: list[dict] = []
  window: list[dict] = []  # per-step metrics since the last log line
  last_done = time.perf_counter()
  rolled_back_at: list[int] = []  # the step each rollback was triggered at

  primary = jax.process_index() == 0  # writes metrics and prints for the whole job
  progress = progress and primary
  exporter = (monitoring.Exporter(cfg.monitoring_port) if primary and cfg.monitoring_port
              else contextlib.nullcontext())
  started = time.time()
  with MetricsWriter(workdir, resume_step=start, enabled=primary) as metrics_file, exporter, \
       tqdm(total=cfg.steps, initial=start, disable=None if progress else True, unit='step',
            dynamic_ncols=True) as bar, \
       faults.SignalGuard() as guard, \
       faults.Watchdog(ckpt_cfg.hang_timeout_s, on_hang) as watchdog:

    class Writer:
      """metrics.jsonl + TensorBoard, and the Prometheus exporter when there is one."""

      def write(self, step: int, scalars: dict) -> None:
        metrics_file.write(step, scalars)
        if exporter is not None and hasattr(exporter, 'publish'):
          seconds = time.time() - started
          cost = _cost(mesh, seconds)
          exporter.publish({'step': step, **scalars,
                            'device_hours': mesh.devices.size * seconds / 3600,
                            **({} if cost is None else {'estimated_cost_usd': cost})})

      def event(self, name: str) -> None:
        """Counts a checkpoint event on the exporter (the metrics file keeps only curves)."""
        if exporter is not None and hasattr(exporter, 'publish'):
          exporter.publish({name: 1})

    writer = Writer()

    def finish(step: int, metrics) -> int:
      """Logs step `step`; returns the length of its non-finite streak."""
      nonlocal last_done
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}  # waits for `step`
      now = time.perf_counter()
      values['step_time'] = now - last_done
      last_done = now
      window.append(values)
      bar.update(1)
      bar.set_postfix(loss=f"{values['loss']:.4f}")
      if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
        step_time = float(np.mean([w['step_time'] for w in window]))
        record = {
            'loss': values['loss'],
            'grad_norm': values['grad_norm'],
            'learning_rate': values['learning_rate'],
            'skipped_steps': values['skipped_steps'],
            'step_time': step_time,
            'tokens_per_sec': cfg.tokens_per_step / step_time,
            'mfu': flops_per_step / step_time / peak_flops,
            'time': time.time(),
        }
        writer.write(step + 1, record)
        logged.append({'step': step + 1, **record})
        window.clear()
        if progress:
          bar.write(f"step {step + 1:>6}  loss {record['loss']:.4f}  "
                    f"grad_norm {record['grad_norm']:.3f}  lr {record['learning_rate']:.2e}  "
                    f"{record['tokens_per_sec']:,.0f} tok/s  MFU {record['mfu']:.1%}")
      return int(values['nonfinite_streak'])

    def validate(step: int) -> None:
      nonlocal last_done
      with watchdog.paused(), datasets.validation_batches(cfg, directory) as val:
        record = evaluate(eval_step, state.params, val, shardings, cfg.data.eval_batches)
      writer.write(step, record)
      logged.append({'step': step, **record})
      if progress:
        bar.write(f"step {step:>6}  validation loss {record['val_loss']:.4f}  "
                  f"perplexity {record['val_perplexity']:.2f}  ({record['val_tokens']:,.0f} tokens)")
      last_done = time.perf_counter()  # evaluation time is not training step time

    def rollback(failed: int, streak: int):
      """(step, state) to resume from after a non-finite streak that ended at step `failed`."""
      if len(rolled_back_at) >= ckpt_cfg.max_rollbacks:
        raise faults.TrainingInterrupted(
            f'{streak} consecutive non-finite steps at step {failed + 1} after '
            f'{len(rolled_back_at)} rollbacks; lower the learning rate or inspect the data.',
            faults.EXIT_NONFINITE, None)
      skip_data = failed in rolled_back_at  # it failed there before: the data is the cause
      rolled_back_at.append(failed)
      ckpts.wait()
      before = [s for s in ckpts.manager.all_steps() if s <= failed - streak + 1]
      to = max(before, default=0)
      for s in ckpts.manager.all_steps():
        if s > to:  # saved during the streak, or before an earlier rollback: not this timeline
          ckpts.manager.delete(s)
      if before:
        st, _ = ckpts.restore(to, target, None if skip_data else data)
      else:
        st, _ = init_train_state(cfg, mesh, tx, rules)
        if not skip_data and initial_data is not None:
          data.set_state(initial_data)
      logging.warning('%d consecutive non-finite steps ending at step %d: rolled back to step %d%s.',
                      streak, failed + 1, to,
                      ', skipping the batches in between' if skip_data else ', replaying its data')
      writer.write(failed + 1, {'rollback_to': to})
      return to, st

    step = start
    ds = data_state()
    if data_states:
      data_states.record({step: ds})
    batch = to_device(next(data))
    pending = None
    inflight = None  # the gradients of `step`, dispatched right behind the previous update
    leaves = None  # just in time: `state` as the flat list the split step takes
    while step < cfg.steps:
      consistent = (step, state, ds)
      last = step + 1 == cfg.steps
      if ckpt_cfg.just_in_time:
        try:
          if inflight is None:
            leaves = split.flatten(state)
          grads, metrics = inflight or split.grad(leaves, batch)
          inflight = None
          streak = finish(*pending) if pending else 0
          pending = None
          ds_next = data_state()
          # The next batch goes to the devices while they compute this step's gradients.
          batch_next = None if last else to_device(next(data))
          if data_states:  # before this step's gradients complete and the next step's dispatch
            data_states.record({step + 1: ds_next, step + 2: data_state()})
          injector.during_step(step)
          grads = injector.poison(step, grads)
          jax.block_until_ready(grads)  # a device error in step `step` surfaces here
        except Exception as e:  # pylint: disable=broad-except  (every failure class is saved)
          failed_at = time.time()
          saved = save_consistent()
          raise faults.TrainingInterrupted(f'step {step} failed ({type(e).__name__}: {e}); '
                                           f'saved the state before it.',
                                           faults.EXIT_STEP_FAILED, saved, failed_at) from e
        leaves, update_metrics = split.update(leaves, grads)
        if batch_next is not None:  # queued before any other host work, so the devices never wait
          inflight = split.grad(leaves, batch_next)
        state = split.unflatten(leaves)
        metrics = {**metrics, **update_metrics}
      else:  # the fused step donates the state at dispatch: a failure here loses it
        state, metrics = step_fn(state, batch)
        streak = finish(*pending) if pending else 0
        ds_next = data_state()
        batch_next = None if last else to_device(next(data))
        injector.during_step(step)
      watchdog.beat()
      if streak > ckpt_cfg.max_nonfinite_steps:
        step, state = rollback(step - 1, streak)
        pending, inflight, ds = None, None, data_state()
        batch = to_device(next(data))
        continue
      pending = (step, metrics)
      step += 1
      consistent = (step, state, ds_next)
      if ckpt_cfg.every_steps and step % ckpt_cfg.every_steps == 0 and not last:
        with watchdog.paused():
          ckpts.save(step, state, ds_next)
        writer.event('checkpoint_saved')
        if injector.kill_in_save(step):
          os.kill(os.getpid(), signal.SIGKILL)  # mid-save, before Orbax commits the step
      if eval_step is not None and (step % cfg.data.eval_every == 0 or last):
        finish(*pending)
        pending = None
        validate(step)
      if guard.received is not None and not last:
        if pending:
          finish(*pending)
        with watchdog.paused():
          saved = save_consistent()
        raise faults.TrainingInterrupted(
            f'{signal.Signals(guard.received).name} received; saved the state after step {step}.',
            faults.EXIT_PREEMPTED, saved)
      ds, batch = ds_next, batch_next
    if pending is not None:
      finish(*pending)
    with watchdog.paused():
      ckpts.save(cfg.steps, state, ds, wait=True)
    writer.event('checkpoint_saved')
  seconds = time.time() - started
  cost = _cost(mesh, seconds)
  logging.info('%.3f device-hours on %d x %s%s.', mesh.devices.size * seconds / 3600,
               mesh.devices.size, mesh.devices.flat[0].device_kind,
               '' if cost is None else f': about ${cost:.2f} at list price (train/monitoring.py)')
  return logged


def _restore_emergency(workdir, orbax_step, target, data):
  """(step, state) from the emergency checkpoint of a job that lost a process, if there is one
  newer than the newest Orbax checkpoint and it is complete; else None."""
  step = emergency.latest(workdir)
  if step is None or (orbax_step is not None and step <= orbax_step):
    return None
  try:
    state, data_state = emergency.restore(workdir, step, target)
  except ValueError as e:
    logging.warning('%s Resuming from the newest periodic checkpoint instead.', e)
    return None
  if data_state is not None:
    data.set_state(data_state)
  logging.info('Resumed from the emergency checkpoint of step %d (saved by the processes that '
               'survived a failure).', step)
  return step, state


def _cost(mesh, seconds: float) -> float | None:
  """Estimated US dollars of `seconds` on the mesh's devices; None for a device without a price."""
  try:
    return monitoring.estimate_cost(mesh.devices.flat[0].device_kind, mesh.devices.size, seconds)
  except ValueError:
    return None
