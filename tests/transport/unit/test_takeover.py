"""kombu_mqtt.takeover: the client-id takeover pattern, with a fake clock.

Connections that die within seconds of their CONNACK, `threshold` times within the
window, start a pause that doubles up to its maximum; a connection that lives long
ends the episode; isolated short losses (a flaky network) never pause.
"""

from __future__ import annotations

from kombu_mqtt.takeover import TakeoverWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def kicked(watch: TakeoverWatch, clock: Clock, lived: float = 0.3, gap: float = 0.1) -> float:
    clock.now += gap
    watch.connected()
    clock.now += lived
    return watch.lost()


def test_storm_pauses_after_threshold_and_doubles_to_max() -> None:
    clock = Clock()
    watch = TakeoverWatch(threshold=5, window=60, short=5, pause_min=5, pause_max=60, clock=clock)
    assert [kicked(watch, clock) for _ in range(4)] == [0.0, 0.0, 0.0, 0.0]
    assert [kicked(watch, clock) for _ in range(6)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert watch.suspected == 6 and watch.episodes == 1


def test_long_connection_ends_the_episode() -> None:
    clock = Clock()
    watch = TakeoverWatch(threshold=3, window=60, short=5, pause_min=5, pause_max=60, clock=clock)
    assert [kicked(watch, clock) for _ in range(4)] == [0.0, 0.0, 5.0, 10.0]
    assert kicked(watch, clock, lived=30) == 0.0  # held the connection: not a takeover
    assert [kicked(watch, clock) for _ in range(3)] == [0.0, 0.0, 5.0]  # a new episode starts over
    assert watch.episodes == 2


def test_short_losses_spread_beyond_the_window_never_pause() -> None:
    clock = Clock()
    watch = TakeoverWatch(threshold=3, window=60, short=5, clock=clock)
    assert [kicked(watch, clock, gap=40) for _ in range(10)] == [0.0] * 10
    assert watch.suspected == 0


def test_loss_without_connect_is_not_counted() -> None:
    clock = Clock()
    watch = TakeoverWatch(threshold=1, clock=clock)
    assert watch.lost() == 0.0 and watch.suspected == 0


def test_pause_is_owed_once_and_watches_are_per_client_id() -> None:
    from kombu_mqtt.takeover import watch_for

    clock = Clock()
    watch = TakeoverWatch(threshold=1, clock=clock)
    assert kicked(watch, clock) == 5.0
    assert watch.take_pause() == 5.0 and watch.take_pause() == 0.0
    assert watch_for("fixed-id-a") is watch_for("fixed-id-a")  # survives a new kombu connection
    assert watch_for("fixed-id-a") is not watch_for("fixed-id-b")
