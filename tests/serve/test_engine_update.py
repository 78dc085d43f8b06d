"""Engine.update_params (serve/engine.py): after new weights the engine samples with them, on a prompt
whose pages sit in the prefix cache too (the cache is flushed), checked against the model run densely
with the new weights; and it refuses while requests are live."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import transformer
from serve.engine import Engine
from serve.sampling import SamplingParams
from tests.serve.server_fixtures import MODEL, random_params
from tests.serve.test_logprobs import ENGINE

pytestmark = pytest.mark.xdist_group('grammar')


def _last_logprobs(engine, request_id, prompt):
  engine.add_request(request_id, prompt, SamplingParams(max_tokens=1, temperature=0.0, logprobs=2))
  outs = []
  while engine.has_work:
    outs += engine.step()
  (entry,) = [o.logprobs[0] for o in outs if o.request_id == request_id and o.logprobs]
  return entry


@pytest.mark.parametrize('layer_loop', ['scan', 'unroll'])  # unroll: the engine unstacks the new weights
def test_new_weights_are_used_and_the_prefix_cache_is_flushed(layer_loop):
  old, new = random_params(MODEL, seed=1), random_params(MODEL, seed=2)
  engine = Engine(MODEL, old, dataclasses.replace(ENGINE, layer_loop=layer_loop))
  assert engine.unroll == (layer_loop == 'unroll')
  assert isinstance(next(iter(engine.params['layers'].keys())), int) == engine.unroll
  prompt = np.random.default_rng(0).integers(0, MODEL.vocab_size, 4 * ENGINE.page_size + 3).tolist()
  _last_logprobs(engine, 'a', prompt)
  assert engine.scheduler.allocator.num_cached >= 4  # the prompt's full pages are matchable

  engine.update_params(new)
  assert engine.scheduler.allocator.num_cached == 0
  engine.scheduler.check()
  got = _last_logprobs(engine, 'b', prompt)

  graphdef, _ = nnx.split(nnx.eval_shape(lambda: transformer.Transformer(MODEL, nnx.Rngs(0))))
  dense = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids[None])[0, -1].astype(jnp.float32))
  for params, want_equal in ((new, True), (old, False)):
    logits = np.asarray(dense(params, jnp.asarray(prompt)), np.float64)
    ref = logits - np.logaddexp.reduce(logits)
    top = [lp for _, lp in got.top]
    close = np.allclose(top, np.sort(ref)[::-1][:2], atol=1e-4)
    assert close == want_equal


def test_update_params_refuses_while_requests_are_live_and_checks_shapes():
  engine = Engine(MODEL, random_params(MODEL, seed=1), ENGINE)
  engine.add_request('live', [1, 2, 3], SamplingParams(max_tokens=4))
  with pytest.raises(RuntimeError, match='1 live requests'):
    engine.update_params(random_params(MODEL, seed=2))
  engine.abort('live')
  bad = jax.tree.map(lambda x: x.astype(jnp.float16), random_params(MODEL, seed=2))
  with pytest.raises(ValueError, match='dtype'):
    engine.update_params(bad)
