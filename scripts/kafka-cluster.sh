#!/usr/bin/env bash
# A 3-node Apache Kafka cluster (KRaft, every node broker and controller) on 127.0.0.1 to try the
# gateway's Kafka mode by hand: the same cluster the test suite starts. Needs Java 17 and maven (the
# jars are resolved from Maven Central on first use) and the venv scripts/test.sh makes (or any Python
# with aiokafka). Ctrl-C stops the nodes and deletes their data.
#   scripts/kafka-cluster.sh                          # bootstrap 127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094
#   scripts/kafka-cluster.sh --topics matches:3       # and create topic "matches" with 3 partitions
#   scripts/kafka-cluster.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
exec "$py" tests/support/kafka_cluster.py "$@"
