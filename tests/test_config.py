"""Config errors name the file, the dotted key and what was expected; overrides parse like TOML values."""

import pytest

from config import REPO, ConfigError, load_config


def write(tmp_path, text: str):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_shipped_configs_load():
    for p in sorted((REPO / "configs").glob("*.toml")):
        cfg = load_config(p)
        assert cfg.source == str(p)


def test_defaults_follow_the_spec():
    cfg = load_config()
    assert (cfg.loss.lam, cfg.loss.temperature, cfg.loss.eps, cfg.loss.w_max) == (0.3, 0.7, 0.05, 3.0)
    assert (cfg.model.n_future_tokens, cfg.rho1.top_p, cfg.train.seed) == (4, 0.2, 42)
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay, cfg.optim.warmup_frac) == (
        0.9,
        0.95,
        0.1,
        0.03,
    )
    assert (cfg.critic.gamma, cfg.critic.gae_lambda, cfg.optim.grad_clip) == (0.99, 0.95, 1.0)


def test_unknown_key_names_file_and_dotted_key(tmp_path):
    p = write(tmp_path, "[train]\nstepz = 3\n")
    with pytest.raises(ConfigError, match=r"c\.toml:2: unknown key 'train\.stepz'"):
        load_config(p)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section 'trainer'"):
        load_config(write(tmp_path, "[trainer]\nsteps = 3\n"))


def test_wrong_type(tmp_path):
    with pytest.raises(ConfigError, match=r"'train\.steps': expected an integer, got '10'"):
        load_config(write(tmp_path, '[train]\nsteps = "10"\n'))
    with pytest.raises(ConfigError, match=r"'loss\.scorer': expected one of 'uniform'"):
        load_config(write(tmp_path, '[loss]\nscorer = "rho2"\n'))
    with pytest.raises(ConfigError, match=r"'train\.lora\.enabled': expected a boolean"):
        load_config(write(tmp_path, "[train.lora]\nenabled = 1\n"))


def test_out_of_range(tmp_path):
    with pytest.raises(
        ConfigError, match=r"c\.toml:2: 'loss\.lam' = 1\.5 is out of range: expected a number in \[0, 1\]"
    ):
        load_config(write(tmp_path, "[loss]\nlam = 1.5\n"))
    with pytest.raises(ConfigError, match=r"'loss\.w_max' = 0\.5 is out of range"):
        load_config(write(tmp_path, "[loss]\nw_max = 0.5\n"))


def test_invalid_toml_names_file(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.toml: invalid TOML"):
        load_config(write(tmp_path, "[train\n"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")


def test_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, "[train]\nsteps = 3\n"),
        ["--train.steps=7", "--loss.scorer=rho1_excess_v1", "--eval.datasets=['mbpp','humaneval']"],
    )
    assert cfg.train.steps == 7 and cfg.loss.scorer == "rho1_excess_v1"
    assert cfg.eval.datasets == ["mbpp", "humaneval"]
    with pytest.raises(ConfigError, match=r"command line '--train\.nope=1': unknown key 'train\.nope'"):
        load_config(None, ["--train.nope=1"])
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        load_config(None, ["--train.steps"])


def test_cross_field_rules(tmp_path):
    with pytest.raises(ConfigError, match="head_weights' has 2 entries"):
        load_config(write(tmp_path, "[loss]\nhead_weights = [1.0, 0.5]\n"))
    with pytest.raises(ConfigError, match="not a tracking URI"):
        load_config(write(tmp_path, '[tracking]\nuri = "s3://bucket/mlflow"\n'))
    with pytest.raises(ConfigError, match="selected weight"):
        load_config(
            write(
                tmp_path,
                '[loss]\nscorer = "rho1_excess_v1"\nw_max = 2.0\n[rho1]\nmode = "select"\ntop_p = 0.2\n',
            )
        )
    with pytest.raises(ConfigError, match="packing"):
        load_config(write(tmp_path, '[loss]\nscorer = "critic_delta_v1"\n[data]\npacking = true\n'))


@pytest.mark.parametrize(
    "override", ["--optim.lr=nan", "--loss.temperature=nan", "--loss.lam=nan", "--eval.timeout=inf"]
)
def test_nan_and_inf_are_refused_naming_the_override(override):
    key = override[2:].split("=")[0]
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs/tiny_mbpp.toml", [override])
    assert str(e.value) == (
        f"command line '{override}': '{key}' = {override.split('=')[1]}: expected a finite number, not nan or inf"
    )


def test_errors_name_the_file_line_or_the_override(tmp_path):
    p = write(tmp_path, "# tiny\n[train]\nsteps = 3\n\n[train.lora]\nr = 0\n[loss]\nlam = 1.5\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).splitlines() == [  # every problem at once, each at its line
        f"{p}:6: 'train.lora.r' = 0 is out of range: expected an integer >= 1",
        f"{p}:8: 'loss.lam' = 1.5 is out of range: expected a number in [0, 1]",
    ]
    with pytest.raises(ConfigError) as e:  # the file's value is fine; the bad one came from the command line
        load_config(write(tmp_path, "[loss]\nlam = 0.5\n"), ["--loss.lam=1.5"])
    assert str(e.value).startswith("command line '--loss.lam=1.5': 'loss.lam' = 1.5 is out of range")
    with pytest.raises(ConfigError, match=r"'train\.steps': expected an integer, got 1\.5 \(float\)"):
        load_config(None, ["--train.steps=1.5"])
    with pytest.raises(ConfigError, match=r"c\.toml:1: unknown section 'source'"):
        load_config(write(tmp_path, 'source = "x"\n'))


def test_config_round_trips_through_plain_data():
    from config import from_dict, to_dict

    cfg = load_config(REPO / "configs/tiny_rho1_mbpp.toml", ["--train.lora.r=4"])
    again = from_dict(to_dict(cfg))
    assert again == cfg and again.source == cfg.source and again.algo == "rho1-wmtp"
