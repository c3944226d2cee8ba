"""CPU seconds per process role over a run, from /proc/<pid>/stat (utime + stime).

Snapshot every process before and after a command (usually `python -m bench run`) or a time
window, classify each process by its role in the serving path (Ray proxy, router replica,
engine replica frontend, vLLM engine core, bare vLLM api_server, GCS, raylet, Serve
controller, Ray's agents, the bench client itself, other) and report CPU seconds per role,
plus CPU ms per streamed output token for the path around the engine (every serving process
but the engine core) and for the engine core (with vLLM's executor workers, if any).

Caveats the report states: a process that exits inside the window loses the CPU it spent
after the first snapshot (it is listed as `exited`); a process that starts inside it is
counted from zero. The command's own CPU (the bench client and its children) comes from
getrusage(RUSAGE_CHILDREN), which also covers its processes that already exited.

Pure functions (parse_stat, classify, diff, aggregate) take /proc text and numbers, so the
classification and the arithmetic test without a cluster.
"""

from __future__ import annotations

import glob
import json
import os
import re
import resource
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

ROLES = (
    "proxy",            # Ray Serve's HTTP proxy (ray::ProxyActor)
    "router",           # router / ingress replica (ray::ServeReplica:<app>:router, OpenAiIngress)
    "engine_frontend",  # engine replica: the Python process around AsyncLLM (or the null engine)
    "engine_core",      # VLLM::EngineCore: the model itself
    "engine_worker",    # VLLM::Worker: vLLM's multiproc executor worker (Ray Serve LLM on CPU forces it)
    "vllm_api_server",  # bare `python -m vllm.entrypoints.openai.api_server` frontend
    "controller",       # ray::ServeController
    "gcs",              # gcs_server
    "raylet",           # raylet
    "ray_agents",       # dashboard, dashboard agent, runtime-env agent, log monitor, ...
    "ray_workers",      # other ray:: processes (idle workers, limits actor, ...)
    "driver",           # the process that started the stack (serving up, a bench/scripts runner)
    "bench_client",     # the measured command itself (load generator)
    "other",            # everything else on the machine
)
# "Around the engine": every process of the serving path except the model's engine core.
ENGINE = ("engine_core", "engine_worker")
AROUND_ENGINE = tuple(r for r in ROLES if r not in ENGINE + ("bench_client", "other"))

_INGRESS = re.compile(r"router|ingress", re.I)
_DRIVER = re.compile(r"serving(\.control\.cli|\.cli)? up|bin/serving up|null_stack\.py|ray_serve_llm\.py|serve run|"
                     r"ray(\.scripts\.scripts)? start")
_AGENTS = re.compile(r"ray::(DashboardAgent|RuntimeEnvAgent)|dashboard/(agent|dashboard)\.py|"
                     r"runtime_env/agent/main\.py|log_monitor\.py|_private/monitor\.py|"
                     r"ray/autoscaler")


@dataclass(slots=True)
class Sample:
    pid: int
    ppid: int
    comm: str
    ticks: int  # utime + stime, in clock ticks
    start: int  # starttime (ticks since boot): tells a reused pid from the original
    cmd: str = ""

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start)


def parse_stat(text: str, cmd: str = "") -> Sample:
    """One /proc/<pid>/stat line. `comm` is in parentheses and may hold spaces or ')'."""
    head, _, rest = text.rpartition(")")
    pid_s, _, comm = head.partition(" (")
    f = rest.split()
    # fields after comm, 0-based: state=0 ppid=1 ... utime=11 stime=12 ... starttime=19
    return Sample(pid=int(pid_s), ppid=int(f[1]), comm=comm, ticks=int(f[11]) + int(f[12]),
                  start=int(f[19]), cmd=cmd)


