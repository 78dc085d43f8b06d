"""Deployment: Kubernetes manifests rendered from the configs/k8s/ templates (`stoker k8s ...`).

Layering: beside the `stoker` command, above train/ and serve/ (DESIGN.md layer 4, between configs
and cli): it loads the gin training config (configs) to check that a job's mesh fits its TPU slice,
and prices jobs with train/monitoring.py. The metric the serving autoscaler reads is named here and
checked against serve/metrics.py by the tests. No library below imports it.
"""
