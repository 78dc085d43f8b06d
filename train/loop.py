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
A failure saves that state at once and exits with a code of its own (train/faults.py); the
state machine that decides what is saved lives in train/recovery.py:
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

The loop itself only orders the work: `_compile_step` builds the step (the split or the fused
one, behind one interface), train/progress.py logs, train/recovery.py handles failures.
"""

from __future__ import annotations

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

import storage
from data.synthetic import Batch
from parallelism import sharding
from parallelism.mesh import make_mesh
from parallelism.rules import DEFAULT_RULES, Rules
from train import datasets, emergency, faults
from train.checkpoint import Checkpoints
from train.config import TrainConfig
from train.evaluate import compile_eval_step, evaluate
from train.optimizer import make_optimizer
from train.progress import Progress
from train.recovery import Recovery
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
  storage.check(workdir, write=True)  # an unusable bucket fails here, before anything is written
  storage.makedirs(workdir)
  directory = datasets.data_dir(cfg) if batches is None else None
  if jax.process_index() == 0:
    storage.write_text(storage.join(workdir, 'config.json'),
                       json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
  mesh = make_mesh(cfg.mesh)
  tx = make_optimizer(cfg.optimizer, cfg.steps)
  state_shardings = sharding.logical_shardings(
      jax.eval_shape(functools.partial(fresh_state, cfg, tx)), mesh, rules)
  target = abstract_state(cfg, tx, state_shardings)
  data = iter(datasets.train_batches(cfg, directory) if batches is None else batches)
  ckpts = Checkpoints(workdir, cfg.checkpoint, cfg, config_text)
  try:
    return _run(cfg, workdir, mesh, tx, state_shardings, target, _Data(cfg, mesh, rules, data),
                ckpts, directory, rules, progress)
  finally:
    ckpts.close()
    if hasattr(data, 'close'):
      data.close()


def _run(cfg, workdir, mesh, tx, state_shardings, target, data, ckpts, directory, rules,
         progress) -> list[dict]:
  initial_data = data.state()
  start, state = _initial_state(cfg, workdir, mesh, tx, rules, target, data.iterator, ckpts)
  if start >= cfg.steps:
    logging.info('Nothing to do: the checkpoint is at step %d of %d.', start, cfg.steps)
    return []
  step_fn = _compile_step(cfg, mesh, tx, state_shardings, rules)
  eval_step = None
  if directory is not None and cfg.data.eval_every:
    eval_step = compile_eval_step(cfg, mesh, state_shardings.params, rules)
  with Progress(cfg, workdir, mesh, start, progress) as report:
    recovery = Recovery(cfg.checkpoint, ckpts, workdir,
                        restart=lambda: init_train_state(cfg, mesh, tx, rules)[0], target=target,
                        data=data.iterator, initial_data=initial_data, event=report.event,
                        multi_process=jax.process_count() > 1)
    with faults.SignalGuard() as guard, \
         faults.Watchdog(cfg.checkpoint.hang_timeout_s, recovery.on_hang) as watchdog:

      def validate(step: int, params) -> None:
        with watchdog.paused(), datasets.validation_batches(cfg, directory) as val:
          record = evaluate(eval_step, params, val, data.shardings, cfg.data.eval_batches)
        report.validation(step, record)

      state, ds = _loop(cfg, start, state, step_fn, data, ckpts, report, recovery, guard,
                        watchdog, validate if eval_step is not None else None)
      with watchdog.paused():
        ckpts.save(cfg.steps, state, ds, wait=True)
      report.event('checkpoint_saved')
  report.summary()
  return report.logged


def _loop(cfg, step, state, step_fn, data, ckpts, report, recovery, guard, watchdog, validate):
  """Steps from `step` to cfg.steps; returns the final state and the data state after it."""
  ckpt_cfg = cfg.checkpoint
  injector = faults.FaultInjector(cfg.fault, step)
  ds = data.state()
  recovery.record_data({step: ds})
  batch = data.next()
  pending = None  # (step, metrics) of the step whose metrics are not read yet
  while step < cfg.steps:
    recovery.mark(step, state, ds)
    last = step + 1 == cfg.steps
    with recovery.guard_step(step):  # just in time: a failure saves the state before `step`
      step_fn.dispatch(state, batch)
      streak = report.finish(*pending) if pending else 0
      pending = None
      ds_next = data.state()
      batch_next = None if last else data.next()  # to the devices while they compute
      if recovery.data_states:  # before this step's gradients complete
        recovery.record_data({step + 1: ds_next, step + 2: data.state()})
      injector.during_step(step)
      step_fn.wait(step, injector)  # a device error in step `step` surfaces here
    state, metrics = step_fn.complete(batch_next)
    watchdog.beat()
    if streak > ckpt_cfg.max_nonfinite_steps:
      to, state = recovery.rollback(step - 1, streak)
      report.write(step, {'rollback_to': to})
      step, ds = to, data.state()
      step_fn.reset()
      batch = data.next()
      continue
    pending = (step, metrics)
    step += 1
    recovery.mark(step, state, ds_next)
    if ckpt_cfg.every_steps and step % ckpt_cfg.every_steps == 0 and not last:
      with watchdog.paused():
        ckpts.save(step, state, ds_next)
      report.event('checkpoint_saved')
      if injector.kill_in_save(step):
        os.kill(os.getpid(), signal.SIGKILL)  # mid-save, before Orbax commits the step
    if validate is not None and (step % cfg.data.eval_every == 0 or last):
      report.finish(*pending)
      pending = None
      validate(step, state.params)
    if guard.received is not None and not last:
      if pending:
        report.finish(*pending)
      with watchdog.paused():
        recovery.preempt(guard.received)
    ds, batch = ds_next, batch_next
  if pending is not None:
    report.finish(*pending)
  return state, ds


class _Data:
  """The training batches: their iterator, its state, and each batch put on the devices."""

  def __init__(self, cfg: TrainConfig, mesh, rules: Rules, iterator):
    self.iterator = iterator
    self.shardings = {k: v.sharding for k, v in batch_spec(cfg, mesh, rules).items()}

  def state(self):
    """The iterator's state before its next batch (None for an iterator without one)."""
    return self.iterator.get_state() if hasattr(self.iterator, 'get_state') else None

  def next(self) -> dict:
    host_batch = next(self.iterator)
    return {k: jax.make_array_from_process_local_data(s, np.asarray(host_batch[k]))
            for k, s in self.shardings.items()}


