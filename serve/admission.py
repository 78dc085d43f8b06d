"""The scheduler's admission (serve/scheduler.py's module docstring has the policy): which waiting request
gets a slot and pages next, what of its prompt the prefix cache already holds, and the adapter limit. A
mixin of serve.scheduler.Scheduler, whose state it shares."""

from __future__ import annotations

import bisect
import heapq
from typing import TYPE_CHECKING

from serve.allocator import ROOT_HASH, hash_blocks
from serve.plans import PLACEHOLDER

if TYPE_CHECKING:
  from serve.scheduler import _Request, _Step


class Admission:
  """Scheduler methods that admit waiting requests (see the module docstring)."""

  def _prefix(self, request: _Request) -> list[int]:
    """Cached pages matching the request's leading full blocks, leaving at least its last token to compute."""
    if not self.config.prefix_caching or not request.use_prefix_cache:
      return []
    request.block_hashes = hash_blocks(request.token_ids, self.config.page_size, request.block_hashes,
                                       request.adapter or ROOT_HASH)
    return self.allocator.match(request.block_hashes[:(len(request.token_ids) - 1) // self.config.page_size])

  def _take(self, request: _Request, shared: list[int], num_new_pages: int) -> None:
    self.allocator.share(shared)
    request.pages = shared + self.allocator.allocate(num_new_pages)
    request.num_computed = len(shared) * self.config.page_size
    request.num_committed = len(shared)
    request.prefill_len = len(request.token_ids)
    request.slot = heapq.heappop(self._free_slots)
    self._waiting.remove(request)
    bisect.insort(self._running, request, key=lambda r: r.arrival)

  def _fits(self, shared: list[int], num_new_pages: int) -> bool:
    """Admission control: pages for the new grant (and cached pages it takes off the LRU) above the watermark;
    the watermark is waived when nothing runs, so a lone request always gets in."""
    reserve = self.config.watermark_pages if self._running else 0
    from_lru = sum(1 for p in shared if self.allocator.ref_counts[p] == 0)
    return num_new_pages + from_lru <= self.allocator.num_available - reserve

  def _admit(self, step: _Step, whole_prompts: bool) -> None:
    G = self.config.page_size
    while self._waiting and step.budget > 0 and self._free_slots and not step.preempted:
      request = self._waiting[0]
      if not self._adapter_fits(request) or request.token_ids[-1] == PLACEHOLDER:
        return  # a preempted request's prefill needs its placeholders resolved
      shared = self._prefix(request)
      remaining = len(request.token_ids) - len(shared) * G
      chunk = min(remaining, step.budget)
      if whole_prompts and chunk < remaining and remaining <= self.config.token_budget:
        return  # a prompt that fits a step goes in whole, in a later step
      num_new_pages = -(-(len(shared) * G + chunk) // G) - len(shared)
      if not self._fits(shared, num_new_pages):
        return
      self._take(request, shared, num_new_pages)
      self._emit(request, chunk, step)

  def _adapter_fits(self, request: _Request) -> bool:
    """Whether admitting `request` keeps the running requests' distinct adapters within max_adapters."""
    if not self.config.max_adapters or request.adapter is None:
      return True
    running = {r.adapter for r in self._running if r.adapter is not None}
    return request.adapter in running or len(running) < self.config.max_adapters

  def _admit_batch(self) -> None:
    """STATIC: admit up to max_seqs waiting requests FCFS, granting the pages of their whole prompts now."""
    G = self.config.page_size
    while self._waiting and self._free_slots:
      request = self._waiting[0]
      if not self._adapter_fits(request) or request.token_ids[-1] == PLACEHOLDER:
        return
      shared = self._prefix(request)
      num_new_pages = -(-len(request.token_ids) // G) - len(shared)
      if not self._fits(shared, num_new_pages):
        return
      self._take(request, shared, num_new_pages)
