"""Gateway settings: one frozen dataclass.

Precedence: command-line flags > environment (GATEWAY_<FLAG>, e.g. GATEWAY_KAFKA, GATEWAY_JWT_SECRET)
> a TOML file (--config FILE, keys spelled like the flags with '_') > the defaults below.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from .engines.kafka_security import SASL_MECHANISMS, SECURITY_PROTOCOLS, KafkaSecurity
from .subjects import is_topic_name


class ConfigError(ValueError):
    """A setting has a bad value; the message names where it came from (flag, variable, or file and key)."""


MiB = 1024 * 1024
#: the largest integer setting: what every user of one takes (C sizes, a float without loss, an integer a
#: JSON parser in JavaScript keeps exact: heartbeat_ms goes out in `connected`); larger is a start-up error,
#: not an OverflowError at every connection
MAX_INT = 2**53 - 1
#: file descriptors kept out of --max-connections' default: /healthz, /metrics, the engine's sockets, logs
FD_RESERVE = 64


@dataclass(frozen=True, slots=True)
class Config:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8800, metadata={"help": "HTTP/WebSocket port (0 = any free port)"})
    kafka: str | None = field(default=None, metadata={
        "help": "Kafka bootstrap servers (host:port,...); without it the standalone engine runs"})
    topics: tuple[str, ...] = field(default=(), metadata={
        "help": "comma-separated Kafka topics served (Kafka engine); other topics get unknown_topic"})
    jwt_secret: str | None = field(default=None, metadata={
        "help": "HMAC secret: require JWTs signed with HS256/384/512"})
    jwt_public_key: str | None = field(default=None, metadata={
        "help": "PEM file: require JWTs signed with RS*/PS*/ES* by its private key"})
    jwt_audience: str | None = field(default=None, metadata={
        "help": "require this `aud` in every token"})
    jwt_issuer: str | None = field(default=None, metadata={
        "help": "require this `iss` in every token"})
    jwt_leeway_ms: int = field(default=5000, metadata={
        "help": "clock skew allowed when checking a token's exp/nbf/iat (also delays the 4001 close)"})
    jwt_max_lifetime_s: int = field(default=0, metadata={
        "help": "refuse tokens whose exp is more than this many seconds ahead (0 = no limit)"})
    heartbeat_ms: int = field(default=15000, metadata={
        "help": "send {op:hb} after this much silence; ping the peer, close it after 3x with no answer"})
    node_id: str | None = field(default=None, metadata={
        "help": "this gateway's id in `connected` and /healthz", "default_help": "host-pid"})
    tls_cert: str | None = field(default=None, metadata={"help": "PEM certificate: serve wss:// and https://"})
    tls_key: str | None = field(default=None, metadata={"help": "PEM private key for --tls-cert"})
    workers: int = field(default=1, metadata={
        "help": "processes sharing the port (SO_REUSEPORT); more than 1 needs --kafka; `auto` = the CPUs "
                "this process may run on (its affinity mask) with --kafka, 1 without",
        "metavar": "N|auto"})
    history: int = field(default=1000, metadata={"help": "messages kept per subject for recovery"})
    history_bytes: int = field(default=4 * MiB, metadata={"help": "bytes kept per subject for recovery"})
    history_total_bytes: int = field(default=256 * MiB, metadata={
        "help": "memory budget for all subjects' recovery state; over it the gateway forgets subjects nobody "
                "is subscribed to (least recently written first), then trims the oldest history of the others"})
    max_message_bytes: int = field(default=1 * MiB, metadata={
        "help": "largest inbound WebSocket message; larger closes with 1009. A Kafka record of another "
                "producer whose content as delivered in a msg (JSON-escaped) is larger is skipped and counted"})
    max_pending_bytes: int = field(default=4 * MiB, metadata={
        "help": "largest output queued for one connection; more closes it with 4000 (slow consumer); "
                "at least 2 x --max-message-bytes"})
    max_inflight_publishes: int = field(default=1000, metadata={
        "help": "publishes of one connection awaiting the engine; more get rate_limited"})
    coalesce_us: int = field(default=0, metadata={
        "help": "adaptive write coalescing: after a flush that wrote to at least --coalesce-min-conns "
                "connections, hold the next flush this many microseconds so the messages arriving meanwhile "
                "share one write per connection (fewer syscalls, up to this much more latency; uvloop rounds "
                "it to whole milliseconds; 0 = off)"})
    coalesce_min_conns: int = field(default=1000, metadata={
        "help": "--coalesce-us: a flush that wrote to this many connections holds the next one"})
    coalesce_busy_pct: int = field(default=85, metadata={
        "help": "--coalesce-us: hold only while the gateway is busy: from two 0.5 s periods in a row in which "
                "the event loop's thread used at least this percentage of a CPU, until a held period's share scaled by "
                "the frames per write the holds gathered, or a 0.5 s period without holds (one in seven while "
                "holding), measures less; so a window does not delay messages that would each leave alone "
                "anyway; 0 = after every big flush"})
    connect_timeout_ms: int = field(default=10000, metadata={
        "help": "close 1008 a connection that sends no connect within this time"})
    # ---- resource limits (PROTOCOL.md 1.1 "Resource limits"; docs/SECURITY.md) ----
    max_connections: int = field(default=0, metadata={
        "help": "open connections per process; over it the WebSocket upgrade gets HTTP 503 + Retry-After "
                f"(0 = the process's file limit RLIMIT_NOFILE minus a reserve of {FD_RESERVE} "
                "for /healthz, /metrics and the engine)"})
    max_connections_per_address: int = field(default=0, metadata={
        "help": "open connections per client IP address; over it the upgrade gets HTTP 429 + Retry-After (0 = off)"})
    max_subscriptions: int = field(default=1000, metadata={
        "help": "subscriptions per connection; each subject over it gets error limit_exceeded"})
    publish_rate: float = field(default=1000.0, metadata={
        "help": "publishes per second per connection (token bucket); over it: error rate_limited and the "
                "connection is not read until it is under the rate again (0 = off)"})
    publish_burst: int = field(default=0, metadata={
        "help": "token bucket size of --publish-rate: publishes a connection may send at once "
                "(0 = 2 x --publish-rate)"})
    handshake_timeout_ms: int = field(default=5000, metadata={
        "help": "close without a response a connection whose HTTP request head (with --tls-cert: TLS handshake "
                "included) is not complete within this time of its accept"})
    allowed_origins: tuple[str, ...] = field(default=(), metadata={
        "help": "comma-separated Origins allowed to open a WebSocket besides the gateway's own "
                "(an Origin matching Host); requests without Origin are accepted; '*' allows all; others get 403"})
    max_fragments: int = field(default=1024, metadata={
        "help": "WebSocket frames one message may be split into; more closes with 1009"})
    max_queued_pongs: int = field(default=16, metadata={
        "help": "pongs (answers to the client's pings) queued and not yet written; pings beyond it are "
                "not answered (RFC 6455 5.5.3)"})
    warmup_records: int = field(default=10000, metadata={
        "help": "Kafka: records read back per partition at start (snapshots, recovery window)"})
    max_recovery_records: int = field(default=100000, metadata={
        "help": "Kafka: deepest recovery read from Kafka itself, in records"})
    kafka_fetch_wait_ms: int = field(default=500, metadata={
        "help": "Kafka: fetch long-poll wait. Apache Kafka answers a fetch as soon as a record arrives, so "
                "this only sets how often an idle gateway asks: 500 (as in Kafka's own consumers) costs no latency "
                "and a third of the idle broker CPU of 5 (BENCHMARKS.md). Brokers whose fetch does not "
                "wake on new data (Tansu) need a small value, e.g. 5: it then bounds publish -> msg latency"})
    kafka_linger_ms: int = field(default=0, metadata={
        "help": "Kafka: producer linger before a batch of publishes is sent. 0: a publish goes out at once; "
                "under load publishes still share batches (one request in flight per broker), and any "
                "linger adds itself to publish -> ack and publish -> msg at low rates (BENCHMARKS.md)"})
    kafka_idempotence: str = field(default="auto", metadata={
        "help": "Kafka: idempotent producer: on, off, or auto (try, fall back to acks=all without it)"})
    kafka_publish_timeout_ms: int = field(default=5000, metadata={
        "help": "Kafka: a publish not acknowledged within this time fails with `unavailable`"})
    kafka_metadata_refresh_ms: int = field(default=5000, metadata={
        "help": "Kafka: how often topic metadata is fetched (new partitions, deleted or recreated topics); "
                "also how soon /healthz notices that Kafka is unreachable"})
    # ---- Kafka security (gateway/engines/kafka_security.py; README "Connecting to a secured cluster") ----
    kafka_security_protocol: str = field(default="PLAINTEXT", metadata={
        "help": "Kafka: how to reach the brokers: PLAINTEXT, SSL (TLS), SASL_PLAINTEXT or SASL_SSL (SASL over TLS)"})
    kafka_sasl_mechanism: str | None = field(default=None, metadata={
        "help": "Kafka: SASL mechanism with SASL_SSL or SASL_PLAINTEXT: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"})
    kafka_sasl_username: str | None = field(default=None, metadata={
        "help": "Kafka: SASL user name"})
    kafka_sasl_password: str | None = field(default=None, repr=False, metadata={
        "help": "Kafka: SASL password; refused as a flag (every user of the machine sees command lines in "
                "`ps`): set the environment variable or use --kafka-sasl-password-file",
        "secret": True})
    kafka_sasl_password_file: str | None = field(default=None, metadata={
        "help": "Kafka: file holding the SASL password (one line; a trailing newline is ignored)"})
    kafka_ssl_cafile: str | None = field(default=None, metadata={
        "help": "Kafka: PEM file of the CA certificates that signed the brokers' certificates, with SSL or "
                "SASL_SSL (without it: the system's trusted CAs)"})
    kafka_ssl_certfile: str | None = field(default=None, metadata={
        "help": "Kafka: PEM client certificate for brokers that require mutual TLS (may hold the key too)"})
    kafka_ssl_keyfile: str | None = field(default=None, metadata={
        "help": "Kafka: PEM private key of --kafka-ssl-certfile, unencrypted"})
    healthz_unreachable_ms: int = field(default=0, metadata={
        "help": "Kafka: /healthz answers 503 once Kafka has been unreachable this long (0 = never: "
                "an outage is reported as 200 `degraded` (docs/DESIGN.md \"Health\"))"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning or error"})
    demo: bool = field(default=False, metadata={
        "help": "publish the demo's score updates (as `demo-feed` does) into this gateway's engine, "
                "so the page at / moves by itself"})

    @property
    def engine(self) -> str:
        return "kafka" if self.kafka else "standalone"

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


FIELDS = {f.name: f for f in fields(Config)}
#: --workers auto, until validate() turns it into a count (no count is 0: --workers 0 is refused)
WORKERS_AUTO = 0


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, cgroup cpusets), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        return os.cpu_count() or 1
_POSITIVE = {"heartbeat_ms", "workers", "history", "history_bytes", "max_message_bytes", "max_pending_bytes",
             "max_inflight_publishes", "connect_timeout_ms", "max_recovery_records", "kafka_publish_timeout_ms",
             "kafka_metadata_refresh_ms", "max_subscriptions", "handshake_timeout_ms", "max_fragments",
             "max_queued_pongs", "history_total_bytes", "coalesce_min_conns"}
_NON_NEGATIVE = {"port", "warmup_records", "kafka_fetch_wait_ms", "kafka_linger_ms", "healthz_unreachable_ms",
                 "max_connections", "max_connections_per_address", "publish_rate", "publish_burst", "jwt_leeway_ms",
                 "jwt_max_lifetime_s", "coalesce_us", "coalesce_busy_pct"}
_LISTS = {"topics", "allowed_origins"}
#: milliseconds that go into Kafka requests as 32-bit integers (a fetch's max wait; the producer's request
#: timeout): larger kills aiokafka's fetcher or sender at its first request
_KAFKA_INT32 = {"kafka_fetch_wait_ms", "kafka_publish_timeout_ms"}
#: the settings of gateway/engines/kafka_security.py (also demo-feed's, with --kafka)
KAFKA_SECURITY = ("kafka_security_protocol", "kafka_sasl_mechanism", "kafka_sasl_username", "kafka_sasl_password",
                  "kafka_sasl_password_file", "kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile")
#: never from the command line (`ps` shows it to every user): the environment or --config only
NOT_A_FLAG = {name for name, f in FIELDS.items() if f.metadata.get("secret")}
# Given but empty is an error for these, never "not set" (an empty GATEWAY_JWT_SECRET must not turn auth off).
_EMPTY_IS_AN_ERROR = {"jwt_secret", "jwt_public_key"}


def _is_origin(text: str) -> bool:
    scheme, sep, rest = text.partition("://")
    if not (sep and scheme.lower() in ("http", "https") and rest and "/" not in rest):
        return False
    try:  # what limits.normalize_origins reads of it: a host, and a port that is a port
        parts = urlsplit(text)
        return bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:
        return False


def env_name(name: str) -> str:
    return "GATEWAY_" + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _convert(name: str, value: Any, source: str | None = None) -> Any:
    """`source` names where the value came from in errors: the flag (default), GATEWAY_X, or file and key."""
    source = source or flag_name(name)
    kind = FIELDS[name].type
    try:
        if name in _LISTS:
            items = value.split(",") if isinstance(value, str) else list(value)
            listed = tuple(str(t).strip() for t in items if str(t).strip())
            for t in listed:
                if name == "topics" and not is_topic_name(t):
                    raise ValueError(f"{t!r} is not a legal Kafka topic name")
                if name == "allowed_origins" and t != "*" and not _is_origin(t):
                    raise ValueError(f"{t!r} is not an origin (scheme://host[:port], or '*')")
            return listed
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("must be true or false")
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError("not a number")
            real = float(value)
            if real != real or real in (float("inf"), float("-inf")):
                raise ValueError("not a finite number")
            if name in _NON_NEGATIVE and real < 0:
                raise ValueError("must be >= 0")
            return real
        if name == "workers" and isinstance(value, str) and value.strip().lower() == "auto":
            return WORKERS_AUTO
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError("not an integer")
            number = int(value)
            if name in _POSITIVE and number <= 0:
                raise ValueError("must be > 0")
            if name in _NON_NEGATIVE and number < 0:
                raise ValueError("must be >= 0")
            if number > MAX_INT:
                raise ValueError(f"must be <= {MAX_INT}")
            if name in _KAFKA_INT32 and number > 2**31 - 1:
                raise ValueError(f"must be <= {2**31 - 1} (a 32-bit field of Kafka's requests)")
            if name == "port" and number > 65535:
                raise ValueError("must be <= 65535")
            if name == "coalesce_busy_pct" and number > 100:
                raise ValueError("must be <= 100")
            return number
        value = str(value)
        if name == "kafka_idempotence" and value not in ("auto", "on", "off"):
            raise ValueError("must be on, off or auto")
        if name == "kafka_security_protocol":
            value = value.strip().upper()
            if value not in SECURITY_PROTOCOLS:
                raise ValueError(f"must be one of {', '.join(SECURITY_PROTOCOLS)}")
        if name == "kafka_sasl_mechanism":
            value = value.strip().upper()
            if value not in SASL_MECHANISMS:
                raise ValueError(f"must be one of {', '.join(SASL_MECHANISMS)}")
        if name == "log_level" and value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("must be debug, info, warning or error")
        return value
    except (TypeError, ValueError) as exc:
        shown = "(hidden)" if name in NOT_A_FLAG else repr(value)
        raise ConfigError(f"{source}: bad value {shown}: {exc}") from None


def load(flags: Mapping[str, Any], env: Mapping[str, str] | None = None, file: str | None = None) -> Config:
    """Merge flags (None = not given) > env > file > defaults, validate, and return the Config."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}  # where each value came from, for the error that names it
    if file:
        try:
            with open(file, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"--config: cannot read {file}: {exc}") from None
        for key, value in data.items():
            name = key.replace("-", "_")
            if name not in FIELDS:
                raise ConfigError(f"--config: unknown setting {key!r} in {file}")
            values[name] = value
            sources[name] = f"--config {file}: key {key!r}"
    for name in FIELDS:
        if env.get(env_name(name)) not in (None, "") or (name in _EMPTY_IS_AN_ERROR and env_name(name) in env):
            values[name] = env[env_name(name)]
            sources[name] = env_name(name)
    for name, value in flags.items():
        if value is not None and name in NOT_A_FLAG:
            raise ConfigError(f"{flag_name(name)}: not accepted on the command line, where `ps` shows it to "
                              f"every user of the machine: set {env_name(name)} or use {flag_name(name)}-file")
        if value is not None and name in FIELDS:
            values[name] = value
            sources[name] = flag_name(name)
    for name in _EMPTY_IS_AN_ERROR:
        if isinstance(values.get(name), str) and not values[name].strip():
            raise ConfigError(f"{sources[name]} is empty (omit it to run without auth)")
    config = Config(**{name: _convert(name, value, sources[name]) for name, value in values.items()})
    return validate(config)


