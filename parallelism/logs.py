"""Where a `stoker` process's logs go: a quiet console and a detailed log file.

The console (stderr) shows Stoker's own log lines (its packages log through the root logger) and
every library's warnings and errors; the log file, when there is one, holds everything from INFO
up, libraries' chatter included (Orbax's save and restore steps, JAX's backend probing, absl).
`verbose` puts the libraries' INFO lines on the console too. Progress and results are printed by
the commands themselves (stdout), not logged.

Each process of a multi-process job writes its own file (see `process_log_file`).
"""

from __future__ import annotations

import logging
import os
import sys

import storage

# Stoker's own code: records whose source file is in one of these directories (or cli.py).
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OWN = tuple(os.path.join(_ROOT, p) for p in (
    'cli.py', 'configs' + os.sep, 'data' + os.sep, 'deploy' + os.sep, 'models' + os.sep,
    'parallelism' + os.sep, 'rl' + os.sep, 'serve' + os.sep, 'train' + os.sep, 'benchmarks' + os.sep))
CONSOLE_FORMAT = '%(asctime)s %(levelname)s %(message)s'
FILE_FORMAT = '%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] %(message)s'

_installed: list[logging.Handler] = []  # the handlers setup() added, replaced by its next call


def is_own(record: logging.LogRecord) -> bool:
  """Whether `record` was logged by Stoker's code rather than a library's."""
  return os.path.abspath(record.pathname).startswith(_OWN)


def console_filter(record: logging.LogRecord) -> bool:
  """The quiet console: Stoker's own lines, and warnings and errors from anyone."""
  return record.levelno >= logging.WARNING or is_own(record)


class _Stderr(logging.StreamHandler):
  """A handler on whatever sys.stderr is at the time of each record (tests swap it, and close the
  streams they swapped in)."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value) -> None:
    del value  # always sys.stderr


def process_log_file(directory: str, name: str = 'stoker') -> str:
  """<directory>/<name>.log, or <name>.process-<i>.log in process i > 0 of a multi-process job
  (parallelism/distributed.py's STOKER_PROCESS_ID, known before JAX starts)."""
  process = os.environ.get('STOKER_PROCESS_ID', '0')
  directory = storage.local_mirror(directory)  # a bucket workdir: the log stays on this host (storage/)
  suffix = '' if process in ('', '0') else f'.process-{process}'
  return os.path.join(directory, f'{name}{suffix}.log')


def close() -> None:
  """Removes (and closes) the handlers setup() installed."""
  for handler in _installed:
    logging.getLogger().removeHandler(handler)
    handler.close()
  _installed.clear()


def setup(log_file: str | None = None, verbose: bool = False) -> str | None:
  """Routes this process's logging as the module docstring says; returns the log file's path, or
  None without one (then libraries' INFO lines are dropped unless `verbose`). A log file that
  cannot be opened is reported on the console and skipped. Calling it again replaces what the
  previous call installed (handlers added by others, such as pytest's, stay)."""
  close()
  root = logging.getLogger()
  for handler in list(root.handlers):
    # logging.basicConfig()'s stderr handler, which absl installs when a library logs through it
    # before this runs (Orbax does at import): it would repeat every console line, unfiltered.
    if type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.__stderr__):
      root.removeHandler(handler)
  console = _Stderr()
  console.setFormatter(logging.Formatter(CONSOLE_FORMAT, datefmt='%H:%M:%S'))
  if not verbose:
    console.addFilter(console_filter)
  _installed.append(console)
  path = error = None
  if log_file:
    try:
      os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
      handler = logging.FileHandler(log_file, mode='a', encoding='utf-8')
    except OSError as e:
      error = e
    else:
      handler.setFormatter(logging.Formatter(FILE_FORMAT))
      _installed.append(handler)
      path = os.path.abspath(log_file)
  for handler in _installed:
    root.addHandler(handler)
  if error is not None:
    logging.warning('Cannot write the log file %s (%s); libraries\' INFO lines go nowhere.', log_file, error)
  root.setLevel(logging.INFO)
  # absl (Orbax logs through it) sets its logger's level from its --verbosity flag once parsed;
  # the file should get its INFO lines either way.
  logging.getLogger('absl').setLevel(logging.INFO)
  if path:
    logging.info('Logs, libraries\' detail included: %s', path)
  return path
