"""deploy/training.py and deploy/slices.py: the rendered JobSet parses, has the replica counts,
TPU resources and node selectors of the slice, and gives every pod the environment that
parallelism/distributed.py turns into the right jax.distributed process (checked by resolving the
downward-API fields as Kubernetes would, and, across slices, by running the pod's shell command)."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
import yaml

from deploy import slices, templates, training
from parallelism import distributed
from train.config import TrainConfig

GIN = 'configs/model/llama3_8b.gin'  # mesh.ici = (-1, 8, 1): fits any slice of a multiple of 8 chips


def _render(**overrides) -> list[dict]:
  job = training.TrainJob(**{'name': 'llama', 'image': 'registry.example/stoker:tpu',
                             'workdir': 'gs://bucket/runs/llama', 'gin_files': (GIN,), **overrides})
  text = templates.dump(training.render_train(job), training.train_summary(job))
  return list(yaml.safe_load_all(text))  # what kubectl reads


def _pod(jobset: dict) -> tuple[dict, dict]:
  (rjob,) = jobset['spec']['replicatedJobs']
  pod = rjob['template']['spec']['template']
  (container,) = pod['spec']['containers']
  return pod, container


def _env(container: dict, annotations: dict, labels: dict) -> dict[str, str]:
  """The container's environment as Kubernetes resolves it for a pod with this metadata."""
  meta = {'annotations': annotations, 'labels': labels}
  env = {}
  for e in container['env']:
    if 'value' in e:
      assert isinstance(e['value'], str), f'{e["name"]}: Kubernetes env values are strings'
      env[e['name']] = e['value']
    else:
      path = e['valueFrom']['fieldRef']['fieldPath']  # metadata.<annotations|labels>['key']
      kind, key = path.removeprefix('metadata.').split('[', 1)
      env[e['name']] = meta[kind][key.strip("']")]
  return env


def _pod_meta(job_index: int, pod_index: int) -> tuple[dict, dict]:
  return ({'batch.kubernetes.io/job-completion-index': str(pod_index)},
          {'jobset.sigs.k8s.io/job-index': str(job_index), 'jobset.sigs.k8s.io/restart-attempt': '0'})


@pytest.fixture(scope='module')
def v5e_256():
  return _render(tpu='v5e-256')


def test_v5e_256_is_one_slice_of_64_hosts_with_4_chips_each(v5e_256):
  (jobset,) = v5e_256
  assert (jobset['apiVersion'], jobset['kind']) == ('jobset.x-k8s.io/v1alpha2', 'JobSet')
  (rjob,) = jobset['spec']['replicatedJobs']
  assert rjob['replicas'] == 1
  job = rjob['template']['spec']
  assert job['parallelism'] == job['completions'] == 64 and job['completionMode'] == 'Indexed'
  pod, container = _pod(jobset)
  assert pod['spec']['nodeSelector'] == {'cloud.google.com/gke-tpu-accelerator': 'tpu-v5-lite-podslice',
                                         'cloud.google.com/gke-tpu-topology': '16x16'}
  assert container['resources']['limits'] == {'google.com/tpu': 4}
  assert container['command'] == ['stoker', 'train', '--gin_file', GIN, '--gin_param',
                                  'train.monitoring_port=9431', '--gin_param',
                                  "train.monitoring_host='0.0.0.0'", '--workdir', 'gs://bucket/runs/llama']
  assert pod['metadata']['annotations']['prometheus.io/port'] == '9431'
  assert {p['containerPort'] for p in container['ports']} == {8482, 9431}
  assert jobset['spec']['network']['enableDNSHostnames'] is True


def test_every_pod_joins_as_its_own_process(v5e_256):
  (jobset,) = v5e_256
  _, container = _pod(jobset)
  # JobSet names pod i of job j <jobset>-<replicated job>-<j>-<i>.<subdomain>: process 0 is j=0, i=0.
  net, (rjob,) = jobset['spec']['network'], jobset['spec']['replicatedJobs']
  host0 = f"{jobset['metadata']['name']}-{rjob['name']}-0-0.{net['subdomain']}"
  for i in (0, 1, 63):
    spec = distributed.from_env(_env(container, *_pod_meta(0, i)))
    assert spec == distributed.ProcessSpec('explicit', f'{host0}:8482', 64, i)


