"""Sizing, A/B bookkeeping, report files, plots and the compare/size/plot
commands on synthetic run files."""

import csv
import json
import math

import pytest

from bench import ab, metrics, report, sizing
from bench.cli import main
from bench.records import ERROR, OK, RequestRecord


def test_max_rate_meeting_slo_and_bracket():
    pts = [{"load": 1, "request_per_s": 0.5, "goodput_fraction": 1.0},
           {"load": 2, "request_per_s": 0.9, "goodput_fraction": 0.95},
           {"load": 4, "request_per_s": 1.2, "goodput_fraction": 0.5},
           {"load": 8, "request_per_s": 1.3, "goodput_fraction": 0.1}]
    m = sizing.max_rate_meeting_slo(pts, 0.9)
    assert m["max_rate"] == 0.9 and m["at_load"] == 2 and m["first_failing_point"]["load"] == 4
    assert sizing.max_rate_meeting_slo(pts, 0.99)["max_rate"] == 0.5
    none = sizing.max_rate_meeting_slo(pts, 1.01)
    assert none["max_rate"] is None and none["first_failing_point"]["load"] == 1


def test_replicas_needed():
    assert sizing.replicas_needed(10, 0.9, 0.2) == 14  # 12 / 0.9 = 13.3
    assert sizing.replicas_needed(0.9, 0.9, 0.0) == 1  # exact fit
    assert sizing.replicas_needed(1.0, None) is None
    s = sizing.size([{"load": 1, "request_per_s": 2.0, "goodput_fraction": 1.0}], {"ttft": 0.5}, 0.9,
                    target_rate=5, headroom=0.2, gpus_per_replica=2)
    assert s["replicas"] == 3 and s["gpus"] == 6
    assert "3 replica(s)" in sizing.format_sizing(s)


def test_block_order_is_abba():
    assert ab.block_order(3) == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]


def _rec(i, ttft, e2el, n=3, outcome=OK):
    return RequestRecord(index=i, outcome=outcome, ttft=ttft, e2el=e2el, done=e2el, output_tokens=n,
                         prompt_tokens=5, token_times=[ttft + k * (e2el - ttft) / max(n - 1, 1) for k in range(n)],
                         output_tokens_source="usage")


def test_overhead_is_a_minus_b():
    a = [_rec(0, 0.15, 1.1), _rec(1, 0.25, 1.3)]
    # index 2 failed on B: excluded from stats and from the pairing
    b = [_rec(0, 0.10, 1.0), _rec(1, 0.20, 1.2), RequestRecord(index=2, outcome=ERROR, error_kind="503")]
    sa, sb = metrics.summarize(a, 2.0), metrics.summarize(b, 1.0)
    o = ab.overhead(sa, sb, a, b)
    assert o["added_ttft_p50_ms"] == pytest.approx(50)   # 200 - 150
    assert o["added_e2el_p50_ms"] == pytest.approx(100)  # 1200 - 1100
    assert o["added_ttft_p99_ms"] == pytest.approx(50)
    assert o["paired_ttft_median_delta_ms"] == pytest.approx(50)
    assert o["paired_e2el_median_delta_ms"] == pytest.approx(100)
    assert o["paired_ttft_n"] == 2
    assert o["throughput_ratio_req"] == pytest.approx((2 / 2.0) / (2 / 1.0))


def _write_run(path, load, recs, duration):
    s = metrics.summarize(recs, duration)
    cfg = {"load_kind": "concurrency", "load_value": load}
    report.write_json(str(path), report.run_document(cfg, {}, {}, s, recs, []))
    return {"name": "t", "load_kind": "concurrency", "load": load, "file": path.name, **report.flat_summary(s)}


@pytest.fixture
def sweep(tmp_path):
    rows = [_write_run(tmp_path / "t-c1.json", 1, [_rec(i, 0.1, 0.5) for i in range(4)], 2.0),
            _write_run(tmp_path / "t-c2.json", 2, [_rec(i, 0.3, 0.9) for i in range(4)], 1.8),
            _write_run(tmp_path / "t-c4.json", 4,
                       [_rec(i, 0.9, 1.5) for i in range(3)] + [RequestRecord(index=3, outcome=ERROR, status=503,
                                                                              error_kind="503")], 1.6)]
    report.write_csv(str(tmp_path / "t-sweep.csv"), rows)
    return tmp_path


