"""The routes' OpenAI features end to end (serve/routes.py, serve/choices.py, serve/api.py): logprobs
and echo against `transformers`, structured output validated by `jsonschema`, unsupported fields
refused by name, /tokenize and /detokenize.

One server, in this process, serves a random Hugging Face Llama loaded as `stoker serve --hf-dir`
loads it (serve/loader.load_hf); its token budget (32) is below the long prompts' length, so their
prefill runs in chunks. The reference for logprobs is `transformers`' log_softmax (float32, 1e-4).
"""

import json
import os

import httpx2 as httpx
import jsonschema
import numpy as np
import openai
import pytest
import torch
import transformers

from data import tokenizer as tokenizer_lib
from serve import loader
from serve.allocator import hash_blocks
from serve.engine import EngineConfig
from serve.server import BackgroundServer, ServerConfig, Service
from serve.text import Codec
from tests.serve import openapi_check

pytestmark = pytest.mark.xdist_group('routes')

KEY = 'sk-routes'
AUTH = {'Authorization': f'Bearer {KEY}'}
ENGINE = EngineConfig(num_pages=64, page_size=8, max_seqs=4, max_pages_per_seq=16, token_budget=32,
                      min_bucket=32)
TOL = 1e-4  # float32 logprobs against float32 transformers
LONG = 'def load(path):\n    with open(path) as f:\n        return json.load(f)\n'  # > 32 tokens


@pytest.fixture(scope='module')
def hf(tmp_path_factory):
  """(transformers model, its directory): a random Llama with randomised norms, and a BPE tokenizer."""
  root = tmp_path_factory.mktemp('hf')
  config = transformers.LlamaConfig(
      vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('norm.weight'):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(root, safe_serialization=True)
  texts = [LONG * 3, 'import json\nclass A:\n    pass\n' * 5, 'hello world, naïve café ½ 漢字\n' * 3,
           'the quick brown fox jumps over the lazy dog and seven wizards box many jolly hens\n' * 4]
  tokenizer_lib.train_bpe(texts * 4, 300).save(os.path.join(root, 'tokenizer.json'))
  return model, str(root)


@pytest.fixture(scope='module')
def server(hf):
  service = Service(ServerConfig(port=0, api_key=KEY), lambda: loader.load_hf(hf[1], ENGINE))
  background = BackgroundServer(service).start()
  background.wait_ready(300)
  yield background
  background.stop()


@pytest.fixture(scope='module')
def client(server):
  return openai.OpenAI(base_url=server.url + '/v1', api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope='module')
def codec(hf):
  return Codec.from_file(hf[1])


@pytest.fixture(scope='module')
def ids_of(codec):
  """Token string (as logprobs name it) -> id: every id of the model's vocabulary has its own."""
  names = {codec.token_text(i): i for i in range(320)}
  assert len(names) == 320
  return names


def log_softmax(model, ids):
  """[len(ids), V] float32: row t is the model's log-distribution of the token after ids[t]."""
  with torch.no_grad():
    logits = model(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)).logits
  return torch.log_softmax(logits[0].float(), -1).numpy()


def check_top(top: dict, ref_V: np.ndarray, chosen: int, k: int, ids_of) -> None:
  """A completions top_logprobs dict: the k likeliest, sorted, each with its own logprob, and the
  chosen token where it ranks (after them when it does not)."""
  values, names = list(top.values()), list(top)
  assert values == sorted(values, reverse=True)
  np.testing.assert_allclose(values[:k], np.sort(ref_V)[::-1][:k], atol=TOL)
  for name, value in top.items():
    np.testing.assert_allclose(value, ref_V[ids_of[name]], atol=TOL)
  rank = int(np.sum(ref_V > ref_V[chosen] + TOL))  # tokens surely likelier than the chosen one
  chosen_at = [ids_of[n] for n in names].index(chosen)
  assert chosen_at == len(names) - 1 == k if rank >= k + 1 else chosen_at <= k


