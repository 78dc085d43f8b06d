"""The /v1 routes: completions and chat completions (streamed or not) and the model list.

A request becomes one engine sequence per (prompt, choice): choice c of prompt p is index
p * n + c in `choices`, and with a `seed` it samples with seed + c (so n > 1 gives n different
draws, each reproducible). Outputs come back from the driver thread onto this request's asyncio
queue; a client that disconnects (or a handler cancelled) aborts every sequence still running, so
its pages return to the pool at once.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import TYPE_CHECKING

import fastapi
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve.api import MAX_SEED, APIError, ChatCompletionRequest, CompletionRequest, error_body
from serve.chat import ChatTemplateError
from serve.driver import Sequence
from serve.engine import RequestOutput
from serve.sampling import SamplingParams
from serve.text import TextStream

if TYPE_CHECKING:
  from serve.server import Service

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


def add_v1_routes(app: fastapi.FastAPI, service: Service) -> None:

  def model_card():
    return {'id': service.name, 'object': 'model', 'created': service.created,
            'owned_by': 'stoker', 'max_model_len': context_len(service)}

  @app.get('/v1/models')
  async def list_models():
    service.require_ready()
    return {'object': 'list', 'data': [model_card()]}

  @app.get('/v1/models/{model:path}')
  async def get_model(model: str):
    service.require_ready()
    check_model(service, model)
    return model_card()

  @app.post('/v1/completions')
  async def completions(request: fastapi.Request, body: CompletionRequest):
    arrival = time.perf_counter()
    service.require_ready()
    check_model(service, body.model)
    codec = service.loaded.codec
    prompts = [codec.encode(p) if isinstance(p, str) else list(p) for p in body.prompts()]
    return await generate(request, service, body, prompts, body.max_tokens, arrival, chat=False)

  @app.post('/v1/chat/completions')
  async def chat_completions(request: fastapi.Request, body: ChatCompletionRequest):
    arrival = time.perf_counter()
    service.require_ready()
    check_model(service, body.model)
    messages = [{'role': m.role, 'content': m.text(), **({'name': m.name} if m.name else {})}
                for m in body.messages]
    try:
      text = service.loaded.chat.render(messages)
    except ChatTemplateError as e:
      raise APIError(400, f'messages: {e}', param='messages') from e
    prompt = service.loaded.codec.encode(text, add_special_tokens=False)
    return await generate(request, service, body, [prompt], body.token_limit, arrival, chat=True)


def context_len(service: Service) -> int:
  """Prompt + generated tokens one sequence may hold: its block table, and the whole pool."""
  c = service.loaded.engine.config
  return min(c.max_pages_per_seq, c.num_pages - 1) * c.page_size


def check_model(service: Service, model: str) -> None:
  if model != service.name:
    raise APIError(404, f'The model {model!r} does not exist: this server serves {service.name!r} '
                   '(GET /v1/models).', param='model', code='model_not_found')


def _max_tokens(service, prompts, limit, chat: bool) -> list[int]:
  """Each prompt's max_tokens, checking lengths against the context and the vocabulary."""
  context, vocab = context_len(service), service.loaded.engine.model_cfg.vocab_size
  field = 'messages' if chat else 'prompt'
  out = []
  for i, ids in enumerate(prompts):
    which = f'{field}[{i}]' if len(prompts) > 1 else field
    if not ids:
      raise APIError(400, f'{which} is empty (0 tokens); send at least one token.', param=field)
    if max(ids) >= vocab:
      raise APIError(400, f'{which} holds token id {max(ids)}; ids must be below the vocabulary '
                     f'size {vocab}.', param=field)
    remaining = context - len(ids)
    if remaining < 1:
      raise APIError(400, f'{which} has {len(ids)} tokens; the context holds {context} tokens '
                     'for prompt and completion together, so it must be at most '
                     f'{context - 1} tokens long.', param=field, code='context_length_exceeded')
    if limit is None:
      out.append(remaining if chat else min(DEFAULT_COMPLETION_TOKENS, remaining))
    elif limit > remaining:
      raise APIError(400, f'max_tokens ({limit}) + {which} ({len(ids)} tokens) = {limit + len(ids)} '
                     f'exceeds the context of {context} tokens; ask for at most {remaining} tokens.',
                     param='max_tokens', code='context_length_exceeded')
    else:
      out.append(limit)
  return out


