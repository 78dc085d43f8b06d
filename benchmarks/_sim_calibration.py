"""benchmarks/sim_fidelity.py's measurements of the engine in its own process (its docstring, items 4, 6, 7): what
the server costs beyond Engine.step (calibrate), how fast the machine runs now against its profile (SpeedProbe),
and the step-time model at that speed (Scaled)."""

from __future__ import annotations

import dataclasses
import statistics
import time
import urllib.request

from serve.bench import workload


def gaps(times_us: list[int]) -> list[float]:
  return [(b - a) / 1e6 for a, b in zip(times_us, times_us[1:])]


class Scaled:
  """The step-time model on a machine at other speeds than its profile's, by step size: steps whose tokens fit the
  smallest bucket (decodes) `decode` times slower, larger ones (prefill chunks) `prefill` times."""

  def __init__(self, model, speed: dict, small_tokens: int):
    self.model, self.speed, self.small_tokens = model, speed, small_tokens
    self.wake = getattr(model, 'wake', None)

  def step_time_s(self, shape) -> float:
    kind = 'decode' if shape.num_tokens <= self.small_tokens else 'prefill'
    return self.speed[kind] * self.model.step_time_s(shape)


class SpeedProbe:
  """The machine's speed now against when it was profiled: one request alone on an Engine in this process (a
  fresh 240-token prompt, one chunk of the largest bucket, then 40 decodes in the smallest), each kind's wall
  time over the step-time model's for the same steps (1.0: as when profiled; 1.3: 30% slower). Two numbers, as
  a CPU can move one bucket and not the other (a second VM ran the first VM's profiled decodes 28% faster and
  its 256-token prefills as profiled). Timed on a second request, right after a first: the first would
  meet the machine waking from idle (serve/sim/wake.py; 1.0-2.3x here), which the profile's busy steps
  leave out. A diagnostic, before and after every real run: nothing of it reaches the simulator of the
  verdict (only the speed-adjusted one)."""

  PROMPT, DECODES = 240, 40
  KINDS = ('prefill', 'decode')  # the keys of a reading

  def __init__(self, args, checkpoint: str, engine: dict, model):
    import numpy as np  # pylint: disable=g-import-not-at-top
    from serve import loader  # pylint: disable=g-import-not-at-top
    from serve.engine import EngineConfig  # pylint: disable=g-import-not-at-top
    self.engine = loader.load_checkpoint(checkpoint, EngineConfig(**engine), tokenizer=args.tokenizer).engine
    self.model, self.calls, self.rng = model, 0, np.random.default_rng(args.seed + 2000)

  def __call__(self) -> dict[str, float]:
    self._time()  # untimed: the machine wakes from the idle before it (serve/sim/wake.py), as a profile's
    return self._time()  # steps are busy ones

  def _time(self) -> dict[str, float]:
    from serve.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
    from serve.sim.shape import StepShape  # pylint: disable=g-import-not-at-top
    self.calls += 1
    p, n = self.PROMPT, self.DECODES
    self.engine.add_request(f'probe-{self.calls}', self.rng.integers(1, 4000, p).tolist(),  # a cold prefix cache
                            SamplingParams(max_tokens=n + 1, temperature=0.0))
    walls, tokens = [], []
    while self.engine.has_work:
      start = time.perf_counter()
      tokens.append(len(self.engine.step()))
      walls.append(time.perf_counter() - start)
    # A call returns the tokens of the step dispatched by the call before and waits for them: the wall up to the
    # first token is the prefill's, the rest the decodes'.
    first = next(i for i, t in enumerate(tokens) if t) + 1
    if sum(tokens[first:]) != n or len(walls) - first != n:
      raise RuntimeError(f'SpeedProbe: a {p}-token prompt took {first} steps to its first token and then '
                         f'{len(walls) - first} steps for {sum(tokens[first:])} tokens, not 1 and {n} for {n}: '
                         'the profile\'s token_budget must hold the prompt in one chunk.')
    decodes = [StepShape((1,), (p + i,), p if i == 1 else 1) for i in range(1, n + 1)]
    return {'prefill': sum(walls[:first]) / self.model.step_time_s(StepShape((p,), (p,))),
            'decode': sum(walls[first:]) / sum(self.model.step_time_s(s) for s in decodes)}


