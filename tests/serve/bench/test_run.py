"""`stoker bench` end to end (flags -> run -> requests.csv, summary.json, PNGs; capacity search) against the
scripted one-slot SSE server of fixtures.py, whose timing is known: first token after FIRST_S, then one
token every TOKEN_S, one request at a time."""

import argparse
import csv
import json
import os

import pytest

from serve.bench import flags, metrics, run
from tests.serve.bench.fixtures import FIRST_S, KEY, MODEL, TOKEN_S, SSEServer, tiny_tokenizer


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  directory = tmp_path_factory.mktemp('bench')
  tiny_tokenizer().save(str(directory / 'tokenizer.json'))
  server = SSEServer()
  url = server.start()
  yield url, str(directory)
  server.stop()


def bench(*argv):
  parser = argparse.ArgumentParser()
  flags.add_arguments(parser)
  return run.bench(flags.config_from_args(parser.parse_args(list(argv))), log=lambda *a: None)


def test_run_writes_csv_json_plots(setup):
  url, directory = setup
  out = os.path.join(directory, 'run')
  summary = bench('--url', url, '--api-key', KEY, '--tokenizer', directory, '--out', out, '--no-progress',
                  '--workload', 'requests=6,arrival=fixed,rate=20,prompt=uniform:4:12,output=fixed:5,seed=1',
                  '--prefill-deadline', '5', '--decode-deadline', '1')
  assert sorted(os.listdir(out)) == ['cdfs.png', 'miss_rate_vs_tbt.png', 'requests.csv', 'summary.json',
                                     'tokens_vs_time.png', ]
  with open(os.path.join(out, 'summary.json')) as f:
    assert json.load(f)['completed'] == summary['completed'] == 6
  assert summary['endpoint']['model'] == MODEL and summary['errors'] == {}
  assert summary['output_tokens'] == 30 and summary['token_count_mismatches'] == 0
  # Deadlines far above the server's pace: nothing missed, every request good.
  assert summary['slo']['passed'] and summary['fluidity_index']['min'] == 1.0 and summary['good_requests'] == 6
  with open(os.path.join(out, 'requests.csv')) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 6
  for row in rows:
    # The scripted server counts the prompt's words: the prompt has exactly the requested tokens.
    assert row['prompt_tokens'] == row['prompt_tokens_reported']
    times = [int(t) for t in row['token_times_us'].split()]
    gaps = metrics.gaps_us(times)
    assert len(gaps) == 5 and gaps[0] >= metrics.to_us(FIRST_S)
    # asyncio.sleep never wakes early, so token i arrives no sooner than the server's sleeps up to it
    # (single gaps may be shorter: a busy client can read one token late and the next on time).
    assert all(t >= metrics.to_us(FIRST_S) + i * metrics.to_us(TOKEN_S) for i, t in enumerate(times))
    assert float(row['ttft_s']) == gaps[0] / 1e6
  # The curve: at a D_d below every gap each request misses nearly every slot; above them, none.
  curve = summary['miss_rate_vs_decode_deadline']
  assert curve[0]['miss_rate'] > 0.5 and curve[-1]['miss_rate'] == 0.0


def test_tight_deadline_fails_the_slo(setup):
  url, directory = setup
  out = os.path.join(directory, 'tight')
  # D_p = 1 ms against a first token after 30 ms, then D_d = 2 ms against 10 ms between tokens: no
  # token banks slack, every one misses (with a looser D_p its banked slack would absorb the gaps). A
  # client that falls behind receives later tokens together (gaps of 0 meet their slots), but the first
  # token alone misses 1 + (30 - 1) // 2 = 15 of at most 18 slots.
  summary = bench('--url', url, '--api-key', KEY, '--tokenizer', directory, '--out', out, '--no-progress',
                  '--no-plots', '--workload', 'requests=2,rate=inf,prompt=fixed:4,output=fixed:4',
                  '--prefill-deadline', '0.001', '--decode-deadline', '0.002')
  assert not summary['slo']['passed']
  assert summary['miss_rate']['min'] >= 15 / 18 and summary['fluidity_index']['max'] <= 3 / 18
  assert not os.path.exists(os.path.join(out, 'cdfs.png'))


@pytest.mark.slow
def test_capacity_search_and_prefill_profile(setup):
  url, directory = setup
  out = os.path.join(directory, 'capacity')
  # One slot serving 0.03 + 3 x 0.01 = 0.06 s per request: above ~16 req/s requests queue and their TTFT
  # grows past D_p = 0.2 s (profile min TTFT ~0.03 s + 0.17 s slack) for a growing share of requests.
  result = bench('--url', url, '--api-key', KEY, '--tokenizer', directory, '--out', out, '--no-progress',
                 '--workload', 'requests=16,arrival=fixed,prompt=fixed:8,output=fixed:4',
                 '--profile-prefill', '4,8', '--profile-repeats', '2', '--ttft-slack', '0.17',
                 '--capacity-search', '--start-rate', '4', '--max-probes', '5', '--rate-tolerance', '0.3',
                 '--decode-deadline', '0.05')
  with open(os.path.join(out, run.PROFILE_NAME)) as f:
    profile = json.load(f)
  assert profile['prompt_tokens'] == [4, 8] and min(profile['min_ttft_s']) >= FIRST_S
  curve = result['curve']
  assert 2 <= len(curve) <= 5
  passed = [p['rate'] for p in curve if p['passed']]
  failed = [p['rate'] for p in curve if not p['passed']]
  assert passed and failed and result['capacity_rate'] == max(passed) < min(failed)
  assert 4 <= result['capacity_rate'] <= 64
  for name in ('capacity.json', 'capacity.png', 'summary.json', 'requests.csv', 'cdfs.png'):
    assert os.path.exists(os.path.join(out, name)), name
  assert all(os.path.exists(os.path.join(p['dir'], 'summary.json')) for p in curve)


def test_unreachable_endpoint_is_a_clear_error(setup):
  _, directory = setup
  with pytest.raises(ValueError, match='cannot reach'):
    bench('--url', 'http://127.0.0.1:9', '--tokenizer', directory, '--out', os.path.join(directory, 'x'))
