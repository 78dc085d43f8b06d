"""`stoker k8s train|serve`: flags -> TrainJob / ServeJob -> YAML on stdout (or --out).

cli.py adds these parsers with `add_parser(sub)` and calls `run(args)`; nothing heavy is imported
until a command runs.
"""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
  k8s = sub.add_parser('k8s', help='Print Kubernetes manifests for training or serving.')
  kinds = k8s.add_subparsers(dest='k8s_command', required=True)

  def common(p):
    p.add_argument('--name', required=True, help='Name of the JobSet / Deployment (DNS label).')
    p.add_argument('--image', required=True, help='The container image (see the Dockerfile).')
    p.add_argument('--gin_file', action='append', default=[], help='Repeatable.')
    p.add_argument('--namespace', default=None, help="Default: kubectl's current namespace.")
    p.add_argument('--grace_s', type=int, default=None,
                   help='Seconds between SIGTERM and SIGKILL (train 120, serve 60).')
    p.add_argument('--prometheus', default='annotations', choices=['annotations', 'gke'],
                   help='How Prometheus finds /metrics: prometheus.io/* pod annotations, or GKE '
                        'Managed Prometheus (a PodMonitoring, and its metric names in the HPA).')
    p.add_argument('--out', default=None, help='Write the YAML here instead of stdout.')

  train = kinds.add_parser('train', help='A multi-host TPU training JobSet.')
  common(train)
  train.add_argument('--workdir', required=True, help='gs://... or s3://...: shared by every host.')
  train.add_argument('--data', default=None,
                     help="The prepared data every host reads (gs://.../data): sets data.source.")
  train.add_argument('--gin_param', action='append', default=[], help='Repeatable.')
  train.add_argument('--tpu', default='v5e-256', help='TPU slice type (default v5e-256: 64 hosts).')
  train.add_argument('--slices', type=int, default=1, help='Slices joined over the DCN (default 1).')
  train.add_argument('--topology', default=None, help='Default: the usual one for the slice.')
  train.add_argument('--coordinator_port', type=int, default=8482)
  train.add_argument('--monitoring_port', type=int, default=9431,
                     help='Port of the training Prometheus exporter; 0: none.')
  train.add_argument('--max_restarts', type=int, default=3)
  train.add_argument('--no_check', action='store_true',
                     help="Skip loading the gin files to check the mesh against the slice.")

  serve = kinds.add_parser('serve', help='Deployment + Service + HorizontalPodAutoscaler.')
  common(serve)
  source = serve.add_mutually_exclusive_group(required=True)
  source.add_argument('--checkpoint', default=None, help='A training workdir (gs://...).')
  source.add_argument('--hf-dir', dest='hf_dir', default=None, help='A Hugging Face model directory.')
  serve.add_argument('--tpu', default=None, help='A single-host TPU slice per replica, e.g. v5e-8.')
  serve.add_argument('--gpu', default=None, help='GKE accelerator label, e.g. nvidia-h100-80gb.')
  serve.add_argument('--gpus', type=int, default=1, help='GPUs per replica (default 1).')
  serve.add_argument('--cpu', default=None, help='CPU request per replica, e.g. 8.')
  serve.add_argument('--memory', default=None, help='Memory per replica, e.g. 64Gi.')
  serve.add_argument('--min_replicas', type=int, default=1)
  serve.add_argument('--max_replicas', type=int, default=4)
  serve.add_argument('--metric', default='queue', choices=['queue', 'kv'],
                     help='Autoscale on waiting requests (queue) or KV pages in use (kv).')
  serve.add_argument('--target', type=float, default=4.0,
                     help='Per-replica average of the metric to hold (default 4 waiting requests).')
  serve.add_argument('--port', type=int, default=8000)
  key = serve.add_mutually_exclusive_group()
  key.add_argument('--api_key_secret', default='',
                   help='The Secret whose key "api-key" holds the API key (default: NAME-api-key); '
                        'the pods read it as $STOKER_API_KEY.')
  key.add_argument('--no_api_key', action='store_true',
                   help='Serve without an API key (anyone who reaches the Service may use it).')
  serve.add_argument('serve_args', nargs=argparse.REMAINDER,
                     help='-- then more `stoker serve` flags, passed through.')


def run(args) -> int:
  from deploy import serving, templates, training  # pylint: disable=g-import-not-at-top
  grace = {} if args.grace_s is None else {'grace_s': args.grace_s}
  if args.k8s_command == 'train':
    job = training.TrainJob(
        name=args.name, image=args.image, workdir=args.workdir, gin_files=args.gin_file,
        gin_params=args.gin_param + ([f"data.source='{args.data}'"] if args.data else []), tpu=args.tpu, slices=args.slices, topology=args.topology,
        namespace=args.namespace, coordinator_port=args.coordinator_port,
        monitoring_port=args.monitoring_port, max_restarts=args.max_restarts,
        prometheus=args.prometheus, **grace)
    text = templates.dump(training.render_train(job, check=not args.no_check),
                          training.train_summary(job))
  else:
    extra = args.serve_args[1:] if args.serve_args[:1] == ['--'] else args.serve_args
    job = serving.ServeJob(
        name=args.name, image=args.image, checkpoint=args.checkpoint, hf_dir=args.hf_dir,
        gin_files=args.gin_file, serve_args=extra, tpu=args.tpu, gpu=args.gpu, gpus=args.gpus,
        cpu=args.cpu, memory=args.memory, min_replicas=args.min_replicas,
        max_replicas=args.max_replicas, metric=args.metric, target=args.target, port=args.port,
        namespace=args.namespace, prometheus=args.prometheus,
        api_key_secret=None if args.no_api_key else args.api_key_secret, **grace)
    text = templates.dump(serving.render_serve(job), serving.serve_summary(job))
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text)
    print(f'Wrote {args.out}; apply it with: kubectl apply -f {args.out}', file=sys.stderr)
  else:
    sys.stdout.write(text)
  return 0
