"""The serving half of `stoker quickstart`: serve a trained workdir on loopback, fetch a few
completions through the OpenAI API as any client would, print them, shut down.

The engine is kept small so that start-up (restore + one compile per token bucket) stays short on
a 2-core CPU: one 64-token bucket, a 64-page pool, a context of 128 tokens (the quickstart's seq_len).
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Sequence

from serve import loader
from serve.engine import EngineConfig
from serve.server import BackgroundServer, ServerConfig, Service

QUICKSTART_ENGINE = EngineConfig(num_pages=64, page_size=16, max_seqs=4, max_pages_per_seq=8,
                                 token_budget=64, min_bucket=64)
PROMPTS = ('import ', 'def main(', 'class Parser:\n    def ')


def post(url: str, body: dict, timeout: float = 120.0) -> dict:
  request = urllib.request.Request(url, json.dumps(body).encode(),
                                   {'Content-Type': 'application/json'})
  with urllib.request.urlopen(request, timeout=timeout) as response:
    return json.load(response)


def _excerpt(text: str, lines: int = 4, width: int = 100) -> str:
  """The completion as printed: blank lines dropped, at most `lines` lines of `width` characters
  (a barely trained model may emit 40 newlines; the console should stay one screen)."""
  kept = [line[:width] for line in text.splitlines() if line.strip()]
  more = len(kept) > lines
  return '\n'.join(kept[:lines] + (['...'] if more else []))


def serve_and_sample(workdir: str, prompts: Sequence[str] = PROMPTS, max_tokens: int = 40,
                     engine_cfg: EngineConfig = QUICKSTART_ENGINE, tokenizer: str | None = None,
                     out=print) -> list[dict]:
  """Serves `workdir`'s newest checkpoint on 127.0.0.1 (a free port), completes each prompt
  greedily through POST /v1/completions, prints and returns the responses, and shuts down."""
  service = Service(ServerConfig(port=0),
                    lambda: loader.load_checkpoint(workdir, engine_cfg, tokenizer=tokenizer))
  server = BackgroundServer(service).start()
  try:
    start = time.perf_counter()
    server.wait_ready(timeout=900)
    out(f'Serving {service.name!r} at {server.url}/v1 (OpenAI API; loaded and compiled in '
        f'{time.perf_counter() - start:.1f} s). Completions fetched through it:')
    responses = []
    for prompt in prompts:
      response = post(f'{server.url}/v1/completions',
                      {'model': service.name, 'prompt': prompt, 'max_tokens': max_tokens,
                       'temperature': 0})
      responses.append(response)
      choice = response['choices'][0]
      out(f'--- prompt {prompt!r} ({response["usage"]["completion_tokens"]} tokens, '
          f'{choice["finish_reason"]}):\n{_excerpt(prompt + choice["text"])}')
  finally:
    server.stop()
  out(f'Server stopped. Serve it yourself: stoker serve --checkpoint {workdir}')
  return responses
