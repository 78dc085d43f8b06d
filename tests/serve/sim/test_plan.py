"""serve/sim/plan.py and `stoker plan`: the planner's choices move the right way when the SLO, the load or the
hardware changes; pruning never changes the answer; errors say what to do.

Small settings throughout (Llama-3-8B on roofline devices, a few dozen short requests, two or three engine
configurations): simulation cost grows with steps, not with the model's size.
"""

import dataclasses
import json
import math
import os

import pytest

import cli
from models.presets import preset
from serve.bench import workload
from serve.bench.workload import WorkloadConfig
from serve.sim import devices, estimator, plan, plan_report, plan_space, roofline, simulator, slo

WORKLOAD = WorkloadConfig.parse('requests=24,prompt=uniform:32:256,output=uniform:4:32,seed=0')
LOOSE = 'ttft_p90<2s,tbt_p99<200ms'
MODEL = preset('llama3_8b')
SHIPPED_PROFILE = os.path.join(os.path.dirname(estimator.__file__), 'profiles', 'tiny_cpu')
SPEED_FIELDS = ('peak_flops', 'hbm_bytes_per_s', 'link_bytes_per_s')  # Device's rates


@pytest.fixture(scope='module')
def cache():
  return {}  # simulations shared by the tests of this module (keyed by candidate, workload and rate)


@pytest.fixture(scope='module')
def hardware():
  return plan_space.roofline_hardware(MODEL, ['h100', 'tpu-v5e'])


def config(text=LOOSE, target=None, **kwargs):
  kwargs = {'max_seqs': (4, 16), 'token_budgets': (256,), **kwargs}
  return plan.PlanConfig(WORKLOAD, slo.parse(text), target, **kwargs)


def capacities(result):
  return {(r['device'], r['tp'], r['max_seqs'], r['token_budget']): r['capacity_rps'] for r in result['ranked']}


def test_candidates_fit_memory_as_kv_pages_available_says():
  big = preset('llama3_70b')
  hw = plan_space.roofline_hardware(big, ['all'])
  assert [h.name for h in hw] == list(devices.DEVICES)
  longest = plan_space.longest_request(WORKLOAD)
  assert longest == 256 + 32
  cands, skipped = plan_space.candidates(hw, (4, 16), (256, 1024), 16, longest)
  kept = {(c.hardware.name, c.tp, c.engine.max_seqs, c.engine.token_budget): c for c in cands}
  left_out = {(s['device'], s['tp'], s['max_seqs'], s['token_budget']) for s in skipped}
  for h in hw:
    d = devices.DEVICES[h.name]
    assert h.tps == tuple(tp for tp in (1, 2, 4, 8) if tp <= d.max_chips)  # divisors of 8 KV heads
    for tp in h.tps:
      for max_seqs in (4, 16):
        for budget in (256, 1024):
          key = (h.name, tp, max_seqs, budget)
          pages = roofline.kv_pages_available(big, d, tp, 16, max_seqs=max_seqs, token_budget=budget)
          assert (key in kept) == (pages - 1 >= math.ceil(longest / 16)) != (key in left_out), key
          if key in kept:  # pages for max_seqs of the longest request, never more than the chips hold
            engine = kept[key].engine
            assert engine.max_pages_per_seq == math.ceil(longest / 16)
            assert engine.num_pages == min(pages, max_seqs * engine.max_pages_per_seq + 1)
  assert not any(k[:2] == ('h100', 1) for k in kept)  # 140 GB of bf16 weights do not fit one 80 GB chip
  assert any(k[:2] == ('h100', 8) for k in kept)


def test_snap_is_a_geometric_grid():
  for tol in (0.1, 0.25):
    for k in range(-20, 40):
      g = (1 + tol) ** k
      assert plan.snap(g, tol) == g and plan.snap(g * (1 + tol / 2), tol) == g


