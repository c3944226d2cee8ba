"""`GET /v1/models`: vLLM's `ModelList` / `ModelCard` shape plus the router's additions.

The models carry exactly the fields of vLLM's types of the same names
(`vllm.entrypoints.serve.engine.protocol`; tests/test_errors_vllm_types.py fails if vLLM's
change). They are defined here, not imported, because importing vLLM's protocol module pulls
in torch and the router process never imports vLLM. The router's additions are further
fields of `ModelCard`, left out of the JSON where they do not apply (an alias has no tags).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from serving.config import ModelSpec, Price, ServingConfig
from serving.routing import Target

OWNER = "serving"  # owned_by of models whose source names no organisation (pypi, path)


class _OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="allow")  # like vLLM's OpenAIBaseModel


class ModelPermission(_OpenAIModel):
    """vLLM's `ModelPermission` (the element type of `ModelCard.permission`); the router lists none."""

    id: str
    object: str = "model_permission"
    created: int = 0
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


# The router's additions to vLLM's ModelCard, in the JSON only when set.
ROUTER_FIELDS = ("task", "tags", "aliases", "alias_of", "status", "replicas", "price")


class ModelCard(_OpenAIModel):
    # vLLM's ModelCard fields
    id: str
    object: str = "model"
    created: int = 0  # models.yaml does not know when a model was made; 0 keeps the listing stable
    owned_by: str = OWNER
    root: str | None = None  # where the weights come from (models.yaml `source`)
    parent: str | None = None  # a LoRA adapter's base model (as vLLM lists adapters)
    max_model_len: int | None = None  # context window (engine_args.max_model_len), when models.yaml sets it
    permission: list[ModelPermission] = Field(default_factory=list)
    # the router's additions
    task: str | None = None  # chat | completion | embed
    tags: list[str] | None = None
    aliases: list[str] | None = None
    alias_of: str | None = None  # on an alias's entry: the model it names
    status: str | None = None  # ready | starting | unavailable | cold (scaled to zero), as /v1/status reports it
    replicas: int | None = None
    price: Price | None = None

    @model_serializer(mode="wrap")
    def _without_unset_additions(self, handler) -> dict[str, Any]:
        data = handler(self)
        return {k: v for k, v in data.items() if not (k in ROUTER_FIELDS and v is None)}


class ModelList(_OpenAIModel):
    object: str = "list"
    data: list[ModelCard] = Field(default_factory=list)


def owner_of(spec: ModelSpec) -> str:
    """The organisation of a hub id (`HuggingFaceTB/SmolLM2-135M` -> `HuggingFaceTB`), else `serving`."""
    hub = spec.source.hub
    return hub.split("/", 1)[0] if hub and "/" in hub else OWNER


def model_list(config: ServingConfig, catalog: dict[str, Target], visible: set[str],
               states: dict[str, dict[str, Any]], runtime: dict[str, Any] | None = None) -> ModelList:
    """Each visible model, then its aliases, then its adapters (each with its aliases), in models.yaml
    order, run-time adapters after the declared ones. An adapter is listed as vLLM lists one:
    `parent` its base model, `root` where its weights come from."""
    data = []
    for spec in config.models:
        state = states[spec.name]
        common = {"max_model_len": catalog[spec.name].max_model_len, "task": spec.task}
        if spec.name in visible:
            data.append(ModelCard(id=spec.name, owned_by=owner_of(spec), root=spec.source.describe(), **common,
                                  tags=spec.tags, aliases=spec.aliases, status=state["state"],
                                  replicas=state["replicas"], price=spec.price))
            data.extend(ModelCard(id=alias, owned_by=owner_of(spec), root=spec.source.describe(), **common,
                                  alias_of=spec.name) for alias in spec.aliases)
        added = [(entry.spec, entry.spec.price) for entry in (runtime or {}).values() if entry.base == spec.name]
        for adapter, price in [(a, a.price) for a in spec.adapters] + added:
            if adapter.name not in visible or adapter.name not in catalog:
                continue
            root = adapter.source.describe()
            data.append(ModelCard(id=adapter.name, root=root, parent=spec.name, **common, tags=adapter.tags,
                                  aliases=adapter.aliases, status=state["state"], replicas=state["replicas"],
                                  price=price or spec.price))
            data.extend(ModelCard(id=alias, root=root, parent=spec.name, **common, alias_of=adapter.name)
                        for alias in adapter.aliases)
    return ModelList(data=data)
