"""What both Pallas kernel tests share: tolerances, named batches and their inputs, the closeness check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Tolerances, relative to the reference's largest magnitude. float32: an output element is a
# convex combination of at most S = 64 values, accumulated blockwise in another order: worst case
# ~S * 2^-24 = 4e-6 relative.
F32_TOL = 1e-5
# bfloat16 (2^-8 = 3.9e-3): probabilities are rounded to bf16 before p @ v and the output to bf16,
# against a float32 reference on the same bf16 inputs: a few bf16 ulps.
BF16_TOL = 2e-2

T, B, M = 24, 6, 4  # query tokens, sequence slots, pages per slot (max kv length 4 G)
UNUSED_PAGE = 10 ** 6  # table entries past a sequence's pages: out of range, so they must be ignored

EIGHT_DEVICES = pytest.mark.skipif(jax.device_count() < 8, reason='the sharded tests use 8 devices '
                                   '(tests/conftest.py fakes 8 on CPU; one accelerator has 1)')


def batches(G):
  """Named batches of (q_len, kv_len) per sequence in use; the rest of the B slots and T rows idle."""
  return {
      'decode': [(1, 1), (1, G), (1, G + 3), (1, 3 * G - 1), (1, 4 * G)],
      # A first prefill chunk, a decode, a later chunk, an idle sequence (q_len 0), a decode.
      'mixed': [(9, 9), (1, 2 * G + 5), (7, 3 * G - 2), (0, 5), (1, 1)],
      'full': [(5, 4 * G), (1, G - 1), (10, 10), (1, 7), (6, 2 * G), (1, 3)],  # every slot and row
  }


def make_inputs(seqs, N, K, H, G, dtype=jnp.float32, seed=0, T=T, B=B, M=M):
  """q, pools and metadata for `seqs`; pages are a random permutation of 1..P-1 (0 is the null page)."""
  rng = np.random.default_rng(seed)
  P = 1 + B * M
  q = rng.standard_normal((T, N, H), np.float32)
  k, v = rng.standard_normal((2, P, G, K, H), np.float32)
  kv_lens = np.zeros(B, np.int32)
  tables = np.full((B, M), UNUSED_PAGE, np.int32)
  cu = np.zeros(B + 1, np.int32)
  pages = iter(rng.permutation(np.arange(1, P)))
  for b, (q_len, kv_len) in enumerate(seqs):
    kv_lens[b] = kv_len
    tables[b, :-(-kv_len // G)] = [next(pages) for _ in range(-(-kv_len // G))]
    cu[b + 1] = cu[b] + q_len
  cu[len(seqs) + 1:] = cu[len(seqs)]
  assert cu[-1] <= T
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  return q, k, v, jnp.asarray(kv_lens), jnp.asarray(tables), jnp.asarray(cu), jnp.asarray(
      [len(seqs)], jnp.int32)


def assert_close(got, want, tol, what):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, (what, got.shape, want.shape)
  scale = max(1.0, float(np.max(np.abs(want))))
  err = float(np.max(np.abs(got - want)))
  assert err <= tol * scale, f'{what}: max error {err:.3g} > {tol} x {scale:.3g}'
