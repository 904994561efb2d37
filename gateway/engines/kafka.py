"""The Kafka engine: an aiokafka bridge where a record's offset is its seq.

    publish(/T/k) -> producer, acks=all, key "k" (murmur2 partition) or keyless -> partition 0
                  -> (epoch of the partition, offset + 1)
    consumer      -> manual assign of EVERY partition of the served topics (no group, no commits)
                  -> per fetched batch of a partition, grouped by subject: the hub's deliver_run once
                     per subject (records in offset order, seq = offset + 1; subjects of one batch
                     in order of their first record), or sink(Record) per record in offset order
    metadata      -> refreshed periodically: new topics and partitions are assigned; a recreated
                     topic (new topic id) gets a new epoch and is read from its start
    replay()      -> a short-lived consumer: assign + seek, read the range, keep the subject's key
    too large     -> a record whose content as delivered (JSON-escaped, or base64) is over
                     --max-message-bytes is skipped and counted on every path (consumer, replay,
                     snapshot), and is no record's prev: its msg could overflow every subscriber

Epoch = hash(cluster id, topic, topic id, partition): the same on every gateway of one cluster, so a
client recovers on any of them. See PROTOCOL.md "Messages" and "Subjects / Kafka mapping".

Every gateway reads every partition because any client may subscribe to any subject here; Kafka
is the only shared state, so nothing is coordinated between gateways.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import logging
import operator
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from aiokafka import AIOKafkaClient, AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
    OffsetOutOfRangeError,
    RequestTimedOutError,
)
from aiokafka.partitioner import murmur2
from aiokafka.protocol.abstract import AbstractType
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.metadata import MetadataRequest as _LegacyMetadataRequest
from aiokafka.protocol.types import Boolean, CompactArray, CompactString, Int16, Int32, Schema, TaggedFields
from aiokafka.structs import TopicPartition

from ..protocol import content_too_large
from ..subjects import Subject, subject_for_record
from . import kafka_records
from .base import Engine, EngineUnavailable, Record, UnknownTopic
from .kafka_security import KafkaSecurity, explain, probe

log = logging.getLogger(__name__)

_REQUEST_TIMEOUT_MS = 15_000   # consumer/metadata requests; fetches themselves wait fetch_wait_ms
_POLL_MS = 100                 # getmany wait: also how soon a new assignment is applied
#: a replay or snapshot read knows its records are there: its fetches need no long poll, and a long one
#: costs its full wait again when the reader stops (aiokafka waits for the fetch in flight)
_READ_RANGE_FETCH_WAIT_MS = 10
#: how long a short-lived reader's stop may wait for its connections to close gracefully (see _close_reader)
_READER_CLOSE_GRACE_S = 0.5
_MAX_BATCH = 2000              # records handed to the sink per loop turn: a catch-up of 100k records
                               # must not hold the loop (clients, heartbeats, /healthz) for a second
_SUBJECT_CACHE_MAX = 100_000
#: newest seq of recently written subjects (for `prev`), over all partitions: a topic with millions of
#: keys must not grow the engine without limit; a subject not remembered gets prev unknown (absent)
_LAST_SEQS_MAX = 200_000
_UNKNOWN_TOPIC_OR_PARTITION = 3
#: at most one log line per this many seconds about records skipped as too large (a producer writing
#: many of them must not flood the log; the counter has them all)
_TOO_LARGE_LOG_S = 60.0
_by_seq = operator.attrgetter("seq")
#: publish -> ack latency histogram bounds (seconds); acks=all on a healthy cluster is a few ms
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_CONNECTION_ERRORS = (KafkaConnectionError, NodeNotReadyError, RequestTimedOutError, KafkaTimeoutError, TimeoutError)


def partition_for_key(key: bytes | None, partitions: int) -> int:
    """Kafka's default partitioner (Java client, aiokafka): murmur2, positive, mod count; keyless -> 0."""
    if key is None or partitions <= 0:
        return 0
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


def partition_epoch(cluster_id: str, topic: str, topic_id: str, partition: int) -> str:
    """16 hex chars; identical on every gateway of the cluster, changes when the topic is recreated."""
    text = f"{cluster_id}\0{topic}\0{topic_id}\0{partition}".encode()
    return hashlib.sha256(text).hexdigest()[:16]


# --- Metadata v10: the first version whose response carries the topic id. aiokafka stops at v5. ---

class _Uuid(AbstractType[bytes]):
    @classmethod
    def encode(cls, value: bytes) -> bytes:
        return value

    @classmethod
    def decode(cls, data: BytesIO) -> bytes:
        return data.read(16)


class _MetadataResponseV10(Response):
    API_KEY = 3
    API_VERSION = 10
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("brokers", CompactArray(
            ("node_id", Int32), ("host", CompactString("utf-8")), ("port", Int32),
            ("rack", CompactString("utf-8")), ("tags", TaggedFields))),
        ("cluster_id", CompactString("utf-8")),
        ("controller_id", Int32),
        ("topics", CompactArray(
            ("error_code", Int16), ("name", CompactString("utf-8")), ("topic_id", _Uuid),
            ("is_internal", Boolean),
            ("partitions", CompactArray(
                ("error_code", Int16), ("partition_index", Int32), ("leader_id", Int32),
                ("leader_epoch", Int32), ("replica_nodes", CompactArray(Int32)),
                ("isr_nodes", CompactArray(Int32)), ("offline_replicas", CompactArray(Int32)),
                ("tags", TaggedFields))),
            ("topic_authorized_operations", Int32), ("tags", TaggedFields))),
        ("cluster_authorized_operations", Int32),
        ("tags", TaggedFields),
    )


class _MetadataRequestV10(RequestStruct):
    FLEXIBLE_VERSION = True
    API_KEY = 3
    API_VERSION = 10
    RESPONSE_TYPE = _MetadataResponseV10
    SCHEMA = Schema(
        ("topics", CompactArray(("topic_id", _Uuid), ("name", CompactString("utf-8")), ("tags", TaggedFields))),
        ("allow_auto_topic_creation", Boolean),
        ("include_cluster_authorized_operations", Boolean),
        ("include_topic_authorized_operations", Boolean),
        ("tags", TaggedFields),
    )


