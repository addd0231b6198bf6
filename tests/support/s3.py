"""A real S3 API on 127.0.0.1 for the object-storage tests: moto's server, in a thread of the test process."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

import boto3
from moto.server import ThreadedMotoServer
from s3fs import S3FileSystem

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """Started on a free port; `stop` and `start` again keep the buckets (moto's state lives in this process)."""

    def __init__(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.host, self.port = self._server.get_host_and_port()
        self.env = {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{self.host}:{self.port}"}

    def stop(self) -> None:
        self._server.stop()

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.start()

    def client(self):
        return boto3.client("s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], **_client_credentials())

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        client = self.client()
        keys = [
            item["Key"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for item in page.get("Contents", [])
        ]
        return {key.removeprefix(prefix): client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}

    @contextmanager
    def environment(self):
        """The server's endpoint and credentials in this process's environment (fsspec and boto read them there)."""
        saved = {key: os.environ.get(key) for key in self.env}
        os.environ.update(self.env)
        # a filesystem fsspec reuses keeps the endpoint it connected to: another module's server
        S3FileSystem.clear_instance_cache()
        try:
            yield
        finally:
            S3FileSystem.clear_instance_cache()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _client_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "region_name": CREDENTIALS["AWS_DEFAULT_REGION"],
    }
