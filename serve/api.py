"""OpenAI API request schemas (pydantic) and OpenAI-shaped errors.

Requests are validated in two stages: pydantic checks each field's type and range here (a field
out of range is a 400 whose message names the field and the limit), then the server checks what
depends on the model and the engine (the model name, the prompt's length in tokens against the
context, token ids against the vocabulary).

No silent drops: a field this server does not implement is a 400 that names it, never ignored.
That covers OpenAI's fields that change the result (tools, tool_choice, functions, function_call,
logit_bias, best_of, suffix, penalties other than 0) and any unknown or misspelled field. Accepted
and ignored, because they never change the output: ACCEPTED_IGNORED.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256
MAX_N = 16  # choices per prompt
MAX_SEED = 2 ** 32  # the engine's seeds are uint32
MAX_LOGPROBS = 20  # serve.sampling.MAX_LOGPROBS: the alternatives each step can return
ACCEPTED_IGNORED = ('user',)  # accepted and ignored: they do not change what is generated
# Refused (400 naming the field) whenever set to anything but null or their neutral value.
UNSUPPORTED = {
    'tools': 'tool calling is not supported by this server; leave tools out',
    'tool_choice': 'tool calling is not supported by this server; leave tool_choice out',
    'parallel_tool_calls': 'tool calling is not supported by this server; leave it out',
    'functions': 'function calling is not supported by this server; leave functions out',
    'function_call': 'function calling is not supported by this server; leave function_call out',
    'logit_bias': 'logit_bias is not supported by this server; leave it out',
}


class APIError(Exception):
  """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

  def __init__(self, status: int, message: str, type: str = 'invalid_request_error',
               param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
    self.headers = headers or {}

  def body(self) -> dict[str, Any]:
    return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = 'invalid_request_error', param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
  return {'error': {'message': message, 'type': type, 'param': param, 'code': code}}


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
  """(message, param) for pydantic errors: 'field: what is wrong' lines, limits included."""
  lines, params = [], []
  for e in errors[:8]:
    loc = [str(x) for x in e.get('loc', ()) if x != 'body']
    field = '.'.join(loc)
    if e.get('type') == 'json_invalid':
      lines.append(f'the body is not valid JSON: {e.get("ctx", {}).get("error", e.get("msg"))}')
      continue
    params.append(loc[0] if loc else None)
    if e.get('type') == 'extra_forbidden':
      lines.append(f'{field}: unknown field; this server does not implement it (check the '
                   f'spelling, or remove it; accepted and ignored: {", ".join(ACCEPTED_IGNORED)})')
      continue
    lines.append(f'{field or "body"}: {e.get("msg")}' +
                 (f' (got {_short(e["input"])})' if 'input' in e and field else ''))
  if len(errors) > 8:
    lines.append(f'... and {len(errors) - 8} more errors')
  return '; '.join(lines), next((p for p in params if p), None)


def _short(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + '...'


class StreamOptions(BaseModel):
  model_config = ConfigDict(extra='forbid')
  include_usage: bool = False


StopStrings = Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
                        Field(max_length=MAX_STOP)]


class JsonSchema(BaseModel):
  """response_format.json_schema: OpenAI's {name, description, schema, strict}."""

  model_config = ConfigDict(extra='forbid', populate_by_name=True)
  name: str = Field(min_length=1, max_length=64)
  description: str | None = None
  schema_: dict[str, Any] = Field(default_factory=dict, alias='schema')
  strict: bool | None = None


class ResponseFormat(BaseModel):
  """`text` (free), `json_object` (any JSON object) or `json_schema` (JSON valid under a schema)."""

  model_config = ConfigDict(extra='forbid')
  type: Literal['text', 'json_object', 'json_schema']
  json_schema: JsonSchema | None = None

  @pydantic.model_validator(mode='after')
  def _schema_iff_json_schema(self):
    if (self.type == 'json_schema') != (self.json_schema is not None):
      raise ValueError('give json_schema exactly when type is "json_schema" (e.g. {"type": '
                       '"json_schema", "json_schema": {"name": "x", "schema": {...}}})')
    return self


class _Generation(BaseModel):
  """Fields shared by completions and chat completions."""

  model_config = ConfigDict(extra='forbid', allow_inf_nan=False)

  model: str = Field(min_length=1, max_length=256)
  max_tokens: int | None = Field(None, ge=1)
  temperature: float = Field(1.0, ge=0.0, le=2.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  top_k: int = Field(0, ge=-1, description='Extension: sample among the k likeliest tokens; 0 or -1: off.')
  ignore_eos: bool = Field(False, description='Extension: generate past the end-of-text token.')
  speculative: bool = Field(True, description='Extension: false: never draft for this request (a server '
                            'with speculative decoding).')
  n: int = Field(1, ge=1, le=MAX_N)
  seed: int | None = Field(None, ge=0, lt=MAX_SEED)
  stop: Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)] | StopStrings | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  response_format: ResponseFormat | None = None
  user: str | None = None  # ACCEPTED_IGNORED
  # Accepted only at their neutral values: the engine does not implement them.
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: Any = None
  tool_choice: Any = None
  functions: Any = None
  function_call: Any = None

  @pydantic.field_validator('presence_penalty', 'frequency_penalty')
  @classmethod
  def _no_penalty(cls, value, info):
    if value != 0:
      raise ValueError(f'{info.field_name} is not supported by this server; leave it at 0.')
    return value

  @pydantic.field_validator(*UNSUPPORTED, check_fields=False)
  @classmethod
  def _unsupported(cls, value, info):
    if value not in (None, [], {}) and not (info.field_name == 'tool_choice' and value == 'none'):
      raise ValueError(UNSUPPORTED[info.field_name] + '.')
    return value

  @pydantic.model_validator(mode='after')
  def _stream_options(self):
    if self.stream_options is not None and not self.stream:
      raise ValueError('stream_options is only allowed with stream: true.')
    return self

  def json_schema(self) -> tuple[bool, dict | None]:
    """(constrained, schema): whether response_format asks for JSON, and its schema (None: any
    JSON object)."""
    f = self.response_format
    if f is None or f.type == 'text':
      return False, None
    return True, (f.json_schema.schema_ if f.type == 'json_schema' else None)

  def stop_strings(self) -> tuple[str, ...]:
    if self.stop is None:
      return ()
    return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

  @property
  def include_usage(self) -> bool:
    return bool(self.stream_options and self.stream_options.include_usage)


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(_Generation):
  """POST /v1/completions. `prompt`: a string, a list of strings, token ids, or lists of token ids."""

  prompt: str | list[str] | TokenIds | list[TokenIds]
  echo: bool = Field(False, description='Return the prompt before the completion (with its '
                     'logprobs, the first null, when logprobs is set).')
  logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description='Each token\'s logprob '
                               'and this many likeliest alternatives.')
  best_of: int | None = None
  suffix: str | None = None

  @pydantic.field_validator('best_of')
  @classmethod
  def _no_best_of(cls, value):
    if value not in (None, 1):
      raise ValueError('best_of is not supported by this server; use n.')
    return value

  @pydantic.field_validator('suffix')
  @classmethod
  def _no_suffix(cls, value):
    if value:
      raise ValueError('suffix is not supported by this server; leave it out.')
    return value

  @pydantic.model_validator(mode='after')
  def _completion_only(self):
    if isinstance(self.prompt, list) and not self.prompt:
      raise ValueError('prompt is an empty list; send a string or at least one token id.')
    return self

  def prompts(self) -> list[str | list[int]]:
    """The batch of prompts: each a string or a list of token ids."""
    p = self.prompt
    if isinstance(p, str):
      return [p]
    if all(isinstance(x, int) for x in p):
      return [list(p)]
    return list(p)


