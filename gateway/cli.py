"""`kafka-ws-gateway serve [...]` (or `python -m gateway serve`): the operating contract of PROTOCOL.md;
`demo-feed`: the demo's traffic (gateway/demo_feed.py); `--version`.

main(argv) is testable: it returns the exit code; bad flags or values print one line and return 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Sequence
from multiprocessing import resource_tracker
from multiprocessing.connection import wait as wait_for_exits
from typing import Any, NoReturn

from . import __version__
from . import config as cfg
from .config import Config, ConfigError

log = logging.getLogger("gateway")

#: the signals that stop the gateway (PROTOCOL.md "Operating contract": close every client 1001, exit 0)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: how the console script (pyproject's [project.scripts]) calls itself; gateway/__main__.py passes
#: "python -m gateway"
PROG = "kafka-ws-gateway"


class _RepeatFilter(logging.Filter):
    """Let one line of each kind through per interval: aiokafka logs a failed connection attempt about
    every 100 ms during a Kafka outage; the engine logs the outage itself."""

    def __init__(self, interval: float = 30.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka"):
            return True
        key = (record.name, str(record.msg))
        last = self._last.get(key)
        if last is not None and record.created - last < self.interval:
            return False
        self._last[key] = record.created
        return True


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, no usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Kafka-native WebSocket gateway")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    serve = sub.add_parser(
        "serve", help="run the gateway",
        description="Run the gateway. Every flag also reads from the environment as GATEWAY_<FLAG> "
                    "(e.g. GATEWAY_KAFKA, GATEWAY_JWT_SECRET); flags win, then the environment, then "
                    "--config, then the defaults.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = Config()
    for name, f in cfg.FIELDS.items():
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        shown = f.metadata.get("default_help", ",".join(default) if isinstance(default, tuple) else default)
        # no default (None, no topics): say only where else the value may come from
        where = f"default: {shown}; " if shown not in (None, "") else ""
        help_text = f"{f.metadata['help']} ({where}env {cfg.env_name(name)})"
        if f.type == "bool":  # a switch: given = on; the environment or the file may say false
            serve.add_argument(flag, dest=name, default=None, action="store_const", const=True, help=help_text)
            continue
        meta = f.metadata.get("metavar") or {"int": "N"}.get(f.type,  # type: ignore[arg-type]
                                                             name.split("_")[-1].upper())
        serve.add_argument(flag, dest=name, default=None, metavar=meta, help=help_text)
    serve.add_argument("--config", default=None, metavar="FILE", help="TOML file with settings (env GATEWAY_CONFIG)")
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    # ArgumentDefaultsHelpFormatter would print "None": the help texts say the real defaults.
    serve.formatter_class = argparse.HelpFormatter
    feed = sub.add_parser(
        "demo-feed", help="publish the live-scores demo's traffic",
        description="Publish the demo's traffic: every 2 s, 1 to 5 score updates (score_home / score_away) "
                    "on random subjects among /matches/football/1..10, through a gateway (--url) or "
                    "straight into Kafka topic matches (--kafka). Runs until stopped, --count or --duration.")
    from . import demo_feed

    demo_feed.add_arguments(feed)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command == "demo-feed":
        from . import demo_feed

        logging.basicConfig(level="WARNING", stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return demo_feed.main(args)
    flags = {k: v for k, v in vars(args).items() if k in cfg.FIELDS}
    try:
        # --config, like every flag, also reads from the environment (flag first)
        config = cfg.load(flags, file=args.config or os.environ.get("GATEWAY_CONFIG") or None)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    missing = _missing_extension()
    if missing:
        print(f"{prog}: error: {missing}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # on the handler: logger filters miss child loggers
        handler.addFilter(_RepeatFilter())
    if config.workers > 1 and not args.reuse_port:
        return _run_workers(config, argv, prog)
    return _run(config, reuse_port=args.reuse_port, prog=prog)


def _missing_extension() -> str | None:
    """What to do when the compiled fanout modules are missing, or None when fanout imports.

    The usual cause: `python -m gateway` run inside the checkout imports the source tree (the current
    directory comes first on sys.path), where the .pyx were never compiled."""
    try:
        import fanout  # noqa: F401
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("fanout._"):
            raise
        import importlib.util

        spec = importlib.util.find_spec("fanout")
        where = os.path.dirname(spec.origin) if spec and spec.origin else "the fanout package"
        return (f"the compiled fanout extension ({exc.name}) is not built in {where}: install the package "
                "(pip install .) and run it from outside the source tree (or with python -P), or use "
                "scripts/serve.sh")
    return None


def _run(config: Config, *, reuse_port: bool = False, announce: bool = True, prog: str = PROG) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        runner: Any = asyncio.run
    else:
        runner = uvloop.run
    from .auth import KeyConfigError
    from .engines.base import EngineUnavailable

    try:
        return int(runner(_serve(config, reuse_port=reuse_port, announce=announce)))
    except KeyConfigError as exc:  # the key file changed after the flags were checked
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except (OSError, EngineUnavailable) as exc:  # port taken, Kafka unreachable: one line, no traceback
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1


async def _serve(config: Config, *, reuse_port: bool, announce: bool) -> int:
    from .limits import raise_file_limit
    from .server import FANOUT_KIND, Gateway

    raise_file_limit()  # each connection is a file descriptor: use all the system allows this process
    gw = Gateway(config)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    # SIGTERM/SIGINT while starting (Kafka: connecting, catching up) end the start; then they stop the
    # gateway. A worker is born with them blocked (_run_workers): one sent while it booted arrives now.
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, main_task.cancel)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        await gw.start(reuse_port=reuse_port)
    except asyncio.CancelledError:
        log.info("stopped while starting")
        await gw.stop()
        return 0
    stop_feed = None
    if config.demo:
        from . import demo_feed

        stop_feed = demo_feed.start_in(gw.engine)
    stop = asyncio.Event()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    if main_task.cancelling():  # a signal whose cancellation the start swallowed
        main_task.uncancel()
        stop.set()
    parent = multiprocessing.parent_process()
    if reuse_port and parent is not None and parent.sentinel is not None:
        # a worker of _run_workers: its parent's end of this pipe closes when the parent dies, however
        # (kill -9 too); stop then as on SIGTERM instead of serving on as an orphan nobody supervises
        # (once: the pipe stays readable, and a reader left on it would spin the loop through the stop)
        def parent_died(fd: int = parent.sentinel) -> None:
            loop.remove_reader(fd)
            stop.set()

        loop.add_reader(parent.sentinel, parent_died)
    if announce:
        print(f"gateway {__version__} {config.node_id} serving on {gw.url} "
              f"(WebSocket {gw.url.replace('http', 'ws', 1)}ws, engine {config.engine}, fanout {FANOUT_KIND}"
              f"{', demo feed on' if config.demo else ''}) - open {gw.url} for the demo", flush=True)
    await stop.wait()
    log.info("shutting down")
    if stop_feed is not None:
        await stop_feed()
    await gw.stop()
    return 0


def _worker(argv: list[str], prog: str) -> None:
    sys.exit(main(argv, prog))


#: a worker that dies is restarted after this delay, doubled for every death soon after a start
WORKER_RESTART_DELAY = 0.5
WORKER_RESTART_MAX_DELAY = 30.0
#: a worker that lived this long before dying starts again from the first delay
WORKER_STABLE_AFTER = 60.0


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def _run_workers(config: Config, argv: Sequence[str] | None, prog: str = PROG) -> int:
    """N processes on one port (SO_REUSEPORT); each reads every partition and serves its own clients.

    The parent supervises: a worker that dies (crash, OOM kill, kill -9) is logged and started again
    after a backoff (WORKER_RESTART_DELAY, doubling up to WORKER_RESTART_MAX_DELAY while it keeps
    dying young). SIGTERM/SIGINT go to every worker, and then nothing is restarted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ctx = multiprocessing.get_context("spawn")
    # each worker its own node id (the `server` of `connected`, the `node` of /healthz)
    names = [f"{config.node_id}-w{i}" for i in range(1, config.workers + 1)]
    procs: dict[str, Any] = {}
    started: dict[str, float] = {}
    quick_deaths = dict.fromkeys(names, 0)
    restart_at: dict[str, float] = {}
    stopping = False

    def start(name: str) -> None:
        p = ctx.Process(target=_worker, args=([*argv, "--reuse-port", "--node-id", name], prog), daemon=False)
        # Born with SIGTERM and SIGINT blocked (the mask is inherited through fork and exec): signalled
        # while it imports, it would die of SIGTERM or print a KeyboardInterrupt traceback; _serve
        # unblocks them once its loop handles them, and a pending one stops it then.
        # (multiprocessing's resource tracker, started by the first p.start(), unblocks both signals when
        # it is started: start it first, outside the block)
        resource_tracker.ensure_running()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        procs[name] = p
        started[name] = time.monotonic()

    for name in names:
        start(name)
    print(f"gateway: {config.workers} workers on port {config.port} (pids "
          f"{', '.join(str(procs[n].pid) for n in names)})", flush=True)

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True
        restart_at.clear()
        for p in procs.values():
            if p.pid is not None and p.is_alive():
                os.kill(p.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        running = [p for p in procs.values() if p.exitcode is None]
        if stopping and not running:
            break
        now = time.monotonic()
        timeout = max(0.0, min(restart_at.values()) - now) if restart_at else 1.0
        if running:
            wait_for_exits([p.sentinel for p in running], timeout)
        else:
            time.sleep(min(timeout, 1.0))
        now = time.monotonic()
        for name, p in procs.items():
            if p.exitcode is None or stopping or name in restart_at:
                continue
            quick_deaths[name] = 0 if now - started[name] >= WORKER_STABLE_AFTER else quick_deaths[name] + 1
            delay = min(WORKER_RESTART_MAX_DELAY, WORKER_RESTART_DELAY * 2 ** max(quick_deaths[name] - 1, 0))
            log.error("worker %s (pid %s) died (%s); restarting it in %.1f s",
                      name, p.pid, _exit_reason(p.exitcode), delay)
            restart_at[name] = now + delay
        for name, when in list(restart_at.items()):
            if when <= now and not stopping:
                del restart_at[name]
                start(name)
                log.warning("worker %s restarted (pid %s)", name, procs[name].pid)
    return max((p.exitcode or 0) for p in procs.values())
