"""The tuning cache's second level on S3, against a real moto_server: what one runner tuned, another
does not search again; entries are immutable and untrusted; S3 failing costs seconds and one warning."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mlci import remote_cache
from mlci.remote_cache import RemoteCache, RemoteCacheError, parse_url, workload_line, workload_sha
from mlci.tuning import Kernel

from .servers import FAKE_AWS, MotoServer, free_port, http_server, moto_server
from .test_tuning import _imported, _pipeline

_buckets = itertools.count()


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoServer]:
    with moto_server() as server:
        yield server


def _bucket(s3: MotoServer) -> str:
    name = f"mlci-cache-{next(_buckets)}"
    s3.s3().create_bucket(Bucket=name)
    return name


def _remote(s3: MotoServer, bucket: str, tier: str = "main", **kwargs) -> RemoteCache:
    return RemoteCache(f"s3://{bucket}/team", tier, client=s3.s3(), **kwargs)


def _objects(s3: MotoServer, bucket: str, prefix: str = "") -> dict[str, bytes]:
    client = s3.s3()
    listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read() for o in listed}


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# --- tuned by a first runner, shared by the tests that need real records ----------------------


@pytest.fixture(scope="module")
def first_run(s3: MotoServer, tmp_path_factory: pytest.TempPathFactory):
    """A first runner tunes a tiny model (2 kernels, 4 trials) with the shared tier on S3."""
    tmp = tmp_path_factory.mktemp("first-run")
    bucket = _bucket(s3)
    imported = _imported(tmp, (32, 64, 8), "a")
    pipeline = _pipeline(tmp / "cache" / "cpu-fp", tmp / "logs")
    pipeline.remote = _remote(s3, bucket)
    outcome = pipeline.tune(imported, _settings(4))
    return tmp, bucket, imported, pipeline.cache, outcome


def first_cache_pipeline_key(first_run) -> str:
    """What the first runner's build of the tuned model depends on."""
    tmp, _, imported, cache, _ = first_run
    return _pipeline(cache.dir, tmp / "logs").build_key(imported)


def _settings(trials: int):
    from mlci.pipeline import ModelSettings

    return ModelSettings(trials=trials, seconds=300, trials_per_round=2)


@pytest.mark.slow
def test_a_second_runner_searches_nothing_a_first_runner_put_on_s3_and_builds_the_same_records(
        s3: MotoServer, first_run, tmp_path: Path) -> None:
    _, bucket, imported, first_cache, first = first_run
    assert first.trials_new > 0 and first.kernels_from_remote == 0
    entries = _objects(s3, bucket)
    assert len(entries) == len(imported.kernels) == 2  # one entry per kernel that gained trials
    assert all(key.startswith("team/main/cpu-fp/") for key in entries)

    second = _pipeline(tmp_path / "cache" / "cpu-fp", tmp_path / "logs")  # an empty local cache
    second.remote = _remote(s3, bucket)
    outcome = second.tune(imported, _settings(4))
    assert outcome.trials_new == 0
    assert outcome.kernels_from_remote == 2
    assert outcome.info().kernels_from_remote == 2  # the results file says so
    for kernel in imported.kernels:
        assert second.cache.best_record_json(kernel) == first_cache.best_record_json(kernel)
    # The default schedules' times come along, so both runners choose the same schedule for each kernel.
    assert second.cache.default_seconds() == first_cache.default_seconds() != {}
    assert second.build_key(imported) == first_cache_pipeline_key(first_run)
    assert _objects(s3, bucket) == entries  # it gained nothing, so it wrote nothing

    # A third run on the second runner finds it all in its local cache: S3 adds nothing.
    again = _pipeline(tmp_path / "cache" / "cpu-fp", tmp_path / "logs")
    again.remote = _remote(s3, bucket)
    outcome = again.tune(imported, _settings(4))
    assert outcome.trials_new == 0 and outcome.kernels_from_remote == 0


