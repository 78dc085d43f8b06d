"""The OpenAI-compatible HTTP server: FastAPI routes around the engine driver, run by uvicorn.

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream` as server-sent events
ending in `data: [DONE]`), GET /v1/models, GET /health (200 only once the model is loaded and
every step bucket compiled; 503 while loading or shutting down), GET /metrics (Prometheus).

Life cycle: the socket is bound first and the model loads on a thread, so /health answers 503
"loading" at once. On SIGTERM (or SIGINT) the server stops admitting (503), lets running requests
finish for up to `shutdown_timeout_s`, aborts what is left (streams end with finish_reason
'abort'), closes and returns 0; a second signal skips the wait.

Guards, in an ASGI middleware in front of everything: bodies over `max_body_bytes` get 413, /v1
routes need `Authorization: Bearer <api_key>` when one is set (401), and every answer is counted
by route and status. Back-pressure: sequences beyond the engine's running slots wait in a queue
bounded by `max_waiting`; past it a request gets 429 with Retry-After and nothing else slows down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import signal
import socket
import threading
import time
from typing import Callable

import fastapi
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import routes
from serve.api import APIError, error_body, validation_message
from serve.driver import EngineDriver
from serve.loader import Loaded
from serve.metrics import Metrics


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """How the server listens and protects itself (the engine's limits are its EngineConfig)."""

  host: str = '127.0.0.1'
  port: int = 8000  # 0: any free port (printed at start)
  api_key: str | None = None  # when set, /v1 routes need `Authorization: Bearer <api_key>`
  model_name: str | None = None  # the name clients send as `model`; default: the loader's
  max_waiting: int = 64  # sequences queued beyond the running slots; more get 429
  retry_after_s: int = 1  # the Retry-After of a 429 or a 503
  max_body_bytes: int = 1 << 20
  shutdown_timeout_s: float = 30.0  # running requests may finish for this long after SIGTERM
  ttft_deadline_s: float = 1.0  # fluidity-index deadlines: first token,
  tbt_deadline_s: float = 0.1  # and each later token

  def __post_init__(self):
    for name in ('port', 'max_waiting', 'retry_after_s', 'max_body_bytes'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < (0 if name in ('port', 'max_waiting') else 1):
        raise ValueError(f'ServerConfig.{name}={value!r}; use a non-negative integer'
                         f'{"" if name in ("port", "max_waiting") else " >= 1"}.')
    for name in ('shutdown_timeout_s', 'ttft_deadline_s', 'tbt_deadline_s'):
      if not getattr(self, name) > 0:
        raise ValueError(f'ServerConfig.{name}={getattr(self, name)!r}; use a positive number of seconds.')
    if self.api_key is not None and not self.api_key:
      raise ValueError('ServerConfig.api_key is empty; give a key, or none for an open server.')


class Service:
  """What the routes share: the loaded model and its driver (once ready), status and metrics."""

  def __init__(self, config: ServerConfig, load: Callable[[], Loaded]):
    self.config, self._load = config, load
    self.status = 'loading'  # -> ready -> draining; or failed
    self.detail = ''
    self.loaded: Loaded | None = None
    self.driver: EngineDriver | None = None
    self.metrics = Metrics(lambda: self.driver.snapshot if self.driver else {},
                           prefill_deadline_s=config.ttft_deadline_s,
                           decode_deadline_s=config.tbt_deadline_s)
    self.ready = threading.Event()
    self.loading_s = 0.0
    self.created = int(time.time())

  @property
  def name(self) -> str:
    return self.config.model_name or (self.loaded.name if self.loaded else '')

  def load(self) -> None:
    """Loads and compiles the model (blocking); status 'ready' or 'failed'."""
    start = time.perf_counter()
    try:
      loaded = self._load()
      driver = EngineDriver(loaded.engine, self.metrics, self.config.max_waiting)
      driver.start()
    except Exception as e:  # pylint: disable=broad-except  (reported by /health and the log)
      logging.exception('loading the model failed')
      self.status, self.detail = 'failed', f'{type(e).__name__}: {e}'
      self.ready.set()
      return
    self.loaded, self.driver = loaded, driver
    self.loading_s = time.perf_counter() - start
    if self.status == 'loading':
      self.status = 'ready'
    logging.info('Serving %r from %s; loaded and compiled in %.1f s.', self.name, loaded.source,
                 self.loading_s)
    self.ready.set()

  def start_loading(self) -> threading.Thread:
    thread = threading.Thread(target=self.load, name='model-loader', daemon=True)
    thread.start()
    return thread

  def require_ready(self) -> EngineDriver:
    if self.status == 'ready' and self.driver is not None and self.driver.error is None:
      return self.driver
    message = {'loading': 'the model is still loading and compiling',
               'draining': 'the server is shutting down', 'failed': f'the model failed: {self.detail}'
               }.get(self.status, f'the engine failed: {self.driver and self.driver.error!r}')
    raise APIError(503, f'Service unavailable: {message}; retry later.', type='service_unavailable',
                   headers={'Retry-After': str(self.config.retry_after_s)})

  async def drain(self) -> None:
    """Stops admitting, waits up to shutdown_timeout_s for running requests, aborts the rest."""
    self.status = 'draining' if self.status in ('loading', 'ready') else self.status
    driver = self.driver
    if driver is None:
      return
    deadline = time.monotonic() + self.config.shutdown_timeout_s
    while driver.outstanding and time.monotonic() < deadline and driver.error is None:
      await asyncio.sleep(0.05)
    if driver.outstanding:
      logging.warning('Shutdown: aborting %d sequences still running after %.0f s.',
                      driver.outstanding, self.config.shutdown_timeout_s)
      driver.abort_all()
      end = time.monotonic() + 5.0
      while driver.outstanding and time.monotonic() < end:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)  # let the handlers send their last chunks

  def close(self) -> None:
    if self.driver is not None:
      self.driver.stop()


# ----------------------------------------------------------------------------- the app


KNOWN_ROUTES = ('/v1/completions', '/v1/chat/completions', '/v1/models', '/health', '/metrics')


class Guard:
  """ASGI middleware: body size limit, API key on /v1, request counting (see module docstring)."""

  def __init__(self, app, service: Service):
    self.app, self.service = app, service

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    path = scope.get('path', '')
    route = path if path in KNOWN_ROUTES else ('/v1/models/{model}' if path.startswith(
        '/v1/models/') else 'other')
    status = []

    async def counting_send(message):
      if message['type'] == 'http.response.start':
        status.append(message['status'])
      await send(message)

    try:
      await self._guarded(scope, receive, counting_send, path)
    finally:
      self.service.metrics.requests.labels(route, str(status[0] if status else 499)).inc()

  async def _guarded(self, scope, receive, send, path):
    config = self.service.config
    headers = {k.decode('latin-1').lower(): v.decode('latin-1') for k, v in scope['headers']}
    if path.startswith('/v1') and config.api_key is not None:
      auth = headers.get('authorization', '')
      scheme, _, key = auth.partition(' ')
      if scheme.lower() != 'bearer' or not hmac.compare_digest(key.strip().encode(),
                                                               config.api_key.encode()):
        return await _error(401, 'Missing or incorrect API key: send the header '
                            '"Authorization: Bearer <key>" with the key the server was started with.',
                            code='invalid_api_key')(scope, receive, send)
    limit = config.max_body_bytes
    declared = headers.get('content-length')
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
      return await _too_large(limit, declared)(scope, receive, send)
    # Read the (bounded) body here, then replay it: a chunked body without a length is cut off too.
    chunks, size = [], 0
    while True:
      message = await receive()
      if message['type'] == 'http.disconnect':
        return
      chunks.append(message.get('body', b''))
      size += len(chunks[-1])
      if size > limit:
        return await _too_large(limit, f'over {size}')(scope, receive, send)
      if not message.get('more_body', False):
        break
    body, replayed = b''.join(chunks), False

    async def replay():
      nonlocal replayed
      if not replayed:
        replayed = True
        return {'type': 'http.request', 'body': body, 'more_body': False}
      return await receive()

    await self.app(scope, replay, send)


def _error(status: int, message: str, type: str = 'invalid_request_error', param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
  return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def _too_large(limit: int, got: str) -> JSONResponse:
  return _error(413, f'The request body ({got} bytes) exceeds the limit of {limit} bytes '
                '(ServerConfig.max_body_bytes); send a smaller request.', code='body_too_large')


def create_app(service: Service) -> fastapi.FastAPI:
  """The FastAPI app (wrapped in Guard by `asgi_app`)."""
  app = fastapi.FastAPI(title='Stoker', version='0.1.0',
                        description='OpenAI-compatible completions served by the Stoker engine.')

  @app.exception_handler(APIError)
  async def _api_error(request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, e: RequestValidationError):
    message, param = validation_message(list(e.errors()))
    return _error(400, message, param=param)

  @app.exception_handler(StarletteHTTPException)
  async def _http(request, e: StarletteHTTPException):
    return _error(e.status_code, f'{e.detail}: {request.method} {request.url.path}',
                  type='not_found_error' if e.status_code == 404 else 'invalid_request_error',
                  headers=getattr(e, 'headers', None))

  @app.get('/health')
  async def health():
    body = {'status': service.status, 'model': service.name}
    if service.status == 'ready':
      body['load_s'] = round(service.loading_s, 3)
      body.update({k: service.driver.snapshot.get(k) for k in ('running', 'waiting', 'pages_used')})
      return body
    body['detail'] = service.detail
    return JSONResponse(body, status_code=503,
                        headers={'Retry-After': str(service.config.retry_after_s)})

  @app.get('/metrics')
  async def metrics():
    return Response(service.metrics.exposition(),
                    media_type='text/plain; version=0.0.4; charset=utf-8')

  routes.add_v1_routes(app, service)
  return app


def asgi_app(service: Service):
  return Guard(create_app(service), service)


# ----------------------------------------------------------------------------- running it


class _Server(uvicorn.Server):
  """uvicorn with our shutdown: a signal drains the Service first, and the exit code stays 0
  (uvicorn itself re-raises the signal after shutting down, which would end the process by it)."""

  def __init__(self, config: uvicorn.Config, service: Service):
    super().__init__(config)
    self.service = service
    self.drain_requested = False
    self._drain_task = None

  @contextlib.contextmanager
  def capture_signals(self):
    if threading.current_thread() is not threading.main_thread():
      yield
      return
    original = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
      yield
    finally:
      for sig, handler in original.items():
        signal.signal(sig, handler)

  def _on_signal(self, sig, frame):  # pylint: disable=unused-argument
    if self.drain_requested:  # a second signal: stop now
      self.should_exit = self.force_exit = True
    logging.info('Received %s: draining.', signal.Signals(sig).name)
    self.drain_requested = True

  async def on_tick(self, counter: int) -> bool:
    if self.drain_requested and self._drain_task is None:
      self._drain_task = asyncio.create_task(self._drain())
    return await super().on_tick(counter)

  async def _drain(self):
    await self.service.drain()
    self.should_exit = True


def bind(host: str, port: int) -> socket.socket:
  """A listening socket (port 0: a free one), so /health answers while the model loads."""
  family = socket.AF_INET6 if ':' in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise ValueError(f'cannot listen on {host}:{port} ({e.strerror}); pick another --port, or 0 for '
                     'any free one.') from e
  sock.listen(2048)
  sock.set_inheritable(True)
  return sock


def _uvicorn(service: Service) -> uvicorn.Config:
  return uvicorn.Config(asgi_app(service), log_level='warning', access_log=False, lifespan='off',
                        timeout_graceful_shutdown=5, timeout_keep_alive=5)


def serve(service: Service) -> int:
  """Serves until SIGTERM/SIGINT, then shuts down gracefully; returns the exit code (0)."""
  sock = bind(service.config.host, service.config.port)
  host, port = sock.getsockname()[:2]
  print(f'Listening on http://{host}:{port} (model loading; GET /health says when ready).', flush=True)
  service.start_loading()
  server = _Server(_uvicorn(service), service)
  try:
    asyncio.run(server.serve(sockets=[sock]))
  finally:
    service.close()
    sock.close()
  print(f'Server on port {port} shut down.', flush=True)
  return 0


class BackgroundServer:
  """The server on a thread of this process (quickstart, notebooks); `stop()` drains and joins."""

  def __init__(self, service: Service):
    self.service = service
    self._sock = bind(service.config.host, service.config.port)
    host, self.port = self._sock.getsockname()[:2]
    self.url = f'http://{host}:{self.port}'
    self._server = _Server(_uvicorn(service), service)
    self._thread = threading.Thread(
        target=lambda: asyncio.run(self._server.serve(sockets=[self._sock])), name='http',
        daemon=True)

  def start(self) -> BackgroundServer:
    self.service.start_loading()
    self._thread.start()
    return self

  def wait_ready(self, timeout: float) -> None:
    if not self.service.ready.wait(timeout) or self.service.status != 'ready':
      raise RuntimeError(f'the server did not become ready: {self.service.status} '
                         f'{self.service.detail}')

  def stop(self, timeout: float = 60.0) -> None:
    self._server.drain_requested = True
    self._thread.join(timeout)
    self.service.close()
    self._sock.close()
