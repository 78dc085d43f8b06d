"""The streaming HTTP client: sends a workload's requests at their arrival times to an OpenAI-compatible
server and records, per request, the arrival time of every output token.

A token's time is when its chunk reached the client, in integer microseconds since that request was sent.
A chunk carries as many tokens as its `logprobs.tokens` (or a `token_ids` list) names, else one if it has
text: all of them share the chunk's time (one gap, then zeros). When the server reports usage, the
reported completion tokens are kept beside the counted ones so a mismatch shows. Failures are recorded
by kind (ERROR_KINDS), never dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Sequence

import aiohttp
import tqdm

from serve.bench.workload import RequestSpec

ERROR_KINDS = ('connect', 'timeout', 'auth', 'rate_limited', 'http_4xx', 'http_5xx', 'stream', 'incomplete',
               'no_tokens')
APIS = ('completions', 'chat')


class BenchError(ValueError):
  """The endpoint cannot be benchmarked (unreachable, refuses the key, unknown model): the message says why."""


@dataclasses.dataclass(frozen=True)
class Endpoint:
  url: str  # http://host:port, with or without /v1
  model: str | None = None  # None: the first model the server lists
  api_key: str | None = None
  api: str = 'completions'
  timeout_s: float = 600.0  # per request
  temperature: float = 0.0
  ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens
  extra_body: tuple[tuple[str, object], ...] = ()  # more request fields, as (key, value) pairs

  def __post_init__(self):
    url = self.url.rstrip('/')
    url = url[:-3] if url.endswith('/v1') else url
    if not url.startswith(('http://', 'https://')):
      raise BenchError(f'--url {self.url!r}: give an http:// or https:// URL such as http://127.0.0.1:8000.')
    object.__setattr__(self, 'url', url)
    if self.api not in APIS:
      raise BenchError(f'--api {self.api!r}: use one of {", ".join(APIS)}.')

  def headers(self) -> dict[str, str]:
    return {'Authorization': f'Bearer {self.api_key}'} if self.api_key else {}

  def payload(self, prompt: str, max_tokens: int) -> dict:
    body = {'model': self.model, 'max_tokens': max_tokens, 'stream': True, 'temperature': self.temperature,
            'stream_options': {'include_usage': True}}
    if self.api == 'chat':
      body['messages'] = [{'role': 'user', 'content': prompt}]
    else:
      body['prompt'] = prompt
    if self.ignore_eos:
      body['ignore_eos'] = True
    body.update(dict(self.extra_body))
    return body


@dataclasses.dataclass
class RequestRecord:
  """What happened to one request. Times in integer microseconds."""
  index: int
  arrival_s: float  # scheduled, from the start of the run
  prompt_tokens: int  # requested
  max_tokens: int  # requested output tokens
  sent_us: int = 0  # from the start of the run
  token_offsets_us: list[int] = dataclasses.field(default_factory=list)  # per token, from sent_us
  prompt_tokens_reported: int | None = None  # the server's usage
  output_tokens_reported: int | None = None
  finish_reason: str | None = None
  status: int | None = None  # HTTP status
  error: str | None = None  # one of ERROR_KINDS
  error_message: str | None = None

  @property
  def ok(self) -> bool:
    return self.error is None


def _chunk_tokens(choice: dict, api: str) -> int:
  logprobs = choice.get('logprobs') or {}
  if isinstance(logprobs.get('tokens'), list):
    return len(logprobs['tokens'])
  if isinstance(logprobs.get('content'), list):  # chat logprobs
    return len(logprobs['content'])
  if isinstance(choice.get('token_ids'), list):
    return len(choice['token_ids'])
  text = (choice.get('delta') or {}).get('content') if api == 'chat' else choice.get('text')
  return 1 if text else 0


def _http_error(status: int) -> str:
  return ('auth' if status in (401, 403) else 'rate_limited' if status == 429 else
          'http_5xx' if status >= 500 else 'http_4xx')


async def _stream(session: aiohttp.ClientSession, endpoint: Endpoint, prompt: str,
                  record: RequestRecord, start_ns: int) -> None:
  url = f'{endpoint.url}/v1/{"chat/completions" if endpoint.api == "chat" else "completions"}'
  sent = time.perf_counter_ns()
  record.sent_us = (sent - start_ns) // 1000
  async with session.post(url, json=endpoint.payload(prompt, record.max_tokens),
                          headers=endpoint.headers()) as response:
    record.status = response.status
    if response.status != 200:
      record.error, record.error_message = _http_error(response.status), (await response.text())[:500]
      return
    done = False
    async for raw in response.content:
      now = time.perf_counter_ns()
      line = raw.decode('utf-8', 'replace').strip()
      if not line.startswith('data:'):
        continue  # blank separators, comments, event names
      data = line[5:].strip()
      if data == '[DONE]':
        done = True
        break
      try:
        event = json.loads(data)
      except json.JSONDecodeError:
        record.error, record.error_message = 'stream', f'not JSON: {data[:200]}'
        return
      if 'error' in event:
        record.error, record.error_message = 'stream', json.dumps(event['error'])[:500]
        return
      for choice in event.get('choices') or []:
        k = _chunk_tokens(choice, endpoint.api)
        record.token_offsets_us.extend([(now - sent) // 1000] * k)
        record.finish_reason = choice.get('finish_reason') or record.finish_reason
      usage = event.get('usage')
      if usage:
        record.prompt_tokens_reported = usage.get('prompt_tokens')
        record.output_tokens_reported = usage.get('completion_tokens')
    if not done:
      record.error, record.error_message = 'incomplete', 'the stream ended without data: [DONE]'
    elif not record.token_offsets_us:
      record.error, record.error_message = 'no_tokens', 'the stream finished without a token'


async def _one(session, endpoint, prompt, record, start_ns, slots: asyncio.Semaphore | None) -> RequestRecord:
  try:
    if slots is None:
      await _stream(session, endpoint, prompt, record, start_ns)
    else:
      async with slots:  # a request waiting for a slot is not sent yet: its times start once it is
        await _stream(session, endpoint, prompt, record, start_ns)
  except asyncio.TimeoutError:
    record.error, record.error_message = 'timeout', f'no answer within --timeout {endpoint.timeout_s} s'
  except aiohttp.ClientConnectorError as e:
    record.error, record.error_message = 'connect', str(e)
  except aiohttp.ClientError as e:  # the server closed the connection or sent a broken response
    record.error, record.error_message = 'incomplete', f'{type(e).__name__}: {e}'
  return record


def _session(endpoint: Endpoint) -> aiohttp.ClientSession:
  timeout = aiohttp.ClientTimeout(total=endpoint.timeout_s, sock_connect=10)
  return aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0))


async def fetch_tokenizer(endpoint: Endpoint):
  """The tokenizer a Stoker server serves (GET /tokenizer.json), as a tokenizers.Tokenizer; BenchError naming
  the fix (--tokenizer) when the server does not serve one."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  async with _session(endpoint) as session:
    try:
      async with session.get(f'{endpoint.url}/tokenizer.json', headers=endpoint.headers()) as response:
        body, status = await response.text(), response.status
    except (aiohttp.ClientConnectorError, asyncio.TimeoutError) as e:
      raise BenchError(f'cannot reach {endpoint.url} ({e}): is the server running there?') from None
  if status != 200:
    raise BenchError(f'GET {endpoint.url}/tokenizer.json answered HTTP {status} (a server other than Stoker\'s '
                     'does not serve its tokenizer): pass --tokenizer with its tokenizer.json or directory.')
  try:
    return tokenizers.Tokenizer.from_str(body)
  except Exception as e:  # tokenizers raises a bare Exception for any parse error
    raise BenchError(f'GET {endpoint.url}/tokenizer.json is not a tokenizer.json ({e}): pass --tokenizer.') from None


