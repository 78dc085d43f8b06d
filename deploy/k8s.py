"""What the Kubernetes manifests of training (deploy/training.py) and serving (deploy/serving.py)
share: names, labels, and how Prometheus finds the pods' /metrics.
"""

from __future__ import annotations

import re

from deploy import templates

PROMETHEUS = ('annotations', 'gke')  # how metrics are scraped: pod annotations, or GKE PodMonitoring
_DNS_LABEL = re.compile(r'[a-z0-9]([-a-z0-9]*[a-z0-9])?')


def check_name(name: str, longest_suffix: str = '') -> None:
  if not _DNS_LABEL.fullmatch(name) or len(name + longest_suffix) > 63:
    raise ValueError(f'name {name!r}: use lower-case letters, digits and "-", starting and ending '
                     f'with a letter or digit, at most {63 - len(longest_suffix)} characters '
                     f'(Kubernetes names the pods {name}{longest_suffix or ""}).')


def check_prometheus(prometheus: str) -> None:
  if prometheus not in PROMETHEUS:
    raise ValueError(f'prometheus={prometheus!r}: choose one of {PROMETHEUS}.')


def labels(name: str, component: str) -> dict[str, str]:
  return {'app.kubernetes.io/name': 'stoker', 'app.kubernetes.io/instance': name,
          'app.kubernetes.io/component': component}


def scrape_annotations(port: int) -> dict[str, str] | None:
  if not port:
    return None
  return {'prometheus.io/scrape': 'true', 'prometheus.io/port': str(port),
          'prometheus.io/path': '/metrics'}


def pod_monitoring(name: str, namespace: str, pod_labels: dict, port: int) -> list[dict]:
  """A GKE PodMonitoring that scrapes /metrics on `port` of the pods with `pod_labels`."""
  return templates.render('pod-monitoring.yaml', {
      'name': name, 'namespace': namespace, 'labels': pod_labels, 'metrics_port': port})


