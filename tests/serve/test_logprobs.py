"""Engine logprobs (serve/engine.py, serve/sampling.py) against the model run densely on whole
sequences, float64 log_softmax in numpy: prompt logprobs from chunked prefills, generated tokens'
logprobs at temperature 1, both through preemption (the pool holds fewer tokens than the batch
needs, so sequences are recomputed) and overlapped scheduling, with requests that ask for nothing
in the same steps. (Through the HTTP API against `transformers`: test_routes.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import transformer
from serve.engine import Engine, EngineConfig
from serve.sampling import SamplingParams
from tests.serve.server_fixtures import MODEL, random_params

pytestmark = pytest.mark.xdist_group('grammar')

# test_grammar.py's engine: the same compiled step (JAX's persistent cache), 159 pages of 8 tokens
# for 16 sequences of 120: preemptions.
ENGINE = EngineConfig(num_pages=160, page_size=8, max_seqs=16, max_pages_per_seq=16,
                      token_budget=64, min_bucket=64)
TOL = 1e-4
PROMPT, OUT, K = 60, 60, 3


def test_logprobs_through_chunked_prefill_and_preemption():
  params = random_params(MODEL, seed=5)
  engine = Engine(MODEL, params, ENGINE)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(0, MODEL.vocab_size, PROMPT).tolist() for _ in range(16)]
  for i, p in enumerate(prompts):  # odd requests ask for nothing: they share the steps
    wants = i % 2 == 0
    engine.add_request(f'r{i}', p, SamplingParams(
        max_tokens=OUT, temperature=1.0, seed=i, logprobs=K if wants else None,
        prompt_logprobs=K - 1 if wants else None))
  outputs = {f'r{i}': [] for i in range(16)}
  while engine.has_work:
    for out in engine.step():
      outputs[out.request_id].append(out)
  assert engine.stats['preemptions'] > 0 and engine.stats['overlapped_steps'] > 0
  assert ENGINE.token_budget < PROMPT * 2  # prompts were prefilled in chunks beside others

  graphdef, _ = nnx.split(nnx.eval_shape(lambda: transformer.Transformer(MODEL, nnx.Rngs(0))))
  dense = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids[None])[0].astype(jnp.float32))
  for i, prompt in enumerate(prompts):
    outs = outputs[f'r{i}']
    generated = [t for o in outs for t in o.new_token_ids]
    assert len(generated) == OUT and outs[-1].finished
    if i % 2:
      assert all(o.logprobs is None and o.prompt_logprobs is None for o in outs)
      continue
    logits = np.asarray(dense(params, jnp.asarray(prompt + generated)), np.float64)
    ref = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)  # [T, V] log_softmax
    ids = prompt + generated
    prompt_lp = outs[0].prompt_logprobs
    assert prompt_lp[0] is None and all(o.prompt_logprobs is None for o in outs[1:])
    entries = list(prompt_lp[1:]) + [o.logprobs[0] for o in outs]
    assert [e.token_id for e in entries] == ids[1:]
    for t, e in enumerate(entries):  # entry t: the token at t + 1, given ids[:t + 1]
      np.testing.assert_allclose(e.logprob, ref[t, ids[t + 1]], atol=TOL)
      k = K - 1 if t < PROMPT - 1 else K
      top_ids, top_lp = [x[0] for x in e.top], [x[1] for x in e.top]
      assert len(top_ids) == k and top_lp == sorted(top_lp, reverse=True)
      np.testing.assert_allclose(top_lp, np.sort(ref[t])[::-1][:k], atol=TOL)
      np.testing.assert_allclose(top_lp, ref[t, top_ids], atol=TOL)
  engine.scheduler.check()
  assert engine.scheduler.allocator.num_used == 0
