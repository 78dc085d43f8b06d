"""The engine's own thread: the one place that calls the (not thread-safe) Engine.

HTTP handlers never touch the engine. They `try_submit` sequences (refused, for a 429, when the
running slots and the bounded waiting queue are full) and `abort` them; both only enqueue a
command. The driver thread applies queued commands, runs `engine.step()` while there is work,
hands each RequestOutput to its sequence's `deliver` callback (the server's callback moves it onto
the event loop), records token timings, and publishes a snapshot of the engine's state for
/metrics and /health after every step (and at once after an abort, so freed pages show without
waiting for the next step). Idle, it sleeps on the command queue.

If the engine raises, the driver fails every sequence it holds or has queued (their `deliver` gets a
RuntimeError naming the cause), refuses new ones, records the error and calls `on_error` (the
server turns /health and /ready red and exits non-zero), then its thread ends.

Fault injection, for testing that path end to end: `fail_after_steps=N` (ServerConfig.
fail_after_steps, `--gin_param server.fail_after_steps=N`) makes the driver raise instead of
running its (N+1)-th engine step. Nothing else reads it; leave it None in production.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import threading
import time
from typing import Callable

from serve.allocator import ROOT_HASH, hash_blocks
from serve.engine import Engine, RequestOutput
from serve.metrics import Metrics
from serve.sampling import SamplingParams

RATE_WINDOW_S = 10.0  # tokens per second are averaged over this window


@dataclasses.dataclass(eq=False)
class Sequence:
  """One engine request: a prompt with its sampling, and where its outputs go."""

  request_id: str
  prompt_ids: list[int]
  params: SamplingParams
  deliver: Callable[[RequestOutput | Exception], None]  # called on the driver thread
  arrival: float = dataclasses.field(default_factory=time.perf_counter)
  last: float | None = None  # when its latest token came out
  gaps: list[float] = dataclasses.field(default_factory=list)  # inter-token times, TTFT first


class EngineDriver:
  """Owns `engine` on a thread of its own; see the module docstring."""

  def __init__(self, engine: Engine, metrics: Metrics, max_waiting: int,
               on_error: Callable[[BaseException], None] | None = None,
               fail_after_steps: int | None = None):
    self.engine, self.metrics = engine, metrics
    self._on_error, self._fail_after_steps = on_error, fail_after_steps
    self._steps = 0
    self.capacity = engine.config.max_seqs + max_waiting
    self._commands: queue.SimpleQueue = queue.SimpleQueue()
    self._lock = threading.Lock()
    self._outstanding = 0  # sequences accepted and not yet finished (guarded by _lock)
    self._live: dict[str, Sequence] = {}  # driver thread only
    self._rate: collections.deque = collections.deque()  # (time, tokens), driver thread only
    self._prefix = [0, 0]  # prompt tokens found in the prefix cache, prompt tokens queried
    self.error: BaseException | None = None
    self.snapshot: dict = {}
    self._thread = threading.Thread(target=self._run, name='engine-driver', daemon=True)
    self._publish()

  # ---- any thread.

  def start(self) -> None:
    self._thread.start()

  def stop(self, timeout: float = 30.0) -> None:
    """Aborts whatever is left and ends the thread."""
    if self._thread.is_alive():
      self._commands.put(('stop', None))
      self._thread.join(timeout)

  @property
  def outstanding(self) -> int:
    with self._lock:
      return self._outstanding

  def try_submit(self, seqs: list[Sequence]) -> bool:
    """Queues all of `seqs`, or none (False) if that would exceed the capacity."""
    with self._lock:
      if self.error is not None or self._outstanding + len(seqs) > self.capacity:
        return False
      self._outstanding += len(seqs)
    for seq in seqs:
      self._commands.put(('add', seq))
    return True

  def abort(self, request_id: str) -> None:
    self._commands.put(('abort', request_id))

  def abort_all(self) -> None:
    self._commands.put(('abort_all', None))

  # ---- the driver thread.

  def _run(self) -> None:
    try:
      while True:
        commands = self._take(block=not self.engine.has_work)
        aborted = False
        for kind, arg in commands:
          if kind == 'add':
            self._add(arg)
          elif kind == 'abort':
            aborted = self._abort(arg) or aborted
          elif kind == 'abort_all':
            for request_id in list(self._live):
              aborted = self._abort(request_id) or aborted
          else:  # stop
            for request_id in list(self._live):
              self._abort(request_id)
            while self.engine.has_work:  # collect the step in flight
              self.engine.step()
            self._publish()
            return
        if aborted:  # the freed pages show now, not after the next step
          self._publish()
        if self.engine.has_work:
          if self._fail_after_steps is not None and self._steps >= self._fail_after_steps:
            raise RuntimeError(f'injected fault: fail_after_steps={self._fail_after_steps} (a test '
                               'hook; leave ServerConfig.fail_after_steps unset to serve)')
          self._steps += 1
          outputs = self.engine.step()
          now = time.perf_counter()
          for out in outputs:
            self._deliver(out, now)
        self._publish()
    except Exception as e:  # pylint: disable=broad-except  (fail the requests, not silently)
      self._fail(e)

  def _fail(self, e: Exception) -> None:
    logging.exception('the engine failed; failing every request')
    with self._lock:
      self.error = e  # try_submit refuses from here on
    error = RuntimeError(f'the engine failed: {type(e).__name__}: {e}')
    failed = list(self._live.values())
    self._live.clear()
    for kind, arg in self._take(block=False):  # accepted but not yet added
      if kind == 'add':
        failed.append(arg)
    for seq in failed:
      self.metrics.finished.labels('error').inc()
      self._safe_deliver(seq, error)
    with self._lock:
      self._outstanding = 0
    try:
      self._publish()
    except Exception:  # pylint: disable=broad-except  (the engine's state may be broken too)
      logging.exception('publishing the engine state after its failure')
    if self._on_error is not None:
      self._on_error(e)

  def _take(self, block: bool) -> list:
    commands = []
    try:
      commands.append(self._commands.get(timeout=0.5) if block else self._commands.get_nowait())
      while True:
        commands.append(self._commands.get_nowait())
    except queue.Empty:
      pass
    return commands

  def _add(self, seq: Sequence) -> None:
    engine = self.engine
    G = engine.config.page_size
    if engine.config.prefix_caching:
      adapter = seq.params.lora and engine.adapters.get(seq.params.lora)
      root = adapter.key if adapter else ROOT_HASH  # pages are cached per LoRA adapter
      hashes = hash_blocks(seq.prompt_ids, G, root=root)[:(len(seq.prompt_ids) - 1) // G]
      self._prefix[0] += len(engine.scheduler.allocator.match(hashes)) * G
    self._prefix[1] += len(seq.prompt_ids)
    try:
      engine.add_request(seq.request_id, seq.prompt_ids, seq.params)
    except ValueError as e:  # the server validates first; this is the engine's own word
      self._finish_count()
      self._safe_deliver(seq, e)
      return
    self.metrics.prompt_tokens.inc(len(seq.prompt_ids))
    self._live[seq.request_id] = seq

  def _abort(self, request_id: str) -> bool:
    out = self.engine.abort(request_id)
    if out is not None:
      self._deliver(out, time.perf_counter())
    return out is not None

  def _deliver(self, out: RequestOutput, now: float) -> None:
    seq = self._live.get(out.request_id)
    if seq is None:
      return
    if out.new_token_ids:
      gap = now - (seq.arrival if seq.last is None else seq.last)
      (self.metrics.ttft if seq.last is None else self.metrics.tbt).observe(gap)
      seq.gaps.append(gap)
      seq.last = now
      self.metrics.generation_tokens.inc(len(out.new_token_ids))
      self._rate.append((now, len(out.new_token_ids)))
    if out.finished:
      del self._live[out.request_id]
      self._finish_count()
      self.metrics.finished.labels(out.finish_reason or 'stop').inc()
      if out.finish_reason != 'abort':
        self.metrics.observe_sequence(seq.gaps)
    self._safe_deliver(seq, out)

  def _finish_count(self) -> None:
    with self._lock:
      self._outstanding -= 1

  @staticmethod
  def _safe_deliver(seq: Sequence, item) -> None:
    try:
      seq.deliver(item)
    except RuntimeError:  # the event loop is gone (shutting down): nobody is listening
      pass

  def _publish(self) -> None:
    now = time.perf_counter()
    while self._rate and self._rate[0][0] < now - RATE_WINDOW_S:
      self._rate.popleft()
    scheduler = self.engine.scheduler
    alloc = scheduler.allocator
    self.snapshot = dict(
        ready=int(self.error is None), waiting=scheduler.num_waiting, running=scheduler.num_running,
        outstanding=self.outstanding, pages_used=alloc.num_used, pages_free=alloc.num_free,
        pages_cached=alloc.num_cached, pages_total=alloc.total,
        preemptions=self.engine.stats['preemptions'], steps=self.engine.stats['steps'],
        step_seconds=self.engine.stats['host_s'],
        tokens_per_second=sum(n for _, n in self._rate) / RATE_WINDOW_S,
        rate_window_s=RATE_WINDOW_S, prefix_hit_tokens=self._prefix[0],
        prefix_query_tokens=self._prefix[1], lora_adapters=len(self.engine.adapters.names()),
        lora_resident=self.engine.adapters.resident, lora_swaps=self.engine.stats['lora_swaps'],
        expert_tokens=self.engine.expert_tokens_LE,  # None for a dense model; never changed in place
        **self.engine.spec_stats.as_dict())
