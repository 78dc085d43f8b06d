"""The simulator against timelines derived by hand from the engine's pipeline and the scheduler's policies.

With a constant step time d (1/64 s: sums of it are exact in binary, so microsecond offsets are exact), a step
dispatched at t ends at t + d, and its tokens reach the client then. References below are worked out step by
step in the comments, not taken from the code under test.
"""

import math

import pytest

from serve.bench import analysis
from serve.bench.workload import RequestSpec, WorkloadConfig, build
from serve.sim.simulator import ReplicaConfig, simulate

D = 1 / 64
D_US = 15625


class Const:
  def __init__(self, seconds=D):
    self.seconds = seconds

  def step_time_s(self, shape):
    return self.seconds


class Linear:
  """a + b per token: a step's time depends on its shape."""

  def __init__(self, a, b):
    self.a, self.b = a, b

  def step_time_s(self, shape):
    return self.a + self.b * shape.num_tokens


def replica(**kw):
  return ReplicaConfig(**{'model': Const(), 'page_size': 4, 'num_pages': 64, 'max_seqs': 4,
                          'max_pages_per_seq': 16, 'token_budget': 8, 'watermark': 0.0} | kw)


def offsets(result):
  return [r.token_offsets_us for r in result.records]


@pytest.mark.parametrize('prompt', [1, 8, 9, 20, 40])
def test_one_request_ttft_is_its_prefill_chunks_and_tbt_one_step(prompt):
  result = simulate([RequestSpec(0, 0.5, prompt, 5)], [replica(max_pages_per_seq=32)])
  chunks = math.ceil(prompt / 8)
  [record] = result.records
  assert record.sent_us == 500_000 and record.ok and record.status == 200
  assert record.token_offsets_us == [(chunks + i) * D_US for i in range(5)]
  assert (record.finish_reason, record.prompt_tokens_reported, record.output_tokens_reported) == (
      'length', prompt, 5)
  assert result.replicas[0].steps == chunks + 4  # the last token's step is the 5th after the prefill
  assert result.sim_s == 0.5 + (chunks + 4) * D


def test_step_time_follows_the_step_shape():
  # Prompt 20 with budget 8: chunks of 8, 8, 4 tokens, then decodes of 1 token.
  result = simulate([RequestSpec(0, 0.0, 20, 3)], [replica(model=Linear(0.01, 0.001))])
  prefill = 3 * 0.01 + 20 * 0.001
  want = [prefill, prefill + 0.011, prefill + 0.022]
  assert result.records[0].token_offsets_us == pytest.approx([w * 1e6 for w in want], abs=1)


# Two requests: R0 (prompt 8, 4 outputs) at 0, R1 (prompt 8, 3 outputs) at d/2, during R0's first step.
# R1 reaches the driver while step 1 runs, so it joins the scheduler after step 2 is dispatched at d.
TWO = [RequestSpec(0, 0.0, 8, 4), RequestSpec(1, D / 2, 8, 3)]
TIMELINES = {
    # step1 [0,d): R0 prefill 8. step2: R0 decode. step3: R0 decode + R1 chunk of 7 (budget 8). step4: R0 decode
    # + R1's last prompt token (samples). step5, step6: R1 decodes.
    'chunked': ([1, 2, 3, 4], [4, 5, 6]),
    # step1: R0 alone. R1 is admitted only when nothing runs: after R0's 4th token at 4d; step5 [4d,5d) R1.
    'static': ([1, 2, 3, 4], [5, 6, 7]),
    # step1: R0 prefill. step2: no prefill to run (R1 not yet added): R0 decode. step3: R1's whole prompt, no
    # decode. step4: both decode. step5: both decode; both finish.
    'prefill_first': ([1, 2, 4, 5], [3, 4, 5]),
}


