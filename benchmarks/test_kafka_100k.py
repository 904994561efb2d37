"""The sizing and counting rules of benchmarks/kafka_100k.py and the load generator's publish plans
(`python -P -m pytest benchmarks/test_kafka_100k.py`, bench extra; well under a second, no sockets).

Not part of the test suite (tests/): it checks the benchmark harness, not the gateway.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "load")]
import loadgen  # noqa: E402

import kafka_100k as k  # noqa: E402


def test_workers_needed_keeps_the_busiest_worker_under_the_limit() -> None:
    # 100k over 5 workers is 20,000 each on average: over 18,000. 6 give 16,667 +- 118 (4 sd: 17,139).
    assert k.workers_needed(100_000, 18_000) == 6
    assert k.workers_needed(18_000, 18_000) == 1  # one worker holds all: no hashing, no spread
    assert k.workers_needed(18_001, 18_000) == 2
    assert k.workers_needed(10_000, 18_000) == 1
    for n in (19_000, 50_000, 100_000, 250_000):
        w = k.workers_needed(n, 18_000)
        share, sd = n / w, math.sqrt(n * (1 / w) * (1 - 1 / w))
        assert share + 4 * sd <= 18_000
        if w > 1:  # and one fewer would not do
            w1 = w - 1
            assert n / w1 + 4 * math.sqrt(n * (1 / w1) * (1 - 1 / w1)) > 18_000
    with pytest.raises(ValueError):
        k.workers_needed(0, 18_000)


def test_client_sched_modes_are_a_policy_and_an_optional_pace() -> None:
    assert all(k.client_mode_ok(m) for m in ("other", "batch", "batch:1000", "other:0"))
    assert not any(k.client_mode_ok(m) for m in ("idle", "batch:", "batch:1ms", ":1000", "batch:-1", ""))


def test_client_processes_refuse_more_than_the_open_files_limit() -> None:
    assert k.client_processes(100_000, 12_500, 20_000) == 8
    assert k.client_processes(100_001, 12_500, 20_000) == 9
    with pytest.raises(ValueError, match="open-files limit is 20000"):
        k.client_processes(100_000, 19_500, 20_000)
    with pytest.raises(ValueError):
        k.client_processes(100_000, 0, 20_000)


def test_verdict_is_one_and_a_half_floors_plus_the_kafka_round_trip() -> None:
    v = k.verdict(p99_ms=100.0, floor_ms=40.0, rtt_ms=50.0)
    assert v["target_ms"] == 110.0 and v["met"] is True
    assert k.verdict(p99_ms=111.0, floor_ms=40.0, rtt_ms=50.0)["met"] is False


def test_expected_deliveries_count_the_acks_not_the_newest_seq() -> None:
    per_subject = np.array([0, 300, 200, 100])  # subscribers of subjects 1..3
    # a reused topic: the newest seq may be far above this round's publishes; only acks count
    assert loadgen.expected_deliveries(per_subject, {"1": 4, "3": 2}) == 300 * 4 + 100 * 2
    assert loadgen.expected_deliveries(per_subject, {}) == 0


def test_steady_plan_is_even_and_round_robin() -> None:
    due, subj = loadgen.publish_plan(4.0, 2.0, 3)
    assert due == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    assert subj == [1, 2, 3, 1, 2, 3, 1, 2]


def test_demo_plan_is_the_demo_feeds_bursts() -> None:
    due, subj = loadgen.publish_plan(1.0, 600.0, 10, "demo", seed=3)
    ticks = sorted(set(due))
    assert ticks == [2.0 * i for i in range(300)]  # a burst every 2 s
    sizes = [due.count(t) for t in ticks]
    assert min(sizes) >= 1 and max(sizes) <= 5
    assert 1.3 < len(due) / 600.0 < 1.7  # the demo's 1.5 msgs/s on average
    assert set(subj) == set(range(1, 11))
    assert loadgen.publish_plan(1.0, 600.0, 10, "demo", seed=3) == (due, subj)  # seeded
    due10, _ = loadgen.publish_plan(10.0, 60.0, 10, "demo", seed=3)
    assert sorted(set(due10))[:3] == [0.0, 0.2, 0.4]  # x10: a burst every 0.2 s
    with pytest.raises(ValueError, match="10 matches"):
        loadgen.publish_plan(1.0, 10.0, 5, "demo")
    with pytest.raises(ValueError, match="unknown publish pattern"):
        loadgen.publish_plan(1.0, 10.0, 10, "bursty")


def test_largest_burst_sums_the_subscribers_of_a_ticks_updates() -> None:
    per_subject = np.array([0] + [100 * i for i in range(1, 11)])  # subject i has 100 x i subscribers
    due, subj = loadgen.publish_plan(1.0, 60.0, 10, "demo", seed=5)
    worst = max({t: sum(per_subject[s] for d, s in zip(due, subj) if d == t) for t in set(due)}.values())
    burst = k.largest_burst(per_subject, "demo", 1.0, 60.0, 5)
    assert burst["sends"] == worst and 1 <= burst["messages"] <= 5
    # steady: one message per instant, the busiest subject's subscribers
    assert k.largest_burst(per_subject, "steady", 1.5, 10.0, 0) == {"messages": 1, "sends": 1000}