async def check(endpoint: Endpoint, wait_ready_s: float = 0.0, log=None) -> str:
  """The model to use, after checking that the endpoint answers and accepts the key (BenchError if not).
  A server answering 503 (still loading or compiling) is asked again for up to wait_ready_s seconds."""
  deadline = time.monotonic() + wait_ready_s
  async with _session(endpoint) as session:
    while True:
      try:
        async with session.get(f'{endpoint.url}/v1/models', headers=endpoint.headers()) as response:
          body = await response.text()
          status = response.status
      except (aiohttp.ClientConnectorError, asyncio.TimeoutError) as e:
        raise BenchError(f'cannot reach {endpoint.url} ({e}): is the server running there '
                         '(for example `stoker serve --port 8000`)?') from None
      if status != 503 or time.monotonic() >= deadline:
        break
      if log is not None:
        log(f'{endpoint.url} answers 503 (loading?); asking again for up to {wait_ready_s:.0f} s')
        log = None
      await asyncio.sleep(1.0)
  if status in (401, 403):
    hint = 'check --api-key' if endpoint.api_key else 'the server wants a key: pass --api-key'
    raise BenchError(f'{endpoint.url} refused the request with HTTP {status} ({body[:200]}): {hint}.')
  if status != 200:
    raise BenchError(f'GET {endpoint.url}/v1/models answered HTTP {status}: {body[:300]}')
  try:
    models = [m['id'] for m in json.loads(body)['data']]
  except (ValueError, KeyError, TypeError):
    raise BenchError(f'GET {endpoint.url}/v1/models did not answer an OpenAI model list: {body[:300]}') from None
  if endpoint.model is None:
    if not models:
      raise BenchError(f'{endpoint.url} serves no model.')
    return models[0]
  if endpoint.model not in models:
    raise BenchError(f'--model {endpoint.model!r} is not served by {endpoint.url}; it serves {models}.')
  return endpoint.model


async def run_requests(endpoint: Endpoint, specs: Sequence[RequestSpec], prompts: Sequence[str],
                       max_concurrency: int | None = None, progress: bool = True,
                       description: str = 'bench') -> tuple[list[RequestRecord], float]:
  """Sends every request at its arrival time; returns the records and the run's wall time (s)."""
  records = [RequestRecord(s.index, s.arrival_s, s.prompt_tokens, s.output_tokens) for s in specs]
  bar = tqdm.tqdm(total=len(specs), desc=description, unit='req', disable=not progress, leave=False)
  errors = 0

  def finished(task):
    nonlocal errors
    errors += not task.result().ok
    bar.update(1)
    if errors:
      bar.set_postfix(errors=errors)

  slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
  async with _session(endpoint) as session:
    start = time.perf_counter_ns()
    tasks = []
    for record, prompt in zip(records, prompts):
      delay = record.arrival_s - (time.perf_counter_ns() - start) / 1e9
      if delay > 0:
        await asyncio.sleep(delay)
      task = asyncio.create_task(_one(session, endpoint, prompt, record, start, slots))
      task.add_done_callback(finished)
      tasks.append(task)
    await asyncio.gather(*tasks)
    wall_s = (time.perf_counter_ns() - start) / 1e9
  bar.close()
  return records, wall_s
