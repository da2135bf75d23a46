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
