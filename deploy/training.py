"""Multi-host TPU training on Kubernetes: a JobSet rendered from configs/k8s/train-jobset.yaml.

One JobSet whose replicated Job 'slice' has one pod per TPU host (per slice: `slices` replicas).
Each pod runs `stoker train` as one process of a jax.distributed job; parallelism/distributed.py
reads STOKER_COORDINATOR (process 0's stable DNS name), STOKER_NUM_PROCESSES and STOKER_PROCESS_ID
(the pod's Job completion index; across slices slice * hosts + index, computed in the pod's shell).
"""

from __future__ import annotations

import dataclasses
import math

import storage
from deploy import k8s, slices, templates
from parallelism import mesh

# What parallelism/distributed.py reads (tests/deploy/test_training.py feeds the rendered pods'
# environment to it).
COORDINATOR, NUM_PROCESSES, PROCESS_ID = ('STOKER_COORDINATOR', 'STOKER_NUM_PROCESSES',
                                          'STOKER_PROCESS_ID')
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
JOB_INDEX = "metadata.labels['jobset.sigs.k8s.io/job-index']"
RESTART_ATTEMPT = "metadata.labels['jobset.sigs.k8s.io/restart-attempt']"
JOB = 'slice'  # the JobSet's one replicated Job
COORDINATOR_PORT = 8482  # the port JAX's own Cloud TPU start-up uses
MONITORING_PORT = 9431  # train/monitoring.py's exporter


@dataclasses.dataclass(frozen=True)
class TrainJob:
  """One training run on `slices` TPU slices of type `tpu`, from gin files and a workdir."""

  name: str
  image: str
  workdir: str  # gs://... : every host reads and writes the same checkpoints
  gin_files: tuple[str, ...]
  gin_params: tuple[str, ...] = ()
  tpu: str = 'v5e-256'
  slices: int = 1
  topology: str | None = None  # default: the usual one for the slice's chip count
  namespace: str | None = None  # None: kubectl's current namespace
  coordinator_port: int = COORDINATOR_PORT
  monitoring_port: int = MONITORING_PORT  # 0: no Prometheus exporter
  max_restarts: int = 3  # JobSet restarts of all processes after a failure
  grace_s: int = 120  # SIGTERM (preemption) -> just-in-time checkpoint within this time
  prometheus: str = 'annotations'

  def __post_init__(self):
    object.__setattr__(self, 'gin_files', tuple(self.gin_files))
    object.__setattr__(self, 'gin_params', tuple(self.gin_params))
    if not self.gin_files:
      raise ValueError('A training job needs at least one --gin_file (e.g. configs/model/llama3_8b.gin).')
    if not self.workdir or not self.image:
      raise ValueError(f'A training job needs an image and a workdir; got image={self.image!r}, '
                       f'workdir={self.workdir!r}.')
    storage.is_bucket(self.workdir)  # a URL of a scheme Stoker cannot write (gcs://, s3a://) is refused here
    if self.slices < 1 or self.max_restarts < 0 or self.grace_s < 0:
      raise ValueError(f'Need slices >= 1, max_restarts >= 0 and grace_s >= 0; got {self}.')
    if not 0 < self.coordinator_port < 65536 or not 0 <= self.monitoring_port < 65536:
      raise ValueError(f'Ports must be in 1..65535 (monitoring_port 0: off); got coordinator_port='
                       f'{self.coordinator_port}, monitoring_port={self.monitoring_port}.')
    k8s.check_prometheus(self.prometheus)

  @property
  def slice(self) -> slices.Slice:
    return slices.parse_slice(self.tpu, self.topology)

  @property
  def num_processes(self) -> int:
    return self.slice.hosts * self.slices

  @property
  def coordinator(self) -> str:
    return f'{self.name}-{JOB}-0-0.{self.name}:{self.coordinator_port}'

  def train_argv(self) -> list[str]:
    argv = ['stoker', 'train']
    for f in self.gin_files:
      argv += ['--gin_file', f]
    params = list(self.gin_params)
    if self.monitoring_port:
      # Prometheus scrapes the pod's IP: the exporter listens on every interface, not 127.0.0.1.
      params += [f'train.monitoring_port={self.monitoring_port}', "train.monitoring_host='0.0.0.0'"]
    for p in params:
      argv += ['--gin_param', p]
    return argv + ['--workdir', self.workdir]


