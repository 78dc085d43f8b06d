"""The Dockerfile (docker is not run here): its instructions parse into the expected stages, build
arguments and entrypoint, and the shell step that lists the dependencies, run for real in sh for
each ACCELERATOR, yields pyproject.toml's pins plus that variant's extra (and refuses others)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _instructions() -> list[tuple[str, str]]:
  """(INSTRUCTION, arguments) in order: comments dropped, backslash continuations joined."""
  out, pending = [], ''
  for line in (ROOT / 'Dockerfile').read_text().splitlines():
    if not pending and (not line.strip() or line.lstrip().startswith('#')):
      continue
    if line.rstrip().endswith('\\'):
      pending += line.rstrip()[:-1]
      continue
    instruction, _, args = (pending + line).strip().partition(' ')
    out.append((instruction.upper(), args.strip()))
    pending = ''
  assert not pending, 'the Dockerfile ends inside a continued line'
  return out


def _stages() -> list[list[tuple[str, str]]]:
  stages = []
  for instruction, args in _instructions():
    if instruction == 'FROM':
      stages.append([])
    if stages:
      stages[-1].append((instruction, args))
  return stages


def _pyproject() -> dict:
  with open(ROOT / 'pyproject.toml', 'rb') as f:
    return tomllib.load(f)['project']


def test_stages_arguments_and_entrypoint():
  instructions = _instructions()
  assert instructions[0] == ('ARG', 'PYTHON_VERSION=3.11')
  stages = _stages()
  assert [s[0][1] for s in stages] == ['python:${PYTHON_VERSION}-slim AS build',
                                       'python:${PYTHON_VERSION}-slim AS runtime']
  build, runtime = stages
  for stage in stages:
    assert ('ARG', 'ACCELERATOR=cpu') in stage  # an ARG is scoped to its stage
  assert ('COPY', '--from=build /opt/stoker /opt/stoker') in runtime
  assert not any(i == 'COPY' and not a.startswith('--from') for i, a in runtime)  # no sources
  (entrypoint,) = [a for i, a in runtime if i == 'ENTRYPOINT']
  assert json.loads(entrypoint) == ['stoker']  # exec form: signals reach stoker itself
  assert [i for i, _ in runtime][-2:] == ['ENTRYPOINT', 'CMD']
  (install,) = [a for i, a in build if i == 'RUN' and '--no-deps .' in a]
  assert 'stoker --help' in install


def test_the_image_runs_as_an_unprivileged_user():
  _, runtime = _stages()
  users = [a for i, a in runtime if i == 'USER']
  assert users == ['10001:10001']  # numeric: Kubernetes' runAsNonRoot can verify it is not root
  names = [i for i, _ in runtime]
  assert names.index('USER') > max(k for k, i in enumerate(names) if i == 'RUN')  # nothing runs as root after
  (create,) = [a for i, a in runtime if i == 'RUN' and 'useradd' in a]
  assert '--uid 10001' in create and '--user-group' in create and '--create-home' in create
  # What stoker writes belongs to that user: the working directory and the compilation cache.
  (workdir,) = [a for i, a in runtime if i == 'WORKDIR']
  env = ' '.join(a for i, a in runtime if i == 'ENV')
  cache = re.search(r'JAX_COMPILATION_CACHE_DIR=(\S+)', env).group(1)
  owned = re.search(r'chown stoker:stoker (.+)$', create).group(1).split()
  assert workdir in owned and any(cache.startswith(d + '/') for d in owned)


def _requirements_step() -> str:
  (run,) = [a for i, a in _instructions() if i == 'RUN' and 'requirements.txt' in a]
  listing, sep, _ = run.partition('&& pip install -r requirements.txt')
  assert sep, run
  return listing


@pytest.fixture(scope='module')
def sandbox(tmp_path_factory):
  """A directory with pyproject.toml, and a PATH whose `python` is this interpreter."""
  d = tmp_path_factory.mktemp('docker')
  shutil.copy(ROOT / 'pyproject.toml', d / 'pyproject.toml')
  (d / 'bin').mkdir()
  os.symlink(sys.executable, d / 'bin' / 'python')
  return d


@pytest.mark.parametrize('accelerator, extra', [('cpu', None), ('tpu', 'tpu'), ('cuda', 'cuda')])
def test_each_variant_installs_its_extra(sandbox, accelerator, extra):
  env = {'PATH': f'{sandbox / "bin"}:/usr/bin:/bin', 'ACCELERATOR': accelerator}
  subprocess.run(['sh', '-c', _requirements_step()], cwd=sandbox, env=env, check=True)
  project = _pyproject()
  want = project['dependencies'] + (project['optional-dependencies'][extra] if extra else [])
  assert (sandbox / 'requirements.txt').read_text().splitlines() == want
  if extra:
    assert any(re.match(r'jax\[\w+\]==', r) for r in want)


def test_an_unknown_variant_is_refused(sandbox):
  env = {'PATH': f'{sandbox / "bin"}:/usr/bin:/bin', 'ACCELERATOR': 'rocm'}
  r = subprocess.run(['sh', '-c', _requirements_step()], cwd=sandbox, env=env, capture_output=True,
                     text=True)
  assert r.returncode != 0 and 'use cpu, tpu or cuda' in r.stderr


def test_dockerignore_keeps_history_and_outputs_out():
  ignored = {line.strip() for line in (ROOT / '.dockerignore').read_text().splitlines()
             if line.strip() and not line.startswith('#')}
  assert {'.git', 'runs', '**/__pycache__', '*.egg-info', 'bazel-*'} <= ignored
  # Everything the package needs stays in: no ignore rule names a package or pyproject.toml.
  packages = set(_pyproject_setuptools()['packages']) | {'pyproject.toml', 'cli.py', 'README.md'}
  assert not ignored & packages


def test_the_image_holds_every_package():
  # `pip install .` (not editable) installs only the packages pyproject.toml lists.
  found = sorted('.'.join(p.parent.relative_to(ROOT).parts) for p in ROOT.glob('*/**/__init__.py')
                 if p.parent.relative_to(ROOT).parts[0] != 'tests' and '.' not in p.parent.name
                 and not p.parent.relative_to(ROOT).parts[0].startswith(('build', 'bazel-')))
  assert sorted(_pyproject_setuptools()['packages']) == found


def _pyproject_setuptools() -> dict:
  with open(ROOT / 'pyproject.toml', 'rb') as f:
    return tomllib.load(f)['tool']['setuptools']
