"""The serving engine: the host scheduler driving one compiled device step per budget bucket.

Each step: scheduler.schedule() plans which tokens of which requests to compute; the engine flattens
the plan into a StepBatch padded to the smallest budget bucket that holds it, and dispatches the
compiled step (paged forward + sampling, pools donated so they update in place).

Overlapped (async) scheduling, on by default: the device never waits for the host between steps.
While step n runs, `step()` applies it ahead of its results (scheduler.advance: a placeholder for each
token it samples), plans step n+1 and dispatches it; a decode whose input is such a placeholder
takes step n's sampled token on device (`feed_T` indexes step n's tokens, which never visit the
host first). Only then does the host wait for step n's tokens, put them in place
(scheduler.resolve: stop tokens, max_tokens, prefix-cache hashes) and build the outputs, while step
n+1 runs. A request that ends on a stop token has one wasted token computed in step n+1,
discarded. The synchronous path (results applied with scheduler.update before planning) is the same
code with advance and resolve fused. Which features use which path:
  overlapped   plain sampling, stop tokens and max_tokens (ended in resolve), stop strings (checked
               on the host while the next step runs, on either path: one token past the stop is
               computed and discarded), aborts (their in-flight token is dropped).
  synchronous  EngineConfig.async_scheduling=False; and steps after one that sampled for a
               grammar-constrained request (its next token bitmask needs the token before on
               the host; see Engine._overlaps); steps that speculate (their drafts need the tokens
               before them on the host; serve/speculative.py), unless every request that may
               draft is paused by the acceptance back-off.

Speculative decoding (EngineConfig.speculative, serve/speculative.py; the Engine's side in
serve/drafting.py): before planning, a drafter proposes up to k tokens per decoding request (prompt
lookup, or a draft model on its own Engine, attach_drafter); the scheduler plans each as its last
token + its drafts; the step verifies them on device (greedy: longest matching prefix; sampling:
exact rejection sampling), and the scheduler rolls rejected tokens back.

The compiled step, its packed inputs and the always-present inputs and outputs that keep features
(grammar masks, logprobs, LoRA slots, verification) from compiling variants of it: serve/step.py.
Logprobs are the model's own distribution (float32 log_softmax of the raw logits: before
temperature, top-k/top-p and the grammar mask), as vLLM's default.

Prompt logprobs and the prefix cache: tokens found in the prefix cache are never computed, so a
request that asks for prompt logprobs does not match its prompt against the cache (it prefills
all of it, its pages still enter the cache for others); its logprobs equal a cold prompt's.

Grammars (SamplingParams.grammar, serve/grammar.py): the engine owns one matcher per request.
After a step's tokens reach the host each constrained request's matcher consumes its token (the
request ends, reason 'stop', when the grammar is complete); the next step's bitmask rows are
filled from the matchers while the step is built. Their stepping is synchronous, so a mask
cannot overlap its own request's device step.

Multi-LoRA (serve/lora.py): with EngineConfig.max_loras > 0 the step takes the adapter slot stacks
as its last input and each token's slot id in the packed ints (0: the base). A request names its
adapter in SamplingParams.lora; before a step is dispatched the adapters its plan needs are copied
into slots (least recently used out, a jitted in-place write). The scheduler admits requests so
that the running ones use at most max_loras adapters, and roots their prefix-cache hashes at their
adapter's key (keys and values depend on it).

Tensor parallelism: with a mesh whose 'tensor' axis is > 1, params are sharded by the rule table
(heads, kv heads, MLP and vocabulary over 'tensor') and the pools on kv heads; XLA partitions the
step. Outputs equal the unsharded engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import time
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from models import transformer
from models.config import ModelConfig
from parallelism import sharding as sharding_lib
from parallelism.rules import DEFAULT_RULES, Rules
from serve import kv_cache, programs, quant, speculative
from serve import outputs as outputs_lib
from serve import lora as lora_lib
from serve import step as step_lib
from serve.attention import resolve
from serve.drafting import Drafting
from serve.engine_config import LAYER_LOOPS, EngineConfig, layer_bytes, out_major, unrolls  # pylint: disable=unused-import
from serve.sampling import SamplingParams
from serve.outputs import RequestOutput, TokenLogprob  # noqa: F401  (the engine's API)
from serve.scheduler import Scheduler, StepPlan
from serve.step import InFlight
from serve.text import TextStream


@dataclasses.dataclass(eq=False)
class _Request:
  params: SamplingParams
  seed: int
  prompt_ids: tuple[int, ...] = ()  # kept when prompt logprobs are wanted
  prompt_lp: list | None = None  # TokenLogprob per prompt position, filled by the prefill steps
  matcher: object = None  # the grammar's matcher (serve/grammar.py)
  stop_stream: TextStream | None = None  # incremental detokenization for stop strings
  adapter: lora_lib.HostAdapter | None = None  # its LoRA adapter (None: the base)
  speculate: bool = False  # drafts may be proposed for it (serve/speculative.py)
  kept: float = 0.0  # a moving average of the drafts its verifications kept (Drafting._judge)
  pause: int = 0  # tokens it samples without drafting before it drafts again (Drafting._judge)


class Engine(Drafting):
  """Continuous batching over a paged KV cache. Not thread-safe: drive it from one thread."""

  def __init__(self, model_cfg: ModelConfig, params: nnx.State | nnx.Module,
               engine_cfg: EngineConfig = EngineConfig(), mesh: Mesh | None = None, *,
               detokenize: Callable[[Sequence[int]], str] | None = None,
               rules: Rules = DEFAULT_RULES):
    self.model_cfg, self.config, self.mesh, self.detokenize = model_cfg, engine_cfg, mesh, detokenize
    if engine_cfg.compilation_cache_dir:
      programs.enable_compilation_cache(engine_cfg.compilation_cache_dir)
    unroll = unrolls(engine_cfg.layer_loop, jax.default_backend(), layer_bytes(model_cfg, engine_cfg))
    # Unrolled without LoRA (whose adapter stacks follow model_cfg's layout), the engine holds
    # each layer's weights as separate arrays: a stacked weight's slice is copied before every
    # product, each step (12 layers x 32 MB on the small preset).
    self._unstack = unroll and model_cfg.scan_layers and not engine_cfg.max_loras
    params = programs.layout(model_cfg, params, self._unstack)
    serve_cfg = dataclasses.replace(model_cfg, scan_layers=False) if self._unstack else model_cfg
    graphdef, abstract_params = nnx.split(
        nnx.eval_shape(lambda: transformer.Transformer(serve_cfg, nnx.Rngs(0))))
    self.adapters = lora_lib.AdapterStore(model_cfg, abstract_params, engine_cfg.max_loras,
                                          engine_cfg.max_lora_rank)
    self.backend = resolve(engine_cfg.attention)
    spec = kv_cache.KVCacheSpec.for_model(model_cfg, engine_cfg.num_pages, engine_cfg.page_size,
                                          engine_cfg.kv_dtype)
    self.kv_spec = spec
    B, M = engine_cfg.max_seqs, engine_cfg.max_pages_per_seq
    self._K1, self._S = engine_cfg.verify_width, engine_cfg.verify_slots
    R = self._S * self._K1
    self._has_q = engine_cfg.speculative == 'draft'
    # A T-token step samples at most T rows: a small bucket (a single decode) runs its LM head
    # and sampling on min(B, T) rows, not B.
    self.graphdef, self.unroll = graphdef, unroll  # the model as the step runs it
    steps = {T: functools.partial(step_lib.step, graphdef, self.backend, mesh, unroll,
                                  (T, min(B, T), M, self._S, self._K1),
                                  (self._has_q, bool(engine_cfg.max_loras)))
             for T in engine_cfg.buckets()}
    self._step_fns, self._chains = steps, {}  # chains: _launch_chain's programs, compiled on first use
    self._relay = programs.relay(engine_cfg.weight_dtype == 'int8',
                                 out_major(engine_cfg.weight_layout, jax.default_backend(),
                                           model_cfg.d_model))
    params = self._relay(params)
    abstract_params = jax.eval_shape(self._relay, abstract_params)
    self.weight_bytes = quant.nbytes(params)
    self._replicated = None if mesh is None else NamedSharding(mesh, PartitionSpec())
    stacks = lora_lib.init_stacks(self.adapters.targets, engine_cfg.max_loras, engine_cfg.max_lora_rank)
    self.params, self.pages, self._stacks, jitted = programs.place(
        steps, params, abstract_params, spec, stacks, mesh, rules, engine_cfg.weight_dtype == 'int8',
        2 * self._has_q + bool(engine_cfg.max_loras))
    axes = {lora_lib.path_name(t.path): len(t.lead) for t in self.adapters.targets}
    self._write_slot = jax.jit(functools.partial(lora_lib.write_slot, axes), donate_argnums=(0,))
    self._slot_of: dict[bytes, int] = {}  # adapter key -> slot id, for the step being built
    self.scheduler = Scheduler(engine_cfg.scheduler_config())
    self._requests: dict[str, _Request] = {}
    self._inflight: InFlight | None = None
    self._seeds = np.random.default_rng(engine_cfg.seed)
    self._ids = itertools.count()
    # Seconds: host_s is all of step(); within it plan_s (scheduler.schedule), build_s (host
    # buffers and dispatch), wait_s (blocked on the device's tokens), update_s (scheduler.update,
    # advance and resolve) and output_s (stop strings, outputs); mask_s (grammar bitmasks, in
    # build_s). overlapped_steps: async ones.
    self.stats = dict(steps=0, overlapped_steps=0, tokens=0, padded_tokens=0, preemptions=0,
                      compile_s=0.0, host_s=0.0, plan_s=0.0, build_s=0.0, wait_s=0.0,
                      update_s=0.0, output_s=0.0, mask_s=0.0, lora_swaps=0)
    self._no_tokens = jax.device_put(np.zeros(B, np.int32), self._replicated)
    self._mask_words = -(-model_cfg.vocab_size // 32)
    self._all_allowed = jax.device_put(np.full((B, self._mask_words), -1, np.int32),
                                       self._replicated)
    self._num_prompt_lp = 0  # live requests that want prompt logprobs
    self._num_grammar = 0  # live requests with a grammar
    self._num_speculative = 0  # live requests that may draft
    self._undrafted = []  # requests that found no draft for the step being planned (Drafting._propose)
    self._no_q = (jax.device_put(np.zeros((R, model_cfg.vocab_size), np.float32), self._replicated)
                  if self._has_q else None)
    self._no_drafts = jax.device_put(np.zeros(R, np.int32), self._replicated) if self._has_q else None
    self._drafter = speculative.NgramDrafter() if engine_cfg.speculative == 'ngram' else None
    self.spec_stats = speculative.SpecStats()
    # A mixture of experts: the assignments each layer's experts received over all steps (padding
    # excluded), int64 [L, E], replaced (never changed in place) after each step; None: dense.
    self.expert_tokens_LE = (np.zeros((model_cfg.num_layers, model_cfg.num_experts), np.int64)
                             if model_cfg.moe else None)
    start = time.perf_counter()
    self._steps, self._compiled = {}, {}
    with self._rules(rules):
      for T in engine_cfg.buckets():
        self._steps[T] = jitted[T].lower(self.params, self.pages,
                                         *self._host_arrays(StepPlan((), ()), T)).compile()
        self._compiled[T] = functools.partial(step_lib.tokens_only, self._steps[T])
    self.stats['compile_s'] = time.perf_counter() - start

  def _rules(self, rules):
    if self.mesh is None:
      return contextlib.nullcontext()
    return sharding_lib.activation_rules(self.mesh, rules)

  # ---- requests.

  def add_request(self, request_id: str, prompt_ids: Sequence[int],
                  params: SamplingParams = SamplingParams()) -> None:
    """Queues a request; ValueError (from the scheduler) if it cannot ever fit."""
    if params.stop and self.detokenize is None:
      raise ValueError(f'request {request_id!r} has stop strings {params.stop} but the engine has '
                       'no detokenize callback; pass Engine(..., detokenize=...).')
    if any(not 0 <= t < self.model_cfg.vocab_size for t in prompt_ids):
      raise ValueError(f'request {request_id!r}: prompt token ids must be in [0, '
                       f'{self.model_cfg.vocab_size}); got {list(prompt_ids)[:16]}...')
    matcher = None
    if params.grammar is not None:
      if params.grammar.vocab_size != self.model_cfg.vocab_size:
        raise ValueError(f'request {request_id!r}: its grammar was compiled for a vocabulary of '
                         f'{params.grammar.vocab_size} tokens, the model has '
                         f'{self.model_cfg.vocab_size}; compile it with the model\'s vocab_size.')
      matcher = params.grammar.matcher()
    wants_prompt = params.prompt_logprobs is not None
    adapter = None
    if params.lora is not None:
      try:
        adapter = self.adapters.acquire(params.lora)
      except KeyError:
        raise ValueError(f'request {request_id!r}: no LoRA adapter named {params.lora!r} is loaded '
                         f'(loaded: {self.adapters.names()}).') from None
    try:
      self.scheduler.add(request_id, prompt_ids, params.max_tokens, params.stop_token_ids,
                         use_prefix_cache=not wants_prompt,
                         adapter=None if adapter is None else adapter.key)
    except ValueError:
      if adapter is not None:
        self.adapters.release(adapter)
      raise
    seed = params.seed if params.seed is not None else int(self._seeds.integers(2 ** 32))
    request = _Request(params, seed, matcher=matcher, adapter=adapter,
                       speculate=bool(self._K1) and params.speculate and params.logprobs is None
                       and matcher is None, kept=float(self.config.num_speculative_tokens))
    if wants_prompt:
      request.prompt_ids = tuple(int(t) for t in prompt_ids)
      request.prompt_lp = [None] * len(request.prompt_ids)
    if params.stop:
      request.stop_stream = TextStream(self.detokenize, params.stop)
    self._track(request, 1)
    self._requests[request_id] = request

  def _track(self, request: _Request, sign: int) -> None:
    self._num_prompt_lp += sign * (request.prompt_lp is not None)
    self._num_grammar += sign * (request.matcher is not None)
    self._num_speculative += sign * request.speculate

  def _drop(self, request_id: str) -> None:
    request = self._requests.pop(request_id, None)
    if request is not None:
      if request.speculate and self._drafter is not None:
        self._drafter.forget(request_id)
      self._track(request, -1)
      if request.adapter is not None:
        self.adapters.release(request.adapter)

  def abort(self, request_id: str) -> RequestOutput | None:
    """Ends a request now and frees its pages; None for an unknown (or finished) id."""
    finished = self.scheduler.abort(request_id)
    self._drop(request_id)
    if finished is None:
      return None
    return RequestOutput(request_id, (), True, finished.reason, finished.output_ids)

  @property
  def has_work(self) -> bool:
    return self.scheduler.has_work or self._inflight is not None

  def update_params(self, params: nnx.State | nnx.Module) -> None:
    """Samples with new weights from the next step on (an RL trainer's, say), and flushes the prefix cache,
    whose pages hold KV computed with the old ones. The arrays stay on device: stacked layers are sliced
    apart once (an on-device copy of the weights, as the engine holds them unrolled), then each leaf is put
    where the engine's copy lives, a no-op where the shardings agree and one on-device re-lay where they
    differ. Between rollouts only: live requests' KV would mix the two weights."""
    if self.has_work:
      raise RuntimeError(f'update_params with {len(self._requests)} live requests: their cached KV was '
                         f'computed with the old weights; finish or abort them first.')
    params = self._relay(programs.layout(self.model_cfg, params, self._unstack))
    if programs.shapes(params) != programs.shapes(self.params):
      raise ValueError('update_params: the new params differ in structure, shape or dtype from the '
                       'engine\'s; pass the state of the same ModelConfig (cast to the engine\'s dtype).')
    self.params = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), params, self.params)
    self.stats['prefix_flushes'] = self.stats.get('prefix_flushes', 0) + 1
    self.scheduler.allocator.flush()

  # ---- steps.

  def step(self) -> list[RequestOutput]:
    """Dispatches the next step, collects the tokens of the step before it, returns what changed.

    The first call after idle returns nothing (it only dispatches); every later call returns the
    outputs of the step dispatched by the call before it.
    """
    start = time.perf_counter()
    prev, self._inflight = self._inflight, None
    if prev is not None and self._overlaps(prev):
      clock = time.perf_counter()
      self.scheduler.advance(prev.plan)
      self.stats['update_s'] += time.perf_counter() - clock
      prev = prev._replace(advanced=True)
      self._dispatch(prev)
    new, finished = self._collect(prev) if prev is not None else ([], [])
    if self._inflight is None:  # not overlapped, or nothing could be planned ahead of prev
      self._dispatch(None)
    # Host work below overlaps the device step just dispatched.
    clock = time.perf_counter()
    done = {f.request_id: f for f in finished}
    outputs = []
    for request_id, tokens, lp in new:
      request = self._requests[request_id]
      if request.stop_stream is not None and (request_id not in done or len(tokens) > 1):
        tokens = outputs_lib.stop_strings(self.scheduler, request_id, request.stop_stream, tokens, done)
      self._num_prompt_lp -= request.prompt_lp is not None
      outputs.append(outputs_lib.request_output(request_id, request, tokens, lp, done.get(request_id)))
      if request_id in done:
        self._drop(request_id)
    now = time.perf_counter()
    self.stats['output_s'] += now - clock
    self.stats['host_s'] += now - start
    return outputs

  def _overlaps(self, prev: InFlight) -> bool:
    """Whether the step after `prev` may be planned before prev's tokens reach the host: not when
    prev sampled for a grammar-constrained request (its next bitmask needs that token), nor when
    prev verified drafts or the next step may draft (drafts need the tokens before them)."""
    if self._num_grammar and any(r is not None and r.matcher is not None and s.sample
                                 for s, r in zip(prev.plan.seqs, prev.requests)):
      return False
    if self._K1 and (self._may_draft() or any(s.num_draft for s in prev.plan.seqs)):
      return False
    return self.config.async_scheduling

  def _collect(self, prev: InFlight) -> tuple[list[tuple[str, tuple[int, ...], TokenLogprob | None]],
                                                list]:
    """Waits for prev's tokens and applies them; (request id, new tokens, logprob or None) of live
    requests (several tokens where drafts were accepted), and the requests that finished."""
    clock = time.perf_counter()
    tokens = np.asarray(prev.tokens_B)
    now = time.perf_counter()
    self.stats['wait_s'] += now - clock
    if prev.expert_tokens_LE is not None:
      self.expert_tokens_LE = self.expert_tokens_LE + np.asarray(prev.expert_tokens_LE)
    sampled = {s.request_id: int(tokens[b]) for b, s in enumerate(prev.plan.seqs) if s.sample}
    before = {}  # outputs before this step, of requests that verified drafts
    if prev.verified is not None:
      tokens_SK1, accepted_S = (np.asarray(x) for x in prev.verified)
      drafted = [(s, r) for s, r in zip(prev.plan.seqs, prev.requests) if s.num_draft]
      for i, (s, r) in enumerate(drafted):  # verification slot i (serve/step.py)
        if self._requests.get(s.request_id) is r:
          m = int(accepted_S[i])
          sampled[s.request_id] = tuple(tokens_SK1[i, :m + 1].tolist())
          before[s.request_id] = len(self.scheduler.output_ids(s.request_id))
          self.spec_stats.verifications += 1
          self.spec_stats.drafted += s.num_draft
          self.spec_stats.accepted += m
          self.spec_stats.rejections += m < s.num_draft
          self._judge(r, m)
    apply = self.scheduler.resolve if prev.advanced else self.scheduler.update
    finished = apply(prev.plan, sampled)
    ended = {f.request_id: f for f in finished}
    self.stats['update_s'] += time.perf_counter() - now
    # Requests aborted since dispatch are skipped by the scheduler; report nothing for them.
    live = [(b, s, r, t) for b, s, r, t in outputs_lib.spans(prev.plan, prev.requests)
            if r is not None and self._requests.get(s.request_id) is r]
    if prev.token_lp is not None:
      outputs_lib.fill_prompt_logprobs(prev.token_lp, live)
    new = outputs_lib.new_tokens(live, sampled, before, ended, self.scheduler, prev.row_lp)
    if self._num_grammar:
      ended = {f.request_id for f in finished}
      finished += self._advance_grammars([n for n in new if n[0] not in ended])
    return new, finished

  def _advance_grammars(self, new) -> list:
    """Each constrained request's matcher consumes its token; those whose grammar is complete
    (or, never expected under the mask, rejected the token) end now, before the next step is
    planned."""
    ended = []
    for request_id, (token,), _ in new:  # constrained requests never draft: one token each
      matcher = self._requests[request_id].matcher
      if matcher is not None and (not matcher.consume_token(token) or matcher.is_stopped()):
        ended.append(self.scheduler.finish(request_id, 'stop'))
    return ended

  def _dispatch(self, prev: InFlight | None) -> None:
    """Plans and dispatches a step; `prev`: the advanced step still in flight, whose sampled
    tokens feed this step's decodes of them."""
    if not self.scheduler.has_work:
      return
    drafts = self._propose(prev) if self._K1 else None
    plan = self._plan(drafts, ahead=prev is not None)
    if plan is not None:
      self._count_pauses(plan)
      self._inflight = self._launch(plan, prev, drafts)
    if drafts and self._has_q:
      self._settle_drafts()  # the draft model's bookkeeping, while the verification runs

  def _plan(self, drafts=None, ahead: bool = False) -> StepPlan | None:
    """scheduler.schedule(drafts), timed; None for an empty plan when `ahead` (a step is in flight:
    what runs is done or waits for pages that resolving it frees), else an empty plan is an error."""
    clock = time.perf_counter()
    plan = self.scheduler.schedule(drafts)
    self.stats['plan_s'] += time.perf_counter() - clock
    self.stats['preemptions'] += len(plan.preempted)
    if plan.seqs or ahead:
      return plan if plan.seqs else None
    raise RuntimeError(f'the scheduler planned an empty step with {self.scheduler.num_waiting} '
                       f'waiting and {self.scheduler.num_running} running requests; the pool '
                       f'({self.config.num_pages} pages) or slots may be too small.')

  def _bucket(self, num_tokens: int) -> int:
    return next(b for b in self.config.buckets() if b >= num_tokens)

  def _launch(self, plan: StepPlan, prev: InFlight | None, drafts=None) -> InFlight:
    """Dispatches `plan`'s compiled step; `prev`: the step in flight whose tokens it feeds on."""
    clock = time.perf_counter()
    T = self._bucket(plan.num_tokens)
    if self.config.max_loras:
      self._place_adapters(plan)
    arrays = self._host_arrays(plan, T, prev, *self._verification_inputs(plan, drafts))
    if self._replicated is not None:
      arrays = jax.device_put(arrays, self._replicated)
    out, self.pages = self._steps[T](self.params, self.pages, *arrays)
    tokens_B, row_lp, token_lp, logits_BV, verified, expert_tokens_LE = out
    requests = tuple(self._requests.get(s.request_id) for s in plan.seqs)
    wants_rows = any(r is not None and r.params.logprobs is not None and s.sample
                     for s, r in zip(plan.seqs, requests))
    wants_prompt = self._num_prompt_lp and any(r is not None and r.prompt_lp is not None
                                               for r in requests)
    inflight = InFlight(plan, requests, tokens_B, row_lp=row_lp if wants_rows else None,
                         token_lp=token_lp if wants_prompt else None, logits_BV=logits_BV,
                         verified=verified if any(s.num_draft for s in plan.seqs) else None,
                         expert_tokens_LE=expert_tokens_LE)
    self._count(plan, T, prev is not None, clock)
    return inflight

  def _count(self, plan: StepPlan, T: int, overlapped: bool, clock: float) -> None:
    self.stats['build_s'] += time.perf_counter() - clock
    self.stats['steps'] += 1
    self.stats['overlapped_steps'] += overlapped
    self.stats['tokens'] += plan.num_tokens
    self.stats['padded_tokens'] += T

  def _place_adapters(self, plan: StepPlan) -> None:
    """Copies the adapters `plan` needs into device slots (LRU) and records their slot ids."""
    needed = [r.adapter for r in (self._requests.get(s.request_id) for s in plan.seqs)
              if r is not None and r.adapter is not None]
    self._slot_of, writes = self.adapters.assign(needed)
    for slot, adapter in writes:
      self._stacks = self._write_slot(self._stacks, np.int32(slot - 1), adapter.factors)
    self.stats['lora_swaps'] += len(writes)

  def _host_arrays(self, plan: StepPlan, T: int, prev: InFlight | None = None,
                   q_RV: jax.Array | None = None, drafts_R: jax.Array | None = None):
    """The step's inputs after params and pages: the plan as packed numpy buffers
    (step.host_inputs), the tokens of `prev` (the step in flight) that placeholders in the plan
    stand for, the grammar bitmask [B, ceil(V / 32)], with a draft model its logits and draft
    tokens in the verification rows (q_RV, drafts_R; zeros when none), and the LoRA slots when the
    engine has any."""
    prev_rows = {} if prev is None else prev.plan.sample_rows()
    B = self.config.max_seqs
    ints, floats, mask, mask_s = step_lib.host_inputs(
        plan, T, min(B, T), self.config.max_pages_per_seq, self._S, self._K1,
        self._requests, self._slot_of, self._mask_words, prev_rows if prev is not None else None)
    self.stats['mask_s'] += mask_s
    if mask is not None and len(mask) < B:  # always [B, words]: one input shape for every bucket
      mask = np.pad(mask, ((0, B - len(mask)), (0, 0)), constant_values=-1)
    return (ints, floats, self._no_tokens if prev is None else prev.tokens_B,
            self._all_allowed if mask is None else mask) + (
                (self._no_q if q_RV is None else q_RV, self._no_drafts if drafts_R is None else drafts_R)
                if self._has_q else ()) + (
                (self._stacks,) if self.config.max_loras else ())

  # ---- offline use.

  def generate(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] = SamplingParams()
               ) -> list[list[int]]:
    """Runs `prompts` to completion and returns their generated tokens, in order. For offline
    use: other requests in the engine are stepped along, but their outputs are not returned."""
    if isinstance(params, SamplingParams):
      params = [params] * len(prompts)
    if len(params) != len(prompts):
      raise ValueError(f'{len(params)} SamplingParams for {len(prompts)} prompts; pass one, or one '
                       'per prompt.')
    ids = [f'generate-{next(self._ids)}' for _ in prompts]
    for request_id, prompt, p in zip(ids, prompts, params):
      self.add_request(request_id, prompt, p)
    results: dict[str, tuple[int, ...]] = {}
    while len(results) < len(ids):
      if not self.has_work:
        raise RuntimeError(f'engine went idle with {len(ids) - len(results)} requests unfinished.')
      for out in self.step():
        if out.finished:
          results[out.request_id] = out.output_ids
    while self._inflight is not None and not self.scheduler.has_work:
      self.step()  # collect a step dispatched for requests that a stop string has since ended
    return [list(results[i]) for i in ids]