class _MetadataRequest(Request[_MetadataRequestV10]):
    API_KEY = 3

    def __init__(self, topics: list[str]) -> None:
        self._topics = topics

    def build(self, request_struct_class: type[_MetadataRequestV10]) -> _MetadataRequestV10:
        # Never auto-create: a served topic that does not exist yet is picked up when it appears.
        topics: list[tuple[bytes, str, dict[int, bytes]]] = [(bytes(16), t, {}) for t in self._topics]
        return request_struct_class(topics, False, False, False, {})


@dataclass(slots=True, frozen=True)
class _TopicMeta:
    topic_id: str      # hex, "" when the broker does not tell
    partitions: int


@dataclass(slots=True)
class _Partition:
    """What the engine knows about one assigned partition."""

    epoch: str
    next: int | None = None    # next offset to hand to the sink; None: position not chosen yet
    # read from offset 0: a subject's first record has prev 0. Not from a log start past 0: retention
    # deleted what came before, and a subject's first record there may follow messages of it now gone
    complete: bool = False
    # read on from the log start `floor` after retention deleted records this gateway had not read (its
    # position fell out of range): a subject's first record since has prev `floor`, the seq of the last
    # record deleted, an upper bound of its real prev (that record may not be the subject's): a client
    # holding an older seq sees a gap and resubscribes (recovered:false), one holding `floor` did miss
    # nothing. None otherwise; like `complete`, it holds only while `last` has lost no subject
    floor: int | None = None
    # subject -> seq of its newest record, least recently written first; bounded (see _LAST_SEQS_MAX):
    # once one is dropped, `complete` is False (a subject not in it may have had records before)
    last: OrderedDict[str, int] = field(default_factory=OrderedDict)
    consumed: int = 0          # records read from it (a counter for /metrics; a new epoch starts at 0)


