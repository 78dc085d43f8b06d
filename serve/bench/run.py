"""`stoker bench`: check the endpoint, build the prompts, optionally profile the prefill time, then run the
workload once (requests.csv, summary.json, plots) or search the capacity (a run per probed rate under
DIR/capacity/, capacity.json, capacity.png, and the full report of the highest passing probe). DIR and
--prefill-profile may be local, gs://BUCKET/PATH or s3://BUCKET/PATH (storage/); an unusable bucket stops
the command before the first request."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import storage
from serve.bench import analysis, capacity, client, prompts, report, workload
from serve.bench import metrics as m

PROFILE_NAME, CAPACITY_NAME = 'prefill_profile.json', 'capacity.json'
# Prompt salts: every phase sends prompts no earlier phase sent (the server's prefix cache stays cold).
_WARMUP_SALT, _PROFILE_SALT, _RUN_SALT = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  endpoint: client.Endpoint
  workload: workload.WorkloadConfig
  slo: analysis.SLO
  out_dir: str
  tokenizer: str | None  # the server's tokenizer.json or its directory; None: fetched from a Stoker server
  max_concurrency: int | None = None
  warmup: int = 0  # requests sent one at a time before measuring, not recorded
  wait_ready_s: float = 600.0  # how long a server answering 503 (loading) is waited for
  progress: bool = True
  plots: bool = True
  capacity: capacity.SearchConfig | None = None
  profile_lengths: tuple[int, ...] = ()  # profile min TTFT at these prompt lengths first
  profile_repeats: int = 3


def _execute(cfg: BenchConfig, specs, builder, salt, description, max_concurrency=None):
  texts = [builder.build(s.prompt_tokens, s.index, salt) for s in specs]
  return asyncio.run(client.run_requests(cfg.endpoint, specs, texts, max_concurrency or cfg.max_concurrency,
                                         cfg.progress, description))


def profile_prefill(cfg: BenchConfig, builder) -> dict:
  """Min TTFT per prompt length, one request at a time, and the fitted polynomial."""
  specs = [workload.RequestSpec(i, 0.0, n, 1)
           for i, n in enumerate(n for n in cfg.profile_lengths for _ in range(cfg.profile_repeats))]
  records, _ = _execute(cfg, specs, builder, _PROFILE_SALT, 'prefill profile', max_concurrency=1)
  failed = [r for r in records if not r.ok]
  if failed:
    raise client.BenchError(f'prefill profiling: {len(failed)} requests failed, e.g. {failed[0].error}: '
                            f'{failed[0].error_message}')
  best = {}
  for r in records:
    n = r.prompt_tokens_reported or r.prompt_tokens
    best[n] = min(best.get(n, float('inf')), r.token_offsets_us[0] / m.US_PER_S)
  lengths = sorted(best)
  profile = {'prompt_tokens': lengths, 'min_ttft_s': [best[n] for n in lengths],
             'repeats': cfg.profile_repeats}
  profile['coefficients'] = list(m.fit_prefill(lengths, profile['min_ttft_s']))
  return profile


def load_profile(path: str) -> tuple[float, ...]:
  try:
    with storage.open(path) as f:
      return tuple(float(c) for c in json.load(f)['coefficients'])
  except FileNotFoundError:
    raise FileNotFoundError(f'--prefill-profile {path!r}: no such file (make one with --profile-prefill).')
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f'--prefill-profile {path!r} is not a prefill profile ({e}); make one with '
                     '--profile-prefill.') from None


def _measure(cfg: BenchConfig, wl, slo, builder, salt, description):
  specs = workload.build(wl)
  records, wall_s = _execute(cfg, specs, builder, salt, description)
  rows = analysis.request_rows(records, slo)
  summary = analysis.summarize(records, rows, slo, wall_s)
  summary['workload'] = dataclasses.asdict(wl)
  summary['endpoint'] = {'url': cfg.endpoint.url, 'model': cfg.endpoint.model, 'api': cfg.endpoint.api}
  return records, rows, summary


def bench(cfg: BenchConfig, log=print) -> dict:
  """Runs `stoker bench`; returns the summary (with capacity search: the capacity result)."""
  storage.check(cfg.out_dir, write=True)
  model = asyncio.run(client.check(cfg.endpoint, cfg.wait_ready_s, log))
  cfg = dataclasses.replace(cfg, endpoint=dataclasses.replace(cfg.endpoint, model=model))
  tokenizer = (prompts.load_tokenizer(cfg.tokenizer) if cfg.tokenizer else
               asyncio.run(client.fetch_tokenizer(cfg.endpoint)))
  builder = prompts.PromptBuilder(tokenizer, cfg.workload.seed)
  storage.makedirs(cfg.out_dir)
  slo = cfg.slo
  if cfg.profile_lengths:
    profile = profile_prefill(cfg, builder)
    report.write_json(profile, storage.join(cfg.out_dir, PROFILE_NAME))
    slo = dataclasses.replace(slo, prefill_profile=tuple(profile['coefficients']))
    log(f'prefill profile: min TTFT {dict(zip(profile["prompt_tokens"], profile["min_ttft_s"]))} s '
        f'-> {storage.join(cfg.out_dir, PROFILE_NAME)}')
  if cfg.warmup:
    specs = [workload.RequestSpec(i, 0.0, 16, 8) for i in range(cfg.warmup)]
    _execute(cfg, specs, builder, _WARMUP_SALT, 'warm-up', max_concurrency=1)

  if cfg.capacity is None:
    records, rows, summary = _measure(cfg, cfg.workload, slo, builder, _RUN_SALT, 'bench')
    paths = report.write_run(cfg.out_dir, rows, summary, records, cfg.plots)
    log(report.format_summary(summary))
    log('wrote ' + ', '.join(paths))
    return summary
  return _capacity(cfg, slo, builder, log)


def _capacity(cfg: BenchConfig, slo, builder, log) -> dict:
  runs = {}

  def probe(rate):
    wl = workload.with_rate(cfg.workload, rate)
    records, rows, summary = _measure(cfg, wl, slo, builder, _RUN_SALT + len(runs), f'{rate:.3g} req/s')
    out = storage.join(cfg.out_dir, 'capacity', f'rate_{rate:.4g}')
    report.write_run(out, rows, summary, records, plots=False)
    runs[rate] = (records, rows, summary)
    checks = summary['slo']['checks']  # the curve follows the first failing check (else the first)
    name = next((k for k, c in checks.items() if not c['passed']), next(iter(checks)))
    check = checks[name]
    result = {'passed': summary['slo']['passed'], 'slo_metric': name, 'slo_value': check['value'],
              'slo_target': check['target'], 'goodput': summary['goodput'],
              'request_throughput': summary['request_throughput'],
              'output_token_throughput': summary['output_token_throughput'],
              'ttft_p50_s': summary['ttft_s']['p50'], 'ttft_p99_s': summary['ttft_s']['p99'],
              'tbt_p99_s': summary['tbt_s']['p99'], 'fluidity_mean': summary['fluidity_index']['mean'],
              'miss_rate_p99': summary['miss_rate']['p99'], 'errors': summary['errors'], 'dir': out}
    log(f'  rate {rate:.4g} req/s: {"pass" if result["passed"] else "fail"} ({name} = {check["value"]}, '
        f'target {check["target"]}), goodput {summary["goodput"]:.3g} req/s')
    return result

  found, curve = capacity.search(probe, cfg.capacity)
  result = {'capacity_rate': found, 'search': dataclasses.asdict(cfg.capacity), 'slo': slo.describe(),
            'workload': dataclasses.asdict(cfg.workload), 'curve': curve}
  report.write_json(result, storage.join(cfg.out_dir, CAPACITY_NAME))
  paths = [storage.join(cfg.out_dir, CAPACITY_NAME)]
  if cfg.plots:
    from serve.bench import plots  # pylint: disable=g-import-not-at-top
    paths.append(plots.plot_capacity(storage.join(cfg.out_dir, 'capacity.png'), curve, found,
                                     slo.max_miss_rate))
  if found is not None:
    records, rows, summary = runs[found]
    paths += report.write_run(cfg.out_dir, rows, summary, records, cfg.plots)
    log(report.format_summary(summary))
  log(f'capacity: {"none (min rate fails)" if found is None else f"{found:.4g} req/s"} '
      f'after {len(curve)} probes; wrote ' + ', '.join(paths))
  return result
