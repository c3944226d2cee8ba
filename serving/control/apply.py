"""`serving apply`: change a running stack to a new models file in place, in an order that drops no request.

`plan` (pure) says what the change means for each deployment; `apply` carries it out through Ray
Serve in three deploys of the same application (serving.app.build pins each deployment's version,
so each deploy restarts only what changed):
  1. engines first: new models start and changed engines roll while the routers still route by
     the old catalog (and removed models keep serving);
  2. the routers switch to the new catalog in place (names, aliases, tags, routes, fallbacks);
  3. removed models' deployments go: Ray Serve drains them (requests in flight finish), and the
     routers no longer send them anything.
Each deploy waits until Ray Serve reports the application running again. If new engines cannot
start, the application is put back to the config it had, before the routers ever saw them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from serving.config import APP_NAME, ROUTER_DEPLOYMENT, ServingConfig, parse_config


@dataclasses.dataclass(frozen=True)
class Plan:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    restarted: tuple[str, ...] = ()  # new engine processes: engine arguments, source, resources or code changed
    rescaled: tuple[str, ...] = ()  # replica counts, autoscaling or queue limits: in place, no restart
    names: tuple[str, ...] = ()  # aliases and tags moved, routes and fallbacks changed: "name: old -> new"
    router_restarted: bool = False  # the `router:` section changed: router replicas roll
    catalog_changed: bool = False

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.restarted or self.rescaled or self.names
                    or self.router_restarted or self.catalog_changed)

    @property
    def engines_first(self) -> bool:
        """Whether phase 1 has anything to do (engines to start or roll)."""
        return bool(self.added or self.restarted or self.rescaled)

    def lines(self) -> list[str]:
        if self.empty:
            return ["no change"]
        out = [f"+ model {n} (starts; routed to once ready)" for n in self.added]
        out += [f"~ model {n} (engine replicas roll: new engine arguments, source, resources or code)" for n in self.restarted]
        out += [f"~ model {n} (replicas, autoscaling or queue limits: in place)" for n in self.rescaled]
        out += [f"~ {line}" for line in self.names]
        out += [f"- model {n} (no new requests; requests in flight finish; then its replicas stop)" for n in self.removed]
        if self.router_restarted:
            out.append("~ router (the router: section changed: router replicas roll)")
        elif self.catalog_changed and not out:
            out.append("~ catalog (in place in every router replica)")
        return out


def _names(config: ServingConfig) -> dict[str, str]:
    """Every alias, tag selector and route -> what it resolves to (by the config's one resolver)."""
    from serving.config import select_models, served_models
    from serving.routing import routes_from_config

    served = served_models(config)
    refs = {a for m in served for a in m.aliases} | {f"tag:{t}" for m in served for t in m.tags}
    out = {ref: ",".join(sorted(m.name for m in select_models(config, ref))) for ref in refs}
    out.update({name: f"route {r.small}|{r.large}" for name, r in routes_from_config(config).items()})
    return out


def plan(old: ServingConfig, new: ServingConfig) -> Plan:
    """What applying `new` over the running `old` does to each deployment (pure: no cluster)."""
    from serving.app import engine_identity, engine_options
    from serving.engine.deployment import EngineDeployment

    old_models = {spec.name: spec for spec in old.models}
    new_models = {spec.name: spec for spec in new.models}
    restarted, rescaled = [], []
    for name in sorted(set(old_models) & set(new_models)):
        before, after = old.engine_spec(old_models[name]), new.engine_spec(new_models[name])
        # the same identity serving.app versions engines by; resources are Ray's actor options
        if engine_identity(before, old, EngineDeployment) != engine_identity(after, new, EngineDeployment) or \
                before.resources != after.resources:
            restarted.append(name)
        elif engine_options(before, old) != engine_options(after, new):  # by value (600 == 600.0)
            rescaled.append(name)
    old_names, new_names = _names(old), _names(new)
    names = []
    for name in sorted(set(old_names) | set(new_names)):  # aliases, tags, routes (models: added/removed above)
        before, after = old_names.get(name), new_names.get(name)
        if before != after:
            names.append(f"{name}: {before or '(none)'} -> {after or '(none)'}")
    fallbacks = {n: s.fallbacks for n, s in new_models.items() if n in old_models and old_models[n].fallbacks != s.fallbacks}
    names += [f"{n} fallbacks: {list(old_models[n].fallbacks)} -> {list(f)}" for n, f in sorted(fallbacks.items())]
    return Plan(added=tuple(sorted(set(new_models) - set(old_models))),
                removed=tuple(sorted(set(old_models) - set(new_models))),
                restarted=tuple(restarted), rescaled=tuple(rescaled), names=tuple(names),
                router_restarted=old.router != new.router,
                catalog_changed=old.model_dump(mode="json") != new.model_dump(mode="json"))


# --- against a running stack -------------------------------------------------------------------


def live_config() -> ServingConfig:
    """The config the running routers serve: the router deployment's user_config (serving.app.build)."""
    from ray.serve.context import _get_global_client

    info, _ = _get_global_client().get_deployment_info(ROUTER_DEPLOYMENT, APP_NAME)
    user_config = info.deployment_config.user_config
    if not isinstance(user_config, dict) or "config" not in user_config:
        raise RuntimeError(f"the running application {APP_NAME!r} was not deployed by this version of `serving` "
                           "(its router carries no config); restart it with `serving up`")
    return parse_config(user_config["config"], "the running stack's config")


def apply(old: ServingConfig, new: ServingConfig, the_plan: Plan, timeout_s: float,
          log: Callable[[str], None] = print, engine_cls: type | None = None) -> None:
    """Carry out `the_plan` (see the module's docstring). Raises RuntimeError, after putting the
    application back to `old`, if Ray Serve cannot run the new engines."""
    from ray.serve.api import _run

    from serving.app import build
    from serving.engine.deployment import EngineDeployment

    cls = engine_cls or EngineDeployment
    # The routers' own section comes from the new file throughout: it rolls the routers once, not twice.
    old_catalog = old.model_copy(update={"router": new.router})

    def deploy(what: str, config: ServingConfig, catalog: ServingConfig | None = None,
               keep: ServingConfig | None = None) -> None:
        started = time.monotonic()
        _run(build(config, cls, catalog=catalog, keep=keep), name=APP_NAME, route_prefix="/", _blocking=False)
        _wait_running(timeout_s)
        log(f"  {what}: done in {time.monotonic() - started:.1f}s")

    if the_plan.engines_first or the_plan.router_restarted:
        try:
            deploy("engines started and rolled; routers unchanged", new, catalog=old_catalog, keep=old)
        except Exception as error:
            log(f"  the new engines did not start ({error}); putting the application back as it was")
            deploy("back to the running config", old)
            raise RuntimeError(f"not applied: {error}") from None
    if the_plan.catalog_changed:
        deploy("routers serve the new catalog", new, keep=old)
    if the_plan.removed:
        deploy(f"removed {', '.join(the_plan.removed)} (drained)", new)
        _wait_gone(the_plan.removed, new.router.drain_timeout_s + 60, log)


# --- one application per model (the Helm chart's shape) ----------------------------------------


def per_model_apps_running() -> bool:
    """Whether the running stack was deployed as one application per model (`serving up
    --per-model-apps`, or KubeRay with the chart's serveConfigV2)."""
    from ray import serve

    from serving.config import engine_app_name

    apps = serve.status().applications
    return any(name.startswith(engine_app_name("")) for name in apps)


def deploy_per_model_apps(raw: dict[str, Any], http: dict[str, Any] | None = None) -> None:
    """Deploy `serving.app.serve_config(raw)` as KubeRay does with the chart's serveConfigV2: one
    declarative deploy of every application. Ray Serve rolls the applications whose args changed,
    applies the routers' new user_config in place, and deletes applications no longer listed."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from serving.app import serve_config

    body = serve_config(raw)
    if http:
        body["http_options"] = http
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(body))


def apply_per_model_apps(raw: dict[str, Any], timeout_s: float, log: Callable[[str], None] = print) -> None:
    """`serving apply` on a stack of per-model applications: the same single deploy as `helm upgrade`
    (no phases: Ray Serve applies every application's change at once, as KubeRay would)."""
    started = time.monotonic()
    deploy_per_model_apps(raw)
    _wait_running(timeout_s, every_app=True)
    log(f"  every application redeployed: done in {time.monotonic() - started:.1f}s")


def _wait_running(timeout_s: float, every_app: bool = False) -> None:
    """Until the application is RUNNING again: Ray sets it DEPLOYING when the deploy lands and back to
    RUNNING once every deployment's replicas run the target version (routers reconfigured included)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    seen_deploying = False
    while time.monotonic() < deadline:
        apps = serve.status().applications
        if every_app:  # the stack's applications: the routers' and each model's
            ours = [a for name, a in apps.items() if name == APP_NAME or name.startswith(f"{APP_NAME}.")]
            failed = [a for a in ours if a.status == "DEPLOY_FAILED"]
            if failed:
                raise RuntimeError(f"Ray Serve could not deploy: {failed[0].message}")
            if ours and all(a.status == "RUNNING" and _all_healthy(a) for a in ours):
                return
            time.sleep(0.5)
            continue
        app = apps.get(APP_NAME)
        status = app.status if app else None
        if status == "DEPLOY_FAILED":
            failed = {n: d.message for n, d in app.deployments.items() if d.status != "HEALTHY"}
            raise RuntimeError(f"Ray Serve could not deploy: {failed or app.message}")
        if status == "RUNNING" and (seen_deploying or _all_healthy(app)):
            return
        seen_deploying |= status == "DEPLOYING"
        time.sleep(0.5)
    raise RuntimeError(f"the application is not running after {timeout_s:g}s")


def _all_healthy(app: Any) -> bool:
    return all(d.status == "HEALTHY" for d in app.deployments.values())


def _wait_gone(names: tuple[str, ...], timeout_s: float, log: Callable[[str], None]) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        left = [n for n in names if app is not None and n in app.deployments]
        if not left:
            return
        time.sleep(0.5)
    log(f"  still draining after {timeout_s:g}s: {', '.join(left)}")
