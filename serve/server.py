"""The OpenAI-compatible HTTP server: FastAPI routes around the engine driver, run by uvicorn.

Routes: POST /v1/completions, POST /v1/chat/completions (both with `stream` as server-sent events
ending in `data: [DONE]`), GET /v1/models, GET /metrics (Prometheus), and two probes:
  GET /health, liveness: 200 once the model is loaded and compiled, and while draining; 503 while
    loading (so a startup probe and scripts wait on it, as before) and once the server failed.
  GET /ready, readiness: 200 only while the server admits requests; 503 while loading, draining
    or failed. Both answer {"status", "model", "detail"}: the detail says why it is not ready.
The OpenAPI document (/openapi.json, /docs) lists every status each route returns (serve/openapi.py).

Life cycle: the socket is bound first and the model loads on a thread, so the probes answer 503
"loading" at once. On SIGTERM (or SIGINT) the server stops admitting (503), lets running requests
finish for up to `shutdown_timeout_s`, aborts what is left (streams end with finish_reason
'abort'), closes and returns 0; a second signal skips the wait. If the engine dies (or the model
fails to load), both probes turn 503 with the reason (also in /metrics: stoker_ready 0,
stoker_server_info{state="failed",reason=...}), the requests it was running get 500s that say why,
and after `failure_drain_s` the server exits with status 1 so the orchestrator restarts it.

Guards (serve/guard.py): every route but /health, /ready and /metrics needs the API key when one
is set (401; /docs and /openapi.json included); bodies over `max_body_bytes` get 413; headers not
received within `header_timeout_s` close the connection, a body not received within
`body_timeout_s` gets 408 and closes it; a client that disconnects before its answer is complete
has its handler cancelled at once (its sequences are aborted, their pages freed). uvicorn caps open
connections at `max_connections` (beyond: a plain 503) and closes idle keep-alive connections
after `keep_alive_s`. Back-pressure: sequences beyond the engine's running slots wait in a queue
bounded by `max_waiting`; past it a request gets 429 with Retry-After and nothing else slows down.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import socket
import sys
import threading
import time
from typing import Callable

import fastapi
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import guard, openapi, routes
from serve.api import APIError, validation_message
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
  header_timeout_s: float = 10.0  # a request's line and headers must arrive within this (else closed)
  body_timeout_s: float = 30.0  # a request body must arrive within this (else 408, connection closed)
  max_connections: int = 1024  # open connections; more get uvicorn's 503
  keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
  failure_drain_s: float = 2.0  # after an engine failure: answer 503s this long, then exit 1
  fail_after_steps: int | None = None  # testing only: the engine driver fails after this many steps

  def __post_init__(self):
    for name in ('port', 'max_waiting', 'retry_after_s', 'max_body_bytes', 'max_connections'):
      value = getattr(self, name)
      if not isinstance(value, int) or value < (0 if name in ('port', 'max_waiting') else 1):
        raise ValueError(f'ServerConfig.{name}={value!r}; use a non-negative integer'
                         f'{"" if name in ("port", "max_waiting") else " >= 1"}.')
    if self.fail_after_steps is not None and (not isinstance(self.fail_after_steps, int)
                                              or self.fail_after_steps < 0):
      raise ValueError(f'ServerConfig.fail_after_steps={self.fail_after_steps!r}; a test hook: '
                       'None (serve normally) or a number of steps >= 0.')
    for name in ('shutdown_timeout_s', 'ttft_deadline_s', 'tbt_deadline_s', 'header_timeout_s',
                 'body_timeout_s',
                 'keep_alive_s', 'failure_drain_s'):
      if not getattr(self, name) > 0:
        raise ValueError(f'ServerConfig.{name}={getattr(self, name)!r}; use a positive number of seconds.')
    if self.api_key is not None and not self.api_key:
      raise ValueError('ServerConfig.api_key is empty; give a key, or none for an open server.')


class Service:
  """What the routes share: the loaded model and its driver (once ready), status and metrics."""

  def __init__(self, config: ServerConfig, load: Callable[[], Loaded]):
    self.config, self._load = config, load
    self.status = 'loading'  # -> ready -> draining; or failed (the engine died, or loading did)
    self.detail = ''
    self.loaded: Loaded | None = None
    self.driver: EngineDriver | None = None
    self.metrics = Metrics(self._snapshot, prefill_deadline_s=config.ttft_deadline_s,
                           decode_deadline_s=config.tbt_deadline_s)
    self.ready = threading.Event()
    self.loading_s = 0.0
    self.created = int(time.time())

  def _snapshot(self) -> dict:
    state = {'ready': int(self.status == 'ready'), 'state': self.status, 'reason': self.detail}
    return {**(self.driver.snapshot if self.driver else {}), **state}

  def _engine_failed(self, e: BaseException) -> None:
    """The driver's on_error (its thread): the probes turn red and `serve` exits 1."""
    self.status, self.detail = 'failed', f'the engine failed: {type(e).__name__}: {e}'

  @property
  def name(self) -> str:
    return self.config.model_name or (self.loaded.name if self.loaded else '')

  def load(self) -> None:
    """Loads and compiles the model (blocking); status 'ready' or 'failed'."""
    start = time.perf_counter()
    try:
      loaded = self._load()
      driver = EngineDriver(loaded.engine, self.metrics, self.config.max_waiting,
                            on_error=self._engine_failed,
                            fail_after_steps=self.config.fail_after_steps)
      driver.start()
    except Exception as e:  # pylint: disable=broad-except  (reported by /health and the log)
      logging.exception('loading the model failed')
      self.status, self.detail = 'failed', f'the model failed to load: {type(e).__name__}: {e}'
      self.ready.set()
      return
    self.loaded, self.driver = loaded, driver
    self.loading_s = time.perf_counter() - start
    if self.status == 'loading' and driver.error is None:
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
               'draining': 'the server is shutting down'}.get(self.status) or self.detail or (
                   f'the engine failed: {self.driver and self.driver.error!r}')
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


