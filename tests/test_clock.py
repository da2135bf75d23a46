import pytest

from gpuorch.clock import SYSTEM_CLOCK, Clock, FakeClock


def test_fake_clock_moves_wall_and_monotonic_together_and_never_back():
    clock: Clock = FakeClock(wall=100.0, monotonic=5.0)
    assert (clock.wall(), clock.monotonic()) == (100.0, 5.0)
    clock.advance(2.5)
    assert (clock.wall(), clock.monotonic()) == (102.5, 7.5)
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance(-1)


def test_system_clock_monotonic_does_not_go_back():
    first = SYSTEM_CLOCK.monotonic()
    assert SYSTEM_CLOCK.monotonic() >= first and SYSTEM_CLOCK.wall() > 1_700_000_000


def test_stamp_seconds_is_the_same_float_as_to_nanoseconds_and_refuses_an_invalid_stamp():
    import random

    from google.protobuf.timestamp_pb2 import Timestamp

    from gpuorch.clock import stamp_seconds

    rng = random.Random(7)
    stamps = [Timestamp(seconds=s, nanos=n) for s, n in ((0, 0), (-1, 999_999_999), (253402300799, 999_999_999))]
    stamps += [Timestamp(seconds=rng.randrange(-62135596800, 253402300800), nanos=rng.randrange(10**9)) for _ in range(2000)]
    for stamp in stamps:
        assert stamp_seconds(stamp) == stamp.ToNanoseconds() / 1e9, stamp
    with pytest.raises(ValueError):
        stamp_seconds(Timestamp(seconds=253402300800))
