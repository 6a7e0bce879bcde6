"""Paths a studio request names, confined to the configured folders.

A request gives a path relative to one of the roots (the runs folder, the adapters root,
the served config's data folder). It is refused, 403, when it is absolute, climbs with
``..``, or resolves (symlinks followed) to a place outside that root; a path that does
not exist is a 404. Only the resolved path is ever opened.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from mlx_tune.server.errors import ApiError


def resolved_root(path: str | Path | None) -> Path | None:
    return Path(path).expanduser().resolve() if path else None


def confine(root: Path, relative: str, *, param: str = "path") -> Path:
    """``root / relative`` resolved, or a 403 naming why it is outside ``root``."""
    rel = relative.replace("\\", "/")
    parts = PurePosixPath(rel).parts
    if "\x00" in rel or rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        raise ApiError(403, f"{param} '{relative}': give a path relative to {root}", param=param,
                       code="path_outside_root")
    if ".." in parts:
        raise ApiError(403, f"{param} '{relative}': '..' is not allowed", param=param, code="path_outside_root")
    candidate = (root / rel).resolve()
    if candidate != root and root not in candidate.parents:
        raise ApiError(403, f"{param} '{relative}' leads outside {root}", param=param, code="path_outside_root")
    if not candidate.exists():
        raise ApiError(404, f"{param} '{relative}': not found under {root}", param=param, code="not_found")
    return candidate


def inside(root: Path, path: Path) -> bool:
    """Whether ``path`` (symlinks followed) lies in ``root``: files found by walking a root."""
    real = path.resolve()
    return real == root or root in real.parents
