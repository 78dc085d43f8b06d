"""Every test sees 8 fake CPU devices; the flag must be set before JAX starts.

Compiled programs are shared through JAX's persistent compilation cache (also by the `stoker`
subprocesses tests start, which inherit the variable): many tests compile the same small steps.
"""

import os
import tempfile

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), f'stoker-tests-xla-{os.getuid()}'))

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_numpy_rank_promotion', 'raise')
