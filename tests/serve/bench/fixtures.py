"""Fixtures of the bench tests: a tiny trained tokenizer, and a scripted OpenAI-style SSE server on loopback
(aiohttp.web on a thread).

It is a fixture with known timing, not the thing under test. A prompt naming a SCRIPTS entry (or
'http_<status>') gets that script; any other prompt gets `max_tokens` tokens, the first after
FIRST_S and each later one TOKEN_S after the one before, served one request at a time (a one-slot
server, so queueing under load shows in TTFT as it would on a real one).
"""

import asyncio
import json
import threading

import numpy as np
from aiohttp import web

from data import tokenizer as tokenizer_lib

KEY = 'sekrit'
MODEL = 'scripted'
FIRST_S, TOKEN_S = 0.03, 0.01
SLOT = web.AppKey('slot', asyncio.Lock)


def chunk(text='', token_ids=None, finish=None):
  choice = {'index': 0, 'text': text, 'finish_reason': finish}
  if token_ids is not None:
    choice['token_ids'] = token_ids
  return {'id': 'c', 'object': 'text_completion', 'choices': [choice]}


# script name -> list of (sleep before, event dict | raw str)
SCRIPTS = {
    'stall': [(0.05, chunk('a')), (0.3, chunk('b')), (0.0, chunk('cde', token_ids=[3, 4, 5])),
              (0.0, chunk('', finish='length')),
              (0.0, {'choices': [], 'usage': {'prompt_tokens': 7, 'completion_tokens': 5}}), (0.0, '[DONE]')],
    'no_done': [(0.0, chunk('a'))],
    'midstream_error': [(0.0, chunk('a')), (0.0, {'error': {'message': 'engine died'}})],
    'slow': [(3.0, chunk('a')), (0.0, '[DONE]')],
    'empty': [(0.0, chunk('', finish='stop')), (0.0, '[DONE]')],
}


def _authorized(request):
  return request.headers.get('Authorization') == f'Bearer {KEY}'


async def _models(request):
  if not _authorized(request):
    return web.json_response({'error': {'message': 'bad key'}}, status=401)
  return web.json_response({'object': 'list', 'data': [{'id': MODEL, 'object': 'model'}]})


def _generic(body):
  n = body['max_tokens']
  events = [(FIRST_S if i == 0 else TOKEN_S, chunk(f' t{i}', finish='length' if i == n - 1 else None))
            for i in range(n)]
  usage = {'prompt_tokens': len(body['prompt'].split()), 'completion_tokens': n}
  return events + [(0.0, {'choices': [], 'usage': usage}), (0.0, '[DONE]')]


async def _completions(request):
  if not _authorized(request):
    return web.json_response({'error': {'message': 'bad key'}}, status=401)
  body = await request.json()
  assert body['stream'] is True and body['stream_options'] == {'include_usage': True}
  prompt = body['prompt']
  if prompt.startswith('http_'):
    status = int(prompt[5:])
    return web.json_response({'error': {'message': f'scripted {status}'}}, status=status)
  script = SCRIPTS.get(prompt)
  lock = request.app[SLOT] if script is None else None
  if lock is not None:
    await lock.acquire()
  try:
    response = web.StreamResponse(headers={'Content-Type': 'text/event-stream'})
    await response.prepare(request)
    for sleep, event in script or _generic(body):
      await asyncio.sleep(sleep)
      data = event if isinstance(event, str) else json.dumps(event)
      await response.write(f'data: {data}\n\n'.encode())
    await response.write_eof()
    return response
  finally:
    if lock is not None:
      lock.release()


class SSEServer:
  """start() -> the base URL (with /v1); stop() ends the loop."""

  def __init__(self):
    self.loop = asyncio.new_event_loop()
    self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

  def start(self) -> str:
    async def setup():
      app = web.Application()
      app[SLOT] = asyncio.Lock()
      app.add_routes([web.get('/v1/models', _models), web.post('/v1/completions', _completions)])
      runner = web.AppRunner(app)
      await runner.setup()
      site = web.TCPSite(runner, '127.0.0.1', 0)
      await site.start()
      return runner.addresses[0][1]
    port = self.loop.run_until_complete(setup())
    self.thread.start()
    return f'http://127.0.0.1:{port}/v1'

  def stop(self):
    self.loop.call_soon_threadsafe(self.loop.stop)
    self.thread.join(5)


def tiny_tokenizer():
  """A byte-level BPE trained in a blink on sentences of 20 words: every word is one token."""
  words = ['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'theta', 'kappa', 'lambda', 'sigma',
           'omega', 'river', 'stone', 'cloud', 'forest', 'garden', 'window', 'yellow', 'planet', 'engine']
  rng = np.random.default_rng(0)
  texts = [' '.join(rng.choice(words, 40)) + ', (x = 1).' for _ in range(200)]
  return tokenizer_lib.train_bpe(texts, 400)
