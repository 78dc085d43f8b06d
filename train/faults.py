"""Failure handling for just-in-time checkpointing: signals, a hang watchdog, exit codes, and
fault injection for tests and drills.

Each failure class ends the process with its own exit code, after saving the last consistent
state, so a supervisor (train/supervise.py) knows whether a restart will resume where the run stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp

from train.config import FaultConfig

EXIT_PREEMPTED = 80  # SIGTERM / SIGINT: the state after the last finished step was saved
EXIT_STEP_FAILED = 81  # an exception in a step: the state before that step was saved
EXIT_HANG = 82  # the watchdog saw no progress: the state before the stuck step was saved
EXIT_NONFINITE = 83  # non-finite losses outlasted every rollback: restarting will not help
RESTARTABLE = (EXIT_PREEMPTED, EXIT_STEP_FAILED, EXIT_HANG)
PEER_EXITED_ENV = 'STOKER_PEER_EXITED'  # a file the launcher creates when a process of the job exits
PAUSED_SLACK = 4  # in work that may take long, the watchdog waits this many timeouts (>= 60 s)


class TrainingInterrupted(Exception):
  """Training stopped after a just-in-time save; `exit_code` tells the supervisor why."""

  def __init__(self, message: str, exit_code: int, saved_step: int | None,
               failed_at: float | None = None):
    super().__init__(message)
    self.exit_code, self.saved_step = exit_code, saved_step
    self.failed_at = time.time() if failed_at is None else failed_at  # when it was noticed


class FaultInjected(RuntimeError):
  """The error an injected 'exception' fault raises, standing in for a device/runtime error."""


class SignalGuard:
  """Turns the first SIGTERM/SIGINT into a flag the loop checks between steps; a second SIGINT
  interrupts at once (KeyboardInterrupt) as usual."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def __enter__(self) -> SignalGuard:
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    if self.received is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.received = signum
    logging.warning('Received %s: saving after the current step, then exiting.',
                    signal.Signals(signum).name)

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class Watchdog:
  """A thread that calls `on_hang` when no heartbeat came for `timeout_s`, or at once when the launcher
  says a peer process of the job has exited (`peer_exited`, a file it creates: STOKER_PEER_EXITED, set by
  parallelism/launch.py); then it ends the process with EXIT_HANG (even if `on_hang` itself hangs:
  it gets max(60 s, 4 x timeout_s)).

  The loop beats after every step; `paused()` covers work that may legitimately take longer
  (validation, a save), for which the limit is max(60 s, PAUSED_SLACK x timeout_s): in a
  multi-process job a save or a validation batch can itself wait forever on a dead peer. A peer's
  exit needs no timeout: the survivor's next collective would wait for it forever, so it saves what it
  holds (train/emergency.py) within a poll, not after timeout_s (600 s by default).
  """

  def __init__(self, timeout_s: float, on_hang: Callable[[], None],
               peer_exited: str | None = None):
    self.timeout_s, self._on_hang = timeout_s, on_hang
    self._peer_exited = peer_exited or os.environ.get(PEER_EXITED_ENV) or None
    self._last: float | None = None  # armed by the first beat: start-up may be slow
    self._paused = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name='stoker-watchdog', daemon=True)

  def __enter__(self) -> Watchdog:
    if self.timeout_s > 0 or self._peer_exited:
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()

  def beat(self) -> None:
    self._last = time.monotonic()

  @contextlib.contextmanager
  def paused(self):
    self._paused += 1
    try:
      yield
    finally:
      self._paused -= 1
      self.beat()

  def _run(self) -> None:
    poll = min(1.0, self.timeout_s / 4) if self.timeout_s > 0 else 1.0
    reason = None
    while reason is None:
      if self._stop.wait(poll):
        return
      reason = self._reason()
    logging.error('%s', reason)
    saver = threading.Thread(target=self._on_hang, name='stoker-hang-save', daemon=True)
    saver.start()
    limit = max(60.0, 4 * self.timeout_s)
    saver.join(limit)
    if saver.is_alive():
      logging.error('The hang save did not finish within %.0f s; exiting without it.', limit)
    logging.shutdown()
    os._exit(EXIT_HANG)  # the main thread is stuck: only a hard exit ends the process

  def _reason(self) -> str | None:
    """Why to save and exit now (a peer exited, or no beat for the limit), or None; never before the
    first beat."""
    if self._last is None:
      return None
    if self._peer_exited and os.path.exists(self._peer_exited):
      with open(self._peer_exited, encoding='utf-8') as f:
        said = f.read().strip() or 'A peer process of this job exited'
      return f'{said}: saving what this process holds now, not after the watchdog\'s timeout.'
    limit = max(60.0, PAUSED_SLACK * self.timeout_s) if self._paused else self.timeout_s
    if self.timeout_s > 0 and time.monotonic() - self._last >= limit:
      return f'No training progress for {limit:.0f} s: treating it as a hang.'
    return None


class FaultInjector:
  """Fires the configured fault once, at its step, in a run that started from scratch."""

  def __init__(self, cfg: FaultConfig, start_step: int):
    self.cfg = cfg
    here = cfg.process in (-1, jax.process_index())
    self._armed = cfg.kind != 'none' and start_step == 0 and here

  def _due(self, kind: str, step: int) -> bool:
    return self._armed and self.cfg.kind == kind and self.cfg.step <= step < self.cfg.step + self.cfg.count

  def during_step(self, step: int) -> None:
    """Called while step `step`'s gradients are being computed."""
    if self._due('exception', step):
      self._armed = False
      raise FaultInjected(f'injected fault: a runtime error in step {step}')
    if self._due('sigterm', step):
      self._armed = False
      os.kill(os.getpid(), signal.SIGTERM)
    if self._due('sigkill', step):
      logging.warning('injected fault: SIGKILL in step %d', step)
      os.kill(os.getpid(), signal.SIGKILL)
    if self._due('hang', step):
      logging.warning('injected fault: step %d hangs', step)
      threading.Event().wait()  # forever, like a collective whose peer died

  def poison(self, step: int, grads):
    """NaN gradients for an injected 'nonfinite' fault (once per step of the fault)."""
    if not self._due('nonfinite', step):
      return grads
    if step == self.cfg.step + self.cfg.count - 1:
      self._armed = False  # transient: a replay after the rollback computes clean gradients
    logging.warning('injected fault: NaN gradients in step %d', step)
    return jax.tree.map(lambda g: g * jnp.nan, grads)

  def kill_in_save(self, step: int) -> bool:
    return self._due('kill_in_save', step)
