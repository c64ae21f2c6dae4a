"""A DVC S3 remote round trip: `dvc push` to an S3 bucket, a fresh `git clone`, `dvc pull`, identical files.

The bucket is served by moto's server (``python -m moto.server``), a local S3-compatible server on 127.0.0.1:
no network and no AWS account are needed (the credentials are moto's dummy ``testing`` ones). A tiny git +
DVC repository in a temporary folder tracks a file and a directory; it is pushed to ``s3://BUCKET/store``
(``dvc remote modify store endpointurl``, as for MinIO or any S3-compatible store), and the checks are:
every object of the local cache is in the bucket under the remote's prefix, and nothing else; a fresh clone
has none of the data until ``dvc pull`` brings every file back with the original sha256; and ``dvc status``
is clean in both repositories. This is the round trip the README's "A remote store (S3)" describes.

The environment of the subprocesses (AWS credentials, git identity, DVC's config dirs) is a dict passed to
them: ``os.environ`` is not changed, so nothing leaks into other tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("moto", reason="moto[server] is not installed (it is in the test extra)")
boto3 = pytest.importorskip("boto3", reason="boto3 is not installed (moto[server] and dvc-s3 bring it)")
pytest.importorskip("dvc_s3", reason="dvc-s3 is not installed (`pip install -e .[s3]`)")

BUCKET = "erc-remote-test"
PREFIX = "store"
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}
DVC = [sys.executable, "-m", "dvc"]
STARTUP_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _env(home: Path) -> dict[str, str]:
    """This process's environment plus the dummy AWS credentials, a git identity and DVC settings, with
    every AWS / DVC setting of the machine (profiles, config files, global DVC config) kept out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_"))}
    env.update(
        AWS_ACCESS_KEY_ID=CREDENTIALS["aws_access_key_id"],
        AWS_SECRET_ACCESS_KEY=CREDENTIALS["aws_secret_access_key"],
        AWS_DEFAULT_REGION=CREDENTIALS["region_name"],
        AWS_CONFIG_FILE=str(home / "aws-config"),  # absent: no profile of the machine applies
        AWS_SHARED_CREDENTIALS_FILE=str(home / "aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
        DVC_NO_ANALYTICS="1",
        DVC_GLOBAL_CONFIG_DIR=str(home / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(home / "dvc-system"),
        DVC_SITE_CACHE_DIR=str(home / "dvc-site-cache"),
        GIT_AUTHOR_NAME="test",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="test",
        GIT_COMMITTER_EMAIL="t@example.com",
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=str(home / "gitconfig"),
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    env.pop("HTTP_PROXY", None)
    env.pop("HTTPS_PROXY", None)
    env.pop("http_proxy", None)
    env.pop("https_proxy", None)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    assert result.returncode == 0, (
        f"`{' '.join(args[2:] if args[:2] == DVC[:2] else args)}` in {cwd} failed ({result.returncode}):\n"
        f"stdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-6000:]}"
    )
    return result


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path, paths: list[str]) -> dict[str, str]:
    """sha256 of every file under the given paths (files or directories), by path relative to root."""
    hashes = {}
    for rel in paths:
        path = root / rel
        for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            hashes[file.relative_to(root).as_posix()] = _sha256(file)
    return hashes


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3-compatible server on a free local port, with an empty bucket; stopped (by its PID) at the end.

    Yields (endpoint URL, boto3 client, environment for the subprocesses)."""
    home = tmp_path_factory.mktemp("remote-home")
    log_path = home / "moto_server.log"
    proc = None
    for _attempt in range(3):  # the free port can be taken between the probe and moto's bind: retry
        port = _free_port()
        endpoint = f"http://127.0.0.1:{port}"
        env = _env(home)
        with open(log_path, "wb") as log:  # a file, not a pipe: moto logs every request and a full pipe blocks it
            proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while proc.poll() is None and not _answers(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None and _answers(port):
            break
        _stop(proc)
        if time.monotonic() >= deadline:
            pytest.fail(
                f"moto_server did not answer on 127.0.0.1:{port} within {STARTUP_TIMEOUT_S:.0f} s; its output:\n"
                f"{log_path.read_text(errors='replace')[-4000:]}",
                pytrace=False,
            )
    else:
        pytest.fail(
            f"moto_server exited at startup three times (exit code {proc.returncode}); its output:\n"
            f"{log_path.read_text(errors='replace')[-4000:]}",
            pytrace=False,
        )
    try:
        client = boto3.client("s3", endpoint_url=endpoint, **CREDENTIALS)
        client.create_bucket(Bucket=BUCKET)
        yield endpoint, client, env
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def pushed(s3, tmp_path_factory):
    """A git + DVC repository tracking a file and a directory, its remote `store` in the bucket, pushed.

    Yields (repository, sha256 of every tracked data file, the `dvc push` output)."""
    endpoint, _client, env = s3
    repo = tmp_path_factory.mktemp("remote") / "origin"
    repo.mkdir()
    _run(["git", "init", "-q", "-b", "main"], repo, env)
    _run([*DVC, "init", "-q"], repo, env)
    data = repo / "data"
    (data / "clips").mkdir(parents=True)
    (data / "features.bin").write_bytes(os.urandom(4096))
    for i in range(3):
        (data / "clips" / f"clip{i}.bin").write_bytes(os.urandom(1024 * (i + 1)))
    outputs = ["data/features.bin", "data/clips"]
    _run([*DVC, "add", *outputs], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-q", "-m", "track data with dvc"], repo, env)
    _run([*DVC, "remote", "add", "-d", "store", f"s3://{BUCKET}/{PREFIX}"], repo, env)
    _run([*DVC, "remote", "modify", "store", "endpointurl", endpoint], repo, env)
    _run(["git", "add", ".dvc/config"], repo, env)
    _run(["git", "commit", "-q", "-m", "add the S3 remote"], repo, env)
    push = _run([*DVC, "push"], repo, env)
    yield repo, _files(repo, outputs), push.stdout + push.stderr


def test_push_uploads_every_cache_object(s3, pushed):
    _endpoint, client, env = s3
    repo, hashes, output = pushed
    assert len(hashes) == 4
    cache = repo / ".dvc" / "cache"
    local = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file())
    # 4 files, and the directory's listing (a .dir object)
    assert len(local) == 5 and sum(name.endswith(".dir") for name in local) == 1, local
    assert "5 files pushed" in output, output
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{PREFIX}/"):
        keys += [obj["Key"] for obj in page.get("Contents", [])]
    assert sorted(key.removeprefix(f"{PREFIX}/") for key in keys) == local
    status = _run([*DVC, "status", "--cloud", "--json"], repo, env)
    assert json.loads(status.stdout) == {}, status.stdout


def test_clone_and_pull_restore_identical_files(s3, pushed, tmp_path):
    _endpoint, _client, env = s3
    repo, hashes, _output = pushed
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(repo), str(clone)], tmp_path, env)
    assert not any((clone / path).exists() for path in hashes), "the data is not in git"
    assert not (clone / ".dvc" / "cache").exists()
    pull = _run([*DVC, "pull"], clone, env)
    assert _files(clone, ["data/features.bin", "data/clips"]) == hashes, pull.stdout + pull.stderr
    status = _run([*DVC, "status", "--json"], clone, env)
    assert json.loads(status.stdout) == {}, status.stdout