def classify(comm: str, cmd: str) -> str:
    """Role of one process from its comm (15 chars) and full command line (NULs as spaces)."""
    line = cmd or comm
    if line.startswith("ray::ServeReplica:") or comm.startswith("ray::ServeRepli"):
        # ray::ServeReplica:<app>:<deployment>[.<method being run>]
        rest = line[len("ray::ServeReplica:"):].split(" ")[0]
        _app, _, deployment = rest.partition(":")
        deployment = deployment.split(".")[0]
        return "router" if _INGRESS.search(deployment) else "engine_frontend"
    if line.startswith("VLLM::EngineCore") or comm.startswith("VLLM::EngineCor"):
        return "engine_core"
    if line.startswith("VLLM::Worker") or comm.startswith("VLLM::Worker"):
        return "engine_worker"
    if line.startswith("ray::ProxyActor") or comm.startswith("ray::ProxyActor"):
        return "proxy"
    if line.startswith("ray::ServeController") or comm.startswith("ray::ServeContr"):
        return "controller"
    if "vllm.entrypoints.openai.api_server" in line or re.search(r"\bvllm serve\b", line):
        return "vllm_api_server"
    if comm == "gcs_server" or line.split(" ")[0].endswith("/gcs_server"):
        return "gcs"
    if comm == "raylet" or line.split(" ")[0].endswith("/raylet"):
        return "raylet"
    if _AGENTS.search(line) or comm.startswith(("ray::DashboardA", "ray::RuntimeEnv")):
        return "ray_agents"
    if line.startswith("ray::") or comm.startswith("ray::"):
        return "ray_workers"
    if _DRIVER.search(line):
        return "driver"
    return "other"


