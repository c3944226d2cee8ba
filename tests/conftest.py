"""Session fixtures: one real stack (Ray Serve + vLLM engines) started once and shared.

The stack is started the way a user starts it, with `serving up`, from the shipped
models.yaml plus a second chat deployment of the same weights (so load-based choice
between two deployments sharing a tag can be tested). It is stopped with SIGINT at the end.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import yaml

from serving.control.cli import all_models_ready

ROOT = Path(__file__).resolve().parent.parent
# Test stacks listen on 28000-28300: outside Ray's worker port range (10002-19999) and the
# ephemeral range (32768+), where another Ray cluster's processes could already hold the port;
# their derived HAProxy/direct-ingress blocks (serving.app.ray_env) land in 20000-29631.
PORT = int(os.environ.get("SERVING_TEST_PORT", "28000"))
CHAT_MODEL = "smollm2-135m"
SECOND_CHAT_MODEL = "smollm2-135m-b"
EMBED_MODEL = "all-minilm-l6-v2"
START_TIMEOUT_S = 900
# The shared stack's request deadline (the default is 600 s): tests/test_e2e_slow_reader.py waits
# for it, so it is short. Every e2e client gives up within 300 s of silence; the longest request a
# test lets finish took 8 s in a whole run (session 30, the router's request log); long ones are cut
# by their client or by this deadline on purpose.
E2E_REQUEST_TIMEOUT_S = 30
# Engines that share cores (every test stack: 3-5 engines on 2 cores) wait for work asleep, not
# spinning: libgomp's default spin-wait at each OpenMP barrier burned the cores a starting replica
# needed (3 engine cores at 60+60+30 % under a light load; deploy/models.auto-cpu.yaml has the numbers).
SHARED_CORES_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# LoRA adapters the twin chat deployment serves (bench/adapters.py, made with peft and cached like the
# models: `fruit_adapters()` gives their folders): name -> tags. Each one's alias is in e2e_config.
ADAPTER_TAGS = {"fruit-apple": ["fruit", "red"], "fruit-banana": ["fruit", "yellow"], "fruit-cherry": ["fruit", "red"]}
# Think time of each worker of the live loads kept going across a change (bench.live_change.LiveLoad):
# requests stay in flight throughout, and the engine starting beside them is not starved of the cores.
LOAD_PAUSE_S = 0.25
# The second stack shape (auto pair + embeddings, 2 router replicas, a keys file): shared by the
# tenants, abuse and metrics tests.
TENANTS_PORT = int(os.environ.get("SERVING_TENANTS_TEST_PORT", "28010"))


def e2e_config(tmp: Path) -> Path:
    """The shipped models.yaml plus a second deployment of the chat model (served from its folder)."""
    from serving.engine.provision import model_dir
    from serving.config import load_config

    raw = yaml.safe_load((ROOT / "models.yaml").read_text())
    chat = next(m for m in raw["models"] if m["name"] == CHAT_MODEL)
    spec = next(m for m in load_config(ROOT / "models.yaml").models if m.name == CHAT_MODEL)
    twin = {**chat, "name": SECOND_CHAT_MODEL, "aliases": ["smollm2-b"], "tags": ["chat", "small"],
            "source": {"path": str(model_dir(spec))},
            # one engine, its base and three adapters (tests/test_e2e_adapters.py)
            "adapters": [{"name": name, "source": {"path": str(folder)}, "aliases": [name.removeprefix("fruit-") + "-alias"],
                          "tags": ADAPTER_TAGS[name]} for name, folder in fruit_adapters().items()]}
    raw["models"].append(twin)
    # Tool calling as models.yaml documents it, and vLLM's (in-memory, never evicted) response store,
    # which Responses retrieve and previous_response_id need: tests/test_e2e_parity.py gives bare vLLM the same
    for model in (chat, twin):
        model["serve_args"] = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}
        model["env"] = {**model.get("env", {}), "VLLM_ENABLE_RESPONSES_API_STORE": "1"}
    # Three engines + router on a 2-core machine: reserve fractions so Ray can place them all.
    for model in raw["models"]:
        model["resources"] = {"cpus": 0.4}
    raw["profiles"]["cpu"]["env"].update(SHARED_CORES_ENV)
    # an open API on a test machine: anyone may add adapters at run time (default: admin keys only)
    raw["router"] = {**raw.get("router", {}), "port": PORT, "cpus": 0.2, "request_timeout_s": E2E_REQUEST_TIMEOUT_S,
                     "adapter_admin": "open"}
    path = tmp / "models.e2e.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def fruit_adapters() -> dict[str, Path]:
    """The fruit adapters of the chat model, made once (cached across runs like the models)."""
    from bench.adapters import ensure_adapters
    from serving.config import load_config
    from serving.engine.provision import model_dir

    spec = next(m for m in load_config(ROOT / "models.yaml").models if m.name == CHAT_MODEL)
    return ensure_adapters(model_dir(spec), names=tuple(ADAPTER_TAGS))


class Stack:
    def __init__(self, process: subprocess.Popen, url: str, log: Path):
        self.process = process
        self.url = url
        self.log = log
        self.exit_code: int | None = None
        self.stop_seconds: float | None = None

    def stop(self) -> int:
        """Ctrl-C, as a user would; returns the exit code."""
        if self.exit_code is None:
            started = time.monotonic()
            self.process.send_signal(signal.SIGINT)
            try:
                self.exit_code = self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.exit_code = -9
            self.stop_seconds = time.monotonic() - started
        return self.exit_code


def launch_shared_stack(tmp_path_factory) -> Stack:
    """`serving up` of the shared stack, started once (not waited for): the first test that needs
    no stack after the cluster stack's starts it (pytest_runtest_setup), so it comes up while the
    tests that need none run; the `stack` fixture waits for it."""
    if "stack" in _SHARED:
        return _SHARED["stack"]
    from serving.config import load_config
    from serving.engine.provision import provision_model

    for spec in load_config(ROOT / "models.yaml").models:  # the twin is served from the same folder
        provision_model(spec)
    tmp = tmp_path_factory.mktemp("stack")
    config = e2e_config(tmp)
    log = tmp / "serving-up.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "serving.control.cli", "up", str(config)], cwd=ROOT, env=env,
                               stdout=open(log, "w"), stderr=subprocess.STDOUT)
    _SHARED["stack"] = Stack(process, f"http://127.0.0.1:{PORT}", log)
    return _SHARED["stack"]


_SHARED: dict = {}  # "stack": Stack, "tenants": what launch_tenants_stack started
_WANTED: dict = {}


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> Stack:
    shared = launch_shared_stack(tmp_path_factory)
    process, log = shared.process, shared.log
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"`serving up` exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            if all_models_ready(shared.url):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"stack not ready after {START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield shared
    finally:
        if process.poll() is None:
            shared.stop()


def pytest_runtest_setup(item):
    """Start a stack before the tests that need it, while others run: at the run's first test what
    waits for nothing (launch_early), the shared stack at the first test that needs no stack (once
    the local Ray's and the cluster stack's tests are done), the tenants stack at the first of the
    shared stack's tests: its start fills the cores they leave idle while each waits on an engine
    (~60 % busy); started later, beside the dead-engine test, it slowed that engine's replacement
    (moved here: that test 60 -> 31 s, the suite 853 -> 764 s from a fresh clone). Only if a test of
    this run needs it."""
    if _WANTED.get("session") is not item.session:  # the fixtures this run's tests use, once per run
        _WANTED.update(session=item.session, names=set().union(*(getattr(o, "fixturenames", ()) for o in item.session.items)))
        modules = list({id(o.module): o.module for o in item.session.items if hasattr(o, "module")}.values())
        launch_early(_WANTED["names"], modules, item.config._tmp_path_factory)
    group = _group(item)
    wanted = _WANTED["names"]
    factory = item.config._tmp_path_factory  # what the tmp_path_factory fixture returns
    if group == 0 and "stack" in wanted and "stack" not in _SHARED:
        launch_shared_stack(factory)
    if group in (0.5, 1) and "tenants" in wanted and "tenants" not in _SHARED:
        launch_tenants_stack(factory)


def launch_early(wanted: set[str], modules: list, tmp_path_factory) -> None:
    """What this run needs and can start at once, in the background while the first tests run (the
    local Ray's use a core of two): the test adapters the stacks serve, trained if not cached
    (bench/adapters.py trains them in a child process; a later fruit_adapters() waits on its file
    lock, then finds them), and what a selected test module starts for itself: its
    `launch_ahead(tmp_path_factory, wanted)`, told the fixtures this run's tests use (the null-engine
    stack, the parity test's bare vLLM servers, the chart's checkov scan)."""
    if {"stack", "tenants"} & wanted:
        threading.Thread(target=fruit_adapters, name="train-adapters", daemon=True).start()
    for module in modules:
        if hasattr(module, "launch_ahead"):
            module.launch_ahead(tmp_path_factory, wanted)


def pytest_sessionfinish(session):
    """Stacks launched early whose fixture never ran (the run ended first: -x, Ctrl-C) are stopped."""
    shared = _SHARED.get("stack")
    if shared is not None and shared.process.poll() is None:
        shared.stop()
    if "tenants" in _SHARED:
        _stop_tenants(_SHARED["tenants"]["process"])


@pytest.fixture
def local_ray():
    """A local Ray (1 CPU, no dashboard) for tests of actors without a stack. Started once for
    the tests that need it, which run together (ordering below); pytest_runtest_teardown stops
    it after the last, so it never runs beside a test's own ray.init. Its own cluster ("local"),
    never the null stack's that starts beside it (launch_early)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield


