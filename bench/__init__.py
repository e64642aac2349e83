"""Benchmark harness: throughput and setup latency of each data path on the two-facility topology.

Run it as `scripts/bench`. Each *path* (direct veth, our modes, hand-configured yardsticks) builds itself
on a fresh topology and hands back where the consumer app should connect; the harness runs iperf3 through it
several times and reports medians with min-max. Timing lives here, never in pass/fail tests.
"""
