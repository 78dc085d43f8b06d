"""The engine end to end: greedy output equals a naive full-recompute greedy decode of the same model.

Covered: mixed prompt lengths, page sizes 4 and 16, budgets small enough to chunk prompts, a pool
small enough to force preemption, prefix sharing, tensor parallelism 1/2/4 on the fake CPU mesh,
stale pages (isolation), aborts (no leaks), stop tokens/strings and seeded sampling.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import presets, transformer
from models.layers import OutMajor
from parallelism.mesh import MeshConfig, make_mesh
from serve.engine import Engine, EngineConfig
from serve.engine_config import out_major
from serve.sampling import SamplingParams

CFG = presets.preset('tiny', num_layers=2, d_model=64, vocab_size=256, num_heads=8, num_kv_heads=4,
                     head_dim=16, mlp_dim=128, dtype='float32')
NAIVE_LEN = 64  # the naive decode runs every sequence right-padded to this length (causal: no effect)

# Page size 4, prompts chunked by a 16-token budget, and a pool of 15 usable pages (60 tokens) for
# 6 requests needing up to 11 pages each: preemption is certain.
SMALL_POOL = EngineConfig(num_pages=16, page_size=4, max_seqs=4, max_pages_per_seq=12,
                          token_budget=16, min_bucket=8, attention='reference')
# The default attention on CPU: the tiled path (serve/kernels/tiled.py); SMALL_POOL runs the reference.
BIG_PAGES = EngineConfig(num_pages=64, page_size=16, max_seqs=4, max_pages_per_seq=4,
                         token_budget=32, min_bucket=16, attention='auto')
# Tensor parallel engines compile one bucket only: compiles dominate this file's time.
ONE_BUCKET = dataclasses.replace(SMALL_POOL, min_bucket=16)


def random_params(cfg, seed=0):
  """Host-drawn weights: std 1/sqrt(fan in) matrices, norm scales near 1 (no per-shape compiles)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: transformer.Transformer(cfg, nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  fan_in = {'o_NHD': cfg.num_heads * cfg.head_dim, 'down_FD': cfg.mlp_dim}

  def draw(path, x):
    name = [k.key for k in path if isinstance(getattr(k, 'key', None), str)][-1]
    noise = rng.standard_normal(x.shape).astype(np.float32)
    if name == 'scale':
      return jnp.asarray(1 + 0.1 * noise)
    return jnp.asarray(noise / np.sqrt(fan_in.get(name, cfg.d_model)))

  return graphdef, jax.tree.map_with_path(draw, state)


GRAPHDEF, PARAMS = random_params(CFG)
# The Pallas kernels need a head dim of 64 (TPU lanes) and page sizes of 8 (float32 sublanes).
CFG_H64 = dataclasses.replace(CFG, num_heads=4, num_kv_heads=2, head_dim=64)
MODEL_CFGS = {'h16': CFG, 'h64': CFG_H64, 'mqa': dataclasses.replace(CFG, num_kv_heads=1)}
MODELS = {name: (GRAPHDEF, PARAMS) if name == 'h16' else random_params(cfg)
          for name, cfg in MODEL_CFGS.items()}


@functools.cache
def _dense(model):
  graphdef, _ = MODELS[model]
  return jax.jit(lambda params, ids: jnp.argmax(nnx.merge(graphdef, params)(ids), axis=-1))


def naive_greedy(prompt, max_tokens, stop_token_ids=(), model='h16'):
  """Full recompute each token: the whole sequence through the model, argmax at its last position."""
  return _naive_cached(tuple(prompt), max_tokens, tuple(stop_token_ids), model)


@functools.cache
def _naive_cached(prompt, max_tokens, stop_token_ids, model):
  seq, out = list(prompt), []
  while len(out) < max_tokens:
    padded = np.zeros((1, NAIVE_LEN), np.int32)
    padded[0, :len(seq)] = seq
    token = int(np.asarray(_dense(model)(MODELS[model][1], padded))[0, len(seq) - 1])
    seq.append(token)
    out.append(token)
    if token in stop_token_ids:
      break
  return out


def mixed_prompts(n=6, seed=0):
  rng = np.random.default_rng(seed)
  lengths = [3, 30, 9, 17, 1, 24][:n]
  prompts = [rng.integers(0, CFG.vocab_size, k).tolist() for k in lengths]
  max_tokens = [8, 12, 5, 10, 12, 7][:n]
  return prompts, max_tokens


def run_all(engine, prompts, max_tokens):
  return engine.generate(prompts, [SamplingParams(max_tokens=m) for m in max_tokens])


def assert_idle_and_clean(engine):
  alloc = engine.scheduler.allocator
  engine.scheduler.check()
  assert not engine.has_work
  assert alloc.num_used == 0 and alloc.num_free + alloc.num_cached == alloc.total


@pytest.fixture(scope='module')
def small_pool():
  return Engine(CFG, PARAMS, SMALL_POOL)


@pytest.fixture(scope='module')
def big_pages():
  return Engine(CFG, PARAMS, BIG_PAGES)


@pytest.mark.xdist_group('small_pool')
def test_greedy_matches_naive_with_chunking_and_preemption(small_pool):
  prompts, max_tokens = mixed_prompts()
  before = small_pool.stats['preemptions']
  got = run_all(small_pool, prompts, max_tokens)
  assert got == [naive_greedy(p, m) for p, m in zip(prompts, max_tokens)]
  assert small_pool.stats['preemptions'] > before, 'the pool should have forced a preemption'
  assert_idle_and_clean(small_pool)


@pytest.mark.xdist_group('big_pages')
def test_greedy_matches_naive_with_page_size_16(big_pages):
  prompts, max_tokens = mixed_prompts()
  got = run_all(big_pages, prompts, max_tokens)
  assert got == [naive_greedy(p, m) for p, m in zip(prompts, max_tokens)]
  assert_idle_and_clean(big_pages)


@pytest.mark.xdist_group('big_pages')
def test_prefix_sharing(big_pages):
  """Requests sharing a 40-token prefix reuse its 2 full pages: fewer tokens computed, same output."""
  rng = np.random.default_rng(5)
  prefix = rng.integers(0, CFG.vocab_size, 40).tolist()
  prompts = [prefix + rng.integers(0, CFG.vocab_size, k).tolist() for k in (3, 7, 1)]
  params = SamplingParams(max_tokens=6)
  tokens_before = big_pages.stats['tokens']
  big_pages.add_request('first', prompts[0], params)
  outputs = {}
  while big_pages.scheduler.output_ids('first') == ():  # its prompt pages get committed
    outputs.update((o.request_id, o) for o in big_pages.step())
  for i, prompt in enumerate(prompts[1:]):
    big_pages.add_request(f'shared{i}', prompt, params)
  while big_pages.has_work:
    outputs.update((o.request_id, o) for o in big_pages.step() if o.finished)
  computed = big_pages.stats['tokens'] - tokens_before
  # Each request computes its prompt and all but its last output token, less the shared pages.
  unshared = sum(len(p) + params.max_tokens - 1 for p in prompts)
  assert computed == unshared - 2 * 2 * BIG_PAGES.page_size, computed
  for rid, prompt in zip(('first', 'shared0', 'shared1'), prompts):
    assert list(outputs[rid].output_ids) == naive_greedy(prompt, 6), rid
  assert_idle_and_clean(big_pages)


@pytest.mark.parametrize('tp', [2, 4])
def test_tensor_parallel_matches_naive(tp):
  mesh = make_mesh(MeshConfig(ici=(1, 1, tp)), jax.devices()[:tp])
  # Out-major weights ('auto' picks them on CPU from width 768: engine_config.out_major) sharded.
  engine = Engine(CFG, PARAMS, dataclasses.replace(ONE_BUCKET, weight_layout='out_major'), mesh)
  assert engine.pages.k_LPGKH.sharding.spec[3] == 'tensor'
  layers = engine.params['layers']  # unrolled: each layer's weights apart (serve/programs.py: layout)
  q = (layers[0] if engine.unroll else layers)['attn']['q_DNH'].get_value()
  assert isinstance(q, OutMajor)  # [(L,) N, H, D] (models/layers.py)
  assert q.t.sharding.spec[q.t.ndim - 3] == 'tensor'  # the heads
  prompts, max_tokens = mixed_prompts()
  got = run_all(engine, prompts, max_tokens)
  assert got == [naive_greedy(p, m) for p, m in zip(prompts, max_tokens)]
  assert engine.stats['preemptions'] > 0
  assert_idle_and_clean(engine)


@pytest.mark.slow
@pytest.mark.parametrize('backend,tp', [('pallas_gpu', 1), ('pallas_tpu', 2)])
def test_pallas_backends_match_naive(backend, tp):
  """The Pallas kernels in interpret mode inside the engine; TP runs them under shard_map."""
  cfg = EngineConfig(num_pages=12, page_size=8, max_seqs=4, max_pages_per_seq=8, token_budget=16,
                     min_bucket=16, attention=backend)
  mesh = None if tp == 1 else make_mesh(MeshConfig(ici=(1, 1, tp)), jax.devices()[:tp])
  engine = Engine(CFG_H64, MODELS['h64'][1], cfg, mesh)
  prompts, max_tokens = mixed_prompts(3)
  got = run_all(engine, prompts, max_tokens)
  assert got == [naive_greedy(p, m, model='h64') for p, m in zip(prompts, max_tokens)]
  assert_idle_and_clean(engine)


@pytest.mark.xdist_group('small_pool')
def test_stale_pages_are_never_read(small_pool):
  """Every page of the small pool has held other requests' keys/values; a new request's output
  is still the naive one."""
  run_all(small_pool, *mixed_prompts(seed=1))
  k = np.asarray(small_pool.pages.k_LPGKH)
  written = set(np.flatnonzero(np.any(k != 0, axis=(0, 2, 3, 4)))) - {0}
  prompt = np.random.default_rng(9).integers(0, CFG.vocab_size, 21).tolist()
  small_pool.add_request('late', prompt, SamplingParams(max_tokens=9))
  small_pool.step()
  pages = small_pool.scheduler.block_table('late')
  assert pages and set(pages) <= written, (pages, written)
  outputs = {}
  while small_pool.has_work:
    outputs.update((o.request_id, o) for o in small_pool.step() if o.finished)
  assert list(outputs['late'].output_ids) == naive_greedy(prompt, 9)
  assert_idle_and_clean(small_pool)


@pytest.mark.xdist_group('small_pool')
def test_abort_mid_flight_leaks_nothing(small_pool):
  prompts, max_tokens = mixed_prompts()
  for i, (p, m) in enumerate(zip(prompts, max_tokens)):
    small_pool.add_request(f'r{i}', p, SamplingParams(max_tokens=m))
  finished = {}
  for _ in range(3):
    finished.update((o.request_id, o) for o in small_pool.step() if o.finished)
    small_pool.scheduler.check()
  running = set(small_pool.scheduler.running_ids())
  victims = ['r1'] if 'r1' in running else [sorted(running)[0]]
  victims += [f'r{i}' for i in range(6) if f'r{i}' not in running and f'r{i}' not in finished][:1]
  for rid in victims:
    out = small_pool.abort(rid)
    assert out.finished and out.finish_reason == 'abort'
    small_pool.scheduler.check()
  assert small_pool.abort('no-such-request') is None
  while small_pool.has_work:
    for o in small_pool.step():
      assert o.request_id not in victims
      if o.finished:
        finished[o.request_id] = o
    small_pool.scheduler.check()
  for i, (p, m) in enumerate(zip(prompts, max_tokens)):
    if f'r{i}' not in victims:
      assert list(finished[f'r{i}'].output_ids) == naive_greedy(p, m)
  assert_idle_and_clean(small_pool)


@pytest.mark.xdist_group('small_pool')
@pytest.mark.parametrize('async_scheduling,seed', [(True, 12), (False, 11)],
                         ids=['async', 'sync'])
def test_random_arrivals_and_aborts_keep_invariants(small_pool, async_scheduling, seed,
                                                    monkeypatch):
  """Arrivals at random steps and aborts at random moments (waiting, running, in flight) on a pool
  that forces preemption: invariants hold after every step, survivors' outputs are the naive ones,
  and nothing leaks; with steps planned ahead of their tokens (async) and without."""
  monkeypatch.setattr(small_pool, 'config',
                      dataclasses.replace(small_pool.config, async_scheduling=async_scheduling))
  rng = np.random.default_rng(seed)
  requests = {f's{i}': (rng.integers(0, CFG.vocab_size, int(rng.integers(1, 31))).tolist(),
                        int(rng.integers(1, 13))) for i in range(12)}
  arrivals = sorted(rng.integers(0, 8, len(requests)).tolist())
  preemptions = small_pool.stats['preemptions']
  pending = list(requests)
  aborted, finished, step = set(), {}, 0
  while pending or small_pool.has_work:
    while pending and arrivals[len(requests) - len(pending)] <= step:
      rid = pending.pop(0)
      small_pool.add_request(rid, requests[rid][0], SamplingParams(max_tokens=requests[rid][1]))
    live = [r for r in requests if r not in pending and r not in finished and r not in aborted]
    if live and rng.random() < 0.06:
      rid = str(rng.choice(live))
      assert small_pool.abort(rid).finish_reason == 'abort'
      aborted.add(rid)
    for o in small_pool.step():
      assert o.request_id not in aborted
      if o.finished:
        finished[o.request_id] = o.output_ids
    small_pool.scheduler.check()
    step += 1
  assert aborted and set(finished) | aborted == set(requests)
  assert small_pool.stats['preemptions'] > preemptions, 'the pool should have forced a preemption'
  for rid, out in finished.items():
    assert list(out) == naive_greedy(*requests[rid]), rid
  assert_idle_and_clean(small_pool)


@pytest.mark.xdist_group('big_pages')
def test_stop_tokens_and_stop_strings(big_pages):
  prompts, _ = mixed_prompts()
  full = [naive_greedy(p, 10) for p in prompts[:2]]
  stop_token = full[0][3]
  cut = full[0][:full[0].index(stop_token) + 1]
  stats = dict(big_pages.stats)
  got = big_pages.generate(prompts[:1], SamplingParams(max_tokens=10, stop_token_ids=(stop_token,)))
  assert got == [cut]
  # A stop token is only seen a step late: planned ahead, every step after the first overlapped
  # the one before, and the request computed one token past its stop token, discarded.
  steps = big_pages.stats['steps'] - stats['steps']
  assert big_pages.stats['overlapped_steps'] - stats['overlapped_steps'] == steps - 1
  assert steps == 1 + len(cut), (steps, cut)  # the prefill, then the decodes of cut's tokens
  engine = big_pages
  engine.detokenize = lambda ids: ' '.join(f'<{t}>' for t in ids)
  try:
    stop = f'<{full[1][4]}>'
    stats = dict(engine.stats)
    got = engine.generate(prompts[1:2], SamplingParams(max_tokens=10, stop=(stop,)))
    assert got == [full[1][:full[1].index(full[1][4]) + 1]]
    # Stop strings are checked on the host while the next step runs, overlapped or not: one
    # token past the stop is computed and discarded, as for a stop token.
    steps = engine.stats['steps'] - stats['steps']
    assert engine.stats['overlapped_steps'] - stats['overlapped_steps'] == steps - 1
    assert steps == 1 + len(got[0])
  finally:
    engine.detokenize = None
  with pytest.raises(ValueError, match='detokenize'):
    engine.add_request('x', [1, 2], SamplingParams(stop=('a',)))
  assert_idle_and_clean(big_pages)


@pytest.mark.xdist_group('big_pages')
def test_seeded_sampling_does_not_depend_on_the_batch(big_pages):
  prompts, _ = mixed_prompts()
  params = SamplingParams(max_tokens=8, temperature=0.9, top_k=40, top_p=0.95, seed=1234)
  alone = big_pages.generate([prompts[2]], params)[0]
  crowd = big_pages.generate(prompts, [SamplingParams(max_tokens=8, temperature=1.0, seed=s)
                                       for s in range(6)][:2] + [params] +
                             [SamplingParams(max_tokens=5)] * 3)
  assert crowd[2] == alone
  assert alone != naive_greedy(prompts[2], 8)  # it did sample
  assert_idle_and_clean(big_pages)


def test_unrolled_tiled_engine_matches_naive():
  """Layers unrolled over the stacked params (the accelerators' default) with the tiled attention,
  on the small pool's chunking and preemption: the naive outputs."""
  cfg = dataclasses.replace(SMALL_POOL, layer_loop='unroll', attention='tiled', min_bucket=16)
  engine = Engine(CFG, PARAMS, cfg)
  prompts, max_tokens = mixed_prompts()
  assert run_all(engine, prompts, max_tokens) == [naive_greedy(p, m)
                                                  for p, m in zip(prompts, max_tokens)]
  assert engine.stats['preemptions'] > 0 and engine.stats['overlapped_steps'] > 0
  assert_idle_and_clean(engine)


@pytest.mark.parametrize('layer_loop', ['scan', 'unroll'])
@pytest.mark.parametrize('model', ['h16', 'mqa'])
def test_steps_update_the_pools_in_place(model, layer_loop):
  """Buckets from 1 (the default min_bucket), GQA and MQA (one kv head): greedy outputs equal the
  naive decode, and no step copies a page pool: XLA once copied them whole around a one-token
  step's write (a one-index scatter it rewrote) and, for MQA, around every write and attention
  (a size-1 kv-head axis laid out otherwise in a reshape): batch-1 decode of `small` 2.5x slower."""
  cfg = dataclasses.replace(BIG_PAGES, token_budget=16, min_bucket=EngineConfig().min_bucket,
                            layer_loop=layer_loop)
  assert cfg.buckets() == (1, 2, 4, 8, 16)
  engine = Engine(MODEL_CFGS[model], MODELS[model][1], cfg)
  prompts, max_tokens = mixed_prompts()
  assert run_all(engine, prompts, max_tokens) == [naive_greedy(p, m, model=model)
                                                  for p, m in zip(prompts, max_tokens)]
  L, P, G, K, H = engine.pages.k_LPGKH.shape
  pool = '|'.join(','.join(map(str, s)) for s in ((L, P, G, K, H), (L * P, G, K, H),
                                                   (L * P * G, K, H), (P, G, K, H), (P * G, K, H)))
  for T, step in engine._steps.items():  # pylint: disable=protected-access
    ops = re.findall(rf'%([\w.-]+) = f32\[(?:{pool})\]\{{[\d,]+\}} (copy|fusion)\(', step.as_text())
    copies = [name for name, _ in ops if 'scatter' not in name]
    assert not copies, f'bucket {T}: ops copying a page pool: {copies}'
  assert_idle_and_clean(engine)


def test_config_buckets_and_errors():
  assert [out_major('auto', p, w) for p, w in (('cpu', 256), ('cpu', 768), ('gpu', 4096))] == [False, True, False]
  assert out_major('out_major', 'cpu', 256) and not out_major('model', 'cpu', 4096)
  assert SMALL_POOL.buckets() == (8, 16)
  assert EngineConfig(token_budget=48, min_bucket=8, max_seqs=4).buckets() == (8, 16, 32, 48)
  with pytest.raises(ValueError, match='max_seqs'):
    EngineConfig(max_seqs=64, token_budget=32)
  with pytest.raises(ValueError, match='page_size'):
    EngineConfig(page_size=0)
  with pytest.raises(ValueError, match=r"layer_loop='unrolled'; use one of \('auto', 'scan'"):
    EngineConfig(layer_loop='unrolled')


@pytest.mark.xdist_group('big_pages')
def test_request_errors(big_pages):
  with pytest.raises(ValueError, match='max_pages_per_seq'):
    big_pages.add_request('long', [1] * 60, SamplingParams(max_tokens=10))
  with pytest.raises(ValueError, match='token ids'):
    big_pages.add_request('bad', [CFG.vocab_size], SamplingParams())
  with pytest.raises(ValueError, match='params do not match'):
    Engine(presets.preset('tiny', num_layers=1, d_model=64, vocab_size=256, num_heads=8,
                          num_kv_heads=4, head_dim=16, mlp_dim=128), PARAMS, BIG_PAGES)
  assert_idle_and_clean(big_pages)
