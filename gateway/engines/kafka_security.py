"""How the gateway's Kafka clients reach a secured cluster: TLS (SSL, SASL_SSL) and SASL (PLAIN,
SCRAM-SHA-256, SCRAM-SHA-512), from the --kafka-security-protocol / --kafka-sasl-* / --kafka-ssl-*
settings (gateway/config.py validates them; this module turns them into aiokafka arguments).

Every aiokafka client the gateway makes (the engine's metadata client, consumer, producer, the
short-lived replay and end-offset consumers, demo-feed's producer) is built with `client_options()`:
one SSL context and one set of credentials for all of them.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import Config

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)   # never in a repr, a log line or an error
    cafile: str | None = None      # None with TLS: the system's trusted CAs
    certfile: str | None = None    # client certificate (mutual TLS)
    keyfile: str | None = None

    @classmethod
    def from_config(cls, config: Config) -> KafkaSecurity:
        return cls(protocol=config.kafka_security_protocol, sasl_mechanism=config.kafka_sasl_mechanism,
                   username=config.kafka_sasl_username, password=config.kafka_sasl_password,
                   cafile=config.kafka_ssl_cafile, certfile=config.kafka_ssl_certfile,
                   keyfile=config.kafka_ssl_keyfile)

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    def ssl_context(self) -> ssl.SSLContext:
        """Verifies the brokers' certificates and host names (against `cafile`, or the system's CAs).
        Raises OSError (a file) or ssl.SSLError (not a certificate, key does not match)."""
        context = ssl.create_default_context(cafile=self.cafile)
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile)
        return context

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for every aiokafka client (AIOKafkaClient, consumer, producer, admin)."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.tls:
            options["ssl_context"] = self.ssl_context()
        if self.sasl:
            options.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.username,
                           sasl_plain_password=self.password)
        return options

    def describe(self) -> str:
        """For log lines: protocol, mechanism and user, never the password."""
        if not self.sasl:
            return self.protocol
        return f"{self.protocol}, {self.sasl_mechanism} as {self.username}"


def explain(exc: BaseException) -> str:
    """`exc` (from a connection to a broker) with what an operator should check, in one line."""
    text = repr(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"{text}: the brokers' TLS certificate is not trusted (is --kafka-ssl-cafile the CA that "
                "signed it, and does it name the host in --kafka?)")
    if isinstance(exc, ssl.SSLError):
        return f"{text}: TLS failed (does this listener speak TLS? check --kafka-security-protocol)"
    name = type(exc).__name__
    if name == "SaslAuthenticationFailed":
        return f"{text}: check the SASL user and password (GATEWAY_KAFKA_SASL_USERNAME, GATEWAY_KAFKA_SASL_PASSWORD)"
    if name in ("UnsupportedSaslMechanismError", "IllegalSaslStateError"):
        return f"{text}: check --kafka-sasl-mechanism against the listener's sasl.enabled.mechanisms"
    return text


async def probe(bootstrap: Sequence[tuple[str, int]], options: dict[str, Any], *, client_id: str,
                timeout_ms: int) -> BaseException | None:
    """Why no bootstrap server could be reached: aiokafka's bootstrap() logs each server's error and
    raises only "Unable to bootstrap". One direct connection per server, in order, gives the first
    real error back (None when one of them answers now)."""
    from aiokafka.conn import create_conn
    from aiokafka.errors import KafkaError

    first: BaseException | None = None
    for host, port in bootstrap:
        try:
            conn = await create_conn(host, port, client_id=client_id, request_timeout_ms=timeout_ms, **options)
        except (OSError, KafkaError, TimeoutError) as exc:
            first = first or exc
            continue
        conn.close()
        return None
    return first
