"""The path functions: each takes a local path, `gs://bucket/key` or `s3://bucket/key`.

Local paths go to `os` as before. Bucket paths go to fsspec (gcsfs, s3fs) with the endpoints of
storage/endpoints.py. Buckets have no directories and no rename, so:
  * `makedirs` is a no-op on a bucket, `isdir` means "some object lies under this prefix";
  * `open(path, 'w'/'wb')` writes a local temporary file and uploads it in one request when the
    `with` block ends without an exception: an object is there in full or not at all (a failed
    block uploads nothing). Local writes go to a temporary file renamed over the target, so both
    are atomic, and a file written last (a manifest, a commit marker) marks a complete set;
  * reads (`open(path, 'rb')`) fetch exactly the byte ranges asked for (pyarrow reads a Parquet
    footer, then one row group's column chunks), never the whole object first.
Errors a user can fix (unreachable endpoint, missing bucket, missing credentials, permission
denied) become StorageError, a ValueError the `stoker` command turns into exit code 2, naming the
path and the fix. An unknown scheme (`gcs://`, `s3a://`, `gs:/` with one slash) is refused
instead of becoming a local directory named after it.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import glob as glob_lib
import logging
import os
import random
import re
import shutil
import tempfile
import time
from typing import Callable, Iterator, TypeVar

from storage import endpoints

SCHEMES = ('gs', 's3')
_URL = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*):/')  # any `scheme:/`, to refuse the ones we lack
T = TypeVar('T')
_UMASK = os.umask(0o022)  # read once, at import (umask can only be read by setting it)
os.umask(_UMASK)


class StorageError(ValueError):
  """A storage failure the user can fix; the message names the path and the fix."""


def is_bucket(path) -> bool:
  """Whether `path` is a gs:// or s3:// URL (a refused scheme raises StorageError)."""
  path = os.fspath(path)
  match = _URL.match(path)
  if not match:
    return False
  scheme = match.group(1)
  if scheme in SCHEMES and path.startswith(f'{scheme}://') and len(path) > len(scheme) + 3:
    return True
  if len(scheme) == 1:  # a Windows drive letter, C:/...
    return False
  raise StorageError(f'{path!r}: unsupported storage URL; use a local path, gs://BUCKET/PATH or '
                     's3://BUCKET/PATH.')


def split(path: str) -> tuple[str, str, str]:
  """(scheme, bucket, key) of a bucket URL."""
  scheme, rest = path.split('://', 1)
  bucket, _, key = rest.partition('/')
  return scheme, bucket, key.strip('/')


def absolute(path) -> str:
  """A bucket URL as given (without a trailing slash); a local path made absolute."""
  path = os.fspath(path)
  if is_bucket(path):
    return path.rstrip('/')
  return os.path.abspath(os.path.expanduser(path))


def join(path, *parts: str) -> str:
  path = os.fspath(path)
  if is_bucket(path):
    return '/'.join([path.rstrip('/'), *(p.strip('/') for p in parts if p)])
  return os.path.join(path, *parts)


def basename(path) -> str:
  path = os.fspath(path)
  return path.rstrip('/').rsplit('/', 1)[-1] if is_bucket(path) else os.path.basename(path)


def dirname(path) -> str:
  path = os.fspath(path)
  return path.rstrip('/').rsplit('/', 1)[0] if is_bucket(path) else os.path.dirname(path)


def filesystem(path: str):
  """(fsspec filesystem, path within it) of a bucket URL."""
  import fsspec  # pylint: disable=import-outside-toplevel
  scheme = path.split('://', 1)[0]
  options = endpoints.gcs_options() if scheme == 'gs' else endpoints.s3_options()
  return fsspec.filesystem(scheme, **options), path.split('://', 1)[1]


def _fix(scheme: str, bucket: str, problem: str) -> str:
  where = endpoints.endpoint(scheme)
  if problem == 'unreachable':
    var = 'STORAGE_EMULATOR_HOST' if scheme == 'gs' else 'AWS_ENDPOINT_URL'
    return (f'cannot reach the storage endpoint {where}: check the network, or {var} if it points '
            'at an emulator or a private endpoint.')
  if problem == 'bucket':
    make = 'gcloud storage buckets create' if scheme == 'gs' else 'aws s3 mb'
    return (f'the bucket {scheme}://{bucket} does not exist at {where}; create it ({make} {scheme}://{bucket}) '
            'or fix the path.')
  if problem == 'credentials':
    how = ('run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS'
           if scheme == 'gs' else 'set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE')
    return f'no credentials for {scheme}://: {how}.'
  return (f'permission denied by {where}: grant this identity read and write access to '
          f'{scheme}://{bucket} (e.g. roles/storage.objectAdmin, or s3:GetObject/PutObject/ListBucket).')