def create_app(service: Service) -> fastapi.FastAPI:
  """The FastAPI app (wrapped in serve/guard.py's Guard by `asgi_app`)."""
  app = fastapi.FastAPI(title='Stoker', version='0.1.0',
                        description='OpenAI-compatible completions served by the Stoker engine.')

  @app.exception_handler(APIError)
  async def _api_error(request, e: APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, e: RequestValidationError):
    message, param = validation_message(list(e.errors()))
    return guard.error(400, message, param=param)

  @app.exception_handler(StarletteHTTPException)
  async def _http(request, e: StarletteHTTPException):
    return guard.error(e.status_code, f'{e.detail}: {request.method} {request.url.path}',
                       type='not_found_error' if e.status_code == 404 else 'invalid_request_error',
                       headers=getattr(e, 'headers', None))

  @app.exception_handler(Exception)
  async def _unexpected(request, e: Exception):
    logging.error('%s %s failed', request.method, request.url.path, exc_info=e)
    return guard.error(500, f'Internal error: {type(e).__name__}: {e}', type='server_error')

  def probe(ok: bool):
    body = {'status': service.status, 'model': service.name}
    if service.status == 'ready':
      body['load_s'] = round(service.loading_s, 3)
      body.update({k: service.driver.snapshot.get(k) for k in ('running', 'waiting', 'pages_used')})
    else:
      body['detail'] = service.detail or {'loading': 'the model is loading and compiling',
                                          'draining': 'the server is shutting down'}[service.status]
    if ok:
      return body
    return JSONResponse(body, status_code=503,
                        headers={'Retry-After': str(service.config.retry_after_s)})

  @app.get('/health', summary='Liveness: 503 while loading and once the server has failed.')
  async def health():
    return probe(service.status in ('ready', 'draining'))

  @app.get('/ready', summary='Readiness: 200 only while the server admits requests.')
  async def ready():
    return probe(service.status == 'ready')

  @app.get('/metrics', summary='Prometheus metrics (text format 0.0.4).')
  async def metrics():
    return Response(service.metrics.exposition(), media_type=openapi.PROMETHEUS_TEXT)

  routes.add_v1_routes(app, service)

  def document():
    if app.openapi_schema is None:
      app.openapi_schema = openapi.document_responses(fastapi.FastAPI.openapi(app))
    return app.openapi_schema

  app.openapi = document
  return app


def asgi_app(service: Service):
  return guard.Guard(create_app(service), service)


# ----------------------------------------------------------------------------- running it


class _Server(uvicorn.Server):
  """uvicorn with our shutdown: a signal drains the Service first, and the exit code stays 0
  (uvicorn itself re-raises the signal after shutting down, which would end the process by it).
  A failed Service (engine died, or the load failed) is served `failure_drain_s` longer, so its
  in-flight requests get their errors and the probes are seen red, then the server stops."""

  def __init__(self, config: uvicorn.Config, service: Service):
    super().__init__(config)
    self.service = service
    self.drain_requested = False
    self._drain_task = None
    self._failed_at: float | None = None

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
    if self.service.status == 'failed':
      now = time.monotonic()
      if self._failed_at is None:
        self._failed_at = now
        logging.error('%s; stopping in %g s (exit status 1) so that the orchestrator restarts the '
                      'server.', self.service.detail, self.service.config.failure_drain_s)
      if now - self._failed_at >= self.service.config.failure_drain_s:
        self.should_exit = True
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
  c = service.config
  http = type('H11', (guard.HeaderDeadlineH11,), {'header_timeout_s': c.header_timeout_s})
  return uvicorn.Config(asgi_app(service), http=http, log_level='warning', access_log=False,
                        lifespan='off', timeout_graceful_shutdown=5, timeout_keep_alive=c.keep_alive_s,
                        limit_concurrency=c.max_connections + 1)  # uvicorn counts the new one


def serve(service: Service) -> int:
  """Serves until SIGTERM/SIGINT, then shuts down gracefully; returns the exit code: 0, or 1 once
  the engine (or the model's load) failed."""
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
  if service.status == 'failed':
    print(f'Server on port {port} stopped: {service.detail}.', file=sys.stderr, flush=True)
    return 1
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
