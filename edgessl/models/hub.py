"""timm's pretrained weights (`--init timm`, `--teacher timm:NAME`) without the hub's minute of retries offline.

timm fetches its weights from the Hugging Face hub, whose client retries each request five times with back-off and
logs every try: offline, a user waited about 50 s behind a dozen "Retrying in 8s" lines before edgessl's one-line
error. So the hub is probed first (one TCP connection, a few seconds at most); when it cannot be reached only timm's
local cache is tried (the hub client's offline mode), and the client's log lines stay off the screen either way.
Behind a proxy (HTTPS_PROXY / ALL_PROXY set) the probe cannot tell, so the hub is tried as usual.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import timm
from torch import nn

from edgessl.network import PROBE_SECONDS, reachable, url_host


class HubUnreachable(Exception):
    """The hub cannot be reached and the weights are not in the local cache."""


def hub_host() -> tuple[str, int]:
    """(host, port) of the hub timm downloads from (HF_ENDPOINT, else huggingface.co)."""
    from huggingface_hub import constants

    return url_host(constants.ENDPOINT, "huggingface.co")


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Whether a connection to the hub opens (True behind a proxy, where only the proxy can tell; False when the
    hub client is already in offline mode, HF_HUB_OFFLINE=1)."""
    from huggingface_hub import constants

    return not constants.is_offline_mode() and reachable(hub_host(), timeout)


@contextlib.contextmanager
def quiet_hub(offline: bool) -> Iterator[None]:
    """The hub client's log lines hidden (errors still raise), and (offline) its offline mode on: local cache only."""
    from huggingface_hub import constants

    logger = logging.getLogger("huggingface_hub")
    level, was_offline = logger.level, constants.HF_HUB_OFFLINE
    logger.setLevel(logging.ERROR)
    constants.HF_HUB_OFFLINE = was_offline or offline
    try:
        yield
    finally:
        logger.setLevel(level)
        constants.HF_HUB_OFFLINE = was_offline


def create_pretrained(name: str, **kwargs) -> nn.Module:
    """timm.create_model(name, pretrained=True, **kwargs), from timm's cache alone when the hub cannot be reached:
    HubUnreachable when they are not there, else whatever timm raised."""
    online = hub_reachable()
    try:
        with quiet_hub(offline=not online):
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as e:
        if online or (isinstance(e, RuntimeError) and "Unknown model" in str(e)):
            raise
        raise HubUnreachable(f"offline: {hub_host()[0]} cannot be reached, and they are not in timm's cache") from e


def failure(e: Exception) -> str:
    """Why the weights could not be had, for the one-line error: the offline reason, or the exception's type."""
    return str(e) if isinstance(e, HubUnreachable) else f"{type(e).__name__}; offline?"