@pytest.mark.slow
def test_two_writers_of_one_kernel_leave_one_entry_each_and_the_reader_takes_the_most_trials(
        s3: MotoServer, first_run) -> None:
    _, _, imported, cache, _ = first_run
    bucket = _bucket(s3)
    kernel = imported.kernels[0]
    _, records = remote_cache.local_entries(cache, [kernel])[kernel.key]
    writers = [(_remote(s3, bucket), trials) for trials in (3, 40)]
    threads = [threading.Thread(target=w.put_entry, args=("cpu-fp", kernel, t, workload_line(kernel), records))
               for w, t in writers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stored = _objects(s3, bucket)
    assert len(stored) == 2
    assert sorted(json.loads(body)["trials"] for body in stored.values()) == [3, 40]

    best = _remote(s3, bucket).best_entries("cpu-fp", [kernel])
    assert best[kernel.key].trials == 40
    assert best[kernel.key].key.endswith(f"{writers[1][0].writer}.t40.json")


@pytest.mark.slow
def test_a_retried_put_of_an_entry_already_there_counts_as_written(
        s3: MotoServer, first_run, caplog: pytest.LogCaptureFixture) -> None:
    _, _, imported, cache, _ = first_run
    bucket = _bucket(s3)
    kernel = imported.kernels[0]
    _, records = remote_cache.local_entries(cache, [kernel])[kernel.key]
    writer = _remote(s3, bucket)
    first = writer.put_entry("cpu-fp", kernel, 4, workload_line(kernel), records)
    body = _objects(s3, bucket)[first]
    with caplog.at_level(logging.WARNING, logger="mlci"):
        again = writer.put_entry("cpu-fp", kernel, 4, workload_line(kernel), records)  # S3 answers 412
    assert again == first and not writer.failed and not _warnings(caplog)
    assert _objects(s3, bucket) == {first: body}  # never overwritten


@pytest.mark.slow
def test_a_pull_request_run_reads_the_shared_tier_and_leaves_it_byte_for_byte_unchanged(
        s3: MotoServer, first_run, tmp_path: Path) -> None:
    first_tmp, bucket, first_model, _, _ = first_run
    shared = _objects(s3, bucket, "team/main/")
    changed = _imported(first_tmp, (32, 64, 16), "b")  # its first kernel is on S3, its second is new

    pr = _pipeline(tmp_path / "cache" / "cpu-fp", tmp_path / "logs")
    pr.remote = _remote(s3, bucket, tier="pr-7")
    outcome = pr.tune(changed, _settings(4))
    assert outcome.kernels_from_remote == 1
    assert outcome.trials_new > 0

    assert _objects(s3, bucket, "team/main/") == shared
    written = _objects(s3, bucket, "team/pr-7/")
    assert len(written) == 1
    [new_kernel] = [k for k in changed.kernels if k.key not in {f.key for f in first_model.kernels}]
    assert f"/{workload_sha(workload_line(new_kernel)[1])}/" in next(iter(written))

    # The same pull request's next run finds its own tier; the default branch never reads it.
    assert new_kernel.key in _remote(s3, bucket, tier="pr-7").best_entries("cpu-fp", changed.kernels)
    assert new_kernel.key not in _remote(s3, bucket).best_entries("cpu-fp", changed.kernels)


def readme_s3_policies(bucket: str, prefix: str) -> dict[str, str]:
    """The two S3 policies the README tells users to attach, as written there, for one bucket and prefix."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    main = readme.split("The\npermissions of `mlci-cache-main`", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    pr = readme.split("and of `mlci-cache-pr`:", 1)[1].split("```json\n", 1)[1].split("```", 1)[0]
    return {name: text.replace("BUCKET", bucket).replace("PREFIX", prefix) for name, text in (("main", main), ("pr", pr))}


@pytest.mark.slow
def test_with_the_readmes_policies_enforced_a_pull_request_identity_cannot_write_the_shared_tier(
        first_run, caplog: pytest.LogCaptureFixture) -> None:
    """moto enforcing IAM (every request signed by one identity, allowed only by its policies), one identity per
    role with the README's policy: the pull-request identity reads the shared tier and writes its own tier; a
    write to the shared tier (a pull request run told it is the default branch) is denied, costs one warning,
    and leaves the shared tier as it was. moto does not evaluate ListBucket's s3:prefix condition."""
    import boto3

    _, _, imported, cache, _ = first_run
    with moto_server(setup_calls_before_iam=7) as server:
        setup = {"endpoint_url": server.url, "region_name": "us-east-1", "aws_access_key_id": "setup",
                 "aws_secret_access_key": "setup"}
        boto3.client("s3", **setup).create_bucket(Bucket="tuning")
        iam = boto3.client("iam", **setup)
        clients = {}
        for name, policy in readme_s3_policies("tuning", "team").items():
            iam.create_user(UserName=f"mlci-cache-{name}")
            key = iam.create_access_key(UserName=f"mlci-cache-{name}")["AccessKey"]
            iam.put_user_policy(UserName=f"mlci-cache-{name}", PolicyName="mlci", PolicyDocument=policy)
            clients[name] = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1",
                                         aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])

        def remote(identity: str, tier: str) -> RemoteCache:
            return RemoteCache("s3://tuning/team", tier, client=clients[identity])

        def stored(prefix: str) -> list[str]:
            listed = clients["main"].list_objects_v2(Bucket="tuning", Prefix=prefix).get("Contents", [])
            return sorted(o["Key"] for o in listed)

        kernels = imported.kernels
        assert len(remote_cache.push(cache, kernels, remote("main", "main"))) == len(kernels)  # the default branch writes
        shared = stored("team/main/")
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mlci"):
            forged = remote("pr", "main")
            assert remote_cache.push(cache, kernels, forged) == [] and forged.failed
        assert stored("team/main/") == shared  # not one object more
        [warning] = _warnings(caplog)
        assert "AccessDenied" in warning
        assert len(remote_cache.push(cache, kernels, remote("pr", "pr-7"))) == len(kernels)  # its own tier: allowed
        assert set(remote("pr", "pr-7").best_entries(cache.dir.name, kernels)) == {k.key for k in kernels}  # reads main


