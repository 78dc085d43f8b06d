"""Host-side scheduler of the serving engine: which tokens of which requests one device step computes.

Pure Python, no JAX. Each step the engine calls `schedule()`, runs the plan on the device (writes the keys/values
of every ScheduledSeq's tokens into its block table's pages, samples where `sample` is set), then calls
`update(plan, sampled)`. Policies (`Policy`):

  CHUNKED        Sarathi-Serve stall-free batching under the token budget: every running decode gets one token,
                 then partial prefills continue in chunks, then waiting requests are admitted first-come-first-served
                 while budget, a free slot and free pages above the watermark allow.
  PREFILL_FIRST  vLLM v0: a step either prefills (partial prefills, then whole prompts admitted FCFS; a prompt
                 longer than the budget goes in chunks) or, when no prefill can run, decodes every running request.
  STATIC         static batching: up to max_seqs requests are admitted only when nothing runs (their prompts'
                 pages granted at once); the batch runs (prefills chunked, then decodes) until all of it finished.

Pages are granted on demand as sequences grow, never reserved for max_tokens. When a grant cannot be met the
newest running request (by arrival) not yet scheduled this step is preempted by recomputation: its pages are freed
and it returns to the front of the waiting queue, keeping its outputs; readmitted, it prefills prompt + outputs
again and samples its next token at the end of that prefill. A decode that would preempt an older request
preempts itself instead; a prefill chunk shrinks to the pages it can get. No admission in a step that preempted.

Overlapped steps (the engine's async scheduling): `advance(plan)` applies a step dispatched but not yet finished,
appending PLACEHOLDER for each token it samples, so that the next step can be planned at once (a decode's input token
is then the placeholder, which the engine feeds from the device); `resolve(plan, sampled)` later puts the real tokens
in, commits prefix-cache hashes and ends requests on a stop token or max_tokens. A request whose outputs reached
max_tokens is not planned again while its last token is a placeholder. `update(plan, sampled)` is advance + resolve:
the synchronous step. Several plans may be advanced ahead (a draft model plans its k steps before running them in one
device call): each resolve() takes the oldest, whose placeholder is the first of the request's trailing ones, and a
preempted request waits until its placeholders resolve (its prefill needs the tokens).

Speculative decoding (serve/speculative.py): `schedule(drafts)` takes draft tokens per request id (PLACEHOLDERs
for a draft model's, which reach the step on device). A decoding
request with a draft is planned as its last token followed by up to k draft tokens (ScheduledSeq.num_draft),
capped by max_tokens (at most max_tokens - outputs - 1 drafts: the verification always adds one token), by the
budget (one token kept for each decode planned after it) and by the pages the pool can grant without preempting
anyone (a draft never preempts; it shrinks). `update(plan, sampled)` then takes the verified tokens of such a
sequence (its accepted drafts and one more) and rolls back: num_computed keeps the keys/values of the last token and
the accepted drafts only, pages left holding none of them return to the pool, and prefix-cache hashes are committed
only over verified tokens (a page with a rejected draft token is rewritten later, so it must never be matchable).
Plans with drafts are synchronous: advance() refuses them.

Request state (`_Request`), explicit: token_ids (prompt + outputs), num_computed (tokens whose keys/values are in
its pages; the next token to compute is token_ids[num_computed]), prefill_len (tokens to prefill since the last
admission: decoding once num_computed reaches it), pages, slot, num_committed (leading pages whose block hash is
in the prefix cache, shared or committed by this request), block_hashes (chained hashes of its full blocks).

LoRA adapters (serve/lora.py): a request's `adapter` key is the root of its block hashes, so pages are shared only
between requests of the same adapter (keys and values depend on it); with max_adapters > 0, a waiting request is
admitted only if the running requests then use at most max_adapters distinct adapters (the device's slots).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Collection, Mapping, Sequence

from serve.admission import Admission
from serve.allocator import ROOT_HASH, PageAllocator, hash_blocks
from serve.plans import (PLACEHOLDER, Finished, Policy, ScheduledSeq, SchedulerConfig,  # noqa: F401
                         StepPlan)


@dataclasses.dataclass(eq=False)
class _Request:
  request_id: str
  arrival: int
  num_prompt: int
  max_tokens: int
  stop_token_ids: frozenset[int]
  token_ids: list[int]
  slot: int | None = None
  pages: list[int] = dataclasses.field(default_factory=list)
  num_computed: int = 0
  prefill_len: int = 0
  num_committed: int = 0
  block_hashes: list[bytes] = dataclasses.field(default_factory=list)
  use_prefix_cache: bool = True  # False: its prompt is computed whole (e.g. for prompt logprobs)
  adapter: bytes | None = None  # its LoRA adapter's key (None: the base): the root of its block hashes

  @property
  def output_ids(self) -> tuple[int, ...]:
    """Generated tokens known on the host (an unresolved placeholder left out)."""
    return tuple(t for t in self.token_ids[self.num_prompt:] if t != PLACEHOLDER)

  @property
  def decoding(self) -> bool:
    return self.num_computed >= self.prefill_len

  @property
  def done(self) -> bool:
    """Outputs reached max_tokens (the last may still be a placeholder): plan nothing more."""
    return len(self.token_ids) - self.num_prompt >= self.max_tokens


class Scheduler(Admission):
  """Continuous batching over a paged KV cache; see the module docstring and Policy."""

  def __init__(self, config: SchedulerConfig):
    self.config = config
    self.allocator = PageAllocator(config.num_pages, config.page_size, config.prefix_caching)
    self._requests: dict[str, _Request] = {}   # every request not finished, waiting or running
    self._waiting: list[_Request] = []          # FCFS; preempted requests go back to the front
    self._running: list[_Request] = []          # sorted by arrival
    self._free_slots = list(range(config.max_seqs))  # a heap: the lowest free slot is granted first
    self._arrivals = itertools.count()
    self._pending: tuple[StepPlan, dict[str, _Request]] | None = None  # the last non-empty plan, until advance()
    self._advanced: list[tuple[StepPlan, dict[str, _Request]]] = []  # advanced, oldest first, until resolve()
    self._fed: set[str] = set()  # requests the newest advanced plan samples: a placeholder input the device feeds
    self._drafts: Mapping[str, Sequence[int]] = {}  # the draft tokens given to the schedule() in progress

  # ---- requests in and out.

  def add(self, request_id: str, prompt_ids: Sequence[int], max_tokens: int,
          stop_token_ids: Collection[int] = (), use_prefix_cache: bool = True,
          adapter: bytes | None = None) -> None:
    """Queues a request. ValueError for an empty prompt, a taken id, max_tokens < 1, or a request too long for the
    block table (max_pages_per_seq * page_size tokens) or the pool ((num_pages - 1) * page_size tokens).
    use_prefix_cache=False: its prompt is not matched against the prefix cache (every token is computed); its
    pages still enter the cache for later requests. `adapter`: the key of its LoRA adapter (see the module doc)."""
    c = self.config
    if request_id in self._requests:
      raise ValueError(f'request id {request_id!r} is already queued or running; use a unique id per request.')
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
      raise ValueError(f'request {request_id!r} has an empty prompt; send at least one token (e.g. BOS).')
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
      raise ValueError(f'request {request_id!r}: max_tokens must be an int >= 1; got {max_tokens!r}.')
    length = len(prompt) + max_tokens
    if length > c.max_pages_per_seq * c.page_size:
      raise ValueError(f'request {request_id!r}: prompt ({len(prompt)}) + max_tokens ({max_tokens}) = {length} '
                       f'tokens exceeds the block table, max_pages_per_seq * page_size = {c.max_pages_per_seq} * '
                       f'{c.page_size} = {c.max_pages_per_seq * c.page_size}; shorten the request or raise '
                       f'max_pages_per_seq.')
    if length > self.allocator.total * c.page_size:
      raise ValueError(f'request {request_id!r}: prompt ({len(prompt)}) + max_tokens ({max_tokens}) = {length} '
                       f'tokens exceeds the whole pool, (num_pages - 1) * page_size = {self.allocator.total} * '
                       f'{c.page_size} = {self.allocator.total * c.page_size}; shorten the request or raise '
                       f'num_pages.')
    request = _Request(request_id, next(self._arrivals), len(prompt), max_tokens, frozenset(stop_token_ids),
                       prompt, use_prefix_cache=use_prefix_cache, adapter=adapter)
    self._requests[request_id] = request
    self._waiting.append(request)

  def abort(self, request_id: str) -> Finished | None:
    """Ends a request now (reason 'abort'), freeing its pages; None for an unknown id."""
    return self.finish(request_id, 'abort')

  def finish(self, request_id: str, reason: str = 'stop') -> Finished | None:
    """Ends a request now with `reason` (e.g. an engine-side stop string), freeing its pages; None if unknown."""
    request = self._requests.get(request_id)
    if request is None:
      return None
    if request.slot is None:
      self._waiting.remove(request)
    else:
      self._running.remove(request)
      self._release(request)
    del self._requests[request_id]
    return Finished(request_id, request.output_ids, reason)

  def output_ids(self, request_id: str) -> tuple[int, ...]:
    """Tokens generated so far by a queued or running request."""
    request = self._requests.get(request_id)
    if request is None:
      raise KeyError(f'unknown request id {request_id!r}: never added, or already finished (its Finished carries '
                     f'the outputs).')
    return request.output_ids

  @property
  def has_work(self) -> bool:
    return bool(self._requests)

  @property
  def num_running(self) -> int:
    return len(self._running)

  @property
  def num_waiting(self) -> int:
    return len(self._waiting)

  def block_table(self, request_id: str) -> tuple[int, ...]:
    """The pages a request holds now (empty while it waits)."""
    return tuple(self._requests[request_id].pages)

  def running_ids(self) -> tuple[str, ...]:
    return tuple(r.request_id for r in self._running)

  def decoding(self) -> list[tuple[str, list[int], int]]:
    """(id, tokens so far, outputs it may still add) of each running request that decodes next step with its
    last token known: those a drafter may draft for. The token lists are the scheduler's own; do not change them."""
    return [(r.request_id, r.token_ids, r.max_tokens - (len(r.token_ids) - r.num_prompt)) for r in self._running
            if r.decoding and not r.done and r.token_ids[-1] != PLACEHOLDER]

  def rewind(self, request_id: str, token_ids: Sequence[int]) -> None:
    """Replaces a request's tokens (a draft model following its target's verified tokens): keys/values of the
    common prefix stay (all but the last token at most), pages past them return to the pool, and the request
    prefills the rest and samples at its end. Needs prefix caching off: a page it rewrites may have been hashed."""
    if self.config.prefix_caching:
      raise ValueError('rewind() needs SchedulerConfig.prefix_caching=False: a rewound page may be in the prefix '
                       'cache, and rewriting it would corrupt the cache for every request that matches it.')
    if self._pending is not None or self._advanced:
      raise RuntimeError('rewind() between schedule() and update(); apply the step first.')
    request = self._requests[request_id]
    tokens = [int(t) for t in token_ids]
    if not tokens:
      raise ValueError(f'rewind({request_id!r}) to no tokens; give at least one.')
    common = min(request.num_computed, len(tokens) - 1, len(request.token_ids))
    if request.token_ids[:common] != tokens[:common]:
      common = next(i for i, (a, b) in enumerate(zip(request.token_ids, tokens)) if a != b)
    request.token_ids = tokens
    request.prefill_len = len(tokens)
    if request.slot is not None:
      request.num_computed = common
      need = -(-common // self.config.page_size)
      if len(request.pages) > need:
        extra, request.pages = request.pages[need:], request.pages[:need]
        self.allocator.release(reversed(extra))

  def check(self) -> None:
    """Asserts the allocator's invariants and that used pages are exactly those running requests reference."""
    self.allocator.check()
    refs = [0] * self.config.num_pages
    for request in self._running:
      for page in request.pages:
        refs[page] += 1
    assert refs == self.allocator.ref_counts, 'page references differ from the pages of the running requests'
    slots = [r.slot for r in self._running]
    assert len(set(slots)) == len(slots) and not set(slots) & set(self._free_slots), f'slots clash: {slots}'
    assert len(slots) + len(self._free_slots) == self.config.max_seqs, 'a slot leaked'
    assert all(r.slot is None and not r.pages for r in self._waiting), 'a waiting request holds a slot or pages'

  # ---- planning.

  def schedule(self, drafts: Mapping[str, Sequence[int]] | None = None) -> StepPlan:
    """Plans the next device step under the configured policy; `drafts`: draft tokens to verify, by request id
    (see the module docstring)."""
    if self._pending is not None:
      raise RuntimeError('schedule() called twice without update() or advance(): pass each non-empty plan to '
                         'update() (or advance()) before planning the next step.')
    self._drafts = drafts or {}
    step = _Step(self.config.token_budget)
    policy = self.config.policy
    if policy == Policy.CHUNKED:
      self._plan_decodes(step)
      self._plan_prefills(step)
      self._admit(step, whole_prompts=False)
    elif policy == Policy.PREFILL_FIRST:
      self._plan_prefills(step)
      self._admit(step, whole_prompts=True)
      if not step.seqs:
        self._plan_decodes(step)
    else:
      if not self._running:
        self._admit_batch()
      self._plan_decodes(step)
      self._plan_prefills(step)
    self._drafts = {}
    plan = StepPlan(tuple(step.seqs), tuple(step.preempted))
    if plan.seqs:
      self._pending = plan, {s.request_id: self._requests[s.request_id] for s in plan.seqs}
    return plan

  def _plan_decodes(self, step: _Step) -> None:
    # A placeholder input is fed from the step before only: one from an older step waits for its resolve().
    ready = lambda r: (r.slot is not None and r.decoding and not r.done and r.request_id not in step.scheduled
                       and (r.token_ids[-1] != PLACEHOLDER or r.request_id in self._fed))
    later = sum(map(ready, self._running)) if self._drafts else 0  # decodes still to plan, one token each
    for request in list(self._running):
      if step.budget == 0:
        break
      if not ready(request):
        continue
      later -= 1
      draft = self._draft(request, step, max(later, 0)) if self._drafts else ()
      if self._grow(request, 1 + len(draft), step, shrink=False):
        self._emit(request, 1 + len(draft), step, draft)

  def _draft(self, request: _Request, step: _Step, reserve: int) -> tuple[int, ...]:
    """The request's draft tokens, capped by max_tokens, the budget less `reserve` and the pages grantable now."""
    draft = self._drafts.get(request.request_id, ())
    if not draft or request.token_ids[-1] == PLACEHOLDER:
      return ()
    room = (len(request.pages) + self.allocator.num_available) * self.config.page_size - request.num_computed - 1
    outputs = len(request.token_ids) - request.num_prompt
    cap = min(len(draft), request.max_tokens - outputs - 1, step.budget - 1 - reserve, room)
    return tuple(int(t) for t in draft[:max(cap, 0)])

  def _plan_prefills(self, step: _Step) -> None:
    for request in list(self._running):
      if step.budget == 0:
        break
      if request.slot is None or request.decoding or request.request_id in step.scheduled:
        continue
      chunk = self._grow(request, min(request.prefill_len - request.num_computed, step.budget), step, shrink=True)
      if chunk:
        self._emit(request, chunk, step)

  def _grow(self, request: _Request, num_tokens: int, step: _Step, shrink: bool) -> int:
    """Grants the pages for request's next num_tokens tokens, preempting newer unscheduled requests while the pool
    is dry. Returns the tokens covered: num_tokens, fewer when shrink (prefill chunks), or 0 after a decode
    preempted itself."""
    G = self.config.page_size
    if request.num_computed + num_tokens <= len(request.pages) * G:
      return num_tokens  # the common decode: room left in its last page
    while True:
      needed = -(-(request.num_computed + num_tokens) // G) - len(request.pages)
      if needed <= self.allocator.num_available:
        break
      victim = self._victim(request, step)
      if victim is not None:
        self._preempt(victim, step)
      elif shrink:
        num_tokens = (len(request.pages) + self.allocator.num_available) * G - request.num_computed
        break
      else:
        self._preempt(request, step)
        return 0
    if num_tokens > 0:
      request.pages += self.allocator.allocate(max(0, -(-(request.num_computed + num_tokens) // G)
                                                   - len(request.pages)))
    return max(num_tokens, 0)

  def _victim(self, request: _Request, step: _Step) -> _Request | None:
    """The newest running request newer than `request` and not yet in this step's plan, if any."""
    for other in reversed(self._running):
      if other is request:
        return None
      if other.request_id not in step.scheduled:
        return other
    return None

  def _emit(self, request: _Request, num_tokens: int, step: _Step, draft: tuple[int, ...] = ()) -> None:
    start = request.num_computed
    request.num_computed += num_tokens
    step.budget -= num_tokens
    step.scheduled.add(request.request_id)
    own = num_tokens - len(draft)
    step.seqs.append(ScheduledSeq(
        request.request_id, request.slot, tuple(request.token_ids[start:start + own]) + draft, start,
        tuple(request.pages), sample=start + own == len(request.token_ids), num_draft=len(draft)))

  def _preempt(self, request: _Request, step: _Step) -> None:
    self._running.remove(request)
    self._release(request)
    self._waiting.insert(0, request)
    step.preempted.append(request.request_id)

  def _release(self, request: _Request) -> None:
    # Last page first, so the LRU evicts a sequence's tail before its (more shareable) head.
    self.allocator.release(reversed(request.pages))
    request.pages, request.num_computed, request.num_committed = [], 0, 0
    heapq.heappush(self._free_slots, request.slot)
    request.slot = None

  # ---- results.

  def update(self, plan: StepPlan, sampled: Mapping[str, int]) -> list[Finished]:
    """Applies a step's results: commits the prefix-cache hashes of pages filled by the step, appends each sampled
    token, and ends requests on a stop token or max_tokens. Requests aborted or finished since `schedule()` are
    skipped. Returns the requests that finished. A sequence with drafts takes its verified tokens (a sequence:
    accepted drafts, then one more) and is rolled back to them (module docstring)."""
    if not plan.seqs:
      return []
    if self._advanced:
      raise RuntimeError(f'update() with {len(self._advanced)} advanced plans unresolved; resolve() them first.')
    self._check_sampled(plan, self._take_pending(plan, 'update'), sampled)
    self._advance(plan)
    return self.resolve(plan, sampled)

  def advance(self, plan: StepPlan) -> None:
    """Applies a dispatched step before its tokens are known: PLACEHOLDER for each token it samples. The next step
    may then be planned; resolve(plan, sampled) must follow before the one after it."""
    if any(s.num_draft for s in plan.seqs):
      raise ValueError('advance() got a plan with draft tokens: how many are accepted is known only with the '
                       'results; apply it with update(plan, sampled).')
    self._advance(plan)

  def _advance(self, plan: StepPlan) -> None:
    if not plan.seqs:
      return
    pending = self._take_pending(plan, 'advance')
    self._pending = None
    self._advanced.append((plan, pending))
    self._fed = {s.request_id for s in plan.seqs if s.sample}
    for seq, request in self._live(plan, pending):
      if seq.sample:
        request.token_ids.append(PLACEHOLDER)

  def resolve(self, plan: StepPlan, sampled: Mapping[str, int]) -> list[Finished]:
    """Puts an advanced step's sampled tokens in place of its placeholders, commits the prefix-cache hashes of
    pages filled so far, and ends requests on a stop token or max_tokens. Returns the requests that finished."""
    if not plan.seqs:
      return []
    if not self._advanced or self._advanced[0][0] != plan:
      raise ValueError('resolve() got a plan that is not the oldest advanced one; call advance(plan) then '
                       'resolve(plan, sampled) once per non-empty plan, in order.')
    live = self._check_sampled(plan, self._advanced[0][1], sampled)
    del self._advanced[0]
    G = self.config.page_size
    finished = []
    for seq, request in live:
      if seq.sample:
        index = len(request.token_ids) - 1  # the first of the trailing placeholders: the oldest step's
        while index > 0 and request.token_ids[index - 1] == PLACEHOLDER:
          index -= 1
        got = sampled[seq.request_id]
        if seq.num_draft:
          index = self._verified(seq, request, index, got)
        else:
          request.token_ids[index] = int(got[0] if isinstance(got, (tuple, list)) else got)
      if self.config.prefix_caching:
        full = request.num_computed // G
        if full > request.num_committed:
          request.block_hashes = hash_blocks(request.token_ids[:full * G], G, request.block_hashes,
                                             request.adapter or ROOT_HASH)
          for i in range(request.num_committed, full):
            self.allocator.commit(request.pages[i], request.block_hashes[i])
          request.num_committed = full
      if not seq.sample:
        continue
      token = request.token_ids[index]
      if token in request.stop_token_ids or index + 1 - request.num_prompt >= request.max_tokens:
        finished.append(self.finish(request.request_id, 'stop' if token in request.stop_token_ids else 'length'))
    return finished

  def _verified(self, seq: ScheduledSeq, request: _Request, index: int, tokens) -> int:
    """Puts a verified draft's tokens in place (cut after a stop token or at max_tokens), rolls num_computed and
    the pages back to them, and returns the index of the last one."""
    tokens = _verified_tokens(seq, tokens)
    kept = []
    for token in tokens:
      kept.append(token)
      if token in request.stop_token_ids or len(request.token_ids) - request.num_prompt + len(kept) - 1 >= (
          request.max_tokens):
        break
    request.token_ids[index:] = kept
    request.num_computed = seq.start_pos + len(kept)  # the last token's and the accepted drafts' keys/values
    need = -(-request.num_computed // self.config.page_size)
    if len(request.pages) > need:
      extra, request.pages = request.pages[need:], request.pages[:need]
      self.allocator.release(reversed(extra))
    return len(request.token_ids) - 1

  def _take_pending(self, plan: StepPlan, caller: str) -> dict[str, _Request]:
    if self._pending is None or self._pending[0] != plan:
      raise ValueError(f'{caller}() got a plan that is not the last one schedule() returned, or one already '
                       f'applied; call {caller}() once per non-empty plan, in order.')
    return self._pending[1]

  def _live(self, plan: StepPlan, pending: dict[str, _Request]) -> list[tuple[ScheduledSeq, _Request]]:
    # Skip requests aborted or finished since schedule() (a new request may even have reused the id).
    return [(s, pending[s.request_id]) for s in plan.seqs if self._requests.get(s.request_id) is pending[s.request_id]]

  def _check_sampled(self, plan: StepPlan, pending: dict[str, _Request], sampled: Mapping[str, int]):
    live = self._live(plan, pending)
    missing = [s.request_id for s, _ in live if s.sample and s.request_id not in sampled]
    if missing:  # checked before any change, so the caller can retry with the full mapping
      raise ValueError(f'no sampled token for requests {missing}, whose ScheduledSeqs have sample=True; pass one '
                       f'token for every such sequence.')
    for s, _ in live:
      if s.num_draft:
        _verified_tokens(s, sampled[s.request_id])
    return live


def _verified_tokens(seq: ScheduledSeq, tokens) -> list[int]:
  """A drafted sequence's verified tokens as a list; ValueError unless they are accepted drafts and one more
  (a PLACEHOLDER draft, one the host never saw, matches any token)."""
  tokens = [int(t) for t in (tokens if isinstance(tokens, (tuple, list)) else (tokens,))]
  drafts = seq.token_ids[1:len(tokens)]
  if not 1 <= len(tokens) <= seq.num_draft + 1 or any(d not in (t, PLACEHOLDER) for t, d in zip(tokens, drafts)):
    raise ValueError(f'request {seq.request_id!r}: verified tokens {tokens} are not accepted drafts of '
                     f'{seq.token_ids[1:]} followed by one token; pass 1 to num_draft + 1 tokens.')
  return tokens


@dataclasses.dataclass
class _Step:
  """The plan under construction: budget left, sequences and preemptions so far."""
  budget: int
  seqs: list[ScheduledSeq] = dataclasses.field(default_factory=list)
  scheduled: set[str] = dataclasses.field(default_factory=set)
  preempted: list[str] = dataclasses.field(default_factory=list)
