"""`stoker launch --local-processes N -- <stoker args>`: a multi-process job on this machine.

Starts N copies of the `stoker` command, each with its own fake CPU devices and the STOKER_*
variables of parallelism/distributed.py (coordinator on a free local port), for development and
tests of multi-process code. When one process ends with an error (or is killed) the others are
given `grace_s` to finish what they are doing (a just-in-time save), then SIGTERM, then SIGKILL:
no process is ever left behind. Unless it exited as all do together (a collective save first), the
others learn of it at once: the launcher creates the file named by their STOKER_PEER_EXITED, which
their training watchdog polls (train/faults.py), so a survivor stuck in a collective with the dead
process saves what it holds within a second, not after checkpoint.hang_timeout_s. Imports no JAX.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

# train/faults.py's exits that every process takes together, after a collective save (preempted, a
# step failed everywhere, non-finite losses): no peer is left waiting, none is told. Duplicated so
# that the launcher never imports JAX.
_TOGETHER = (80, 81, 83)


def add_arguments(p: argparse.ArgumentParser) -> None:
  """`stoker launch`'s flags."""
  p.add_argument('--local-processes', dest='local_processes', type=int, default=2)
  p.add_argument('--devices-per-process', dest='devices_per_process', type=int, default=4,
                 help='Fake CPU devices of each process (default 4).')
  p.add_argument('--grace_s', type=float, default=180.0,
                 help='After one process fails, how long the others may take to save and exit '
                      '(told at once, they write what they hold with no collective).')
  p.add_argument('--supervise', action='store_true',
                 help='Restart the whole job after a just-in-time exit or a kill.')
  p.add_argument('--max_restarts', type=int, default=3)
  p.add_argument('command_args', nargs=argparse.REMAINDER,
                 help='-- then the stoker command, e.g. -- train --gin_file ... --workdir ...')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_local(argv: Sequence[str], processes: int, devices_per_process: int,
              grace_s: float = 180.0, on_signal: Callable[[], None] = lambda: None) -> int:
  """Runs `stoker <argv>` as `processes` processes; returns 0 if all succeed, else the exit code
  of the first to fail (negative: killed by that signal)."""
  if processes < 1 or devices_per_process < 1:
    raise ValueError(f'need --local-processes >= 1 and --devices-per-process >= 1; got '
                     f'{processes} and {devices_per_process}.')
  coordinator = f'127.0.0.1:{free_port()}'
  tmp = tempfile.mkdtemp(prefix='stoker-launch-')
  peer_exited = os.path.join(tmp, 'peer-exited')
  children = []
  for i in range(processes):
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env.update(STOKER_COORDINATOR=coordinator, STOKER_NUM_PROCESSES=str(processes),
               STOKER_PROCESS_ID=str(i), JAX_PLATFORMS=env.get('JAX_PLATFORMS', 'cpu'),
               STOKER_PEER_EXITED=peer_exited)
    children.append(subprocess.Popen(
        [sys.executable, sys.argv[0], '--host_devices', str(devices_per_process), *argv], env=env))
  logging.info('Started %d processes (pids %s), coordinator %s.', processes,
               [c.pid for c in children], coordinator)

  def stop(signum, frame):
    del frame
    on_signal()
    for c in children:
      if c.poll() is None:
        c.send_signal(signum)

  previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    first_failure, deadline, failed = None, None, set()
    while True:
      codes = [c.poll() for c in children]  # every child each time, not until the first alive one
      for i, rc in enumerate(codes):
        if rc not in (None, 0) and i not in failed:
          failed.add(i)
          if first_failure is None:
            first_failure, deadline = rc, time.monotonic() + grace_s
            if rc not in _TOGETHER:  # the others' watchdogs poll it
              with open(peer_exited, 'w', encoding='utf-8') as f:
                f.write(f'Process {i} of this job exited with {rc}')
            logging.warning('Process %d exited with %d; the others have %.0f s to finish.', i, rc,
                            grace_s)
          else:
            logging.warning('Process %d exited with %d.', i, rc)
      if all(rc is not None for rc in codes):
        break
      if deadline is not None and time.monotonic() > deadline:
        _terminate(children)
        break
      time.sleep(0.1)
  finally:
    _terminate(children)
    shutil.rmtree(tmp, ignore_errors=True)
    for s, handler in previous.items():
      signal.signal(s, handler)
  codes = [c.returncode for c in children]
  return first_failure if first_failure is not None else next((r for r in codes if r), 0)


def _terminate(children, wait_s: float = 10.0) -> None:
  alive = [c for c in children if c.poll() is None]
  for c in alive:
    c.terminate()
  end = time.monotonic() + wait_s
  for c in alive:
    try:
      c.wait(max(0.0, end - time.monotonic()))
    except subprocess.TimeoutExpired:
      c.kill()
      c.wait()