def test_csv_round_trip(sweep):
    rows = report.read_csv(str(sweep / "t-sweep.csv"))
    assert [r["load"] for r in rows] == [1, 2, 4]
    assert rows[2]["errors_503"] == 1 and rows[0].get("errors_503") is None
    assert rows[0]["ttft_median_ms"] == pytest.approx(100)
    with open(sweep / "t-sweep.csv") as f:
        assert "ttft_p99_ms" in next(csv.reader(f))


def test_json_has_no_infinity(tmp_path):
    report.write_json(str(tmp_path / "x.json"), {"rate": math.inf, "l": [math.nan]})
    assert json.loads((tmp_path / "x.json").read_text()) == {"rate": "inf", "l": ["nan"]}


def test_size_command_recomputes_goodput_from_records(sweep, capsys):
    out = sweep / "sizing.json"
    assert main(["size", str(sweep / "t-sweep.csv"), "--slo", "ttft:400ms", "--goodput-fraction", "0.9",
                 "--target-rate", "10", "--headroom", "0.25", "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["per_replica_max_rate"] == pytest.approx(4 / 1.8) and s["at_load"] == 2
    assert s["replicas"] == math.ceil(12.5 / (4 / 1.8))
    # stricter SLO given after the fact: only concurrency 1 passes
    main(["size", str(sweep / "t-c*.json"), "--slo", "ttft:200ms", "--out", str(out)])
    assert json.loads(out.read_text())["at_load"] == 1
    assert "Max rate per replica" in capsys.readouterr().out


def test_compare_command(sweep, capsys):
    assert main(["compare", str(sweep / "t-c1.json"), str(sweep / "t-c2.json"), "--labels", "one,two"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("ttft_median_ms"))
    assert line.split()[-1] == "3.000"  # 300 ms / 100 ms


def test_plot_command_overlays_series(sweep):
    prefix = sweep / "plots" / "both"
    assert main(["plot", f"x={sweep / 't-sweep.csv'}", f"y={sweep / 't-sweep.csv'}", "--out", str(prefix)]) == 0
    for kind in ("latency", "throughput", "frontier"):
        png = (sweep / "plots" / f"both-{kind}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_summary_table_mentions_errors_and_goodput():
    recs = [_rec(0, 0.1, 0.5), RequestRecord(index=1, outcome=ERROR, error_kind="429", status=429)]
    txt = report.summary_table(metrics.summarize(recs, 1.0, slos={"ttft": 0.2}), "x")
    assert "429=1" in txt and "goodput (ttft:200ms): 1.000 req/s, 50.0% of requests" in txt


def test_format_table_aligns_numbers_right_and_shows_missing():
    from bench import report
    lines = report.format_table(["ms", "mean", "p99"], [["TTFT", 12.3456, None], ["TPOT", 1.5, 200.0]]).splitlines()
    assert lines[0].split() == ["ms", "mean", "p99"]
    assert lines[2].split() == ["TTFT", "12.3", "-"] and lines[3].split() == ["TPOT", "1.500", "200.0"]
    assert len({len(line) for line in (lines[0], lines[2], lines[3])}) == 1  # right-aligned to one width
    assert "\x1b[" not in "".join(lines)  # no colour codes in logs and files


def test_progress_prints_one_final_line_off_a_terminal():
    import io

    from bench.progress import Progress
    out = io.StringIO()
    prog = Progress(3, "run", stream=out)
    prog.update(True)
    prog.update(False)
    assert out.getvalue() == ""  # nothing live when stderr is not a terminal
    prog.close()
    assert out.getvalue().startswith("run: 2/3 done, 1 failed, ")
    quiet = io.StringIO()
    Progress(None, "q", duration_s=5, enabled=False, stream=quiet).close()
    assert quiet.getvalue() == ""
