"""`stoker k8s train|serve` (deploy/command.py through cli.main): flags reach the manifests, the
output is YAML kubectl can read, and bad values end with exit code 2 and a message."""

from __future__ import annotations

import yaml

import cli


def test_k8s_train_writes_the_jobset(tmp_path, capsys):
  out = tmp_path / 'train.yaml'
  code = cli.main(['k8s', 'train', '--name', 'llama', '--image', 'img:1', '--tpu', 'v5e-256',
                   '--gin_file', 'configs/model/llama3_8b.gin', '--workdir', 'gs://b/llama',
                   '--namespace', 'ml', '--monitoring_port', '0', '--out', str(out)])
  assert code == 0 and 'kubectl apply -f' in capsys.readouterr().err
  text = out.read_text()
  assert text.startswith('# llama: 1 x v5e-256 (16x16): 64 processes x 4 chips = 256 chips.\n'
                         '# Estimated $307.20 per hour')  # 256 chips x $1.20
  (jobset,) = yaml.safe_load_all(text)
  assert jobset['metadata']['namespace'] == 'ml'
  assert jobset['spec']['replicatedJobs'][0]['template']['spec']['parallelism'] == 64


def test_k8s_serve_prints_three_documents(capsys):
  code = cli.main(['k8s', 'serve', '--name', 'chat', '--image', 'img:1', '--checkpoint', 'gs://b/llama',
                   '--tpu', 'v5e-4', '--max_replicas', '3', '--api_key_secret', 'chat-key', '--',
                   '--served-model-name', 'llama'])
  assert code == 0
  out = capsys.readouterr().out
  docs = list(yaml.safe_load_all(out))
  assert [d['kind'] for d in docs] == ['Deployment', 'Service', 'HorizontalPodAutoscaler']
  (container,) = docs[0]['spec']['template']['spec']['containers']
  assert container['command'][-2:] == ['--served-model-name', 'llama']
  assert container['env'] == [{'name': 'STOKER_API_KEY', 'valueFrom': {
      'secretKeyRef': {'name': 'chat-key', 'key': 'api-key'}}}]
  assert 'kubectl create secret generic chat-key --from-literal=api-key=' in out
  assert docs[2]['spec']['maxReplicas'] == 3


def test_k8s_serve_refuses_a_key_in_plain_text(capsys):
  for flags in (['--', '--api-key', 'sk-123'], ['--', '--api_key=sk-123']):
    code = cli.main(['k8s', 'serve', '--name', 'chat', '--image', 'img:1', '--checkpoint', 'gs://b/x',
                     *flags])
    err = capsys.readouterr()
    assert code == 2 and 'sk-123' not in err.out
    assert 'plain text' in err.err and 'kubectl create secret generic chat-api-key' in err.err
  assert cli.main(['k8s', 'serve', '--name', 'chat', '--image', 'img:1', '--checkpoint', 'gs://b/x',
                   '--no_api_key']) == 0
  (container,) = next(yaml.safe_load_all(capsys.readouterr().out))['spec']['template']['spec'][
      'containers']
  assert 'env' not in container


def test_bad_values_exit_2_with_the_reason(capsys):
  code = cli.main(['k8s', 'train', '--name', 'x', '--image', 'i', '--tpu', 'v9-8', '--no_check',
                   '--gin_file', 'configs/model/llama3_8b.gin', '--workdir', 'gs://b/x'])
  assert code == 2
  assert "stoker k8s: error: TPU slice 'v9-8' not understood" in capsys.readouterr().err


def test_stoker_serve_reads_the_key_the_manifest_passes_from_the_environment(capsys, monkeypatch):
  assert cli.main(['k8s', 'serve', '--name', 'chat', '--image', 'i', '--checkpoint', 'gs://b/x']) == 0
  (container,) = next(yaml.safe_load_all(capsys.readouterr().out))['spec']['template']['spec'][
      'containers']
  (env,) = container['env']
  monkeypatch.setenv(env['name'], 'sk-from-secret')
  assert cli.parser('serve').parse_args(['serve', '--checkpoint', 'x']).api_key == 'sk-from-secret'


def test_k8s_train_takes_bucket_paths_for_data_and_workdir(capsys):
  code = cli.main(['k8s', 'train', '--name', 'llama', '--image', 'img:1', '--tpu', 'v5e-256', '--gin_file',
                   'configs/model/llama3_8b.gin', '--workdir', 's3://runs-bucket/llama', '--data',
                   'gs://data-bucket/web', '--monitoring_port', '0'])
  assert code == 0
  (jobset,) = yaml.safe_load_all(capsys.readouterr().out)
  (container,) = jobset['spec']['replicatedJobs'][0]['template']['spec']['template']['spec']['containers']
  command = container['command']
  assert command[command.index('--workdir') + 1] == 's3://runs-bucket/llama'
  assert "data.source='gs://data-bucket/web'" in command
  code = cli.main(['k8s', 'train', '--name', 'llama', '--image', 'img:1', '--gin_file',
                   'configs/model/llama3_8b.gin', '--workdir', 'gcs://runs-bucket/llama'])
  assert code == 2 and 'unsupported storage URL' in capsys.readouterr().err
