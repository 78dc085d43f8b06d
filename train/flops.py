"""Peak FLOP/s of the devices in use, for model FLOPs utilisation (MFU).

Accelerators: the published dense bf16 peak per chip, from the one device table
(parallelism/devices.py). CPU: no meaningful datasheet figure, so a
matmul probe measures the host once and the result is cached under ~/.cache/stoker.
"""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from parallelism import devices

def device_peak_flops(device: jax.Device) -> float | None:
  """Dense bf16 FLOP/s of one accelerator chip (parallelism/devices.py); None if not in the table."""
  known = devices.for_kind(device.device_kind)
  return None if known is None else known.peak_flops


def _cache_path() -> str:
  root = os.environ.get('XDG_CACHE_HOME', os.path.expanduser('~/.cache'))
  return os.path.join(root, 'stoker', 'cpu_peak_flops.json')


def measure_cpu_peak_flops(n: int = 1024, repeats: int = 7) -> float:
  """Best float32 matmul throughput of this host, all cores, in FLOP/s."""
  device = jax.devices('cpu')[0]
  a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32),
                     device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / min(times)


def cpu_peak_flops() -> float:
  """The host's probed peak, measured once per machine and cached."""
  key = f'{platform.node()}|{platform.processor() or platform.machine()}|{os.cpu_count()}'
  path = _cache_path()
  try:
    with open(path) as f:
      cached = json.load(f)
    if cached.get('key') == key:
      return float(cached['flops'])
  except (OSError, ValueError, KeyError):
    pass
  flops = measure_cpu_peak_flops()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump({'key': key, 'flops': flops}, f)
  os.replace(tmp, path)
  return flops


def total_peak_flops(chips) -> float:
  """Peak FLOP/s of all `chips` (jax Devices) together. Fake CPU devices share one host: its probed
  peak."""
  chips = list(chips)
  if chips[0].platform == 'cpu':
    return cpu_peak_flops() * len({d.process_index for d in chips})
  peaks = [device_peak_flops(d) for d in chips]
  if any(p is None for p in peaks):
    raise ValueError(f'No peak FLOP/s known for {chips[0].device_kind!r}; add it to '
                     'parallelism/devices.py DEVICES.')
  return float(sum(peaks))