def check_mesh(job: TrainJob) -> None:
  """Raises unless the gin config's mesh (parallelism/mesh.py rules) fits the job's devices."""
  import configs  # pylint: disable=g-import-not-at-top  (imports JAX: only when rendering)
  cfg = configs.load_train_config(job.gin_files, job.gin_params).mesh
  s, devices = job.slice, job.slice.chips * job.slices
  where = f'{", ".join(job.gin_files)} on {job.slices} x {s.name} ({devices} chips)'
  dcn = mesh.fill(cfg.dcn, job.slices if -1 in cfg.dcn else math.prod(cfg.dcn), f'{where}: mesh.dcn')
  groups = math.prod(dcn)
  if job.slices > 1 and groups != job.slices:
    raise ValueError(f'{where}: mesh.dcn={cfg.dcn} makes {groups} groups, but the job has '
                     f'{job.slices} slices joined by the data-centre network; set mesh.dcn to '
                     f'multiply to {job.slices}, e.g. (-1, 1, 1).')
  if job.slices == 1 and groups not in (1, s.hosts):
    raise ValueError(f'{where}: mesh.dcn={cfg.dcn} makes {groups} groups; within one slice it may '
                     f'only split by host ({s.hosts}) or not at all (1).')
  mesh.fill(cfg.ici, devices // groups, f'{where}: mesh.ici')


def render_train(job: TrainJob, check: bool = True) -> list[dict]:
  """The JobSet (and, with prometheus='gke', its PodMonitoring). `check` loads the gin files and
  checks their mesh against the slice first."""
  s = job.slice
  k8s.check_name(job.name, f'-{JOB}-{job.slices - 1}-{s.hosts - 1}')
  if check:
    check_mesh(job)
  labels = k8s.labels(job.name, 'train')
  env = [{'name': COORDINATOR, 'value': job.coordinator},
         {'name': NUM_PROCESSES, 'value': str(job.num_processes)},
         {'name': 'STOKER_RESTART_ATTEMPT', 'valueFrom': {'fieldRef': {'fieldPath': RESTART_ATTEMPT}}}]
  argv = job.train_argv()
  if job.slices == 1:
    env.append({'name': PROCESS_ID, 'valueFrom': {'fieldRef': {'fieldPath': COMPLETION_INDEX}}})
  else:
    # Multi-slice: the process id spans slices, and libtpu joins the slices over the DCN
    # (MEGASCALE_*). JOB_COMPLETION_INDEX is set by Kubernetes in every indexed Job's pods.
    megascale = f'{job.name}-{JOB}-0-0.{job.name}'
    env += [{'name': 'STOKER_SLICE_ID', 'valueFrom': {'fieldRef': {'fieldPath': JOB_INDEX}}},
            {'name': 'MEGASCALE_COORDINATOR_ADDRESS', 'value': megascale},
            {'name': 'MEGASCALE_NUM_SLICES', 'value': str(job.slices)},
            {'name': 'MEGASCALE_SLICE_ID', 'valueFrom': {'fieldRef': {'fieldPath': JOB_INDEX}}}]
    argv = ['/bin/sh', '-c', f'export {PROCESS_ID}=$((STOKER_SLICE_ID * {s.hosts} + '
            f'JOB_COMPLETION_INDEX)) && exec "$@"', 'sh'] + argv
  ports = [{'name': 'coordinator', 'containerPort': job.coordinator_port}]
  if job.monitoring_port:
    ports.append({'name': 'metrics', 'containerPort': job.monitoring_port})
  docs = templates.render('train-jobset.yaml', {
      'name': job.name, 'namespace': job.namespace, 'labels': labels, 'job': JOB,
      'slices': job.slices, 'hosts': s.hosts, 'chips_per_host': s.chips_per_host,
      'accelerator': s.accelerator, 'topology': s.topology, 'image': job.image, 'command': argv,
      'env': env, 'ports': ports, 'max_restarts': job.max_restarts, 'grace_s': job.grace_s,
      'pod_annotations': k8s.scrape_annotations(job.monitoring_port)})
  if job.prometheus == 'gke' and job.monitoring_port:
    docs += k8s.pod_monitoring(job.name, job.namespace, labels, job.monitoring_port)
  return docs


def train_summary(job: TrainJob) -> str:
  """Comment lines for the rendered YAML: the shape of the job and its estimated price."""
  from train import monitoring  # pylint: disable=g-import-not-at-top
  s = job.slice
  chips = s.chips * job.slices
  hourly = monitoring.estimate_cost(s.device_kind, chips, 3600)
  return (f'{job.name}: {job.slices} x {s.name} ({s.topology}): {job.num_processes} processes '
          f'x {s.chips_per_host} chips = {chips} chips.\n'
          f'Estimated ${hourly:,.2f} per hour at ${monitoring.device_price(s.device_kind):.2f} per '
          f'chip-hour ({monitoring.PRICE_SOURCE}).')
