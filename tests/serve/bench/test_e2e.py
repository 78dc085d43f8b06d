"""`stoker bench` against the real `stoker serve` on loopback: both as a user runs them, in subprocesses.

The server serves the tiny random checkpoint of tests/serve/server_fixtures.py (the server tests' own);
the bench builds its prompts with that checkpoint's tokenizer and writes the CSV, JSON and PNGs.
"""

import csv
import json
import os
import subprocess
import sys

import pytest

from tests.serve.server_fixtures import make_workdir

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group('bench_e2e')]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
KEY = 'sk-bench-test'
# Context 128 tokens, 4 slots, one compiled bucket of 32 tokens: start-up stays short on 2 cores.
GIN = ['engine.num_pages=64', 'engine.page_size=8', 'engine.max_seqs=4', 'engine.max_pages_per_seq=16',
       'engine.token_budget=32', 'engine.min_bucket=32']
PNG = b'\x89PNG\r\n\x1a\n'


def stoker(*args, **kw):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS',)}
  return subprocess.Popen([sys.executable, os.path.join(REPO, 'cli.py'), *args], cwd=REPO, env=env,
                          text=True, **kw)


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  root = tmp_path_factory.mktemp('bench_e2e')
  workdir = make_workdir(str(root))
  log = open(root / 'server.log', 'w')
  proc = stoker('serve', '--checkpoint', workdir, '--port', '0', '--api-key', KEY,
                *[a for g in GIN for a in ('--gin_param', g)], stdout=subprocess.PIPE, stderr=log)
  line = proc.stdout.readline()  # 'Listening on http://127.0.0.1:PORT ...'
  assert line.startswith('Listening on http://127.0.0.1:'), (line, open(root / 'server.log').read()[-3000:])
  yield line.split()[2], str(root / 'data' / 'tokenizer.json'), root
  proc.terminate()
  proc.wait(60)
  log.close()


def bench(*args, timeout=600):
  proc = stoker('bench', *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def test_bench_against_stoker_serve(server):
  url, tokenizer, root = server
  out = root / 'out'
  # Started while the server still loads: the bench waits out its 503s (--wait-ready), then warms up.
  code, stdout, stderr = bench('--url', url, '--api-key', KEY, '--tokenizer', tokenizer, '--out', str(out),
                               '--workload', 'requests=10,rate=8,prompt=uniform:8:48,output=fixed:8,seed=0',
                               '--warmup', '1', '--no-progress', '--prefill-deadline', '2',
                               '--decode-deadline', '0.5', '--extra-body', '{"logprobs": 0}')
  assert code == 0, stderr[-3000:]
  assert '10/10 requests' in stdout and 'fluidity-index' in stdout
  with open(out / 'summary.json') as f:
    summary = json.load(f)
  assert summary['completed'] == 10 and summary['errors'] == {}
  assert summary['endpoint']['url'] == url
  with open(out / 'requests.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 10
  for row in rows:
    # Prompts have exactly the requested token count as the server counts them (no BOS added here).
    assert row['prompt_tokens_reported'] == row['prompt_tokens']
    assert row['output_tokens_reported'] == '8' and row['finish_reason'] == 'length'
    # Each streamed chunk names its tokens (logprobs.tokens), also a chunk whose text the server holds
    # back (a UTF-8 character split across tokens): the client counts every token.
    assert row['output_tokens'] == '8'
    assert 0 <= float(row['fluidity_index']) <= 1 and float(row['ttft_s']) > 0
  assert summary['output_tokens'] == 10 * 8 and summary['token_count_mismatches'] == 0
  for name in ('cdfs.png', 'tokens_vs_time.png', 'miss_rate_vs_tbt.png'):
    with open(out / name, 'rb') as f:
      assert f.read(8) == PNG, name


def test_bench_names_a_refused_key_and_a_dead_server(server):
  url, tokenizer, root = server
  code, _, stderr = bench('--url', url, '--tokenizer', tokenizer, '--out', str(root / 'nokey'))
  assert code == 2 and 'HTTP 401' in stderr and 'pass --api-key' in stderr
  code, _, stderr = bench('--url', 'http://127.0.0.1:9', '--tokenizer', tokenizer, '--out', str(root / 'x'))
  assert code == 2 and 'cannot reach http://127.0.0.1:9' in stderr
