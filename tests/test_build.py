"""BUILD.bazel is true to the tree, checked without Bazel (.ci/bazel_check runs Bazel itself where it is installed).

Every module of a package and every top-level module is in the srcs of its package's py_library, every
tests/**/test_*.py has exactly one py_test, every other file under tests/ is in a target, every file and label a
target names exists, and every first-party import of a target's files is satisfied by its deps, which follow the
layering of DESIGN.md. BUILD.bazel is Starlark, which is Python syntax: it is exec'd with stub rules that record
the targets.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD_FILE = 'BUILD.bazel'
TESTS_DIR = 'tests'
TEST_HELPERS = 'tests'  # the py_library of conftest.py and test helpers; every py_test depends on it.

# DESIGN.md, "Layering": a library depends only on libraries of a lower layer, so train and serve never on each other.
LAYERS = {'storage': 0, 'models': 1, 'data': 1, 'parallelism': 2, 'train': 3, 'serve': 3, 'configs': 4, 'deploy': 5,
          'rl': 5, 'cli': 6}

_SKIP_DIRS = {'__pycache__', 'build', 'dist', 'node_modules', 'runs'}


@dataclasses.dataclass(frozen=True)
class Target:
  kind: str
  name: str
  srcs: tuple[str, ...] = ()
  data: tuple[str, ...] = ()
  deps: tuple[str, ...] = ()
  main: str | None = None

  def __str__(self):
    return f'{self.kind}(name = {self.name!r})'


_STARLARK_BUILTINS = {f.__name__: f for f in (
    all, any, bool, dict, enumerate, getattr, hasattr, int, len, list, max, min, range, reversed, sorted, str,
    tuple, type, zip)}


class _BuildScope(dict):
  """The scope BUILD.bazel is exec'd in: the rules used there record Targets; any other rule is recorded by kind."""

  def __init__(self):
    super().__init__()
    self.targets: list[Target] = []
    self.update(glob=_glob, load=lambda *args, **kwargs: None, package=lambda **kwargs: None,
                exports_files=lambda *args, **kwargs: None, select=lambda conditions, **kwargs: [])

  def __missing__(self, name):
    if name in _STARLARK_BUILTINS:
      return _STARLARK_BUILTINS[name]
    if name.startswith('_') or not name.islower():
      raise KeyError(name)
    return lambda **kwargs: self._record(name, **kwargs)

  def _record(self, kind, name, srcs=(), data=(), deps=(), main=None, **unused):
    self.targets.append(Target(kind, name, tuple(srcs), tuple(data), tuple(deps), main))


def _glob(include, exclude=(), **unused):
  found = {p for pattern in include for p in ROOT.glob(pattern) if p.is_file()}
  found -= {p for pattern in exclude for p in ROOT.glob(pattern)}
  return sorted(p.relative_to(ROOT).as_posix() for p in found)


@functools.cache
def _targets() -> tuple[Target, ...]:
  path = ROOT / BUILD_FILE
  scope = _BuildScope()
  # A dict subclass as locals lets unknown names (other rules) resolve through __missing__.
  exec(compile(path.read_text(), str(path), 'exec'), {'__builtins__': {}}, scope)  # pylint: disable=exec-used
  return tuple(scope.targets)


def _py_files(directory: str) -> list[str]:
  out = []
  for root, dirs, names in os.walk(ROOT / directory):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith('.'))
    out += [(pathlib.Path(root) / n).relative_to(ROOT).as_posix() for n in sorted(names) if n.endswith('.py')]
  return out


def _packages() -> list[str]:
  """Top-level import packages (directories with an __init__.py), tests excluded."""
  return sorted(p.name for p in ROOT.iterdir()
                if p.is_dir() and (p / '__init__.py').is_file() and p.name != TESTS_DIR
                and not p.name.startswith(('.', 'bazel-')))


def _top_level_modules() -> list[str]:
  return sorted(p.name for p in ROOT.glob('*.py'))


