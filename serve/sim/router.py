"""The simulator's global router: which replica a request goes to, decided when the client sends it.

  round_robin         request i of the run goes to replica i mod R, whatever their load.
  least_outstanding   the replica with the fewest unfinished requests (routed there and not yet finished or
                      refused); ties go to the lowest replica index.

A router is a small stateful object: `pick(outstanding)` gets every replica's unfinished-request count at the
moment of the decision and returns a replica index.
"""

from __future__ import annotations

from collections.abc import Sequence


class RoundRobin:
  name = 'round_robin'

  def __init__(self):
    self._next = 0

  def pick(self, outstanding: Sequence[int]) -> int:
    index = self._next % len(outstanding)
    self._next += 1
    return index


class LeastOutstanding:
  name = 'least_outstanding'

  def pick(self, outstanding: Sequence[int]) -> int:
    return min(range(len(outstanding)), key=outstanding.__getitem__)


ROUTERS = {cls.name: cls for cls in (RoundRobin, LeastOutstanding)}


def make_router(name: str) -> RoundRobin | LeastOutstanding:
  """A fresh router by name; ValueError naming the choices for an unknown one."""
  try:
    return ROUTERS[name]()
  except KeyError:
    raise ValueError(f'router {name!r} is unknown; use one of {", ".join(ROUTERS)}.') from None
