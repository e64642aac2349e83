"""`scripts/bench`: every path on a fresh topology, iperf3 through it, medians with min-max, setup latency."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.paths import IPERF_PORT, PATHS, BenchPath, Target
from tests.integration.topology import (
    Facility,
    create_topology,
    destroy_topology,
    have_tools,
    run_iperf_client,
)

ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Figure:
    """Several runs of one measurement."""

    values: list[float] = field(default_factory=list)
    note: str = ""
    digits: int = 0

    def __str__(self) -> str:
        if not self.values:
            return self.note or "n/a"
        median, d = statistics.median(self.values), self.digits
        return f"{median:,.{d}f} ({min(self.values):,.{d}f}-{max(self.values):,.{d}f})"

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else 0.0


@dataclass
class PathResult:
    path: str
    label: str
    tcp1: Figure = field(default_factory=Figure)
    cpu1: Figure = field(default_factory=Figure)  # machine CPU busy during the one-stream runs, %
    cost1: Figure = field(default_factory=lambda: Figure(digits=2))  # path processes' CPU s per GB
    tcp4: Figure = field(default_factory=Figure)
    udp: Figure = field(default_factory=Figure)
    udp_loss: Figure = field(default_factory=Figure)
    setup: list[float] = field(default_factory=list)

    def setup_text(self) -> str:
        if not self.setup:
            return "n/a"
        ordered = sorted(self.setup)
        p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
        return f"{statistics.median(ordered) * 1000:.0f} / {p95 * 1000:.0f}"


def _bytes(report: dict[str, object], key: str) -> float:
    end = report["end"]
    assert isinstance(end, dict)
    return float(end[key]["bytes"])


def _mbits(report: dict[str, object], key: str) -> float:
    end = report["end"]
    assert isinstance(end, dict)
    return float(end[key]["bits_per_second"]) / 1e6


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    total = sum(fields)
    return total - fields[3] - fields[4], total  # idle and iowait are not busy


def path_cpu_seconds(facilities: tuple[Facility, ...]) -> dict[int, float]:
    """CPU seconds used so far by each process in the facilities' namespaces other than iperf3: the
    path's own processes (relays, stunnel, wireguard-go, the appliances)."""
    found: dict[int, float] = {}
    for facility in facilities:
        for pid in facility.pids():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue  # exited meanwhile
            name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
            if name != "iperf3":
                found[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    return found


def measure_throughput(
    facilities: tuple[Facility, Facility], target: Target, result: PathResult, args: argparse.Namespace
) -> None:
    consumer = facilities[1]
    entry = f"{target.host}:{target.port}"
    for _ in range(args.runs):
        busy0, total0 = cpu_times()
        used0 = path_cpu_seconds(facilities)
        tcp1 = run_iperf_client(consumer, entry, seconds=args.seconds, timeout=args.seconds + 60)
        used1 = path_cpu_seconds(facilities)
        busy1, total1 = cpu_times()
        result.tcp1.values.append(_mbits(tcp1, "sum_received"))
        result.cpu1.values.append(100 * (busy1 - busy0) / max(1, total1 - total0))
        received = _bytes(tcp1, "sum_received") / 1e9
        used = sum(used1[pid] - used0[pid] for pid in used1.keys() & used0.keys())
        result.cost1.values.append(used / received if received else 0.0)
        if target.streams4:
            tcp4 = run_iperf_client(
                consumer, entry, seconds=args.seconds, timeout=args.seconds + 60, streams=4
            )
            result.tcp4.values.append(_mbits(tcp4, "sum_received"))
        else:
            result.tcp4.note = "not measured"
        if target.udp:
            udp = run_iperf_client(
                consumer,
                entry,
                seconds=args.seconds,
                udp=True,
                bitrate=args.udp_rate,
                length=args.udp_length,
                timeout=args.seconds + 60,
            )
            end = udp["end"]
            assert isinstance(end, dict)
            # sum_received is what the producer app got; sum carries the loss the server reported.
            result.udp.values.append(float(end["sum_received"]["bits_per_second"]) / 1e6)
            result.udp_loss.values.append(float(end["sum"]["lost_percent"]))
        else:
            result.udp.note = result.udp_loss.note = "not supported"


def measure_setup(path: BenchPath, consumer: Facility, result: PathResult, count: int) -> None:
    pair, mode = path.appliances(), path.mode()
    if pair is None or mode is None or count <= 0:
        return
    a, b = pair
    done = consumer.run(
        sys.executable, "-m", "bench.setup_latency",
        "--producer", a.address, "--consumer", b.address,
        "--producer-ca", str(a.ca_file), "--consumer-ca", str(b.ca_file),
        "--producer-token", a.admin_token, "--consumer-token", b.admin_token,
        "--dest", f"127.0.0.1:{IPERF_PORT}", "--mode", mode, "--count", str(count),
        timeout=count * 10 + 30,
    )  # fmt: skip
    result.setup = json.loads(done.stdout)


def run_path(name: str, args: argparse.Namespace) -> PathResult:
    path = PATHS[name]()
    result = PathResult(name, path.label)
    with tempfile.TemporaryDirectory(prefix=f"scistream-bench-{name}-") as workdir:
        topology = create_topology(Path(workdir), mtu=args.mtu)
        try:
            topology.a.spawn("iperf3", "-s", "-p", str(IPERF_PORT))
            topology.a.wait_listening("tcp", IPERF_PORT)
            target = path.start(topology)
            measure_throughput(topology.facilities, target, result, args)
            measure_setup(path, topology.b, result, args.setup_sessions)
        finally:
            path.stop()
            destroy_topology(topology)
    return result


def table(results: list[PathResult], args: argparse.Namespace) -> str:
    head = (
        "| path | TCP 1 stream, Mbit/s | CPU busy during it, % | path's CPU, s per GB | "
        "TCP 4 streams, Mbit/s | "
        f"UDP {args.udp_rate} offered ({args.udp_length} B), Mbit/s received | UDP loss, % | "
        f"setup p50 / p95, ms ({args.setup_sessions} sessions) |"
    )
    rows = [head, "|---|---|---|---|---|---|---|---|"]
    for r in results:
        loss = (
            f"{r.udp_loss.median:.2f} ({min(r.udp_loss.values):.2f}-{max(r.udp_loss.values):.2f})"
            if r.udp_loss.values
            else str(r.udp_loss)
        )
        cells = [r.label, r.tcp1, r.cpu1, r.cost1, r.tcp4, r.udp, loss, r.setup_text()]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(rows)


def write_report(results: list[PathResult], args: argparse.Namespace) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(
        [
            "# Benchmark results",
            "",
            f"{when} on {platform.node()} ({os.cpu_count()} cores, Linux {platform.release()}).",
            f"Command: `scripts/bench {' '.join(sys.argv[1:])}`. Each figure: median (min-max) of "
            f"{args.runs} runs of {args.seconds} s iperf3 between two namespaces joined by a veth pair "
            f"(MTU {args.mtu}); "
            "CPU busy: all cores of the machine together while the one-stream runs ran. Path's CPU: CPU "
            "seconds the path's own processes (relays, stunnel, wireguard-go; not iperf3) used per GB "
            "received in the one-stream runs, kernel work done on their behalf included: what a byte "
            "costs, which drifts less than throughput on a shared machine.",
            "",
            table(results, args),
            "",
        ]
    )
    report = out / "latest.md"
    report.write_text(text)
    plot(results, out / "latest.png")
    return report


def plot(results: list[PathResult], target: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib missing; no plot", file=sys.stderr)
        return
    labels = [r.label for r in results]
    series = {"TCP 1 stream": [r.tcp1 for r in results], "TCP 4 streams": [r.tcp4 for r in results]}
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(results) + 2))
    height = 0.38
    for i, (name, figures) in enumerate(series.items()):
        ys = [y + i * height for y in range(len(results))]
        medians = [f.median for f in figures]
        errors = [
            [f.median - min(f.values) if f.values else 0 for f in figures],
            [max(f.values) - f.median if f.values else 0 for f in figures],
        ]
        ax.barh(ys, medians, height, xerr=errors, label=name, capsize=3)
    ax.set_yticks([y + height / 2 for y in range(len(results))], labels)
    ax.set_xlabel("Mbit/s (median, min-max)")
    ax.invert_yaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(target, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of: {', '.join(PATHS)}")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--udp-rate", default="200M")
    parser.add_argument("--udp-length", type=int, default=1200)
    parser.add_argument("--setup-sessions", type=int, default=50)
    parser.add_argument(
        "--mtu", type=int, default=1500, help="MTU of the veth pair between the facilities (e.g. 9000)"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    names = [n.strip() for n in args.paths.split(",") if n.strip()]
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        parser.error(f"unknown path(s) {', '.join(unknown)}; known: {', '.join(PATHS)}")
    why_not = have_tools()
    if why_not:
        print(f"bench: {why_not}", file=sys.stderr)
        return 1
    results = []
    for name in names:
        print(f"==> {PATHS[name].label}", flush=True)
        results.append(run_path(name, args))
    print()
    print(table(results, args))
    print(f"\nwritten: {write_report(results, args)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
