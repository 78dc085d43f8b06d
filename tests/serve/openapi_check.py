"""Checks that what a server answered is what its /openapi.json declares (the server tests use it)."""

from __future__ import annotations

from typing import Iterable


def assert_declared(schema: dict, seen: Iterable[tuple[str, str, int, str | None]]) -> None:
  """Each (method, path template, status, content type) seen is declared in `schema`: the status
  under the operation, and the content type's media type (parameters aside) under the status.
  A content type of None checks the status only; FastAPI's own pages (/docs, /openapi.json) are
  not in the document they serve."""
  for method, path, status, content_type in seen:
    if path in ('/openapi.json', '/docs', '/redoc'):
      continue
    operation = schema['paths'][path][method]
    responses = operation['responses']
    assert str(status) in responses, (method, path, status, sorted(responses))
    if content_type is not None:
      declared = {m.split(';')[0].strip() for m in responses[str(status)].get('content', {})}
      assert content_type.split(';')[0].strip() in declared, (method, path, status, content_type,
                                                               declared)
  for item in schema['paths'].values():
    for operation in item.values():
      assert '422' not in operation['responses']  # validation errors are 400s
      for code, response in operation['responses'].items():
        assert response.get('content'), (code, response)
