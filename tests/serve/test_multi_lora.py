"""Multi-LoRA serving (serve/lora.py): one engine mixes the base and several adapters in its steps,
and each request's greedy output equals that of an engine whose params have only its adapter merged
(models/lora.merge); the prefix cache keys pages by adapter; the server selects adapters by `model`,
lists them, loads and unloads them (vLLM's routes) and refuses bad ones clearly.

One LoRA engine (3 slots, served from PEFT directories through serve/loader.py; a 4th adapter is
loaded over HTTP from a LoRA run's workdir) and one plain reference engine, compiled once for the
module; the server test then serves the same engine."""

import dataclasses
import os
import subprocess
import sys
import threading

import httpx2 as httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from flax import nnx

from models import lora, peft_files
from serve import loader, quant
from serve.engine import Engine
from serve.sampling import SamplingParams
from serve.scheduler import Scheduler, SchedulerConfig
from serve.server import BackgroundServer, ServerConfig, Service
from tests.serve.openapi_check import assert_declared
from tests.serve.server_fixtures import ENGINE, MODEL
from train import from_hf
from train.config import TrainConfig

pytestmark = pytest.mark.xdist_group('server')

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LORA_ENGINE = dataclasses.replace(ENGINE, max_loras=3, max_lora_rank=8)
RANKS = {'sql': 4, 'poem': 8, 'math': 2, 'extra': 8}  # 'extra' is loaded over HTTP: a 4th adapter
PROMPT = list(range(40, 60))  # 20 tokens: two full pages of 8, then 4 more


def random_adapters(cfg, seed: int, rank: int):
  """Adapters with random a and b (b is zero at init: here it is not, so outputs change)."""
  config = lora.LoRAConfig(rank=rank, alpha=2.0 * rank)
  abstract = nnx.state(nnx.eval_shape(lambda: presets_model(cfg)))
  adapters = lora.init_adapters(cfg, abstract, config, jax.random.key(seed))
  rng = np.random.default_rng(seed)
  flat = [(p, v.replace(jnp.asarray(0.3 * rng.standard_normal(v.shape), jnp.float32))
           if p[-1] == 'lora_b' else v) for p, v in nnx.to_flat_state(adapters)]
  return nnx.from_flat_state(flat), config


def presets_model(cfg):
  from models import transformer  # pylint: disable=import-outside-toplevel
  return transformer.Transformer(cfg, nnx.Rngs(0))


@pytest.fixture(scope='module')
def peft_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp('adapters')
  out = {}
  for seed, (name, rank) in enumerate(RANKS.items(), start=1):
    out[name] = str(root / name)
    peft_files.write(out[name], MODEL, *random_adapters(MODEL, seed, rank))
  other = dataclasses.replace(MODEL, d_model=32, mlp_dim=64)
  out['other_base'] = str(root / 'other_base')
  peft_files.write(out['other_base'], other, *random_adapters(other, 9, 4))
  out['too_big'] = str(root / 'too_big')
  peft_files.write(out['too_big'], MODEL, *random_adapters(MODEL, 10, 16))
  return out


@pytest.fixture(scope='module')
def lora_workdir(server_workdir, peft_dirs, tmp_path_factory):
  """A LoRA run's workdir (step 0, train/from_hf.from_peft) holding the 'extra' adapter."""
  workdir = str(tmp_path_factory.mktemp('lora_run') / 'run')
  from_hf.from_peft(peft_dirs['extra'], server_workdir, workdir, TrainConfig(model=MODEL, steps=8))
  return workdir


@pytest.fixture(scope='module')
def loaded(server_workdir, peft_dirs):
  return loader.load_checkpoint(server_workdir, LORA_ENGINE,
                                loras=[(n, peft_dirs[n]) for n in ('sql', 'poem', 'math')])


@pytest.fixture(scope='module')
def reference(loaded):
  """A plain engine (no slots, no prefix cache) whose params are swapped for each merged model."""
  return Engine(MODEL, loaded.engine.params, dataclasses.replace(ENGINE, prefix_caching=False))


