"""OpenAI API request schemas (pydantic) and OpenAI-shaped errors.

Requests are validated in two stages: pydantic checks each field's type and range here (a field
out of range is a 400 whose message names the field and the limit), then the server checks what
depends on the model and the engine (the model name, the prompt's length in tokens against the
context, token ids against the vocabulary). Fields of the OpenAI API that change the result but are
not implemented (logprobs, echo, penalties, ...) are refused by name rather than ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

MAX_STOP = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256
MAX_N = 16  # choices per prompt
MAX_SEED = 2 ** 32  # the engine's seeds are uint32


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


class _Generation(BaseModel):
  """Fields shared by completions and chat completions."""

  model_config = ConfigDict(extra='ignore', allow_inf_nan=False)

  model: str = Field(min_length=1, max_length=256)
  max_tokens: int | None = Field(None, ge=1)
  temperature: float = Field(1.0, ge=0.0, le=2.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  top_k: int = Field(0, ge=-1, description='Extension: sample among the k likeliest tokens; 0 or -1: off.')
  ignore_eos: bool = Field(False, description='Extension: generate past the end-of-text token.')
  n: int = Field(1, ge=1, le=MAX_N)
  seed: int | None = Field(None, ge=0, lt=MAX_SEED)
  stop: Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)] | StopStrings | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  user: str | None = None
  # Accepted only at their neutral values: the engine does not implement them.
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: dict[str, float] | None = None
  logprobs: Any = None

  @pydantic.model_validator(mode='after')
  def _unsupported(self):
    for name in ('presence_penalty', 'frequency_penalty'):
      if getattr(self, name) != 0:
        raise ValueError(f'{name} is not supported by this server; leave it at 0.')
    if self.logit_bias:
      raise ValueError('logit_bias is not supported by this server; leave it out.')
    if self.logprobs not in (None, False, 0):
      raise ValueError('logprobs is not supported by this server; leave it out.')
    if self.stream_options is not None and not self.stream:
      raise ValueError('stream_options is only allowed with stream: true.')
    return self

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
  echo: bool = False
  best_of: int | None = None
  suffix: str | None = None

  @pydantic.model_validator(mode='after')
  def _completion_only(self):
    if self.echo:
      raise ValueError('echo is not supported by this server; leave it out.')
    if self.best_of not in (None, 1):
      raise ValueError('best_of is not supported by this server; use n.')
    if self.suffix:
      raise ValueError('suffix is not supported by this server; leave it out.')
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
  model_config = ConfigDict(extra='ignore')
  type: Literal['text']
  text: str


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra='ignore')
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
  tools: list[Any] | None = None

  @pydantic.model_validator(mode='after')
  def _chat_only(self):
    if self.tools:
      raise ValueError('tools are not supported by this server; leave them out.')
    if self.max_tokens is not None and self.max_completion_tokens is not None and (
        self.max_tokens != self.max_completion_tokens):
      raise ValueError(f'max_tokens ({self.max_tokens}) and max_completion_tokens '
                       f'({self.max_completion_tokens}) differ; send one of them.')
    return self

  @property
  def token_limit(self) -> int | None:
    return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