def pytest_runtest_teardown(item, nextitem):
    # nextitem None: the run's end, or (xdist) the end of what this worker was sent so far, which
    # may go on with more of the same tests; Ray stops with the process then.
    if "local_ray" in getattr(item, "fixturenames", ()) and nextitem is not None and (
            "local_ray" not in getattr(nextitem, "fixturenames", ())):
        import ray

        ray.shutdown()


STACK_FIXTURES = {"stack", "stack_url", "tenants", "cluster_stack"}


def _group(item) -> float:
    """Run order: the local Ray's tests, the two-node cluster stack's (alone), the tests that need no
    stack (the shared stack starting meanwhile; those with servers of their own last), the shared
    stack's (the tenants stack starting meanwhile), those that stop it, the tenants stack's, those
    that change it."""
    names = getattr(item, "fixturenames", ())
    if "local_ray" in names:
        return -1
    if "cluster_stack" in names:
        return -0.5
    if "tenants" in names:
        return 3 if item.get_closest_marker("changes_tenants_stack") else 2
    if item.get_closest_marker("stops_stack"):
        return 1
    if STACK_FIXTURES & set(names):
        return 0.5
    # e2e with servers of its own (parity's bare vLLM, the null stack: started by launch_early) after
    # the unit tests, so that their load does not meet the shared stack's start
    return 0.25 if item.get_closest_marker("e2e") else 0


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: `-m "not e2e"` never starts a stack
def pytest_collection_modifyitems(config, items):
    """Every test that uses a stack is marked e2e, whatever its file says. Then order by what a
    test needs, not by file name: tests that stop the shared stack (marker `stops_stack`) run
    after every other user of it, and the tenants stack's users run last and together, so at
    most one extra stack runs beside the shared one; those that apply new models files to it
    (`changes_tenants_stack`) after its other users. The local Ray's users run first, together; then
    the two-node cluster stack's (tests/test_e2e_multinode.py, module-scoped: it stops before the shared one starts)."""
    for item in items:
        if STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
        if "local_ray" in getattr(item, "fixturenames", ()):  # `make unit -n 2`: one worker, one Ray
            item.add_marker(pytest.mark.xdist_group("local_ray"))
        elif item.get_closest_marker("imports_vllm"):  # one worker pays vLLM's import
            item.add_marker(pytest.mark.xdist_group("imports_vllm"))

    # `make unit` skips collecting tests/test_e2e_* (their imports, ~2 s a worker): so they hold only stack tests
    misplaced = [item.nodeid for item in items
                 if item.path.name.startswith("test_e2e_") and not item.get_closest_marker("e2e")]
    if misplaced:
        raise pytest.UsageError(f"tests/test_e2e_* files hold only tests that use a stack (`make unit` does not "
                                f"collect them); move these to another file: {misplaced}")

    items.sort(key=_group)  # stable: file order within a group


