"""Grammar-constrained decoding (serve/grammar.py through the engine): JSON schemas drawn by a seeded
generator, sampled at temperature 1 from a random tiny model, complete within max_tokens and
validate with `jsonschema` (the independent reference); `json_object` output parses. A random model
writes valid JSON only because the bitmask constrains every token."""

import json
import random

import jsonschema
import numpy as np
import pytest

from serve import grammar as grammar_lib
from serve.engine import Engine, EngineConfig
from serve.sampling import SamplingParams
from serve.text import Codec
from tests.serve.server_fixtures import MODEL, make_workdir, random_params

pytestmark = pytest.mark.xdist_group('grammar')

ENGINE = EngineConfig(num_pages=160, page_size=8, max_seqs=16, max_pages_per_seq=16,
                      token_budget=64, min_bucket=64)
NUM_SCHEMAS, SEEDS, MAX_TOKENS = 30, (0, 1, 2), 112
KEYS = ['id', 'name', 'tags', 'size', 'ok', 'kind', 'meta', 'score', 'items', 'note']


def draw_schema(rng: random.Random, depth: int = 0) -> dict:
  """A random JSON schema: nested objects, arrays with maxItems, enums, integers, numbers,
  booleans, strings bounded by enum or maxLength, required and optional keys."""
  kinds = ['integer', 'number', 'boolean', 'string', 'enum'] + (['object', 'array'] * (depth < 2))
  kind = rng.choice(kinds)
  if kind == 'object':
    return draw_object(rng, depth + 1)
  if kind == 'array':
    return {'type': 'array', 'items': draw_schema(rng, depth + 1), 'maxItems': rng.randint(1, 3)}
  if kind == 'integer':
    low = rng.randint(-50, 50)
    return {'type': 'integer', 'minimum': low, 'maximum': low + rng.randint(0, 500)}
  if kind == 'number':
    return {'type': 'number', 'minimum': -10, 'maximum': 10}
  if kind == 'boolean':
    return {'type': 'boolean'}
  if kind == 'string':
    return {'type': 'string', 'maxLength': rng.randint(1, 6)}
  return {'enum': rng.sample(['red', 'green', 'blue', 'a b', 'x', 'long value'], rng.randint(1, 4))}


def draw_object(rng: random.Random, depth: int) -> dict:
  keys = rng.sample(KEYS, rng.randint(1, 3))
  return {'type': 'object', 'properties': {k: draw_schema(rng, depth) for k in keys},
          'required': [k for k in keys if rng.random() < 0.6], 'additionalProperties': False}


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  workdir = make_workdir(str(tmp_path_factory.mktemp('grammar')))
  codec = Codec.from_file(str(workdir).replace('/run', '/data/tokenizer.json'))
  engine = Engine(MODEL, random_params(MODEL, seed=3), ENGINE, detokenize=codec.decode)
  return codec, engine


def test_json_schemas_complete_and_validate(setup):
  codec, engine = setup
  rng = random.Random(1234)
  schemas = [draw_object(rng, 1) for _ in range(NUM_SCHEMAS)]
  kinds = json.dumps(schemas)
  for word in ('"maxItems"', '"enum"', '"integer"', '"number"', '"boolean"', '"maxLength"',
               '"properties": {"'):
    assert word in kinds, word  # the generator covers what the acceptance asks for
  prompt = codec.encode('{')
  prompts, params = [], []
  for schema in schemas:
    grammar = grammar_lib.json_schema(codec, MODEL.vocab_size, schema)
    for seed in SEEDS:
      prompts.append(prompt)
      params.append(SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=seed,
                                   stop_token_ids=codec.stop_token_ids, grammar=grammar))
  outputs = engine.generate(prompts, params)
  complete = 0
  for i, ids in enumerate(outputs):
    schema = schemas[i // len(SEEDS)]
    if len(ids) == MAX_TOKENS:  # cut by max_tokens: may be incomplete, never invalid so far
      continue
    complete += 1
    text = codec.decode(ids)
    jsonschema.validate(json.loads(text), schema)
  assert complete >= 0.9 * len(outputs), (complete, len(outputs))
  # The draws differ: the grammar constrains, the model still samples.
  assert len({tuple(o) for o in outputs}) > len(outputs) // 2
  engine.scheduler.check()
  assert engine.scheduler.allocator.num_used == 0


def test_json_object_parses_and_free_requests_share_the_batch(setup):
  codec, engine = setup
  grammar = grammar_lib.json_schema(codec, MODEL.vocab_size, None)
  prompt = codec.encode('x')
  constrained = [SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=s,
                                stop_token_ids=codec.stop_token_ids, grammar=grammar)
                 for s in range(12)]
  free = SamplingParams(max_tokens=24, temperature=0.0)
  outputs = engine.generate([prompt] * 14, constrained + [free, free])
  parsed = 0
  for ids in outputs[:12]:
    if len(ids) < MAX_TOKENS:
      assert isinstance(json.loads(codec.decode(ids)), dict)
      parsed += 1
  assert parsed >= 1
  # Unconstrained requests in the same (synchronous) steps decode as they do alone.
  alone = engine.generate([prompt], free)[0]
  assert outputs[12] == outputs[13] == alone


def test_bitmask_layout_matches_the_matcher(setup):
  """The device's unpacking (sampling.allowed) against the matcher's own token check."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from serve import sampling  # pylint: disable=import-outside-toplevel
  codec, _ = setup
  grammar = grammar_lib.json_schema(codec, MODEL.vocab_size, {'type': 'object', 'properties': {
      'a': {'type': 'integer'}}, 'required': ['a'], 'additionalProperties': False})
  matcher = grammar.matcher()
  for token in codec.encode('{"a":1'):
    mask = np.zeros((1, -(-MODEL.vocab_size // 32)), np.int32)
    grammar.fill_bitmask(matcher, mask, 0)
    allowed = np.asarray(sampling.allowed(jnp.asarray(mask), MODEL.vocab_size))[0]
    expected = [matcher.validate_tokens([t]) == 1 for t in range(MODEL.vocab_size)]
    np.testing.assert_array_equal(allowed, expected)
    assert matcher.consume_token(token)


def test_bad_schemas_are_named(setup):
  codec, _ = setup
  with pytest.raises(grammar_lib.GrammarError, match='JSON schema'):
    grammar_lib.json_schema(codec, MODEL.vocab_size, {'type': 'no-such-type'})
