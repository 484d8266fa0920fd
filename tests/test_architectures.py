"""The architectures' numbers live once; defaults, presets and registered factories read them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import micromae
from micromae.architectures import MAESTER, TINY_TEST, encoder_part
from micromae.config import ModelConfig, PretrainConfig, load_config
from micromae.models import MaskedAutoencoder, ViTEncoder, create_model, list_models
from micromae.models.pretrained import encoder_fields


def test_model_config_defaults_are_maester():
    defaults = dataclasses.asdict(ModelConfig())
    assert {k: defaults[k] for k in MAESTER} == MAESTER



def test_maester_preset_relies_on_the_defaults():
    preset = Path(micromae.__file__).parent / "configs" / "maester_betaseg.yaml"
    assert load_config(preset, PretrainConfig, ["data.root=/tmp"]).model == ModelConfig()


def test_registered_factories_build_the_architectures():
    assert {"vit_maester", "vit_tiny_test", "mae_maester", "mae_tiny_test"} <= set(list_models())
    assert encoder_fields(create_model("vit_maester")) == encoder_part(MAESTER) == encoder_fields(ViTEncoder())
    assert encoder_fields(create_model("vit_tiny_test")) == encoder_part(TINY_TEST)
    mae = create_model("mae_tiny_test", mask_ratio=0.75)
    assert isinstance(mae, MaskedAutoencoder) and mae.mask_ratio == 0.75
    assert encoder_fields(mae.encoder) == encoder_part(TINY_TEST)
