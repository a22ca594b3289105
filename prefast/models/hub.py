"""Pretrained weights from where the libraries keep them (``--pretrained``).

torchvision's from the torch hub cache (``$TORCH_HOME/hub/checkpoints``), timm's from
the Hugging Face cache (the files timm itself would load, found by timm's own rules) or
the torch hub cache for its few weights published only by URL. Absent and offline: one
line naming what to fetch and where, within seconds. Every network wait has a bound:

- the "is it online?" probe: name resolution and connection together, ``PROBE_SECONDS``
  (``getaddrinfo`` cannot be interrupted, so it runs in a thread the probe stops waiting
  for);
- a download through urllib (torchvision's, and timm's URL weights), which sets no
  timeout of its own: ``DOWNLOAD_STALL_SECONDS`` without a byte, as the socket default
  while it runs;
- a download from the Hugging Face hub: huggingface_hub bounds it itself (10 s for the
  metadata request, ``HF_HUB_ETAG_TIMEOUT``, and 10 s without a byte,
  ``HF_HUB_DOWNLOAD_TIMEOUT``; tests/test_pretrained.py checks it against a stalled
  server).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from urllib.parse import urlparse

from prefast.errors import ConfigError

PROBE_SECONDS = 3.0
DOWNLOAD_STALL_SECONDS = 60.0


def online(host: str, port: int = 443, seconds: float = PROBE_SECONDS) -> bool:
    """Whether ``host`` answers on ``port`` within ``seconds``, name resolution included
    (no hanging on a dead network or a dead resolver)."""
    import socket

    answered: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=seconds).close()
            answered.append(True)
        except Exception:  # OSError, or whatever a patched resolver raises: not online
            answered.append(False)

    thread = threading.Thread(target=probe, name="prefast-online-probe", daemon=True)
    thread.start()
    thread.join(seconds)
    return bool(answered and answered[0])


def reachable(url: str) -> bool:
    """Whether a download from ``url`` may work: behind a proxy we cannot probe it (and
    assume so); otherwise its host must answer within seconds."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return True
    parts = urlparse(url)
    port = parts.port or (80 if parts.scheme == "http" else 443)
    return online(parts.hostname or "", port)


NETWORK_LIBRARIES = ("httpx", "httpx2", "huggingface_hub", "requests", "urllib3")


@contextlib.contextmanager
def bounded_download(label: str, source: str) -> Iterator[None]:
    """A download from ``source`` that stalls is stopped (urllib sets no timeout: the
    socket default is ``DOWNLOAD_STALL_SECONDS`` while it runs), and a network failure is
    said in one line; huggingface_hub's own retry warnings are kept out of the log (the
    line says what they would)."""
    import logging
    import socket

    previous = socket.getdefaulttimeout()
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    socket.setdefaulttimeout(DOWNLOAD_STALL_SECONDS)
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    except Exception as err:
        library = type(err).__module__.split(".")[0]
        if not isinstance(err, OSError) and library not in NETWORK_LIBRARIES:
            raise
        text = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")[:160]
        stalled = isinstance(err, TimeoutError) or "timed out" in text.lower()
        why = f"{type(err).__name__}: {text}" + ("; the server stopped sending" if stalled else "")
        raise ConfigError(
            f"{label}: the download of {source} failed ({why}): try again, or download it "
            "elsewhere and pass --weights PATH"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
        hub_log.setLevel(level)


def torchvision_pretrained(name: str) -> dict:
    """torchvision's default weights for ``name``, through its own loading: from the torch
    hub cache (``$TORCH_HOME/hub/checkpoints``), downloaded when absent and online; absent
    and offline, one line naming the file and where to put it."""
    import torch
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT  # type: ignore[attr-defined]
    except (ValueError, AttributeError):
        raise ConfigError(f"--pretrained: torchvision has no weights for {name}") from None
    url = weights.url
    file = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))
    if not os.path.exists(file) and not reachable(url):
        raise ConfigError(
            f"--pretrained torchvision:{name}: {file} is not there and {url} cannot be reached "
            f"(offline?): download it elsewhere and put it at {file} (or set TORCH_HOME), or "
            "pass --weights PATH"
        )
    with bounded_download(f"--pretrained torchvision:{name}", url):
        return weights.get_state_dict(progress=False, check_hash=False)