def read_snapshot(proc: str = "/proc") -> dict[tuple[int, int], Sample]:
    """Every process readable now; ones that vanish while we read are skipped."""
    out: dict[tuple[int, int], Sample] = {}
    for d in os.listdir(proc):
        if not d.isdigit():
            continue
        try:
            with open(f"{proc}/{d}/stat") as fh:
                stat = fh.read()
            with open(f"{proc}/{d}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        s = parse_stat(stat, cmd)
        out[s.key] = s
    return out


def descendants(samples: Iterable[Sample], roots: set[int]) -> set[int]:
    """PIDs of `roots` and everything below them."""
    children: dict[int, list[int]] = {}
    for s in samples:
        children.setdefault(s.ppid, []).append(s.pid)
    seen, todo = set(), list(roots)
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        todo.extend(children.get(p, ()))
    return seen


@dataclass(slots=True)
class Delta:
    pid: int
    role: str
    cpu_s: float
    cmd: str
    state: str  # "alive" | "started" (new in the window) | "exited" (gone at the end)


def diff(before: dict, after: dict, hz: float, exclude: set[int] = frozenset(),
         scope: set[int] | None = None) -> list[Delta]:
    """Per-process CPU seconds between two snapshots. `exclude`: pids counted another way
    (the command we ran); `scope`: only these pids (None = the whole machine)."""
    out: list[Delta] = []
    for key, a in after.items():
        if a.pid in exclude or (scope is not None and a.pid not in scope):
            continue
        b = before.get(key)
        ticks = a.ticks - (b.ticks if b else 0)
        out.append(Delta(a.pid, classify(a.comm, a.cmd), ticks / hz, a.cmd[:160], "alive" if b else "started"))
    for key, b in before.items():
        if key not in after and b.pid not in exclude and (scope is None or b.pid in scope):
            out.append(Delta(b.pid, classify(b.comm, b.cmd), 0.0, b.cmd[:160], "exited"))
    return out


def aggregate(deltas: list[Delta], wall_s: float, output_tokens: int | None,
              client_cpu_s: float | None = None) -> dict[str, Any]:
    """CPU seconds per role and per output token. The client's own CPU, when measured by
    getrusage, replaces whatever was attributed to `bench_client` from /proc."""
    roles: dict[str, dict[str, Any]] = {r: {"cpu_s": 0.0, "processes": 0, "exited": 0} for r in ROLES}
    for d in deltas:
        r = roles[d.role]
        r["cpu_s"] += d.cpu_s
        r["processes"] += 1
        r["exited"] += d.state == "exited"
    if client_cpu_s is not None:
        roles["bench_client"]["cpu_s"] = client_cpu_s
        roles["bench_client"]["processes"] = max(roles["bench_client"]["processes"], 1)
    around = sum(roles[r]["cpu_s"] for r in AROUND_ENGINE)
    core = sum(roles[r]["cpu_s"] for r in ENGINE)

    def per_token(cpu_s: float) -> float | None:
        return cpu_s * 1000.0 / output_tokens if output_tokens else None

    for r in roles.values():
        r["cpu_s"] = round(r["cpu_s"], 3)
        r["cores"] = round(r["cpu_s"] / wall_s, 3) if wall_s > 0 else None
        r["ms_per_token"] = _round(per_token(r["cpu_s"]))
    return {
        "wall_s": round(wall_s, 3),
        "output_tokens": output_tokens,
        "roles": roles,
        "around_engine_cpu_s": round(around, 3),
        "engine_core_cpu_s": round(core, 3),
        "around_engine_ms_per_token": _round(per_token(around)),
        "engine_core_ms_per_token": _round(per_token(core)),
        "around_engine_roles": list(AROUND_ENGINE),
    }


def _round(x: float | None, n: int = 4) -> float | None:
    return None if x is None else round(x, n)


# --- finding the stack and the tokens ----------------------------------------------------

def listener_pid(port: int, proc: str = "/proc") -> int | None:
    """PID of the process listening on TCP `port` (IPv4 or IPv6), via socket inodes."""
    inodes: set[str] = set()
    for table in ("net/tcp", "net/tcp6"):
        try:
            with open(f"{proc}/{table}") as fh:
                next(fh)
                for line in fh:
                    f = line.split()
                    if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                        inodes.add(f[9])
        except FileNotFoundError:
            continue
    if not inodes:
        return None
    for d in os.listdir(proc):
        if not d.isdigit():
            continue
        try:
            for fd in os.listdir(f"{proc}/{d}/fd"):
                link = os.readlink(f"{proc}/{d}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(d)
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return None


_LAUNCHERS = {"bash", "sh", "dash", "zsh", "flock", "timeout", "setsid", "sudo", "su", "tmux: server",
              "screen", "systemd", "init", "sshd", "env", "nohup"}


def stack_root(pid: int, snapshot: dict) -> int:
    """Climb from `pid` to the top of its process tree, stopping below pid 1 and below a
    shell or launcher, so the root is the stack's own driver (serving up, api_server, ...)."""
    by_pid = {s.pid: s for s in snapshot.values()}
    cur = by_pid.get(pid)
    while cur is not None:
        parent = by_pid.get(cur.ppid)
        if parent is None or parent.pid == 1 or parent.comm in _LAUNCHERS:
            return cur.pid
        cur = parent
    return pid


def scope_pids(snapshot: dict, roots: list[int] | None = None, root_match: str | None = None,
               port: int | None = None) -> tuple[set[int] | None, list[int]]:
    """PIDs to account (None = all) and the roots they came from."""
    found = list(roots or [])
    if root_match:
        rx = re.compile(root_match)
        found += [s.pid for s in snapshot.values() if rx.search(s.cmd) and s.pid != os.getpid()]
    if port is not None:
        pid = listener_pid(port)
        if pid is None:
            raise SystemExit(f"nothing listens on port {port}")
        found.append(stack_root(pid, snapshot))
    if not found and not (roots or root_match or port):
        return None, []
    return descendants(snapshot.values(), set(found)), sorted(set(found))


def output_tokens_of_runs(paths: Iterable[str]) -> int:
    """Output tokens of completed requests in `bench run` JSONs (warm-up excluded)."""
    total = 0
    for p in paths:
        with open(p) as fh:
            doc = json.load(fh)
        for rec in doc.get("records", []):
            if rec.get("outcome") == "ok":
                total += int(rec.get("output_tokens") or 0)
    return total


def out_dir_of(command: list[str]) -> str | None:
    """The `--out DIR` of a bench command line, if any."""
    for i, a in enumerate(command):
        if a == "--out" and i + 1 < len(command):
            return command[i + 1]
        if a.startswith("--out="):
            return a.split("=", 1)[1]
    return None


def new_run_files(out_dir: str, since: float) -> list[str]:
    return sorted(p for p in glob.glob(os.path.join(out_dir, "*.json"))
                  if os.path.getmtime(p) >= since and _is_run_doc(p))


def _is_run_doc(path: str) -> bool:
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and "records" in doc and isinstance(doc.get("config"), dict) \
        and doc["config"].get("command") == "run"


# --- measuring ---------------------------------------------------------------------------

@dataclass
class Measurement:
    report: dict[str, Any]
    deltas: list[Delta] = field(default_factory=list)
    returncode: int = 0


def measure(command: list[str] | None = None, duration_s: float | None = None,
            roots: list[int] | None = None, root_match: str | None = None, port: int | None = None,
            output_tokens: int | None = None, run_files: list[str] | None = None) -> Measurement:
    """Snapshot, run `command` (or sleep `duration_s`), snapshot; CPU per role."""
    hz = float(os.sysconf("SC_CLK_TCK"))
    before = read_snapshot()
    scope_before, found = scope_pids(before, roots, root_match, port)
    me = os.getpid()
    t0, started = time.perf_counter(), time.time()
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rc, child_pids = 0, set()
    if command:
        proc = subprocess.Popen(command)
        child_pids.add(proc.pid)
        rc = proc.wait()
    else:
        time.sleep(duration_s or 0)
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter() - t0
    after = read_snapshot()
    scope = None
    if scope_before is not None:
        # Processes started inside the window (a new replica, an engine core) belong too.
        scope = descendants(list(before.values()) + list(after.values()), set(found))
    client_cpu = None
    exclude = {me} | descendants(after.values(), {me}) if command else {me}
    if command:
        client_cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
        exclude |= child_pids
    deltas = diff(before, after, hz, exclude=exclude, scope=scope)
    if output_tokens is None and command and run_files is None:
        out_dir = out_dir_of(command)
        if out_dir and os.path.isdir(out_dir):
            run_files = new_run_files(out_dir, started - 1)
    if output_tokens is None and run_files:
        output_tokens = output_tokens_of_runs(run_files)
    rep = aggregate(deltas, wall, output_tokens, client_cpu)
    rep.update({"schema": "bench.cpu/1", "command": command, "duration_s": duration_s,
                "scope": {"roots": found, "pids": len(scope) if scope is not None else None,
                          "whole_machine": scope is None},
                "run_files": run_files or [], "clock_ticks_per_s": hz, "returncode": rc,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "processes": [asdict(d) for d in sorted(deltas, key=lambda d: -d.cpu_s)
                              if d.cpu_s > 0 or d.role not in ("other",)][:80]})
    return Measurement(rep, deltas, rc)


def format_report(rep: dict[str, Any]) -> str:
    from bench.report import format_table

    tokens = rep.get("output_tokens")
    rows = []
    for role in ROLES:
        r = rep["roles"][role]
        if r["processes"] == 0 and r["cpu_s"] == 0:
            continue
        rows.append([role, r["processes"], f"{r['cpu_s']:.2f}", r["cores"],
                     "-" if r["ms_per_token"] is None else f"{r['ms_per_token']:.3f}"])
    lines = [format_table(["role", "procs", "cpu_s", "cores", "ms/token"], rows)]
    scope = rep["scope"]
    lines.append(f"window {rep['wall_s']:.1f} s; scope: "
                 + ("whole machine" if scope["whole_machine"] else f"tree of pids {scope['roots']}")
                 + f"; output tokens: {tokens if tokens is not None else 'unknown'}")
    lines.append(f"around the engine ({'+'.join(r for r in AROUND_ENGINE if rep['roles'][r]['processes'])}): "
                 f"{rep['around_engine_cpu_s']:.2f} CPU-s"
                 + (f" = {rep['around_engine_ms_per_token']:.3f} ms/token" if tokens else ""))
    lines.append(f"engine ({'+'.join(r for r in ENGINE if rep['roles'][r]['processes']) or 'engine_core'}): "
                 f"{rep['engine_core_cpu_s']:.2f} CPU-s"
                 + (f" = {rep['engine_core_ms_per_token']:.3f} ms/token" if tokens else ""))
    exited = sum(r["exited"] for r in rep["roles"].values())
    if exited:
        lines.append(f"note: {exited} process(es) exited inside the window; their CPU after the first "
                     "snapshot is not counted")
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("cpu", help="CPU seconds per process role over a command or a time window",
                       description="Snapshot /proc before and after COMMAND (or --duration S) and report "
                                   "CPU per role of the serving path, per output token.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--duration", type=float, help="measure a time window instead of a command")
    p.add_argument("--port", type=int, help="account only the process tree serving this port "
                   "(its listener climbed to the stack's driver); default: the whole machine")
    p.add_argument("--root", type=int, action="append", help="account only this pid's tree (repeatable)")
    p.add_argument("--root-match", help="account only the trees of processes whose command line matches")
    p.add_argument("--tokens", type=int, help="output tokens in the window (default: from the bench run "
                   "JSONs the command wrote into its --out dir, or --run-json)")
    p.add_argument("--run-json", nargs="+", help="bench run JSON files to count output tokens from")
    p.add_argument("--out", default="bench-results", help="output directory")
    p.add_argument("--name", default="cpu", help="writes <out>/<name>.json")
    p.add_argument("command", nargs="*", help="-- COMMAND... to run and measure")


def cmd_cpu(args) -> int:
    from bench.report import write_json

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command and args.duration is None:
        raise SystemExit("give a command after -- or --duration S")
    m = measure(command or None, args.duration, args.root, args.root_match, args.port,
                args.tokens, args.run_json)
    print(format_report(m.report))
    path = os.path.join(args.out, f"{args.name}.json")
    write_json(path, m.report)
    print(f"-> {path}")
    return m.returncode
