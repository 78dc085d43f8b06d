"""parallelism/logs.py: a quiet console and a detailed log file, for the routing function itself and
for a real `stoker train` (the training half of `stoker quickstart`, shrunk), counting its console
lines."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from parallelism import logs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def routed():
  yield
  logs.close()


def _own_record(level: int, message: str) -> logging.LogRecord:
  """A record as train/loop.py's `logging.info(...)` makes it."""
  return logging.LogRecord('root', level, os.path.join(REPO, 'train', 'loop.py'), 1, message, None, None)


def test_libraries_info_goes_to_the_file_only(tmp_path, capsys, routed):
  path = logs.setup(str(tmp_path / 'sub' / 'stoker.log'))
  assert path == str(tmp_path / 'sub' / 'stoker.log')
  library = logging.getLogger('absl')  # Orbax logs through absl; this file is no part of Stoker
  library.info('library detail')
  library.warning('library warning')
  logging.getLogger().handle(_own_record(logging.INFO, 'own progress'))
  console = capsys.readouterr().err
  assert 'library detail' not in console
  assert 'library warning' in console and 'own progress' in console
  with open(path) as f:
    written = f.read()
  for message in ('library detail', 'library warning', 'own progress'):
    assert message in written


def test_verbose_shows_everything_and_setup_replaces_its_handlers(tmp_path, capsys, routed):
  logs.setup(str(tmp_path / 'a.log'))
  logs.setup(None, verbose=True)
  logging.getLogger('jax._src.xla_bridge').info('backend probing')
  assert capsys.readouterr().err.count('backend probing') == 1  # one console handler, not two
  with open(tmp_path / 'a.log') as f:
    assert 'backend probing' not in f.read()  # the first call's file handler is gone


def test_a_basic_config_handler_installed_before_setup_is_replaced(capsys, routed):
  """absl calls logging.basicConfig() when a library logs through it before setup() (Orbax does at
  import): that stderr handler would print every line twice and the libraries' INFO lines too."""
  root = logging.getLogger()
  root.addHandler(logging.StreamHandler())  # what logging.basicConfig() adds (pytest's own stop it)
  logs.setup(None)
  logging.getLogger('jax._src.xla_bridge').info('backend probing')
  root.handle(_own_record(logging.INFO, 'own progress'))
  console = capsys.readouterr().err
  assert 'backend probing' not in console and console.count('own progress') == 1, console


def test_an_unwritable_log_file_is_reported_not_fatal(tmp_path, capsys, routed):
  (tmp_path / 'file').write_text('')
  assert logs.setup(str(tmp_path / 'file' / 'stoker.log')) is None
  assert 'Cannot write the log file' in capsys.readouterr().err


def test_each_process_has_its_own_file(monkeypatch):
  monkeypatch.delenv('STOKER_PROCESS_ID', raising=False)
  assert logs.process_log_file('/w') == '/w/stoker.log'
  monkeypatch.setenv('STOKER_PROCESS_ID', '3')
  assert logs.process_log_file('/w') == '/w/stoker.process-3.log'


def test_stoker_train_console_is_quiet_and_the_log_file_has_the_detail(tmp_path):
  params = ['model.num_layers=2', 'model.d_model=64', 'model.num_heads=4', 'model.num_kv_heads=2',
            'model.head_dim=16', 'model.mlp_dim=128', 'model.vocab_size=256', "data.source='synthetic'",
            'data.eval_every=0', 'data.eval_batches=0', 'train.steps=4', 'train.batch_size=8',
            'train.seq_len=32', 'train.log_every=2', 'checkpoint.every_steps=2']
  argv = [sys.executable, os.path.join(REPO, 'cli.py'), 'train', '--workdir', str(tmp_path)]
  for p in params:
    argv += ['--gin_param', p]
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  console = (result.stdout + result.stderr).splitlines()
  info = [line for line in result.stderr.splitlines() if ' INFO ' in line]
  # Stoker's own: where the logs go, the compile, the device-hours. No Orbax, JAX or absl line.
  assert len(info) == 3, info
  assert 'orbax' not in result.stderr.lower() and 'backend' not in result.stderr
  assert len(console) <= 8, console  # the 3 lines above, 2 logged steps, the summary (+ warnings)
  assert result.stdout.splitlines()[-1].startswith('Trained 4 steps')
  with open(tmp_path / 'stoker.log') as f:
    written = f.read()
  assert 'Saving checkpoint at step 2' in written and 'Compiled the train step' in written
