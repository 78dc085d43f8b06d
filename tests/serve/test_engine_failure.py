"""An engine that dies under load, end to end: `stoker serve` in a subprocess with the driver's fault
hook (ServerConfig.fail_after_steps) fails its engine while a stream and two non-streaming requests
run. The official `openai` client and raw HTTP see errors that say why, /health and /ready turn 503
with the reason, /metrics tells it, and the process exits 1 once its failure drain is over."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.openapi_check import assert_declared

pytestmark = pytest.mark.xdist_group('server')

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
API_KEY = 'sk-failure'
AUTH = {'Authorization': f'Bearer {API_KEY}'}
FAIL_AFTER = 600  # engine steps: the stream has run a while, and the others have joined it
DRAIN_S = 5.0
GIN = ['engine.num_pages=130', 'engine.page_size=8', 'engine.max_seqs=4',
       'engine.max_pages_per_seq=128', 'engine.token_budget=32', 'engine.min_bucket=32',
       f'server.fail_after_steps={FAIL_AFTER}', f'server.failure_drain_s={DRAIN_S}']
REASON = f'fail_after_steps={FAIL_AFTER}'  # what the injected fault says


def probe(url: str, path: str) -> tuple[int, dict, str]:
  r = httpx.get(url + path, timeout=30)
  return r.status_code, r.json(), r.headers['content-type']


def test_engine_failure_fails_requests_turns_probes_red_and_exits_1(server_workdir, tmp_path):
  log = open(tmp_path / 'server.log', 'w')
  proc = subprocess.Popen(
      [sys.executable, os.path.join(REPO, 'cli.py'), 'serve', '--checkpoint', server_workdir,
       '--port', '0', *[a for g in GIN for a in ('--gin_param', g)]],
      cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True,
      env={**os.environ, 'STOKER_API_KEY': API_KEY})  # the key from the environment, as in a pod
  try:
    line = proc.stdout.readline()
    assert line.startswith('Listening on http://127.0.0.1:'), (line, open(tmp_path / 'server.log').read())
    url = line.split()[2]
    seen = []  # (method, path, status, content type)
    # Loading: readiness and liveness both 503 "loading", with the reason.
    status, body, ctype = probe(url, '/ready')
    seen.append(('get', '/ready', status, ctype))
    assert status == 503 and body['status'] == 'loading' and body['detail'], body
    deadline = time.time() + 240
    while (status := probe(url, '/ready')[0]) != 200:
      assert time.time() < deadline and proc.poll() is None, open(tmp_path / 'server.log').read()
      time.sleep(0.05)
    status, body, ctype = probe(url, '/health')
    seen.append(('get', '/health', status, ctype))
    assert status == 200 and body['status'] == 'ready'

    client = openai.OpenAI(base_url=url + '/v1', api_key=API_KEY, max_retries=0, timeout=60)
    errors = {}
    first = threading.Event()

    def stream():
      chunks = client.completions.create(model='run', prompt='z', max_tokens=900, stream=True,
                                         extra_body={'ignore_eos': True})
      try:
        for _ in chunks:
          first.set()
      except openai.APIError as e:
        errors['stream'] = e
      first.set()

    def complete():
      try:
        client.completions.create(model='run', prompt='y', max_tokens=900,
                                  extra_body={'ignore_eos': True})
      except openai.APIStatusError as e:
        errors['openai'] = e

    def raw():
      r = httpx.post(url + '/v1/completions', headers=AUTH, timeout=60,
                     json={'model': 'run', 'prompt': 'x', 'max_tokens': 900, 'ignore_eos': True})
      errors['raw'] = r
      seen.append(('post', '/v1/completions', r.status_code, r.headers['content-type']))

    threads = [threading.Thread(target=stream)]
    threads[0].start()
    assert first.wait(60)
    threads += [threading.Thread(target=complete), threading.Thread(target=raw)]
    for t in threads[1:]:
      t.start()
    for t in threads:
      t.join(60)
    # In flight when the engine died: every one got an error naming the cause.
    assert REASON in str(errors['stream']), errors
    assert isinstance(errors['openai'], openai.InternalServerError), errors
    assert errors['openai'].status_code == 500 and REASON in errors['openai'].message
    seen.append(('post', '/v1/completions', 500, errors['openai'].response.headers['content-type']))
    assert errors['raw'].status_code == 500, errors['raw'].text
    error = errors['raw'].json()['error']
    assert error['type'] == 'server_error' and REASON in error['message'] and 'retry' in error['message']

    # Both probes red with the reason; /metrics says so; new requests get 503 with the reason.
    for path in ('/health', '/ready'):
      status, body, ctype = probe(url, path)
      seen.append(('get', path, status, ctype))
      assert status == 503 and body['status'] == 'failed' and REASON in body['detail'], body
    r = httpx.get(url + '/metrics', timeout=30)
    seen.append(('get', '/metrics', r.status_code, r.headers['content-type']))
    samples = {s.name: s for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert samples['stoker_ready'].value == 0
    info = samples['stoker_server_info']
    assert info.labels['state'] == 'failed' and REASON in info.labels['reason'], info
    with pytest.raises(openai.InternalServerError) as refused:
      client.completions.create(model='run', prompt='late', max_tokens=2)
    assert refused.value.status_code == 503 and REASON in refused.value.message
    seen.append(('post', '/v1/completions', 503, refused.value.response.headers['content-type']))
    schema = httpx.get(url + '/openapi.json', headers=AUTH, timeout=30).json()
    assert_declared(schema, seen)
    assert {status for _, _, status, _ in seen} >= {200, 500, 503}

    # After its drain, the process exits 1 (the orchestrator restarts it).
    start = time.time()
    assert proc.wait(DRAIN_S + 30) == 1
    assert time.time() - start < DRAIN_S + 30
    assert REASON in open(tmp_path / 'server.log').read() + proc.stdout.read()
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
