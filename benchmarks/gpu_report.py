"""The GPU check's report (the last step of scripts/gpu_check.sh): one JSON and one markdown file.

    python benchmarks/gpu_report.py --out DIR --scratch SCRATCH --tests-rc 0 --bench-rc 0 \
        --elapsed setup=12 tests=80 benchmarks=190 [--dry-run 1] [--fatal "why"]

Reads SCRATCH/peers.tsv (name, status, detail per peer, written by gpu_check.sh), SCRATCH/pytest-gpu.xml
(pytest's JUnit XML) and DIR/throughput.json (benchmarks/throughput.py --gpu-check); writes
DIR/gpu_check.json and DIR/gpu_check.md. Every planned measurement appears: measured, or "not run: why".
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

SCHEMA = "fasttrdpo-gpu-check/1"


def read_peers(path):
    peers = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) == 3:
                    peers.append({"name": parts[0], "status": parts[1], "detail": parts[2]})
    return peers


def read_junit(path, rc):
    """Counts and failing test ids from pytest's JUnit XML (absent when pytest was killed by the timeout;
    rc -1: not run, --no-tests)."""
    if rc == -1:
        return {"exit_code": None, "not_run": "--no-tests", "timed_out": False, "xml": False}
    out = {"exit_code": rc, "timed_out": rc in (124, 137), "xml": os.path.exists(path)}
    if not out["xml"]:
        return out
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed, time_s = [], 0.0
    for s in suites:
        for k in counts:
            counts[k] += int(s.get(k, 0))
        time_s += float(s.get("time", 0.0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    out.update(counts, time_s=time_s, failed=failed)
    return out


def build(args):
    elapsed = {}
    for kv in args.elapsed or []:
        k, _, v = kv.partition("=")
        elapsed[k] = float(v)
    elapsed["total"] = sum(elapsed.values())
    doc = {"schema": SCHEMA, "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "dry_run": bool(int(args.dry_run)), "fatal": args.fatal, "elapsed_s": elapsed,
           "peers": read_peers(os.path.join(args.scratch, "peers.tsv")) if args.scratch else [],
           "tests": read_junit(os.path.join(args.scratch, "pytest-gpu.xml"), args.tests_rc) if args.scratch and
           args.tests_rc is not None else None,
           "benchmarks": None}
    tp = os.path.join(args.out, "throughput.json")
    if os.path.exists(tp):
        with open(tp) as f:
            bench = json.load(f)
        rows = bench["results"]
        doc["benchmarks"] = {
            "exit_code": args.bench_rc, "complete": bench.get("complete"), "file": "throughput.json",
            "environment": bench["environment"], "parts_elapsed_s": bench.get("parts_elapsed_s"),
            "measured": sum(r.get("status") == "ok" for r in rows),
            "not_run": [{"case": r["case"], "impl": r["impl"], "status": r.get("status"), "reason": r.get("reason")}
                        for r in rows if r.get("status") != "ok"],
            "targets": bench.get("targets", []),
        }
        doc["_throughput_doc"] = bench
    elif args.bench_rc is not None:
        doc["benchmarks"] = {"exit_code": args.bench_rc, "complete": False, "file": None,
                             "note": "throughput.py wrote no result file (see throughput.log)"}
    return doc


def markdown(doc) -> str:
    lines = [f"# fasttrdpo GPU check {doc['created_utc']}" + (" (dry run: tiny CPU shapes, plumbing only)"
                                                            if doc["dry_run"] else ""), ""]
    if doc.get("fatal"):
        lines += [f"**Not run:** {doc['fatal']}", ""]
    e = doc["elapsed_s"]
    lines.append("Elapsed: " + ", ".join(f"{k} {v:.0f} s" for k, v in e.items()) + ".")
    if doc["peers"]:
        lines += ["", "Peers: " + "; ".join(f"{p['name']}: {p['detail'] if p['status'] == 'ok' else 'not run: ' + p['detail']}"
                                            for p in doc["peers"]) + "."]
    t = doc.get("tests")
    if t is not None:
        if t.get("xml"):
            lines += ["", f"CUDA tests (pytest -m gpu): {t['passed']} passed, {t['failures']} failed, {t['errors']} "
                          f"errors, {t['skipped']} skipped in {t['time_s']:.0f} s (exit {t['exit_code']})."]
            if t["failed"]:
                lines += ["Failing: " + ", ".join(t["failed"]) + "."]
        elif t.get("not_run"):
            lines += ["", f"CUDA tests (pytest -m gpu): not run ({t['not_run']})."]
        else:
            lines += ["", f"CUDA tests (pytest -m gpu): no result file (exit {t['exit_code']}"
                          + (", killed by the timeout" if t["timed_out"] else "") + "); see pytest-gpu.log."]
    b = doc.get("benchmarks")
    if b is not None and doc.get("_throughput_doc"):
        from throughput import gpu_markdown

        lines += ["", gpu_markdown(doc["_throughput_doc"])]
        if not b.get("complete"):
            lines += ["", f"The benchmark run did not complete (exit {b['exit_code']}); the rows above are what it "
                          "measured before it stopped."]
    elif b is not None:
        lines += ["", f"Benchmarks: {b['note']} (exit {b['exit_code']})."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--scratch", default=None)
    ap.add_argument("--dry-run", default="0")
    ap.add_argument("--tests-rc", type=int, default=None)
    ap.add_argument("--bench-rc", type=int, default=None)
    ap.add_argument("--elapsed", nargs="*", default=[])
    ap.add_argument("--fatal", default=None)
    args = ap.parse_args(argv)
    doc = build(args)
    md = markdown(doc)
    doc.pop("_throughput_doc", None)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(args.out, "gpu_check.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return doc


if __name__ == "__main__":
    main()
