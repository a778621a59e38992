"""Scale-out in one run: one engine alone, one engine with its quotas in Redis, and two engines
behind HAProxy sharing Redis (``make cluster``'s layout), interleaved round by round.

    .venv/bin/python bench/scale_out.py [--rounds 3] [--seconds 8] [--json F]

Every variant reads the same policy: one client (the development client certificate) with a
client quota and an account quota too large to refuse anything, so that every frame charges
both -- in the engine's memory (``one``), or in Redis (``one+state``, ``two``). Each variant
is driven over TLS by this checkout's ``dccsign bench load --closed-loop`` (frames of 50 over
10,000 accounts), ``two`` through HAProxy (TLS passed through to the engines).

The report gives per variant the median certificates/s and its ratio to the first; the CPU per
certificate of the engines (keyd, their child, not included: see ``--cpu-pid``), of
``redis-server`` and of HAProxy; and, paired per round, what the shared state costs an
engine: its CPU per certificate with ``--state`` less without (``one+state`` - ``one``),
both as measured and scaled by the generator's CPU per certificate in the same round (the
generator is the same code throughout, so the quotient takes out most of the machine's drift,
bench/README.md, session 10). Everything runs on this machine's 2 cores: two engines, their
keyds, Redis, HAProxy and the generator share them, so ``two`` measures the cost of the
layout, not what two machines would do (docs/scale-out.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from dccsign.testing import cluster as C

DCCSIGN = [sys.executable, "-m", "dccsign"]
BIG = {"per_hour": 10**9}
POLICY = {"clients": {C.DEV_CLIENT: {"quota": BIG, "account_quota": BIG}}}


def _redis_cpu(redis: C.Redis) -> float:
    """redis-server's CPU seconds so far (user + system), from INFO."""
    out = subprocess.run(
        ["redis-cli", "-p", str(redis.port), "info", "cpu"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


def _load(address: str, tls: dict, pids: dict[str, int], args, out: Path) -> dict:
    """One closed-loop run of the generator against *address*; its JSON report."""
    cpu = [x for name, pid in pids.items() for x in ("--cpu-pid", f"{name}={pid}")]
    subprocess.run(
        [*DCCSIGN, "bench", "load", "--server", address, "--cert", str(tls["client_cert"]),
         "--key", str(tls["client_key"]), "--ca", str(tls["ca"]), "--closed-loop",
         "--connections", str(args.connections), "--in-flight", str(args.in_flight),
         "--batch", "50", "--duration", str(args.seconds), "--metrics", "none", "--quiet",
         "--json", str(out), *cpu],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return json.loads(out.read_text())


def _result(report: dict, engines: list[str], redis_s: float) -> dict:
    processes = (report.get("cpu") or {}).get("processes", {})
    per_cert = {name: processes.get(name, {}).get("us_per_cert") for name in processes}
    signed = report["certs_per_s"] * report["elapsed_s"] or None
    out = {k: report[k] for k in ("certs_per_s", "busy", "p50_ms", "p99_ms", "errors")}
    out["engines_us_per_cert"] = sum(per_cert.get(e) or 0 for e in engines)
    out["generator_us_per_cert"] = per_cert.get("generator")
    out["haproxy_us_per_cert"] = per_cert.get("haproxy")
    out["redis_us_per_cert"] = redis_s * 1e6 / signed if signed and redis_s else None
    return out


def _single(work: Path, name: str, redis: C.Redis | None, args) -> dict:
    """One engine, straight over TLS (with ``--state`` when *redis* is given)."""
    cluster = C.Cluster(work / name, policy=POLICY, engine_args=args.state_args if redis else ())
    node = cluster.nodes[0]
    node.state_url = redis.url if redis is not None else None
    node.service.start()
    try:
        node.service.wait_ready(120)
        before = _redis_cpu(redis) if redis is not None else 0.0
        pids = {"engine": node.service.pid}
        report = _load(node.address, cluster.tls, pids, args, work / f"{name}.json")
        used = _redis_cpu(redis) - before if redis is not None else 0.0
        result = _result(report, ["engine"], used)
        if redis is not None:
            result["frames_per_call"] = _frames_per_call([node])
        return result
    finally:
        node.service.stop()


def _two(work: Path, args) -> dict:
    """Two engines behind HAProxy, sharing Redis."""
    with C.Cluster(work / "two", policy=POLICY, engine_args=args.state_args) as cluster:
        pids = {node.name: node.service.pid for node in cluster.nodes}
        pids["haproxy"] = cluster.haproxy.pid
        before = _redis_cpu(cluster.redis)
        report = _load(cluster.haproxy.address, cluster.tls, pids, args, work / "two.json")
        used = _redis_cpu(cluster.redis) - before
        result = _result(report, [node.name for node in cluster.nodes], used)
        result["frames_per_call"] = _frames_per_call(cluster.nodes)
        return result


def _frames_per_call(nodes: list[C.Node]) -> float | None:
    """Frames of 50 per call to the shared store over the run, from the engines' metrics
    (an operation is an account charged: 50 per frame here)."""
    ops = sum(n.metric("dccsign_state_call_operations_sum") for n in nodes)
    calls = sum(n.metric("dccsign_state_call_operations_count") for n in nodes)
    return round(ops / calls / 50, 2) if calls else None


def _paired_cost(runs: dict[str, list[dict]]) -> dict:
    """Per round, the engine's CPU per certificate with --state less without: as measured,
    and in units of the generator's CPU per certificate times its median."""
    raw, scaled = [], []
    gen = statistics.median(
        x["generator_us_per_cert"] for v in runs.values() for x in v if x["generator_us_per_cert"]
    )
    for base, shared in zip(runs["one"], runs["one+state"], strict=True):
        raw.append(shared["engines_us_per_cert"] - base["engines_us_per_cert"])
        if base["generator_us_per_cert"] and shared["generator_us_per_cert"]:
            quotient = (
                shared["engines_us_per_cert"] / shared["generator_us_per_cert"]
                - base["engines_us_per_cert"] / base["generator_us_per_cert"]
            )
            scaled.append(quotient * gen)

    def stats(values: list[float]) -> dict:
        return {
            "median": round(statistics.median(values), 2),
            "min": round(min(values), 2),
            "max": round(max(values), 2),
        }

    return {"measured_us": stats(raw), "generator_scaled_us": stats(scaled) if scaled else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=4, help="per run (default 4)")
    parser.add_argument("--in-flight", type=int, default=2, help="frames per connection")
    parser.add_argument(
        "--variants",
        type=lambda t: t.split(","),
        default=["one", "one+state", "two"],
        help="which of one, one+state, two (default all three)",
    )
    parser.add_argument(
        "--state-args",
        type=str.split,
        default=[],
        metavar="OPTIONS",
        help="more dccsign serve options for the engines with --state, e.g. '--state-window 2'",
    )
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args()
    missing = C.missing_tools()
    if missing:
        raise SystemExit(f"scale_out: needs {', '.join(missing)} (Debian packages)")
    runs: dict[str, list[dict]] = {name: [] for name in args.variants}
    with tempfile.TemporaryDirectory(prefix="dccsign-scale-") as tmp:
        work = Path(tmp)
        redis = C.Redis(work / "redis", C.free_port())
        redis.start()
        redis.wait_ready(60)
        try:
            for r in range(args.rounds):
                for name in runs:
                    if name == "two":
                        result = _two(work / f"r{r}", args)
                    else:
                        state = redis if name == "one+state" else None
                        result = _single(work / f"r{r}", name, state, args)
                    runs[name].append(result)
                    print(f"round {r}: {name} {result}", file=sys.stderr, flush=True)
        finally:
            redis.stop()
    summary = _summary(runs)
    if args.json:
        args.json.write_text(json.dumps({
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": "python bench/scale_out.py " + " ".join(sys.argv[1:]),
            "summary": summary, "rounds": runs,
        }, indent=2) + "\n")  # fmt: skip
    return 0


def _summary(runs: dict[str, list[dict]]) -> dict:
    first = statistics.median(x["certs_per_s"] for x in next(iter(runs.values())))
    summary: dict = {}
    for name, results in runs.items():
        rate = statistics.median(x["certs_per_s"] for x in results)
        row = {"certs_per_s_median": rate, "ratio_to_first": round(rate / first, 3)}
        for key in ("p99_ms", "busy", "engines_us_per_cert", "generator_us_per_cert",
                    "haproxy_us_per_cert", "redis_us_per_cert", "frames_per_call"):  # fmt: skip
            values = [x[key] for x in results if x.get(key) is not None]
            if values:
                row[f"{key}_median"] = round(statistics.median(values), 2)
        summary[name] = row
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    if "one" in runs and "one+state" in runs:
        summary["shared_state_cost_per_cert"] = _paired_cost(runs)
        print(f"shared state, engine CPU per certificate: {summary['shared_state_cost_per_cert']}")
    return summary


if __name__ == "__main__":
    raise SystemExit(main())
