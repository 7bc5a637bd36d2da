"""An S3 API server (moto, in server mode) on 127.0.0.1 for the tests of packs on object storage: the
``AWS_*`` variables point boto3, s3fs and child processes at it; nothing reaches another address."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer
from s3fs import S3FileSystem


@contextlib.contextmanager
def moto_s3(bucket: str, env: dict[str, str] | None = None) -> Iterator[Any]:
    """A boto3 client of a fresh server holding ``bucket``; ``env``: more variables set meanwhile.

    s3fs keeps one file system per set of arguments for the life of the process, holding the endpoint
    it saw first: its cache is emptied on the way in and out, so no test talks to a stopped server.
    """
    S3FileSystem.clear_instance_cache()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}",
                               **(env or {})}.items():
                patch.setenv(key, value)
            client = boto3.client("s3")
            client.create_bucket(Bucket=bucket)
            yield client
    finally:
        server.stop()
        S3FileSystem.clear_instance_cache()


def objects(client: Any, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix/`` by its name relative to the prefix."""
    found: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for item in page.get("Contents", []):
            found[item["Key"][len(prefix) + 1:]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return found