def test_multislice_process_ids_span_slices(tmp_path):
  # v5p-128: 64 chips = 16 hosts of 4 per slice; the mesh's DCN axis spans the 2 slices.
  (jobset,) = _render(tpu='v5p-128', slices=2, gin_params=('mesh.dcn=(-1, 1, 1)',))
  (rjob,) = jobset['spec']['replicatedJobs']
  assert rjob['replicas'] == 2 and rjob['template']['spec']['parallelism'] == 16
  pod, container = _pod(jobset)
  assert pod['spec']['nodeSelector']['cloud.google.com/gke-tpu-topology'] == '4x4x4'
  # Run the pod's command in a real shell, with a `stoker` that prints what it was given.
  fake = tmp_path / 'stoker'
  fake.write_text('#!/bin/sh\necho "$STOKER_PROCESS_ID"\nprintf "%s\\n" "$@"\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  for slice_id, index in ((0, 0), (1, 3), (1, 15)):
    env = _env(container, *_pod_meta(slice_id, index))
    env.update(PATH=f'{tmp_path}:{os.environ["PATH"]}', JOB_COMPLETION_INDEX=str(index))
    out = subprocess.run(container['command'], env=env, capture_output=True, text=True, check=True)
    pid, *argv = out.stdout.splitlines()
    assert int(pid) == slice_id * 16 + index
    assert argv == ['train', '--gin_file', GIN, '--gin_param', 'mesh.dcn=(-1, 1, 1)', '--gin_param',
                    'train.monitoring_port=9431', '--gin_param', "train.monitoring_host='0.0.0.0'",
                    '--workdir', 'gs://bucket/runs/llama']
    env[distributed.EXPLICIT[2]] = pid
    spec = distributed.from_env(env)
    assert (spec.num_processes, spec.process_id) == (32, slice_id * 16 + index)
    assert (env['MEGASCALE_NUM_SLICES'], env['MEGASCALE_SLICE_ID']) == ('2', str(slice_id))


@pytest.mark.skipif('monitoring_port' not in TrainConfig.__dataclass_fields__,
                    reason='train.monitoring_port is added with the training-loop wiring')
def test_the_rendered_train_command_loads():
  import configs  # pylint: disable=g-import-not-at-top
  (jobset,) = _render(tpu='v5e-8')
  _, container = _pod(jobset)
  argv = container['command']
  gin_files = [argv[i + 1] for i, a in enumerate(argv) if a == '--gin_file']
  gin_params = [argv[i + 1] for i, a in enumerate(argv) if a == '--gin_param']
  cfg = configs.load_train_config(gin_files, gin_params)
  assert (cfg.monitoring_port, cfg.monitoring_host) == (9431, '0.0.0.0')  # scraped from the pod's IP


def test_no_monitoring_port_no_exporter():
  (jobset,) = _render(tpu='v5e-16', monitoring_port=0)
  pod, container = _pod(jobset)
  assert 'annotations' not in pod['metadata']
  assert not any('monitoring_port' in a for a in container['command'])


def test_gke_prometheus_adds_a_pod_monitoring():
  jobset, monitor = _render(tpu='v6e-64', prometheus='gke')
  assert monitor['kind'] == 'PodMonitoring'
  assert monitor['spec']['selector']['matchLabels'] == _pod(jobset)[0]['metadata']['labels']
  assert monitor['spec']['endpoints'][0]['port'] == 9431


def test_mesh_that_does_not_fit_the_slice_is_refused():
  with pytest.raises(ValueError, match='mesh.ici'):
    _render(tpu='v5e-256', gin_params=('mesh.ici = (3, 8, 1)',))
  with pytest.raises(ValueError, match='mesh.dcn'):  # two slices need a DCN axis of 2
    _render(tpu='v5e-256', slices=2, gin_params=('mesh.dcn = (1, 1, 1)',))
  _render(tpu='v5e-256', slices=2, gin_params=('mesh.dcn = (-1, 1, 1)',))


def test_bad_names_and_slices_are_refused():
  with pytest.raises(ValueError, match='lower-case'):
    _render(name='Llama_8B')
  with pytest.raises(ValueError, match='at most'):
    _render(name='x' * 60)
  with pytest.raises(ValueError, match='gin_file'):
    training.TrainJob('a', 'i', 'gs://w', ())


@pytest.mark.parametrize('name, chips, hosts, per_host, topology', [
    ('v5e-256', 256, 64, 4, '16x16'), ('v5e-8', 8, 1, 8, '2x4'), ('v6e-64', 64, 16, 4, '8x8'),
    ('v5p-128', 64, 16, 4, '4x4x4'), ('v4-8', 4, 1, 4, '2x2x1'), ('v4-2048', 1024, 256, 4, '8x8x16')])
def test_slices(name, chips, hosts, per_host, topology):
  s = slices.parse_slice(name)
  assert (s.chips, s.hosts, s.chips_per_host, s.topology) == (chips, hosts, per_host, topology)


def test_bad_slices_name_the_fix():
  with pytest.raises(ValueError, match='v5e-256'):
    slices.parse_slice('tpu-v5e')
  with pytest.raises(ValueError, match='multiple of 2'):
    slices.parse_slice('v5p-7')
  with pytest.raises(ValueError, match='Topology .8x8. does not fit'):
    slices.parse_slice('v5e-256', topology='8x8')
  assert slices.parse_slice('v5e-256', topology='8x32').topology == '8x32'
