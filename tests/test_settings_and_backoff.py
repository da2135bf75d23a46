from __future__ import annotations

import random

import pytest

from agent.settings import AgentSettings
from coordinator.settings import CoordinatorSettings
from gpuorch.backoff import Backoff, backoff_delay
from gpuorch.settings import SettingsError, load_settings


def test_layers_apply_in_order_file_then_env_then_flags(tmp_path):
    config = tmp_path / "coordinator.toml"
    config.write_text('listen = "0.0.0.0:6000"\nheartbeat_interval = 2.0\nnode-grace-period = 30\n')
    env = {"GPUORCH_HEARTBEAT_INTERVAL": "0.5", "GPUORCH_LOG_LEVEL": "debug"}
    settings = load_settings(CoordinatorSettings, config_file=config, env=env, overrides={"log_level": "warning", "listen": None})
    assert settings.listen == "0.0.0.0:6000"  # file (flag not given)
    assert settings.node_grace_period == 30.0  # file, dashed key
    assert settings.heartbeat_interval == 0.5  # env beats file
    assert settings.log_level == "warning"  # flag beats env


def test_unknown_key_in_file_is_named(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text("simulate_gpu = 4\n")
    with pytest.raises(SettingsError, match="unknown setting 'simulate_gpu'"):
        load_settings(AgentSettings, config_file=config, env={})


def test_bad_values_name_their_source(tmp_path):
    with pytest.raises(SettingsError, match="GPUORCH_SIMULATE_GPUS: expected an integer"):
        load_settings(AgentSettings, env={"GPUORCH_SIMULATE_GPUS": "four"})
    config = tmp_path / "c.toml"
    config.write_text("heartbeat_interval = 'fast'\n")
    with pytest.raises(SettingsError, match="heartbeat_interval: expected a number"):
        load_settings(CoordinatorSettings, config_file=config, env={})
    config.write_text("this is not toml = = =\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(CoordinatorSettings, config_file=config, env={})
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(CoordinatorSettings, config_file=tmp_path / "missing.toml", env={})


def test_validation_names_the_setting():
    with pytest.raises(ValueError, match="heartbeat_interval"):
        CoordinatorSettings(heartbeat_interval=0).validate()
    with pytest.raises(ValueError, match=r"coordinator: 'gpu-b:port' is not HOST\[:PORT\]"):
        AgentSettings(coordinator="gpu-a:50051,gpu-b:port").validate()
    AgentSettings(coordinator="gpu-a,gpu-b:6000").validate()  # a host without a port means port 50051


def test_backoff_grows_exponentially_to_its_cap_with_jitter_in_the_upper_half():
    assert backoff_delay(0, initial=0.1, cap=3, rand=0.5) == 0
    assert backoff_delay(1, initial=0.1, cap=3, rand=0.0) == pytest.approx(0.05)
    assert backoff_delay(1, initial=0.1, cap=3, rand=1.0) == pytest.approx(0.1)
    assert backoff_delay(4, initial=0.1, cap=3, rand=1.0) == pytest.approx(0.8)
    assert backoff_delay(50, initial=0.1, cap=3, rand=1.0) == pytest.approx(3.0)
    assert backoff_delay(50, initial=0.1, cap=3, rand=0.0) == pytest.approx(1.5)


def test_backoff_resets_after_a_success():
    backoff = Backoff(initial=0.1, cap=3, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(8)]
    assert delays[-1] > delays[0] and max(delays) <= 3
    backoff.reset()
    assert backoff.next_delay() <= 0.1
