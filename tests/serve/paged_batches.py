"""Step batches for the paged forward in tests: whole sequences prefilled in one step."""

import numpy as np

from serve import forward

G, P, M, B = 4, 16, 6, 2  # page size, pages (null page included), pages per sequence, rows


def prefill_batch(seqs, T: int = 32) -> forward.StepBatch:
  """Whole sequences as one prefill step each, pages 1.. in order, in a [T]-token step of B rows."""
  tokens, positions = np.zeros(T, np.int32), np.zeros(T, np.int32)
  tables, kv_lens = np.zeros((B, M), np.int32), np.zeros(B, np.int32)
  cu, last = np.zeros(B + 1, np.int32), np.zeros(B, np.int32)
  t, page = 0, 1
  for b, ids in enumerate(seqs):
    n = len(ids)
    tokens[t:t + n], positions[t:t + n] = ids, np.arange(n)
    pages = -(-n // G)
    tables[b, :pages] = np.arange(page, page + pages)
    page += pages
    kv_lens[b], last[b] = n, t + n - 1
    t += n
    cu[b + 1] = t
  cu[len(seqs) + 1:] = t
  return forward.StepBatch(tokens, positions, tables, kv_lens, cu, np.array([len(seqs)], np.int32), last)
