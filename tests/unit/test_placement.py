"""Cluster placement knobs: the config checks them, services advertise a reachable address."""

import pytest

from caspo.config import ConfigError, load_config
from caspo.mesh.registry import advertised_address


def test_placement_and_dpo_resources_are_checked():
    cfg = load_config(None, ["mesh.placement={generator: {generator: 1}, scorer: {scorer: 0.5}}", "dpo.resources={trainer: 1}"])
    assert cfg.mesh.placement == {"generator": {"generator": 1}, "scorer": {"scorer": 0.5}}
    with pytest.raises(ConfigError, match="mesh.placement keys must be among"):
        load_config(None, ["mesh.placement={gpu: {a: 1}}"])
    with pytest.raises(ConfigError, match="must map resource names to amounts > 0"):
        load_config(None, ["mesh.placement={critic: {critic: 0}}"])
    with pytest.raises(ConfigError, match="dpo.resources must map"):
        load_config(None, ["dpo.resources={trainer: many}"])


def test_a_service_bound_to_every_interface_advertises_its_node_ip():
    assert advertised_address("127.0.0.1", 5001) == "127.0.0.1:5001"
    host, port = advertised_address("0.0.0.0", 5001).rsplit(":", 1)
    assert port == "5001" and host not in ("0.0.0.0", "") and host.count(".") == 3
