"""Multi-process start-up: `jax.distributed` initialised from the environment.

Where the job's processes learn who they are, in order of precedence:
  * STOKER_COORDINATOR (host:port of process 0), STOKER_NUM_PROCESSES and STOKER_PROCESS_ID; on
    Kubernetes (an indexed Job or a JobSet) the id may come from JOB_COMPLETION_INDEX instead
    (`stoker launch` and the manifests of `stoker k8s` set these);
  * SLURM (SLURM_JOB_ID with more than one task in SLURM_NTASKS): JAX reads the rest;
  * Cloud TPU with several hosts (TPU_WORKER_HOSTNAMES lists more than one): JAX reads the rest.
Nothing set means one process, and nothing is initialised. A half-set environment is an error
that names what is missing. Call `initialize` before anything touches a JAX device.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Mapping

EXPLICIT = ('STOKER_COORDINATOR', 'STOKER_NUM_PROCESSES', 'STOKER_PROCESS_ID')


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
  """How to join the job; coordinator/num_processes/process_id None: JAX detects them."""

  source: str  # 'explicit' | 'kubernetes' | 'slurm' | 'cloud_tpu'
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None


def _int(env: Mapping[str, str], name: str) -> int:
  try:
    return int(env[name])
  except ValueError:
    raise ValueError(f'{name}={env[name]!r} is not an integer.') from None


def from_env(env: Mapping[str, str] = os.environ) -> ProcessSpec | None:
  """The job this process belongs to according to `env`, or None for a single process."""
  given = [v for v in EXPLICIT if env.get(v)]
  pod_index = env.get('JOB_COMPLETION_INDEX')
  if given:
    needed = EXPLICIT if pod_index is None else EXPLICIT[:2]
    missing = [v for v in needed if not env.get(v)]
    if missing:
      raise ValueError(f'half-configured multi-process job: {", ".join(given)} set but '
                       f'{", ".join(missing)} missing. Set all of {", ".join(EXPLICIT)} (the id may '
                       'come from JOB_COMPLETION_INDEX on Kubernetes), or none for one process.')
    n = _int(env, 'STOKER_NUM_PROCESSES')
    source, pid = 'explicit', None
    if env.get('STOKER_PROCESS_ID'):
      pid = _int(env, 'STOKER_PROCESS_ID')
    else:
      source, pid = 'kubernetes', _int(env, 'JOB_COMPLETION_INDEX')
    if n < 1 or not 0 <= pid < n:
      raise ValueError(f'need STOKER_NUM_PROCESSES >= 1 and 0 <= process id < it; got {n} and {pid}.')
    if ':' not in env['STOKER_COORDINATOR']:
      raise ValueError(f"STOKER_COORDINATOR={env['STOKER_COORDINATOR']!r} must be host:port.")
    return ProcessSpec(source, env['STOKER_COORDINATOR'], n, pid)
  if env.get('SLURM_JOB_ID') and int(env.get('SLURM_NTASKS', '1') or 1) > 1:
    return ProcessSpec('slurm')
  if len([h for h in env.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1:
    return ProcessSpec('cloud_tpu')
  return None


_joined = False  # this process joined a multi-process job (initialize)


def initialize(spec: ProcessSpec | None, timeout_s: int = 300,
               heartbeat_timeout_s: int = 100) -> None:
  """Joins the job (no-op for None). On CPU, collectives between processes go over gloo."""
  global _joined
  if spec is None:
    return
  import jax  # pylint: disable=g-import-not-at-top  (callers set XLA flags first)
  _joined = True
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # only the CPU backend reads it
  jax.distributed.initialize(
      coordinator_address=spec.coordinator, num_processes=spec.num_processes,
      process_id=spec.process_id, initialization_timeout=timeout_s,
      heartbeat_timeout_seconds=heartbeat_timeout_s)
  logging.info('Joined a %d-process job as process %d (%s); %d devices in all, %d here.',
               jax.process_count(), jax.process_index(), spec.source, jax.device_count(),
               jax.local_device_count())


def finish(code: int) -> None:
  """Ends this process of a multi-process job whose command succeeded (code 0): every process
  meets at a barrier, then exits without the interpreter's teardown, in which gloo's threads now
  and then abort a finished run (SIGABRT, "exception not rethrown", seen in CI after the last
  checkpoint was whole), which the supervisor would take for a failure and restart a job that is
  done. A no-op outside a job or after a failure."""
  if not _joined or code != 0:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  multihost_utils.sync_global_devices('stoker: the command finished')
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)  # pylint: disable=protected-access