@pytest.hookimpl(trylast=True)  # after pytest-xdist tagged each grouped test's id with its group
def pytest_collection_finish(session):
    """`--dist loadgroup` sends a group to one worker by an `@group` suffix xdist writes into each
    test's id; pytest 9.2 ignores that write (pytest-dev/pytest-xdist#1386) and the groups are
    silently spread: two local Rays, each worker importing vLLM, `make unit` ~15 s slower. Say so."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in session.items
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid.rsplit("]", 1)[-1]]
    if lost:
        warnings.warn(pytest.PytestWarning(
            f"pytest-xdist's loadgroup lost the group of {len(lost)} tests (e.g. {lost[0]}), so groups run spread "
            "over the workers: pytest-xdist#1386; pyproject.toml pins a pytest it works with"))


@pytest.fixture(scope="session")
def stack_url(stack: Stack) -> str:
    return stack.url


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """`serving ARGS` in this process, its output captured: what the command prints and returns,
    without an interpreter and a vLLM import per call (tests/test_config.py keeps one real
    subprocess run of the command)."""
    from serving.control.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse errors and sys.exit in commands
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    return subprocess.CompletedProcess(["serving", *args], code or 0, out.getvalue(), err.getvalue())


def create_key(keys: Path, name: str, *flags: str) -> str:
    result = run_cli("keys", "create", name, "--file", str(keys), *flags)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def launch_tenants_stack(tmp_path_factory) -> dict:
    """`serving up` of the tenants stack, started once (not waited for): the tests that stop the
    shared stack start it (pytest_runtest_setup), so it comes up while they run; `tenants` waits."""
    if "tenants" in _SHARED:
        return _SHARED["tenants"]
    tmp = tmp_path_factory.mktemp("tenants")
    keys = tmp / "keys.yaml"
    made = {
        "limited": create_key(keys, "team-rpm", "--rpm", "30"),
        "chat-only": create_key(keys, "team-chat", "--models", CHAT_MODEL),
        "admin": create_key(keys, "ops", "--admin"),
        "plain": create_key(keys, "team-plain"),
        # abuse cases (tests/test_e2e_abuse.py): each limit alone on its own key
        "tpm": create_key(keys, "team-tpm", "--tpm", "600"),
        "concurrency": create_key(keys, "team-conc", "--concurrency", "2"),
        "small-only": create_key(keys, "team-small", "--models", CHAT_MODEL),
        "cut": create_key(keys, "team-cut", "--tpm", "100000"),
    }
    assert all(key not in keys.read_text() for key in made.values())  # only hashes are stored
    from serving.config import load_config
    from serving.engine.provision import model_dir

    raw = yaml.safe_load((ROOT / "deploy" / "models.auto-cpu.yaml").read_text())
    chat = next(m for m in load_config(ROOT / "models.yaml").models if m.name == CHAT_MODEL)
    for model in raw["models"]:
        if "path" in model["source"]:  # the large twin reads the folder provisioning filled
            model["source"] = {"path": str(model_dir(chat))}
        # room on 2 logical CPUs for what tests/test_e2e_apply.py adds: a scale-to-zero model and a second replica
        model["resources"] = {"cpus": 0.3}
    # exact counts even on a loaded 2-core CI machine: wait for the limits actor, never fail open
    raw["router"] = {**raw.get("router", {}), "port": TENANTS_PORT, "replicas": 2, "cpus": 0.1, "keys_file": str(keys),
                     "limits_timeout_s": 30, "limits_fail_open": False,
                     "request_log_file": str(tmp / "requests.jsonl")}
    config = tmp / "models.tenants.yaml"
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    log = tmp / "serving-up.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("SERVING_API_KEYS", None)
    process = subprocess.Popen([sys.executable, "-m", "serving.control.cli", "up", str(config)], cwd=ROOT, env=env,
                               stdout=open(log, "w"), stderr=subprocess.STDOUT)
    _SHARED["tenants"] = {"url": f"http://127.0.0.1:{TENANTS_PORT}", "keys": made, "log": log,
                          "request_log": tmp / "requests.jsonl", "config": config, "port": TENANTS_PORT,
                          "process": process}
    return _SHARED["tenants"]


@pytest.fixture(scope="session")
def tenants(tmp_path_factory):
    launched = launch_tenants_stack(tmp_path_factory)
    process, log, url = launched["process"], launched["log"], launched["url"]
    deadline = time.monotonic() + 900
    try:
        while not all_models_ready(url):
            if process.poll() is not None:
                pytest.fail(f"`serving up` exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"tenant stack not ready:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        address = next(line.split()[-1] for line in log.read_text().splitlines() if line.startswith("ray cluster at "))
        yield {**{k: v for k, v in launched.items() if k != "process"}, "address": address}
    finally:
        _stop_tenants(process)


def _stop_tenants(process: subprocess.Popen) -> None:
    """The tenants stack is the run's last: nothing needs its graceful stop (the shared stack's
    Ctrl-C test covers that path), so its whole process tree is killed at once: ~14 s sooner."""
    kill_tree(process)


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a `serving up` and every process under it (its Ray cluster, replicas, engine cores)."""
    import psutil

    try:
        root = psutil.Process(process.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(tree, timeout=30)
    process.wait(timeout=30)
