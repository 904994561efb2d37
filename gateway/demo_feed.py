"""The live-scores demo's traffic: `python -m gateway demo-feed` and `serve --demo`.

Every 2 seconds (divided by `rate`) a random number of 1 to 5 score updates, each on a randomly
chosen match among /matches/football/1..10, with the content `score_home` or `score_away`. The demo
page adds them up: a match's score is the number of `score_home` and `score_away` messages of its
subject, which is why every open page shows the same scores only if no message is lost or doubled.

Three ways out, one schedule:

    --url ws://HOST:PORT/ws   through a gateway, with the Python client (publishes acked)
    --kafka BOOTSTRAP         straight into topic `matches`, key `football/N`, with aiokafka's
                              default (murmur2) partitioner, like any other producer of the topic;
                              TLS and SASL from the gateway's --kafka-security-protocol, --kafka-sasl-*
                              and --kafka-ssl-* settings (flags or GATEWAY_* variables)
    serve --demo              inside a gateway, into its engine (no socket)

The schedule (`schedule`) is pure and seeded; `run` plays it against any `Publish` callable and is
bounded by `count` (updates) and `duration` (seconds) when they are given.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import random
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

from . import config as cfg
from .engines.base import Engine
from .engines.kafka_security import KafkaSecurity, explain, probe
from .subjects import parse_subject

log = logging.getLogger("gateway.demo_feed")

MATCHES = 10
SUBJECT = "/matches/football/{}"
EVENTS = ("score_home", "score_away")
INTERVAL_S = 2.0
MAX_PER_TICK = 5

#: publish one update: (subject, content); raises on failure
Publish = Callable[[str, str], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Tick:
    """One batch of updates, due `at` seconds after the feed started."""

    at: float
    updates: tuple[tuple[str, str], ...]


def schedule(rng: random.Random, *, rate: float = 1.0, count: int | None = None,
             duration: float | None = None) -> Iterator[Tick]:
    """The feed's ticks: one every INTERVAL_S / rate seconds from 0, each with 1..MAX_PER_TICK
    updates on random matches. Ends after `count` updates in all (the last tick is cut short) or
    before the first tick due at or after `duration` seconds; endless without either."""
    if not 0 < rate < math.inf:
        raise ValueError("rate must be a finite number > 0")
    if duration is not None and not 0 <= duration <= math.inf:
        raise ValueError("duration must be a number >= 0")
    interval = INTERVAL_S / rate
    left = count
    n = 0
    while left is None or left > 0:
        at = n * interval
        if duration is not None and at >= duration:
            return
        size = rng.randint(1, MAX_PER_TICK)
        if left is not None:
            size = min(size, left)
            left -= size
        yield Tick(at, tuple((SUBJECT.format(rng.randint(1, MATCHES)), rng.choice(EVENTS))
                             for _ in range(size)))
        n += 1


@dataclass(slots=True)
class FeedStats:
    published: int = 0
    failed: int = 0
    #: per subject, how many updates of each kind were published (acknowledged) by this feed
    totals: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, subject: str, content: str) -> None:
        self.published += 1
        per = self.totals.setdefault(subject, dict.fromkeys(EVENTS, 0))
        per[content] += 1


async def run(publish: Publish, *, rng: random.Random | None = None, rate: float = 1.0,
              count: int | None = None, duration: float | None = None,
              stats: FeedStats | None = None) -> FeedStats:
    """Play the schedule against `publish`, each tick at its time (no drift: ticks are due at
    fixed offsets from the start, a slow tick does not push the next ones back). The updates of a
    tick are published concurrently; a failed one is logged, counted and not retried (the page
    shows what was delivered, and a retry could double a goal whose ack was lost)."""
    rng = rng if rng is not None else random.Random()
    stats = stats if stats is not None else FeedStats()
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(subject: str, content: str) -> None:
        try:
            await publish(subject, content)
        except Exception as exc:  # noqa: BLE001 - a demo feed keeps going through an outage
            stats.failed += 1
            log.warning("demo feed: publish %s %s failed: %s", subject, content, exc)
        else:
            stats.add(subject, content)

    for tick in schedule(rng, rate=rate, count=count, duration=duration):
        delay = start + tick.at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        await asyncio.gather(*(one(s, c) for s, c in tick.updates))
    return stats


# --------------------------------------------------------------------------- the three ways out


def engine_publisher(engine: Engine) -> Publish:
    """Publish into a gateway's engine (serve --demo): what a client's publish does, minus the socket."""

    async def publish(subject: str, content: str) -> object:
        return await engine.publish(parse_subject(subject), content.encode())

    return publish


Play = Callable[[Publish], Awaitable[FeedStats]]


async def _run_url(url: str, token: str | None, play: Play) -> FeedStats:
    from .client import Client

    async with Client([url], token=token, name="gateway-demo-feed/0.1") as client:
        return await play(client.publish)


async def _run_kafka(bootstrap: str, play: Play, security: KafkaSecurity | None = None) -> FeedStats:
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaConnectionError

    options = (security or KafkaSecurity()).client_options()
    # acks=all like the gateway's own producer; aiokafka's default partitioner is murmur2 of the key
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", client_id="gateway-demo-feed", **options)
    try:
        await producer.start()
    except KafkaConnectionError:
        await producer.stop()
        # "Unable to bootstrap" says nothing of a wrong password or an untrusted certificate: ask directly
        cause = await probe([(h, p) for h, p, _ in producer.client.hosts], options,
                            client_id="gateway-demo-feed", timeout_ms=10_000)
        if cause is None:
            raise
        raise cause from None
    try:
        async def publish(subject: str, content: str) -> object:
            s = parse_subject(subject)
            return await producer.send_and_wait(s.topic, content.encode(), key=s.key_bytes)

        return await play(publish)
    finally:
        await producer.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `demo-feed` subcommand's flags (a client of the gateway, not one of its settings)."""
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--url", metavar="WS_URL", help="publish through this gateway, e.g. ws://127.0.0.1:8800/ws")
    out.add_argument("--kafka", metavar="BOOTSTRAP",
                     help="produce straight into topic `matches` of this Kafka cluster (host:port,...)")
    for name in cfg.KAFKA_SECURITY:   # the gateway's own settings: same flags, variables and checks
        if name in cfg.NOT_A_FLAG:
            continue
        parser.add_argument(cfg.flag_name(name), dest=name, default=None, metavar=name.split("_")[-1].upper(),
                            help=f"{cfg.FIELDS[name].metadata['help']} (env {cfg.env_name(name)}; with --kafka)")
    parser.add_argument("--token", metavar="JWT", default=None,
                        help="token for --url when the gateway requires one (needs pub_allow on /matches/>)")
    parser.add_argument("--rate", type=float, default=1.0, metavar="X",
                        help="multiply the pace: a tick every 2 s / X (default: 1)")
    parser.add_argument("--count", type=int, default=None, metavar="N", help="stop after N updates")
    parser.add_argument("--duration", type=float, default=None, metavar="SECONDS", help="stop after this long")
    parser.add_argument("--seed", type=int, default=None, metavar="N", help="seed the random choices (repeatable runs)")


