"""One source of truth for defaults: the schemas in naqs_cli/config.py.

The YAML files in conf/ may restate a schema default (with a comment for the reader) but never
contradict it; the only values they change are listed here, each with its reason.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from conftest import compose

from naqs_cli import CONF_DIR, config

#: (file, key): deliberate departures from the schema default.
DELIBERATE = {
    ("train.yaml", "sampler.n_samples"): "the default run is a ~1 minute 4x4 TFIM",
}
SCHEMAS = {
    "lattice/square.yaml": config.LatticeConfig,
    "ham/tfim.yaml": config.TFIMConfig,
    "ham/heisenberg.yaml": config.HeisenbergConfig,
    "model/pixelcnn.yaml": config.PixelCNNConfig,
    "model/dense.yaml": config.DenseConfig,
    "sampler/direct.yaml": config.DirectSamplerConfig,
    "sampler/fullsum.yaml": config.FullSumSamplerConfig,
    "sampler/mcmc.yaml": config.MCMCSamplerConfig,
    "optim/adam.yaml": config.AdamConfig,
    "optim/sgd.yaml": config.SGDConfig,
}


def _default(schema, name):
    field = next(f for f in dataclasses.fields(schema) if f.name == name)
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_group_options_agree_with_their_schema(name):
    values = yaml.safe_load((Path(CONF_DIR) / name).read_text())
    schema = SCHEMAS[name]
    for key, value in values.items():
        if key == "defaults" or (name, key) in DELIBERATE:
            continue
        assert value == _default(schema, key), f"{name}: {key}={value} != schema default"


def test_train_defaults_come_from_the_schema():
    raw = yaml.safe_load((Path(CONF_DIR) / "train.yaml").read_text())
    assert "train" not in raw, "conf/train.yaml must not restate train.* (schema: TrainSection)"
    cfg = compose("train")
    for field in dataclasses.fields(config.TrainSection):
        assert cfg.train[field.name] == _default(config.TrainSection, field.name), field.name
    assert cfg.train.steps == 200 and cfg.train.final_samples == 8192
    assert cfg.sampler.n_samples == 256
