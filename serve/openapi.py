"""The server's OpenAPI document made true to what it answers.

FastAPI documents each route's 200 and a 422 the server never sends (validation errors are 400s in
OpenAI's error shape, serve/api.py). `document_responses` rewrites the generated schema: the 422s
go, and every operation lists each status it can return with its media type:

  every route    408 (body not read within ServerConfig.body_timeout_s), 413 (body too large),
                 500 (an unexpected error), 503 text/plain (uvicorn, past ServerConfig.max_connections)
  model routes   (all but the probes and /metrics: /v1/*, /tokenize, ...) 401 (when the server has
                 an API key), 503 (loading, draining, engine failed), and with a request body or
                 path parameters 400 and 404 (unknown model); completions also 429 (queue full)
                 and a 200 stream of text/event-stream
  probes         /health and /ready: 200 or 503 with the server's state (not an error body)
  /metrics       200 in Prometheus' text format

Errors (but the probes' 503s and uvicorn's plain-text 503) carry OpenAI's error object.
"""

from __future__ import annotations

import copy

OPEN_PATHS = ('/health', '/ready', '/metrics')  # no API key: probes and scrapers carry none
PROMETHEUS_TEXT = 'text/plain; version=0.0.4; charset=utf-8'

ERROR = {
    'title': 'ErrorResponse',
    'description': "OpenAI's error object.",
    'type': 'object',
    'required': ['error'],
    'properties': {'error': {
        'type': 'object',
        'required': ['message', 'type'],
        'properties': {
            'message': {'type': 'string', 'description': 'What went wrong and how to fix it.'},
            'type': {'type': 'string', 'examples': ['invalid_request_error', 'server_error']},
            'param': {'anyOf': [{'type': 'string'}, {'type': 'null'}],
                      'description': 'The request field at fault, if one is.'},
            'code': {'anyOf': [{'type': 'string'}, {'type': 'null'}]},
        }}},
}
STATE = {
    'title': 'ServerState',
    'type': 'object',
    'required': ['status', 'model'],
    'properties': {
        'status': {'type': 'string', 'enum': ['loading', 'ready', 'draining', 'failed']},
        'model': {'type': 'string'},
        'detail': {'type': 'string', 'description': 'Why the server is not ready (when it is not).'},
    },
}
REASONS = {
    200: 'Success.', 400: 'The request is invalid; the message names the field.',
    401: 'Missing or incorrect API key (when the server has one).',
    404: 'No such model or route.',
    408: 'The request body did not arrive within the deadline (ServerConfig.body_timeout_s); '
         'the connection is closed.',
    413: 'The request body exceeds ServerConfig.max_body_bytes.',
    429: 'The waiting queue is full; retry after Retry-After seconds.',
    500: 'The engine failed while running the request (the server then exits to be restarted), '
         'or an unexpected error.',
    503: 'Not ready: loading, draining or failed (JSON, with Retry-After), or over the connection '
         'cap (ServerConfig.max_connections, plain text from uvicorn).',
}
COMPLETION_ROUTES = ('/v1/completions', '/v1/chat/completions')
LORA_ROUTES = ('/v1/load_lora_adapter', '/v1/unload_lora_adapter')


def _ref(name: str) -> dict:
  return {'schema': {'$ref': f'#/components/schemas/{name}'}}


def statuses(path: str, method: str, operation: dict) -> dict[int, dict]:
  """{status: {media type: media object}} of one operation, per the module docstring."""
  error = {'application/json': _ref('ErrorResponse')}
  plain = {'text/plain': {'schema': {'type': 'string'}}}
  out = {408: error, 413: error, 500: error, 503: plain}
  if path not in OPEN_PATHS:
    out[401] = error
  if path in ('/health', '/ready'):
    out[200] = {'application/json': _ref('ServerState')}
    out[503] = {'application/json': _ref('ServerState'), **plain}
  elif path == '/metrics':
    out[200] = {PROMETHEUS_TEXT: {'schema': {'type': 'string'}}}
  else:
    out[503] = {**error, **plain}
    if 'requestBody' in operation or operation.get('parameters'):
      out.update({400: error, 404: error})
    if method == 'post' and path in COMPLETION_ROUTES:
      out[429] = error
    if path in LORA_ROUTES:  # vLLM's plain-text success message
      out[200] = plain
  return out


def document_responses(schema: dict) -> dict:
  """A copy of FastAPI's `schema` with every operation's responses as `statuses` says."""
  schema = copy.deepcopy(schema)
  schemas = schema.setdefault('components', {}).setdefault('schemas', {})
  schemas['ErrorResponse'], schemas['ServerState'] = ERROR, STATE
  for name in ('HTTPValidationError', 'ValidationError'):  # only the 422s referred to them
    schemas.pop(name, None)
  schema['components']['securitySchemes'] = {
      'bearer': {'type': 'http', 'scheme': 'bearer',
                 'description': 'The key the server was started with (--api-key or $STOKER_API_KEY).'}}
  for path, item in schema.get('paths', {}).items():
    for method, op in item.items():
      responses = op.setdefault('responses', {})
      responses.pop('422', None)
      for status, content in statuses(path, method, op).items():
        entry = responses.setdefault(str(status), {'description': REASONS[status]})
        if status == 200:  # FastAPI's guess (JSON of any shape) gives way to what the route sends
          entry['content'] = content
        else:
          entry.setdefault('content', {}).update(content)
      if method == 'post' and path in COMPLETION_ROUTES:
        responses['200']['content']['text/event-stream'] = {
            'schema': {'type': 'string', 'description': 'With "stream": true: server-sent events, '
                       'each `data: <chunk JSON>`, the last `data: [DONE]`.'}}
      if path not in OPEN_PATHS:
        op['security'] = [{'bearer': []}]
      op['responses'] = dict(sorted(responses.items()))
  return schema
