"""LoRA adapters inside one engine replica: the declared ones at start, run-time ones kept in step
with the cluster's adapter book, and what the replica reports about them.

vLLM names an adapter by the request's `model` (OpenAIServingModels.lora_requests); the engine
core keeps up to max_cpu_loras of them loaded in memory and up to max_loras in the slots a batch
may use. The replica reports the names it can serve (routers send an adapter only there) and the
ones resident in the core's memory now, `engine.list_loras()` (the replica policy prefers those: a
request for another one first loads it from disk; a slot is then filled from memory). vLLM does not
report which adapters sit in the batch slots.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any

from serving.config import AdapterSpec, ServingConfig
from serving.protocol.adapter_book import RuntimeAdapter, follow_book

logger = logging.getLogger("serving.engine")

# vLLM's allowed max_lora_rank values (vllm.config.lora.MaxLoRARanks), smallest first
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_rank(folder: Path) -> int:
    """The largest LoRA rank in a PEFT adapter folder (`r`, or any per-module `rank_pattern`)."""
    config = json.loads((folder / "adapter_config.json").read_text())
    ranks = [int(config.get("r") or 0)] + [int(r) for r in (config.get("rank_pattern") or {}).values()]
    return max(ranks)


def max_lora_rank(ranks: list[int]) -> int:
    """The smallest rank vLLM accepts that holds every adapter's."""
    need = max(ranks, default=1)
    for allowed in LORA_RANKS:
        if allowed >= need:
            return allowed
    raise ValueError(f"an adapter has rank {need}; vLLM serves ranks up to {LORA_RANKS[-1]}")


class AdapterSync:
    """Keeps a replica's vLLM adapters equal to models.yaml's plus the book's for its model.

    Removal waits for the requests using an adapter to finish: its name goes at once (no new
    request can name it), its weights leave the engine core when the last one ends."""

    def __init__(self, base: str, models: Any, engine: Any, declared: dict[str, Path], slots: int, capacity: int,
                 book: Any = None, provision=None):
        self.base = base
        self.models = models  # vLLM's OpenAIServingModels of this replica's app
        self.engine = engine
        self.declared = declared  # name -> folder, loaded by vLLM at start (lora_modules)
        self.slots = slots  # max_loras
        self.capacity = capacity  # max_cpu_loras: adapters kept loaded in the engine core's memory (LRU)
        self.book = book  # the AdapterBook actor handle; None: no run-time adapters
        self.provision = provision  # AdapterSpec -> Path (serving.engine.provision.provision_adapter)
        self.version = -1
        self.runtime: dict[str, Path] = {}  # name -> folder of each loaded run-time adapter
        self.errors: dict[str, str] = {}  # name -> why it could not be loaded (reported to the router)
        self.inflight: Counter[str] = Counter()
        self.removing: dict[str, int] = {}  # name -> vLLM lora id, waiting for its requests to end
        self.resident: list[str] = []

    # --- what the replica reports ---------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """The adapter fields of this replica's RoutingStats."""
        return {"adapters": [*self.declared, *self.runtime], "resident_adapters": list(self.resident),
                "adapter_slots": self.slots, "adapter_capacity": self.capacity, "adapter_errors": dict(self.errors)}

    # --- requests -----------------------------------------------------------------------

    def begin(self, adapter: str) -> None:
        self.inflight[adapter] += 1

    def end(self, adapter: str) -> None:
        self.inflight[adapter] -= 1
        if self.inflight[adapter] <= 0:
            del self.inflight[adapter]

    # --- keeping in step ------------------------------------------------------------------

    async def run(self, interval_s: float) -> None:
        await follow_book(self.sync, interval_s,
                          lambda error: logger.warning("adapter sync of %s failed: %r", self.base, error))

    async def sync(self) -> None:
        if self.book is not None:
            read = await self.book.read.remote(self.version)
            if read is not None:
                self.version, entries = read
                await self._apply({e.spec.name: e for e in entries if e.base == self.base})
        await self._finish_removals()
        loaded = await self.engine.list_loras()
        names = {request.lora_int_id: name for name, request in self.models.lora_requests.items()}
        self.resident = sorted(names[i] for i in loaded if i in names)

    async def _apply(self, wanted: dict[str, RuntimeAdapter]) -> None:
        for name in [n for n in self.runtime if n not in wanted]:
            await self._unload(name)
        for name in [n for n in self.errors if n not in wanted]:
            del self.errors[name]
        for name, entry in wanted.items():
            if name in self.declared:
                continue
            try:
                folder = await asyncio.to_thread(self.provision, entry.spec)
            except Exception as error:
                self.errors[name] = f"cannot provision {entry.spec.source.describe()}: {error}"
                continue
            if self.runtime.get(name) == folder:
                continue
            await self._load(name, folder, in_place=name in self.runtime)

    async def _load(self, name: str, folder: Path, in_place: bool) -> None:
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        started = time.perf_counter()
        result = await self.models.load_lora_adapter(
            LoadLoRAAdapterRequest(lora_name=name, lora_path=str(folder), load_inplace=in_place),
            base_model_name=self.base)
        if isinstance(result, str):
            self.runtime[name] = folder
            self.errors.pop(name, None)
            logger.info("adapter %s loaded on %s in %.2fs", name, self.base, time.perf_counter() - started)
        else:
            self.errors[name] = result.error.message
            logger.warning("adapter %s not loaded on %s: %s", name, self.base, result.error.message)

    async def _unload(self, name: str) -> None:
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        request = self.models.lora_requests.get(name)
        await self.models.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
        del self.runtime[name]
        if request is not None:
            self.removing[name] = request.lora_int_id

    async def _finish_removals(self) -> None:
        # vLLM's unload only forgets the name: the weights stay in the engine core until removed
        for name, lora_id in list(self.removing.items()):
            if self.inflight.get(name, 0) == 0:
                await self.engine.remove_lora(lora_id)
                del self.removing[name]
                logger.info("adapter %s removed from %s", name, self.base)


def adapter_problems(config: ServingConfig) -> list[str]:
    """What `serving check` can tell about declared adapters whose files are already here: a rank the
    engine's max_lora_rank (set in models.yaml) cannot hold, or above what vLLM serves. Adapters not
    provisioned yet are checked when the engine starts."""
    from serving.engine.provision import adapter_dir

    problems = []
    for i, spec in enumerate(config.models):
        limit = config.engine_spec(spec).engine_args.get("max_lora_rank")
        for j, adapter in enumerate(spec.adapters):
            folder = adapter_dir(adapter)
            if not (folder / "adapter_config.json").is_file():
                continue
            where = f"models[{i}] ({spec.name}).adapters[{j}] ({adapter.name})"
            try:
                rank = adapter_rank(folder)
            except (OSError, ValueError, TypeError) as error:
                problems.append(f"{where}: {folder}/adapter_config.json cannot be read: {error}")
                continue
            if rank > LORA_RANKS[-1]:
                problems.append(f"{where}: rank {rank} is above the largest vLLM serves ({LORA_RANKS[-1]})")
            elif limit is not None and rank > int(limit):
                problems.append(f"{where}: rank {rank} does not fit engine_args.max_lora_rank {limit}; raise it "
                                f"to {max_lora_rank([rank])} or remove it (it is derived from the adapters)")
    return problems


def declared_folders(adapters: list[AdapterSpec], provision) -> dict[str, Path]:
    """name -> provisioned folder of every adapter models.yaml declares for the model."""
    return {adapter.name: provision(adapter) for adapter in adapters}