@pytest.mark.slow
def test_poisoned_entries_are_skipped_with_one_warning_each_naming_the_object(
        s3: MotoServer, first_run, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_cache, "MAX_READS_PER_KERNEL", 100)  # every kind of poison read (see below)
    _, _, imported, cache, _ = first_run
    bucket = _bucket(s3)
    kernel, other = imported.kernels
    saved = remote_cache.local_entries(cache, imported.kernels)
    good = _remote(s3, bucket).put_entry("cpu-fp", kernel, 4, workload_line(kernel), saved[kernel.key][1])
    folder = good.rsplit("/", 1)[0]

    def entry(**changes) -> bytes:
        obj = {"format": 1, "kernel": kernel.name, "trials": 999, "workload": workload_line(kernel),
               "records": saved[kernel.key][1], **changes}
        return json.dumps(obj).encode()

    poison = {  # each claims more trials than the good entry, so each is read before it
        f"{folder}/garbage.t999.json": b"\x00not json",
        f"{folder}/other-workload.t999.json": entry(workload=workload_line(other), records=saved[other.key][1]),
        f"{folder}/oversized.t999.json": entry(padding="x" * remote_cache.MAX_ENTRY_BYTES),
        f"{folder}/bad-record.t999.json": entry(records=[[[["nonsense"]], []], [1e-5], None, None]),
        f"{folder}/foreign-records.t999.json": entry(records=saved[other.key][1]),
        f"{folder}/no-records.t999.json": entry(records=[]),
        f"{folder}/bad-trials.t999.json": entry(trials="many"),
        f"{folder}/other-format.t999.json": entry(format=2),
        f"{folder}/says-more.t1000.json": entry(),
        f"{folder}/says-nothing.json": entry(),
        f"{folder}/bad-default.t999.json": entry(default_seconds="fast"),
    }
    client = s3.s3()
    for key, body in poison.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)

    with caplog.at_level(logging.WARNING, logger="mlci"):
        best = _remote(s3, bucket).best_entries("cpu-fp", imported.kernels)
    assert best[kernel.key].key == good and best[kernel.key].trials == 4
    messages = _warnings(caplog)
    assert len(messages) == len(poison)
    for key in poison:
        assert sum(key in m for m in messages) == 1, key