class ContentPart(BaseModel):
  model_config = ConfigDict(extra='forbid')
  type: Literal['text']
  text: str


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra='forbid')
  role: Literal['system', 'developer', 'user', 'assistant', 'tool']
  content: str | list[ContentPart] | None = None
  name: str | None = None

  def text(self) -> str:
    if self.content is None:
      return ''
    if isinstance(self.content, str):
      return self.content
    return ''.join(part.text for part in self.content)


class ChatCompletionRequest(_Generation):
  """POST /v1/chat/completions."""

  messages: list[ChatMessage] = Field(min_length=1)
  max_completion_tokens: int | None = Field(None, ge=1)
  logprobs: bool = False
  top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
  tools: Any = None
  parallel_tool_calls: Any = None

  @pydantic.model_validator(mode='after')
  def _chat_only(self):
    if self.top_logprobs is not None and not self.logprobs:
      raise ValueError('top_logprobs needs logprobs: true.')
    if self.max_tokens is not None and self.max_completion_tokens is not None and (
        self.max_tokens != self.max_completion_tokens):
      raise ValueError(f'max_tokens ({self.max_tokens}) and max_completion_tokens '
                       f'({self.max_completion_tokens}) differ; send one of them.')
    return self

  @property
  def token_limit(self) -> int | None:
    return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
