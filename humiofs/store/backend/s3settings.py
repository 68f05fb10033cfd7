"""The settings of stores on object storage: BACKUP_DIR's `s3://BUCKET/PREFIX`, the AWS_*
settings, and the client's timeouts and retries (docs/S3.md, "Settings, errors and retries").
No I/O: config.py checks them before any request."""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

# Requests: a connection must be made in CONNECT_S and a whole request (a part of a pack, a
# ranged read) done in REQUEST_S. A failed request (5xx, refused or dropped connection,
# timeout) is tried again at most RETRIES times and not after RETRY_WINDOW_S, after waits
# drawn by obstore's jittered backoff: the first BACKOFF_S, each next one between BACKOFF_S
# and twice the previous, at most MAX_BACKOFF_S. A server that is down is reported after 3 to
# about 14 s, typically 6 s (a restarting service is ridden out); one that hangs after at most
# RETRY_WINDOW_S + REQUEST_S = 50 s.
CONNECT_S = 5
REQUEST_S = 20
RETRIES = 6
BACKOFF_S = 0.5
MAX_BACKOFF_S = 4
RETRY_WINDOW_S = 30
SETTINGS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ALLOW_HTTP")


@dataclass(frozen=True)
class S3Settings:
    """Where the S3 service is and who we are there, from the AWS_* settings. The secret is
    kept out of repr (and so out of logs and tracebacks)."""
    endpoint: str | None
    access_key_id: str | None
    secret_access_key: str | None = field(repr=False)
    region: str = "us-east-1"
    allow_http: bool = False
    session_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> S3Settings:
        """Reads AWS_ENDPOINT_URL (none: AWS itself), AWS_ACCESS_KEY_ID,
        AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN (temporary credentials), AWS_REGION (else
        AWS_DEFAULT_REGION, else us-east-1) and AWS_ALLOW_HTTP (true/false; an http://
        endpoint on a loopback address is allowed without it). ValueError with one line for
        a bad value."""
        for name in SETTINGS:
            value = env.get(name) or ""
            bad = next((i for i, c in enumerate(value) if not "!" <= c <= "~"), None)
            if bad is not None:
                # Request headers and URLs carry these: visible ASCII only (obstore panics on
                # a control character). The value itself may be a secret: not shown.
                raise ValueError(f"{name} may hold only visible ASCII characters (no blanks or "
                                 f"control characters); character {bad + 1} is "
                                 f"{'U+%04X' % ord(value[bad])}")
        endpoint = env.get("AWS_ENDPOINT_URL") or None
        allow = env.get("AWS_ALLOW_HTTP", "").strip().lower()
        if allow not in ("", "true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"AWS_ALLOW_HTTP must be true or false, not {allow!r}")
        allow_http = allow in ("true", "1", "yes")
        if endpoint is not None:
            m = re.match(r"^(https?)://([^/:]+|\[[^]]+\])(:\d+)?/?$", endpoint)
            if not m:
                raise ValueError(f"AWS_ENDPOINT_URL must look like https://HOST[:PORT] (no "
                                 f"user or password, no path), not {redact(endpoint)!r}")
            if m.group(1) == "http" and not allow_http:
                if m.group(2) not in ("127.0.0.1", "localhost", "[::1]"):
                    raise ValueError(f"AWS_ENDPOINT_URL {endpoint} is plain http, which shows "
                                     "object names and sizes on the network: use https, or set "
                                     "AWS_ALLOW_HTTP=true")
                allow_http = True
        return cls(endpoint, env.get("AWS_ACCESS_KEY_ID") or None,
                   env.get("AWS_SECRET_ACCESS_KEY") or None,
                   env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
                   allow_http, env.get("AWS_SESSION_TOKEN") or None)


def redact(url: str) -> str:
    """`url` with the password of a `user:password@` in it replaced by `***`."""
    return re.sub(r"^([A-Za-z0-9+.-]*://[^/@:]*):[^/@]*@", r"\1:***@", url)


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://BUCKET[/PREFIX]`; the prefix has no leading or trailing `/`.
    ValueError with one line if it is not such a URL."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme != "s3" and scheme.lower() == "s3":
        raise ValueError(f"{url!r}: the scheme is written s3:// (lower case), not {scheme}://")
    m = re.match(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(/.*)?$", url)
    if not m:
        raise ValueError(f"{url!r} is not s3://BUCKET/PREFIX (a bucket name is 3-63 lower-case "
                         "letters, digits, dots and hyphens)")
    prefix = (m.group(2) or "").removeprefix("/").removesuffix("/")
    parts = prefix.split("/") if prefix else []
    if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise ValueError(f"{url!r}: the prefix may not have empty, '.' or '..' parts, or parts "
                         "starting with '.'")
    return m.group(1), prefix