def merged_greedy(reference, base, peft_dir, prompt, max_tokens):
  """Greedy tokens of the base with the adapter in `peft_dir` merged (None: the base itself)."""
  params = base
  if peft_dir is not None:
    adapters, config = peft_files.read(peft_dir, MODEL)
    params = lora.merge(MODEL, base, adapters, config)
  reference.update_params(params)
  return reference.generate([prompt], SamplingParams(max_tokens=max_tokens))[0]


def test_adapter_keys_part_the_prefix_cache():
  s = Scheduler(SchedulerConfig(num_pages=16, page_size=4, max_seqs=4, max_pages_per_seq=4,
                                token_budget=64))
  prompt = list(range(9))
  starts = []
  for i, adapter in enumerate([None, b'a', b'a', None, b'b']):
    s.add(f'r{i}', prompt, 1, adapter=adapter)
    plan = s.schedule()
    starts.append(plan.seqs[0].start_pos)
    s.update(plan, {f'r{i}': 0})
  # A request finds the two full pages of an earlier one of its own adapter (or of the base) only.
  assert starts == [0, 0, 8, 8, 0]
  s.check()


def test_admission_keeps_running_adapters_within_the_slots():
  s = Scheduler(SchedulerConfig(num_pages=32, page_size=4, max_seqs=4, max_pages_per_seq=4,
                                token_budget=64, max_adapters=2))
  for i, adapter in enumerate([b'a', None, b'b', b'a', b'c']):
    s.add(f'r{i}', [1, 2, 3], 4, adapter=adapter)
  assert [q.request_id for q in s.schedule().seqs] == ['r0', 'r1', 'r2', 'r3']  # 'c' waits


def test_mixed_batch_equals_each_merged_model(loaded, reference, peft_dirs):
  engine, base = loaded.engine, quant.model_layout(loaded.engine.params)  # OutMajor on CPU from width 768
  names = [None, 'sql', 'poem', 'math']
  mixes = []
  place = engine._place_adapters  # pylint: disable=protected-access

  def recording(plan):
    mixes.append({engine._requests[q.request_id].params.lora for q in plan.seqs})  # pylint: disable=protected-access
    place(plan)

  engine._place_adapters = recording  # pylint: disable=protected-access
  try:
    # The base first, so its pages are cached: adapters must not take them.
    assert engine.generate([PROMPT], SamplingParams(max_tokens=6)) is not None
    rounds = []
    for _ in range(2):  # the second round finds every request's pages under its own adapter
      before = engine.stats['tokens']
      rounds.append(engine.generate([PROMPT] * 4,
                                    [SamplingParams(max_tokens=6, lora=n) for n in names]))
      rounds[-1].append(engine.stats['tokens'] - before)
  finally:
    del engine._place_adapters  # pylint: disable=protected-access
  first, second = rounds
  assert first[:4] == second[:4]
  # Round 1 computes the 3 adapters' prompts whole and the base's last 4 tokens; round 2 the last 4
  # tokens of each: 3 adapters x 2 cached pages of 8 fewer.
  assert first[4] - second[4] == 3 * 16
  assert set(names) in mixes  # some step ran the base and all three adapters
  for name, out in zip(names, first):
    assert out == merged_greedy(reference, base, peft_dirs.get(name), PROMPT, 6), name
  assert len({tuple(o) for o in first[:4]}) == 4, first  # every adapter changes the output
  engine.scheduler.allocator.check()


def test_unknown_adapter_and_bad_adapters_are_refused(loaded, peft_dirs):
  engine = loaded.engine
  with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
    engine.add_request('x', PROMPT, SamplingParams(lora='nope'))
  with pytest.raises(ValueError, match='another base'):
    loader.add_adapters(engine, [('o', peft_dirs['other_base'])])
  with pytest.raises(ValueError, match='rank 16, over the slot rank max_lora_rank=8'):
    loader.add_adapters(engine, [('t', peft_dirs['too_big'])])
  with pytest.raises(ValueError, match='already loaded'):
    loader.add_adapters(engine, [('sql', peft_dirs['sql'])])
  assert engine.adapters.names() == ['sql', 'poem', 'math']


@pytest.fixture(scope='module')
def server(loaded):
  service = Service(ServerConfig(port=0, model_name='base'), lambda: loaded)
  background = BackgroundServer(service).start()
  background.wait_ready(120)
  yield background
  background.stop()


