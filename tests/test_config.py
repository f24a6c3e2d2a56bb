"""Typed configs: YAML + --set overrides, errors that name the key."""

import dataclasses
from typing import Literal

import pytest

from codescaler_jax.config import ConfigError, load_config, to_dict


@dataclasses.dataclass
class Inner:
    lr: float = 1e-3
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    buckets: tuple[int, ...] = (8, 16)


@dataclasses.dataclass
class Outer:
    name: str = "run"
    seed: int | None = None
    flag: bool = False
    inner: Inner = dataclasses.field(default_factory=Inner)


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ninner:\n  lr: 0.5\n  buckets: [4, 8, 32]\n")
    cfg = load_config(Outer, p, ["inner.steps=7", "flag=true", "seed=3", "inner.mode=b"])
    assert cfg == Outer(name="x", seed=3, flag=True, inner=Inner(0.5, 7, "b", (4, 8, 32)))
    assert to_dict(cfg)["inner"]["buckets"] == [4, 8, 32]


@pytest.mark.parametrize(
    "override, msg",
    [
        ("inner.stepz=3", "inner.stepz"),
        ("inner.steps=abc", "inner.steps"),
        ("inner.mode=c", "inner.mode"),
        ("flag=maybe", "flag"),
        ("inner.lr=true", "inner.lr"),
        ("nosuch=1", "nosuch"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, msg):
    with pytest.raises(ConfigError, match=msg.replace(".", r"\.")):
        load_config(Outer, None, [override])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")