def _problem(e: BaseException) -> str | None:
  """What a client exception means for the user: 'unreachable', 'credentials', 'permission', or None."""
  names = {c.__name__ for c in type(e).__mro__}
  text = str(e)
  if names & {'NoCredentialsError', 'PartialCredentialsError', 'DefaultCredentialsError',
              'TransportError', 'RefreshError'} or ' 401' in text or 'Unauthorized' in text:
    return 'credentials'
  if (names & {'EndpointConnectionError', 'ClientConnectorError', 'ConnectionError',
               'ServerDisconnectedError', 'ConnectTimeoutError', 'ClientOSError'}
      or isinstance(e, ConnectionError)):
    return 'unreachable'
  if (isinstance(e, PermissionError) or text.startswith('Forbidden') or 'AccessDenied' in text
      or ' 403' in text or getattr(e, 'errno', None) == errno.EACCES):
    return 'permission'
  return None


@contextlib.contextmanager
def _errors(path: str) -> Iterator[None]:
  """Turns a bucket client's failure the user can fix into a StorageError naming `path`."""
  try:
    yield
  except StorageError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    scheme, bucket, _ = split(path)
    problem = _problem(e)
    if problem is None and isinstance(e, FileNotFoundError) and not _bucket_exists(path):
      problem = 'bucket'
    if problem is None:
      raise
    raise StorageError(f'{path}: {_fix(scheme, bucket, problem)} ({type(e).__name__}: '
                       f'{str(e).splitlines()[0] if str(e) else ""})') from e


def _bucket_exists(path: str) -> bool:
  """False only if the bucket provably does not exist (one metadata request)."""
  fs, _ = filesystem(path)
  try:
    fs.info(split(path)[1])
  except FileNotFoundError:
    return False
  except Exception:  # pylint: disable=broad-except  # e.g. no storage.buckets.get: not provably missing
    return True
  return True


def check(path, *, write: bool = False) -> None:
  """Fails fast, before any output, if `path`'s bucket cannot be used: endpoint unreachable, bucket
  missing, credentials missing or access denied (by listing `path`'s prefix, and with `write` by writing
  and deleting a probe object under it). A local path passes; so does a prefix with nothing under it yet.
  Raises StorageError."""
  path = os.fspath(path)
  if not is_bucket(path):
    return
  scheme, bucket, key = split(path)
  with _errors(path):
    fs, _ = filesystem(path)  # gcsfs resolves Google credentials here
  if (why := endpoints.reachable(scheme)) is not None:
    raise StorageError(f'{path}: {_fix(scheme, bucket, "unreachable")} ({why})')
  prefix = f'{bucket}/{key}' if key else bucket
  with _errors(path):
    try:
      fs.ls(prefix, detail=False, refresh=True)
    except FileNotFoundError:
      if not _bucket_exists(path):
        raise
    if write:
      probe = f'{prefix}/.stoker-write-probe-{os.getpid()}'
      fs.pipe_file(probe, b'')
      fs.rm_file(probe)


def exists(path) -> bool:
  path = os.fspath(path)
  if not is_bucket(path):
    return os.path.exists(path)
  fs, p = filesystem(path)
  with _errors(path):
    return fs.exists(p)


def isfile(path) -> bool:
  path = os.fspath(path)
  if not is_bucket(path):
    return os.path.isfile(path)
  fs, p = filesystem(path)
  with _errors(path):
    return fs.isfile(p)


def isdir(path) -> bool:
  path = os.fspath(path)
  if not is_bucket(path):
    return os.path.isdir(path)
  fs, p = filesystem(path)
  with _errors(path):
    fs.invalidate_cache(p)
    return fs.isdir(p)


def listdir(path) -> list[str]:
  """Names directly under `path` (files and "directories"), sorted."""
  path = os.fspath(path)
  if not is_bucket(path):
    return sorted(os.listdir(path))
  fs, p = filesystem(path)
  with _errors(path):
    fs.invalidate_cache(p)
    return sorted(basename(e) for e in fs.ls(p, detail=False) if e.rstrip('/') != p.rstrip('/'))


def glob(pattern) -> list[str]:
  """Paths matching `pattern` (`**` recursive), sorted; bucket matches keep their scheme."""
  pattern = os.fspath(pattern)
  if not is_bucket(pattern):
    return sorted(glob_lib.glob(pattern, recursive=True))
  fs, p = filesystem(pattern)
  scheme = pattern.split('://', 1)[0]
  with _errors(pattern):
    fs.invalidate_cache()
    return sorted(f'{scheme}://{m}' for m in fs.glob(p))


def size(path) -> int:
  path = os.fspath(path)
  if not is_bucket(path):
    return os.path.getsize(path)
  fs, p = filesystem(path)
  with _errors(path):
    return int(fs.size(p))


def makedirs(path) -> None:
  """Creates a local directory and its parents; nothing to do on a bucket."""
  path = os.fspath(path)
  if not is_bucket(path):
    os.makedirs(path, exist_ok=True)


def remove(path) -> None:
  path = os.fspath(path)
  if not is_bucket(path):
    os.remove(path)
    return
  fs, p = filesystem(path)
  with _errors(path):
    fs.rm_file(p)


