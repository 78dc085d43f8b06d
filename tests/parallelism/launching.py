"""Runs `stoker` commands (`stoker launch` jobs among them) as subprocesses of a test."""

import os
import signal
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def stoker(*args, timeout=480, env=None):
  """Runs `stoker args` in a session of its own, with `env` added to the environment; past
  `timeout` the whole session is killed, so no process of a stuck job outlives the test."""
  env = {**{k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS')},
         **(env or {})}
  proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'cli.py'), *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    raise
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
