"""The /v1 routes: completions and chat completions (streamed or not) and the model list; and
vLLM's /tokenize and /detokenize, with GET /tokenizer.json (the server's tokenizer, for `stoker
bench`).

LoRA adapters (serve/lora.py): `model` names the base or a loaded adapter (any other name: 404 in
OpenAI's shape); /v1/models lists the adapters with `parent` = the base, as vLLM does; vLLM's
POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter {lora_name} add and
remove them while serving (a bad adapter: 400 naming the problem; unloading an unknown one: 404).

A request becomes one engine sequence per (prompt, choice): choice c of prompt p is index
p * n + c in `choices`, and with a `seed` it samples with seed + c (so n > 1 gives n different
draws, each reproducible). Outputs come back from the driver thread onto this request's asyncio
queue; a client that disconnects (or a handler cancelled) aborts every sequence still running, so
its pages return to the pool at once.

Off the event loop: tokenization, chat rendering and grammar compilation run on a small thread
pool (`off_loop`), and detokenization and logprob strings on the engine driver's thread (the
deliver callback runs serve/choices.Choice.take), so a long prompt never stalls other streams.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import fastapi
import pydantic
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve import choices as choices_lib
from serve import loader
from serve import grammar as grammar_lib
from serve.api import (MAX_SEED, APIError, ChatCompletionRequest, ChatMessage, CompletionRequest,
                       error_body)
from data.chat import ChatTemplateError
from serve.driver import Sequence
from serve.engine import RequestOutput
from serve.sampling import SamplingParams

if TYPE_CHECKING:
  from serve.server import Service

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
# Tokenization, chat rendering, grammar compilation: a few threads beside the event loop.
_TEXT_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix='stoker-text')


async def off_loop(fn, *args, **kwargs):
  """fn(*args, **kwargs) on the text thread pool, awaited."""
  return await asyncio.get_running_loop().run_in_executor(
      _TEXT_POOL, functools.partial(fn, *args, **kwargs))


class TokenizeRequest(pydantic.BaseModel):
  """POST /tokenize (vLLM's shape): a `prompt`, or chat `messages` rendered by the chat template."""

  model_config = pydantic.ConfigDict(extra='forbid')
  model: str | None = None
  prompt: str | None = None
  messages: list[ChatMessage] | None = None
  add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
  add_generation_prompt: bool = True
  return_token_strs: bool = False

  @pydantic.model_validator(mode='after')
  def _one_input(self):
    if (self.prompt is None) == (self.messages is None):
      raise ValueError('send exactly one of prompt and messages.')
    return self


class LoadLoRARequest(pydantic.BaseModel):
  """POST /v1/load_lora_adapter (vLLM's shape): a PEFT adapter directory or a LoRA run's workdir."""

  model_config = pydantic.ConfigDict(extra='forbid')
  lora_name: str
  lora_path: str


class UnloadLoRARequest(pydantic.BaseModel):
  """POST /v1/unload_lora_adapter (vLLM's shape)."""

  model_config = pydantic.ConfigDict(extra='forbid')
  lora_name: str
  lora_int_id: int | None = None  # vLLM's; unused


class DetokenizeRequest(pydantic.BaseModel):
  """POST /detokenize (vLLM's shape)."""

  model_config = pydantic.ConfigDict(extra='forbid')
  model: str | None = None
  tokens: list[pydantic.conint(ge=0)]


def _messages(body) -> list[dict[str, Any]]:
  return [{'role': m.role, 'content': m.text(), **({'name': m.name} if m.name else {})}
          for m in body.messages]


def render_and_encode(loaded, messages, add_generation_prompt: bool = True,
                      add_special_tokens: bool = False) -> list[int]:
  """The chat prompt's tokens (runs off the loop). ChatTemplateError for a bad conversation."""
  text = loaded.chat.render(messages, add_generation_prompt=add_generation_prompt)
  return loaded.codec.encode(text, add_special_tokens=add_special_tokens)


_ERROR = {'application/json': {'schema': {'$ref': '#/components/schemas/ErrorResponse'}}}
# Statuses of the tokenizer routes beyond those every route declares (serve/openapi.py).
TOKENIZER_RESPONSES = {
    400: {'description': 'The request is invalid; the message names the field.', 'content': _ERROR},
    404: {'description': 'No such model.', 'content': _ERROR},
}
LORA_RESPONSES = {
    400: {'description': 'The adapter cannot be served; the message says why.', 'content': _ERROR},
    404: {'description': 'No such adapter.', 'content': _ERROR},
}


def add_v1_routes(app: fastapi.FastAPI, service: Service) -> None:

  def model_card(adapter: str | None = None):
    card = {'id': service.name, 'object': 'model', 'created': service.created,
            'owned_by': 'stoker', 'root': service.name, 'parent': None,
            'max_model_len': context_len(service)}
    if adapter is not None:
      card.update(id=adapter, root=service.loaded.engine.adapters.get(adapter).source,
                  parent=service.name)
    return card

  @app.get('/v1/models')
  async def list_models():
    service.require_ready()
    names = service.loaded.engine.adapters.names()
    return {'object': 'list', 'data': [model_card()] + [model_card(n) for n in names]}

  @app.get('/v1/models/{model:path}')
  async def get_model(model: str):
    service.require_ready()
    return model_card(check_model(service, model))

  @app.post('/v1/load_lora_adapter', responses=LORA_RESPONSES)
  async def load_lora_adapter(body: LoadLoRARequest):
    service.require_ready()
    engine = service.loaded.engine
    if body.lora_name == service.name:
      raise APIError(400, f'lora_name {body.lora_name!r} is the base model\'s name; pick another.',
                     param='lora_name')
    try:
      adapters, config = await off_loop(loader.read_adapter, body.lora_path, engine.model_cfg)
      engine.adapters.register(body.lora_name, adapters, config, source=body.lora_path)
    except (ValueError, FileNotFoundError) as e:
      raise APIError(400, f'LoRA adapter {body.lora_name!r} from {body.lora_path!r}: {e}',
                     param='lora_path') from e
    return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.",
                    media_type='text/plain')

  @app.post('/v1/unload_lora_adapter', responses=LORA_RESPONSES)
  async def unload_lora_adapter(body: UnloadLoRARequest):
    service.require_ready()
    try:
      service.loaded.engine.adapters.unregister(body.lora_name)
    except KeyError:
      raise APIError(404, f'The LoRA adapter {body.lora_name!r} is not loaded (GET /v1/models).',
                     type='not_found_error', param='lora_name', code='lora_not_found') from None
    return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.",
                    media_type='text/plain')

  @app.post('/v1/completions')
  async def completions(request: fastapi.Request, body: CompletionRequest):
    arrival = time.perf_counter()
    service.require_ready()
    adapter = check_model(service, body.model)
    codec = service.loaded.codec
    given = body.prompts()
    prompts = await off_loop(lambda: [codec.encode(p) if isinstance(p, str) else list(p)
                                      for p in given])
    echoes = None
    if body.echo:
      echoes = await off_loop(lambda: [p if isinstance(p, str) else codec.decode(p) for p in given])
    return await generate(request, service, body, prompts, body.max_tokens, arrival, chat=False,
                          echoes=echoes, adapter=adapter)

  @app.post('/v1/chat/completions')
  async def chat_completions(request: fastapi.Request, body: ChatCompletionRequest):
    arrival = time.perf_counter()
    service.require_ready()
    adapter = check_model(service, body.model)
    try:
      prompt = await off_loop(render_and_encode, service.loaded, _messages(body))
    except ChatTemplateError as e:
      raise APIError(400, f'messages: {e}', param='messages') from e
    return await generate(request, service, body, [prompt], body.token_limit, arrival, chat=True,
                          adapter=adapter)

  @app.post('/tokenize', responses=TOKENIZER_RESPONSES)
  async def tokenize(body: TokenizeRequest):
    service.require_ready()
    if body.model is not None:
      check_model(service, body.model)
    loaded = service.loaded
    if body.prompt is not None:
      special = True if body.add_special_tokens is None else body.add_special_tokens
      ids = await off_loop(loaded.codec.encode, body.prompt, special)
    else:
      try:
        ids = await off_loop(render_and_encode, loaded, _messages(body), body.add_generation_prompt,
                             bool(body.add_special_tokens))
      except ChatTemplateError as e:
        raise APIError(400, f'messages: {e}', param='messages') from e
    strs = None
    if body.return_token_strs:
      strs = await off_loop(lambda: [loaded.codec.tokenizer.id_to_token(i) for i in ids])
    return {'count': len(ids), 'max_model_len': context_len(service), 'tokens': ids,
            'token_strs': strs}

  @app.post('/detokenize', responses=TOKENIZER_RESPONSES)
  async def detokenize(body: DetokenizeRequest):
    service.require_ready()
    if body.model is not None:
      check_model(service, body.model)
    vocab = service.loaded.engine.model_cfg.vocab_size
    if body.tokens and max(body.tokens) >= vocab:
      raise APIError(400, f'tokens holds id {max(body.tokens)}; ids must be below the vocabulary '
                     f'size {vocab}.', param='tokens')
    return {'prompt': await off_loop(service.loaded.codec.decode, body.tokens)}

  @app.get('/tokenizer.json')
  async def tokenizer_json():
    """The served tokenizer (Hugging Face tokenizer.json): `stoker bench --url` builds exact
    prompts with it."""
    service.require_ready()
    text = await off_loop(service.loaded.codec.tokenizer.to_str)
    return Response(text, media_type='application/json')


