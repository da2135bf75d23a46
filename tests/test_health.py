from __future__ import annotations

import pytest

from coordinator.rules.health import CRITICAL_XIDS, assess_device


def assess(**overrides):
    fields = dict(lost=False, last_xid=0, ecc_uncorrected_errors=0, temperature_celsius=50.0, temperature_limit_celsius=90.0)
    fields.update(overrides)
    return assess_device(**fields)


def test_a_normal_device_is_healthy():
    health = assess()
    assert health.healthy and health.reason == ""


@pytest.mark.parametrize("xid", [48, 63, 64, 74, 79, 92, 94, 95])
def test_critical_xids_make_a_device_unhealthy(xid):
    health = assess(last_xid=xid)
    assert not health.healthy
    assert f"xid {xid}" in health.reason and CRITICAL_XIDS[xid] in health.reason


@pytest.mark.parametrize("xid", [13, 31, 43, 45])
def test_application_xids_do_not(xid):
    assert assess(last_xid=xid).healthy


def test_uncorrected_ecc_lost_and_hot_devices_are_unhealthy():
    assert "uncorrected ECC" in assess(ecc_uncorrected_errors=2).reason
    assert "lost" in assess(lost=True).reason
    hot = assess(temperature_celsius=91.0)
    assert not hot.healthy and "91C" in hot.reason and "90C" in hot.reason
    assert assess(temperature_celsius=89.9).healthy


def test_zero_limit_means_the_default_limit():
    assert assess(temperature_celsius=89.0, temperature_limit_celsius=0).healthy
    assert not assess(temperature_celsius=95.0, temperature_limit_celsius=0).healthy
