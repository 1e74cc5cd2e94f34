"""The test servers themselves: moto_server answers S3 over HTTP and forgets on reset."""

from __future__ import annotations

from .servers import moto_server


def test_moto_server_serves_s3_over_http_and_resets() -> None:
    with moto_server() as server:
        s3 = server.s3()
        s3.create_bucket(Bucket="mlci-cache")
        s3.put_object(Bucket="mlci-cache", Key="a", Body=b"1")
        assert s3.get_object(Bucket="mlci-cache", Key="a")["Body"].read() == b"1"
        server.reset()
        assert s3.list_buckets()["Buckets"] == []
    assert server.proc.poll() is not None  # stopped
