"""aiokafka's fetched records as they are, without one ConsumerRecord per record, for the engine's reader.

aiokafka decodes a fetched record batch in C (aiokafka.record._crecords) and then, per record, builds a
ConsumerRecord dataclass (eleven fields, a tuple of headers, two len() calls) in Python: about a fifth
of the gateway's CPU time per consumed record when profiled (BENCHMARKS.md "Kafka"). The reader only
needs offset, key, value and timestamp, which the decoded record itself carries, so a consumer
created with `key_deserializer=raw_records` gets those records from getmany() instead.

How: aiokafka's Fetcher creates PartitionRecords(tp, records, aborted_transactions, fetch_offset,
key_deserializer, value_deserializer, check_crcs, isolation_level) by its module-global name, and
PartitionRecords._unpack_records() calls self._consumer_record(tp, record) per record (after its own
CRC, control-batch and transaction handling, which stay as they are). install() puts a subclass in
that global whose instances, for such a consumer only, answer _consumer_record with the record itself.
Every other consumer of the process is untouched. This leans on aiokafka internals: pinned to the
versions pyproject allows, checked by tests/test_kafka_engine.py; with another layout install() does
nothing and raw_records is an identity key deserializer, so the reader gets ConsumerRecords, which
have the same four attributes (only slower).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from aiokafka.consumer import fetcher as _fetcher

log = logging.getLogger(__name__)

_EXPECTED_INIT = ["self", "tp", "records", "aborted_transactions", "fetch_offset", "key_deserializer",
                  "value_deserializer", "check_crcs", "isolation_level"]


def raw_records(key: bytes | None) -> bytes | None:
    """The key deserializer that marks a consumer whose getmany() returns aiokafka's decoded records."""
    return key


def _as_is(tp: Any, record: Any) -> Any:
    return record


_Base: Any = _fetcher.PartitionRecords


class _PartitionRecords(_Base):  # type: ignore[misc]
    def __init__(self, tp: Any, records: Any, aborted_transactions: Any, fetch_offset: int,
                 key_deserializer: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(tp, records, aborted_transactions, fetch_offset, key_deserializer, *args, **kwargs)
        if key_deserializer is raw_records:
            self._consumer_record = _as_is


def install() -> bool:
    """Put the subclass in place (idempotent); False when aiokafka's layout is not the one known."""
    current = _fetcher.PartitionRecords
    if current is _PartitionRecords:
        return True
    if current is not _Base or not callable(getattr(_Base, "_consumer_record", None)):
        log.warning("aiokafka's PartitionRecords is not the one expected: records are read as ConsumerRecords")
        return False
    try:
        params = list(inspect.signature(_Base.__init__).parameters)
    except (TypeError, ValueError):
        params = []
    if params != _EXPECTED_INIT:
        log.warning("aiokafka's PartitionRecords takes %s, not %s: records are read as ConsumerRecords",
                    params, _EXPECTED_INIT)
        return False
    _fetcher.PartitionRecords = _PartitionRecords
    return True