def context_len(service: Service) -> int:
  """Prompt + generated tokens one sequence may hold: its block table, and the whole pool."""
  c = service.loaded.engine.config
  return min(c.max_pages_per_seq, c.num_pages - 1) * c.page_size


def check_model(service: Service, model: str) -> str | None:
  """The LoRA adapter `model` names (None: the base); 404 for a name this server does not serve."""
  if model == service.name:
    return None
  adapters = service.loaded.engine.adapters
  if adapters.get(model) is not None:
    return model
  served = ', '.join(repr(n) for n in [service.name] + adapters.names())
  raise APIError(404, f'The model {model!r} does not exist: this server serves {served} '
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
                   chat: bool, echoes: list[str] | None = None, adapter: str | None = None):
  driver, codec = service.driver, service.loaded.codec
  max_tokens = _max_tokens(service, prompts, limit, chat)
  count = len(prompts) * body.n
  if count > driver.capacity:
    raise APIError(400, f'n ({body.n}) x prompts ({len(prompts)}) = {count} sequences exceeds the '
                   f'{driver.capacity} this server holds at once (running slots + max_waiting); '
                   'send fewer.', param='n')
  grammar = await _grammar(service, body)
  if chat:
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    prompt_logprobs = None
  else:
    logprobs = body.logprobs
    prompt_logprobs = logprobs if body.echo else None
  loop, queue = asyncio.get_running_loop(), asyncio.Queue()
  base = f'{"chatcmpl" if chat else "cmpl"}-{uuid.uuid4().hex}'
  seqs, outputs = [], []
  for p, ids in enumerate(prompts):
    for c in range(body.n):
      index = p * body.n + c
      try:
        params = SamplingParams(
            max_tokens=max_tokens[p], temperature=body.temperature, top_k=max(body.top_k, 0),
            top_p=body.top_p, seed=None if body.seed is None else (body.seed + c) % MAX_SEED,
            stop_token_ids=() if body.ignore_eos else codec.stop_token_ids, stop=body.stop_strings(),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, grammar=grammar, lora=adapter,
            speculate=body.speculative)
      except ValueError as e:  # the schema's ranges should already have caught it
        raise APIError(400, str(e)) from e
      out = choices_lib.Choice(codec, body.stop_strings(), chat, logprobs,
                               echoes[p] if echoes else None, ids)
      outputs.append(out)

      def deliver(item, index=index, out=out):  # on the driver thread
        if isinstance(item, RequestOutput):
          try:
            item = out.take(item)
          except Exception as e:  # pylint: disable=broad-except  (fail this request, not the engine)
            logging.exception('shaping the output of %s failed', base)
            item = RuntimeError(f'shaping the output failed: {e!r}')
        loop.call_soon_threadsafe(queue.put_nowait, (index, item))
      seqs.append(Sequence(f'{base}-{index}', ids, params, deliver, arrival))
  if not driver.try_submit(seqs):
    service.metrics.rejected.inc()
    raise APIError(429, f'The server is busy: {driver.outstanding} sequences are running or waiting '
                   f'and at most {driver.capacity} may (running slots + max_waiting); retry after '
                   f'{service.config.retry_after_s} s.', type='rate_limit_error',
                   code='rate_limit_exceeded',
                   headers={'Retry-After': str(service.config.retry_after_s)})
  reply = _Reply(service, base, chat, seqs, prompts)
  reply.model = adapter or service.name
  if body.stream:
    return StreamingResponse(reply.stream(queue, body.include_usage), media_type='text/event-stream',
                             headers={'Cache-Control': 'no-cache', 'X-Accel-Buffering': 'no'})
  return await reply.collect(queue, request)