def _label_name(label: str) -> str | None:
  """The target name of a label in this package (':x', '//:x'), else None (a file, or another repository)."""
  if label.startswith(':'):
    return label[1:]
  if label.startswith('//:'):
    return label[3:]
  return None


def _owners(targets, path):
  return [t for t in targets if path in t.srcs]


def test_build_file_parses_and_names_are_unique():
  names = [t.name for t in _targets()]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  assert not duplicates, f'{BUILD_FILE}: target names used more than once: {duplicates}'


def test_every_package_has_a_library_holding_its_modules():
  targets = _targets()
  libraries = {t.name: t for t in targets if t.kind == 'py_library'}
  problems = []
  for package in _packages():
    if package not in libraries:
      problems.append(f'package {package}/ has no py_library: add py_library(name = {package!r}, srcs = [...]) '
                      f'to {BUILD_FILE}, with deps allowed by DESIGN.md\'s layering')
      continue
    for path in _py_files(package):
      if path not in libraries[package].srcs:
        problems.append(f'{path} is in no py_library: add it to srcs of py_library(name = {package!r}) in {BUILD_FILE}')
    for path in libraries[package].srcs:
      if not path.startswith(package + '/'):
        problems.append(f'py_library(name = {package!r}) lists {path}, which is not in {package}/: move it to the '
                        f'py_library of its own package')
  for module in _top_level_modules():
    name = module[:-len('.py')]
    if not any(module in t.srcs for t in targets if t.kind == 'py_library'):
      problems.append(f'{module} is in no py_library: add py_library(name = {name!r}, srcs = [{module!r}]) '
                      f'to {BUILD_FILE}')
  assert not problems, '\n'.join(problems)


def test_every_test_file_has_exactly_one_py_test():
  targets = _targets()
  py_tests = [t for t in targets if t.kind == 'py_test']
  problems = []
  for path in _py_files(TESTS_DIR):
    if not pathlib.PurePosixPath(path).name.startswith('test_'):
      continue
    name = path[:-len('.py')]
    owners = [t for t in py_tests if path in t.srcs]
    if not owners:
      deps = ', '.join(f'":{d}"' for d in sorted(_needed_deps(targets, path) | {TEST_HELPERS}))
      problems.append(f'{path} has no py_test: add py_test(name = {name!r}, srcs = [{path!r}], '
                      f'tags = PY_TEST_TAGS, deps = [{deps}]) to {BUILD_FILE}')
    elif len(owners) > 1:
      problems.append(f'{path} is in {len(owners)} py_tests ({", ".join(map(str, owners))}); keep only '
                      f'py_test(name = {name!r})')
    elif owners[0].name != name:
      problems.append(f'{owners[0]} runs {path}: rename it to {name!r}, so that the file is its main')
  for t in py_tests:
    tests_here = [s for s in t.srcs if pathlib.PurePosixPath(s).name.startswith('test_')]
    if len(tests_here) != 1:
      problems.append(f'{t} has {len(tests_here)} test files in srcs ({tests_here}); give each its own py_test')
  assert not problems, '\n'.join(problems)


def test_every_other_file_under_tests_is_in_a_target():
  targets = _targets()
  missing = [path for path in _py_files(TESTS_DIR)
             if not pathlib.PurePosixPath(path).name.startswith('test_') and not _owners(targets, path)]
  assert not missing, '\n'.join(
      f'{path} is in no target: add it to srcs of py_library(name = {TEST_HELPERS!r}) in {BUILD_FILE}'
      for path in missing)


def test_every_file_and_label_a_target_names_exists():
  targets = _targets()
  names = {t.name for t in targets}
  problems = []
  for t in targets:
    for path in t.srcs + t.data + ((t.main,) if t.main else ()):
      name = _label_name(path)
      if name is not None:
        if name not in names:
          problems.append(f'{t} names {path}, which is no target in {BUILD_FILE}')
      elif not path.startswith('@') and not (ROOT / path).is_file():
        problems.append(f'{t} names {path}, which does not exist: remove it from {BUILD_FILE} or add the file')
    for dep in t.deps:
      name = _label_name(dep)
      if name is None:
        problems.append(f'{t} has dep {dep!r}: deps are targets of {BUILD_FILE}, written ":name"')
      elif name not in names:
        problems.append(f'{t} has dep {dep!r}, which is no target in {BUILD_FILE}')
  assert not problems, '\n'.join(problems)


