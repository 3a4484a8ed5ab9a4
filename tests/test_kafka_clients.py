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


class _Refusing:
    """The two calls PendingCommits makes of a consumer, with a rebalance refusing commits:
    a refusal cannot be timed on a real broker (the policy is what is tested here)."""

    def __init__(self, owned: set[TopicPartition]) -> None:
        self.owned = owned

    def assignment(self) -> set[TopicPartition]:
        return self.owned

    def commit(self, offsets: object) -> None:
        from kafka.errors import RebalanceInProgressError

        raise RebalanceInProgressError()


def test_a_refusal_over_with_its_partitions_gone_does_not_count_toward_the_next(monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit refused in a rebalance, whose partitions then all moved away, left the refusal's
    clock running: the next refusal, an hour later, replaced the consumer at once (False)
    instead of being retried (raised)."""
    from kafka.errors import RebalanceInProgressError

    import recsys.kafka_clients as clients

    now = [1000.0]
    monkeypatch.setattr(clients.time, "monotonic", lambda: now[0])
    ours = TopicPartition("t", 0)
    pending = PendingCommits(rejoin_after_s=30)
    pending.add({ours: 5})
    with pytest.raises(RebalanceInProgressError):
        pending.commit(_Refusing({ours}))
    assert pending.commit(_Refusing(set()))  # the partition went elsewhere: nothing to commit
    now[0] += 3600
    pending.add({ours: 9})
    with pytest.raises(RebalanceInProgressError):  # a new refusal: retried, the consumer kept
        pending.commit(_Refusing({ours}))
    now[0] += 31
    assert pending.commit(_Refusing({ours})) is False and not pending.offsets  # refused for 31 s: replaced