def post(server, path, body):
  return httpx.post(server.url + path, json=body, headers=AUTH, timeout=120)


# ----------------------------------------------------------------------------- logprobs


@pytest.mark.parametrize('prompt', ['import json\n', LONG], ids=['short', 'chunked'])
def test_echo_and_logprobs_equal_transformers(server, client, hf, codec, ids_of, prompt):
  prompt_ids = codec.encode(prompt)
  assert (len(prompt_ids) > ENGINE.token_budget) == (prompt == LONG)  # chunked prefill
  k = 5
  out = client.completions.create(model=os.path.basename(hf[1]), prompt=prompt, max_tokens=8,
                                  temperature=0.7, seed=11, logprobs=k, echo=True)
  choice, lp = out.choices[0], out.choices[0].logprobs
  generated = [ids_of[t] for t in lp.tokens[len(prompt_ids):]]
  assert [ids_of[t] for t in lp.tokens[:len(prompt_ids)]] == prompt_ids
  assert len(generated) == out.usage.completion_tokens
  assert choice.text == prompt + codec.decode(generated)
  all_ids = prompt_ids + generated
  ref = log_softmax(hf[0], all_ids)
  assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
  np.testing.assert_allclose(lp.token_logprobs[1:],
                             [ref[t, all_ids[t + 1]] for t in range(len(all_ids) - 1)], atol=TOL)
  for t in range(1, len(all_ids)):
    check_top(lp.top_logprobs[t], ref[t - 1], all_ids[t], k, ids_of)
  assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
  assert lp.text_offset[len(prompt_ids)] == len(prompt)


def test_chat_logprobs_equal_transformers(server, client, hf, ids_of):
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': LONG}]
  tokenized = post(server, '/tokenize', {'messages': messages}).json()
  prompt_ids = tokenized['tokens']
  assert tokenized['count'] == len(prompt_ids) > ENGINE.token_budget
  out = client.chat.completions.create(model=os.path.basename(hf[1]), messages=messages,
                                       max_tokens=6, temperature=1.0, seed=3, logprobs=True,
                                       top_logprobs=4)
  assert out.usage.prompt_tokens == len(prompt_ids)
  content = out.choices[0].logprobs.content
  generated = [ids_of[c.token] for c in content]
  ref = log_softmax(hf[0], prompt_ids + generated)[len(prompt_ids) - 1:]
  for t, c in enumerate(content):
    np.testing.assert_allclose(c.logprob, ref[t, generated[t]], atol=TOL)
    assert len(c.top_logprobs) == 4
    top = [x.logprob for x in c.top_logprobs]
    assert top == sorted(top, reverse=True)
    np.testing.assert_allclose(top, np.sort(ref[t])[::-1][:4], atol=TOL)
    for x in c.top_logprobs:
      np.testing.assert_allclose(x.logprob, ref[t, ids_of[x.token]], atol=TOL)
      assert bytes(x.bytes).decode('utf-8', 'replace') in (x.token, '\ufffd') or x.token.startswith(
          ('bytes:', 'token_id:'))


def test_echo_of_a_cached_prompt_equals_a_cold_one(server, client, hf, codec):
  model = os.path.basename(hf[1])
  prompt = LONG + '# cached\n'
  ids = codec.encode(prompt)

  def echo():
    return client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0,
                                     logprobs=3, echo=True).choices[0].logprobs

  cold = echo()
  client.completions.create(model=model, prompt=prompt, max_tokens=1)  # plain: cached pages
  allocator = server.service.loaded.engine.scheduler.allocator
  full = (len(ids) - 1) // ENGINE.page_size
  assert len(allocator.match(hash_blocks(ids, ENGINE.page_size)[:full])) == full  # all cached
  warm = echo()
  assert warm.tokens == cold.tokens and warm.top_logprobs[0] is None
  np.testing.assert_allclose(warm.token_logprobs[1:], cold.token_logprobs[1:], rtol=0, atol=1e-6)
  for a, b in zip(warm.top_logprobs[1:], cold.top_logprobs[1:]):
    assert list(a) == list(b)
    np.testing.assert_allclose(list(a.values()), list(b.values()), rtol=0, atol=1e-6)


