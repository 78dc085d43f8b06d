"""serve/bench/client.py against a scripted SSE server on loopback (aiohttp.web in a thread).

The server here is a fixture with known timing, not the thing under test: each prompt names a script
(token chunks and the sleeps between them, or an error), so the client's recorded times, chunk
accounting and error kinds can be checked against what was sent.
"""

import asyncio
import socket

import pytest

from serve.bench import client
from serve.bench.workload import RequestSpec
from tests.serve.bench.fixtures import KEY, SSEServer


@pytest.fixture(scope='module')
def server():
  s = SSEServer()
  yield s.start()
  s.stop()


def _run(url, prompts, arrivals=None, timeout_s=10.0):
  endpoint = client.Endpoint(url, 'scripted', KEY, timeout_s=timeout_s)
  specs = [RequestSpec(i, (arrivals or [0.0] * len(prompts))[i], 8, 16) for i in range(len(prompts))]
  return asyncio.run(client.run_requests(endpoint, specs, prompts, progress=False))


def test_token_times_chunks_and_usage(server):
  (record,), wall_s = _run(server, ['stall'])
  assert record.ok, record.error_message
  t = record.token_offsets_us
  assert len(t) == 5  # a, b, then one chunk carrying three tokens (token_ids): one gap and two zeros
  # Offsets from the moment the request was sent: never before the server's cumulative sleeps (a
  # busy client may read token a late, which shortens the a -> b gap, so gaps are not bounded below).
  assert 50_000 <= t[0] < 1_000_000
  assert 350_000 <= t[1] and t[1] - t[0] < 1_300_000
  assert t[2] - t[1] >= 0 and t[3] == t[2] and t[4] == t[2]
  assert (record.prompt_tokens_reported, record.output_tokens_reported) == (7, 5)
  assert record.finish_reason == 'length' and record.status == 200
  assert wall_s >= 0.35


def test_arrival_schedule_is_kept(server):
  records, _ = _run(server, ['empty', 'empty', 'empty'], arrivals=[0.0, 0.25, 0.5])
  sent = [r.sent_us for r in records]
  assert sent[1] - sent[0] >= 240_000 and sent[2] - sent[1] >= 240_000
  assert sent[2] < 2_000_000


def test_error_kinds_are_recorded(server):
  prompts = ['http_500', 'http_429', 'http_400', 'no_done', 'midstream_error', 'empty']
  records, _ = _run(server, prompts)
  assert [r.error for r in records] == ['http_5xx', 'rate_limited', 'http_4xx', 'incomplete', 'stream',
                                       'no_tokens']
  assert 'scripted 500' in records[0].error_message and records[0].status == 500
  assert 'engine died' in records[4].error_message
  (slow,), _ = _run(server, ['slow'], timeout_s=0.5)
  assert slow.error == 'timeout'
  (denied,), _ = asyncio.run(client.run_requests(client.Endpoint(server, 'scripted', 'wrong'),
                                                 [RequestSpec(0, 0.0, 8, 16)], ['stall'], progress=False))
  assert denied.error == 'auth' and denied.status == 401


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_check_names_the_problem(server):
  assert asyncio.run(client.check(client.Endpoint(server, None, KEY))) == 'scripted'
  with pytest.raises(client.BenchError, match='pass --api-key'):
    asyncio.run(client.check(client.Endpoint(server, None, None)))
  with pytest.raises(client.BenchError, match='check --api-key'):
    asyncio.run(client.check(client.Endpoint(server, None, 'wrong')))
  with pytest.raises(client.BenchError, match=r"serves \['scripted'\]"):
    asyncio.run(client.check(client.Endpoint(server, 'other', KEY)))
  dead = f'http://127.0.0.1:{_free_port()}'
  with pytest.raises(client.BenchError, match='cannot reach'):
    asyncio.run(client.check(client.Endpoint(dead)))
  (record,), _ = asyncio.run(client.run_requests(client.Endpoint(dead, 'm'), [RequestSpec(0, 0.0, 8, 16)],
                                                 ['x'], progress=False))
  assert record.error == 'connect'
  with pytest.raises(client.BenchError, match='http://'):
    client.Endpoint('127.0.0.1:8000')
