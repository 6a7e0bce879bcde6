"""Atomic training checkpoints and exact resume.

A checkpoint is a folder ``checkpoints/step_000123/`` holding

    adapter.safetensors     the trainable weights (tree_flatten of model.trainable_parameters())
    optimizer.safetensors   the optimizer state (moments, step count = schedule position)
    state.json              loop state, data-stream state, config
    COMPLETE                a manifest (file names, sizes), written last

It is written into a hidden temporary folder, every file fsynced, then renamed into
place (rename is atomic on one file system) and the parent fsynced (``mlx_tune.atomic``'s
``temp_dir_beside`` and ``commit_dir``). Only folders named
``step_<digits>`` that hold ``COMPLETE`` and the files it lists count, so a checkpoint
cut by SIGKILL or a full disk is never picked up. The last ``keep`` are kept, and the
best one (``training.best``) whatever its age.

Restoring the model, optimizer, data stream and loop state to step k and running the
same compiled step gives the same per-step losses as never stopping. The random key
needs no saving: the loop re-seeds it from (seed, rank, step) before every step
(``loop.step_key_seed``), which also makes dropout masks independent of when a run
was interrupted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_tune.atomic import commit_dir, fsync_file, temp_dir_beside
from mlx_tune.errors import UserError

STEP_RE = re.compile(r"^step_(\d+)$")
# Hidden folders of a writer: atomic.temp_dir_beside / commit_dir's ``.step_N.tmp-PID`` and
# ``.step_N.old-PID`` (and the ``.tmp-step_N-PID`` / ``.old-step_N-PID`` of earlier versions).
WRITER_RE = re.compile(r"^\.(?:step_\d+\.(?:tmp|old)|tmp|old)-(?:.*-)?(\d+)$")
MARKER = "COMPLETE"
FORMAT = "mlx_tune.training.checkpoint.v1"


def _jsonable(obj: Any) -> Any:
    """Plain JSON data from a data-stream state (numpy arrays and scalars included)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, mx.array):
        return _jsonable(np.array(obj))
    return obj


def _from_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__ndarray__", "dtype"}:
            return np.array(obj["__ndarray__"], dtype=obj["dtype"])
        return {k: _from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_jsonable(v) for v in obj]
    return obj


