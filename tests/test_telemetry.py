"""Both telemetry sources behind the one interface: simulated (with faults) and NVML (against a fake driver)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agent.telemetry import TelemetryUnavailable, open_source
from agent.telemetry.nvml import NvmlSource
from agent.telemetry.simulated import SimulatedSource
from coordinator.rules.health import assess_device
from tests.fake_nvml import FakeGpu, FakeNvml
from tests.harness import ON_A_GPU_NODE, REPO


def healthy(info, sample) -> bool:
    return assess_device(
        lost=sample.lost,
        last_xid=sample.last_xid,
        ecc_uncorrected_errors=sample.ecc_uncorrected_errors,
        temperature_celsius=sample.temperature_celsius,
        temperature_limit_celsius=info.temperature_limit_celsius,
    ).healthy


def test_simulated_inventory_is_stable_and_unique_per_node():
    first = SimulatedSource(4, node_id="n1", seed=1).devices()
    again = SimulatedSource(4, node_id="n1", seed=2).devices()
    other = SimulatedSource(4, node_id="n2", seed=1).devices()
    assert [d.uuid for d in first] == [d.uuid for d in again]
    assert not {d.uuid for d in first} & {d.uuid for d in other}
    assert [d.index for d in first] == [0, 1, 2, 3]
    assert all(d.memory_total_bytes == 80 * 1024**3 for d in first)


def test_simulated_telemetry_is_plausible_and_changes():
    source = SimulatedSource(2, node_id="n1", seed=3)
    samples = [source.sample() for _ in range(30)]
    utilizations = {s[0].gpu_utilization_percent for s in samples}
    assert len(utilizations) > 5, "telemetry should change over time"
    for sample in (s for batch in samples for s in batch):
        assert 0 <= sample.gpu_utilization_percent <= 100
        assert 20 < sample.temperature_celsius < 85
        assert 0 < sample.memory_used_bytes < 80 * 1024**3
        assert sample.power_watts > 0


def test_injected_faults_show_in_telemetry_and_clear():
    source = SimulatedSource(4, node_id="n1", seed=4)
    infos = source.devices()
    source.inject_xid(0, 79)
    source.set_temperature(1, 97.0)
    source.lose(2)
    source.inject_ecc_uncorrected(3, 2)
    batch = source.sample()
    assert batch[0].last_xid == 79 and batch[0].xid_count == 1
    assert batch[1].temperature_celsius == 97.0
    assert batch[2].lost
    assert batch[3].ecc_uncorrected_errors == 2
    assert not any(healthy(info, sample) for info, sample in zip(infos, batch, strict=True))
    assert source.sample()[0].xid_count == 1, "a standing fault is one XID, not one per sample"
    for index in range(4):
        source.restore(index)
    batch = source.sample()
    assert all(healthy(info, sample) for info, sample in zip(infos, batch, strict=True))
    assert batch[0].xid_count == 1, "counts never go back"
    with pytest.raises(IndexError, match="no simulated device with index 9"):
        source.inject_xid(9, 79)


def test_faults_file_drives_a_running_source(tmp_path):
    faults = tmp_path / "faults.json"
    source = SimulatedSource(2, node_id="n1", seed=5, faults_file=faults)
    assert source.sample()[1].last_xid == 0
    faults.write_text(json.dumps({"1": {"xid": 48}}))
    assert source.sample()[1].last_xid == 48
    faults.write_text("not json")  # a bad edit keeps the last good faults
    assert source.sample()[1].last_xid == 48
    faults.write_text("{}")
    assert source.sample()[1].last_xid == 0


def test_nvml_source_reads_inventory_and_telemetry_from_the_driver():
    nvml = FakeNvml(gpus=[FakeGpu(uuid="GPU-aaa"), FakeGpu(uuid="GPU-bbb", supports_ecc=False, temperature=91)])
    source = NvmlSource(nvml)
    infos = source.devices()
    assert [d.uuid for d in infos] == ["GPU-aaa", "GPU-bbb"]
    assert infos[0].name == "NVIDIA H100 80GB HBM3"
    assert infos[0].pci_bus_id == "00000000:18:00.0"
    assert infos[0].temperature_limit_celsius == 87
    assert infos[0].power_limit_watts == 700
    first, second = source.sample()
    assert first.memory_used_bytes == 1024**3 and first.gpu_utilization_percent == 40
    assert first.memory_utilization_percent == 20 and first.power_watts == 350
    assert second.ecc_uncorrected_errors == 0, "unsupported ECC reads as 0, not an error"
    assert not healthy(infos[1], second), "91C is above the 87C slowdown threshold"


def test_nvml_source_reports_xid_events_and_lost_devices():
    nvml = FakeNvml(gpus=[FakeGpu(uuid="GPU-aaa"), FakeGpu(uuid="GPU-bbb")])
    source = NvmlSource(nvml)
    nvml.pending_xids.extend([(1, 31), (1, 79)])
    first, second = source.sample()
    assert first.xid_count == 0
    assert second.xid_count == 2 and second.last_xid == 79
    nvml.gpus[0].lost = True
    first, _ = source.sample()
    assert first.lost and first.uuid == "GPU-aaa"
    nvml.gpus[0].lost = False
    assert not source.sample()[0].lost


def test_without_a_driver_the_error_says_what_to_do():
    with pytest.raises(TelemetryUnavailable, match="--simulate-gpus N"):
        NvmlSource(FakeNvml(driver_present=False))


def test_open_source_picks_simulation_when_asked():
    assert isinstance(open_source(simulate_gpus=3, node_id="x"), SimulatedSource)


@pytest.mark.skipif(ON_A_GPU_NODE, reason="this machine has an NVIDIA driver: the agent would read its GPUs")
def test_agent_without_nvml_or_simulation_exits_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "agent.main", "--coordinator", "127.0.0.1:1", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gpuorch-agent: ") and "--simulate-gpus N" in lines[0]


@pytest.mark.skipif(not ON_A_GPU_NODE, reason="needs an NVIDIA driver and GPU")
def test_nvml_source_reads_a_real_driver():
    source = NvmlSource()
    try:
        infos = source.devices()
        assert infos, "a GPU node has at least one GPU"
        first_sample = source.sample()
    finally:
        source.close()
    for info, sample in zip(infos, first_sample, strict=True):
        assert info.uuid.startswith("GPU-") and sample.uuid == info.uuid
        assert info.name.startswith("NVIDIA") and info.pci_bus_id
        assert info.memory_total_bytes >= 1024**3
        assert 0 < sample.memory_used_bytes < info.memory_total_bytes
        assert 0 <= sample.gpu_utilization_percent <= 100
        assert 5 <= sample.temperature_celsius <= 110
        assert sample.power_watts > 0 and not sample.lost
        assert healthy(info, sample), (info, sample)