def test_server_selects_lists_loads_and_unloads_adapters(server, loaded, reference, peft_dirs,
                                                         lora_workdir):
  client = openai.OpenAI(base_url=server.url + '/v1', api_key='none', max_retries=0)
  models = {m.id: m for m in client.models.list().data}
  assert set(models) == {'base', 'sql', 'poem', 'math'}
  assert models['sql'].parent == 'base' and models['base'].parent is None

  with pytest.raises(openai.NotFoundError) as e:
    client.completions.create(model='nope', prompt=PROMPT, max_tokens=2)
  error = e.value.body
  assert error['code'] == 'model_not_found' and "'nope' does not exist" in error['message']
  assert error['type'] == 'invalid_request_error' and error['param'] == 'model'

  r = httpx.post(server.url + '/v1/load_lora_adapter',
                 json={'lora_name': 'extra', 'lora_path': lora_workdir}, timeout=60)
  assert r.status_code == 200 and 'extra' in r.text
  for bad, words in (('other_base', 'another base'), ('too_big', 'max_lora_rank=8')):
    r = httpx.post(server.url + '/v1/load_lora_adapter',
                   json={'lora_name': bad, 'lora_path': peft_dirs[bad]}, timeout=60)
    assert r.status_code == 400 and words in r.json()['error']['message'], r.text
  models = {m.id: m for m in client.models.list().data}
  assert set(models) == {'base', 'sql', 'poem', 'math', 'extra'}
  assert models['extra'].root == lora_workdir  # a LoRA run's workdir, the others PEFT directories

  # Four adapters and the base at once over 3 slots: the scheduler holds one back, slots swap.
  names = ['base', 'sql', 'poem', 'math', 'extra']
  texts = {}

  def ask(name):
    texts[name] = client.completions.create(model=name, prompt=PROMPT, max_tokens=5,
                                            temperature=0).choices[0].text

  threads = [threading.Thread(target=ask, args=(n,)) for n in names]
  swaps = loaded.engine.adapters.swaps
  for t in threads:
    t.start()
  for t in threads:
    t.join(120)
  assert loaded.engine.adapters.swaps > swaps
  metrics = httpx.get(server.url + '/metrics').text
  assert 'stoker_lora_adapters 4.0' in metrics and 'stoker_lora_resident 3.0' in metrics, metrics
  assert f'stoker_lora_swaps_total {float(loaded.engine.adapters.swaps)}' in metrics
  for name in names:
    want = merged_greedy(reference, quant.model_layout(loaded.engine.params),
                         None if name == 'base' else peft_dirs[name], PROMPT, 5)
    assert texts[name] == loaded.codec.decode(want), name

  r = httpx.post(server.url + '/v1/unload_lora_adapter', json={'lora_name': 'extra'}, timeout=60)
  assert r.status_code == 200
  r = httpx.post(server.url + '/v1/unload_lora_adapter', json={'lora_name': 'extra'}, timeout=60)
  assert r.status_code == 404 and r.json()['error']['code'] == 'lora_not_found'
  with pytest.raises(openai.NotFoundError):
    client.chat.completions.create(model='extra', messages=[{'role': 'user', 'content': 'hi'}])
  assert_declared(httpx.get(server.url + '/openapi.json').json(), [
      ('post', '/v1/load_lora_adapter', 200, 'text/plain'),
      ('post', '/v1/load_lora_adapter', 400, 'application/json'),
      ('post', '/v1/unload_lora_adapter', 404, 'application/json')])


def test_serve_refuses_bad_lora_flags_before_binding(server_workdir, tmp_path):
  cli = [sys.executable, os.path.join(REPO, 'cli.py'), 'serve', '--checkpoint', server_workdir]
  for flags, words in ((['--lora', 'sql'], 'use NAME=PATH'),
                       (['--lora', f'sql={tmp_path}/none'], 'no such directory'),
                       (['--lora', f'a={tmp_path}', '--lora', f'a={tmp_path}'], 'taken twice')):
    result = subprocess.run(cli + flags, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and words in result.stderr, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr and 'Listening' not in result.stdout
