"""The GRPO loop: sample with the in-process engine, score, step the policy, hand the engine the new
weights. Trainer and engine share each process and its devices; the weights never leave them.

One step s:
  1. sample  rl.group_size completions of each of the step's rl.prompts_per_step prompts with the
             engine (rl/rollout.py: deterministic prompts and per-request seeds), keeping the
             engine's log-probability of every sampled token;
  2. score   every completion with the gin-named rewards (rl/rewards.py: one that raises scores 0)
             and take group-relative advantages of their weighted sum (rl/grpo.py);
  3. train   rl.minibatches optimizer steps on the clipped objective, each on a slice of the
             groups, with the sampler's log-probabilities as the old policy (rl/step.py);
  4. update  engine.update_params(new params): each leaf is put where the engine's copy lives
             (read in place where the training mesh replicates it on the engine's device; one
             on-device copy where it is sharded; rl/processes.py) and the prefix cache, whose KV the
             old weights computed, is flushed.
Several processes (`stoker launch`, parallelism/distributed.py) run one job over the global mesh:
each samples its share of the step on its own engine and fills its rows of the global mini-batches;
rewards and timings are gathered, so every process computes, and process 0 logs, what one process
would have (rl/processes.py).
With LoRA (lora.base) the state trains adapters alone; the base is a frozen input of the step and
the KL reference (adapters off), and the engine gets the base with the adapters merged (one jitted
merge per step, on device). Merged and attached weights round differently (W + s a b against
x W + s (x a) b), one of the places where the importance ratio corrects a sampler/trainer gap.
Held-out greedy evaluation (rl.eval_every) runs on the engine after an update; the prefix cache is
flushed again before the next sampling, so every step samples from an empty cache (a resumed run
samples what the uninterrupted one did).

Checkpoints and failures are training's: train/checkpoint.py saves the TrainState (a workdir that
`stoker serve` reads) every checkpoint.every_steps steps and at the end, and a run on a workdir with
checkpoints resumes. The prompts are a function of the step, so no data-iterator state is saved.
Neither computation of the step donates the state, so the state before a step stays intact until
the step ends: train/recovery.py saves it just in time when the step fails or hangs, and the state
after a finished step on SIGTERM/SIGINT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from typing import Callable

import jax
import numpy as np
import tokenizers
from flax import nnx
from jax.experimental import multihost_utils

from models import checkpoint_io, lora
from parallelism import sharding
from parallelism.mesh import make_mesh
from parallelism.rules import DEFAULT_RULES
from rl import grpo, processes, rewards, rollout, tasks
from rl import step as step_lib
from rl.config import RLConfig
from serve.engine import Engine
from serve.sampling import SamplingParams
from train import emergency, faults, finetune
from train.checkpoint import Checkpoints
from train.metrics import MetricsWriter
from train.optimizer import make_optimizer
from train.recovery import Recovery
from train.step import TrainState


class Run:
  """What the loop holds between steps; `on_step` callbacks (tests, benchmarks) read it."""

  def __init__(self, cfg: RLConfig, workdir: str):
    self.cfg = cfg
    paths = task_paths(cfg, workdir)
    self.tokenizer = tokenizers.Tokenizer.from_file(paths['tokenizer'])
    self.stop_id = self.tokenizer.token_to_id(tasks.EOS)
    if self.stop_id is None:
      raise ValueError(f'{paths["tokenizer"]} has no {tasks.EOS!r} token to end completions with.')
    self.rows = rollout.read_rows(paths['train'])
    self.held_out = rollout.read_rows(paths['held_out'])[:cfg.eval_prompts or None]
    self.reward_fns = rewards.resolve(cfg.reward_fns)
    self.sampling = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                   top_k=cfg.top_k, top_p=cfg.top_p, stop_token_ids=(self.stop_id,))
    self.engine: Engine | None = None
    self.state: TrainState | None = None
    self.policy = lambda params: params  # the trained params -> the model's (LoRA: merged)
    self.frozen: dict = {}  # the step's frozen inputs: {'base'} (LoRA) or {'reference'} (beta > 0)
    self.share: processes.Share | None = None  # what this process samples each step
    self.engine_device: jax.Device | None = None

  def engine_params(self, mesh) -> nnx.State:
    """The policy of the current state, on this process's engine device."""
    return processes.engine_params(self.policy(self.state.params), self.engine_device, mesh)

  def step_rows(self, step: int) -> list[dict]:
    idx = rollout.prompt_indices(len(self.rows), step, self.cfg.prompts_per_step, self.cfg.seed)
    return [self.rows[i] for i in idx]

  def sample(self, engine: Engine, step: int) -> rollout.Samples:
    """This process's share of the step's samples (all of them in one process)."""
    rows = self.step_rows(step)
    return rollout.sample(engine, self.tokenizer, [rows[p] for p in self.share.prompts],
                          self.cfg.group_size, step=step, seed=self.cfg.seed,
                          params=self.sampling, indices=self.share.prompts)

  def evaluate(self) -> dict[str, float]:
    """Means of every reward over greedy completions of the held-out prompts (each process
    completes every process_count-th one; the means are taken over all of them)."""
    n, here = jax.process_count(), jax.process_index()
    mine = list(range(here, len(self.held_out), n))
    rows = [self.held_out[i] for i in mine]
    texts = rollout.greedy(self.engine, self.tokenizer, rows, self.cfg.max_tokens, self.stop_id)
    scores = rewards.score(self.reward_fns, rows, texts)
    names = list(scores)
    whole = processes.gather_rows(mine, np.stack([scores[k] for k in names], axis=1),
                                  capacity=-(-len(self.held_out) // n))
    return {f'eval_{name}': float(np.mean(whole[:, i])) for i, name in enumerate(names)}


def task_paths(cfg: RLConfig, workdir: str) -> dict[str, str]:
  """The prompt files and tokenizer: rl.task_dir's, or the addition task written into the workdir."""
  directory = cfg.task_dir or os.path.join(workdir, 'task')
  names = {'train': 'prompts-train.jsonl', 'held_out': 'prompts-held-out.jsonl',
           'tokenizer': 'tokenizer.json'}
  paths = {k: os.path.join(directory, v) for k, v in names.items()}
  if not cfg.task_dir and not all(map(os.path.exists, paths.values())) and jax.process_index() == 0:
    tasks.write_task(directory, seed=cfg.seed)
  if jax.process_count() > 1:  # the others read what process 0 wrote
    multihost_utils.sync_global_devices('rl task files')
  missing = [p for p in paths.values() if not os.path.exists(p)]
  if missing:
    raise FileNotFoundError(f'rl.task_dir={cfg.task_dir!r} lacks {missing}; write one with '
                            'rl/tasks.write_task, or leave rl.task_dir empty for the addition task.')
  return paths


def initial_params(cfg: RLConfig, mesh, rules=DEFAULT_RULES) -> nnx.State:
  """What the state trains at step 0, on `mesh`: rl.init's weights, or fresh ones (a new model
  from rl.seed, or new LoRA adapters over lora.base)."""
  shardings_for = lambda a: sharding.logical_shardings(a, mesh, rules)
  if not cfg.init:
    return sharding.init_sharded(lambda: step_lib.fresh_params(cfg), mesh, rules)[0]
  if not os.path.isdir(cfg.init):
    raise FileNotFoundError(f'rl.init={cfg.init!r}: no such directory; give a training workdir or a '
                            "Hugging Face model directory (or '' for a fresh model).")
  saved = checkpoint_io.read_config(cfg.init)
  ours = dataclasses.replace(saved, **{f: getattr(cfg.model, f) for f in finetune.EXECUTION_FIELDS})
  if ours != cfg.model:
    raise ValueError(f'rl.init={cfg.init!r} holds another model ({saved}) than rl.model '
                     f'({cfg.model}); bind model(...) to the saved architecture.')
  return checkpoint_io.load(cfg.init, shardings_for=shardings_for,
                            **{f: getattr(cfg.model, f) for f in finetune.EXECUTION_FIELDS})[1]


def train(cfg: RLConfig, workdir: str, config_text: str = '',
          on_step: Callable[[Run, int], None] | None = None, progress: bool = True) -> list[dict]:
  """Runs GRPO up to rl.steps, resuming from <workdir>/checkpoints; returns the records this call
  logged (also in <workdir>/metrics.jsonl). `on_step(run, step)` is called after each step's
  update (run.state, run.engine hold the new weights). Raises faults.TrainingInterrupted after a
  just-in-time save."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump(dataclasses.asdict(cfg), f, indent=2, default=str)
  run = Run(cfg, workdir)
  mesh = make_mesh(cfg.mesh, jax.devices()[:cfg.devices or None])
  run.share = processes.share(cfg, step_lib.batch_spec(cfg, mesh)['inputs_BT'].sharding)
  run.engine_device = processes.engine_device(mesh)
  tx = make_optimizer(cfg.optimizer, cfg.steps * cfg.minibatches)
  abstract = jax.eval_shape(lambda: step_lib.abstract_state(cfg, tx))
  shardings = sharding.logical_shardings(abstract, mesh)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                        shardings)
  ckpts = Checkpoints(workdir, cfg.checkpoint, cfg, config_text)
  try:
    start = ckpts.latest_step()
    resumed = emergency.restore_newer(workdir, start, target)  # (step, state, data state) or None
    params0 = initial_params(cfg, mesh) if (start is None and resumed is None) or cfg.beta else None
    frozen = {'reference': params0} if cfg.beta else {}
    if finetune.enabled(cfg):  # the base: frozen, the reference (adapters off), merged for the engine
      frozen = {'base': finetune.load_base(cfg.lora.base, cfg.model, mesh, DEFAULT_RULES)}
      merge = jax.jit(functools.partial(lora.merge, cfg.model, lora=cfg.lora))
      run.policy = lambda adapters: merge(frozen['base'], adapters)
    run.frozen = frozen
    if resumed is not None:
      start, run.state, _ = resumed
    elif start is None:
      start = 0
      run.state = jax.jit(lambda p: TrainState(jax.numpy.zeros((), jax.numpy.int32), p, tx.init(p)),
                          out_shardings=shardings)(params0)
    else:
      run.state, _ = ckpts.restore(start, target)
      logging.info('Resumed from the checkpoint of step %d in %s.', start, workdir)
    if start >= cfg.steps:
      return []
    step_fn = step_lib.compile_step(cfg, mesh, tx, shardings, frozen)
    run.engine = Engine(cfg.model, run.engine_params(mesh), cfg.engine)
    moved = processes.handover_bytes(run.policy(run.state.params), run.engine_device)
    logging.info('Each update hands the engine on %s its weights: %s.', run.engine_device,
                 ', '.join(f'{v / 2**20:.2f} MiB {k.replace("_", " ")}' for k, v in moved.items()))
    return _loop(cfg, run, start, step_fn, ckpts, workdir, mesh, on_step, progress, target)
  finally:
    ckpts.close()


def _loop(cfg, run, start, step_fn, ckpts, workdir, mesh, on_step, progress, target) -> list[dict]:
  logged = []
  recovery = Recovery(cfg.checkpoint, ckpts, workdir, restart=lambda: None, target=target,
                      data=None, initial_data=None, multi_process=jax.process_count() > 1)
  injector = faults.FaultInjector(cfg.fault, start)
  batch_sharding = {k: v.sharding for k, v in step_lib.batch_spec(cfg, mesh).items()}
  with MetricsWriter(workdir, resume_step=start, enabled=jax.process_index() == 0) as writer, \
       faults.SignalGuard() as guard, \
       faults.Watchdog(cfg.checkpoint.hang_timeout_s, recovery.on_hang) as watchdog:
    flush = False  # the engine ran something since its last update: empty its prefix cache
    if start == 0 and cfg.eval_every:
      record = run.evaluate()
      writer.write(0, record)
      logged.append({'step': 0, **record})
      flush = True
    for step in range(start, cfg.steps):
      recovery.mark(step, run.state, None)
      recovery.record_data({step: None, step + 1: None})  # no data state: the survivors' save is whole
      with _saved_without_peers(recovery, workdir), recovery.guard_step(step):
        if flush:
          run.engine.scheduler.allocator.flush()
        samples = run.sample(run.engine, step)
        clock = time.perf_counter()
        step_rows = run.step_rows(step)
        rows = [step_rows[p] for p in run.share.prompts for _ in range(cfg.group_size)]
        scores = rewards.score(run.reward_fns, rows, samples.texts)
        total = sum(w * scores[n] for w, n in zip(cfg.weights, cfg.reward_fns))
        adv = np.asarray(grpo.advantages(total.reshape(-1, cfg.group_size), cfg.scale_std)).ravel()
        local = step_lib.pack(cfg, samples.prompts, samples.completions, samples.logprobs, adv)
        batches = processes.minibatches(cfg, local, run.share, batch_sharding)
        score_s = time.perf_counter() - clock
        injector.during_step(step)
        clock = time.perf_counter()
        state, metrics = _train(step_fn, run.state, batches)
        train_s = time.perf_counter() - clock
      watchdog.beat()
      run.state = state
      clock = time.perf_counter()
      run.engine.update_params(run.engine_params(mesh))
      update_s = time.perf_counter() - clock
      flush = False
      scores, tokens = _gather_scores(cfg, run.share, scores, samples.completions)
      total = sum(w * scores[n] for w, n in zip(cfg.weights, cfg.reward_fns))
      sample_s, score_s = processes.gather_max([samples.seconds, score_s])
      record = {**{f'reward_{n}_{stat}': float(f(scores[n])) for n in cfg.reward_fns
                   for stat, f in (('mean', np.mean), ('std', np.std))},
                'reward_mean': float(np.mean(total)), **metrics,
                'sample_s': sample_s, 'score_s': score_s, 'train_s': train_s,
                'update_s': update_s, 'sampled_tokens': tokens,
                'sample_tokens_per_s': tokens / sample_s}
      if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
        with watchdog.paused():
          record.update(run.evaluate())
        flush = True
      record['time'] = time.time()
      writer.write(step + 1, record)
      logged.append({'step': step + 1, **record})
      if progress and jax.process_index() == 0:
        print(f"step {step + 1:>5}  reward {record['reward_mean']:.3f}  "
              + ''.join(f"{k} {v:.3f}  " for k, v in record.items() if k.startswith('eval_'))
              + f"kl {record['kl']:.4f}  clip {record['clip_fraction']:.3f}  "
              f"sample {sample_s:.2f}s train {train_s:.2f}s", flush=True)
      if on_step is not None:  # what it runs on the engine stays in the prefix cache
        on_step(run, step + 1)
      recovery.mark(step + 1, run.state, None)
      every = cfg.checkpoint.every_steps
      if every and (step + 1) % every == 0 and step + 1 < cfg.steps:
        with watchdog.paused():
          ckpts.save(step + 1, run.state, None)
      if guard.received is not None and step + 1 < cfg.steps:
        with watchdog.paused():
          recovery.preempt(guard.received)
    with watchdog.paused():
      ckpts.save(cfg.steps, run.state, None, wait=True)
  return logged


@contextlib.contextmanager
def _saved_without_peers(recovery: Recovery, workdir: str):
  """Around guard_step in a multi-process job: a step that failed because a peer died (gloo ends the
  collective with an error) cannot save through Orbax, whose saves synchronise every process, so
  this process writes its own shards of the state before the step with no collective
  (train/emergency.py), which the restart resumes from (as the watchdog does for a stalled one)."""
  try:
    yield
  except faults.TrainingInterrupted:
    raise  # the just-in-time save succeeded
  except Exception:  # pylint: disable=broad-except
    if recovery.data_states is None:  # one process: guard_step's save is the save
      raise
    step, state, _ = recovery.consistent
    emergency.save(workdir, step, state)
    raise


def _gather_scores(cfg, share, scores: dict, completions: list) -> tuple[dict, int]:
  """Every process's rewards as the step's ({name: [P G] float32} in row order) and the step's
  sampled tokens: what one process sampling all of it would hold."""
  columns = [scores[n].astype(np.float64) for n in cfg.reward_fns] + [list(map(len, completions))]
  whole = processes.gather_rows(share.rows, np.stack(columns, axis=1).astype(np.float64),
                                capacity=len(share.rows))
  return ({n: whole[:, i].astype(np.float32) for i, n in enumerate(cfg.reward_fns)},
          int(whole[:, -1].sum()))


def _train(step_fn, state, batches: list[dict]) -> tuple[TrainState, dict]:
  """One optimizer step on each mini-batch (global arrays, whole groups each); the metrics
  averaged, but 'sampler_gap' from the first (where trainer and sampler hold the same weights)."""
  records = []
  for part in batches:
    grads, metrics = step_fn.grad(state, part, step_fn.frozen)
    state, update_metrics = step_fn.update(state, grads)
    records.append({**metrics, **update_metrics})
  records = jax.device_get(records)
  out = {k: float(np.mean([r[k] for r in records])) for k in records[0]}
  out['sampler_gap'] = float(records[0]['sampler_gap'])
  out['skipped_steps'] = float(records[-1]['skipped_steps'])
  del out['nonfinite_streak']
  return state, out