def stepping(url: str) -> tuple[float, float]:
  """The server's seconds spent in Engine.step so far, once it is idle (/metrics: the driver publishes after
  each step), and its running sequences."""
  from prometheus_client.parser import text_string_to_metric_families  # pylint: disable=g-import-not-at-top
  while True:
    with urllib.request.urlopen(f'{url}/metrics', timeout=10) as r:
      samples = {s.name: s.value for f in text_string_to_metric_families(r.read().decode()) for s in f.samples}
    if samples['stoker_running_sequences'] == 0:
      return samples['stoker_engine_step_seconds_total']
    time.sleep(0.01)


def calibrate(args, url: str, eng) -> dict:
  """The server's costs beyond Engine.step: each request alone through the server and through the engine `eng`
  in this process, in alternating order (a drifting background load hits both alike). The two processes'
  seconds in Engine.step for the same request, server over engine, say whether they ran at one speed."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from serve.bench import client, prompts  # pylint: disable=g-import-not-at-top
  from serve.sampling import SamplingParams  # pylint: disable=g-import-not-at-top
  builder = prompts.PromptBuilder(prompts.load_tokenizer(args.tokenizer), args.seed)
  endpoint = client.Endpoint(url, ignore_eos=True)
  endpoint = dataclasses.replace(endpoint, model=asyncio.run(client.check(endpoint)))
  rng = np.random.default_rng(args.seed)

  def served(spec):  # the benchmark client's own code, as `stoker bench --max-concurrency 1`
    before = stepping(url)
    records, _ = asyncio.run(client.run_requests(
        endpoint, [spec._replace(arrival_s=0.0)], [builder.build(spec.prompt_tokens, spec.index, 99)], None,
        progress=False))
    if not records[0].ok or len(records[0].token_offsets_us) != spec.output_tokens:
      raise RuntimeError(f'calibration request failed or miscounted tokens: {records[0]}')
    return records[0].token_offsets_us, stepping(url) - before

  def alone(spec):  # the same request on the engine alone: its token times from add_request
    eng.add_request(f'alone-{spec.index}', rng.integers(1, 4000, spec.prompt_tokens).tolist(),
                    SamplingParams(max_tokens=spec.output_tokens, temperature=0.0))
    start, times, before = time.perf_counter_ns(), [], eng.stats['host_s']
    while eng.has_work:
      times += [(time.perf_counter_ns() - start) // 1000 for _ in eng.step()]
    return times, eng.stats['host_s'] - before

  # Short requests: the constants do not depend on the lengths, and a short step leaves background load less
  # time to disturb a pair (a 256-token prefill takes ~0.5 s here).
  wl = workload.WorkloadConfig(requests=args.calibration_requests, arrival='fixed', rate=float('inf'),
                               prompt=args.calibration_prompt, output='fixed:32', seed=args.seed + 1000)
  warm = workload.RequestSpec(10**6, 0.0, 16, 8)
  served(warm), alone(warm)
  pairs = []
  for spec in workload.build(wl):
    if spec.index % 2:
      s = served(spec)
      a = alone(spec)
    else:
      a = alone(spec)
      s = served(spec)
    pairs.append((s, a))
  speed = [s_step / a_step for (_, s_step), (_, a_step) in pairs]
  pairs = [(s, a) for (s, _), (a, _) in pairs]
  ttft = [(s[0] - a[0]) / 1e6 for s, a in pairs]
  step = [statistics.median(gaps(s)) - statistics.median(gaps(a)) for s, a in pairs if len(s) > 1]
  # Deviations from each request's median gap: the step-time model predicts a median step (the profile's
  # wall_s are medians), so the draws keep a zero median; their mean (~0.3-0.7 ms, a long right tail) is real
  # time every step costs on average.
  jitter = [round(g - statistics.median(gaps(s)), 6) for s, _ in pairs if len(s) > 1 for g in gaps(s)]
  return {'request_overhead_s': max(0.0, statistics.median(ttft)), 'step_overhead_s': max(0.0, statistics.median(step)),
          'step_jitter_s': jitter, 'served_times_us': [s for s, _ in pairs], 'engine_times_us': [a for _, a in pairs],
          'ttft_served_minus_engine_s': ttft, 'median_gap_served_minus_engine_s': step,
          'served_ttft_s': [s[0] / 1e6 for s, _ in pairs], 'engine_ttft_s': [a[0] / 1e6 for _, a in pairs],
          'server_over_engine_step_s': speed, 'server_speed_vs_engine': statistics.median(speed),
          'workload': dataclasses.asdict(wl)}