def validate(config: Config) -> Config:
    for name in _EMPTY_IS_AN_ERROR:
        if getattr(config, name) is not None and not getattr(config, name).strip():
            raise ConfigError(f"--{name.replace('_', '-')} is empty (omit it to run without auth)")
    if config.jwt_secret and config.jwt_public_key:
        raise ConfigError("--jwt-secret and --jwt-public-key exclude each other")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("--tls-cert and --tls-key go together")
    for name in ("tls_cert", "tls_key", "jwt_public_key"):
        path = getattr(config, name)
        if path and not os.path.isfile(path):
            raise ConfigError(f"--{name.replace('_', '-')}: no such file: {path}")
    if config.jwt_public_key:
        _check_public_key(config.jwt_public_key)
    if config.tls_cert:
        _check_tls(config.tls_cert, config.tls_key)
    if config.workers == WORKERS_AUTO:
        # the standalone engine keeps its state in one process: auto is 1 there, not an error
        config = dataclasses.replace(config, workers=usable_cpus() if config.kafka else 1)
    if config.workers > 1 and not config.kafka:
        raise ConfigError("--workers > 1 needs --kafka: the standalone engine keeps its state in one process")
    if config.workers > 1 and config.port == 0:
        raise ConfigError(f"--workers {config.workers} needs a fixed --port: with port 0 every worker would "
                          "pick its own")
    if config.kafka and not config.topics:
        raise ConfigError("--kafka needs --topics (the topics this gateway serves)")
    if config.demo and config.workers > 1:
        raise ConfigError("--demo runs one feed per process: use `python -m gateway demo-feed --kafka ...` "
                          "with --workers > 1")
    if config.demo and config.kafka and "matches" not in config.topics:
        raise ConfigError("--demo publishes to topic matches: add it to --topics")
    if config.max_message_bytes > 64 * MiB:
        raise ConfigError("--max-message-bytes: at most 64 MiB")
    if config.max_pending_bytes < 2 * config.max_message_bytes:
        # one maximal message (plus its frame header) must never overflow a connection by itself
        raise ConfigError(f"--max-pending-bytes ({config.max_pending_bytes}) must be at least 2 x "
                          f"--max-message-bytes ({2 * config.max_message_bytes})")
    if config.max_fragments > 65535 or config.max_queued_pongs > 65535:
        raise ConfigError("--max-fragments and --max-queued-pongs: at most 65535")
    config = _validate_kafka_security(config)
    if not config.node_id:
        config = dataclasses.replace(config, node_id=f"{os.uname().nodename}-{os.getpid()}")
    return dataclasses.replace(config, log_level=config.log_level.lower())


