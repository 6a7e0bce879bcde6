"""Typed config: every problem reported at once, typo hints, overrides, reference table."""

import pytest

from mlx_tune.config import config_from_dict, config_reference, load_config
from mlx_tune.errors import ConfigError


def test_all_errors_at_once_with_hints():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"model": "m", "train": {"iters": 5, "learing_rate": 1e-3},
                          "lora": {"rank": 0, "dropout": 1.5}, "quantize": {"group_size": 48}})
    msg = str(err.value)
    assert "train.learing_rate: unknown key; did you mean 'train.learning_rate'?" in msg
    assert "lora.rank: 0" in msg and "lora.dropout: 1.5" in msg
    assert "quantize.group_size: 48" in msg


def test_types_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: m\nquantize: null\ntrain:\n  iters: 10\n  learning_rate: 1e-4\nlora:\n  layers: 8\n")
    cfg = load_config(p, ["train.iters=50", "lora.target_modules=[q_proj, v_proj]", "serve.port=9000"])
    assert cfg.train.iters == 50 and cfg.train.learning_rate == 1e-4
    assert cfg.lora.layers == 8 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.quantize is None and cfg.serve.port == 9000
    with pytest.raises(ConfigError, match=r"train.batch_size: 'four' is not valid; expected integer"):
        load_config(p, ["train.batch_size=four"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(p, ["train.iters"])


def test_missing_file_bad_yaml_and_missing_keys(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="model: required key is missing"):
        config_from_dict({"train": {"iters": 1}})
    with pytest.raises(ConfigError, match="give one of them"):
        config_from_dict({"model": "m"})


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert configs
    for c in configs:
        load_config(c)


def test_reference_lists_every_key():
    ref = config_reference()
    for key in ("`train.iters`", "`lora.rank`", "`quantize.mode`", "`serve.port`", "`output_dir`"):
        assert key in ref


def test_readme_config_reference_is_current():
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert config_reference() in readme, "run `python scripts/gen_readme.py` after changing mlx_tune/config.py"