def _first_party_imports(path: str, first_party: set[str]):
  """(line, module) for each import in `path` of a first-party module, resolved to the longest existing module."""
  tree = ast.parse((ROOT / path).read_text(), path)
  parts = path[:-len('.py')].split('/')
  package = parts[:-1]  # a module's package; for __init__.py that is its own directory
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      candidates = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(package[:len(package) - node.level + 1] + ([base] if base else []))
      candidates = [f'{base}.{alias.name}' if base else alias.name for alias in node.names]
    else:
      continue
    for module in candidates:
      if module.split('.')[0] not in first_party:
        continue
      resolved = _module_file(module)
      if resolved:
        yield node.lineno, module, resolved


def _module_file(module: str) -> str | None:
  parts = module.split('.')
  for n in range(len(parts), 0, -1):
    stem = '/'.join(parts[:n])
    for candidate in (f'{stem}.py', f'{stem}/__init__.py'):
      if (ROOT / candidate).is_file():
        return candidate
  return None


def _first_party() -> set[str]:
  return set(_packages()) | {m[:-len('.py')] for m in _top_level_modules()} | {TESTS_DIR}


def _needed_deps(targets, path: str) -> set[str]:
  """Names of the libraries whose files `path` imports."""
  needed = set()
  for _, _, resolved in _first_party_imports(path, _first_party()):
    owners = [o for o in _owners(targets, resolved) if o.kind == 'py_library']
    needed |= {o.name for o in owners[:1]}
  return needed


def test_first_party_imports_are_in_deps():
  targets = _targets()
  first_party = _first_party()
  problems = []
  for t in targets:
    deps = {_label_name(d) for d in t.deps}
    for path in t.srcs:
      if not path.endswith('.py') or not (ROOT / path).is_file():
        continue  # a missing file is reported by test_every_file_and_label_a_target_names_exists
      if any(o.name in deps for o in _owners(targets, path)):
        continue  # also in a dep's srcs (py_binary over its library): checked there
      reported = set()
      for line, _, resolved in _first_party_imports(path, first_party):
        owners = _owners(targets, resolved)
        if not owners or t in owners or deps & {o.name for o in owners}:
          continue  # a file in no target is reported by the coverage tests
        owner = next((o for o in owners if o.kind == 'py_library'), owners[0])
        if owner.name not in reported:
          reported.add(owner.name)
          problems.append(f'{path}:{line} imports {resolved}, which is in {owner}: add ":{owner.name}" to deps of '
                          f'{t} in {BUILD_FILE}')
  assert not problems, '\n'.join(problems)


def test_every_py_test_depends_on_the_test_helpers():
  missing = [t for t in _targets() if t.kind == 'py_test' and f':{TEST_HELPERS}' not in t.deps
             and f'//:{TEST_HELPERS}' not in t.deps]
  assert not missing, '\n'.join(
      f'{t} lacks ":{TEST_HELPERS}" in deps (tests/conftest.py sets up JAX for every test): add it in {BUILD_FILE}'
      for t in missing)


def test_library_deps_follow_the_layering():
  problems = []
  for t in _targets():
    if t.kind != 'py_library' or t.name not in LAYERS:
      continue
    for dep in map(_label_name, t.deps):
      if dep in LAYERS and LAYERS[dep] >= LAYERS[t.name]:
        problems.append(f'{t} depends on ":{dep}", against DESIGN.md\'s layering (imports go down: '
                        f'models, data < parallelism < train, serve < configs < deploy < cli); move what both need lower')
  assert not problems, '\n'.join(problems)
