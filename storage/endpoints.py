"""Where gs:// and s3:// requests go, and with which credentials: one setting for every client.

The standard variables choose the endpoint: STORAGE_EMULATOR_HOST for gs:// (a local emulator or a
private deployment) and AWS_ENDPOINT_URL for s3://. gcsfs and botocore read them themselves; this
module maps them onto the clients that read other names (tensorstore, under Orbax: its gcs driver
reads TENSORSTORE_GCS_HTTP_URL, its s3 driver takes the endpoint in the spec) and teaches Orbax
0.12.8's TensorStore spec builder the s3:// scheme it lacks (it knows only gs:// and local paths,
and would write `s3://b/x` as a local directory `s3:/b/x`).
"""

from __future__ import annotations

import os
import socket
import urllib.parse

GCS_DEFAULT = 'https://storage.googleapis.com'

# gcsfs 2026.7 probes each bucket's layout over a gRPC control plane (zonal/HNS buckets, an
# experimental feature on by default); emulators have no such service, and the probe waits 60 s.
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')


def gcs_endpoint() -> str:
  host = os.environ.get('STORAGE_EMULATOR_HOST')
  if not host:
    return GCS_DEFAULT
  return host if '://' in host else f'http://{host}'


def s3_endpoint() -> str | None:
  return os.environ.get('AWS_ENDPOINT_URL_S3') or os.environ.get('AWS_ENDPOINT_URL')


def endpoint(scheme: str) -> str:
  """The URL requests for `scheme` ('gs' or 's3') go to."""
  if scheme == 'gs':
    return gcs_endpoint()
  return s3_endpoint() or 'https://s3.amazonaws.com'


def gcs_options() -> dict:
  """gcsfs arguments: anonymous against an emulator, else Google's default credentials, never a
  silent anonymous fallback (gcsfs's default would try anonymous access when credentials are missing)."""
  if os.environ.get('STORAGE_EMULATOR_HOST'):
    return {'token': 'anon', 'endpoint_url': gcs_endpoint()}
  return {'token': 'google_default'}


def s3_options() -> dict:
  return {'client_kwargs': {'endpoint_url': s3_endpoint()}} if s3_endpoint() else {}


def s3_region() -> str:
  return os.environ.get('AWS_REGION') or os.environ.get('AWS_DEFAULT_REGION') or 'us-east-1'


def reachable(scheme: str, timeout_s: float = 5.0) -> str | None:
  """None if a TCP connection to `scheme`'s endpoint opens within `timeout_s`, else why not."""
  url = urllib.parse.urlparse(endpoint(scheme))
  port = url.port or (443 if url.scheme == 'https' else 80)
  try:
    socket.create_connection((url.hostname, port), timeout=timeout_s).close()
  except OSError as e:
    return f'{type(e).__name__}: {e}'
  return None


def configure_tensorstore() -> None:
  """Points tensorstore (Orbax's array I/O) at the same endpoints; idempotent."""
  if os.environ.get('STORAGE_EMULATOR_HOST'):
    os.environ['TENSORSTORE_GCS_HTTP_URL'] = gcs_endpoint()
  _teach_orbax_s3()


def s3_kvstore(path: str) -> dict:
  """The tensorstore kvstore spec of `s3://bucket/key`."""
  bucket, _, key = path.removeprefix('s3://').partition('/')
  spec = {'driver': 's3', 'bucket': bucket, 'path': key, 'aws_region': s3_region()}
  if s3_endpoint():
    spec['endpoint'] = s3_endpoint()
  return spec


def _teach_orbax_s3() -> None:
  """Orbax 0.12.8 builds TensorStore specs for gs:// and local paths only: route s3:// to
  tensorstore's s3 driver where it would route gs:// to the gcs driver (tests/storage checks the
  round trip, so an Orbax upgrade that changes these functions fails there, not silently)."""
  from orbax.checkpoint._src.path import gcs_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as tsu
  if getattr(tsu, '_stoker_s3', False):
    return
  use_gcs_driver, normalize, for_gcs = tsu._use_gcs_driver, tsu._normalize_path, gcs_utils.get_kvstore_for_gcs
  tsu._use_gcs_driver = lambda d: d.startswith('s3://') or use_gcs_driver(d)
  tsu._normalize_path = lambda p: (
      's3://' + os.path.normpath(p.removeprefix('s3://')) if p.startswith('s3://') else normalize(p))
  gcs_utils.get_kvstore_for_gcs = lambda p: s3_kvstore(p) if str(p).startswith('s3://') else for_gcs(p)
  tsu._stoker_s3 = True
