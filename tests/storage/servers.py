"""Real storage servers for the storage tests, on 127.0.0.1: gcp-storage-emulator (GCS JSON API) and
moto's S3 server, each in its own process, and `Proxy`, a small HTTP proxy in front of either that adds
latency to every request, refuses every request with 403, and counts the bytes it returns."""

from __future__ import annotations

import http.client
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
S3_CREDENTIALS = {'AWS_ACCESS_KEY_ID': 'testing', 'AWS_SECRET_ACCESS_KEY': 'testing',
                  'AWS_DEFAULT_REGION': 'us-east-1'}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(kind: str, log_path: str) -> tuple[subprocess.Popen, str]:
  """(process, endpoint URL) of a 'gcs' or 's3' server, once it answers."""
  port = free_port()
  command = ([sys.executable, os.path.join(HERE, 'gcs_emulator.py'), str(port)] if kind == 'gcs' else
             [sys.executable, '-m', 'moto.server', '-H', '127.0.0.1', '-p', str(port)])
  log = open(log_path, 'w')  # pylint: disable=consider-using-with
  process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
  url = f'http://127.0.0.1:{port}'
  deadline = time.time() + 60
  while time.time() < deadline:
    try:
      urllib.request.urlopen(url + '/', timeout=1).close()
      return process, url
    except OSError:
      if process.poll() is not None:
        break
      time.sleep(0.1)
  process.kill()
  raise RuntimeError(f'the {kind} server did not start: {open(log_path).read()[-2000:]}')


def make_bucket(scheme: str, endpoint: str, bucket: str) -> None:
  """Creates `bucket` on the server (the JSON API for gs, CreateBucket for s3)."""
  if scheme == 'gs':
    request = urllib.request.Request(f'{endpoint}/storage/v1/b?project=test', method='POST',
                                     data=f'{{"name": "{bucket}"}}'.encode(),
                                     headers={'Content-Type': 'application/json'})
  else:  # moto accepts an unsigned CreateBucket
    request = urllib.request.Request(f'{endpoint}/{bucket}', method='PUT')
  urllib.request.urlopen(request, timeout=10).close()


class Proxy:
  """Forwards every request to `target`; `delay_s` before each, `deny` answers 403 instead (GCS's JSON and
  S3's XML error bodies alike); `bytes_out` counts response body bytes. Use as a context manager."""

  def __init__(self, target: str, delay_s: float = 0.0):
    self.target = target.removeprefix('http://')
    self.delay_s, self.deny, self.bytes_out, self.requests = delay_s, False, 0, 0
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = 'HTTP/1.1'

      def log_message(self, *args):  # quiet
        pass

      def _forward(self):
        body = self.rfile.read(int(self.headers.get('Content-Length') or 0))
        proxy.requests += 1
        time.sleep(proxy.delay_s)
        if proxy.deny:
          data = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                  b'<Message>Access Denied</Message></Error>' if 'amz' in str(self.headers).lower() else
                  b'{"error": {"code": 403, "message": "caller does not have storage.objects access"}}')
          self.send_response(403)
          self.send_header('Content-Length', str(len(data)))
          self.end_headers()
          self.wfile.write(data)
          return
        conn = http.client.HTTPConnection(proxy.target, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ('connection', 'keep-alive')}
        conn.request(self.command, self.path, body=body or None, headers=headers)
        response = conn.getresponse()
        data = response.read()
        proxy.bytes_out += len(data)
        self.send_response(response.status)
        for k, v in response.getheaders():
          if k.lower() not in ('transfer-encoding', 'connection', 'content-length'):
            self.send_header(k, v)
        # A HEAD answer has no body but the object's length.
        self.send_header('Content-Length', response.getheader('Content-Length', '0') if self.command == 'HEAD'
                         else str(len(data)))
        self.end_headers()
        if self.command != 'HEAD':
          self.wfile.write(data)
        conn.close()

      def _forward_quietly(self):
        try:
          self._forward()
        except (BrokenPipeError, ConnectionResetError):  # the client hung up (a ranged read it cut short)
          self.close_connection = True

      do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _forward_quietly

    self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.server.daemon_threads = True
    self.url = f'http://127.0.0.1:{self.server.server_address[1]}'

  def __enter__(self) -> Proxy:
    threading.Thread(target=self.server.serve_forever, daemon=True).start()
    return self

  def __exit__(self, *exc):
    self.server.shutdown()
    self.server.server_close()


def _s3(endpoint: str):
  import boto3  # pylint: disable=import-outside-toplevel
  return boto3.client('s3', endpoint_url=endpoint, aws_access_key_id='testing', aws_secret_access_key='testing',
                      region_name='us-east-1')


def list_objects(scheme: str, endpoint: str, bucket: str) -> dict[str, int]:
  """{key: size} of every object in `bucket`, read with the server's own client (GCS: its JSON API over
  HTTP; S3: boto3), not through Stoker's path layer."""
  if scheme == 'gs':
    with urllib.request.urlopen(f'{endpoint}/storage/v1/b/{bucket}/o', timeout=10) as r:
      return {o['name']: int(o['size']) for o in json.load(r).get('items', [])}
  pages = _s3(endpoint).get_paginator('list_objects_v2').paginate(Bucket=bucket)
  return {o['Key']: o['Size'] for page in pages for o in page.get('Contents', [])}


def get_object(scheme: str, endpoint: str, bucket: str, key: str) -> bytes:
  """The bytes of one object, read as list_objects reads."""
  if scheme == 'gs':
    url = f'{endpoint}/storage/v1/b/{bucket}/o/{urllib.parse.quote(key, safe="")}?alt=media'
    with urllib.request.urlopen(url, timeout=30) as r:
      return r.read()
  return _s3(endpoint).get_object(Bucket=bucket, Key=key)['Body'].read()
