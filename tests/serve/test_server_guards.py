"""The server's guards against clients, on a server in this process driven by raw sockets and HTTP:
a non-streaming client that hangs up frees its pages at once, a stalled body upload gets 408 and
the connection closed, so do stalled headers (without an answer), idle keep-alive connections are
closed, connections past the cap get 503,
/docs and /openapi.json need the key, and every status and content type seen here is declared in
/openapi.json for its route. (The subprocess server: test_server.py; engine failure:
test_engine_failure.py.)"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time

import httpx2 as httpx
import pytest

from serve import loader, openapi
from serve.server import BackgroundServer, ServerConfig, Service
from tests.serve.openapi_check import assert_declared
from tests.serve.server_fixtures import ENGINE

pytestmark = pytest.mark.xdist_group('server')

API_KEY = 'sk-guards'
AUTH = {'Authorization': f'Bearer {API_KEY}'}
CONFIG = ServerConfig(port=0, api_key=API_KEY, header_timeout_s=1.5, body_timeout_s=0.5,
                      keep_alive_s=0.5, max_connections=6, max_body_bytes=4096)
# 1000-token sequences: a non-streaming request of 900 tokens runs long enough to hang up on.
LONG_ENGINE = dataclasses.replace(ENGINE, max_pages_per_seq=128, num_pages=130)
SEEN: list[tuple[str, str, int, str]] = []  # (method, path, status, content type) of real answers


@pytest.fixture(scope='module')
def background(server_workdir):
  service = Service(CONFIG, lambda: loader.load_checkpoint(server_workdir, LONG_ENGINE))
  server = BackgroundServer(service).start()
  server.wait_ready(120)
  yield server
  server.stop()


def record(method: str, path: str, r: httpx.Response) -> httpx.Response:
  SEEN.append((method, path, r.status_code, r.headers.get('content-type', '')))
  return r


def request(server, method, path, route=None, **kw) -> httpx.Response:
  r = httpx.request(method, server.url + path, timeout=60, **kw)
  return record(method.lower(), route or path, r)


def connect(server) -> socket.socket:
  return socket.create_connection(('127.0.0.1', server.port), timeout=10)


def read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
  """One HTTP/1.1 response with a Content-Length: (status, headers, body)."""
  data = b''
  while b'\r\n\r\n' not in data:
    chunk = sock.recv(65536)
    assert chunk, f'connection closed before a response: {data!r}'
    data += chunk
  head, body = data.split(b'\r\n\r\n', 1)
  lines = head.decode('latin-1').split('\r\n')
  headers = dict(line.split(': ', 1) for line in lines[1:])
  headers = {k.lower(): v for k, v in headers.items()}
  while len(body) < int(headers['content-length']):
    body += sock.recv(65536)
  return int(lines[0].split()[1]), headers, body


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
  sock.settimeout(within_s)
  try:
    return sock.recv(1) == b''
  except socket.timeout:
    return False
  except ConnectionResetError:
    return True


def post_bytes(path: str, body: bytes, content_length: int | None = None) -> bytes:
  n = len(body) if content_length is None else content_length
  return (f'POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n'
          f'Content-Type: application/json\r\nContent-Length: {n}\r\n\r\n').encode() + body


def test_a_non_streaming_client_that_hangs_up_frees_its_pages_at_once(background):
  driver = background.service.driver
  body = json.dumps({'model': 'run', 'prompt': 'z', 'max_tokens': 900, 'ignore_eos': True}).encode()
  sock = connect(background)
  sock.sendall(post_bytes('/v1/completions', body))
  deadline = time.perf_counter() + 30
  while driver.snapshot.get('pages_used', 0) == 0:
    assert time.perf_counter() < deadline, driver.snapshot
    time.sleep(0.001)
  # Watch the engine step for 0.3 s: the longest step seen bounds what the abort may wait for.
  steps, last, longest = driver.snapshot['steps'], time.perf_counter(), 0.0
  end = last + 0.3
  while time.perf_counter() < end:
    now, count = time.perf_counter(), driver.snapshot['steps']
    if count != steps:
      steps, longest, last = count, max(longest, now - last), now
    time.sleep(0.0005)
  longest = max(longest, time.perf_counter() - last)
  assert driver.snapshot['pages_used'] > 0 and steps > 10  # still running: 900 tokens take longer
  aborted = background.service.metrics.finished.labels('abort')._value.get()
  sock.close()
  closed = polled = time.perf_counter()
  blind = 0.0  # the longest gap between two looks: a stall of this process hides the moment
  while driver.snapshot['pages_used'] > 0:
    assert time.perf_counter() - closed < 5, 'pages still held 5 s after the client hung up'
    time.sleep(0.0005)
    now = time.perf_counter()
    blind, polled = max(blind, now - polled), now
  latency = time.perf_counter() - closed
  print(f'disconnect -> pages free: {latency * 1e3:.1f} ms (longest step seen {longest * 1e3:.1f} ms, '
        f'longest gap between looks {blind * 1e3:.1f} ms)')
  assert latency < 0.1 + longest + blind, (latency, longest, blind)
  assert background.service.metrics.finished.labels('abort')._value.get() == aborted + 1
  allocator = background.service.loaded.engine.scheduler.allocator
  assert driver.snapshot['pages_free'] + driver.snapshot['pages_cached'] == allocator.total


def test_a_stalled_body_upload_gets_408_and_the_connection_closed(background):
  sock = connect(background)
  start = time.perf_counter()  # before the send: the server's clock starts once the headers arrive
  sock.sendall(post_bytes('/v1/completions', b'{"model": "run", ', content_length=200))
  status, headers, body = read_response(sock)
  waited = time.perf_counter() - start
  SEEN.append(('post', '/v1/completions', status, headers.get('content-type', '')))
  assert status == 408, body
  error = json.loads(body)['error']
  assert 'body_timeout_s' in error['message'] and error['code'] == 'request_timeout'
  assert CONFIG.body_timeout_s <= waited < CONFIG.body_timeout_s + 2
  assert closed_by_server(sock, 2)
  sock.close()


def test_stalled_headers_get_the_connection_closed(background):
  silent, partial = connect(background), connect(background)
  partial.sendall(b'POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le')
  start = time.perf_counter()
  assert not closed_by_server(partial, CONFIG.header_timeout_s / 2)  # a slow client has a while,
  for sock in (partial, silent):  # then the connection goes, whether it sent nothing or a part
    assert closed_by_server(sock, CONFIG.header_timeout_s + 2)
    sock.close()
  assert time.perf_counter() - start < CONFIG.header_timeout_s + 2


def test_idle_keep_alive_connections_are_closed(background):
  sock = connect(background)
  sock.sendall(f'GET /health HTTP/1.1\r\nHost: x\r\n\r\n'.encode())
  status, headers, _ = read_response(sock)
  SEEN.append(('get', '/health', status, headers['content-type']))
  assert status == 200 and headers.get('connection', 'keep-alive') != 'close'
  assert not closed_by_server(sock, CONFIG.keep_alive_s / 2)  # kept alive a while,
  assert closed_by_server(sock, CONFIG.keep_alive_s + 2)  # then closed
  sock.close()


def test_connections_past_the_cap_get_503(background):
  idle = [connect(background) for _ in range(CONFIG.max_connections)]
  try:
    deadline = time.time() + 10
    while (r := request(background, 'GET', '/health')).status_code == 200:  # until all are accepted
      assert time.time() < deadline, 'no 503 with every connection taken'
      time.sleep(0.05)
    assert r.status_code == 503 and r.headers['content-type'].startswith('text/plain'), r.text
  finally:
    for sock in idle:
      sock.close()
  time.sleep(0.2)
  assert request(background, 'GET', '/health').status_code == 200


def test_docs_and_openapi_need_the_key(background):
  for path in ('/docs', '/openapi.json', '/redoc'):
    r = httpx.get(background.url + path)
    assert r.status_code == 401 and r.json()['error']['code'] == 'invalid_api_key', (path, r.text)
    assert httpx.get(background.url + path, headers=AUTH).status_code == 200, path
  for path in ('/health', '/ready', '/metrics'):  # probes and scrapers carry no key
    assert request(background, 'GET', path).status_code == 200, path
  request(background, 'GET', '/openapi.json', headers={'Authorization': 'Bearer wrong'})


def test_every_status_and_content_type_seen_is_declared_in_openapi(background):
  url = background.url
  request(background, 'GET', '/v1/models', headers=AUTH)
  request(background, 'GET', '/v1/models/run', '/v1/models/{model}', headers=AUTH)
  request(background, 'GET', '/v1/models/nope', '/v1/models/{model}', headers=AUTH)
  request(background, 'GET', '/v1/models')  # no key: 401
  body = {'model': 'run', 'prompt': 'a', 'max_tokens': 3}
  request(background, 'POST', '/v1/completions', json=body, headers=AUTH)
  request(background, 'POST', '/v1/completions', json={**body, 'stream': True}, headers=AUTH)
  request(background, 'POST', '/v1/completions', json={**body, 'model': 'nope'}, headers=AUTH)
  request(background, 'POST', '/v1/completions', json={**body, 'max_tokens': 0}, headers=AUTH)
  request(background, 'POST', '/v1/completions', json={**body, 'prompt': 'x' * 5000}, headers=AUTH)
  chat = {'model': 'run', 'messages': [{'role': 'user', 'content': 'hi'}], 'max_tokens': 3}
  request(background, 'POST', '/v1/chat/completions', json=chat, headers=AUTH)
  request(background, 'POST', '/v1/chat/completions', json={**chat, 'messages': []}, headers=AUTH)
  request(background, 'POST', '/tokenize', json={'model': 'run', 'prompt': 'hi'}, headers=AUTH)
  request(background, 'POST', '/tokenize', json={'model': 'nope', 'prompt': 'hi'}, headers=AUTH)
  request(background, 'POST', '/tokenize', json={'prompt': 5}, headers=AUTH)
  request(background, 'POST', '/detokenize', json={'tokens': [1, 2]}, headers=AUTH)
  request(background, 'GET', '/tokenizer.json', headers=AUTH)
  request(background, 'GET', '/openapi.json', headers=AUTH)
  statuses = {status for _, _, status, _ in SEEN}
  assert {200, 400, 401, 404, 413} <= statuses, statuses  # 408 and 503: from the tests above
  assert {(p, code) for _, p, code, _ in SEEN} >= {('/tokenize', 200), ('/tokenize', 400),
                                                   ('/tokenize', 404), ('/detokenize', 200)}
  schema = httpx.get(url + '/openapi.json', headers=AUTH).json()
  assert_declared(schema, SEEN)
  metrics = schema['paths']['/metrics']['get']['responses']['200']['content']
  assert list(metrics) == [openapi.PROMETHEUS_TEXT]
  assert all(ct == openapi.PROMETHEUS_TEXT for _, path, status, ct in SEEN
             if path == '/metrics' and status == 200)
