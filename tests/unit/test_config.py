"""The typed config: one DPO configuration, frozen sections, every service limit a key."""

import dataclasses

import pytest

from caspo.config import ConfigError, DPOTrainConfig, PairStoreConfig, load_config
from caspo.trainer.dpo import _loss


def test_the_dpo_section_is_what_the_trainer_takes_and_picks_the_loss():
    cfg = load_config("configs/tiny-cpu.yaml", ["dpo.loss_type=ipo", "dpo.sft_weight=2"])
    assert isinstance(cfg.dpo, DPOTrainConfig) and cfg.dpo.learning_rate == 3e-5 and cfg.dpo.epochs == 2
    assert _loss(cfg.dpo) == {"args": {"loss_type": ["ipo", "sft"], "loss_weights": [1.0, 2.0]}, "trainer": {"dpop_lambda": 0.0}}
    assert _loss(DPOTrainConfig())["args"] == {"loss_type": ["sigmoid"], "loss_weights": [1.0]}  # the paper's DPO
    dpop = load_config("configs/tiny-cpu.yaml", ["dpo.dpop_lambda=5"]).dpo  # the recipe the sweep chose: dpop
    assert _loss(dpop) == {"args": {"loss_type": ["sigmoid"], "loss_weights": [1.0]}, "trainer": {"dpop_lambda": 5.0}}
    assert cfg.dpo.delimiter == "\n"


def test_a_loaded_config_is_never_changed_in_place():
    cfg = load_config(None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.pairs.temperature = 1.2  # a round's temperature is a replaced copy instead
    round_pairs = dataclasses.replace(cfg.pairs, temperature=1.2)
    assert round_pairs.temperature == 1.2 and cfg.pairs.temperature == 0.7


def test_service_limits_are_config_keys_with_todays_values():
    cfg = load_config(None, ["pair_store.max_block_ms=100", "generator.max_temperature=1.5"])
    assert cfg.pair_store == dataclasses.replace(PairStoreConfig(), max_block_ms=100)
    assert PairStoreConfig() == PairStoreConfig(16384, 4096, 256, 10000, 10000, 60000)
    assert cfg.generator.max_temperature == 1.5 and cfg.generator.max_path_chars == cfg.scorer.max_path_chars == 4096
    with pytest.raises(ConfigError, match="unknown key pair_store.max_pairs"):
        load_config(None, ["pair_store.max_pairs=3"])