def test_tighter_slo_never_raises_capacity_and_can_change_the_choice(hardware, cache):
  loose = plan.plan(hardware, config(prune=False), cache, log=lambda _: None)
  chosen = loose['chosen']
  # Tight: a TBT limit between the best TBT any configuration reached at its lowest load and the chosen one's.
  lowest = {(r['device'], r['tp'], r['max_seqs']): r['values_at_lowest']['tbt'] for r in loose['ranked']}
  best = min(lowest.values())
  mine = chosen['values_at_lowest']['tbt']
  assert best < mine, 'the test needs configurations that differ in their best TBT'
  tight = plan.plan(hardware, config(f'ttft_p90<2s,tbt_p99<{(best + mine) / 2}s', prune=False), cache,
                    log=lambda _: None)
  for key, cap in capacities(tight).items():
    assert cap is None or cap <= capacities(loose)[key], key
  assert (tight['chosen']['device'], tight['chosen']['tp'], tight['chosen']['max_seqs']) != (
      chosen['device'], chosen['tp'], chosen['max_seqs'])
  tighter = plan.plan(hardware, config('ttft_p90<2s,tbt_p99<200ms,e2e_p50<0.5s', prune=False), cache,
                      log=lambda _: None)
  for key, cap in capacities(tighter).items():
    assert cap is None or cap <= capacities(loose)[key], key


def test_higher_target_never_costs_less(hardware, cache):
  base = plan.plan(hardware, config(), cache, log=lambda _: None)['chosen']['capacity_rps']
  costs, replicas = [], []
  for q in (0.5 * base, 1.5 * base, 3.5 * base):
    result = plan.plan(hardware, config(target=q), cache, log=lambda _: None)
    c = result['chosen']
    assert c['replicas'] == math.ceil(q / c['capacity_rps'])
    assert c['cost_usd_per_hour'] == min(r['cost_usd_per_hour'] for r in result['ranked'] if r['capacity_rps'])
    assert c['check'][-1]['passed'] and c['replicas_checked'] >= c['replicas']
    costs.append(c['cost_usd_per_hour'])
    replicas.append({k: r['replicas'] for k, r in zip(capacities(result), result['ranked'])})
  assert costs == sorted(costs) and costs[0] < costs[-1]
  for before, after in zip(replicas, replicas[1:]):
    assert all(after[k] >= n for k, n in before.items() if n is not None and k in after)


def test_faster_device_at_equal_price_ranks_better(cache):
  slow = devices.DEVICES['h100']
  fast = dataclasses.replace(slow, name='h100-2x', **{
      f.name: 2 * getattr(slow, f.name) for f in dataclasses.fields(slow)
      if f.name in SPEED_FIELDS})
  hw = plan_space.roofline_hardware(MODEL, [slow, fast])
  result = plan.plan(hw, config(prune=False), cache, log=lambda _: None)
  caps = capacities(result)
  for (name, tp, max_seqs, budget), cap in caps.items():
    if name == 'h100':
      assert caps[('h100-2x', tp, max_seqs, budget)] >= cap
  assert result['ranked'][0]['device'] == 'h100-2x'


def test_pruning_never_changes_the_answer(hardware, cache):
  for target in (None, 40.0):
    full = plan.plan(hardware, config(target=target, prune=False), cache, log=lambda _: None)
    pruned = plan.plan(hardware, config(target=target), cache, log=lambda _: None)
    assert len(pruned['ranked']) + len(pruned['pruned']) == len(full['ranked'])
    for key in ('device', 'tp', 'max_seqs', 'token_budget', 'capacity_rps'):
      assert pruned['chosen'][key] == full['chosen'][key]
    best = max(r['requests_per_usd'] for r in full['ranked'])
    assert all(p['ceiling_rps'] * 3600 / p['price_usd_per_hour'] < best for p in pruned['pruned'])


