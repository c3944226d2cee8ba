"""Command line: run / ab / size / compare / plot / cpu / capacity / make-adapters. See bench/README.md."""

from __future__ import annotations

import argparse
import asyncio
import glob
import math
import os
import sys
from typing import Any

from bench import ab as ab_mod
from bench import envinfo, metrics, plots, report, sizing
from bench.client import Endpoint, get_json, make_client, send
from bench.loadgen import LoadShape, run_load
from bench.progress import Progress
from bench.tokens import load_tokenizer
from bench.workloads import JsonlWorkload, MixedWorkload, RandomWorkload, SharedPrefixWorkload


POINT_STRIDE = 1_000_000  # request-index offset between sweep points


def _floats(text: str) -> list[float]:
    return [math.inf if x.strip() == "inf" else float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _add_target(p: argparse.ArgumentParser, ab: bool = False) -> None:
    if not ab:
        p.add_argument("--base-url", required=True, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model name sent in the request body")
    p.add_argument("--api", choices=("chat", "completions", "responses"), default="chat")
    p.add_argument("--api-key", default=os.environ.get("BENCH_API_KEY"),
                   help="bearer token (default: $BENCH_API_KEY)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="send vLLM's ignore_eos so every request generates exactly max_tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, s")


def _add_workload(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", choices=("random", "jsonl", "shared-prefix", "mixed"), default="random")
    g.add_argument("--tokenizer", help="local tokenizer dir (HF format) for real token counts")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--input-len", type=int, default=128)
    g.add_argument("--output-len", type=int, default=None, help="max tokens per request (default 64; "
                   "for jsonl: per-line value, else server default)")
    g.add_argument("--range-ratio", type=float, default=0.0)
    g.add_argument("--dataset", help="JSONL file for --workload jsonl")
    g.add_argument("--shuffle", action="store_true", help="jsonl: shuffle lines with --seed")
    g.add_argument("--num-prefixes", type=int, default=4)
    g.add_argument("--prefix-len", type=int, default=512)
    g.add_argument("--suffix-len", type=int, default=32)
    g.add_argument("--short-input", type=int, default=64)
    g.add_argument("--short-output", type=int, default=16)
    g.add_argument("--long-input", type=int, default=1024)
    g.add_argument("--long-output", type=int, default=128)
    g.add_argument("--long-fraction", type=float, default=0.2)


def _add_stats(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slo", default=None, help="goodput SLOs, e.g. ttft:500ms,tpot:50ms (also e2el, itl)")
    p.add_argument("--percentiles", default="50,90,99")
    p.add_argument("--out", default="bench-results", help="output directory")
    p.add_argument("--name", default=None, help="file name prefix (default: <workload>-<api>)")
    p.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    run = sub.add_parser("run", help="load one URL at one or more load levels (a sweep)")
    _add_target(run)
    _add_workload(run)
    g = run.add_argument_group("load")
    m = g.add_mutually_exclusive_group(required=True)
    m.add_argument("--concurrency", type=_ints, help="closed loop; comma list sweeps, e.g. 1,8,32")
    m.add_argument("--rate", type=_floats, help="open loop req/s; comma list sweeps; inf = all at once")
    g.add_argument("--max-concurrency", type=int, default=None, help="cap in-flight requests with --rate")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 burstier")
    g.add_argument("--ramp-up", type=float, default=0.0, help="seconds to ramp rate/concurrency up")
    g.add_argument("--num-requests", type=int, default=None)
    g.add_argument("--min-waves", type=int, default=0,
                   help="concurrency mode: send at least this many x concurrency requests per point, "
                        "so high-concurrency points are not a single burst")
    g.add_argument("--duration", type=float, default=None, help="stop issuing after this many seconds")
    g.add_argument("--drain-timeout", type=float, default=60.0,
                   help="with --duration: wait this long for in-flight requests, then cancel")
    g.add_argument("--warmup", type=int, default=0, help="warm-up requests per point, excluded")
    g.add_argument("--same-prompts", action="store_true",
                   help="reuse the same prompts at every sweep point (default: fresh ones per point, "
                        "so a prefix cache cannot serve later points from earlier ones)")
    _add_stats(run)

    abp = sub.add_parser("ab", help="router-overhead A/B: same requests to two URLs, interleaved")
    abp.add_argument("--url-a", required=True)
    abp.add_argument("--url-b", required=True)
    abp.add_argument("--label-a", default="a")
    abp.add_argument("--label-b", default="b")
    _add_target(abp, ab=True)
    _add_workload(abp)
    abp.add_argument("--concurrency", type=int, default=1)
    abp.add_argument("--num-requests", type=int, default=40, help="per side")
    abp.add_argument("--block", type=int, default=None, help="requests per block (default 2x concurrency)")
    abp.add_argument("--warmup", type=int, default=2, help="per side")
    _add_stats(abp)

    sz = sub.add_parser("size", help="replicas needed for a target rate, from a one-replica sweep")
    sz.add_argument("inputs", nargs="+", help="run JSON files or a sweep CSV")
    sz.add_argument("--slo", required=True)
    sz.add_argument("--goodput-fraction", type=float, default=0.9)
    sz.add_argument("--target-rate", type=float, default=None, help="req/s to serve")
    sz.add_argument("--headroom", type=float, default=0.2)
    sz.add_argument("--gpus-per-replica", type=int, default=1, help="0 for CPU replicas")
    sz.add_argument("--out", default=None, help="write sizing JSON here")

    cp = sub.add_parser("compare", help="run JSON files side by side, ratios to the first")
    cp.add_argument("inputs", nargs="+")
    cp.add_argument("--labels", default=None, help="comma-separated column labels")

    pl = sub.add_parser("plot", help="plots from one or more sweep CSVs (overlaid)")
    pl.add_argument("inputs", nargs="+", help="sweep CSV files; label=path to name a series")
    pl.add_argument("--out", required=True, help="output prefix, e.g. results/stack-vs-vllm")

    de = sub.add_parser("difficulty-eval", help="accuracy of the `auto` route's difficulty classifier (offline)")
    de.add_argument("--mt-bench", help="FastChat's mt_bench question.jsonl (not shipped)")
    de.add_argument("--max-large-share", type=float, default=0.5)
    de.add_argument("--seed", type=int, default=0)
    de.add_argument("--out", default="bench/results/difficulty.md")
    de.add_argument("--embedding", choices=("static", "local"), default="static",
                    help="as router.difficulty_embedding: the model's token embeddings averaged, or the full model")

    from bench import auto_live, capacity, cpuprof, engine_counters, scoring, simulate
    simulate.add_parser(sub)
    scoring.add_parser(sub)
    engine_counters.add_parser(sub)
    auto_live.add_parser(sub)
    cpuprof.add_parser(sub)
    capacity.add_parser(sub)
    from bench import abuse, chaos, live_change  # start and break a real stack; need the serving package
    chaos.add_parser(sub)
    live_change.add_parser(sub)
    abuse.add_parser(sub)
    from bench import adapters  # uses serving's model cache folder
    adapters.add_parser(sub)
    return ap


def cmd_difficulty_eval(args) -> int:
    from bench import difficulty_eval
    print(difficulty_eval.run(args.mt_bench, args.out, args.max_large_share, args.seed, args.embedding))
    return 0


def make_workload(args, counter):
    out_len = args.output_len
    if args.workload == "random":
        return RandomWorkload(counter, args.input_len, out_len or 64, args.range_ratio, args.seed)
    if args.workload == "shared-prefix":
        return SharedPrefixWorkload(counter, args.num_prefixes, args.prefix_len, args.suffix_len,
                                    out_len or 64, args.range_ratio, args.seed)
    if args.workload == "mixed":
        return MixedWorkload(counter, args.short_input, args.short_output, args.long_input,
                             args.long_output, args.long_fraction, args.range_ratio, args.seed)
    if not args.dataset:
        raise SystemExit("--workload jsonl needs --dataset FILE")
    return JsonlWorkload(counter, args.dataset, out_len, args.shuffle, args.seed)


def _endpoint(args, base_url: str) -> Endpoint:
    return Endpoint(base_url=base_url, model=args.model, api=args.api, api_key=args.api_key,
                    ignore_eos=args.ignore_eos, temperature=args.temperature)


async def _server_info(base_url: str, api_key: str | None) -> dict:
    return {"base_url": base_url, "models": await get_json(base_url, "/v1/models", api_key),
            "version": await get_json(base_url, "/version", api_key)}


def _sender(ep: Endpoint, client, counter):
    count = counter.count if counter.tok is not None else None

    async def _send(req, rec, t0):
        return await send(client, ep, req, rec, t0, count)
    return _send


def _load_label(kind: str, v: float) -> str:
    return f"c{v:g}" if kind == "concurrency" else ("rinf" if math.isinf(v) else f"r{v:g}")


def cmd_run(args) -> int:
    if args.num_requests is None and args.duration is None:
        raise SystemExit("give --num-requests and/or --duration")
    pcts = _floats(args.percentiles)
    slos = metrics.parse_slos(args.slo)
    counter = load_tokenizer(args.tokenizer)
    workload = make_workload(args, counter)
    ep = _endpoint(args, args.base_url)
    name = args.name or f"{workload.name}-{args.api}"
    kind, loads = ("concurrency", args.concurrency) if args.concurrency else ("rate", args.rate)
    env = envinfo.collect()
    server = asyncio.run(_server_info(args.base_url, args.api_key))
    rows: list[dict[str, Any]] = []
    for point, load in enumerate(loads):
        n_req = args.num_requests
        if n_req is not None and kind == "concurrency" and args.min_waves:
            n_req = max(n_req, args.min_waves * int(load))
        shape = LoadShape(
            concurrency=int(load) if kind == "concurrency" else None,
            rate=load if kind == "rate" else None, max_concurrency=args.max_concurrency,
            burstiness=args.burstiness, ramp_up_s=args.ramp_up, num_requests=n_req,
            duration_s=args.duration, warmup=args.warmup, drain_timeout_s=args.drain_timeout, seed=args.seed)
        prog = Progress(n_req, f"{name} {shape.label()}", args.duration,
                        enabled=not args.no_progress)

        async def go():
            conn = shape.concurrency or shape.max_concurrency or 256
            async with make_client(conn, args.timeout) as client:
                # Fresh prompts per point: with prefix caching on, re-sending the
                # previous point's prompts would turn prefills into cache hits.
                first = 0 if args.same_prompts else point * POINT_STRIDE
                return await run_load(workload, _sender(ep, client, counter), shape, prog, first_index=first)
        res = asyncio.run(go())
        prog.close()
        summary = metrics.summarize(res.records, res.duration_s, pcts, slos)
        config = {"command": "run", "args": {k: v for k, v in vars(args).items() if k != "api_key"},
                  "api_key_set": bool(args.api_key), "endpoint": {"url": ep.url, "model": ep.model, "api": ep.api},
                  "workload": workload.describe(), "load": shape.describe(), "load_kind": kind,
                  "load_value": "inf" if math.isinf(load) else load,
                  "tokenizer": args.tokenizer, "token_count_source": counter.source}
        path = os.path.join(args.out, f"{name}-{_load_label(kind, load)}.json")
        report.write_json(path, report.run_document(config, env, server, summary, res.records, res.warmup_records))
        print(report.summary_table(summary, f"{name} {shape.label()}"))
        print(f"-> {path}\n")
        rows.append({"name": name, "load_kind": kind, "load": load, "file": os.path.basename(path),
                     **report.flat_summary(summary)})
    csv_path = os.path.join(args.out, f"{name}-sweep.csv")
    report.write_csv(csv_path, rows)
    print(f"sweep summary -> {csv_path}")
    if len(rows) >= 2:
        for p in plots.sweep_plots([(name, rows)], os.path.join(args.out, name)):
            print(f"plot -> {p}")
    return 0


def cmd_ab(args) -> int:
    pcts = _floats(args.percentiles)
    slos = metrics.parse_slos(args.slo)
    counter = load_tokenizer(args.tokenizer)
    workload = make_workload(args, counter)
    ea, eb = _endpoint(args, args.url_a), _endpoint(args, args.url_b)
    block = args.block or 2 * args.concurrency
    name = args.name or f"ab-{args.label_a}-vs-{args.label_b}-c{args.concurrency}"
    env = envinfo.collect()
    servers = {args.label_a: asyncio.run(_server_info(args.url_a, args.api_key)),
               args.label_b: asyncio.run(_server_info(args.url_b, args.api_key))}
    prog = Progress(2 * args.num_requests, name, enabled=not args.no_progress)

    async def go():
        async with make_client(args.concurrency, args.timeout) as ca, make_client(args.concurrency, args.timeout) as cb:
            return await ab_mod.run_ab(workload, _sender(ea, ca, counter), _sender(eb, cb, counter),
                                       args.concurrency, args.num_requests, block, args.warmup, prog)
    res = asyncio.run(go())
    prog.close()
    s = ab_mod.summarize_ab(res, pcts, slos)
    la, lb = args.label_a, args.label_b
    print(report.summary_table(s["a"], f"{la} ({args.url_a})"))
    print(report.summary_table(s["b"], f"{lb} ({args.url_b})"))
    o = s["overhead"]
    print(f"\n== overhead of {la} over {lb} (concurrency {args.concurrency}, {args.num_requests} req/side) ==")
    print(report.format_table(["metric", "value"], [[k, v] for k, v in o.items()]))
    doc = {"schema": "bench.ab/1",
           "config": {"command": "ab", "args": {k: v for k, v in vars(args).items() if k != "api_key"},
                      "block": block, "workload": workload.describe(), "token_count_source": counter.source},
           "environment": env, "servers": servers, "labels": {"a": la, "b": lb},
           "summary": {la: s["a"], lb: s["b"]}, "overhead": o,
           "records": {la: [r.to_dict() for r in res["records"]["a"]],
                       lb: [r.to_dict() for r in res["records"]["b"]]}}
    path = os.path.join(args.out, f"{name}.json")
    report.write_json(path, doc)
    print(f"-> {path}")
    return 0


def _points_from_inputs(inputs: list[str], slos: dict[str, float]) -> list[dict[str, Any]]:
    files: list[str] = []
    for i in inputs:
        if i.endswith(".csv"):
            base = os.path.dirname(os.path.abspath(i))
            files += [os.path.join(base, r["file"]) for r in report.read_csv(i)]
        else:
            files += sorted(glob.glob(i)) or [i]
    points = []
    for f in files:
        doc = report.load_json(f)
        recs = report.load_records(doc)
        # Goodput is re-evaluated from the raw records, so sizing can use a
        # different SLO than the run was made with.
        s = metrics.summarize(recs, doc["summary"]["duration_s"], doc["summary"]["percentiles"], slos)
        lv = doc["config"]["load_value"]
        points.append({"file": os.path.basename(f), "load_kind": doc["config"]["load_kind"],
                       "load": math.inf if lv == "inf" else lv,
                       "request_per_s": s["throughput"]["request_per_s"],
                       "goodput_fraction": s["throughput"]["goodput_fraction"],
                       "goodput_req_per_s": s["throughput"]["goodput_req_per_s"]})
    return sorted(points, key=lambda p: p["load"])


def cmd_size(args) -> int:
    slos = metrics.parse_slos(args.slo)
    points = _points_from_inputs(args.inputs, slos)
    result = sizing.size(points, slos, args.goodput_fraction, args.target_rate, args.headroom,
                         args.gpus_per_replica)
    print(sizing.format_sizing(result))
    if args.out:
        report.write_json(args.out, {"schema": "bench.sizing/1", "inputs": args.inputs, **result})
        print(f"-> {args.out}")
    return 0


def cmd_compare(args) -> int:
    docs = [report.load_json(p) for p in args.inputs]
    labels = args.labels.split(",") if args.labels else [os.path.splitext(os.path.basename(p))[0] for p in args.inputs]
    if len(labels) != len(docs):
        raise SystemExit("--labels must name every input")
    print(report.compare_table(labels, [report.flat_summary(d["summary"]) for d in docs]))
    return 0


def cmd_plot(args) -> int:
    series = []
    for item in args.inputs:
        label, _, path = item.rpartition("=")
        path = path or item
        series.append((label or os.path.splitext(os.path.basename(path))[0], report.read_csv(path)))
    for p in plots.sweep_plots(series, args.out):
        print(f"plot -> {p}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Per-point tables should show up in logs as each point finishes.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    if hasattr(args, "func"):  # subcommands that register their own entry point
        return args.func(args)
    return {"run": cmd_run, "ab": cmd_ab, "size": cmd_size, "compare": cmd_compare,
            "plot": cmd_plot, "difficulty-eval": cmd_difficulty_eval,
            "simulate": lambda a: __import__("bench.simulate").simulate.cmd_simulate(a),
            "cpu": lambda a: __import__("bench.cpuprof").cpuprof.cmd_cpu(a),
            "capacity": lambda a: __import__("bench.capacity").capacity.cmd_capacity(a)}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
