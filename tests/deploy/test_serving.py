"""deploy/serving.py: Deployment, Service and HorizontalPodAutoscaler parse and fit together, and the
autoscaler's metric is one the server really exports (serve/metrics.py, read through
prometheus_client's text parser)."""

from __future__ import annotations

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from deploy import serving, templates
from serve.metrics import Metrics


def _render(**overrides) -> dict[str, dict]:
  job = serving.ServeJob(**{'name': 'chat', 'image': 'registry.example/stoker:tpu',
                            'checkpoint': 'gs://bucket/runs/llama', **overrides})
  docs = list(yaml.safe_load_all(templates.dump(serving.render_serve(job), serving.serve_summary(job))))
  kinds = [d['kind'] for d in docs]
  assert len(set(kinds)) == len(kinds)
  return {d['kind']: d for d in docs}


def _families(snapshot: dict) -> dict:
  text = Metrics(snapshot=lambda: snapshot).exposition().decode()
  return {f.name: f for f in text_string_to_metric_families(text)}


def test_deployment_service_and_autoscaler_fit_together():
  docs = _render(tpu='v5e-8', min_replicas=2, max_replicas=6, target=3)
  dep, svc, hpa = docs['Deployment'], docs['Service'], docs['HorizontalPodAutoscaler']
  pod = dep['spec']['template']
  (container,) = pod['spec']['containers']
  assert dep['spec']['replicas'] == 2
  assert dep['spec']['selector']['matchLabels'].items() <= pod['metadata']['labels'].items()
  assert svc['spec']['selector'].items() <= pod['metadata']['labels'].items()
  (port,) = container['ports']
  assert svc['spec']['ports'][0]['targetPort'] == port['name']
  assert container['readinessProbe']['httpGet'] == {'path': '/ready', 'port': port['name']}
  assert container['livenessProbe']['httpGet'] == {'path': '/health', 'port': port['name']}
  assert container['startupProbe']['httpGet'] == {'path': '/health', 'port': port['name']}
  argv = container['command']
  assert argv[:4] == ['stoker', 'serve', '--checkpoint', 'gs://bucket/runs/llama']
  assert argv[argv.index('--host') + 1] == '0.0.0.0'  # the server binds 127.0.0.1 unless told
  assert int(argv[argv.index('--port') + 1]) == port['containerPort'] == 8000
  assert pod['metadata']['annotations']['prometheus.io/port'] == '8000'
  assert pod['spec']['nodeSelector'] == {'cloud.google.com/gke-tpu-accelerator': 'tpu-v5-lite-podslice',
                                         'cloud.google.com/gke-tpu-topology': '2x4'}
  assert container['resources']['limits'] == {'google.com/tpu': 8}
  assert hpa['spec']['scaleTargetRef'] == {'apiVersion': 'apps/v1', 'kind': 'Deployment',
                                           'name': dep['metadata']['name']}
  assert (hpa['spec']['minReplicas'], hpa['spec']['maxReplicas']) == (2, 6)
  (metric,) = hpa['spec']['metrics']
  assert metric['type'] == 'Pods'
  assert metric['pods']['target'] == {'type': 'AverageValue', 'averageValue': '3'}


def test_queue_autoscaling_reads_a_gauge_the_server_exports():
  metric = _render()['HorizontalPodAutoscaler']['spec']['metrics'][0]['pods']['metric']
  families = _families({'waiting': 7, 'running': 2})
  family = families[metric['name']]
  assert family.type == 'gauge' and 'selector' not in metric
  assert [s.value for s in family.samples] == [7]  # the snapshot's waiting requests


def test_kv_autoscaling_reads_used_pages_the_server_exports():
  metric = _render(metric='kv', target=800)['HorizontalPodAutoscaler']['spec']['metrics'][0]['pods']
  family = _families({'pages_used': 900, 'pages_free': 100, 'pages_total': 1000})[metric['metric']['name']]
  assert family.type == 'gauge'
  wanted = metric['metric']['selector']['matchLabels']
  (sample,) = [s for s in family.samples if wanted.items() <= s.labels.items()]
  assert sample.value == 900
  assert metric['target']['averageValue'] == '800'


