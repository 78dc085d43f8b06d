"""Servers started in this process: what `stoker quickstart` serves, a shutdown whose deadline
aborts the streams that outlive it, and the source checks `stoker serve` runs before binding.
(The subprocess server and the API end to end: test_server.py.)"""

import dataclasses
import json
import os
import subprocess
import sys

import httpx2 as httpx
import pytest

from serve import demo, loader
from serve.server import BackgroundServer, ServerConfig, Service
from tests.serve.server_fixtures import ENGINE, long_stream

pytestmark = pytest.mark.xdist_group('server')

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_quickstart_serving_in_process(server_workdir):
  """What `stoker quickstart` does after training: serve in-process, fetch completions, stop."""
  lines = []
  responses = demo.serve_and_sample(server_workdir, prompts=['a', 'def'], max_tokens=5,
                                    engine_cfg=ENGINE, out=lines.append)
  assert [r['usage']['completion_tokens'] for r in responses] == [5, 5] or all(
      r['choices'][0]['finish_reason'] == 'stop' for r in responses)
  assert lines[0].startswith("Serving 'run' at http://127.0.0.1:") and len(lines) == 4
  port = int(lines[0].split('127.0.0.1:')[1].split('/')[0])
  with pytest.raises(httpx.ConnectError):
    httpx.get(f'http://127.0.0.1:{port}/health')


def test_shutdown_aborts_what_outlives_the_deadline(server_workdir):
  # The drain starts on uvicorn's next tick (0.1 s): the stream must outlast that by far, so its
  # engine takes 1000-token requests (120 tokens of this model stream in about 0.1 s).
  config = ServerConfig(port=0, shutdown_timeout_s=0.01)
  engine = dataclasses.replace(ENGINE, max_pages_per_seq=128, num_pages=130)
  service = Service(config, lambda: loader.load_checkpoint(server_workdir, engine))
  background = BackgroundServer(service).start()
  background.wait_ready(120)
  t, events = long_stream(background.url, max_tokens=1000)
  background.stop()
  t.join(30)
  assert events[-1] == 'data: [DONE]'
  assert json.loads(events[-2][6:])['choices'][0]['finish_reason'] == 'abort'
  assert len(events) - 1 < 1000  # aborted before max_tokens
  allocator = service.loaded.engine.scheduler.allocator
  allocator.check()
  assert allocator.num_used == 0


def test_serve_bad_sources_exit_2_before_binding(server_workdir):
  result = subprocess.run([sys.executable, os.path.join(REPO, 'cli.py'), 'serve', '--checkpoint',
                           '/no/such/dir'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2 and 'no such directory' in result.stderr, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr and 'Listening' not in result.stdout
  with pytest.raises(FileNotFoundError, match='no checkpoint of step 3'):
    loader.check_source(checkpoint=server_workdir, step=3)
  with pytest.raises(FileNotFoundError, match='no complete checkpoint'):
    loader.check_source(checkpoint=REPO)
  with pytest.raises(FileNotFoundError, match='no config.json'):
    loader.check_source(hf_dir=server_workdir)
  loader.check_source(checkpoint=server_workdir, step=7)