def _either(name: str) -> str:
    """How a setting is given, for errors about combinations: the flag and the variable."""
    return f"{flag_name(name)} ({env_name(name)})"


def _validate_kafka_security(config: Config) -> Config:
    """Combinations of the Kafka security settings; reads the password file and checks the TLS files
    now, so a mistake is one line and exit 2 at start, not a gateway that never connects."""
    protocol = config.kafka_security_protocol
    sasl = protocol.startswith("SASL_")
    tls = protocol in ("SSL", "SASL_SSL")
    if config.kafka_sasl_mechanism and not sasl:
        raise ConfigError(f"{_either('kafka_sasl_mechanism')} is {config.kafka_sasl_mechanism}, but "
                          f"{_either('kafka_security_protocol')} is {protocol}: SASL needs SASL_SSL or SASL_PLAINTEXT")
    if not sasl:
        for name in ("kafka_sasl_username", "kafka_sasl_password", "kafka_sasl_password_file"):
            if getattr(config, name) is not None:
                raise ConfigError(f"{_either(name)} is set, but {_either('kafka_security_protocol')} is "
                                  f"{protocol}: SASL credentials need SASL_SSL or SASL_PLAINTEXT")
    if not tls:
        for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"):
            if getattr(config, name) is not None:
                raise ConfigError(f"{_either(name)} is set, but {_either('kafka_security_protocol')} is "
                                  f"{protocol}: TLS settings need SSL or SASL_SSL")
    if sasl:
        if not config.kafka_sasl_mechanism:
            raise ConfigError(f"{_either('kafka_security_protocol')} {protocol} needs "
                              f"{_either('kafka_sasl_mechanism')}: one of {', '.join(SASL_MECHANISMS)}")
        if not (config.kafka_sasl_username or "").strip():
            raise ConfigError(f"{_either('kafka_security_protocol')} {protocol} needs a user name: "
                              f"{_either('kafka_sasl_username')}")
        if config.kafka_sasl_password is not None and config.kafka_sasl_password_file is not None:
            raise ConfigError(f"{env_name('kafka_sasl_password')} and {_either('kafka_sasl_password_file')} "
                              "exclude each other: give the password once")
        if config.kafka_sasl_password_file is not None:
            path = config.kafka_sasl_password_file
            try:
                with open(path, encoding="utf-8") as fh:
                    password = fh.read().rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
                raise ConfigError(f"{flag_name('kafka_sasl_password_file')}: cannot read {path}: {reason}") from None
            if not password:
                raise ConfigError(f"{flag_name('kafka_sasl_password_file')}: {path} is empty")
            config = dataclasses.replace(config, kafka_sasl_password=password)
        if not config.kafka_sasl_password:
            raise ConfigError(f"{_either('kafka_security_protocol')} {protocol} needs a password: set "
                              f"{env_name('kafka_sasl_password')} or {_either('kafka_sasl_password_file')}")
    if config.kafka_ssl_keyfile and not config.kafka_ssl_certfile:
        raise ConfigError(f"{_either('kafka_ssl_keyfile')} needs {_either('kafka_ssl_certfile')}")
    if tls:
        for name in ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile"):
            path = getattr(config, name)
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"{flag_name(name)}: no such file: {path}")
        try:
            KafkaSecurity.from_config(config).ssl_context()
        except (OSError, ssl.SSLError) as exc:
            files = ", ".join(f"{flag_name(n)} {getattr(config, n)}" for n in
                              ("kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile") if getattr(config, n))
            raise ConfigError(f"{files or 'the system CA certificates'}: not usable for TLS: {exc}") from None
    return config


def _check_tls(cert: str, key: str | None) -> None:
    """At start, like the JWT key: a certificate and key the server cannot use are one line and exit 2,
    not an OpenSSL error from inside the start (or, with --workers, every worker failing in turn)."""
    try:
        # (a password callback: an encrypted key fails here instead of OpenSSL asking for its pass phrase)
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key, password=lambda: b"")
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--tls-cert {cert} and --tls-key {key}: not a usable PEM certificate and unencrypted "
                          f"private key of it: {exc}") from None


def _check_public_key(path: str) -> None:
    """At start, not at the first client: a bad key is one line and exit 2, not `unauthorized` for all."""
    from .auth import KeyConfigError, load_public_key

    try:
        with open(path, "rb") as fh:
            load_public_key(fh.read())
    except OSError as exc:
        raise ConfigError(f"--jwt-public-key: cannot read {path}: {exc.strerror}") from None
    except KeyConfigError as exc:
        raise ConfigError(f"--jwt-public-key: {path}: {exc}") from None
