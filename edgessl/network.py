"""Whether a server answers before a client library's own minutes of retries: one TCP connection, a few seconds at
most (timm's hub for `--init timm`, an MLflow tracking server for `--logger mlflow`). Behind a proxy (HTTPS_PROXY /
ALL_PROXY set) a direct connection cannot tell, so the server counts as reachable and the client tries as usual."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

PROBE_SECONDS = 3.0  # the connection probe's timeout
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")  # for https; http adds HTTP_PROXY


def url_host(url: str, default_host: str = "") -> tuple[str, int]:
    """(host, port) of an http(s) URL: its port, else 80 for http and 443 for https."""
    parsed = urlparse(url)
    return parsed.hostname or default_host, parsed.port or (80 if parsed.scheme == "http" else 443)


def reachable(host: tuple[str, int], timeout: float = PROBE_SECONDS, scheme: str = "https") -> bool:
    """Whether a connection to (host, port) opens within `timeout` seconds (True behind a proxy for `scheme`)."""
    proxies = PROXY_VARIABLES + (("HTTP_PROXY", "http_proxy") if scheme == "http" else ())
    if any(os.environ.get(v) for v in proxies):
        return True
    try:
        socket.create_connection(host, timeout=timeout).close()
        return True
    except OSError:
        return False