def test_impossible_slo_says_so_with_the_best_achievable(hardware, cache):
  with pytest.raises(plan.ImpossibleSLO) as e:
    plan.plan(hardware, config('ttft_p90<1ms,tbt_p99<200ms', prune=False), cache, log=lambda _: None)
  text, best, results = str(e.value), e.value.best, e.value.results
  assert 'cannot be met by any of' in text
  assert f'Best achievable: ttft_p90 = {best["ttft"]:.4g}s, tbt_p99 = {best["tbt"]:.4g}s' in text
  assert all(r['capacity_rps'] is None for r in results)
  # Re-simulate the configuration with the lowest TTFT at its lowest load: the same value.
  r = min(results, key=lambda r: r['values_at_lowest']['ttft'])
  cand = r['candidate']
  specs = workload.build(dataclasses.replace(WORKLOAD, rate=r['lowest_rate']))
  records = simulator.simulate(specs, [simulator.ReplicaConfig.from_engine(
      cand.engine, cand.hardware.step_model(cand.tp, cand.engine))]).records
  assert slo.parse('ttft_p90<1ms').values(records)['ttft'] == best['ttft'] > 1e-3


def test_missing_profile_names_the_path_and_the_command(tmp_path):
  missing = str(tmp_path / 'no_profile')
  with pytest.raises(FileNotFoundError) as e:
    plan_space.profiled_hardware(MODEL, missing, 1.0)
  assert missing in str(e.value) and 'stoker profile --out' in str(e.value)


def test_plan_on_the_shipped_cpu_profile():
  with pytest.raises(ValueError, match='measured another model than the one planned'):
    plan_space.profiled_hardware(MODEL, SHIPPED_PROFILE, 1.0)
  hw = plan_space.profiled_hardware(preset('tiny'), SHIPPED_PROFILE, 0.5)
  fitted = estimator.fit(estimator.load_profile(SHIPPED_PROFILE))
  assert hw.tps == (1,) and hw.page_size == fitted.engine.page_size
  wl = WorkloadConfig.parse('requests=12,prompt=uniform:16:64,output=uniform:2:8')
  result = plan.plan([hw], plan.PlanConfig(wl, slo.parse('ttft_p90<30s'), 0.1, max_seqs=(4, 64)),
                     log=lambda _: None)
  engines = {(r['max_seqs'], r['token_budget'], r['num_pages']) for r in result['ranked']}
  e = fitted.engine  # the profiled limits: batch cap at most, its token budget and pool
  assert engines == {(4, e.token_budget, min(e.num_pages, 4 * 5 + 1)),
                     (e.max_seqs, e.token_budget, min(e.num_pages, e.max_seqs * 5 + 1))}
  assert result['chosen']['device'] == 'profile:tiny_cpu' and result['chosen']['capacity_rps'] > 0


def test_pareto_against_brute_force():
  points = [(1, 1), (2, 3), (2, 2), (3, 3), (4, 5), (1, 0.5), (5, 5)]
  assert plan_report.pareto(points) == [0, 1, 4]


def test_cli_plan_end_to_end(tmp_path, capsys):
  out = tmp_path / 'plan'
  code = cli.main(['plan', '--model', 'configs/model/llama3_8b.gin', '--devices', 'h100,tpu-v5e',
                   '--workload', 'requests=24,prompt=uniform:32:256,output=uniform:4:32', '--slo', LOOSE,
                   '--target-qps', '20', '--max-seqs', '4,16', '--token-budgets', '256', '--out', str(out)])
  printed = capsys.readouterr().out
  assert code == 0
  assert sorted(os.listdir(out)) == ['pareto.png', 'plan.json', 'plan.md']
  result = json.loads((out / 'plan.json').read_text())
  c = result['chosen']
  assert f'Cheapest for 20 req/s under {slo.parse(LOOSE)}: {c["replicas"]} x ({c["device"]} x{c["tp"]},' in printed
  assert '| 1 | ' in printed and result['ranked'][0]['requests_per_usd'] >= result['ranked'][-1]['requests_per_usd']
  assert cli.main(['plan', '--model', 'tiny', '--slo', 'ttft<2s', '--out', str(out)]) == 2
  assert "--slo item 'ttft<2s'" in capsys.readouterr().err
