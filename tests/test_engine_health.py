"""A replica whose vLLM engine died exits at its health check, so Ray replaces it as a crashed actor
(at once) instead of after three failed checks. The engine is a stand-in here (its death is what a
test cannot cause on demand); tests/test_e2e_zz_lifecycle.py kills a real engine core."""

from __future__ import annotations

import asyncio
import os
import types

import pytest

from serving.engine.deployment import EngineDeployment


class Exited(Exception):
    pass


def replica(errored: bool, check=None) -> tuple[EngineDeployment, list]:
    calls: list = []

    async def check_health():
        calls.append("check")
        if check is not None:
            check()

    engine = EngineDeployment.__new__(EngineDeployment)  # no vLLM engine behind it
    engine.name = "m"
    engine.engine = types.SimpleNamespace(errored=errored, dead_error=RuntimeError("core died") if errored else None,
                                          check_health=check_health, shutdown=lambda: calls.append("shutdown"))
    return engine, calls


@pytest.fixture
def exits(monkeypatch) -> list:
    codes: list = []

    def fake_exit(code):
        codes.append(code)
        raise Exited

    monkeypatch.setattr(os, "_exit", fake_exit)
    return codes


def test_a_dead_engine_stops_its_core_and_ends_the_replica(exits, capfd):
    engine, calls = replica(errored=True)
    with pytest.raises(Exited):
        asyncio.run(engine.check_health())
    assert exits == [1] and calls == ["shutdown"]
    # said on the process's own stderr (what Ray streams to `serving up`), before the exit
    assert "vLLM engine of m is dead (RuntimeError('core died')): the replica exits" in capfd.readouterr().err


def test_a_live_engine_passes_and_the_replica_stays(exits):
    engine, calls = replica(errored=False)
    asyncio.run(engine.check_health())
    assert exits == [] and calls == ["check"]


def test_a_failed_check_of_a_live_engine_is_left_to_ray(exits):
    def fail():
        raise TimeoutError("busy")

    engine, calls = replica(errored=False, check=fail)
    with pytest.raises(TimeoutError):
        asyncio.run(engine.check_health())
    assert exits == []


def test_an_engine_found_dead_by_its_own_check_ends_the_replica(exits):
    def die():
        engine.engine.errored = True  # vLLM marks itself dead, then raises EngineDeadError
        raise RuntimeError("engine dead")

    engine, calls = replica(errored=False, check=die)
    with pytest.raises(Exited):
        asyncio.run(engine.check_health())
    assert exits == [1] and calls == ["check", "shutdown"]