def _initial_state(cfg, workdir, mesh, tx, rules, target, data, ckpts):
  """(step, state) the run starts from: an emergency checkpoint, the newest Orbax checkpoint (the
  data iterator set to its position), or a fresh state at step 0."""
  start = ckpts.latest_step()
  resumed = _restore_emergency(workdir, start, target, data)
  if resumed is not None:
    return resumed
  if start is None:
    state, _ = init_train_state(cfg, mesh, tx, rules)
    return 0, state
  state, _ = ckpts.restore(start, target, data)
  logging.info('Resumed from the checkpoint of step %d in %s.', start, ckpts.manager.directory)
  return start, state


def _compile_step(cfg, mesh, tx, state_shardings, rules):
  """The train step, compiled once: split for just-in-time checkpointing, else fused."""
  clock = time.perf_counter()
  if cfg.checkpoint.just_in_time:
    step = _SplitStep(compile_split_step(cfg, mesh, tx, state_shardings, rules))
  else:
    step = _FusedStep(compile_train_step(cfg, mesh, tx, state_shardings, rules))
  logging.info('Compiled the train step in %.1f s on mesh %s.', time.perf_counter() - clock,
               dict(mesh.shape))
  return step


class _SplitStep:
  """One step as the gradient pass and the update (train/step.py: SplitStep). dispatch() queues
  the gradients of `state` (unless the last complete() queued them already), wait() blocks on
  them, complete() dispatches the update, which alone donates the state, and queues the next
  step's gradients right behind it, before any other host work, so the devices never wait."""

  def __init__(self, split):
    self._split = split
    self._leaves = None  # `state` as the flat list the split step takes
    self._inflight = None  # (grads, metrics) of the next step, dispatched behind the update
    self._grads = self._metrics = None

  def dispatch(self, state, batch) -> None:
    if self._inflight is None:
      self._leaves = self._split.flatten(state)
    self._grads, self._metrics = self._inflight or self._split.grad(self._leaves, batch)
    self._inflight = None

  def wait(self, step: int, injector: faults.FaultInjector) -> None:
    self._grads = injector.poison(step, self._grads)
    jax.block_until_ready(self._grads)

  def complete(self, batch_next):
    """(state after the step, its metrics)."""
    self._leaves, update_metrics = self._split.update(self._leaves, self._grads)
    if batch_next is not None:
      self._inflight = self._split.grad(self._leaves, batch_next)
    metrics = {**self._metrics, **update_metrics}
    self._grads = self._metrics = None
    return self._split.unflatten(self._leaves), metrics

  def reset(self) -> None:
    """Forgets the queued gradients (the state was replaced by a rollback)."""
    self._inflight = None


class _FusedStep:
  """The fused step behind _SplitStep's interface: it donates the state at dispatch."""

  def __init__(self, step_fn):
    self._step_fn = step_fn
    self._out = None

  def dispatch(self, state, batch) -> None:
    self._out = self._step_fn(state, batch)

  def wait(self, step: int, injector: faults.FaultInjector) -> None:
    del step, injector

  def complete(self, batch_next):
    del batch_next
    out, self._out = self._out, None
    return out

  def reset(self) -> None:
    pass


def _restore_emergency(workdir, orbax_step, target, data):
  """(step, state) from the emergency checkpoint of a job that lost a process (train/emergency.py:
  restore_newer), the data iterator set to its position; else None."""
  resumed = emergency.restore_newer(workdir, orbax_step, target)
  if resumed is None:
    return None
  step, state, data_state = resumed
  if data_state is not None:
    data.set_state(data_state)
  return step, state