def hf_hub_cache() -> str:
    """The Hugging Face hub cache as the environment names it now, in huggingface_hub's
    order (``HF_HUB_CACHE``, the older ``HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``,
    ``$XDG_CACHE_HOME/huggingface/hub``, ``~/.cache/huggingface/hub``); read at each call,
    not at import as huggingface_hub's constants are."""
    env = os.environ
    xdg = env.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    home = env.get("HF_HOME", os.path.join(xdg, "huggingface"))
    hub = env.get("HF_HUB_CACHE", env.get("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")))
    return os.path.expanduser(os.path.expandvars(hub))


def timm_weight_source(name: str) -> tuple[str, str, list[str]]:
    """Where timm's ``create_model(name, pretrained=True)`` loads from, by timm's own
    rules (``timm.models._builder._resolve_pretrained_source`` and, for the hub, the
    safetensors alternatives ``timm.models._hub._get_safe_alternatives`` names first):
    ``("hf-hub", repo with its @revision, [filenames in the order timm tries them])`` or
    ``("url", url, [])``."""
    from timm.models import get_pretrained_cfg
    from timm.models._builder import _resolve_pretrained_source
    from timm.models._hub import HF_WEIGHTS_NAME, _get_safe_alternatives

    cfg = get_pretrained_cfg(name)
    where, location = _resolve_pretrained_source(cfg.to_dict()) if cfg else ("", "")
    if where == "hf-hub":
        repo, filename = location if isinstance(location, tuple) else (location, HF_WEIGHTS_NAME)
        if filename.endswith(".safetensors") or (cfg and cfg.custom_load == "hf"):
            return "hf-hub", repo, [filename]
        return "hf-hub", repo, [*_get_safe_alternatives(filename), filename]
    if where == "url":
        return "url", str(location), []
    raise ConfigError(f"--pretrained: timm has no published weights for {name}")


def hf_hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def timm_pretrained_file(name: str) -> str | None:
    """The file timm would load for ``name``'s pretrained tag, where it is kept (the
    Hugging Face cache, or the torch hub cache for weights published by URL); None when
    it is not there and the source answers (timm then downloads it as it always does);
    absent and offline, one line naming what to fetch and where."""
    import torch

    where, location, filenames = timm_weight_source(name)
    if where == "url":
        file = os.path.join(
            torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(location).path)
        )
        if os.path.exists(file):
            return file
        if reachable(location):
            return None
        raise ConfigError(
            f"--pretrained timm:{name}: {file} is not there and {location} cannot be reached "
            f"(offline?): download it elsewhere and put it at {file} (or set TORCH_HOME), or "
            "pass --weights PATH"
        )
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models._hub import hf_split

    repo, revision = hf_split(location)
    cache = hf_hub_cache()
    for filename in filenames:  # in timm's order
        found = try_to_load_from_cache(repo, filename, cache_dir=cache, revision=revision)
        if isinstance(found, str):
            return found
    offline = hf_hub_offline()
    if offline or not reachable(constants.ENDPOINT):
        host = urlparse(constants.ENDPOINT).hostname
        why = (
            "HF_HUB_OFFLINE is set (unset it to let timm download it)"
            if offline
            else f"{host} cannot be reached (offline?)"
        )
        raise ConfigError(
            f"--pretrained timm:{name}: {repo} is not in the Hugging Face cache {cache} and "
            f"{why}: run `hf download {repo}` where there is a network and copy that cache "
            "here (or set HF_HUB_CACHE), or pass --weights PATH"
        )
    return None