async def generate(request, service: Service, body, prompts: list[list[int]], limit, arrival: float,
                   chat: bool):
  driver, codec = service.driver, service.loaded.codec
  max_tokens = _max_tokens(service, prompts, limit, chat)
  count = len(prompts) * body.n
  if count > driver.capacity:
    raise APIError(400, f'n ({body.n}) x prompts ({len(prompts)}) = {count} sequences exceeds the '
                   f'{driver.capacity} this server holds at once (running slots + max_waiting); '
                   'send fewer.', param='n')
  loop, queue = asyncio.get_running_loop(), asyncio.Queue()
  base = f'{"chatcmpl" if chat else "cmpl"}-{uuid.uuid4().hex}'
  seqs = []
  for p, ids in enumerate(prompts):
    for c in range(body.n):
      index = p * body.n + c
      try:
        params = SamplingParams(
            max_tokens=max_tokens[p], temperature=body.temperature, top_k=max(body.top_k, 0),
            top_p=body.top_p, seed=None if body.seed is None else (body.seed + c) % MAX_SEED,
            stop_token_ids=() if body.ignore_eos else codec.stop_token_ids, stop=body.stop_strings())
      except ValueError as e:  # the schema's ranges should already have caught it
        raise APIError(400, str(e)) from e

      def deliver(item, index=index):
        loop.call_soon_threadsafe(queue.put_nowait, (index, item))
      seqs.append(Sequence(f'{base}-{index}', ids, params, deliver, arrival))
  if not driver.try_submit(seqs):
    service.metrics.rejected.inc()
    raise APIError(429, f'The server is busy: {driver.outstanding} sequences are running or waiting '
                   f'and at most {driver.capacity} may (running slots + max_waiting); retry after '
                   f'{service.config.retry_after_s} s.', type='rate_limit_error',
                   code='rate_limit_exceeded',
                   headers={'Retry-After': str(service.config.retry_after_s)})
  reply = _Reply(service, base, chat, seqs, prompts, body.stop_strings())
  if body.stream:
    return StreamingResponse(reply.stream(queue, body.include_usage), media_type='text/event-stream',
                             headers={'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no'})
  return await reply.collect(queue, request)


class _Reply:
  """Turns one request's RequestOutputs into an OpenAI response or stream of chunks."""

  def __init__(self, service, request_id, chat, seqs, prompts, stop):
    self.service, self.id, self.chat, self.seqs = service, request_id, chat, seqs
    self.created, self.model = int(time.time()), service.name
    self.streams = [TextStream(service.loaded.codec.decode, stop) for _ in seqs]
    self.counts = [0] * len(seqs)
    self.reasons: list[str | None] = [None] * len(seqs)
    self.prompt_tokens = sum(len(p) for p in prompts)
    self.pending = set(range(len(seqs)))

  def _take(self, index: int, item) -> str:
    """Applies one output; returns its new text. Raises APIError for a failed sequence."""
    if isinstance(item, Exception):
      self.pending.discard(index)
      if isinstance(item, ValueError):
        raise APIError(400, f'the engine refused the request: {item}')
      raise APIError(500, f'{item}; the server restarts: retry the request.', type='server_error')
    assert isinstance(item, RequestOutput)
    self.counts[index] += len(item.new_token_ids)
    text = self.streams[index].push(item.new_token_ids, final=item.finished)
    if item.finished:
      self.pending.discard(index)
      self.reasons[index] = 'stop' if self.streams[index].stopped else item.finish_reason
    return text

  def _abort_pending(self) -> None:
    for index in self.pending:
      self.service.driver.abort(self.seqs[index].request_id)
    self.pending.clear()

  def usage(self) -> dict:
    done = sum(self.counts)
    return {'prompt_tokens': self.prompt_tokens, 'completion_tokens': done,
            'total_tokens': self.prompt_tokens + done}

  async def collect(self, queue: asyncio.Queue, request: fastapi.Request):
    try:
      while self.pending:
        try:
          index, item = await asyncio.wait_for(queue.get(), timeout=1.0)
        except asyncio.TimeoutError:
          if await request.is_disconnected():
            return Response(status_code=499)  # nobody reads it; counted as 'client closed'
          continue
        self._take(index, item)
    finally:
      self._abort_pending()
    if self.chat:
      choices = [{'index': i, 'message': {'role': 'assistant', 'content': s.sent},
                  'logprobs': None, 'finish_reason': self.reasons[i]}
                 for i, s in enumerate(self.streams)]
    else:
      choices = [{'index': i, 'text': s.sent, 'logprobs': None, 'finish_reason': self.reasons[i]}
                 for i, s in enumerate(self.streams)]
    return JSONResponse({'id': self.id, 'object': 'chat.completion' if self.chat else 'text_completion',
                         'created': self.created, 'model': self.model, 'choices': choices,
                         'usage': self.usage()})

  def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
    body = {'id': self.id, 'object': 'chat.completion.chunk' if self.chat else 'text_completion',
            'created': self.created, 'model': self.model, 'choices': choices}
    if usage is not None:
      body['usage'] = usage
    return f'data: {json.dumps(body, ensure_ascii=False, separators=(",", ":"))}\n\n'

  def _choice(self, index: int, text: str, reason: str | None) -> dict:
    if self.chat:
      return {'index': index, 'delta': {'content': text} if text else {}, 'logprobs': None,
              'finish_reason': reason}
    return {'index': index, 'text': text, 'logprobs': None, 'finish_reason': reason}

  async def stream(self, queue: asyncio.Queue, include_usage: bool):
    try:
      if self.chat:
        for i in range(len(self.seqs)):
          yield self._chunk([{'index': i, 'delta': {'role': 'assistant', 'content': ''},
                              'logprobs': None, 'finish_reason': None}])
      while self.pending:
        index, item = await queue.get()
        try:
          text = self._take(index, item)
        except APIError as e:
          yield f'data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n'
          break
        if self.reasons[index] is not None or text:
          yield self._chunk([self._choice(index, text, self.reasons[index])])
      if include_usage:
        yield self._chunk([], self.usage())
      yield 'data: [DONE]\n\n'
    finally:
      self._abort_pending()