def test_garbage_entries_cost_a_few_reads_and_lines_and_a_hostile_key_cannot_start_a_log_line(
        s3: MotoServer, first_run, caplog: pytest.LogCaptureFixture) -> None:
    _, _, imported, cache, _ = first_run
    bucket = _bucket(s3)
    kernel = imported.kernels[0]
    saved = remote_cache.local_entries(cache, imported.kernels)
    good = _remote(s3, bucket).put_entry("cpu-fp", kernel, 4, workload_line(kernel), saved[kernel.key][1])
    folder = good.rsplit("/", 1)[0]
    client = s3.s3()
    for n in range(30):
        client.put_object(Bucket=bucket, Key=f"{folder}/junk{n}.t{1000 + n}.json", Body=b"junk")
    # A newline does not survive S3's HTTP path here; an escape sequence does, and is as hostile to a log.
    client.put_object(Bucket=bucket, Key=f"{folder}/x\x1b[2K::error::forged.t5.json", Body=b"junk")

    gets: list[str] = []
    remote = _remote(s3, bucket)
    remote.client.meta.events.register("provide-client-params.s3.GetObject",
                                      lambda params, **_: gets.append(params["Key"]))
    with caplog.at_level(logging.WARNING, logger="mlci"):
        best = remote.best_entries("cpu-fp", imported.kernels)
    assert kernel.key not in best  # the junk outranks the good entry: the kernel goes without S3, no worse
    assert len(gets) == remote_cache.MAX_READS_PER_KERNEL
    messages = _warnings(caplog)
    assert len(messages) == remote_cache.MAX_READS_PER_KERNEL + 2  # the reads, the rest in one line, the key
    assert not any("\x1b" in m for m in messages)
    assert any("x\\x1b[2K::error::forged" in m and "control characters" in m for m in messages)