@pytest.mark.parametrize('policy', list(TIMELINES))
def test_two_requests_follow_the_policy(policy):
  result = simulate(TWO, [replica(policy=policy)])
  ends_0, ends_1 = TIMELINES[policy]
  assert offsets(result) == [[k * D_US for k in ends_0], [k * D_US - D_US // 2 for k in ends_1]]
  assert result.replicas[0].steps == max(ends_0[-1], ends_1[-1])


def test_memory_pressure_preempts_the_newest_request_like_the_scheduler():
  # Pool of 4 pages of 4 tokens; R0 and R1 each need 3 pages (prompt 4 + 6 outputs). Step1 admits both (a page
  # each); steps 2-5 decode both (a second page each at step 2: pool full). Step6: R0 needs a 3rd page, so R1
  # (newest, not yet planned) is preempted and R0 finishes. Step7: R1 re-admitted, prefills 8 of its 9 tokens
  # (prompt + 5 outputs); step8: its last token, which samples its 6th output.
  cfg = replica(num_pages=5, max_seqs=2, prefix_caching=False)
  result = simulate([RequestSpec(0, 0.0, 4, 6), RequestSpec(1, 0.0, 4, 6)], [cfg])
  assert offsets(result) == [[k * D_US for k in (1, 2, 3, 4, 5, 6)], [k * D_US for k in (1, 2, 3, 4, 5, 8)]]
  stats = result.replicas[0]
  assert (stats.preemptions, stats.peak_pages, stats.steps) == (1, 4, 8)
  assert stats.tokens == 4 + 4 + 4 * 2 + 1 + 8 + 1  # prefills, decodes of both, R0 alone, R1's recompute


def test_server_errors_too_long_and_full():
  # Context min(16, 63) * 4 = 64 tokens. Capacity max_seqs + max_waiting = 2: the 3rd request at 0 gets 429.
  specs = [RequestSpec(0, 0.0, 8, 4), RequestSpec(1, 0.0, 60, 5), RequestSpec(2, 0.0, 8, 4),
           RequestSpec(3, 0.0, 8, 4), RequestSpec(4, 1.0, 8, 4)]
  result = simulate(specs, [replica(max_seqs=1, max_waiting=1)])
  errors = [(r.status, r.error) for r in result.records]
  assert errors == [(200, None), (400, 'http_4xx'), (200, None), (429, 'rate_limited'), (200, None)]
  assert 'context' in result.records[1].error_message and not result.records[1].token_offsets_us
  # max_seqs 1: R2 waits for R0 (4 steps), then runs alone; R4 comes when the replica is idle again.
  assert offsets(result)[2] == [k * D_US for k in (5, 6, 7, 8)]
  assert offsets(result)[4] == [k * D_US for k in (1, 2, 3, 4)]
  assert (result.replicas[0].requests, result.replicas[0].rejected) == (3, 1)


def test_server_costs_shift_the_timeline():
  # The request takes 2 ms to reach the driver, each token 1 ms to reach the client; every step 3 ms longer.
  cfg = replica(request_overhead_s=0.002, token_latency_s=0.001, step_overhead_s=0.003)
  result = simulate([RequestSpec(0, 0.0, 8, 3)], [cfg])
  want = [0.002 + k * (D + 0.003) + 0.001 for k in (1, 2, 3)]
  assert result.records[0].token_offsets_us == pytest.approx([w * 1e6 for w in want], abs=1)


class AfterLarger:
  """d, or 2d for a step of fewer tokens than the step before it; records (tokens, prev_tokens) per step."""

  def __init__(self):
    self.seen = []

  def step_time_s(self, shape):
    self.seen.append((shape.num_tokens, shape.prev_tokens))
    return 2 * D if shape.prev_tokens > shape.num_tokens else D


def test_each_step_knows_the_step_before_it():
  # A 20-token prompt in chunks of 8, 8, 4 (budget 8), then 3 decodes. The 4-token chunk follows an 8-token
  # step (2d); the first decode follows the 4-token step (2d); the other decodes follow decodes (d). Tokens:
  # ends of steps 3..6 = 4d, 6d, 7d, 8d.
  model = AfterLarger()
  [record] = simulate([RequestSpec(0, 0.0, 20, 4)], [replica(model=model)]).records
  assert model.seen == [(8, 0), (8, 8), (4, 8), (1, 4), (1, 1), (1, 1)]
  assert record.token_offsets_us == [4 * D_US, 6 * D_US, 7 * D_US, 8 * D_US]


def test_step_jitter_draws_a_deviation_per_step():
  # One deviation: every step d + 1 ms. Two: every gap is d - 2 ms or d + 2 ms, both occur, and reruns agree.
  [record] = simulate([RequestSpec(0, 0.0, 8, 4)], [replica(step_jitter_s=[0.001])]).records
  assert record.token_offsets_us == pytest.approx([k * (D + 0.001) * 1e6 for k in (1, 2, 3, 4)], abs=1)
  cfg = replica(step_jitter_s=(-0.002, 0.002), max_pages_per_seq=60)
  runs = [simulate([RequestSpec(0, 0.0, 8, 200)], [cfg]).records[0].token_offsets_us for _ in range(2)]
  gaps = {round((b - a) / 1e6 - D, 4) for a, b in zip(runs[0], runs[0][1:])}
  assert gaps == {-0.002, 0.002} and runs[0] == runs[1]


def test_records_feed_the_benchmark_analysis():
  result = simulate(TWO, [replica(policy='chunked')])
  slo = analysis.SLO()
  summary = analysis.summarize(result.records, analysis.request_rows(result.records, slo), slo, result.sim_s)
  # TTFTs: R0 d, R1 3.5d. Gaps after the first token: R0 d, d, d; R1 d, d.
  assert (summary['completed'], summary['failed'], summary['output_tokens']) == (2, 0, 7)
  assert summary['ttft_s']['max'] == pytest.approx(3.5 * D, abs=1e-6)
  assert summary['ttft_s']['min'] == pytest.approx(D, abs=1e-6)
  assert summary['tbt_s']['p50'] == pytest.approx(D, abs=1e-6)
  assert summary['duration_s'] == 6 * D
  assert summary['token_count_mismatches'] == 0


def test_a_workload_runs_to_completion_within_the_limits():
  specs = build(WorkloadConfig(requests=150, rate=20, prompt='uniform:16:160', output='uniform:8:64', seed=3))
  cfg = replica(num_pages=60, max_seqs=8, max_pages_per_seq=80, token_budget=32, watermark=0.01)
  result = simulate(specs, [cfg, cfg], router='least_outstanding')
  assert all(r.ok and len(r.token_offsets_us) == r.max_tokens for r in result.records)
  assert all(r.token_offsets_us == sorted(r.token_offsets_us) for r in result.records)
  assert all(s.peak_pages <= 59 for s in result.replicas)
  assert sum(s.preemptions for s in result.replicas) > 0  # 59 pages of 4 tokens are scarce for 8 slots
  assert sum(s.requests for s in result.replicas) == 150


def test_bad_configs_are_named():
  with pytest.raises(ValueError, match='StepTimeModel'):
    ReplicaConfig(model=object())
  with pytest.raises(ValueError, match='token_budget'):
    ReplicaConfig(model=Const(), max_seqs=32, token_budget=16)
  with pytest.raises(ValueError, match='not finite'):
    ReplicaConfig(model=Const(), step_jitter_s=(0.0, float('nan')))
  with pytest.raises(ValueError, match='policy'):
    ReplicaConfig(model=Const(), policy='fastest')
  with pytest.raises(ValueError, match='router'):
    simulate(TWO, [replica()], router='random')
