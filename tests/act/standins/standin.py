"""Local stand-ins for the GitHub-hosted actions mlci's workflows use, for the act end-to-end test.

act runs the jobs on this host but cannot download actions (no GitHub here), so the test maps
actions/setup-python, actions/cache, actions/upload-artifact, actions/download-artifact and
aws-actions/configure-aws-credentials to these (`act --local-repository`). They keep the contract the
workflows rely on: inputs, outputs, where files land, and the Actions cache's immutable keys with
restore-keys prefix matching, scoped by ref as GitHub scopes them (a run restores what its own ref, the
pull request's base or the default branch saved; never another pull request's or branch's entries).
Storage lives in directories the test hands over through MLCI_TEST_* variables. Standard library only.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import shutil
import sys
import time
from pathlib import Path


def _input(name: str, default: str = "") -> str:
    # The runner exposes `with:` values as INPUT_<NAME> (upper case, spaces to underscores; dashes kept).
    return os.environ.get(f"INPUT_{name.upper().replace(' ', '_')}", default).strip()


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip()]


def _output(**values: str) -> None:
    with open(os.environ["GITHUB_OUTPUT"], "a", encoding="utf-8") as f:
        for key, value in values.items():
            f.write(f"{key}={value}\n")


def _workspace_path(path: str) -> Path:
    p = Path(os.path.expanduser(path))
    return p if p.is_absolute() else Path(os.environ.get("GITHUB_WORKSPACE", ".")) / p


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def setup_python() -> None:
    """A venv that sees the test's installed packages (so nothing is downloaded) but is its own prefix:
    the action's `pip install` of mlci then really installs into it, as on a fresh runner."""
    import subprocess

    venv = Path(os.environ.get("RUNNER_TEMP") or os.environ["MLCI_TEST_TMP"]) / f"python-{os.getpid()}"
    subprocess.run([os.environ["MLCI_TEST_BASE_PYTHON"], "-m", "venv", "--without-pip", str(venv)], check=True)
    [site] = glob.glob(str(venv / "lib" / "python3*" / "site-packages"))
    Path(site, "_mlci_test_parent.pth").write_text(os.environ["MLCI_TEST_SITE_PACKAGES"] + "\n")
    with open(os.environ["GITHUB_PATH"], "a", encoding="utf-8") as f:
        f.write(str(venv / "bin") + "\n")
    _output(**{"python-version": _input("python-version"), "python-path": str(venv / "bin" / "python")})


def _cache_root(ref: str | None = None) -> Path:
    """Where the entries one ref saved live: GitHub scopes each cache entry to the ref whose run saved it."""
    ref = ref if ref is not None else os.environ.get("GITHUB_REF", "")
    root = Path(os.environ["MLCI_TEST_CACHE"]) / (ref.replace("/", "_") or "_no_ref")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _readable_refs() -> list[str]:
    """GitHub's rule: a run restores entries of its own ref, then of the pull request's base branch, then of the
    default branch, and never those of another branch or pull request."""
    import json

    refs = [os.environ.get("GITHUB_REF", "")]
    if os.environ.get("GITHUB_BASE_REF"):
        refs.append(f"refs/heads/{os.environ['GITHUB_BASE_REF']}")
    try:
        with open(os.environ.get("GITHUB_EVENT_PATH", ""), encoding="utf-8") as f:
            default = (json.load(f).get("repository") or {}).get("default_branch")
    except (OSError, ValueError):
        default = None
    if default:
        refs.append(f"refs/heads/{default}")
    return list(dict.fromkeys(refs))


def cache_restore() -> None:
    key, paths = _input("key"), _lines(_input("path"))
    matched, where = None, None
    for ref in _readable_refs():  # the exact key first, in scope order; then each restore key, in scope order
        if (_cache_root(ref) / key).is_dir():
            matched, where = key, _cache_root(ref)
            break
    for prefix in _lines(_input("restore-keys")) if matched is None else []:
        for ref in _readable_refs():
            root = _cache_root(ref)
            entries = [e for e in root.iterdir() if e.name.startswith(prefix) and not e.name.endswith(".partial")]
            if entries:
                matched, where = max(entries, key=lambda e: e.stat().st_mtime_ns).name, root
                break
        if matched is not None:
            break
    if matched is None or where is None:
        print(f"Cache not found for input keys: {key}")
        _output(**{"cache-hit": "false", "cache-primary-key": key})
        return
    for i, path in enumerate(paths):
        stored = where / matched / str(i)
        if stored.exists():
            _copy(stored, _workspace_path(path))
    print(f"Cache restored from key: {matched} (saved by {where.name})")
    _output(**{"cache-hit": str(matched == key).lower(), "cache-primary-key": key, "cache-matched-key": matched})


