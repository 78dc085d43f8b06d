"""`stoker train --supervise`: rerun the training process after a just-in-time exit.

The child is the same `stoker train` command without --supervise. It is restarted after the exit
codes of train/faults.py that promise a resumable checkpoint (preempted, step failed, hang) and
after death by a signal (SIGKILL, an OOM kill, a runtime's abort: the newest whole checkpoint is
used, in a multi-process job the survivors' emergency save if they lived to write one), up to
`max_restarts` times. Success, bad input (2) and persistent non-finite losses (83) end it: a
restart would not change them. A SIGTERM/SIGINT to the supervisor is passed on to the child, and
the child's exit ends the supervisor.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence

# Duplicated from train/faults.py so that the supervisor never imports JAX.
_RESTARTABLE = (80, 81, 82)


def run_child(argv: Sequence[str], on_signal: Callable[[], None] = lambda: None) -> int:
  """Runs this program (sys.argv[0]) with `argv`, passing SIGTERM/SIGINT on to it."""
  child = subprocess.Popen([sys.executable, sys.argv[0], *argv])

  def forward(signum, frame):
    del frame
    on_signal()
    child.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    return child.wait()
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


def supervise(run: Callable[[Callable[[], None]], int], max_restarts: int) -> int:
  """Calls `run(on_signal)` (a child process, or a local multi-process job) until it succeeds or
  a restart would not help; `run` calls on_signal when it passes a signal on, which ends the
  supervision. Returns the last exit code (negative: killed by that signal)."""
  restarts = 0
  stopping = False

  def on_signal():
    nonlocal stopping
    stopping = True

  while True:
    started = time.monotonic()
    rc = run(on_signal)
    resumable = rc in _RESTARTABLE or rc < 0
    if rc == 0 or stopping or not resumable:
      return rc
    if restarts >= max_restarts:
      logging.error('Training exited with %d after %d restarts; giving up.', rc, restarts)
      return rc
    restarts += 1
    how = f'signal {signal.Signals(-rc).name}' if rc < 0 else f'exit code {rc}'
    logging.warning('Training ended by %s after %.0f s; restart %d of %d.', how,
                    time.monotonic() - started, restarts, max_restarts)


def without_supervision(argv: Sequence[str]) -> list[str]:
  """The command line without --supervise and --max_restarts: what the supervised child runs."""
  child, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a == '--max_restarts':
      skip = True
    elif a != '--supervise' and not a.startswith('--max_restarts='):
      child.append(a)
  return child


def supervise_train(argv: Sequence[str], max_restarts: int) -> int:
  """`stoker train --supervise`: the same command, unsupervised, in a child process."""
  child = without_supervision(argv)
  return supervise(lambda on_signal: run_child(child, on_signal), max_restarts)


def launch(command: Sequence[str], processes: int, devices_per_process: int, grace_s: float,
           supervised: bool = False, max_restarts: int = 3) -> int:
  """`stoker launch`: `command` (stoker's arguments, after an optional `--` and `stoker`) as a
  local multi-process job (parallelism/launch.py), restarted like a supervised child if asked."""
  from parallelism.launch import run_local  # pylint: disable=g-import-not-at-top
  command = list(command[1:] if command[:1] == ['--'] else command)
  if command[:1] == ['stoker']:
    command = command[1:]
  if not command:
    raise ValueError('stoker launch needs the command to run after --, e.g. '
                     '`stoker launch --local-processes 2 -- train --gin_file ... --workdir ...`.')

  def run(on_signal):
    return run_local(command, processes, devices_per_process, grace_s, on_signal)

  return supervise(run, max_restarts) if supervised else run(lambda: None)
