"""The OpenAI-compatible server end to end: `stoker serve` in a subprocess on 127.0.0.1, driven by the
official `openai` client and by raw HTTP.

One server (a tiny model from a real training checkpoint, one token bucket) serves every test of
this module, in file order; the last test shuts it down with SIGTERM. Servers started in this
process (quickstart's, shutdown with a deadline) are tested in test_server_in_process.py. The reference for outputs
is the engine itself, loaded in this process from the same checkpoint: greedy completions through
the API must equal Engine.generate's tokens, decoded.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from serve import loader
from serve.sampling import SamplingParams
from tests.serve.openapi_check import assert_declared
from tests.serve.server_fixtures import ENGINE, long_stream

pytestmark = pytest.mark.xdist_group('server')

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API_KEY = 'sk-stoker-test'
MAX_WAITING = 4
GIN = ['engine.num_pages=64', 'engine.page_size=8', 'engine.max_seqs=4',
       'engine.max_pages_per_seq=16', 'engine.token_budget=32', 'engine.min_bucket=32',
       f'server.max_waiting={MAX_WAITING}', 'server.shutdown_timeout_s=3.0',
       'server.max_body_bytes=65536']
PROMPTS = ['import json\n', 'def f(x):', 'class A:\n    pass\n\n# x']


class Server:

  def __init__(self, workdir, log_path):
    self.log = open(log_path, 'w')
    self.proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, 'cli.py'), 'serve', '--checkpoint', workdir,
         '--port', '0', '--api-key', API_KEY, *[a for g in GIN for a in ('--gin_param', g)]],
        cwd=REPO, stdout=subprocess.PIPE, stderr=self.log, text=True)
    self.stdout = []
    line = self.proc.stdout.readline()  # 'Listening on http://127.0.0.1:PORT ...', before loading
    assert line.startswith('Listening on http://127.0.0.1:'), (line, open(log_path).read()[-3000:])
    self.stdout.append(line)
    self.url = line.split()[2]
    threading.Thread(target=lambda: self.stdout.extend(self.proc.stdout), daemon=True).start()
    self.health = []  # (status code, body) seen while waiting for ready
    self.models_while_loading = self.ready_while_loading = None
    deadline = time.time() + 240
    while time.time() < deadline and self.proc.poll() is None:
      r = httpx.get(self.url + '/health')
      self.health.append((r.status_code, r.json()))
      if r.status_code == 200:
        break
      if self.models_while_loading is None:
        self.models_while_loading = httpx.get(self.url + '/v1/models', headers=AUTH)
        self.ready_while_loading = httpx.get(self.url + '/ready')
      time.sleep(0.05)
    assert self.health[-1][0] == 200, (self.health[-3:], open(log_path).read()[-3000:])

  def metrics(self) -> dict:
    text = httpx.get(self.url + '/metrics').text
    out = {}
    for family in text_string_to_metric_families(text):
      for sample in family.samples:
        out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


AUTH = {'Authorization': f'Bearer {API_KEY}'}


def value(metrics, name, **labels):
  return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope='module')
def server(server_workdir, tmp_path_factory):
  s = Server(server_workdir, tmp_path_factory.mktemp('log') / 'server.log')
  yield s
  if s.proc.poll() is None:
    s.proc.send_signal(signal.SIGTERM)
    s.proc.wait(60)


@pytest.fixture(scope='module')
def client(server):
  return openai.OpenAI(base_url=server.url + '/v1', api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope='module')
def reference(server, server_workdir):
  """The same checkpoint in an Engine in this process (after the server: its compile is cached)."""
  return loader.load_checkpoint(server_workdir, ENGINE)


def post(server, path, body, **kw):
  return httpx.post(server.url + path, json=body, headers=AUTH, timeout=120, **kw)


def greedy_reference(reference, prompt_ids, max_tokens):
  params = SamplingParams(max_tokens=max_tokens, stop_token_ids=reference.codec.stop_token_ids)
  return reference.engine.generate([prompt_ids], params)[0]


# ----------------------------------------------------------------------------- start-up, auth


def test_health_and_ready_are_503_until_the_model_is_compiled(server):
  codes = [code for code, _ in server.health]
  assert codes[0] == 503 and server.health[0][1]['status'] == 'loading'
  assert codes[-1] == 200 and server.health[-1][1]['status'] == 'ready'
  loading = server.ready_while_loading
  assert loading.status_code == 503 and loading.json()['status'] == 'loading', loading.text
  assert 'loading' in loading.json()['detail'] and loading.headers['retry-after'] == '1'
  ready = httpx.get(server.url + '/ready')
  assert ready.status_code == 200 and ready.json()['status'] == 'ready'
  assert server.models_while_loading.status_code == 503
  assert server.models_while_loading.headers['retry-after'] == '1'
  assert 'loading' in server.models_while_loading.json()['error']['message']


def test_models_and_api_key(server, client):
  assert [m.id for m in client.models.list()] == ['run']
  for headers in ({}, {'Authorization': 'Bearer wrong'}, {'Authorization': API_KEY}):
    r = httpx.post(server.url + '/v1/completions', headers=headers,
                   json={'model': 'run', 'prompt': 'x'})
    assert r.status_code == 401 and r.json()['error']['code'] == 'invalid_api_key', r.text
  bad = openai.OpenAI(base_url=server.url + '/v1', api_key='nope', max_retries=0)
  with pytest.raises(openai.AuthenticationError):
    bad.models.list()
  for path in ('/health', '/ready', '/metrics'):  # open: probes and scrapers carry no key
    assert httpx.get(server.url + path).status_code == 200, path


# ----------------------------------------------------------------------------- outputs


def test_greedy_completions_equal_the_engine(client, reference):
  codec = reference.codec
  out = client.completions.create(model='run', prompt=PROMPTS, max_tokens=24, temperature=0)
  assert [c.index for c in out.choices] == [0, 1, 2]
  completion_tokens = 0
  for prompt, choice in zip(PROMPTS, out.choices):
    ids = codec.encode(prompt)
    expected = greedy_reference(reference, ids, 24)
    assert choice.text == codec.decode(expected)
    assert choice.finish_reason == ('stop' if expected[-1] in codec.stop_token_ids else 'length')
    completion_tokens += len(expected)
  assert out.usage.prompt_tokens == sum(len(codec.encode(p)) for p in PROMPTS)
  assert out.usage.completion_tokens == completion_tokens
  assert out.usage.total_tokens == out.usage.prompt_tokens + completion_tokens
  # Token-id prompts are served as given.
  ids = codec.encode(PROMPTS[1])
  by_ids = client.completions.create(model='run', prompt=ids, max_tokens=24, temperature=0)
  assert by_ids.choices[0].text == out.choices[1].text


def test_greedy_chat_equals_the_engine(client, reference):
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hello'}]
  out = client.chat.completions.create(model='run', messages=messages, max_tokens=20, temperature=0)
  prompt = reference.codec.encode(reference.chat.render(messages), add_special_tokens=False)
  assert prompt == reference.codec.encode('<|system|>\nBe brief.\n<|user|>\nHello\n<|assistant|>\n')
  expected = greedy_reference(reference, prompt, 20)
  assert out.choices[0].message.role == 'assistant'
  assert out.choices[0].message.content == reference.codec.decode(expected)
  assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(prompt), len(expected))


def test_streaming_equals_non_streaming(client):
  full = client.completions.create(model='run', prompt=PROMPTS[0], max_tokens=30, temperature=0)
  chunks = list(client.completions.create(model='run', prompt=PROMPTS[0], max_tokens=30,
                                          temperature=0, stream=True,
                                          stream_options={'include_usage': True}))
  assert ''.join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
  assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
  assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
  messages = [{'role': 'user', 'content': 'Hi'}]
  chat = client.chat.completions.create(model='run', messages=messages, max_tokens=12, temperature=0)
  stream = list(client.chat.completions.create(model='run', messages=messages, max_tokens=12,
                                               temperature=0, stream=True))
  assert stream[0].choices[0].delta.role == 'assistant'
  assert ''.join(c.choices[0].delta.content or '' for c in stream) == chat.choices[0].message.content
  assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason
  assert all(c.usage is None for c in stream)  # no include_usage: no usage chunk


def test_raw_stream_ends_with_done(server):
  with httpx.stream('POST', server.url + '/v1/completions', headers=AUTH, timeout=60,
                    json={'model': 'run', 'prompt': 'a', 'max_tokens': 5, 'stream': True}) as r:
    assert r.headers['content-type'].startswith('text/event-stream')
    events = [line for line in r.iter_lines() if line]
  assert all(e.startswith('data: ') for e in events) and events[-1] == 'data: [DONE]'
  assert json.loads(events[-2][6:])['choices'][0]['finish_reason'] == 'length'


def test_stop_strings(client):
  full = client.completions.create(model='run', prompt=PROMPTS[2], max_tokens=40, temperature=0)
  text = full.choices[0].text
  # A stop string from the middle of the greedy text, free of replacement characters.
  start = next(i for i in range(len(text) // 3, len(text) - 2)
               if '\ufffd' not in text[i:i + 2] and text[i:i + 2].strip())
  stop = text[start:start + 2]
  expected = text[:text.find(stop)]
  for stream in (False, True):
    out = client.completions.create(model='run', prompt=PROMPTS[2], max_tokens=40, temperature=0,
                                    stop=[stop, 'never seen \u2603'], stream=stream)
    if stream:
      chunks = [c for c in out if c.choices]
      got, reason = ''.join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
      got, reason = out.choices[0].text, out.choices[0].finish_reason
      assert out.usage.completion_tokens < full.usage.completion_tokens
    assert (got, reason) == (expected, 'stop'), (stop, text)


def test_seeds_reproduce_and_differ(client):
  def sample(seed, n=1):
    out = client.completions.create(model='run', prompt='x = ', max_tokens=16, temperature=1.0,
                                    top_p=0.95, seed=seed, n=n, extra_body={'top_k': 100})
    return [c.text for c in out.choices]

  first = sample(1234)
  assert sample(1234) == first
  assert sample(1235) != first
  three = sample(99, n=3)
  assert len(set(three)) == 3 and sample(99, n=3) == three
  assert three[0] == sample(99)[0]  # choice c uses seed + c


# ----------------------------------------------------------------------------- bad input


LONG = 'word ' * 400  # far beyond the 128-token context


@pytest.mark.parametrize('body,status,words', [
    (b'{"model": "run", "prompt": ', 400, ['not valid JSON']),
    (b'[1, 2, 3]', 400, ['body']),
    ({'model': 'run', 'prompt': 5}, 400, ['prompt']),
    ({'model': 'run'}, 400, ['prompt', 'Field required']),
    ({'model': 'gpt-9', 'prompt': 'x'}, 404, ['gpt-9', "'run'"]),
    ({'model': 'run', 'prompt': ''}, 400, ['prompt', 'empty']),
    ({'model': 'run', 'prompt': []}, 400, ['prompt', 'empty']),
    ({'model': 'run', 'prompt': LONG}, 400, ['prompt', 'context', '128']),
    ({'model': 'run', 'prompt': 'x', 'max_tokens': 0}, 400, ['max_tokens', 'greater than or equal to 1']),
    ({'model': 'run', 'prompt': 'x', 'max_tokens': 500}, 400, ['max_tokens', '128', 'at most']),
    ({'model': 'run', 'prompt': 'x', 'max_tokens': 'many'}, 400, ['max_tokens', 'integer']),
    ({'model': 'run', 'prompt': 'x', 'temperature': -1}, 400, ['temperature', '0']),
    ({'model': 'run', 'prompt': 'x', 'temperature': 2.5}, 400, ['temperature', '2']),
    ({'model': 'run', 'prompt': 'x', 'top_p': 0}, 400, ['top_p', 'greater than 0']),
    ({'model': 'run', 'prompt': 'x', 'top_p': 1.5}, 400, ['top_p', '1']),
    ({'model': 'run', 'prompt': 'x', 'top_k': -5}, 400, ['top_k', '-1']),
    ({'model': 'run', 'prompt': 'x', 'seed': -1}, 400, ['seed', '0']),
    ({'model': 'run', 'prompt': 'x', 'seed': 2 ** 40}, 400, ['seed', '4294967296']),
    ({'model': 'run', 'prompt': 'x', 'n': 99}, 400, ['n', '16']),
    ({'model': 'run', 'prompt': ['a'] * 3, 'n': 3}, 400, ['n', '9', '8']),
    ({'model': 'run', 'prompt': 'x', 'stop': ['a', 'b', 'c', 'd', 'e']}, 400, ['stop', '4']),
    ({'model': 'run', 'prompt': 'x', 'stop': ''}, 400, ['stop', '1 character']),
    ({'model': 'run', 'prompt': [999999]}, 400, ['prompt', 'vocabulary', '320']),
    ({'model': 'run', 'prompt': 'x', 'logprobs': 21}, 400, ['logprobs', '20']),
    ({'model': 'run', 'prompt': 'x', 'stream_options': {'include_usage': True}}, 400, ['stream_options']),
    ({'model': 'run', 'prompt': 'x' * 70000}, 413, ['65536']),
])
def test_bad_completion_requests_get_a_4xx_naming_the_field(server, body, status, words):
  if isinstance(body, bytes):
    r = httpx.post(server.url + '/v1/completions', content=body,
                   headers={**AUTH, 'Content-Type': 'application/json'})
  else:
    r = post(server, '/v1/completions', body)
  assert r.status_code == status, r.text
  message = r.json()['error']['message']
  for word in words:
    assert word in message, message


@pytest.mark.parametrize('body,words', [
    ({'model': 'run', 'messages': []}, ['messages', 'at least 1']),
    ({'model': 'run', 'messages': [{'role': 'wizard', 'content': 'x'}]}, ['role', 'user']),
    ({'model': 'run', 'messages': [{'role': 'user', 'content': 3}]}, ['content']),
    ({'model': 'run', 'messages': [{'role': 'user', 'content': 'x'}], 'max_tokens': 2,
      'max_completion_tokens': 3}, ['max_tokens', 'max_completion_tokens']),
    ({'model': 'run', 'messages': [{'role': 'user', 'content': LONG}]}, ['messages', 'context']),
])
def test_bad_chat_requests_get_a_400(server, body, words):
  r = post(server, '/v1/chat/completions', body)
  assert r.status_code == 400, r.text
  for word in words:
    assert word in r.json()['error']['message'], r.text


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) |
                    st.floats(allow_nan=False) | st.text(max_size=30),
                    lambda inner: st.lists(inner, max_size=4) |
                    st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
FIELDS = ['model', 'prompt', 'messages', 'max_tokens', 'max_completion_tokens', 'temperature', 'top_p',
          'top_k', 'n', 'seed', 'stop', 'stream', 'stream_options', 'logprobs', 'echo', 'user']
VALID = {'/v1/completions': {'model': 'run', 'prompt': 'hi', 'max_tokens': 3},
         '/v1/chat/completions': {'model': 'run', 'messages': [{'role': 'user', 'content': 'hi'}],
                                  'max_tokens': 3}}
SMALL = st.one_of(st.sampled_from([0, 1, 2, 3, -1, 16, 17, 127, 128, 2 ** 32, 0.5, 1.0, 2.0, 1e9,
                                   '', 'run', 'x', True, None, [], {}, [1, 2], ['a'], [[1]],
                                   [{'role': 'user', 'content': 'x'}], {'include_usage': True}]),
                  JSON)


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(sorted(VALID)),
       changes=st.dictionaries(st.sampled_from(FIELDS), SMALL, max_size=4),
       drop=st.lists(st.sampled_from(FIELDS), max_size=2), raw=st.none() | JSON | st.binary(max_size=40))
def test_fuzzed_bodies_never_get_a_5xx(server, path, changes, drop, raw):
  if raw is not None and not changes:
    content = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
  else:
    body = {**VALID[path], **changes}
    for field in drop:
      body.pop(field, None)
    content = json.dumps(body).encode()
  r = httpx.post(server.url + path, content=content, timeout=120,
                 headers={**AUTH, 'Content-Type': 'application/json'})
  assert r.status_code < 500, (content, r.status_code, r.text)
  if r.status_code >= 400:
    assert r.json()['error']['message'], r.text


# ----------------------------------------------------------------------------- load and metrics


def test_load_with_disconnects_and_a_full_queue_returns_every_page(server, client):
  before = server.metrics()
  rng = random.Random(0)
  results = []

  def one_client(i):
    body = {'model': 'run', 'prompt': f'{i} ' * rng.randint(1, 20), 'max_tokens': rng.randint(8, 60),
            'temperature': rng.choice([0, 0.8]), 'stream': True}
    disconnect_after = rng.choice([None, None, 1, 3])
    try:
      with httpx.stream('POST', server.url + '/v1/completions', json=body, headers=AUTH,
                        timeout=120) as r:
        if r.status_code != 200:
          r.read()
          results.append((r.status_code, r.headers.get('retry-after'), r.json()))
          return
        events = []
        for line in r.iter_lines():
          if line.startswith('data: '):
            events.append(line)
            if disconnect_after is not None and len(events) >= disconnect_after:
              results.append(('disconnected', None, None))
              return  # closing the response drops the connection mid-stream
        results.append((200, events[-1], None))
    except httpx.HTTPError as e:
      results.append(('error', repr(e), None))

  threads = [threading.Thread(target=one_client, args=(i,)) for i in range(24)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(180)
  kinds = [r[0] for r in results]
  assert len(results) == 24 and 'error' not in kinds, results
  assert kinds.count(429) > 0 and kinds.count('disconnected') > 0 and kinds.count(200) > 0, kinds
  for status, retry_after, body in results:
    if status == 429:
      assert retry_after == '1' and body['error']['code'] == 'rate_limit_exceeded'
    if status == 200:
      assert retry_after == 'data: [DONE]'
  # Every aborted or finished sequence gives its pages back; the server stays healthy.
  deadline = time.time() + 30
  while True:
    m = server.metrics()
    if value(m, 'stoker_running_sequences') == 0 and value(m, 'stoker_kv_pages', state='used') == 0:
      break
    assert time.time() < deadline, m
    time.sleep(0.1)
  total = value(m, 'stoker_kv_pages_total')
  assert total == ENGINE.num_pages - 1
  assert value(m, 'stoker_kv_pages', state='free') + value(m, 'stoker_kv_pages', state='cached') == total
  assert value(m, 'stoker_queue_length') == 0
  assert value(m, 'stoker_sequences_finished_total', reason='abort') > value(
      before, 'stoker_sequences_finished_total', reason='abort')
  rejected = value(m, 'stoker_requests_rejected_total') - value(before, 'stoker_requests_rejected_total')
  assert rejected == kinds.count(429)
  assert value(m, 'stoker_http_requests_total', route='/v1/completions', status='429') >= rejected
  assert httpx.get(server.url + '/health').json()['status'] == 'ready'
  assert client.completions.create(model='run', prompt='ok', max_tokens=2).usage.completion_tokens == 2


def test_metrics_parse_with_the_prometheus_parser(server):
  before, start = server.metrics(), time.perf_counter()
  post(server, '/v1/completions', {'model': 'run', 'prompt': PROMPTS[0] * 3, 'max_tokens': 2})
  post(server, '/v1/completions', {'model': 'run', 'prompt': PROMPTS[0] * 3, 'max_tokens': 2})
  wall, after = time.perf_counter() - start, server.metrics()
  # Alone on the server: at least one step per token, and time in Engine.step within the client's wall time.
  assert value(after, 'stoker_engine_steps_total') - value(before, 'stoker_engine_steps_total') >= 4
  stepping = value(after, 'stoker_engine_step_seconds_total') - value(before, 'stoker_engine_step_seconds_total')
  assert 0 < stepping < wall
  families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + '/metrics').text)}
  for name, kind in [('stoker_http_requests', 'counter'), ('stoker_time_to_first_token_seconds', 'histogram'),
                     ('stoker_time_between_tokens_seconds', 'histogram'), ('stoker_queue_length', 'gauge'),
                     ('stoker_running_sequences', 'gauge'), ('stoker_kv_pages', 'gauge'),
                     ('stoker_prefix_cache_hit_rate', 'gauge'), ('stoker_tokens_per_second', 'gauge'),
                     ('stoker_preemptions', 'counter'), ('stoker_engine_step_seconds', 'counter'),
                     ('stoker_fluidity_index', 'gauge')]:
    assert families[name].type == kind, name
  m = server.metrics()
  assert value(m, 'stoker_time_to_first_token_seconds_count') > 0
  assert value(m, 'stoker_time_between_tokens_seconds_count') > 0
  assert 0 < value(m, 'stoker_prefix_cache_hit_rate') < 1  # the repeated prompt hit the cache
  assert 0 <= value(m, 'stoker_fluidity_index') <= 1
  assert value(m, 'stoker_tokens_per_second') > 0
  assert value(m, 'stoker_ready') == 1


def test_every_answer_is_declared_in_openapi(server):
  """Every (route, status) the server counted while serving this module's tests (the openai client,
  raw HTTP, the fuzzer, the load test) is declared in /openapi.json for that route."""
  schema = httpx.get(server.url + '/openapi.json', headers=AUTH).json()
  seen = []
  for (name, labels), count in server.metrics().items():
    labels = dict(labels)
    if name != 'stoker_http_requests_total' or not count or labels['route'] == 'other':
      continue
    if labels['status'] == '499':  # the client went away: no answer was sent
      continue
    (method,) = schema['paths'].get(labels['route'], ['get'])  # one method a route (/docs: GET)
    seen.append((method, labels['route'], int(labels['status']), None))
  assert {status for *_, status, _ in seen} >= {200, 400, 401, 404, 413, 429, 503}, seen
  assert_declared(schema, seen)
  assert httpx.get(server.url + '/openapi.json').status_code == 401  # the key is set


# ----------------------------------------------------------------------------- shutdown (last)


def test_sigterm_drains_then_exits_0(server):
  t, events = long_stream(server.url, AUTH)
  server.proc.send_signal(signal.SIGTERM)
  signalled = time.time()
  time.sleep(0.3)
  # Draining answers 503, and so does readiness; liveness stays 200. A server that drained already
  # (a fast machine finishes the stream within the 0.3 s) has closed its socket: then the stream
  # must have ended normally.
  try:
    r = post(server, '/v1/completions', {'model': 'run', 'prompt': 'x'})
    assert r.status_code == 503 and 'shutting down' in r.json()['error']['message']
    ready, health = httpx.get(server.url + '/ready'), httpx.get(server.url + '/health')
    assert ready.status_code == 503 and 'shutting down' in ready.json()['detail'], ready.text
    assert health.status_code == 200 and health.json()['status'] == 'draining', health.text
  except httpx.ConnectError:
    t.join(30)
    assert events and events[-1] == 'data: [DONE]'
  t.join(30)
  assert time.time() - signalled < 3.0 + 5  # shutdown_timeout_s, then aborted
  assert server.proc.wait(30) == 0
  assert events[-1] == 'data: [DONE]'
  reason = json.loads(events[-2][6:])['choices'][0]['finish_reason']
  assert reason in ('length', 'abort')
  assert any('shut down' in line for line in server.stdout)
