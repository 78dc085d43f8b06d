"""storage: the one path layer under everything (DESIGN.md layering, layer 0).

Every file Stoker reads or writes goes through it, so each takes a local path, `gs://bucket/path`
or `s3://bucket/path` (storage/paths.py; endpoints and credentials: storage/endpoints.py).

Library: fsspec with gcsfs and s3fs. Orbax already reaches buckets through etils.epath, whose gs://
and s3:// backend is fsspec, so one client stack (credentials, retries, endpoint variables) serves
Stoker's own files and Orbax's metadata alike; gcsfs honours STORAGE_EMULATOR_HOST and botocore
AWS_ENDPOINT_URL with no code of ours; fsspec file objects give pyarrow ranged reads of Parquet
row groups. pyarrow.fs would be a second stack beside Orbax's (and reads neither variable);
etils.epath alone hides the error types and ranged reads we need.
"""

from storage.endpoints import configure_tensorstore
from storage.paths import (SCHEMES, StorageError, absolute, basename, check, dirname, exists, filesystem,
                           get_file, glob, is_bucket, isdir, isfile, join, listdir, local_copy, local_mirror,
                           makedirs, open, put_file, read_bytes, read_text, remove, rmtree, size, split,
                           with_retries, write_bytes, write_text)

__all__ = ['SCHEMES', 'StorageError', 'absolute', 'basename', 'check', 'configure_tensorstore', 'dirname',
           'exists', 'filesystem', 'get_file', 'glob', 'is_bucket', 'isdir', 'isfile', 'join', 'listdir',
           'local_copy', 'local_mirror', 'makedirs', 'open', 'put_file', 'read_bytes', 'read_text', 'remove',
           'rmtree', 'size', 'split', 'with_retries', 'write_bytes', 'write_text']