def test_a_kernel_is_listed_in_its_own_folder_only_and_an_overfull_folder_is_cut_with_one_warning(
        s3: MotoServer, first_run, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Listing costs one call per kernel and tier, whatever else the fingerprint holds; a folder with more
    entries than one listing returns is read as far as that listing goes, and says so once."""
    _, _, imported, cache, _ = first_run
    bucket = _bucket(s3)
    kernel, other = imported.kernels[0], imported.kernels[1]
    saved = remote_cache.local_entries(cache, imported.kernels)
    good = _remote(s3, bucket).put_entry("cpu-fp", kernel, 4, workload_line(kernel), saved[kernel.key][1])
    folder = good.rsplit("/", 1)[0]
    client = s3.s3()
    for n in range(5):  # another kernel's folder under the same fingerprint: never listed for this model
        client.put_object(Bucket=bucket, Key=f"{folder.rsplit('/', 1)[0]}/{'0' * 64}/w{n}.t9.json", Body=b"junk")
    for n in range(3):
        client.put_object(Bucket=bucket, Key=f"{folder}/aaa{n}.t1.json", Body=b"junk")
    lists: list[dict] = []
    remote = _remote(s3, bucket)
    remote.client.meta.events.register("provide-client-params.s3.ListObjectsV2", lambda params, **_: lists.append(params))
    monkeypatch.setattr(remote_cache, "MAX_LISTED_PER_KERNEL", 2)  # the good entry sorts after two junk keys
    with caplog.at_level(logging.WARNING, logger="mlci"):
        best = remote.best_entries("cpu-fp", [kernel, other])
    assert [p["Prefix"].rsplit("/", 2)[-2] for p in lists] == [workload_sha(workload_line(k)[1]) for k in (kernel, other)]
    assert all(p["MaxKeys"] == 2 for p in lists)
    assert kernel.key not in best  # cut before the good one: no worse than no S3
    [cut] = [m for m in _warnings(caplog) if "more than 2 entries" in m]
    assert kernel.name in cut


# --- S3 failing: seconds and one warning ------------------------------------------------------


class _AlwaysAnswers(BaseHTTPRequestHandler):
    status, code = 503, "SlowDown"
    protocol_version = "HTTP/1.1"  # answers botocore's "Expect: 100-continue" at once

    def _answer(self) -> None:
        body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{self.code}</Code>"
                f"<Message>{self.code}</Message></Error>").encode()
        if self.command == "PUT":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@contextmanager
def _answering(status: int, code: str) -> Iterator[str]:
    with http_server(type("Handler", (_AlwaysAnswers,), {"status": status, "code": code})) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}"


class _Trickles(BaseHTTPRequestHandler):
    """S3 answering 200 and then one byte a second: each read is quick, so botocore's read timeout
    never trips, and the answer never ends."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        if self.command == "PUT":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        try:
            for _ in range(120):
                self.wfile.write(b" ")
                self.wfile.flush()
                time.sleep(1.0)
        except OSError:  # the client gave up
            pass

    do_GET = do_PUT = do_HEAD = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(params=["unreachable", "throttled", "denied", "no bucket", "trickling"])
def broken_s3(request, s3: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """An endpoint and a bucket that fail the way the parameter says."""
    if request.param == "trickling":
        monkeypatch.setenv(remote_cache.DEADLINE_ENV, "3")  # the default, 20 s, is as bounded, and slower
        with http_server(_Trickles) as server:
            yield f"http://127.0.0.1:{server.server_address[1]}", "mlci-cache"
    elif request.param == "unreachable":
        yield f"http://127.0.0.1:{free_port()}", "mlci-cache"  # nothing listens there
    elif request.param == "throttled":
        with _answering(503, "SlowDown") as url:
            yield url, "mlci-cache"
    elif request.param == "denied":
        with _answering(403, "AccessDenied") as url:
            yield url, "mlci-cache"
    else:
        yield s3.url, "no-such-bucket"


def test_s3_failing_costs_seconds_and_one_warning(broken_s3, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    url, bucket = broken_s3
    for name, value in {**FAKE_AWS, "AWS_ENDPOINT_URL_S3": url}.items():
        monkeypatch.setenv(name, value)
    remote = RemoteCache(f"s3://{bucket}/team")  # the standard AWS chain, with the bounded client
    kernel = Kernel(name="k", key="0" * 16, weight=1, flops=1.0, task=None)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mlci"):
        assert remote.best_entries("cpu-fp", []) == {}
        assert remote.put_entry("cpu-fp", kernel, 4, ["1", "module"], [[]]) is None
        assert remote.best_entries("cpu-fp", []) == {}
    assert time.monotonic() - start < 10
    assert remote.failed
    messages = _warnings(caplog)
    assert len(messages) == 1 and "going on with the local cache only" in messages[0]


class _ConflictsOnce(BaseHTTPRequestHandler):
    """S3 answering the first conditional write 409 ConditionalRequestConflict (another write of the
    same key in flight), and the next 200."""

    puts: list[str] = []
    protocol_version = "HTTP/1.1"  # answers botocore's "Expect: 100-continue" at once

    def do_PUT(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.puts.append(self.headers.get("If-None-Match", ""))
        if len(self.puts) == 1:
            body = b"<Error><Code>ConditionalRequestConflict</Code><Message>in flight</Message></Error>"
            self.send_response(409)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("ETag", '"0"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_a_conflicting_conditional_write_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    handler = type("Handler", (_ConflictsOnce,), {"puts": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for name, value in {**FAKE_AWS, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{server.server_address[1]}"}.items():
            monkeypatch.setenv(name, value)
        remote = RemoteCache("s3://mlci-cache/team")
        kernel = Kernel(name="k", key="0" * 16, weight=1, flops=1.0, task=None)
        assert remote.put_entry("cpu-fp", kernel, 4, ["1", "module"], [[]]) is not None
        assert not remote.failed
        assert handler.puts == ["*", "*"]  # both conditional: never an overwrite
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_a_run_with_s3_down_goes_on_with_its_local_cache(first_run, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    _, _, imported, cache, _ = first_run
    shutil.copytree(cache.dir, tmp_path / "cpu-fp")
    pipeline = _pipeline(tmp_path / "cpu-fp", tmp_path / "logs")
    pipeline.remote = RemoteCache("s3://mlci-cache/team", client=_closed_port_client())
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mlci"):
        outcome = pipeline.tune(imported, _settings(4))
    assert time.monotonic() - start < 10
    assert outcome.trials_new == 0 and outcome.tasks_from_cache == 2  # the local cache served it
    assert len(_warnings(caplog)) == 1


def _closed_port_client():
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{free_port()}", region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing",
                        config=Config(connect_timeout=1, retries={"max_attempts": 1}))


def test_a_cache_url_must_name_an_s3_bucket() -> None:
    assert parse_url("s3://bucket/some/prefix/") == ("bucket", "some/prefix")
    assert parse_url("s3://bucket") == ("bucket", "")
    with pytest.raises(RemoteCacheError, match="not an s3:// URL"):
        parse_url("https://bucket/prefix")
    with pytest.raises(RemoteCacheError, match="names no bucket"):
        parse_url("s3:///prefix")
    with pytest.raises(RemoteCacheError, match="tier"):
        RemoteCache("s3://bucket/prefix", "pr/7")


def test_a_read_only_remote_writes_nothing(s3: MotoServer) -> None:
    bucket = _bucket(s3)
    remote = _remote(s3, bucket, tier="pr-3", writes=False)
    kernel = Kernel(name="k", key="0" * 16, weight=1, flops=1.0, task=None)
    assert remote.put_entry("cpu-fp", kernel, 4, ["1", "module"], [[]]) is None
    assert _objects(s3, bucket) == {}
    assert remote.read_tiers == ["main", "pr-3"]


# --- configuration: where the cache is, and which tier a run reads and writes ------------------


def _config(tmp_path: Path, cache: str = ""):
    from mlci.config import parse_config

    text = f'[[models]]\npath = "m.onnx"\n{cache}\n'
    return parse_config(text, tmp_path / "mlci.toml")


def test_the_cache_url_is_configured_in_mlci_toml_or_by_environment(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from mlci.config import ConfigError

    monkeypatch.delenv("MLCI_CACHE_URL", raising=False)
    assert _config(tmp_path).cache_url() is None
    config = _config(tmp_path, '[cache]\nurl = "s3://team-bucket/mlci"\npr_writes = false')
    assert config.cache_url() == "s3://team-bucket/mlci" and config.cache.pr_writes is False
    monkeypatch.setenv("MLCI_CACHE_URL", "s3://other/prefix")
    assert config.cache_url() == "s3://other/prefix"
    monkeypatch.setenv("MLCI_CACHE_URL", "none")  # what the workflows give a fork's pull request
    assert config.cache_url() is None
    monkeypatch.setenv("MLCI_CACHE_URL", "/mnt/cache")
    with pytest.raises(ConfigError, match="MLCI_CACHE_URL: '/mnt/cache' is not an s3:// URL"):
        config.cache_url()

    for table, message in [('url = "https://bucket/x"', "cache.url: 'https://bucket/x' is not an s3:// URL"),
                           ('url = "s3:///x"', "cache.url: 's3:///x' names no bucket"),
                           ("url = 3", "cache.url: expected a string"),
                           ('pr_writes = "no"', "cache.pr_writes: expected true or false"),
                           ("uri = 's3://b/x'", "cache.uri: unknown key (did you mean 'url'?)")]:
        with pytest.raises(ConfigError) as caught:
            _config(tmp_path, f"[cache]\n{table}")
        assert message in str(caught.value)


@pytest.mark.parametrize(("kind", "tier", "writes"), [
    ("push to the default branch", "main", True),
    ("schedule", "main", True),
    ("same-repository pull request", "pr-2", True),
    ("push to a branch", "main", False),
    ("push of a tag", "main", False),
    ("fork pull request", "main", False),
])
def test_only_the_default_branch_writes_the_shared_tier_and_a_pull_request_writes_its_own(
        kind: str, tier: str, writes: bool, tmp_path: Path) -> None:
    from mlci.actions import GitHubContext
    from mlci.commands.run import remote_cache_for

    from .events import actions_env

    config = _config(tmp_path, '[cache]\nurl = "s3://b/x"')
    remote = remote_cache_for(config, GitHubContext.from_env(actions_env(tmp_path, kind)))
    assert (remote.tier, remote.writes) == (tier, writes)


def test_pr_writes_and_local_writes_say_whether_those_runs_write(tmp_path: Path) -> None:
    from mlci.actions import GitHubContext
    from mlci.commands.run import remote_cache_for

    from .events import actions_env

    read_only = _config(tmp_path, '[cache]\nurl = "s3://b/x"\npr_writes = false')
    pr = GitHubContext.from_env(actions_env(tmp_path, "same-repository pull request"))
    assert (remote_cache_for(read_only, pr).tier, remote_cache_for(read_only, pr).writes) == ("pr-2", False)
    laptop = GitHubContext()
    assert remote_cache_for(_config(tmp_path, '[cache]\nurl = "s3://b/x"'), laptop).writes is False
    assert remote_cache_for(_config(tmp_path, '[cache]\nurl = "s3://b/x"\nlocal_writes = true'), laptop).writes is True


def test_a_run_has_no_remote_level_unless_a_cache_url_is_configured(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from mlci.actions import GitHubContext
    from mlci.commands.run import remote_cache_for

    from .events import actions_env

    monkeypatch.delenv("MLCI_CACHE_URL", raising=False)
    pr = GitHubContext.from_env(actions_env(tmp_path, "same-repository pull request"))
    assert remote_cache_for(_config(tmp_path), pr) is None
    monkeypatch.setenv("MLCI_CACHE_URL", "s3://team-bucket/mlci")
    remote = remote_cache_for(_config(tmp_path), pr)
    assert (remote.bucket, remote.prefix, remote.tier, remote.writes) == ("team-bucket", "mlci", "pr-2", True)
    assert remote.read_tiers == ["main", "pr-2"]


def test_an_entry_claiming_a_trillion_trials_is_credited_no_more_than_the_runs_budget(
        s3: MotoServer, first_run, tmp_path: Path) -> None:
    _, _, imported, cache, _ = first_run
    bucket = _bucket(s3)
    saved = remote_cache.local_entries(cache, imported.kernels)
    for kernel in imported.kernels:
        _remote(s3, bucket).put_entry("cpu-fp", kernel, 10**12, workload_line(kernel), saved[kernel.key][1])
    runner = _pipeline(tmp_path / "cache" / "cpu-fp", tmp_path / "logs")
    runner.remote = _remote(s3, bucket)
    runner.tune(imported, _settings(6))
    assert all(0 < trials <= 6 for trials in runner.cache.ledger().values())
    lines = len((tmp_path / "cache" / "cpu-fp" / "database_tuning_record.json").read_text().splitlines())
    again = _pipeline(tmp_path / "cache" / "cpu-fp", tmp_path / "logs")
    again.remote = _remote(s3, bucket)
    again.tune(imported, _settings(6))  # the budget is met: nothing pulled again, nothing searched
    assert len((tmp_path / "cache" / "cpu-fp" / "database_tuning_record.json").read_text().splitlines()) == lines