def checkpoint_steps(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = STEP_RE.match(p.name)
            if m and p.is_dir() and is_complete(p):
                found.append((int(m.group(1)), p))
    return sorted(found)


def is_complete(folder: Path) -> bool:
    """The marker exists and every file it lists is there with its recorded size."""
    try:
        manifest = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        return all((folder / name).stat().st_size == size for name, size in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def latest_checkpoint(root: str | Path) -> Path | None:
    found = checkpoint_steps(root)
    return found[-1][1] if found else None


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizer, state: dict, keep: int = 3,
                    protect: frozenset[int] = frozenset()) -> Path:
    """Write checkpoint ``step`` atomically under ``root`` and prune to the newest ``keep``
    (and the steps in ``protect``: the best one).

    ``state`` is JSON-able data (loop state, data-stream state, config).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:06d}"
    tmp = temp_dir_beside(final)
    try:
        weights = dict(tree_flatten(model.trainable_parameters()))
        opt_state = dict(tree_flatten(optimizer.state))
        mx.save_safetensors(str(tmp / "adapter.safetensors"), weights)
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt_state)
        payload = {"format": FORMAT, "step": step, **_jsonable(state)}
        (tmp / "state.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
        files = {}
        for name in ("adapter.safetensors", "optimizer.safetensors", "state.json"):
            fsync_file(tmp / name)
            files[name] = (tmp / name).stat().st_size
        # The marker goes last: its presence (with matching sizes) is what makes the folder count.
        (tmp / MARKER).write_text(json.dumps({"format": FORMAT, "step": step, "files": files}), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # fsync every file and the folder, rename into place (the same step written again, by a
    # resumed run, is moved aside first and removed after), fsync the parent.
    commit_dir(tmp, final)
    prune(root, keep, protect)
    return final


def prune(root: str | Path, keep: int, protect: frozenset[int] = frozenset()) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints and those of the steps in
    ``protect``, and stale temporary folders."""
    root = Path(root)
    removed = []
    for step, path in checkpoint_steps(root)[:-keep] if keep > 0 else []:
        if step in protect:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for p in root.iterdir() if root.is_dir() else []:
        # Leftovers of a killed writer (another pid): never read, safe to clear.
        m = WRITER_RE.match(p.name)
        if m and int(m.group(1)) != os.getpid():
            shutil.rmtree(p, ignore_errors=True)
    return removed


def load_checkpoint(folder: str | Path, model: nn.Module, optimizer) -> dict:
    """Restore adapter weights and optimizer state from ``folder``;
    returns the saved ``state`` dict (loop state, data-stream state, config).

    Call it before building the compiled step: ``mx.compile`` captures the optimizer's
    state dict, which this replaces.
    """
    load_weights(folder, model)
    optimizer.state = tree_unflatten(list(mx.load(str(Path(folder) / "optimizer.safetensors")).items()))
    mx.eval(model.parameters(), optimizer.state)
    return read_state(folder)


def load_weights(folder: str | Path, model: nn.Module) -> None:
    """Put checkpoint ``folder``'s trainable weights into ``model`` (the optimizer is left alone)."""
    folder = Path(folder)
    if not is_complete(folder):
        raise UserError(f"{folder}: not a complete checkpoint (no {MARKER} marker or a file is missing)")
    weights = mx.load(str(folder / "adapter.safetensors"))
    expected = dict(tree_flatten(model.trainable_parameters()))
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    bad = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or extra or bad:
        what = (missing or extra or bad)[0]
        raise UserError(
            f"{folder}: the checkpoint does not match this model and adapter config "
            f"({len(missing)} missing, {len(extra)} unexpected, {len(bad)} mis-shaped arrays, e.g. {what}); "
            "train.resume needs the same model and lora settings, or start a new output_dir"
        )
    model.update(tree_unflatten(list(weights.items())))
    mx.eval(model.parameters())


def read_state(folder: str | Path) -> dict:
    """A checkpoint's ``state.json`` (loop and data-stream state, config) as saved."""
    return _from_jsonable(json.loads((Path(folder) / "state.json").read_text(encoding="utf-8")))


class CheckpointCallback:
    """Loop callback: save every ``every`` steps, at the end and on Ctrl-C (rank 0 writes).

    ``extra_state()`` returns the JSON-able extras: the data stream's ``state_dict()``
    and the config. Other ranks only keep in step (their data state is their own shard's,
    which they re-derive from the same seed and step).
    """

    def __init__(self, root: str | Path, model: nn.Module, optimizer, every: int, keep: int,
                 extra_state=lambda: {}, rank: int = 0, protect=lambda: frozenset()):
        self.root, self.model, self.optimizer = Path(root), model, optimizer
        self.every, self.keep, self.extra_state, self.rank = every, keep, extra_state, rank
        self.protect = protect  # steps pruning must spare (the best checkpoint)
        self.last_saved: Path | None = None
        self.last_step = -1

    def save(self, loop_state) -> Path | None:
        if self.rank != 0 or loop_state.step == self.last_step:
            return self.last_saved
        loop = {"step": loop_state.step, "bad_steps": loop_state.bad_steps, "trained_tokens": loop_state.trained_tokens}
        self.last_saved = save_checkpoint(self.root, loop_state.step, self.model, self.optimizer,
                                          {"loop": loop, **self.extra_state()}, self.keep, self.protect())
        self.last_step = loop_state.step
        return self.last_saved

    def on_step_end(self, loop_state) -> None:
        if loop_state.step % self.every == 0:
            self.save(loop_state)

    def on_interrupt(self, loop_state) -> None:
        if loop_state.step > 0:
            self.save(loop_state)

    on_train_end = on_interrupt
