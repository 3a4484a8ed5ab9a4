"""recsys.kafka_clients against the real broker."""

from __future__ import annotations

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from recsys.kafka_clients import PendingCommits

pytestmark = pytest.mark.kafka


def test_pending_offsets_of_partitions_owned_elsewhere_now_are_not_committed(kafka_bootstrap: str, unique: str) -> None:
    """A batch done before a rebalance moved one of its partitions away: that partition's
    offset is dropped, not committed over its new owner's; the others' are committed."""
    topic, group = f"pending-{unique}", f"pending-{unique}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    finally:
        admin.close()
    ours, theirs = TopicPartition(topic, 0), TopicPartition(topic, 1)
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    try:
        consumer.assign([ours])  # what the group left this member
        pending = PendingCommits(rejoin_after_s=30)
        pending.add({ours: 5, theirs: 7})
        assert pending.commit(consumer) and not pending.offsets
        assert consumer.committed(ours) == 5 and consumer.committed(theirs) is None
        assert pending.committed == {ours: 5}  # what the caller may count as committed
    finally:
        consumer.close(autocommit=False)
