"""Hugging Face Hub access that fails fast when the hub cannot be reached.

huggingface-hub waits on each request's timeout and retries connection errors, so a
machine without network (or behind a firewall that drops packets) sat for minutes before
an error. ``download(repo_id)`` first asks the hub endpoint for any HTTP answer within
``MLX_TUNE_HUB_TIMEOUT`` seconds (default 1.5; ``HF_ENDPOINT`` and proxy variables are
honoured). With no answer it uses the local cache if the repo is there, else raises one
``ModelLoadError`` naming the repo and suggesting a local path; with ``HF_HUB_OFFLINE=1``
it never touches the network.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from mlx_tune.errors import ModelLoadError

DEFAULT_TIMEOUT_S = 1.5


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def unreachable_reason(timeout: float | None = None) -> str | None:
    """None when the hub endpoint answers (any HTTP status) within ``timeout`` s, else why not.

    One request, no retry: this is the check that keeps a missing network from costing
    huggingface-hub's timeouts and retries.
    """
    if timeout is None:
        try:
            timeout = float(os.environ.get("MLX_TUNE_HUB_TIMEOUT", DEFAULT_TIMEOUT_S))
        except ValueError:
            timeout = DEFAULT_TIMEOUT_S
    request = urllib.request.Request(endpoint() + "/api/whoami-v2", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:  # 401 and friends: the hub is there
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{endpoint()} did not answer within {timeout:g} s ({reason})"


def _not_available(repo_id: str, why: str) -> ModelLoadError:
    return ModelLoadError(f"{repo_id}: cannot download ({why}) and it is not in the local Hugging Face cache; "
                          "give a local model folder or .gguf file as model:, or download it once with network")


def download(repo_id: str, patterns: list[str]) -> Path:
    """The local folder of hub repo ``repo_id`` (``patterns`` files), downloading when reachable."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    def cached() -> Path | None:
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
        except HFValidationError:
            raise
        except Exception:
            return None

    try:
        if offline():
            found = cached()
            if found is None:
                raise _not_available(repo_id, "HF_HUB_OFFLINE=1 is set")
            return found
        why = unreachable_reason()
        if why is not None:
            found = cached()
            if found is None:
                raise _not_available(repo_id, why)
            return found
        try:
            return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=5))
        except HFValidationError:
            raise
        except Exception as exc:  # auth, missing repo, a network that went away: all end the same way
            raise ModelLoadError(
                f"{repo_id}: cannot download ({type(exc).__name__}): the repo does not exist, is gated (log in "
                "with `hf auth login`), or the network failed; check the name or give a local model folder"
            ) from None
    except HFValidationError:
        raise ModelLoadError(f"{repo_id}: not a valid Hugging Face repo id (owner/name) nor an existing path") from None
