"""What the server can answer with: one base model and named adapters on it.

The base weights are loaded once; adapters are ``LoRALinear`` entries on the same
layers (``mlx_tune.adapters.manager.AdapterManager``), so picking one per request is a name
switch, never a copy of the base. At most ``max_loras`` adapters are resident: when
another is needed the least recently used one not serving a request is unloaded, and
reloaded from its folder when asked for again. Adapters over ``max_lora_rank`` or made
for another base are refused with the reason; run-time loads (``POST /v1/adapters``)
must name a folder inside ``adapters_root``.

``lock`` guards the model's set of adapters: the engine holds it while it computes,
loads and unloads hold it while they change the layers.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

from mlx_tune.adapters.files import read_adapter_template
from mlx_tune.adapters.inject import wrappers
from mlx_tune.adapters.manager import AdapterManager
from mlx_tune.adapters.peft import read_adapter
from mlx_tune.errors import UserError
from mlx_tune.server.errors import ApiError, not_found
from mlx_tune.server.mixing import ROUTE, install, mixable

BASE_NAME = "base"


@dataclass
class AdapterEntry:
    name: str
    path: str
    rank: int | None
    created: int
    chat_template: str | None = None  # the template the adapter was trained with, when it carries one


class ModelRegistry:
    def __init__(self, model, tokenizer, info=None, *, adapters_root: str | None = None, max_loras: int = 8,
                 max_lora_rank: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.source = str(getattr(info, "source", None) or "model")
        self.base_names = [BASE_NAME] + ([self.source] if self.source != BASE_NAME else [])
        self.adapters_root = Path(adapters_root).expanduser().resolve() if adapters_root else None
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.created = int(time.time())
        self.lock = threading.RLock()
        self.manager = AdapterManager(model)
        self.entries: dict[str, AdapterEntry] = {}
        self.resident: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.busy: Counter[str] = Counter()  # adapter -> requests being computed with it
        self._wrappers = [w for _, w in wrappers(model)]

    # -- names ------------------------------------------------------------------------
    def resolve(self, model_name: str) -> str | None:
        """The adapter a request's ``model`` names, or None for the base; 404 otherwise."""
        if model_name in self.base_names:
            return None
        if model_name in self.entries:
            return model_name
        raise not_found(f"model '{model_name}' does not exist; served: {', '.join(self.model_names())}",
                        param="model", code="model_not_found")

    def chat_template(self, model_name: str) -> str | None:
        """The chat template ``model_name``'s adapter was trained with (None: the tokenizer's own)."""
        adapter = self.resolve(model_name)
        return self.entries[adapter].chat_template if adapter is not None else None

    def model_names(self) -> list[str]:
        return self.base_names + sorted(self.entries)

    # -- loading ----------------------------------------------------------------------
    def resolve_path(self, path: str) -> Path:
        """``path`` inside the adapters root (relative paths are taken from the root)."""
        if self.adapters_root is None:
            raise ApiError(403, "loading adapters at run time is off; start the server with --adapters-root DIR",
                           param="path", code="adapters_root_not_set")
        given = Path(path).expanduser()
        candidate = (given if given.is_absolute() else self.adapters_root / given).resolve()
        if candidate != self.adapters_root and self.adapters_root not in candidate.parents:
            raise ApiError(403, f"path '{path}' is outside the adapters root {self.adapters_root}", param="path",
                           code="path_outside_root")
        return candidate

    def add(self, name: str, path: str | Path, *, trusted: bool = False) -> AdapterEntry:
        """Register and load adapter ``name``; ``trusted`` paths (the command line) skip the root check."""
        if name in self.base_names:
            raise ApiError(409, f"'{name}' is the base model's name; pick another adapter name", param="name",
                           code="name_taken")
        if name in self.entries:
            raise ApiError(409, f"adapter '{name}' is already loaded (from {self.entries[name].path}); "
                           "DELETE /v1/adapters/{name} first", param="name", code="name_taken")
        folder = Path(path).expanduser().resolve() if trusted else self.resolve_path(str(path))
        if not folder.exists():
            raise not_found(f"adapter folder '{path}' does not exist", param="path", code="adapter_not_found")
        rank = self._check_rank(folder)
        try:
            template = read_adapter_template(folder)
        except UserError as exc:
            raise ApiError(400, str(exc), param="path", code="bad_adapter") from None
        entry = AdapterEntry(name, str(folder), rank, int(time.time()), template)
        with self.lock:
            self.entries[name] = entry
            try:
                self._make_resident(name)
            except BaseException:
                del self.entries[name]
                raise
        return entry

    def add_resident(self, name: str) -> AdapterEntry:
        """Serve adapter ``name`` that is already in the model (trained in this process).

        It has no folder to reload from, so it is never evicted.
        """
        if not any(name in w.adapters for w in self._wrappers):
            raise ValueError(f"the model holds no adapter {name!r}")
        entry = AdapterEntry(name, "", None, int(time.time()))
        with self.lock:
            self.entries[name] = entry
            self.resident[name] = None
        return entry

    def _check_rank(self, folder: Path) -> int | None:
        try:
            config, _, _ = read_adapter(folder)
        except UserError as exc:
            raise ApiError(400, str(exc), param="path", code="bad_adapter") from None
        rank = config.get("rank")
        if isinstance(rank, int) and rank > self.max_lora_rank:
            raise ApiError(400, f"adapter at {folder} has rank {rank}, above this server's max_lora_rank "
                           f"{self.max_lora_rank}; restart with --max-lora-rank {rank} or use a smaller adapter",
                           param="path", code="rank_too_large")
        return rank if isinstance(rank, int) else None

    def remove(self, name: str) -> AdapterEntry:
        with self.lock:
            entry = self.entries.get(name)
            if entry is None:
                raise not_found(f"adapter '{name}' is not loaded; loaded: {', '.join(sorted(self.entries)) or 'none'}",
                                param="name", code="adapter_not_found")
            if self.busy[name]:
                raise ApiError(409, f"adapter '{name}' is answering {self.busy[name]} request(s); try again when "
                               "they finish", param="name", code="adapter_busy")
            if name in self.resident:
                self._unload(name)
            del self.entries[name]
            return entry

    def _unload(self, name: str) -> None:
        self.manager.remove(name)
        del self.resident[name]
        self._wrappers = [w for _, w in wrappers(self.model)]

    def _make_resident(self, name: str) -> None:
        """Load ``name`` if it is not in the model, evicting the LRU idle adapter when full."""
        if name in self.resident:
            self.resident.move_to_end(name)
            return
        while len(self.resident) >= self.max_loras:
            idle = next((n for n in self.resident if not self.busy[n] and self.entries[n].path), None)
            if idle is None:
                raise ApiError(429, f"all {self.max_loras} resident adapters are serving requests (max_loras); "
                               "retry shortly", code="adapters_busy", headers={"Retry-After": "1"})
            self._unload(idle)
        try:
            self.manager.add(name, self.entries[name].path)
        except UserError as exc:
            raise ApiError(400, str(exc), param="path", code="adapter_does_not_fit") from None
        self.resident[name] = None
        self._wrappers = [w for _, w in wrappers(self.model)]

    # -- used by the engine (holding ``lock``) -------------------------------------------
    def acquire(self, name: str | None) -> None:
        """Mark ``name`` as serving one more request; reload it if it was evicted."""
        if name is None:
            return
        with self.lock:
            if name not in self.entries:
                raise not_found(f"adapter '{name}' was unloaded", param="model", code="model_not_found")
            self._make_resident(name)
            self.busy[name] += 1

    def release(self, name: str | None) -> None:
        if name is None:
            return
        with self.lock:
            self.busy[name] -= 1
            if self.busy[name] <= 0:
                del self.busy[name]

    def activate(self, name: str | None) -> None:
        """Every adapted layer uses adapter ``name`` (None: the base alone)."""
        if self.manager.active != name:
            self.manager.activate(name)

    def activate_rows(self, route) -> None:
        """Every adapted layer uses the adapter each row asks for (``mixing``)."""
        install(self._wrappers, route)
        self.manager.active = ROUTE

    def mixable(self, name: str | None) -> bool:
        return mixable(self._wrappers, name)
