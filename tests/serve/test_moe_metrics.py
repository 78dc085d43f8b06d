"""A mixture of experts' load balance in serving: the tokens each expert received, counted by the
engine's step (serve/forward.py, padding excluded) and exported on /metrics (serve/metrics.py), against
the router recomputed in numpy (tests/models/moe_reference.py) on the tokens the engine ran: each
prompt and every generated token but the last."""

import functools
import os
import time

import httpx2 as httpx
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from prometheus_client.parser import text_string_to_metric_families

from data.chat import ChatTemplate
from models import presets, transformer
from serve.engine import Engine
from serve.loader import Loaded
from serve.metrics import Metrics
from serve.sampling import SamplingParams
from serve.server import BackgroundServer, ServerConfig, Service
from serve.text import Codec
from tests.models import moe_reference
from tests.serve.server_fixtures import ENGINE, MODEL, random_params

pytestmark = pytest.mark.xdist_group('server')

# Vocabulary 320: it covers the server tests' tokenizer (server_fixtures.TOKENIZER_VOCAB).
MOE = presets.preset('tiny_moe', num_layers=2, d_model=64, vocab_size=320, num_heads=4,
                     num_kv_heads=2, head_dim=16, mlp_dim=32, dtype='float32')


LENGTH = 64  # the reference runs every sequence padded to this length: one compiled program


@functools.cache
def moe_model() -> transformer.Transformer:
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: transformer.Transformer(MOE, nnx.Rngs(0))))
  return nnx.merge(graphdef, random_params(MOE))


def prompt(seed: int, n: int) -> list[int]:
  return np.random.default_rng(seed).integers(0, 300, n).tolist()


def padded(seqs) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, real) [len(seqs), LENGTH]: padding after each sequence (causal: it changes nothing
  before it)."""
  tokens, real = np.zeros((len(seqs), LENGTH), np.int32), np.zeros((len(seqs), LENGTH), bool)
  for b, s in enumerate(seqs):
    tokens[b, :len(s)], real[b, :len(s)] = s, True
  return tokens, real


def routed(prompts, outputs) -> np.ndarray:
  """[L, E] by numpy: what the engine ran (each prompt and its outputs but the last, never fed)."""
  tokens, real = padded([p + o[:-1] for p, o in zip(prompts, outputs)])
  return moe_reference.expert_tokens(moe_model(), tokens, counted_BT=real)


@nnx.jit
def _logits(model, tokens_BT):
  return model(tokens_BT)


def greedy(prompts, n: int) -> list[list[int]]:
  """Each prompt's n greedy tokens, by the model itself: one full forward a token."""
  seqs = [list(p) for p in prompts]
  for _ in range(n):
    logits_BTV = np.asarray(_logits(moe_model(), jnp.asarray(padded(seqs)[0])))
    for b, s in enumerate(seqs):
      s.append(int(np.argmax(logits_BTV[b, len(s) - 1])))
  return [s[len(p):] for s, p in zip(seqs, prompts)]


def samples(exposition: bytes) -> dict:
  return {(s.name, tuple(sorted(s.labels.items()))): s.value
          for f in text_string_to_metric_families(exposition.decode()) for s in f.samples}


def moe_series(found: dict) -> tuple[np.ndarray, list[float]]:
  """(tokens [L, E], imbalance per layer) from parsed samples."""
  tokens = np.zeros((MOE.num_layers, MOE.num_experts), np.int64)
  imbalance = [0.0] * MOE.num_layers
  for (name, labels), value in found.items():
    labels = dict(labels)
    if name == 'stoker_moe_expert_tokens_total':
      tokens[int(labels['layer']), int(labels['expert'])] = value
    elif name == 'stoker_moe_expert_load_imbalance':
      imbalance[int(labels['layer'])] = value
  return tokens, imbalance


def test_exposition_of_expert_loads():
  tokens_LE = np.array([[6, 2, 0, 0], [2, 2, 2, 2], [0, 0, 0, 0]])
  found = samples(Metrics(lambda: {'expert_tokens': tokens_LE}).exposition())
  assert found[('stoker_moe_expert_tokens_total', (('expert', '0'), ('layer', '0')))] == 6
  assert found[('stoker_moe_expert_tokens_total', (('expert', '3'), ('layer', '1')))] == 2
  imbalance = {dict(k[1])['layer']: v for k, v in found.items()
               if k[0] == 'stoker_moe_expert_load_imbalance'}
  assert imbalance == {'0': 3.0, '1': 1.0, '2': 0.0}  # 6 / mean 2; balanced; nothing yet
  dense = samples(Metrics(lambda: {'expert_tokens': None}).exposition())
  assert not any(name.startswith('stoker_moe') for name, _ in dense)


def test_engine_counts_each_experts_tokens_without_padding():
  # 45 tokens: a prefill in two chunks of the 32-token budget; every step is padded to 32.
  prompts = [prompt(1, 5), prompt(2, 13), prompt(3, 45)]
  engine = Engine(MOE, nnx.state(moe_model()), ENGINE)
  outputs = engine.generate(prompts, SamplingParams(max_tokens=6))
  expected = routed(prompts, outputs)
  assert engine.stats['padded_tokens'] > engine.stats['tokens']
  np.testing.assert_array_equal(engine.expert_tokens_LE.sum(-1),
                                MOE.experts_per_token * engine.stats['tokens'])
  np.testing.assert_array_equal(engine.expert_tokens_LE, expected)
  dense = Engine(MODEL, random_params(MODEL), ENGINE)
  assert len(dense.generate([prompt(4, 7)], SamplingParams(max_tokens=3))[0]) == 3
  assert dense.expert_tokens_LE is None


def test_server_metrics_count_each_experts_tokens(server_workdir):
  tokenizer = os.path.join(os.path.dirname(server_workdir), 'data', 'tokenizer.json')
  service = Service(ServerConfig(port=0), lambda: Loaded(
      'moe', Engine(MOE, nnx.state(moe_model()), ENGINE), Codec.from_file(tokenizer),
      ChatTemplate(), 'in memory'))
  server = BackgroundServer(service).start()
  try:
    server.wait_ready(120)
    prompts = [prompt(5, 9), prompt(6, 17)]
    for p in prompts:
      r = httpx.post(server.url + '/v1/completions', timeout=60, json={
          'model': 'moe', 'prompt': p, 'max_tokens': 4, 'temperature': 0, 'ignore_eos': True})
      assert r.status_code == 200 and r.json()['usage']['completion_tokens'] == 4, r.text
    expected = routed(prompts, greedy(prompts, 4))
    deadline = time.monotonic() + 30
    while True:  # the snapshot follows the step that delivered the last token
      tokens, imbalance = moe_series(samples(httpx.get(server.url + '/metrics').content))
      if tokens.sum() == expected.sum() or time.monotonic() > deadline:
        break
      time.sleep(0.05)
  finally:
    server.stop()
  np.testing.assert_array_equal(tokens, expected)
  np.testing.assert_allclose(imbalance, expected.max(-1) / expected.mean(-1), rtol=1e-12)
