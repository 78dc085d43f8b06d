"""train/metrics.py in a bucket workdir: metrics.jsonl and TensorBoard events uploaded whole; a failed periodic
upload (the server refuses, through a proxy) is logged and the run goes on; the upload at close has every record."""

from __future__ import annotations

import json

import pytest

from tests.storage import servers
from tests.storage.conftest import new_bucket, use_server
from train import metrics


@pytest.mark.parametrize('scheme', ['gs', 's3'])
def test_uploads_survive_a_refused_request(scheme, endpoints, monkeypatch, tmp_path, caplog):
  bucket = new_bucket(scheme, endpoints[scheme])
  name = bucket.split('://')[1]
  monkeypatch.setenv('STOKER_CACHE', str(tmp_path / 'cache'))
  monkeypatch.setattr(metrics, 'UPLOAD_EVERY_S', 0.0)  # upload at every record
  records = [{'step': s, 'loss': 10.0 / s} for s in (1, 2, 3)]
  with servers.Proxy(endpoints[scheme]) as proxy:
    use_server(monkeypatch, scheme, proxy.url)
    writer = metrics.MetricsWriter(f'{bucket}/run')
    writer.write(1, {'loss': records[0]['loss']})
    proxy.deny = True
    writer.write(2, {'loss': records[1]['loss']})  # refused: logged, not raised
    assert 'Uploading the metrics' in caplog.text
    proxy.deny = False
    writer.write(3, {'loss': records[2]['loss']})
    writer.close()
  objects = servers.list_objects(scheme, endpoints[scheme], name)
  lines = servers.get_object(scheme, endpoints[scheme], name, 'run/metrics.jsonl').decode().splitlines()
  assert [json.loads(line) for line in lines] == records
  assert any(k.startswith('run/tensorboard/events.out.tfevents.') for k in objects)