def main(args: argparse.Namespace) -> int:
    """Run `demo-feed` with parsed arguments; print one summary line; 0 unless every publish failed."""
    # (not `<= 0`: NaN passes it, and a tick due at NaN is never waited for)
    if not 0 < args.rate < math.inf:
        print("python -m gateway demo-feed: error: --rate must be a finite number > 0", file=sys.stderr)
        return 2
    if args.count is not None and args.count <= 0 or args.duration is not None and not 0 < args.duration < math.inf:
        print("python -m gateway demo-feed: error: --count and --duration must be finite numbers > 0", file=sys.stderr)
        return 2
    if args.token and not args.url:
        print("python -m gateway demo-feed: error: --token goes with --url", file=sys.stderr)
        return 2
    security = None
    given = {name: getattr(args, name, None) for name in cfg.KAFKA_SECURITY if name not in cfg.NOT_A_FLAG}
    if args.url and any(v is not None for v in given.values()):
        print("python -m gateway demo-feed: error: the --kafka-* settings go with --kafka", file=sys.stderr)
        return 2
    if args.kafka:
        names = {cfg.env_name(name) for name in cfg.KAFKA_SECURITY}
        try:
            loaded = cfg.load(given, env={k: v for k, v in os.environ.items() if k in names})
        except cfg.ConfigError as exc:
            print(f"python -m gateway demo-feed: error: {exc}", file=sys.stderr)
            return 2
        security = KafkaSecurity.from_config(loaded)
    stats = FeedStats()

    def play(publish: Publish) -> Awaitable[FeedStats]:
        return run(publish, rng=random.Random(args.seed), rate=args.rate, count=args.count,
                   duration=args.duration, stats=stats)

    async def go() -> FeedStats:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):  # stop at once, then print the summary
            loop.add_signal_handler(sig, task.cancel)
        if args.url:
            return await _run_url(args.url, args.token, play)
        return await _run_kafka(args.kafka, play, security)

    target = args.url or f"Kafka {args.kafka} topic matches"
    print(f"demo feed: publishing to {target} (1-{MAX_PER_TICK} updates every "
          f"{INTERVAL_S / args.rate:g} s)", flush=True)
    try:
        asyncio.run(go())
    except asyncio.CancelledError:
        pass
    except Exception as exc:  # noqa: BLE001 - one line for an unreachable gateway or broker
        print(f"python -m gateway demo-feed: error: {explain(exc)}", file=sys.stderr)
        return 1
    print(f"demo feed: {stats.published} updates published, {stats.failed} failed", flush=True)
    return 1 if stats.failed and not stats.published else 0


def start_in(engine: Engine, *, rate: float = 1.0) -> Callable[[], Awaitable[None]]:
    """Start the endless feed into `engine` (serve --demo); returns the coroutine function that stops it."""
    task = asyncio.get_running_loop().create_task(run(engine_publisher(engine), rate=rate))

    async def stop() -> None:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    return stop


__all__: Sequence[str] = ("EVENTS", "FeedStats", "MATCHES", "Play", "Publish", "Tick", "add_arguments",
                          "engine_publisher", "main", "run", "schedule", "start_in")
