"""QuietWindowGrouper with a fake clock: sliding windows, study vs series keys, holds for open associations."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from node.ingest.grouping import Group, QuietWindowGrouper


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def released() -> list[Group]:
    return []


@pytest.fixture
def grouper(clock, released) -> QuietWindowGrouper:
    return QuietWindowGrouper(released.append, clock=clock)


def _instances(n_series: int = 2, per_series: int = 3) -> list[dict[str, str]]:
    return [{"study": "1.2.3", "series": f"1.2.3.{s}", "sop": f"1.2.3.{s}.{i}"}
            for s in range(n_series) for i in range(per_series)]


@pytest.mark.parametrize("by, expected", [("study", {"1.2.3": 6}), ("series", {"1.2.3.0": 3, "1.2.3.1": 3})])
def test_study_or_series_grouping(grouper, clock, released, by, expected):
    for inst in _instances():
        grouper.add("scanner1", inst[by], Path("/spool") / inst[by], quiet_seconds=5)
        clock.advance(0.5)
    assert grouper.poll() == []
    clock.advance(5)
    grouper.poll()
    assert {g.key: g.n_instances for g in released} == expected
    assert all(g.source == "scanner1" for g in released)
    assert grouper.pending() == []


def test_window_slides_with_every_instance(grouper, clock, released):
    for _ in range(10):  # one instance every 4 s with a 5 s window: never released in between
        grouper.add("s", "study", Path("/x"), quiet_seconds=5)
        clock.advance(4)
        assert grouper.poll() == []
    status = grouper.pending()[0]
    assert status.n_instances == 10 and status.seconds_until_release == pytest.approx(1.0)
    clock.advance(0.99)
    assert grouper.poll() == []
    clock.advance(0.02)
    assert [g.n_instances for g in grouper.poll()] == [10]
    # A later instance with the same key opens a new group.
    grouper.add("s", "study", Path("/x"), quiet_seconds=5)
    clock.advance(5)
    assert [g.n_instances for g in grouper.poll()] == [1]
    assert len(released) == 2


def test_sources_are_separate_groups(grouper, clock, released):
    grouper.add("a", "1.2", Path("/a"), quiet_seconds=2)
    grouper.add("b", "1.2", Path("/b"), quiet_seconds=10)
    clock.advance(3)
    assert [g.source for g in grouper.poll()] == ["a"]
    clock.advance(10)
    assert [g.source for g in grouper.poll()] == ["b"]


def test_open_association_holds_the_group(grouper, clock, released):
    grouper.add("s", "k", Path("/k"), quiet_seconds=5, association="assoc-1", info={"calling_ae": "SCANNER1"})
    clock.advance(60)  # the sender stalls but keeps its association open
    assert grouper.poll() == []
    status = grouper.pending()[0]
    assert status.seconds_until_release is None and status.open_associations == 1
    grouper.association_closed("assoc-1")
    clock.advance(4.9)  # released at association end + quiet time
    assert grouper.poll() == []
    clock.advance(0.2)
    (group,) = grouper.poll()
    assert group.info == {"calling_ae": "SCANNER1"} and group.n_instances == 1


def test_two_associations_into_one_group(grouper, clock):
    grouper.add("s", "k", Path("/k"), quiet_seconds=5, association=1)
    grouper.add("s", "k", Path("/k"), quiet_seconds=5, association=2)
    grouper.association_closed(1)
    clock.advance(10)
    assert grouper.poll() == []  # association 2 is still open
    grouper.association_closed(2)
    clock.advance(5)
    assert [g.n_instances for g in grouper.poll()] == [2]


def test_hold_prepares_once_and_touch_slides(grouper, clock):
    prepared: list[Path] = []
    for _ in range(3):
        grouper.hold("s", "k", Path("/k"), 5, association=7, prepare=prepared.append)
        grouper.touch("s", "k")
    assert prepared == [Path("/k")]
    assert grouper.pending()[0].n_instances == 3
    grouper.touch("s", "unknown-key")  # a touch for a released / unknown group is ignored
    grouper.association_closed(7)
    grouper.association_closed(8)  # an association that stored nothing
    clock.advance(5)
    assert len(grouper.poll()) == 1


def test_arm_restarted_group(grouper, clock):
    grouper.arm("s", "k", Path("/k"), 30, n_instances=12, grace=0)  # no restart grace: quiet time only
    clock.advance(29)
    assert grouper.poll() == []
    assert grouper.next_deadline() == pytest.approx(clock.now + 1)
    clock.advance(1)
    assert [g.n_instances for g in grouper.poll()] == [12]
    assert grouper.next_deadline() is None


def test_failing_release_is_logged_and_others_go_on(clock, caplog):
    done: list[str] = []

    def release(group: Group) -> None:
        if group.key == "bad":
            raise OSError("disk gone")
        done.append(group.key)

    g = QuietWindowGrouper(release, clock=clock)
    g.add("s", "bad", Path("/bad"), 1)
    g.add("s", "good", Path("/good"), 1)
    clock.advance(2)
    g.poll()
    assert done == ["good"]
    assert "disk gone" in caplog.text and "source=s" in caplog.text


def test_thread_releases_with_the_real_clock():
    released: list[Group] = []
    g = QuietWindowGrouper(released.append, max_wait=0.05)
    g.start()
    try:
        g.add("s", "k", Path("/k"), quiet_seconds=0.2)
        deadline = time.monotonic() + 5
        while not released and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        g.stop()
    assert [r.key for r in released] == ["k"]
