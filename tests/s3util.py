"""The real S3 server for tests: scripts/s3-server (a single-node Ceph RadosGW on 127.0.0.1).
Plain functions and a class; the session fixture that starts it is `s3_server` in conftest.

obstore is the S3 client humiofs uses (docs/S3.md); it has no bucket calls by design, so
buckets are made and removed here with boto3, which the test extra brings for that alone."""
from __future__ import annotations

import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import ROOT

SERVER = ROOT / "scripts" / "s3-server"
# A first start on a new machine installs the Ceph packages (~1 minute); the script's own waits
# for each daemon have shorter deadlines.
START_TIMEOUT_S = 900.0
STOP_TIMEOUT_S = 120.0


class S3ServerError(Exception):
    """scripts/s3-server failed; the message carries its exit code and output."""


@dataclass(frozen=True)
class S3Server:
    """A running server: the settings a client needs, and whether this session started it
    (a server that was already running is left running)."""
    settings: dict[str, str]
    started_here: bool

    @property
    def endpoint(self) -> str:
        return self.settings["AWS_ENDPOINT_URL"]

    def env(self) -> dict[str, str]:
        """os.environ with this server's AWS_* settings."""
        return {**os.environ, **self.settings}

    def store(self, bucket: str, **config: Any) -> Any:
        """An obstore S3Store for BUCKET on this server (path-style, plain http)."""
        from obstore.store import S3Store
        return S3Store(bucket, endpoint=self.endpoint,
                       access_key_id=self.settings["AWS_ACCESS_KEY_ID"],
                       secret_access_key=self.settings["AWS_SECRET_ACCESS_KEY"],
                       region=self.settings["AWS_REGION"],
                       client_options={"allow_http": True, "timeout": "30s"}, **config)

    def admin(self) -> Any:
        """A boto3 client, for bucket administration only."""
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=self.endpoint,
                            aws_access_key_id=self.settings["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.settings["AWS_SECRET_ACCESS_KEY"],
                            region_name=self.settings["AWS_REGION"],
                            config=Config(s3={"addressing_style": "path"}))

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:20]}"
        self.admin().create_bucket(Bucket=name)
        return name

    def remove_bucket(self, name: str) -> None:
        """Deletes every object of bucket NAME, then the bucket."""
        s3 = self.admin()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                s3.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        s3.delete_bucket(Bucket=name)


def server_command(command: str, env: dict[str, str] | None = None,
                   timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Runs `scripts/s3-server COMMAND`; never raises on its exit code."""
    try:
        return subprocess.run([str(SERVER), command], capture_output=True, text=True,
                              timeout=timeout, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise S3ServerError(f"scripts/s3-server {command} did not finish in {timeout:.0f} s"
                            ) from e


def parse_settings(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


def start_server(env: dict[str, str] | None = None) -> S3Server:
    """The running server of this checkout, or a new one. Raises S3ServerError."""
    res = server_command("env", env)
    started = res.returncode != 0
    if started:
        res = server_command("start", env)
        if res.returncode != 0:
            raise S3ServerError(f"scripts/s3-server start failed (exit {res.returncode}):\n"
                                f"{res.stderr.rstrip()}")
    settings = parse_settings(res.stdout)
    if "AWS_ENDPOINT_URL" not in settings:
        raise S3ServerError(f"scripts/s3-server printed no AWS_ENDPOINT_URL:\n{res.stdout}")
    return S3Server(settings, started)


def stop_server(env: dict[str, str] | None = None) -> None:
    res = server_command("stop", env, STOP_TIMEOUT_S)
    if res.returncode != 0:
        raise S3ServerError(f"scripts/s3-server stop failed (exit {res.returncode}):\n"
                            f"{res.stderr.rstrip()}")


def processes_using(path: Path) -> list[int]:
    """PIDs of live processes with PATH among their arguments (e.g. a server's ceph.conf)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if os.fsencode(path) in args and state not in ("Z", "X"):
            found.append(int(entry.name))
    return found
