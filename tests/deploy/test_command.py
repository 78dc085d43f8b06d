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
                   '--tpu', 'v5e-4', '--max_replicas', '3', '--', '--api-key', 'secret'])
  assert code == 0
  docs = list(yaml.safe_load_all(capsys.readouterr().out))
  assert [d['kind'] for d in docs] == ['Deployment', 'Service', 'HorizontalPodAutoscaler']
  assert docs[0]['spec']['template']['spec']['containers'][0]['command'][-2:] == ['--api-key', 'secret']
  assert docs[2]['spec']['maxReplicas'] == 3


def test_bad_values_exit_2_with_the_reason(capsys):
  code = cli.main(['k8s', 'train', '--name', 'x', '--image', 'i', '--tpu', 'v9-8', '--no_check',
                   '--gin_file', 'configs/model/llama3_8b.gin', '--workdir', 'gs://b/x'])
  assert code == 2
  assert "stoker k8s: error: TPU slice 'v9-8' not understood" in capsys.readouterr().err
