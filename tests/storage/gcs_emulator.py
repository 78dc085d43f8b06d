"""Runs gcp-storage-emulator (PyPI) in memory on 127.0.0.1: `python gcs_emulator.py PORT`.

One gap of the emulator is filled, as real GCS behaves: media downloads carry the object's
generation in `x-goog-generation` (tensorstore, under Orbax, reads it to order its OCDBT manifest
writes, and refuses a response without one: "Malformed StorageGeneration").
"""

import sys

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
  except Exception:  # pylint: disable=broad-except  # a missing object: download() answers 404
    obj = None
  if obj is not None:
    response['x-goog-generation'] = str(obj['generation'])
    response['x-goog-metageneration'] = str(obj['metageneration'])
  _download(request, response, storage, *args, **kwargs)


objects.download = _download_with_generation  # objects.get(alt=media) calls it by this name
for _, methods in server.HANDLERS:
  for method, handler in methods.items():
    if handler is _download:
      methods[method] = _download_with_generation

if __name__ == '__main__':
  emulator = server.create_server('127.0.0.1', int(sys.argv[1]), in_memory=True)
  emulator.run()