def rmtree(path) -> None:
  """Deletes `path` and everything under it, if present."""
  path = os.fspath(path)
  if not is_bucket(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  fs, p = filesystem(path)
  with _errors(path):
    if fs.exists(p):
      fs.rm(p, recursive=True)


def open(path, mode: str = 'r', encoding: str | None = None,  # pylint: disable=redefined-builtin
         newline: str | None = None):
  """A file object for `path` (a context manager). Writes are atomic (module docstring); reads of
  a bucket object fetch the ranges read. `newline` as for builtins.open (text modes; '' for csv)."""
  path = os.fspath(path)
  if 'w' in mode:
    return _atomic_write(path, mode, encoding, newline)
  if 'a' in mode or '+' in mode:
    raise ValueError(f'storage.open: mode {mode!r} is not supported (buckets have no append); '
                     'write the whole file.')
  if 'b' not in mode and encoding is None:
    encoding = 'utf-8'
  if not is_bucket(path):
    return builtins.open(path, mode, encoding=encoding, newline=newline)
  fs, p = filesystem(path)
  text = {} if 'b' in mode else {'encoding': encoding, 'newline': newline}
  with _errors(path):
    # cache_type 'none': each read is one ranged GET of exactly the bytes asked for.
    return fs.open(p, mode, cache_type='none', **text)


@contextlib.contextmanager
def _atomic_write(path: str, mode: str, encoding: str | None, newline: str | None = None):
  bucket = is_bucket(path)
  directory = tempfile.gettempdir() if bucket else (os.path.dirname(os.path.abspath(path)))
  if not bucket:
    os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{basename(path)}.', suffix='.tmp')
  try:
    text = {} if 'b' in mode else {'encoding': encoding or 'utf-8', 'newline': newline}
    with os.fdopen(fd, mode, **text) as f:
      yield f
    if bucket:
      put_file(tmp, path)
    else:
      os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would create it (mkstemp makes it private)
      os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def read_text(path) -> str:
  with open(path, 'r') as f:
    return f.read()


def read_bytes(path) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def write_text(path, text: str) -> None:
  with open(path, 'w') as f:
    f.write(text)


def write_bytes(path, data: bytes) -> None:
  with open(path, 'wb') as f:
    f.write(data)


def put_file(local: str, path) -> None:
  """Uploads (or copies) the local file `local` to `path` as one object."""
  path = os.fspath(path)
  if not is_bucket(path):
    if os.path.abspath(local) != os.path.abspath(path):
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      shutil.copyfile(local, path)
    return
  fs, p = filesystem(path)
  with _errors(path):
    fs.put_file(local, p)


def get_file(path, local: str) -> str:
  """Downloads (or copies) `path` to the local file `local`; returns `local`."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
  if not is_bucket(path):
    shutil.copyfile(path, local)
    return local
  fs, p = filesystem(path)
  with _errors(path):
    fs.get_file(p, local)
  return local


def local_copy(path, cache: str | None = None) -> str:
  """A local path with `path`'s contents: `path` itself when local, else a download of the object
  (or of everything under the prefix) into a cache directory mirroring the URL."""
  path = os.fspath(path)
  if not is_bucket(path):
    return path
  local = local_mirror(path, cache)
  if isfile(path):
    return get_file(path, local)
  fs, p = filesystem(path)
  with _errors(path):
    for key in fs.find(p):
      get_file(f'{split(path)[0]}://{key}', os.path.join(local, os.path.relpath(key, p)))
  return local


def local_mirror(path, cache: str | None = None) -> str:
  """A local path standing for the bucket URL `path` (`path` itself when local), for files a
  library can only write locally (TensorBoard events, logs), uploaded from there."""
  path = os.fspath(path)
  if not is_bucket(path):
    return path
  scheme, bucket, key = split(path)
  root = cache or os.environ.get('STOKER_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'stoker', 'buckets')
  return os.path.join(root, scheme, bucket, *key.split('/'))


def with_retries(fn: Callable[[], T], what: str, *, attempts: int = 5, first_wait_s: float = 0.1,
                 max_wait_s: float = 5.0) -> T:
  """`fn()`, retried with jittered exponential backoff on transient errors (dropped connections,
  timeouts, 5xx surfaced as OSError); errors the user must fix and missing files are not retried."""
  for attempt in range(attempts):
    try:
      return fn()
    except (FileNotFoundError, PermissionError, StorageError, IsADirectoryError, NotADirectoryError):
      raise
    except (OSError, TimeoutError) as e:
      if attempt + 1 == attempts or _problem(e) in ('credentials', 'permission'):
        raise
      wait = min(max_wait_s, first_wait_s * 2**attempt) * (0.5 + random.random() / 2)
      logging.warning('%s failed (%s: %s); retrying in %.2f s.', what, type(e).__name__, e, wait)
      time.sleep(wait)
  raise AssertionError('unreachable')