async def _grammar(service: Service, body) -> grammar_lib.Grammar | None:
  """The compiled grammar of body.response_format (None: free text); 400 if it cannot compile."""
  constrained, schema = body.json_schema()
  if not constrained:
    return None
  key = json.dumps(schema, sort_keys=True)
  cache = service.__dict__.setdefault('_grammars', {})
  grammar = cache.get(key)
  if grammar is None:
    try:
      grammar = await off_loop(grammar_lib.json_schema, service.loaded.codec,
                               service.loaded.engine.model_cfg.vocab_size, schema)
    except grammar_lib.GrammarError as e:
      raise APIError(400, f'response_format: {e}', param='response_format') from e
    if len(cache) >= 256:  # a bounded cache of recent schemas
      cache.pop(next(iter(cache)))
    cache[key] = grammar
  return grammar


class _Reply:
  """Turns one request's Deltas (serve/choices.py) into an OpenAI response or stream of chunks."""

  def __init__(self, service, request_id, chat, seqs, prompts):
    self.service, self.id, self.chat, self.seqs = service, request_id, chat, seqs
    self.created, self.model = int(time.time()), service.name
    self.texts: list[list[str]] = [[] for _ in seqs]
    self.logprobs: list[list[dict]] = [[] for _ in seqs]
    self.counts = [0] * len(seqs)
    self.reasons: list[str | None] = [None] * len(seqs)
    self.prompt_tokens = sum(len(p) for p in prompts)
    self.pending = set(range(len(seqs)))

  def _take(self, index: int, item) -> choices_lib.Delta:
    """Applies one output. Raises APIError for a failed sequence."""
    if isinstance(item, Exception):
      self.pending.discard(index)
      if isinstance(item, ValueError):
        raise APIError(400, f'the engine refused the request: {item}')
      raise APIError(500, f'{item}; the server restarts: retry the request.', type='server_error')
    assert isinstance(item, choices_lib.Delta)
    self.counts[index] += item.num_tokens
    self.texts[index].append(item.text)
    if item.logprobs is not None:
      self.logprobs[index].append(item.logprobs)
    if item.finished:
      self.pending.discard(index)
      self.reasons[index] = item.finish_reason
    return item

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
          # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancellation that
          # arrives as the item does (bpo-42130), and the Guard cancels this handler on a disconnect.
          async with asyncio.timeout(1.0):
            index, item = await queue.get()
        except TimeoutError:
          if await request.is_disconnected():
            return Response(status_code=499)  # nobody reads it; counted as 'client closed'
          continue
        self._take(index, item)
    finally:
      self._abort_pending()
    choices = []
    for i, parts in enumerate(self.texts):
      text, logprobs = ''.join(parts), choices_lib.merge(self.chat, self.logprobs[i])
      if self.chat:
        choices.append({'index': i, 'message': {'role': 'assistant', 'content': text},
                        'logprobs': logprobs, 'finish_reason': self.reasons[i]})
      else:
        choices.append({'index': i, 'text': text, 'logprobs': logprobs,
                        'finish_reason': self.reasons[i]})
    return JSONResponse({'id': self.id, 'object': 'chat.completion' if self.chat else 'text_completion',
                         'created': self.created, 'model': self.model, 'choices': choices,
                         'usage': self.usage()})

  def _chunk(self, choices: list[dict], usage: dict | None = None) -> str:
    body = {'id': self.id, 'object': 'chat.completion.chunk' if self.chat else 'text_completion',
            'created': self.created, 'model': self.model, 'choices': choices}
    if usage is not None:
      body['usage'] = usage
    return f'data: {json.dumps(body, ensure_ascii=False, separators=(",", ":"))}\n\n'

  def _choice(self, index: int, delta: choices_lib.Delta) -> dict:
    if self.chat:
      return {'index': index, 'delta': {'content': delta.text} if delta.text else {},
              'logprobs': delta.logprobs, 'finish_reason': delta.finish_reason}
    return {'index': index, 'text': delta.text, 'logprobs': delta.logprobs,
            'finish_reason': delta.finish_reason}

  async def stream(self, queue: asyncio.Queue, include_usage: bool):
    try:
      if self.chat:
        for i in range(len(self.seqs)):
          yield self._chunk([{'index': i, 'delta': {'role': 'assistant', 'content': ''},
                              'logprobs': None, 'finish_reason': None}])
      while self.pending:
        index, item = await queue.get()
        try:
          delta = self._take(index, item)
        except APIError as e:
          yield f'data: {json.dumps(error_body(e.message, e.type, e.param, e.code))}\n\n'
          break
        if delta.finished or delta.text or delta.logprobs:
          yield self._chunk([self._choice(index, delta)])
      if include_usage:
        yield self._chunk([], self.usage())
      yield 'data: [DONE]\n\n'
    finally:
      self._abort_pending()
