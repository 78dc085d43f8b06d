"""Ragged paged attention: the Pallas kernels against the pure-JAX reference, on one device.

  python benchmarks/paged_attention.py                        # GPU: pallas_gpu vs reference, bf16
  python benchmarks/paged_attention.py --cases decode --runs 9 --num_seqs 128
  python benchmarks/paged_attention.py --num_seqs 4 --min_len 64 --max_len 256 --runs 2   # CPU smoke

Two batches of --num_seqs sequences with kv lengths drawn uniformly from [--min_len, --max_len]:
  decode  every sequence decodes one token (T = num_seqs);
  mixed   --chunks of them run a prefill chunk of --chunk_len tokens (their kv length includes it),
          the rest decode, all in one call (T = chunks * chunk_len + the decodes).
Pages are scattered randomly over the pool. Both backends are jitted on the default device and timed
up to block_until_ready: after a warm-up, --runs runs of --iters calls each, in alternating order;
medians are quoted, with the paired ratio (reference time / kernel time per run) and the kernel's
KV read bandwidth (bytes of the keys and values each sequence attends to, over the kernel's time).
The outputs are compared (max |kernel - reference| over max |reference|) as a sanity check.
Writes benchmarks/out/paged_attention.{json,png}. On a CPU the kernels run in interpret mode: only
the check means anything there. Absolute times are quoted for accelerators, with the device named.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from _common import log
from serve.kernels import reference

BACKENDS = {'gpu': 'pallas_gpu', 'tpu': 'pallas_tpu'}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--cases', default='decode,mixed', help='comma-separated: decode, mixed')
  p.add_argument('--kernel', default=None, help='pallas_gpu or pallas_tpu (default: by platform)')
  p.add_argument('--num_seqs', type=int, default=64)
  p.add_argument('--min_len', type=int, default=1024, help='shortest kv length')
  p.add_argument('--max_len', type=int, default=4096, help='longest kv length')
  p.add_argument('--chunks', type=int, default=4, help='prefill chunks in the mixed case')
  p.add_argument('--chunk_len', type=int, default=256, help='tokens per prefill chunk')
  p.add_argument('--heads', default='32,8,128', help='N,K,H: query heads, kv heads, head dim')
  p.add_argument('--page_size', type=int, default=16)
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--runs', type=int, default=7)
  p.add_argument('--iters', type=int, default=10, help='calls per timed run')
  p.add_argument('--block_sizes', default=None,
                 help='kernel BlockSizes fields, e.g. queries_per_block=8,pages_per_block=4')
  p.add_argument('--skip_reference', action='store_true', help='time the kernel alone')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out_dir', default=os.path.join(os.path.dirname(__file__), 'out'))
  args = p.parse_args(argv)
  for name in ('num_seqs', 'min_len', 'max_len', 'chunk_len', 'page_size', 'runs', 'iters'):
    if getattr(args, name) <= 0:
      p.error(f'--{name} must be positive, got {getattr(args, name)}.')
  if args.min_len > args.max_len or args.chunks > args.num_seqs or args.chunk_len > args.min_len:
    p.error('need --min_len <= --max_len, --chunks <= --num_seqs and --chunk_len <= --min_len.')
  return args



def make_batch(case: str, args, N: int, K: int, H: int, dtype):
  """(inputs tuple, kv bytes attended, T) for one case; pages are a random permutation of the pool."""
  rng = np.random.default_rng(args.seed)
  B, G = args.num_seqs, args.page_size
  kv_lens = rng.integers(args.min_len, args.max_len + 1, B).astype(np.int32)
  q_lens = np.ones(B, np.int32)
  if case == 'mixed':
    q_lens[:args.chunks] = args.chunk_len
  M = -(-args.max_len // G)
  pages_B = -(-kv_lens // G)
  P = 1 + int(pages_B.sum())
  perm = rng.permutation(np.arange(1, P)).astype(np.int32)
  tables = np.zeros((B, M), np.int32)
  starts = np.concatenate([[0], np.cumsum(pages_B)])
  for b in range(B):
    tables[b, :pages_B[b]] = perm[starts[b]:starts[b + 1]]
  cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
  T = int(cu[-1])
  key_q, key_k, key_v = jax.random.split(jax.random.key(args.seed), 3)
  q = jax.random.normal(key_q, (T, N, H), dtype)
  k = jax.random.normal(key_k, (P, G, K, H), dtype)
  v = jax.random.normal(key_v, (P, G, K, H), dtype)
  inputs = (q, k, v, jnp.asarray(kv_lens), jnp.asarray(tables), jnp.asarray(cu),
            jnp.asarray([B], jnp.int32))
  kv_bytes = int(kv_lens.sum()) * K * H * 2 * jnp.dtype(dtype).itemsize
  return inputs, kv_bytes, T


def time_calls(fn, inputs, iters: int) -> float:
  start = time.perf_counter()
  for _ in range(iters):
    out = fn(*inputs)
  out.block_until_ready()
  return (time.perf_counter() - start) / iters


def run_case(case: str, args, kernel_name: str) -> dict:
  kernel_mod = importlib.import_module(f'serve.kernels.{kernel_name}')
  N, K, H = (int(x) for x in args.heads.split(','))
  dtype = jnp.dtype(args.dtype)
  inputs, kv_bytes, T = make_batch(case, args, N, K, H, dtype)
  options = {}
  if args.block_sizes:
    fields = dict(kv.split('=') for kv in args.block_sizes.split(','))
    options['block_sizes'] = kernel_mod.BlockSizes(**{k: int(v) for k, v in fields.items()})
  fns = {'kernel': jax.jit(lambda *a: kernel_mod.ragged_paged_attention(*a, **options))}
  if not args.skip_reference:
    fns['reference'] = jax.jit(reference.ragged_paged_attention)
  outs, failed = {}, {}
  for name, fn in list(fns.items()):
    # The reference's gather may run out of memory: report it and time the rest.
    try:
      outs[name] = np.asarray(fn(*inputs).astype(jnp.float32))  # compile + warm-up
    except Exception as e:  # pylint: disable=broad-except
      failed[name] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
      log(f'{case}: {name} failed: {failed[name]}')
      del fns[name]
  times = {name: [] for name in fns}
  for r in range(args.runs):
    for name in (list(fns) if r % 2 == 0 else list(reversed(fns))):
      times[name].append(time_calls(fns[name], inputs, args.iters))
  row = dict(case=case, T=T, num_seqs=args.num_seqs, kv_tokens=kv_bytes // (K * H * 2 * dtype.itemsize),
             failed=failed, **{f'{name}_ms': 1e3 * statistics.median(t) for name, t in times.items()})
  if 'kernel' in times:
    row['kernel_kv_GBps'] = kv_bytes / statistics.median(times['kernel']) / 1e9
  if 'reference' in times and 'kernel' in times:
    row['paired_speedup'] = statistics.median(
        [r / k for r, k in zip(times['reference'], times['kernel'])])
  if 'reference' in outs and 'kernel' in outs:
    ref = outs['reference']
    row['max_rel_diff'] = float(np.abs(outs['kernel'] - ref).max() / max(1e-30, np.abs(ref).max()))
  return row


def main(argv=None) -> None:
  args = parse_args(argv)
  platform = jax.default_backend()
  kernel_name = args.kernel or BACKENDS.get(platform)
  if kernel_name is None:
    kernel_name = 'pallas_gpu'
    log('no GPU or TPU: the kernel runs in interpret mode; times mean nothing here.')
  device = jax.devices()[0].device_kind
  log(f'device: {device} ({platform}); kernel: {kernel_name}; jax {jax.__version__}')
  rows = [run_case(case, args, kernel_name) for case in args.cases.split(',')]
  print(f'{"case":8s} {"T":>6s} {"kv tokens":>10s} {"kernel ms":>10s} {"ref ms":>10s} '
        f'{"speedup":>8s} {"kernel GB/s":>12s} {"max rel diff":>13s}')
  for r in rows:
    print(f'{r["case"]:8s} {r["T"]:6d} {r["kv_tokens"]:10d} {r.get("kernel_ms", float("nan")):10.3f} '
          f'{r.get("reference_ms", float("nan")):10.3f} {r.get("paired_speedup", float("nan")):8.2f} '
          f'{r.get("kernel_kv_GBps", float("nan")):12.1f} {r.get("max_rel_diff", float("nan")):13.2e}')
  result = dict(device=device, platform=platform, kernel=kernel_name, jax=jax.__version__,
                args=vars(args), rows=rows)
  os.makedirs(args.out_dir, exist_ok=True)
  path = os.path.join(args.out_dir, 'paged_attention.json')
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)
  log(f'wrote {path}')
  plot(rows, device, kernel_name, os.path.join(args.out_dir, 'paged_attention.png'))


def plot(rows, device: str, kernel_name: str, path: str) -> None:
  try:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
  except ImportError:
    log('matplotlib is not installed: no PNG (pip install matplotlib==3.11.2).')
    return
  fig, ax = plt.subplots(figsize=(6, 3.5))
  x = np.arange(len(rows))
  for i, (name, label) in enumerate((('kernel_ms', kernel_name), ('reference_ms', 'reference'))):
    ax.bar(x + (i - 0.5) * 0.38, [r.get(name, 0.0) for r in rows], 0.38, label=label)
  ax.set_xticks(x, [f'{r["case"]} (T={r["T"]})' for r in rows])
  ax.set_ylabel('ms per call (median)')
  ax.set_title(f'ragged paged attention on {device}', fontsize=10)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  log(f'wrote {path}')


if __name__ == '__main__':
  main()
