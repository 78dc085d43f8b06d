"""What stands between a client and the routes: the Guard (ASGI middleware) and uvicorn's HTTP/1.1
protocol with a header deadline.

Guard, in front of everything: every route but /health, /ready and /metrics needs
`Authorization: Bearer <api_key>` when a key is set (401; /docs and /openapi.json included); a body
over `max_body_bytes` gets 413; a body not received within `body_timeout_s` gets 408 and the
connection is closed; a client that disconnects before its answer is complete has its handler
cancelled at once (the handlers abort their sequences on cancellation, so the pages return now,
not at the next output); every answer is counted by route and status (499: no answer started).

HeaderDeadlineH11: uvicorn waits forever for a request's line and headers; this closes a
connection that has not sent them all `header_timeout_s` after it opened or its last answer.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import TYPE_CHECKING

import fastapi
from fastapi.responses import JSONResponse
from starlette.routing import Match
from uvicorn.protocols.http.h11_impl import H11Protocol

from serve import openapi
from serve.api import error_body

if TYPE_CHECKING:
  from serve.server import Service


class Guard:
  """ASGI middleware: API key, body size and deadline, disconnects, request counting (see the
  module docstring)."""

  def __init__(self, app: fastapi.FastAPI, service: Service):
    self.app, self.service = app, service

  def _route(self, scope) -> str:
    """The route's path template (its metrics label), or 'other'."""
    for route in self.app.routes:
      if route.matches(scope)[0] is not Match.NONE:
        return getattr(route, 'path_format', 'other')
    return 'other'

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    status, complete = [], []

    async def counting_send(message):
      if message['type'] == 'http.response.start':
        status.append(message['status'])
      elif message['type'] == 'http.response.body' and not message.get('more_body', False):
        complete.append(True)  # before sending: a disconnect seen from now on is the normal end
      await send(message)

    try:
      await self._guarded(scope, receive, counting_send, complete)
    finally:  # 499: the client went away before an answer started
      self.service.metrics.requests.labels(self._route(scope), str(status[0] if status else 499)).inc()

  async def _guarded(self, scope, receive, send, complete):
    config = self.service.config
    headers = {k.decode('latin-1').lower(): v.decode('latin-1') for k, v in scope['headers']}
    if scope.get('path', '') not in openapi.OPEN_PATHS and config.api_key is not None:
      auth = headers.get('authorization', '')
      scheme, _, key = auth.partition(' ')
      if scheme.lower() != 'bearer' or not hmac.compare_digest(key.strip().encode(),
                                                               config.api_key.encode()):
        return await error(401, 'Missing or incorrect API key: send the header '
                            '"Authorization: Bearer <key>" with the key the server was started with.',
                            code='invalid_api_key')(scope, receive, send)
    limit = config.max_body_bytes
    declared = headers.get('content-length')
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
      return await too_large(limit, declared)(scope, receive, send)
    # Read the (bounded) body here, then replay it: a chunked body without a length is cut off too.
    chunks, size = [], 0
    try:
      async with asyncio.timeout(config.body_timeout_s):
        while True:
          message = await receive()
          if message['type'] == 'http.disconnect':
            return
          chunks.append(message.get('body', b''))
          size += len(chunks[-1])
          if size > limit:
            return await too_large(limit, f'over {size}')(scope, receive, send)
          if not message.get('more_body', False):
            break
    except TimeoutError:
      return await error(
          408, f'The request body did not arrive within {config.body_timeout_s:g} s '
          f'(ServerConfig.body_timeout_s; {size} bytes came); send the whole body promptly.',
          code='request_timeout', headers={'Connection': 'close'})(scope, receive, send)
    body, replayed = b''.join(chunks), False

    async def replay():
      nonlocal replayed
      if not replayed:
        replayed = True
        return {'type': 'http.request', 'body': body, 'more_body': False}
      return await receive()

    # The handler runs beside a watcher of the connection: a client that goes away before its
    # answer is complete cancels the handler at once (a non-streaming completion would otherwise
    # run on, holding its pages, until its next output; the handlers abort on cancellation).
    handler = asyncio.ensure_future(self.app(scope, replay, send))
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
      await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
      if not handler.done() and not complete:
        handler.cancel()
      await asyncio.wait({handler})
    finally:
      for task in (handler, watcher):
        task.cancel()
    if not handler.cancelled():
      handler.result()  # an error of the app reaches uvicorn (it logs it)


async def _disconnected(receive) -> None:
  """Returns when the connection ends (uvicorn also says so once the response is complete)."""
  while (await receive())['type'] != 'http.disconnect':
    pass


class HeaderDeadlineH11(H11Protocol):
  """uvicorn's HTTP/1.1 protocol with a deadline for a request's line and headers, which uvicorn
  lacks: a connection that opens, or starts its next request, and has not sent all of the headers
  `header_timeout_s` later is closed (the body's deadline is the Guard's)."""

  header_timeout_s = 10.0  # set per server (serve/server.py `_uvicorn` subclasses this)
  _header_timer: asyncio.TimerHandle | None = None

  def _idle(self) -> bool:  # no request in progress: waiting for (the rest of) the next headers
    return self.cycle is None or self.cycle.response_complete

  def _expire(self) -> None:
    self._header_timer = None
    if self._idle() and not self.transport.is_closing():
      self.transport.close()

  def _disarm(self) -> None:
    if self._header_timer is not None:
      self._header_timer.cancel()
      self._header_timer = None

  def connection_made(self, transport) -> None:
    super().connection_made(transport)
    self._header_timer = self.loop.call_later(self.header_timeout_s, self._expire)

  def data_received(self, data: bytes) -> None:
    if self._idle() and self._header_timer is None:
      self._header_timer = self.loop.call_later(self.header_timeout_s, self._expire)
    super().data_received(data)
    if not self._idle():
      self._disarm()

  def connection_lost(self, exc) -> None:
    self._disarm()
    super().connection_lost(exc)


def error(status: int, message: str, type: str = 'invalid_request_error', param: str | None = None,
          code: str | None = None, headers: dict | None = None) -> JSONResponse:
  """An answer in OpenAI's error shape."""
  return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def too_large(limit: int, got: str) -> JSONResponse:
  return error(413, f'The request body ({got} bytes) exceeds the limit of {limit} bytes '
               '(ServerConfig.max_body_bytes); send a smaller request.', code='body_too_large')
