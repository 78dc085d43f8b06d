"""The Engine's speculative decoding side (serve/speculative.py): attaching a drafter, the back-off,
proposing drafts before a step is planned; and, on a draft model's own engine, its k steps run as one
device call (`_launch_chain`, driven by speculative.DraftModel). A mixin of serve/engine.Engine, whose
state it shares.

A draft model's drafts reach the target's verification on device: propose() dispatches the drafter's
steps and returns PLACEHOLDERs; the target plans its step around them and dispatches it with the
drafter's tokens and logits gathered into its verification rows (DraftModel.feed; serve/step.py feeds
them into the step's tokens); only then does the host wait for the drafter's tokens, to apply them to
its own requests (_settle_drafts) while the verification runs. So the target's planning and
dispatch (~1 ms a round on a 2-core CPU) overlap the drafter's steps, where they used to wait for
them. Prompt lookup needs the tokens on the host: it drafts there."""

from __future__ import annotations

import time
from typing import Sequence

import jax

from serve import programs, speculative
from serve import step as step_lib
from serve.scheduler import StepPlan
from serve.step import InFlight


class Drafting:
  """Engine methods for speculative decoding (see the module docstring)."""

  def _speculating(self) -> bool:
    """Whether the next step drafts: some live request may, and the engine holds at most
    speculative_max_batch requests, running or waiting (the back-off: serve/speculative.py says
    why; counting the waiting ones backs off while a large batch is still being admitted)."""
    return (self._drafter is not None and self._num_speculative > 0
            and len(self._requests) <= self.config.speculative_max_batch)

  def _may_draft(self) -> bool:
    """Whether the next step may draft: the engine speculates (_speculating) and some request that
    may speculate is not paused by the acceptance back-off. Else steps overlap (Engine._overlaps)."""
    return self._speculating() and any(r.speculate and not r.pause for r in self._requests.values())

  def _propose(self, prev: InFlight | None) -> dict[str, list[int]] | None:
    """Drafts for the decoding requests that may speculate and are not paused (_count_pauses);
    None when this step backs off or nobody drafts. Planned ahead of `prev` (its tokens not on the
    host yet), nobody drafts: Engine._overlaps lets that happen only while every request that may
    draft is paused."""
    if self._drafter is None:
      if self._num_speculative:
        raise RuntimeError('EngineConfig.speculative=\'draft\' but no draft model is attached; call '
                           'engine.attach_drafter(draft_engine) before stepping.')
      return None
    if not self._speculating():
      self.spec_stats.backoffs += self._num_speculative > 0
      return None
    contexts = {}
    for request_id, tokens, remaining in self.scheduler.decoding() if prev is None else ():
      request = self._requests.get(request_id)
      if request is not None and request.speculate and remaining > 1 and not request.pause:
        contexts[request_id] = speculative.Context(tokens, request.params, request.seed, remaining)
        if len(contexts) == self._S:  # the step's verification slots
          break
    if not contexts:
      return None
    clock = time.perf_counter()
    drafts = self._drafter.propose(contexts, self.config.num_speculative_tokens)
    self.spec_stats.draft_s += time.perf_counter() - clock
    drafts = {rid: d for rid, d in drafts.items() if d}
    # A request that found no draft (prompt lookup: no match) keeps none, as a verification that
    # kept none would (_judge, in _count_pauses: after this step's pauses are counted): its step
    # gains nothing and is synchronous, where a paused request's steps overlap.
    self._undrafted = [self._requests[rid] for rid in contexts if rid not in drafts]
    self.spec_stats.undrafted += len(self._undrafted)
    return drafts or None

  def _verification_inputs(self, plan: StepPlan, drafts) -> tuple[jax.Array | None, jax.Array | None]:
    """A draft model's inputs to `plan`'s verification (DraftModel.feed): its logits q_RV, when some
    drafting request samples (greedy verification compares argmaxes), and its draft tokens drafts_R;
    (None, None) without a draft model or drafts."""
    if not drafts:
      return None, None
    self.spec_stats.steps += 1
    drafted = [s for s in plan.seqs if s.num_draft]  # verification slots, in plan order
    if not (self._has_q and drafted):
      return None, None
    rows = [(s.request_id, i * self._K1, s.num_draft) for i, s in enumerate(drafted)]
    return self._drafter.feed(rows, self._S * self._K1,
                              any(self._requests[s.request_id].params.temperature > 0 for s in drafted))

  def _settle_drafts(self) -> None:
    """The draft model applies its dispatched steps' tokens (DraftModel.settle), timed as drafting."""
    clock = time.perf_counter()
    self._drafter.settle()
    self.spec_stats.draft_s += time.perf_counter() - clock

  def _count_pauses(self, plan: StepPlan) -> None:
    """A dispatched step, while the engine speculates, counts one off the pause of each paused
    request it samples a token for (a step it could have drafted in); then the requests that found
    no draft for it (_propose) count as having kept none."""
    if self._K1 and self._speculating():
      for seq in plan.seqs:
        request = self._requests.get(seq.request_id)
        if seq.sample and request is not None and request.pause:
          request.pause -= 1
          self.spec_stats.paused += 1
    for request in self._undrafted:
      self._judge(request, 0)
    self._undrafted = []

  def _judge(self, request, accepted: int) -> None:
    """After a verification of `request` that kept `accepted` drafts (or a step it found none for:
    0): the moving average of what its drafting keeps, and a pause of EngineConfig.speculative_pause
    sampled tokens (_count_pauses) while that is below speculative_min_accepted (serve/speculative.py:
    the acceptance back-off)."""
    request.kept += speculative.KEPT_WEIGHT * (accepted - request.kept)
    if request.kept < self.config.speculative_min_accepted:
      request.pause = self.config.speculative_pause

  def attach_drafter(self, draft) -> None:
    """Drafts with `draft`, an Engine over a small model of the same vocabulary built with
    speculative.draft_engine_config(this engine's config); EngineConfig.speculative must be 'draft'."""
    if self.config.speculative != 'draft':
      raise ValueError(f'attach_drafter: this engine has speculative={self.config.speculative!r}; build it '
                       'with EngineConfig(speculative=\'draft\', num_speculative_tokens=k).')
    if draft.model_cfg.vocab_size != self.model_cfg.vocab_size:
      raise ValueError(f'the draft model has a vocabulary of {draft.model_cfg.vocab_size} tokens, the target '
                       f'{self.model_cfg.vocab_size}: a drafter must share the target\'s tokenizer (e.g. a '
                       'student distilled from it: stoker distill).')
    self._drafter = speculative.DraftModel(draft, self.config)

  def _launch_chain(self, plans: Sequence[StepPlan], buckets: Sequence[int]
                    ) -> tuple[list[InFlight], jax.Array, jax.Array]:
    """Dispatches plans (each planned after scheduler.advance of the one before, its decodes fed on
    device) as ONE device call (programs.chain), padded to `buckets`: an InFlight per plan (tokens_B
    None: DraftModel.settle fills them in from the tokens), their tokens [n, max_seqs] and their logits
    [n, max_seqs, V], on device. For an engine with no draft q, LoRA, grammar or experts: a draft
    model's."""
    if self._has_q or self.config.max_loras or self.expert_tokens_LE is not None or self._num_grammar:
      raise ValueError('_launch_chain: only for a plain engine (a draft model\'s).')
    clock = time.perf_counter()
    B, M, buffers, rows = self.config.max_seqs, self.config.max_pages_per_seq, [], None
    for plan, T in zip(plans, buckets):
      ints, floats, _, _ = step_lib.host_inputs(plan, T, min(B, T), M, self._S, self._K1, self._requests,
                                                self._slot_of, self._mask_words, rows)
      buffers += [ints, floats]
      rows = plan.sample_rows()
    if self._replicated is not None:
      buffers = jax.device_put(buffers, self._replicated)
    key = tuple(buckets)
    if key not in self._chains:
      start = time.perf_counter()
      jitted = programs.chain([self._step_fns[T] for T in key], B, self.pages, self._replicated)
      self._chains[key] = jitted.lower(self.params, self.pages, self._no_tokens, self._all_allowed,
                                       *buffers).compile()
      self.stats['compile_s'] += time.perf_counter() - start
    (tokens_nB, logits_nBV), self.pages = self._chains[key](self.params, self.pages, self._no_tokens,
                                                           self._all_allowed, *buffers)
    for plan, T in zip(plans, buckets):
      self._count(plan, T, False, clock)
      clock = time.perf_counter()
    inflight = [InFlight(plan, tuple(self._requests.get(s.request_id) for s in plan.seqs), None)
                for plan in plans]
    return inflight, tokens_nB, logits_nBV
