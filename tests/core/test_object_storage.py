"""A bucket folder against a real S3 API (moto's server over HTTP on 127.0.0.1): large files go up in
parts signed on several threads, each part checked by the bucket against its CRC32, and a failed part
leaves no object and no open upload behind."""

from __future__ import annotations

import base64
import os
import sys
import threading
import zlib
from pathlib import Path

import botocore.auth
import pytest

from noether.core import object_storage
from noether.core.object_storage import Bucket
from noether.core.utils.background import BACKGROUND_NICENESS

PART_BYTES = 5 << 20  # S3's smallest part but the last


@pytest.fixture
def bucket_url(s3, request) -> str:
    return s3.create_bucket(request.node.name.replace("_", "-")[:60].strip("-").lower())


@pytest.fixture
def large_file(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(object_storage, "S3_PART_BYTES", PART_BYTES)
    path = tmp_path / "model_cp=E1_model.th"
    path.write_bytes(os.urandom(3 * PART_BYTES + 12345))  # four parts, the last a short one
    return path


def test_a_large_file_goes_up_in_parts_signed_on_several_threads(s3, bucket_url, large_file, monkeypatch):
    signing_threads = set()
    real_add_auth = botocore.auth.S3SigV4Auth.add_auth

    def add_auth(self, request):
        if "partNumber=" in request.url:
            signing_threads.add(threading.current_thread().name)
        return real_add_auth(self, request)

    monkeypatch.setattr(botocore.auth.S3SigV4Auth, "add_auth", add_auth)
    Bucket(f"{bucket_url}/run").upload(large_file, "checkpoints/model.th")
    bucket = bucket_url.removeprefix("s3://")
    assert s3.objects(bucket) == {"run/checkpoints/model.th": large_file.read_bytes()}
    assert s3.client().head_object(Bucket=bucket, Key="run/checkpoints/model.th")["ETag"].endswith('-4"')
    assert len(signing_threads) > 1, signing_threads  # not all on one event loop


def composite_crc32(content: bytes, part_bytes: int) -> str:
    """S3's checksum of a multipart object: the CRC32 of the parts' CRC32s (S3 appends "-" and the
    number of parts, moto does not)."""
    parts = [content[start : start + part_bytes] for start in range(0, len(content), part_bytes)]
    crcs = b"".join(zlib.crc32(part).to_bytes(4, "big") for part in parts)
    return base64.b64encode(zlib.crc32(crcs).to_bytes(4, "big")).decode()


def test_the_bucket_keeps_a_checksum_of_the_parts_it_checked(s3, bucket_url, large_file):
    Bucket(bucket_url).upload(large_file, "model.th")
    head = s3.client().head_object(Bucket=bucket_url.removeprefix("s3://"), Key="model.th", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"].split("-")[0] == composite_crc32(large_file.read_bytes(), PART_BYTES)


def test_a_client_told_to_send_checksums_only_where_required_declares_none(s3, bucket_url, large_file):
    """For stores that reject checksum headers: `request_checksum_calculation: when_required` is obeyed."""
    options = {"config_kwargs": {"request_checksum_calculation": "when_required"}}
    Bucket(bucket_url, storage_options=options).upload(large_file, "model.th")
    bucket = bucket_url.removeprefix("s3://")
    assert s3.objects(bucket) == {"model.th": large_file.read_bytes()}
    assert "ChecksumCRC32" not in s3.client().head_object(Bucket=bucket, Key="model.th", ChecksumMode="ENABLED")


def test_a_failed_part_aborts_the_upload_and_leaves_no_object(s3, bucket_url, large_file, monkeypatch):
    real_add_auth = botocore.auth.S3SigV4Auth.add_auth

    def add_auth(self, request):
        if "partNumber=3" in request.url:
            raise ConnectionResetError("the endpoint went away")
        return real_add_auth(self, request)

    monkeypatch.setattr(botocore.auth.S3SigV4Auth, "add_auth", add_auth)
    with pytest.raises(ConnectionResetError, match="went away"):
        Bucket(bucket_url).upload(large_file, "model.th")
    bucket = bucket_url.removeprefix("s3://")
    assert s3.objects(bucket) == {}
    assert s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_a_small_file_goes_up_in_one_request(s3, bucket_url, tmp_path):
    path = tmp_path / "trainer.th"
    path.write_bytes(b"state" * 1000)
    Bucket(bucket_url).upload(path, "a/trainer.th")
    assert s3.objects(bucket_url.removeprefix("s3://")) == {"a/trainer.th": path.read_bytes()}


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value is Linux's")
def test_upload_threads_run_at_the_lowest_cpu_priority_and_training_keeps_its_own(s3, bucket_url, large_file):
    def niceness(native_id: int) -> int:
        return os.getpriority(os.PRIO_PROCESS, native_id)

    training = niceness(threading.get_native_id())
    Bucket(bucket_url).upload(large_file, "model.th")
    part_threads = [thread for thread in threading.enumerate() if thread.name.startswith("noether-s3-")]
    assert part_threads and {niceness(thread.native_id) for thread in part_threads} == {BACKGROUND_NICENESS}

    seen = []
    uploader = object_storage.Uploader(bucket_url, give_up_after_seconds=10)
    uploader.submit(object_storage._Job("a probe", [[lambda: seen.append(niceness(threading.get_native_id()))]]))
    assert uploader.close() == []
    assert seen == [BACKGROUND_NICENESS]
    assert niceness(threading.get_native_id()) == training
