"""Serving on Kubernetes: a Deployment of `stoker serve`, its Service, and a HorizontalPodAutoscaler
on a metric every replica exports (serve/metrics.py), rendered from configs/k8s/serve.yaml.

Each replica is one single-host server: a TPU host (`tpu='v5e-8'`), GPUs (`gpu='nvidia-l4'`,
`gpus=1`), or CPU only. The autoscaler keeps the per-replica average of the metric near `target`:
  queue: stoker_queue_length, requests waiting for a slot (e.g. target 4);
  kv:    stoker_kv_pages{state="used"}, KV-cache pages in use (target in pages, e.g. 80% of the pool).

The API key comes from a Kubernetes Secret (default <name>-api-key, key `api-key`) through the
STOKER_API_KEY environment variable, which `stoker serve` reads when no --api-key flag is given, so
the manifests hold no key: create the Secret first (the summary prints the command). A key in the
pass-through flags is refused. `api_key_secret=None` serves without a key (anyone who reaches
the Service may use it). Probes: startup and liveness on /health (503 while loading, and once the
engine failed: the server then exits 1 and is restarted), readiness on /ready (503 while loading,
draining or failed).
"""

from __future__ import annotations

import dataclasses
import re

from deploy import k8s, slices, templates

# metric choice -> (exported name, label selector): both checked against serve/metrics.py by tests.
METRICS = {
    'queue': ('stoker_queue_length', None),
    'kv': ('stoker_kv_pages', {'state': 'used'}),
}
PORT = 8000
SECRET_KEY = 'api-key'  # the key within the Secret that holds the API key
API_KEY_ENV = 'STOKER_API_KEY'  # read by `stoker serve` (cli.py) when --api-key is not given
GKE_GPU_LABEL = 'cloud.google.com/gke-accelerator'


def hpa_metric(metric: str, prometheus: str) -> dict:
  """The HPA's MetricIdentifier for `metric`, as the custom metrics API serves it: prometheus-adapter
  keeps a gauge's name and labels; Google Cloud Managed Service for Prometheus (its Stackdriver
  adapter) names it prometheus.googleapis.com|<name>|gauge with labels under metric.labels."""
  name, selector = METRICS[metric]
  if prometheus == 'gke':
    name = f'prometheus.googleapis.com|{name}|gauge'
    selector = selector and {f'metric.labels.{k}': v for k, v in selector.items()}
  return {'name': name, 'selector': {'matchLabels': selector}} if selector else {'name': name}


def _quantity(x: float) -> str:
  """A Kubernetes quantity: 4 -> '4', 0.5 -> '500m'."""
  return str(int(x)) if float(x).is_integer() else f'{round(x * 1000)}m'


@dataclasses.dataclass(frozen=True)
class ServeJob:
  """Replicas of one model behind one Service, scaled between min and max replicas."""

  name: str
  image: str
  checkpoint: str | None = None  # a training workdir/checkpoint (gs://...), or:
  hf_dir: str | None = None  # a Hugging Face model directory
  gin_files: tuple[str, ...] = ()
  serve_args: tuple[str, ...] = ()  # more `stoker serve` flags, passed through
  tpu: str | None = None  # a single-host slice, e.g. 'v5e-8'
  gpu: str | None = None  # a GKE accelerator label value, e.g. 'nvidia-h100-80gb'
  gpus: int = 1
  cpu: str | None = None  # CPU request, e.g. '8'
  memory: str | None = None  # memory request and limit, e.g. '64Gi'
  min_replicas: int = 1
  max_replicas: int = 4
  metric: str = 'queue'
  target: float = 4.0
  port: int = PORT
  namespace: str | None = None
  grace_s: int = 60  # SIGTERM: finish or abort running requests within this time
  prometheus: str = 'annotations'
  api_key_secret: str | None = ''  # the Secret holding the API key; '': <name>-api-key; None: no key

  def __post_init__(self):
    for name in ('gin_files', 'serve_args'):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if (self.checkpoint is None) == (self.hf_dir is None):
      raise ValueError('Serving needs exactly one of checkpoint (a training workdir) and hf_dir (a '
                       f'Hugging Face model directory); got checkpoint={self.checkpoint!r}, '
                       f'hf_dir={self.hf_dir!r}.')
    if self.tpu and self.gpu:
      raise ValueError(f'Pick one accelerator per replica: tpu={self.tpu!r} or gpu={self.gpu!r}.')
    if not 1 <= self.min_replicas <= self.max_replicas or self.gpus < 1:
      raise ValueError(f'Need 1 <= min_replicas <= max_replicas and gpus >= 1; got min_replicas='
                       f'{self.min_replicas}, max_replicas={self.max_replicas}, gpus={self.gpus}.')
    if self.metric not in METRICS:
      raise ValueError(f'metric={self.metric!r}: choose one of {sorted(METRICS)}.')
    if not self.target > 0:
      raise ValueError(f'target must be > 0 (the per-replica average of {self.metric}); got '
                       f'{self.target}.')
    if not 0 < self.port < 65536:
      raise ValueError(f'port must be in 1..65535, got {self.port}.')
    k8s.check_prometheus(self.prometheus)
    for arg in self.serve_args:
      if arg.split('=')[0] in ('--api-key', '--api_key'):
        raise ValueError(
            f'serve_args holds {arg.split("=")[0]}: the key would be in plain text in the pod spec. '
            f'Put it in a Secret instead: kubectl create secret generic {self.secret or "NAME"} '
            f'--from-literal={SECRET_KEY}=KEY (the pods read it from there; --api_key_secret names '
            'another Secret).')
    if self.api_key_secret and not re.fullmatch(r'[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?',
                                                self.api_key_secret):
      raise ValueError(f'api_key_secret={self.api_key_secret!r} is not a Secret name: use lower-case '
                       'letters, digits, "-" and ".", starting and ending with a letter or digit.')

  @property
  def secret(self) -> str | None:
    """The Secret holding the API key, or None for a server without one."""
    if self.api_key_secret is None:
      return None
    return self.api_key_secret or f'{self.name}-api-key'

  def env(self) -> list[dict] | None:
    if self.secret is None:
      return None
    return [{'name': API_KEY_ENV,
             'valueFrom': {'secretKeyRef': {'name': self.secret, 'key': SECRET_KEY}}}]

  def serve_argv(self) -> list[str]:
    argv = ['stoker', 'serve']
    argv += ['--checkpoint', self.checkpoint] if self.checkpoint else ['--hf-dir', self.hf_dir]
    for f in self.gin_files:
      argv += ['--gin_file', f]
    # The server binds 127.0.0.1 unless told otherwise; in a pod it must answer the Service.
    return argv + ['--host', '0.0.0.0', '--port', str(self.port), *self.serve_args]


