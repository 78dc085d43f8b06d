"""JAX's persistent compilation cache for the `stoker` commands (as MaxText does): a restarted run
skips compilation. JAX_COMPILATION_CACHE_DIR overrides the place."""

from __future__ import annotations

import os

import jax


def use_compilation_cache() -> None:
  """Turns the cache on at ~/.cache/stoker/xla (after jax.distributed is initialised)."""
  if jax.process_count() > 1 and jax.default_backend() == 'cpu':
    # A CPU executable's gloo collectives belong to the process that compiled it: a process that
    # loads another's from the cache waits in collectives its peers never join.
    jax.config.update('jax_enable_compilation_cache', False)
    return
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir',
                      os.path.expanduser(os.path.join('~', '.cache', 'stoker', 'xla')))