def test_gke_managed_prometheus_names_and_pod_monitoring():
  docs = _render(gpu='nvidia-h100-80gb', gpus=2, metric='kv', target=0.5, prometheus='gke')
  metric = docs['HorizontalPodAutoscaler']['spec']['metrics'][0]['pods']
  assert metric['metric'] == {'name': 'prometheus.googleapis.com|stoker_kv_pages|gauge',
                              'selector': {'matchLabels': {'metric.labels.state': 'used'}}}
  assert metric['target']['averageValue'] == '500m'
  assert _families({})['stoker_kv_pages'].type == 'gauge'
  pod = docs['Deployment']['spec']['template']
  assert pod['spec']['nodeSelector'] == {'cloud.google.com/gke-accelerator': 'nvidia-h100-80gb'}
  assert pod['spec']['containers'][0]['resources']['limits'] == {'nvidia.com/gpu': 2}
  assert docs['PodMonitoring']['spec']['selector']['matchLabels'] == pod['metadata']['labels']


def test_cpu_replicas_and_passthrough_flags():
  docs = _render(hf_dir='/models/qwen', checkpoint=None, cpu='4', memory='16Gi',
                 gin_files=('serve/tiny.gin',), serve_args=('--served-model-name', 'k'))
  pod = docs['Deployment']['spec']['template']
  (container,) = pod['spec']['containers']
  assert 'nodeSelector' not in pod['spec'] and 'tolerations' not in pod['spec']
  assert container['resources'] == {'requests': {'cpu': '4', 'memory': '16Gi'},
                                    'limits': {'memory': '16Gi'}}
  assert container['command'] == ['stoker', 'serve', '--hf-dir', '/models/qwen', '--gin_file',
                                   'serve/tiny.gin', '--host', '0.0.0.0', '--port', '8000',
                                   '--served-model-name', 'k']


def test_bad_serving_jobs_are_refused():
  with pytest.raises(ValueError, match='single-host'):
    _render(tpu='v5e-16')
  with pytest.raises(ValueError, match='exactly one of checkpoint'):
    _render(hf_dir='/models/x')
  with pytest.raises(ValueError, match='min_replicas'):
    _render(min_replicas=5, max_replicas=2)
  with pytest.raises(ValueError, match='metric'):
    _render(metric='latency')
  with pytest.raises(ValueError, match='one accelerator'):
    _render(tpu='v5e-8', gpu='nvidia-l4')


def test_the_api_key_comes_from_a_secret_never_the_manifest():
  job = serving.ServeJob(name='chat', image='img', checkpoint='gs://b/x', namespace='ml')
  text = templates.dump(serving.render_serve(job), serving.serve_summary(job))
  (container,) = {d['kind']: d for d in yaml.safe_load_all(text)}['Deployment']['spec']['template'][
      'spec']['containers']
  (env,) = container['env']
  # The variable `stoker serve` reads when no --api-key is given (cli.py), from the Secret.
  assert env == {'name': 'STOKER_API_KEY',
                 'valueFrom': {'secretKeyRef': {'name': 'chat-api-key', 'key': 'api-key'}}}
  assert not any(arg.startswith('--api') for arg in container['command'])
  assert 'kubectl create secret generic chat-api-key --from-literal=api-key="$KEY" -n ml' in text
  for flag in ('--api-key', '--api_key', '--api-key=sk-live'):
    with pytest.raises(ValueError, match='plain text') as e:
      serving.ServeJob(name='chat', image='img', checkpoint='gs://b/x', serve_args=(flag, 'sk-live'))
    assert 'sk-live' not in str(e.value) and 'kubectl create secret' in str(e.value)
  assert 'env' not in _render(api_key_secret=None)['Deployment']['spec']['template']['spec'][
      'containers'][0]
  with pytest.raises(ValueError, match='Secret name'):
    _render(api_key_secret='Not_A_Name')