def _placement(job: ServeJob) -> tuple[dict | None, list | None, dict]:
  """(nodeSelector, tolerations, resources) for one replica."""
  resources: dict = {}
  if job.cpu:
    resources.setdefault('requests', {})['cpu'] = job.cpu
  if job.memory:
    resources.setdefault('requests', {})['memory'] = job.memory
    resources.setdefault('limits', {})['memory'] = job.memory
  if job.tpu:
    s = slices.parse_slice(job.tpu)
    if s.hosts != 1:
      raise ValueError(f'TPU slice {s.name} spans {s.hosts} hosts; a serving replica is one host: '
                       'pick a single-host slice such as v5e-8, v6e-8 or v5p-8.')
    resources.setdefault('limits', {})['google.com/tpu'] = s.chips
    return ({'cloud.google.com/gke-tpu-accelerator': s.accelerator,
             'cloud.google.com/gke-tpu-topology': s.topology},
            [{'key': 'google.com/tpu', 'operator': 'Exists', 'effect': 'NoSchedule'}], resources)
  if job.gpu:
    resources.setdefault('limits', {})['nvidia.com/gpu'] = job.gpus
    return ({GKE_GPU_LABEL: job.gpu},
            [{'key': 'nvidia.com/gpu', 'operator': 'Exists', 'effect': 'NoSchedule'}], resources)
  return None, None, resources or None


def render_serve(job: ServeJob) -> list[dict]:
  """Deployment, Service and HorizontalPodAutoscaler (and, with prometheus='gke', a PodMonitoring)."""
  # Pods are named <deployment>-<10-character hash>-<5 characters>.
  k8s.check_name(job.name, '-0123456789-abcde')
  labels = k8s.labels(job.name, 'serve')
  node_selector, tolerations, resources = _placement(job)
  docs = templates.render('serve.yaml', {
      'name': job.name, 'namespace': job.namespace, 'labels': labels, 'image': job.image,
      'command': job.serve_argv(), 'env': job.env(), 'port': job.port, 'grace_s': job.grace_s,
      'pod_annotations': k8s.scrape_annotations(job.port), 'node_selector': node_selector,
      'tolerations': tolerations, 'resources': resources, 'min_replicas': job.min_replicas,
      'max_replicas': job.max_replicas, 'hpa_metric': hpa_metric(job.metric, job.prometheus),
      'target': _quantity(job.target)})
  if job.prometheus == 'gke':
    docs += k8s.pod_monitoring(job.name, job.namespace, labels, job.port)
  return docs


def serve_summary(job: ServeJob) -> str:
  """Comment lines for the rendered YAML: the scaling rule and the estimated price per hour."""
  from train import monitoring  # pylint: disable=g-import-not-at-top
  name, selector = METRICS[job.metric]
  shown = name + ('{%s}' % ','.join(f'{k}="{v}"' for k, v in selector.items()) if selector else '')
  rule = (f'{job.name}: {job.min_replicas} to {job.max_replicas} replicas of `stoker serve`, scaled '
          f'to hold the per-replica average of {shown} near {job.target:g}.')
  if job.secret is None:
    rule += '\nNo API key: anyone who reaches the Service may use it.'
  else:
    rule += (f'\nThe API key comes from the Secret {job.secret!r}; create it first:\n'
             f'  kubectl create secret generic {job.secret} --from-literal={SECRET_KEY}="$KEY"'
             + (f' -n {job.namespace}' if job.namespace else ''))
  if job.tpu:
    s = slices.parse_slice(job.tpu)
    kind, devices = s.device_kind, s.chips
  elif job.gpu:
    kind, devices = job.gpu, job.gpus
  else:
    return rule
  try:
    hourly = monitoring.estimate_cost(kind, devices, 3600)
  except ValueError:
    return rule + f'\nNo price known for {kind}: see parallelism/devices.py DEVICES.'
  return (rule + f'\nEstimated ${hourly:,.2f} per replica-hour ({devices} x {kind}): '
          f'${hourly * job.min_replicas:,.2f} to ${hourly * job.max_replicas:,.2f} per hour '
          f'({monitoring.PRICE_SOURCE}).')