async def _finish_stop(consumer: Any) -> None:
    """What AIOKafkaConsumer.stop() does after its fetcher's close, for a stop that the fetcher cut short:
    the fetch tasks left are cancelled and awaited, then the client (its connections) is closed."""
    pending = list(getattr(getattr(consumer, "_fetcher", None), "_pending_tasks", ()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    client = getattr(consumer, "_client", None)
    if client is not None:
        await client.close()


def outcome_unknown(exc: BaseException) -> bool:
    """Whether a publish that failed with `exc` after its record was handed to the producer may still be
    in Kafka: a timeout, ours or the producer's (the produce request may have been appended and only its
    answer be late or lost), or a retriable error (it may follow an attempt that was appended). A
    non-retriable broker error (too large, not authorized, invalid) refuses the record: not written."""
    return isinstance(exc, (TimeoutError, KafkaTimeoutError)) or bool(getattr(exc, "retriable", False))


class KafkaEngine(Engine):
    accepts_positions_ahead = True

    def __init__(
        self,
        bootstrap: str,
        topics: Sequence[str],
        *,
        fetch_wait_ms: int = 500,
        linger_ms: int = 0,
        warmup_records: int = 10_000,
        max_recovery_records: int = 100_000,
        idempotence: bool | None = None,
        publish_timeout: float = 5.0,
        metadata_refresh_s: float = 5.0,
        client_id: str = "gateway",
        replay_timeout: float = 10.0,
        max_concurrent_replays: int = 8,
        start_timeout: float = 30.0,
        security: KafkaSecurity | None = None,
        max_message_bytes: int = 1 << 20,
    ) -> None:
        super().__init__()
        self._bootstrap = bootstrap
        self._security = security or KafkaSecurity()
        # TLS and SASL for every client this engine makes (one SSL context shared by all of them)
        self._client_options = self._security.client_options()
        self._served = frozenset(topics)
        self._fetch_wait_ms = fetch_wait_ms
        self._linger_ms = linger_ms
        self._warmup = max(0, warmup_records)
        self._max_recovery = max_recovery_records
        self._idempotence = idempotence
        self._publish_timeout = publish_timeout
        self._refresh_s = metadata_refresh_s
        self._client_id = client_id
        self._replay_timeout = replay_timeout
        self._replay_slots = asyncio.Semaphore(max_concurrent_replays)
        self._start_timeout = start_timeout
        # A record whose content as delivered is over --max-message-bytes is skipped (a producer other
        # than the gateway wrote it): its `msg` could overflow every subscriber's --max-pending-bytes.
        # Only a value longer than `_suspect` can be: 6 bytes per byte escaped, plus the member's name.
        self._max_content = max_message_bytes
        self._suspect = max(-1, (max_message_bytes - 16) // 6)
        self._too_large_logged = -_TOO_LARGE_LOG_S   # monotonic time of the last log line about them
        self._too_large_unlogged = 0                  # skipped since that line

        self._meta: AIOKafkaClient | None = None
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._stopped = False
        self._send_lock = asyncio.Lock()
        self._refresh_lock = asyncio.Lock()
        self._legacy_metadata = False

        self._cluster_id = ""
        self._topic_meta: dict[str, _TopicMeta] = {}
        self._parts: dict[TopicPartition, _Partition] = {}
        self._dirty = False                              # assignment must be (re)applied
        self._waiting: dict[TopicPartition, int | None] = {}   # warmup: tp -> high watermark to reach
        self._ready = False
        self._subjects: dict[tuple[str, bytes | None], Subject | None] = {}
        self._metadata_failing = False
        self._unreachable_since: float | None = None     # wall clock of the first failed metadata fetch
        self._unreachable_mono: float | None = None
        self._missing: dict[str, float] = {}              # served topic seen before, now deleted -> since
        self._gone_ids: dict[str, str] = {}               # deleted topic -> its topic id (epoch on return)
        self._latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self._latency_sum = 0.0
        self.idempotent = False

        self._n: dict[str, int] = dict.fromkeys((
            "records_consumed", "records_skipped_bad_key", "records_skipped_keyless", "records_skipped_too_large",
            "records_duplicate", "offset_gaps", "sink_errors", "publishes", "publish_errors", "publish_outcome_unknown",
            "metadata_errors", "replays", "snapshot_reads", "replay_failures", "epoch_changes", "offset_resets"), 0)

    # ----------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._started or self._stopped:
            raise RuntimeError("a KafkaEngine starts once")
        self._started = True
        try:
            async with asyncio.timeout(self._start_timeout):
                await self._start()
        except (KafkaError, OSError, TimeoutError) as exc:
            await self.stop()
            raise EngineUnavailable(f"cannot start the Kafka engine on {self._bootstrap} "
                                    f"({self._security.describe()}): {explain(exc)}") from exc
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        self._meta = AIOKafkaClient(
            bootstrap_servers=self._bootstrap, client_id=self._client_id + "-metadata",
            request_timeout_ms=_REQUEST_TIMEOUT_MS, **self._client_options)
        try:
            await self._meta.bootstrap()
        except KafkaConnectionError:
            # aiokafka logs each server's error and raises "Unable to bootstrap": ask one directly,
            # so a wrong password or an untrusted certificate is named in the start-up error
            cause = await probe([(h, p) for h, p, _ in self._meta.hosts], self._client_options,
                                client_id=self._client_id + "-probe", timeout_ms=_REQUEST_TIMEOUT_MS)
            if cause is None:
                raise
            raise cause from None
        self._apply_metadata(*await self._fetch_metadata())

        await self._start_producer()

        kafka_records.install()   # getmany() then returns aiokafka's decoded records (see there)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap, client_id=self._client_id, group_id=None,
            # "none": every position is chosen here (a seek); one out of range raises (see _out_of_range)
            # instead of jumping silently to the log start over records this gateway never read
            enable_auto_commit=False, auto_offset_reset="none",
            fetch_max_wait_ms=self._fetch_wait_ms, request_timeout_ms=_REQUEST_TIMEOUT_MS,
            key_deserializer=kafka_records.raw_records, **self._client_options)
        await self._consumer.start()

        # Warmup: the last `warmup_records` of each partition fill the hub's history. The end offset
        # only sets where to start (Tansu's ListOffsets lags a little: we start a bit earlier);
        # "caught up" is decided on the fetch high watermark.
        tps = list(self._parts)
        if tps:
            self._consumer.assign(tps)
            begin = await self._consumer.beginning_offsets(tps)
            end = await self._consumer.end_offsets(tps)
            for tp in tps:
                p = self._parts[tp]
                p.next = max(begin[tp], end[tp] - self._warmup)
                p.complete = p.next == 0
                self._consumer.seek(tp, p.next)
                self._waiting[tp] = None
        self._dirty = False
        self._ready = not self._waiting
        self._tasks = [
            asyncio.create_task(self._consume_loop(), name="kafka-consume"),
            asyncio.create_task(self._refresh_loop(), name="kafka-metadata"),
        ]
        log.info("Kafka engine started on %s (%s, cluster %s): %d partitions of %d topics",
                 self._bootstrap, self._security.describe(), self._cluster_id, len(tps), len(self._topic_meta))

    async def _start_producer(self) -> None:
        want = True if self._idempotence is None else self._idempotence
        producer = self._new_producer(want)
        try:
            await producer.start()
        except _CONNECTION_ERRORS:
            await producer.stop()
            raise
        except KafkaError as exc:
            await producer.stop()
            if not want or self._idempotence is not None:
                raise
            log.warning(
                "Kafka broker %s refused the idempotent producer (%r, logged above by aiokafka); the "
                "gateway goes on with acks=all without idempotence (order is still kept: one request "
                "in flight per broker; a retried publish may be stored twice)", self._bootstrap, exc)
            want = False
            producer = self._new_producer(False)
            try:
                await producer.start()
            except BaseException:
                await producer.stop()
                raise
        self._producer = producer
        self.idempotent = want

    def _new_producer(self, idempotent: bool) -> AIOKafkaProducer:
        # request_timeout = publish_timeout: a batch that could not be delivered expires about when
        # its publisher was told `unavailable`, instead of landing long after.
        return AIOKafkaProducer(
            bootstrap_servers=self._bootstrap, client_id=self._client_id, acks="all",
            enable_idempotence=idempotent, linger_ms=self._linger_ms,
            request_timeout_ms=max(1000, int(self._publish_timeout * 1000)), **self._client_options)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._ready = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for name, closer in (("consumer", self._consumer), ("producer", self._producer)):
            if closer is None:
                continue
            try:
                # The producer flushes pending batches; they expire after publish_timeout.
                async with asyncio.timeout(self._publish_timeout + 5):
                    try:
                        await closer.stop()
                    except asyncio.CancelledError:
                        me = asyncio.current_task()
                        if me is not None and me.cancelling():
                            raise   # ours: the timeout above, or whoever stops the engine
                        # aiokafka's own (0.14): Fetcher.close() cancels its fetch tasks and awaits each;
                        # one cancelled in its retry back-off (Kafka unreachable) raises here, cutting
                        # the consumer's stop short before it closes its client. Finish that stop.
                        log.info("the Kafka %s's stop was cut short by aiokafka's fetcher; finishing it", name)
                        await _finish_stop(closer)
            except Exception:  # noqa: BLE001 - stopping must go on
                log.exception("error stopping the Kafka %s", name)
        self._consumer = self._producer = None
        if self._meta is not None:
            try:
                await self._meta.close()
            except Exception:  # noqa: BLE001
                log.exception("error closing the Kafka metadata client")
            self._meta = None

    @property
    def ready(self) -> bool:
        return self._ready

    # ----------------------------------------------------------------------------- subjects, epochs

    def check_subject(self, subject: Subject) -> None:
        if subject.topic not in self._served:
            raise UnknownTopic(f"topic {subject.topic!r} is not served by this gateway")

    def partition_of(self, subject: Subject) -> int:
        meta = self._topic_meta.get(subject.topic)
        return partition_for_key(subject.key_bytes, meta.partitions if meta else 1)

    def epoch(self, subject: Subject) -> str:
        self.check_subject(subject)
        return self._epoch_of(subject.topic, self.partition_of(subject))

    def _epoch_of(self, topic: str, partition: int) -> str:
        p = self._parts.get(TopicPartition(topic, partition))
        if p is not None:
            return p.epoch
        # The topic does not exist yet: a provisional epoch that changes once it does.
        meta = self._topic_meta.get(topic)
        return partition_epoch(self._cluster_id, topic, meta.topic_id if meta else "", partition)

    # ----------------------------------------------------------------------------- publish

    async def publish(self, subject: Subject, content: bytes) -> tuple[str, int]:
        self.check_subject(subject)
        producer = self._producer
        if producer is None or self._stopped:
            raise EngineUnavailable("the Kafka engine is not running")
        key = subject.key_bytes
        started = time.perf_counter()
        appended = False
        try:
            async with asyncio.timeout(self._publish_timeout):
                # Enqueue in call order (the lock is FIFO): records of one connection to one subject
                # enter the partition's batch queue in the order published. aiokafka then keeps one
                # request in flight per broker, so neither retries nor a non-idempotent producer
                # reorder them. A timeout while send() waits for room withdraws the record; once
                # send() returned, the record is in a batch that may already be on its way.
                async with self._send_lock:
                    delivery = await producer.send(
                        subject.topic, content, key=key, partition=await self._publish_partition(producer, subject))
                appended = True
                meta = await delivery
                self._observe_latency(time.perf_counter() - started)
                tp = TopicPartition(meta.topic, meta.partition)
                if tp not in self._parts:   # the topic (or partition) is new: learn its epoch first
                    await self.refresh_metadata()
        except (KafkaError, TimeoutError) as exc:
            self._n["publish_errors"] += 1
            if appended and outcome_unknown(exc):
                # Kafka's own ambiguity: the request may have reached the leader and only its answer is
                # late or lost (a timeout), or a retriable error may follow an attempt that did append
                self._n["publish_outcome_unknown"] += 1
                raise EngineUnavailable(f"Kafka did not acknowledge the publish to {subject.text} in time "
                                        f"({exc!r}); it may still be written") from exc
            raise EngineUnavailable(f"Kafka did not take the publish to {subject.text}: {exc!r}") from exc
        self._n["publishes"] += 1
        return self._epoch_of(meta.topic, meta.partition), meta.offset + 1

    def _observe_latency(self, seconds: float) -> None:
        self._latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._latency_sum += seconds

    async def _publish_partition(self, producer: AIOKafkaProducer, subject: Subject) -> int | None:
        """The partition a publish goes to: the one partition_of() names (so the ack's epoch is the one
        subscribers were told), once the producer knows it. Partitions added to a topic reach our
        metadata first (the refresh loop); the producer's own copy may be minutes old, and its
        partitioner would still map keys over the old count, so it is refreshed on demand here."""
        if subject.key_bytes is None:
            return 0
        if subject.topic not in self._topic_meta:
            return None   # not created yet (auto-creation): the producer finds out
        partition = self.partition_of(subject)
        known = producer.client.cluster.partitions_for_topic(subject.topic)
        if known is None:
            return None   # the producer's first publish to the topic: send() fetches it fresh
        if partition not in known:
            await producer.client.force_metadata_update()
            if partition not in (producer.client.cluster.partitions_for_topic(subject.topic) or ()):
                return None   # not propagated yet: the producer's partitioner decides, the ack says where
        return partition

    # ----------------------------------------------------------------------------- metadata

    async def _fetch_metadata(self) -> tuple[str, dict[str, _TopicMeta], set[str]]:
        """(cluster id, served topics that exist, served topics the broker says do not exist).

        A topic in neither had a transient error (e.g. leader election) and is left as it is.
        """
        client = self._meta
        if client is None:
            raise KafkaConnectionError("metadata client closed")
        node = client.get_random_node()
        if node is None:
            raise KafkaConnectionError("no broker known")
        topics = sorted(self._served)
        resp: Any = None
        if not self._legacy_metadata:
            try:
                resp = await client.send(node, _MetadataRequest(topics))
            except NotImplementedError:   # broker older than Kafka 2.8: no topic ids
                self._legacy_metadata = True
        if resp is None:
            resp = await client.send(node, _LegacyMetadataRequest(topics, allow_auto_topic_creation=False))
        found: dict[str, _TopicMeta] = {}
        absent = set(self._served)
        for t in resp.to_object()["topics"]:
            name = t.get("name", t.get("topic"))
            if name not in self._served:
                continue
            if t["error_code"] == _UNKNOWN_TOPIC_OR_PARTITION:
                continue
            absent.discard(name)
            if t["error_code"] != 0 or not t["partitions"]:
                continue
            raw_id = t.get("topic_id") or bytes(16)
            found[name] = _TopicMeta(raw_id.hex() if any(raw_id) else "", len(t["partitions"]))
        return getattr(resp, "cluster_id", None) or "", found, absent

    def _apply_metadata(self, cluster_id: str, topics: dict[str, _TopicMeta], absent: set[str]) -> None:
        """Bring the partition table in line with the cluster; the consume loop re-assigns. The hub forgets
        what it holds of every partition dropped here (deleted, recreated, another cluster): at once, not
        at the subject's next record, so a fresh subscriber of a quiet subject is not given the old epoch
        and its deleted messages meanwhile; and the provisional epoch of a topic that now exists."""
        ended = [p.epoch for p in self._parts.values()]
        provisional = {t: self._epoch_of(t, 0) for t in self._served if t not in self._topic_meta}
        self._update_partitions(cluster_id, topics, absent)
        if self._forget is not None:
            kept = {p.epoch for p in self._parts.values()}
            for epoch in ended:
                if epoch not in kept:
                    self._forget(epoch)
            for topic, epoch in provisional.items():
                if topic in self._topic_meta:
                    self._forget(epoch)

    def _update_partitions(self, cluster_id: str, topics: dict[str, _TopicMeta], absent: set[str]) -> None:
        if self._cluster_id and cluster_id and cluster_id != self._cluster_id:
            log.warning("Kafka cluster id changed from %s to %s: every epoch changes", self._cluster_id, cluster_id)
            self._n["epoch_changes"] += len(self._topic_meta)
            self._parts.clear()
            self._waiting.clear()
            self._topic_meta.clear()   # read again from the new cluster's metadata, partition counts too
            self._gone_ids.clear()
            self._dirty = True
        self._cluster_id = cluster_id or self._cluster_id
        for topic, old in list(self._topic_meta.items()):
            new = topics.get(topic)
            if new is None and topic not in absent:
                continue   # a transient error: keep reading what we have
            # Deleted, or deleted and created again (new id; without ids: fewer partitions, which Kafka
            # never does to a live topic): drop every partition, the new ones are read from their start.
            if new is None or new.topic_id != old.topic_id or new.partitions < old.partitions:
                if new is not None:
                    log.warning("Kafka topic %s was recreated (id %s -> %s, %d partitions): new epoch",
                                topic, old.topic_id or "-", new.topic_id or "-", new.partitions)
                    if new.topic_id != old.topic_id:
                        self._n["epoch_changes"] += 1
                else:
                    log.warning("Kafka topic %s is gone (deleted); its subscribers get nothing until it "
                                "is created again (/healthz: degraded)", topic)
                    self._missing[topic] = time.time()
                    self._gone_ids[topic] = old.topic_id
                for tp in [tp for tp in self._parts if tp.topic == topic]:
                    del self._parts[tp]
                    self._waiting.pop(tp, None)
                del self._topic_meta[topic]
                self._dirty = True
        for topic, meta in topics.items():
            if topic in self._missing:
                del self._missing[topic]
                gone_id = self._gone_ids.pop(topic, None)
                log.warning("Kafka topic %s exists again (id %s, %d partitions)%s", topic, meta.topic_id or "-",
                            meta.partitions, ": new epoch" if gone_id != meta.topic_id else "")
                if gone_id != meta.topic_id:
                    self._n["epoch_changes"] += 1
            self._topic_meta[topic] = meta
            for partition in range(meta.partitions):
                tp = TopicPartition(topic, partition)
                if tp not in self._parts:
                    self._parts[tp] = _Partition(partition_epoch(self._cluster_id, topic, meta.topic_id, partition))
                    self._dirty = True

    async def refresh_metadata(self) -> None:
        """Fetch the served topics' metadata now (single flight); raises KafkaError when unreachable."""
        async with self._refresh_lock:
            self._apply_metadata(*await self._fetch_metadata())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh_metadata()
            except (KafkaError, OSError, TimeoutError) as exc:
                self._n["metadata_errors"] += 1
                if not self._metadata_failing:
                    log.warning("Kafka metadata refresh failed (%r); the consumer keeps retrying "
                                "(/healthz: degraded)", exc)
                    self._unreachable_since = time.time()
                    self._unreachable_mono = time.monotonic()
                self._metadata_failing = True
            else:
                if self._metadata_failing:
                    log.info("Kafka metadata refresh works again")
                self._metadata_failing = False
                self._unreachable_since = self._unreachable_mono = None

    # ----------------------------------------------------------------------------- consumption

    async def _consume_loop(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        backoff = 0.1
        while True:
            try:
                if self._dirty:
                    await self._assign(consumer)
                if not consumer.assignment():   # getmany() would wait for an assignment
                    await asyncio.sleep(_POLL_MS / 1000)
                    continue
                batches = await consumer.getmany(timeout_ms=_POLL_MS, max_records=_MAX_BATCH)
                n = 0
                for tp, records in batches.items():
                    self._deliver(tp, records)
                    n += len(records)
                if self._waiting:
                    await self._check_caught_up(consumer)
                if n >= _MAX_BATCH:
                    # getmany() does not yield while fetched records are buffered: let the loop run.
                    await asyncio.sleep(0)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except OffsetOutOfRangeError as exc:
                offsets = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
                try:
                    moved = await self._out_of_range(consumer, offsets)
                except (KafkaError, OSError, TimeoutError) as err:   # asked again at the next fetch
                    log.warning("Kafka consumer: cannot reposition %s out of range (%r); retrying in %.1f s",
                                sorted(offsets), err, backoff)
                    moved = 0
                if not moved:   # failed, or in range by the time we asked: not a busy loop if it recurs
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
            except Exception as exc:  # noqa: BLE001 - the reader must outlive any error
                log.warning("Kafka consumer error (%r); retrying in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _assign(self, consumer: AIOKafkaConsumer) -> None:
        """(Re)assign every known partition; assign() forgets positions, so seek each to our own.

        A partition found after start has no position yet: it is read from its log start (asked of
        Kafka here), so it is read whole (a new topic is empty or nearly so; a partition added later
        holds only what was produced since). Should that question fail, the assignment is made again.
        """
        self._dirty = False
        consumer.assign(list(self._parts))
        new: list[TopicPartition] = []
        for tp, p in self._parts.items():
            if p.next is not None:
                consumer.seek(tp, p.next)
            else:
                new.append(tp)
        if new:
            try:
                begin = await consumer.beginning_offsets(new)
            except BaseException:
                self._dirty = True   # no position: the next turn assigns and asks again
                raise
            assigned = consumer.assignment()
            for tp in new:
                found = self._parts.get(tp)
                if found is not None and found.next is None and tp in assigned and not self._dirty:
                    found.next, found.complete = begin[tp], begin[tp] == 0
                    consumer.seek(tp, begin[tp])
        log.debug("Kafka consumer assigned %d partitions", len(self._parts))

    async def _out_of_range(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> int:
        """The consumer's position in these partitions (tp -> the offset fetched) is out of their range;
        returns how many partitions were moved.

        Before the log start: retention deleted records this gateway had not read yet (it could not read
        for a while, or fell far behind). Past the end: the log was truncated below it (an unclean leader
        election), or the topic was recreated (the metadata refresh, asked first, finds that and reads the
        new topic from its start). The partition is read on from its log start (its end when truncated),
        and nothing known of its subjects' past may stand for continuity across what was lost: the hub
        forgets what it holds of them (no replay from memory spans the loss; a recovery older than the log
        start is asked of Kafka: recovered:false), and each subject's first record from here on has prev
        `floor`, which no live subscriber that missed something holds (it resubscribes).
        """
        await self.refresh_metadata()
        if self._dirty:
            await self._assign(consumer)
        assigned = consumer.assignment()
        tps = [tp for tp in offsets if tp in assigned and tp in self._parts and self._parts[tp].next is not None]
        if not tps:
            return 0
        begin = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        assigned = consumer.assignment()
        moved = 0
        for tp in tps:
            p = self._parts.get(tp)
            fetched = offsets[tp]
            if p is None or p.next is None or tp not in assigned or begin[tp] <= fetched <= end[tp]:
                continue   # reassigned meanwhile, or in range again: the next fetch tells
            start = begin[tp] if fetched < begin[tp] else end[tp]
            log.warning("Kafka partition %s: offset %d is out of range (%d..%d)%s; reading on from %d, and "
                        "the gateway's memory of its subjects is dropped (clients get recovered:false)",
                        tp, fetched, begin[tp], end[tp],
                        ": retention deleted records not read yet" if fetched < begin[tp]
                        else ": the log was truncated", start)
            self._n["offset_resets"] += 1
            p.next = start
            p.last.clear()
            p.complete = start == 0
            p.floor = None if start == 0 else start
            consumer.seek(tp, start)
            moved += 1
            if self._forget is not None:
                self._forget(p.epoch)
        return moved

    def _deliver(self, tp: TopicPartition, records: list[Any]) -> None:
        """Hand one fetched batch of a partition (offsets increasing) to the sink, grouped by subject:
        the key is decoded, the subject mapped and its prev looked up once per subject and batch, and
        with a run sink (the hub) the per-record work is fanout's loop. Records of one subject keep
        their offset order; records of different subjects of one batch may be handed over in another
        order (they are independent streams)."""
        p = self._parts.get(tp)
        if p is None or not records:   # unassigned meanwhile
            return
        if p.next is None:   # not positioned by _assign (cannot happen: every position is sought)
            p.next = records[0].offset
        n = self._n
        nxt = p.next
        if records[0].offset < nxt:   # already handed over (a reset to an earlier offset)
            start = 1
            while start < len(records) and records[start].offset < nxt:
                start += 1
            n["records_duplicate"] += start
            if start == len(records):
                return
            records = records[start:]
        count = len(records)
        first, end = records[0].offset, records[-1].offset
        if first > nxt:   # compaction, transaction markers, or retention while away
            n["offset_gaps"] += 1
        if end - first + 1 != count:   # holes inside the batch
            n["offset_gaps"] += sum(1 for i in range(1, count) if records[i].offset > records[i - 1].offset + 1)
        p.next = end + 1
        p.consumed += count

        groups: dict[bytes | None, list[Any]] = {}
        get = groups.get
        suspect = self._suspect
        suspects: list[Any] | None = None   # records whose value may be too large as delivered (rare)
        for r in records:
            v = r.value
            if v is not None and len(v) > suspect:
                if suspects is None:
                    suspects = []
                suspects.append(r)
            group = get(r.key)
            if group is None:
                groups[r.key] = [r]
            else:
                group.append(r)
        too_large: set[int] | None = None   # offsets of records skipped as too large
        if suspects is not None:
            limit = self._max_content
            too_large = {r.offset for r in suspects if content_too_large(r.value, limit)} or None

        sink, run_sink = self._sink, self._run_sink
        cache = self._subjects
        topic = tp.topic
        last = p.last
        last_max = max(1024, _LAST_SEQS_MAX // max(1, len(self._parts)))
        now_ms = int(time.time() * 1000)
        out: list[Record] = []
        for key, group in groups.items():
            ck = (topic, key)
            if ck in cache:
                subject = cache[ck]
            else:
                if len(cache) >= _SUBJECT_CACHE_MAX:
                    cache.clear()
                subject = cache[ck] = subject_for_record(topic, key)
            if subject is None:
                n["records_skipped_bad_key"] += len(group)
                continue
            if key is None and tp.partition != 0:
                n["records_skipped_keyless"] += len(group)
                continue
            text = subject.text
            if too_large is not None:
                # skipped before prev is looked up and `last` set: the next record of the subject carries
                # the seq of the last one delivered as prev, as a replay from Kafka gives it (_read_range)
                kept = [r for r in group if r.offset not in too_large]
                if len(kept) < len(group):
                    self._skipped_too_large(text, [r for r in group if r.offset in too_large])
                    if not kept:
                        continue
                    group = kept
            prev = last.get(text)
            last[text] = group[-1].offset + 1
            if prev is not None:
                last.move_to_end(text)
            else:
                prev = 0 if p.complete else p.floor
                if len(last) > last_max:
                    last.popitem(last=False)
                    p.complete = False
                    p.floor = None
            n["records_consumed"] += len(group)
            if run_sink is not None:
                try:
                    run_sink(text, p.epoch, group, prev, now_ms)
                except Exception:  # noqa: BLE001 - one bad record must not stop the partition
                    n["sink_errors"] += 1
                    log.exception("sink failed on %s seqs %d..%d", text, group[0].offset + 1, group[-1].offset + 1)
                continue
            if sink is None:
                continue
            for r in group:
                seq = r.offset + 1
                ts = r.timestamp if r.timestamp is not None and r.timestamp >= 0 else now_ms
                out.append(Record(text, r.value if r.value is not None else b"", p.epoch, seq, prev, ts))
                prev = seq
        if out:   # a Record sink gets the partition's records in offset order, across subjects too
            assert sink is not None
            out.sort(key=_by_seq)
            for rec in out:
                try:
                    sink(rec)
                except Exception:  # noqa: BLE001 - one bad record must not stop the partition
                    n["sink_errors"] += 1
                    log.exception("sink failed on %s seq %d", rec.subject, rec.seq)

    def _skipped_too_large(self, subject: str, records: list[Any]) -> None:
        """Count records of `subject` skipped as too large as delivered; log it, at most once a minute."""
        self._n["records_skipped_too_large"] += len(records)
        self._too_large_unlogged += len(records)
        now = time.monotonic()
        if now - self._too_large_logged < _TOO_LARGE_LOG_S:
            return
        r = records[-1]
        log.warning("skipped %d Kafka record(s) too large as delivered (over --max-message-bytes %d), the last "
                    "of %s at seq %d (%d bytes raw); records_skipped_too_large in /metrics counts them all",
                    self._too_large_unlogged, self._max_content, subject, r.offset + 1, len(r.value))
        self._too_large_logged = now
        self._too_large_unlogged = 0

    async def _check_caught_up(self, consumer: AIOKafkaConsumer) -> None:
        for tp, target in list(self._waiting.items()):
            p = self._parts.get(tp)
            if p is None or p.next is None or tp not in consumer.assignment():
                continue
            if target is None:
                target = consumer.highwater(tp)   # the fetch high watermark; None before a fetch
                if target is None:
                    continue
                self._waiting[tp] = target
            # position() also covers offsets without records (transaction markers, compaction).
            if p.next >= target or await consumer.position(tp) >= target:
                del self._waiting[tp]
        if not self._waiting and not self._ready:
            self._ready = True
            log.info("Kafka engine caught up on %d partitions", len(self._parts))

    # ----------------------------------------------------------------------------- recovery

    def read_through(self, subject: Subject) -> int | None:
        """The seq up to which the subject's partition has been handed to the sink (None: not yet).

        Recovery uses it to tell a position really ahead of this gateway from one whose messages
        this gateway read before the hub held the subject (older than the warmup window).
        """
        meta = self._topic_meta.get(subject.topic)
        if meta is None:
            return None
        p = self._parts.get(TopicPartition(subject.topic, partition_for_key(subject.key_bytes, meta.partitions)))
        return None if p is None else p.next

    def _served_partition(self, subject: Subject) -> tuple[TopicPartition, _Partition] | None:
        """The partition that holds `subject`, if this running engine serves and reads it."""
        if subject.topic not in self._served or self._stopped:
            return None
        meta = self._topic_meta.get(subject.topic)
        if meta is None:
            return None
        tp = TopicPartition(subject.topic, partition_for_key(subject.key_bytes, meta.partitions))
        part = self._parts.get(tp)
        return None if part is None else (tp, part)

    async def replay(self, subject: Subject, epoch: str, after_seq: int, upto_seq: int) -> list[Record] | None:
        found = self._served_partition(subject)
        if found is None:
            return None
        tp, part = found
        if part.epoch != epoch or after_seq < 0:
            return None
        if upto_seq <= after_seq:
            return []
        if upto_seq - after_seq > self._max_recovery:
            return None
        self._n["replays"] += 1
        try:
            async with self._replay_slots, asyncio.timeout(self._replay_timeout):
                return await self._read_range(tp, subject, part.epoch, after_seq, upto_seq)
        except (KafkaError, OSError, TimeoutError) as exc:
            self._n["replay_failures"] += 1
            log.warning("replay of %s (%d, %d] from Kafka failed: %r", subject.text, after_seq, upto_seq, exc)
            return None

    async def latest(self, subject: Subject) -> Record | None:
        """The subject's newest record among the last --max-recovery-records of its partition that this
        gateway has read (a snapshot for a subject the hub forgot)."""
        found = self._served_partition(subject)
        if found is None:
            return None
        tp, part = found
        if part.next is None or part.next == 0:
            return None
        self._n["snapshot_reads"] += 1
        try:
            async with self._replay_slots, asyncio.timeout(self._replay_timeout):
                records = await self._read_range(tp, subject, part.epoch, max(0, part.next - self._max_recovery),
                                                 part.next, from_log_start=True)
        except (KafkaError, OSError, TimeoutError) as exc:
            self._n["replay_failures"] += 1
            log.warning("snapshot read of %s from Kafka failed: %r", subject.text, exc)
            return None
        return records[-1] if records else None

    def known_end_seq(self, subject: Subject) -> int | None:
        meta = self._topic_meta.get(subject.topic)
        if meta is None or self._consumer is None:
            return None
        tp = TopicPartition(subject.topic, partition_for_key(subject.key_bytes, meta.partitions))
        if tp not in self._parts or tp not in self._consumer.assignment():
            return None
        hw = self._consumer.highwater(tp)
        return None if hw is None else int(hw)

    async def end_seq(self, subject: Subject, epoch: str) -> int | None:
        """The partition's end offset in Kafka (the seq of its last record), asked now: the larger of
        ListOffsets(latest) and the high watermark of our own last fetch (some brokers, Tansu among
        them, answer ListOffsets with the base offset of the last batch). A fresh connection, as a
        replay's, so a stalled consumer connection does not hold the answer up."""
        found = self._served_partition(subject)
        if found is None:
            return None
        tp, part = found
        if part.epoch != epoch:
            return None
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap, client_id=self._client_id + "-end", group_id=None,
            enable_auto_commit=False, request_timeout_ms=_REQUEST_TIMEOUT_MS, **self._client_options)
        try:
            async with self._replay_slots, asyncio.timeout(self._replay_timeout):
                try:
                    await consumer.start()
                    end = int((await consumer.end_offsets([tp]))[tp])
                finally:
                    await _close_reader(consumer)
        except (KafkaError, OSError, TimeoutError) as exc:
            log.warning("end offset of %s from Kafka failed: %r", subject.text, exc)
            return None
        own = self._consumer.highwater(tp) if self._consumer is not None else None
        return max(end, own or 0)

    async def _read_range(
        self, tp: TopicPartition, subject: Subject, epoch: str, after_seq: int, upto_seq: int,
        *, from_log_start: bool = False,
    ) -> list[Record] | None:
        # auto_offset_reset "none": the reader is seeked, so a position out of range means retention
        # deleted records of the range meanwhile; "earliest" would jump over them (a hole, read as whole)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap, client_id=self._client_id + "-replay", group_id=None,
            enable_auto_commit=False, auto_offset_reset="none",
            fetch_max_wait_ms=min(self._fetch_wait_ms, _READ_RANGE_FETCH_WAIT_MS),
            request_timeout_ms=_REQUEST_TIMEOUT_MS, **self._client_options)
        try:
            await consumer.start()
            consumer.assign([tp])
            begin = (await consumer.beginning_offsets([tp]))[tp]
            if after_seq < begin:   # the record at offset after_seq is gone (retention)
                if not from_log_start:
                    return None
                after_seq = begin
            # Read one record before the range too: when it is the subject's (the client's
            # position), the first replayed record gets an exact prev.
            start = after_seq - 1 if after_seq > begin else after_seq
            consumer.seek(tp, start)
            key = subject.key_bytes
            last: int | None = 0 if start == 0 else None
            out: list[Record] = []
            position = start
            while position < upto_seq:
                batches = await consumer.getmany(tp, timeout_ms=_POLL_MS, max_records=5000)
                for r in batches.get(tp, ()):
                    if r.offset >= upto_seq:
                        break
                    if r.key == key:
                        seq = r.offset + 1
                        if r.value is not None and len(r.value) > self._suspect \
                                and content_too_large(r.value, self._max_content):
                            if seq > after_seq:
                                self._skipped_too_large(subject.text, [r])
                            continue   # as the consumer does: not delivered, not anyone's prev
                        if seq > after_seq:
                            ts = r.timestamp if r.timestamp is not None and r.timestamp >= 0 else 0
                            out.append(Record(subject.text, r.value if r.value is not None else b"",
                                              epoch, seq, last, ts))
                        last = seq
                position = await consumer.position(tp)
                hw = consumer.highwater(tp)
                if not batches and hw is not None and position >= hw:
                    break   # nothing more in the partition (upto_seq beyond its end)
            return out
        finally:
            await _close_reader(consumer)

    # ----------------------------------------------------------------------------- metrics

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {k: float(v) for k, v in self._n.items()}
        out["partitions_assigned"] = float(len(self._parts))
        out["ready"] = 1.0 if self._ready else 0.0
        out["idempotent"] = 1.0 if self.idempotent else 0.0
        lag = 0
        consumer = self._consumer
        if consumer is not None:
            assigned = consumer.assignment()
            for tp, p in self._parts.items():
                if tp in assigned and p.next is not None:
                    hw = consumer.highwater(tp)
                    if hw is not None and hw > p.next:
                        lag += hw - p.next
        out["lag"] = float(lag)
        out["connected"] = 1.0 if self.connected else 0.0
        out["topics_missing"] = float(len(self._missing))
        return out

    @property
    def connected(self) -> bool:
        return self._started and not self._stopped and self._unreachable_since is None

    def partition_stats(self) -> list[tuple[str, int, int | None, int]]:
        consumer = self._consumer
        assigned = consumer.assignment() if consumer is not None else set()
        out: list[tuple[str, int, int | None, int]] = []
        for tp, p in sorted(self._parts.items()):
            lag: int | None = None
            if consumer is not None and tp in assigned and p.next is not None:
                hw = consumer.highwater(tp)   # the high watermark of the last fetch: lag is as of then
                if hw is not None:
                    lag = max(0, hw - p.next)
            out.append((tp.topic, tp.partition, lag, p.consumed))
        return out

    def produce_latency(self) -> tuple[Sequence[float], list[int], float] | None:
        return LATENCY_BUCKETS, list(self._latency), self._latency_sum

    def health(self) -> dict[str, Any]:
        lag = int(self.stats()["lag"])
        reasons: list[str] = []
        out: dict[str, Any] = {}
        if self._unreachable_since is not None and self._unreachable_mono is not None:
            reasons.append("Kafka unreachable")
            out["unreachable_since"] = _iso(self._unreachable_since)
            out["unreachable_s"] = round(time.monotonic() - self._unreachable_mono, 3)
        if self._missing:
            reasons.append("topic missing: " + ", ".join(sorted(self._missing)))
            out["topics_missing"] = {t: _iso(since) for t, since in sorted(self._missing.items())}
        if not self._ready:
            reasons.insert(0, "catching up" if self._started and not self._stopped else "not running")
            status = "starting"
        else:
            status = "degraded" if reasons else "ok"
        head: dict[str, Any] = {"status": status}
        if reasons:
            head["reason"] = "; ".join(reasons)
        return {**head, "lag": lag, **out}


async def _close_reader(consumer: AIOKafkaConsumer) -> None:
    """Stop a short-lived consumer (a replay, snapshot or end-offset read) without waiting on TLS.

    aiokafka's stop() waits until every connection is lost; a TLS connection is lost only once the
    broker has answered our close_notify, which Apache Kafka may leave unanswered, and the loop then
    waits its SSL shutdown timeout (30 s) while the recovering client waits with it. After a short
    grace the connections are aborted instead (aiokafka internals: the client's connections and
    their transports; on a plaintext connection stop() is done long before)."""
    client = getattr(consumer, "_client", None)
    conns = list(getattr(client, "_conns", {}).values())
    transports = [w.transport for w in (getattr(c, "_writer", None) for c in conns) if w is not None]
    stop = asyncio.ensure_future(consumer.stop())
    done, _ = await asyncio.wait({stop}, timeout=_READER_CLOSE_GRACE_S)
    if not done:
        for transport in transports:
            transport.abort()
    await stop


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
