"""The global routers, alone and inside the simulator, against hand-worked assignments."""

import pytest

from serve.bench.workload import RequestSpec
from serve.sim.router import ROUTERS, make_router
from serve.sim.simulator import ReplicaConfig, simulate

D = 1 / 64
D_US = 15625


class Const:
  def step_time_s(self, shape):
    return D


def test_round_robin_cycles_whatever_the_load():
  router = make_router('round_robin')
  assert [router.pick([5, 0, 0]) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_least_outstanding_takes_the_emptiest_lowest_on_ties():
  router = make_router('least_outstanding')
  assert router.pick([2, 1, 1]) == 1
  assert router.pick([0, 0, 0]) == 0
  assert router.pick([3, 4, 2]) == 2


def test_unknown_router_lists_the_choices():
  with pytest.raises(ValueError, match='round_robin, least_outstanding'):
    make_router('random')
  assert set(ROUTERS) == {'round_robin', 'least_outstanding'}


# R0 (long: 20 outputs) at 0; R1 (2 outputs) at 0; R2 (prompt 4, 2 outputs) at 10d, when R1 has finished (its tokens at
# d, 2d) and R0 still runs. round_robin: R0 -> 0, R1 -> 1, R2 -> 0 (it shares replica 0 with R0's decodes).
# least_outstanding: R0 -> 0 (tie), R1 -> 1, R2 -> 1 (replica 1 has nothing unfinished, replica 0 has R0).
SPECS = [RequestSpec(0, 0.0, 8, 20), RequestSpec(1, 0.0, 8, 2), RequestSpec(2, 10 * D, 4, 2)]


@pytest.mark.parametrize('name, requests', [('round_robin', [2, 1]), ('least_outstanding', [1, 2])])
def test_routers_in_the_simulator(name, requests):
  cfg = ReplicaConfig(model=Const(), page_size=4, num_pages=64, max_seqs=4, max_pages_per_seq=16, token_budget=8)
  result = simulate(SPECS, [cfg, cfg], router=name)
  assert [s.requests for s in result.replicas] == requests
  # R2 reaches an idle replica (least_outstanding) or a busy one mid-step: with a busy replica it waits for the
  # step after the next: R0's step [9d, 10d) ends as R2 arrives, R0's next step [10d, 11d) is planned without
  # it, and R2's prompt goes with R0's decode (1 + 4 tokens <= budget 8) in [11d, 12d).
  first = 1 if name == 'least_outstanding' else 2
  assert result.records[2].token_offsets_us == [first * D_US, (first + 1) * D_US]
  assert [s.steps for s in result.replicas] == ([20, 2] if name == 'round_robin' else [20, 4])
