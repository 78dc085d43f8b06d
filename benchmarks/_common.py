"""What every benchmark script shares. Imports nothing heavy: it runs before JAX starts."""

import os
import sys
import time


def set_host_devices(n: int) -> None:
  """The fake CPU device count is read once, when JAX starts: set it before importing jax."""
  if 'jax' in sys.modules:
    raise RuntimeError('jax was imported before --host_devices could be applied; run this file as '
                       'a script.')
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  os.environ['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={n}'])


def huge_pages() -> str:
  """Re-executes this script with glibc's malloc on transparent huge pages (Linux, glibc >= 2.35)
  unless GLIBC_TUNABLES already says; returns what the run has, for the report. XLA:CPU and torch
  allocate through malloc: with 4 KiB pages, the compression teacher's decode step (41 MB of
  weights streamed from memory) took 2.07-2.68 ms from one process to the next on this 2-core VM,
  with huge pages 1.93-2.01 ms (TLB misses). Call it first, as a script's entry point."""
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb' in tunables:
    return f'GLIBC_TUNABLES={tunables}'
  try:
    version = os.confstr('CS_GNU_LIBC_VERSION')
  except (AttributeError, ValueError, OSError):  # not POSIX, or a libc that does not say
    version = None
  if not sys.platform.startswith('linux') or not version or not version.startswith('glibc '):
    return 'huge pages: not available (not Linux with glibc)'
  if tuple(int(x) for x in version.split()[1].split('.')[:2]) < (2, 35):
    return f'huge pages: not available ({version} < 2.35)'
  os.environ['GLIBC_TUNABLES'] = ':'.join(filter(None, (tunables, 'glibc.malloc.hugetlb=1')))
  os.execv(sys.executable, [sys.executable, *sys.argv])


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


class Clock:
  """Wall time, and this process's CPU time over that wall time, per `cores` (1.0 = all busy)."""

  def __init__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()

  def stop(self, cores: int = 1) -> tuple[float, float]:
    wall = time.perf_counter() - self.wall
    return wall, (time.process_time() - self.cpu) / (wall * cores)


def cpu_name() -> str:
  """The CPU's model name (/proc/cpuinfo), else what platform knows."""
  import platform  # pylint: disable=g-import-not-at-top
  try:
    with open('/proc/cpuinfo') as f:
      return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()
