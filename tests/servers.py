"""Real servers the tests start on 127.0.0.1 and stop: `moto_server` (S3 over HTTP, boto3 pointed
at it by endpoint URL) and `mlflow_server` (an MLflow tracking server that keeps artifacts in S3)."""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Credentials that only moto accepts: never a real account's.
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout:g} s")


def stop(proc: subprocess.Popen) -> None:
    """Terminate a server process, killing it when it does not stop within 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class MotoServer:
    url: str
    proc: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach this S3: fake credentials and the endpoint."""
        return {**FAKE_AWS, "AWS_ENDPOINT_URL_S3": self.url}

    def s3(self):  # noqa: ANN201 - a boto3 client
        import boto3

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def reset(self) -> None:
        """Forget every bucket and object (moto's own reset endpoint)."""
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST"), timeout=5).close()


@contextmanager
def moto_server(setup_calls_before_iam: int | None = None) -> Iterator[MotoServer]:
    """`moto_server` in its own process on a free port of 127.0.0.1. With `setup_calls_before_iam`, moto
    enforces IAM after that many requests (the setup: buckets, users, their policies): from then on every
    request needs an identity's keys and is allowed only by its policies."""
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    assert exe, "moto_server is not installed (pip install -e '.[test]')"
    port = free_port()
    env = {**os.environ, **FAKE_AWS}
    if setup_calls_before_iam is not None:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(setup_calls_before_iam)
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/moto-api/", proc=proc)
        yield MotoServer(url, proc)
    finally:
        stop(proc)


@dataclass
class MlflowServer:
    url: str
    proc: subprocess.Popen
    log: Path

    def client(self):  # noqa: ANN201 - an MlflowClient
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url)


@contextmanager
def mlflow_server(tmp_path: Path, artifacts_destination: str = "s3://bucket/mlartifacts",
                  env: dict[str, str] | None = None) -> Iterator[MlflowServer]:
    """`mlflow server` in its own process on a free port of 127.0.0.1: runs in sqlite under `tmp_path`,
    artifacts proxied by the server to `artifacts_destination` (`env`: how the server reaches that
    store, e.g. `MotoServer.env`; its bucket must exist). One uvicorn worker: the fastest start."""
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    assert exe, "mlflow is not installed"
    port = free_port()
    tmp_path.mkdir(parents=True, exist_ok=True)
    # No job runner (a huey consumer process for async server jobs): nothing here uses it, and it
    # slows both start and stop.
    server_env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    if "AWS_ENDPOINT_URL_S3" in server_env:  # MLflow's S3 store reads its own variable
        server_env.setdefault("MLFLOW_S3_ENDPOINT_URL", server_env["AWS_ENDPOINT_URL_S3"])
    log = tmp_path / "mlflow-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
             "--serve-artifacts", "--artifacts-destination", artifacts_destination],
            stdout=out, stderr=subprocess.STDOUT, env=server_env, cwd=tmp_path,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_up(f"{url}/health", timeout=90, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}; server log:\n{log.read_text(errors='replace')[-4000:]}") from exc
        yield MlflowServer(url, proc, log)
    finally:
        stop(proc)


class ForwardingHandler(BaseHTTPRequestHandler):
    """Forwards each request to the server `upstream()` names (http://host:port) and its reply back;
    a subclass may drop a reply (`drop_reply`): the request reaches the server, the connection closes."""

    protocol_version = "HTTP/1.1"
    upstream: Callable[[], str]

    def drop_reply(self) -> bool:
        return False

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        address = type(self).upstream().removeprefix("http://")
        host, port = address.split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(self.command, self.path, body=body, headers={**headers, "Host": address})
        reply = conn.getresponse()
        data = reply.read()
        conn.close()
        if self.drop_reply():
            self.close_connection = True
            return
        self.send_response(reply.status)
        for key, value in reply.getheaders():
            if key.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


def forwarding_to(upstream: Callable[[], str], base: type[ForwardingHandler] = ForwardingHandler,
                  **attributes: object) -> type[ForwardingHandler]:
    """A handler class for ThreadingHTTPServer that forwards to `upstream()`."""
    return type("Forward", (base,), {"upstream": staticmethod(upstream), **attributes})


@contextmanager
def http_server(handler: type[BaseHTTPRequestHandler], port: int = 0) -> Iterator[ThreadingHTTPServer]:
    """`handler` serving on 127.0.0.1 (`port` 0: any free one) in a thread, stopped on exit; a handler
    still writing (a server that trickles) does not hold the exit up."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads, server.block_on_close = True, False
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