def test_streamed_logprobs_equal_the_response(server, client, hf):
  model = os.path.basename(hf[1])
  kw = dict(model=model, prompt=LONG, max_tokens=10, temperature=1.0, seed=5, logprobs=2, echo=True)
  full = client.completions.create(**kw).choices[0]
  chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
  assert ''.join(c.text for c in chunks) == full.text
  for key in ('tokens', 'token_logprobs', 'top_logprobs', 'text_offset'):
    streamed = [x for c in chunks if c.logprobs for x in getattr(c.logprobs, key)]
    assert streamed == getattr(full.logprobs, key), key
  chat = dict(model=model, messages=[{'role': 'user', 'content': 'hi'}], max_tokens=6,
              temperature=1.0, seed=2, logprobs=True, top_logprobs=2)
  whole = client.chat.completions.create(**chat).choices[0].logprobs.content
  parts = [e for c in client.chat.completions.create(stream=True, **chat)
           if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
  assert [e.model_dump() for e in parts] == [e.model_dump() for e in whole]


# ----------------------------------------------------------------------------- structured output


def test_response_format_over_http(server, client, hf):
  model = os.path.basename(hf[1])
  schema = {'type': 'object', 'properties': {
      'name': {'type': 'string', 'maxLength': 6}, 'tags': {'type': 'array', 'maxItems': 2,
                                                           'items': {'enum': ['a', 'b']}},
      'n': {'type': 'integer', 'minimum': 0, 'maximum': 99}},
            'required': ['name', 'n'], 'additionalProperties': False}
  fmt = {'type': 'json_schema', 'json_schema': {'name': 'thing', 'schema': schema}}
  out = client.chat.completions.create(model=model, messages=[{'role': 'user', 'content': 'x'}],
                                       max_tokens=60, temperature=1.0, seed=1, n=3,
                                       response_format=fmt)
  stopped = [c for c in out.choices if c.finish_reason == 'stop']
  assert stopped
  for c in stopped:
    jsonschema.validate(json.loads(c.message.content), schema)
  streamed = client.completions.create(model=model, prompt='x', max_tokens=60, temperature=1.0,
                                       seed=4, stream=True,
                                       extra_body={'response_format': {'type': 'json_object'}})
  chunks = [c.choices[0] for c in streamed if c.choices]
  if chunks[-1].finish_reason == 'stop':
    assert isinstance(json.loads(''.join(c.text for c in chunks)), dict)
  r = post(server, '/v1/completions', {'model': model, 'prompt': 'x', 'response_format': {
      'type': 'json_schema', 'json_schema': {'name': 'x', 'schema': {'type': 'nope'}}}})
  assert r.status_code == 400 and 'response_format' in r.json()['error']['message'], r.text


# ----------------------------------------------------------------------------- no silent drops


UNSUPPORTED = [('tools', [{'type': 'function', 'function': {'name': 'f'}}]), ('tool_choice', 'auto'),
               ('functions', [{'name': 'f'}]), ('function_call', 'auto'),
               ('logit_bias', {'5': 10}), ('presence_penalty', 0.5), ('frequency_penalty', 1.0),
               ('temprature', 0.5), ('best_of', 3), ('no_such_field', 1)]


@pytest.mark.parametrize('chat', [False, True], ids=['completions', 'chat'])
@pytest.mark.parametrize('field,value', UNSUPPORTED, ids=[f for f, _ in UNSUPPORTED])
def test_unsupported_fields_are_400s_naming_them(server, client, hf, field, value, chat):
  model = os.path.basename(hf[1])
  base = ({'model': model, 'messages': [{'role': 'user', 'content': 'x'}], 'max_tokens': 2}
          if chat else {'model': model, 'prompt': 'x', 'max_tokens': 2})
  r = post(server, '/v1/chat/completions' if chat else '/v1/completions', {**base, field: value})
  assert r.status_code == 400, r.text
  error = r.json()['error']
  assert field in error['message'] and error['param'] == field, error
  create = client.chat.completions.create if chat else client.completions.create
  with pytest.raises(openai.BadRequestError, match=field):
    create(**base, extra_body={field: value})


def test_accepted_and_ignored_fields(server, client, hf):
  model = os.path.basename(hf[1])
  out = client.completions.create(model=model, prompt='x', max_tokens=2, user='someone',
                                  presence_penalty=0, frequency_penalty=0)
  assert out.usage.completion_tokens >= 1
  r = post(server, '/v1/chat/completions', {'model': model, 'max_tokens': 2, 'messages': [
      {'role': 'user', 'content': 'x', 'tool_calls': []}]})
  assert r.status_code == 400 and 'tool_calls' in r.json()['error']['message'], r.text


# ----------------------------------------------------------------------------- /tokenize


def test_tokenize_and_detokenize_round_trip(server, codec):
  for text in ('hello world, naïve café ½ 漢字', LONG):
    r = post(server, '/tokenize', {'prompt': text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body['tokens'] == codec.encode(text) and body['count'] == len(body['tokens'])
    assert body['max_model_len'] == ENGINE.max_pages_per_seq * ENGINE.page_size
    back = post(server, '/detokenize', {'tokens': body['tokens']}).json()
    assert back == {'prompt': text}
  strs = post(server, '/tokenize', {'prompt': 'hello', 'return_token_strs': True}).json()
  assert strs['token_strs'] == [codec.tokenizer.id_to_token(i) for i in strs['tokens']]
  assert post(server, '/detokenize', {'tokens': [999]}).status_code == 400
  assert post(server, '/tokenize', {'prompt': 'x', 'model': 'gpt-9'}).status_code == 404
  assert post(server, '/tokenize', {}).status_code == 400
  assert httpx.post(server.url + '/tokenize', json={'prompt': 'x'}).status_code == 401
  served = httpx.get(server.url + '/tokenizer.json', headers=AUTH)
  assert served.status_code == 200 and json.loads(served.text) == json.loads(codec.tokenizer.to_str())
  schema = httpx.get(server.url + '/openapi.json', headers=AUTH).json()
  openapi_check.assert_declared(schema, [
      ('post', '/tokenize', status, 'application/json') for status in (200, 400, 401, 404)] + [
      ('post', '/detokenize', status, 'application/json') for status in (200, 400)] + [
      ('get', '/tokenizer.json', 200, 'application/json')])


def test_bench_needs_no_tokenizer_against_a_stoker_server(server, hf, codec, tmp_path):
  """`stoker bench --url` builds exact-length prompts with the tokenizer the server serves."""
  import argparse  # pylint: disable=import-outside-toplevel
  from serve.bench import flags, run  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser()
  flags.add_arguments(parser)
  args = parser.parse_args(['--url', server.url, '--api-key', KEY, '--out', str(tmp_path / 'b'),
                            '--no-progress', '--no-plots', '--ignore-eos', '--workload',
                            'requests=3,arrival=fixed,rate=50,prompt=fixed:12,output=fixed:4,seed=0'])
  summary = run.bench(flags.config_from_args(args), log=lambda *a: None)
  assert summary['completed'] == 3
  with open(tmp_path / 'b' / 'requests.csv') as f:
    rows = f.read().splitlines()
  header = rows[0].split(',')
  prompt_col = next(i for i, h in enumerate(header) if 'prompt' in h and 'token' in h)
  assert all(int(r.split(',')[prompt_col]) == 12 for r in rows[1:]), rows