def cache_save() -> None:
    key, paths = _input("key"), _lines(_input("path"))
    entry = _cache_root() / key
    if entry.exists():
        print(f"::warning::Failed to save: Unable to reserve cache with key {key}, another job may be creating this cache.")
        return
    tmp = entry.with_name(entry.name + ".partial")
    for i, path in enumerate(paths):
        src = _workspace_path(path)
        if src.exists():
            _copy(src, tmp / str(i))
    if not tmp.exists():
        print("::warning::Path Validation Error: Path(s) specified in the action for caching do(es) not exist, "
              "hence no cache is being saved.")
        return
    os.utime(tmp, (time.time(), time.time()))
    tmp.rename(entry)
    print(f"Cache saved with key: {key}")


def _artifacts(run: str | None = None) -> Path:
    root = Path(os.environ["MLCI_TEST_ARTIFACTS"]) / (run or os.environ["MLCI_TEST_RUN"])
    root.mkdir(parents=True, exist_ok=True)
    return root


def upload_artifact() -> None:
    name = _input("name", "artifact")
    files = [Path(p) for pattern in _lines(_input("path")) for p in glob.glob(str(_workspace_path(pattern)), recursive=True)]
    if not files:
        level = {"error": "error", "warn": "warning", "ignore": None}[_input("if-no-files-found", "warn")]
        if level:
            print(f"::{level}::No files were found with the provided path: {_input('path')}. No artifacts will be uploaded.")
        sys.exit(1 if level == "error" else 0)
    target = _artifacts() / name
    if target.exists():
        print(f"::error::Failed to CreateArtifact: an artifact with this name already exists on the workflow run: {name}")
        sys.exit(1)
    for src in files:
        _copy(src, target / src.name)
    print(f"Artifact {name} has been successfully uploaded")
    _output(**{"artifact-id": str(abs(hash(name)) % 10_000_000), "artifact-url": f"https://example.invalid/artifacts/{name}"})


def download_artifact() -> None:
    source = _artifacts(_input("run-id") or None)
    name, pattern = _input("name"), _input("pattern")
    dest = _workspace_path(_input("path") or ".")
    merge = _input("merge-multiple", "false") == "true"
    if name:
        if not (source / name).is_dir():
            print(f"::error::Unable to download artifact(s): Artifact not found for name: {name}")
            sys.exit(1)
        _copy(source / name, dest)
        return
    chosen = sorted(a for a in source.iterdir() if fnmatch.fnmatch(a.name, pattern or "*"))
    for artifact in chosen:
        _copy(artifact, dest if merge else dest / artifact.name)
    print(f"Total of {len(chosen)} artifact(s) downloaded")
    _output(**{"download-path": str(dest)})


def configure_aws_credentials() -> None:
    """Records the role asked for (MLCI_TEST_TMP/aws-roles.jsonl: run, job, role, region) and, as if it
    had been assumed, exports the test's S3 credentials (MLCI_TEST_AWS_*) like the real action: masked,
    into the job's environment, and as step outputs with output-credentials."""
    import json

    role, region = _input("role-to-assume"), _input("aws-region")
    if not region:
        print("::error::Input required and not supplied: aws-region")
        sys.exit(1)
    with open(Path(os.environ["MLCI_TEST_TMP"]) / "aws-roles.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"run": os.environ.get("MLCI_TEST_RUN"), "job": os.environ.get("GITHUB_JOB"),
                            "role": role, "region": region,
                            "duration": _input("role-duration-seconds")}) + "\n")
    keys = {
        "AWS_ACCESS_KEY_ID": os.environ["MLCI_TEST_AWS_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": os.environ["MLCI_TEST_AWS_SECRET_ACCESS_KEY"],
        "AWS_SESSION_TOKEN": f"session-for-{role.rsplit('/', 1)[-1]}",
    }
    for value in keys.values():
        print(f"::add-mask::{value}")
    with open(os.environ["GITHUB_ENV"], "a", encoding="utf-8") as f:
        for key, value in {**keys, "AWS_REGION": region, "AWS_DEFAULT_REGION": region}.items():
            f.write(f"{key}={value}\n")
    outputs = {"aws-account-id": "123456789012"}
    if _input("output-credentials") == "true":
        outputs.update({"aws-access-key-id": keys["AWS_ACCESS_KEY_ID"],
                        "aws-secret-access-key": keys["AWS_SECRET_ACCESS_KEY"],
                        "aws-session-token": keys["AWS_SESSION_TOKEN"]})
    _output(**outputs)
    print(f"Assumed role {role}")


if __name__ == "__main__":
    {
        "setup-python": setup_python,
        "cache-restore": cache_restore,
        "cache-save": cache_save,
        "upload-artifact": upload_artifact,
        "download-artifact": download_artifact,
        "configure-aws-credentials": configure_aws_credentials,
    }[sys.argv[1]]()
