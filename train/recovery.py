"""What a training run saves, and how it goes on, when something fails: the just-in-time state
machine of train/loop.py, apart from the loop.

The loop tells `Recovery` the last consistent state (`mark`: the step, the state before it, the
data iterator's state before its batch) and hands each failure class to it:
  * an exception while a step runs (`guard_step`) -> the marked state is saved, then
    faults.TrainingInterrupted(EXIT_STEP_FAILED); the restart replays that step's batch;
  * SIGTERM/SIGINT (`preempt`, between steps) -> the state after the finished step is saved,
    then EXIT_PREEMPTED; the restart replays nothing;
  * a hang (`on_hang`, from the watchdog thread) -> the marked state is saved (or, in a
    multi-process job whose peers may be dead, each process writes its own shards with no
    collective: train/emergency.py);
  * a streak of non-finite steps (`rollback`) -> the newest checkpoint from before the streak (or
    the initial state) with its data, once; if the same step fails again the data is taken as
    the cause and its batches are skipped; after cfg.max_rollbacks, EXIT_NONFINITE.
With checkpoint.just_in_time off the fused step donates the state at dispatch, so a failing step
and a hang save nothing (the restart uses the newest periodic checkpoint); preemption still saves.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from typing import Any, Callable

from train import emergency, faults
from train.config import CheckpointConfig


class Recovery:
  """The last consistent state of a run and what each failure class does with it.

  `ckpts` is the run's train/checkpoint.Checkpoints; `restart()` builds the initial train state
  (for a rollback with no checkpoint before the streak); `target` is the abstract state restores
  fill; `data` the training data iterator; `initial_data` its state before the first batch;
  `event(name)` counts a checkpoint event on the exporter.
  """

  def __init__(self, cfg: CheckpointConfig, ckpts, workdir: str, *, restart: Callable[[], Any],
               target, data, initial_data, event: Callable[[str], None] = lambda name: None,
               multi_process: bool = False):
    self.cfg, self.ckpts, self.workdir = cfg, ckpts, workdir
    self._restart, self._target, self._data, self._initial_data = restart, target, data, initial_data
    self._event = event
    # Every process's data state before the next steps, for the survivors of a process's death.
    self.data_states = (emergency.DataStates(workdir)
                        if multi_process and cfg.just_in_time else None)
    self.consistent: tuple[int, Any, Any] | None = None  # (step, state before it, data state)
    self.rolled_back_at: list[int] = []  # the step each rollback was triggered at

  def mark(self, step: int, state, data_state) -> None:
    """`state` is the state before step `step`, `data_state` the iterator's before its batch."""
    self.consistent = (step, state, data_state)

  def record_data(self, states: dict[int, Any]) -> None:
    """Writes this process's data states before the next steps, for the survivors (multi-process
    just-in-time runs only; a no-op otherwise)."""
    if self.data_states is not None:
      self.data_states.record(states)

  def save(self) -> int:
    """Saves the marked state and waits for it; returns its step."""
    step, state, data_state = self.consistent
    self.ckpts.save(step, state, data_state, wait=True)
    self._event('just_in_time_saved')
    logging.warning('Just-in-time checkpoint of step %d saved.', step)
    return step

  def on_hang(self) -> None:
    """The watchdog's callback (its own thread): save what can be saved of a stuck run."""
    if self.data_states is not None:  # a peer process may be dead: no collective can complete
      step, state, _ = self.consistent
      emergency.save(self.workdir, step, state)
    elif self.cfg.just_in_time:
      self.save()
    else:
      logging.error('No just-in-time save: checkpoint.just_in_time is off, and the fused step '
                    'donated the state. The restart resumes from the newest periodic checkpoint.')

  @contextlib.contextmanager
  def guard_step(self, step: int):
    """Around a step's work until its gradients are complete: any exception saves the state
    before `step` and becomes TrainingInterrupted(EXIT_STEP_FAILED). Without just-in-time
    checkpointing the state is donated already, so exceptions pass through unchanged."""
    if not self.cfg.just_in_time:
      yield
      return
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  (every failure class is saved)
      failed_at = time.time()
      saved = self.save()
      raise faults.TrainingInterrupted(f'step {step} failed ({type(e).__name__}: {e}); '
                                       f'saved the state before it.',
                                       faults.EXIT_STEP_FAILED, saved, failed_at) from e

  def preempt(self, signum: int) -> None:
    """Saves the marked state (after the last finished step) and raises EXIT_PREEMPTED."""
    saved = self.save()
    raise faults.TrainingInterrupted(
        f'{signal.Signals(signum).name} received; saved the state after step {saved}.',
        faults.EXIT_PREEMPTED, saved)

  def rollback(self, failed: int, streak: int) -> tuple[int, Any]:
    """(step, state) to resume from after a non-finite streak of `streak` steps ending at step
    `failed`; the data iterator is set to that step's position unless the data is to blame."""
    if len(self.rolled_back_at) >= self.cfg.max_rollbacks:
      raise faults.TrainingInterrupted(
          f'{streak} consecutive non-finite steps at step {failed + 1} after '
          f'{len(self.rolled_back_at)} rollbacks; lower the learning rate or inspect the data.',
          faults.EXIT_NONFINITE, None)
    skip_data = failed in self.rolled_back_at  # it failed there before: the data is the cause
    self.rolled_back_at.append(failed)
    manager = self.ckpts.manager
    self.ckpts.wait()
    before = [s for s in manager.all_steps() if s <= failed - streak + 1]
    to = max(before, default=0)
    for s in manager.all_steps():
      if s > to:  # saved during the streak, or before an earlier rollback: not this timeline
        manager.delete(s)
    if before:
      state, _ = self.ckpts.restore(to, self._target, None if skip_data else self._data)
    else:
      state = self._restart()
      if not skip_data and self._initial_data is not None:
        self._data.set_state(self._initial_data)
    logging.warning('%d consecutive non-finite steps ending at step %d: rolled back to step %d%s.',
                    streak, failed + 1, to,
                    ', skipping the batches in between' if skip_data else ', replaying its data')
    return to, state
