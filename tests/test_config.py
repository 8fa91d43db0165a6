"""The TOML configuration: values are checked, errors name the file and key."""

from __future__ import annotations

import pytest

from fsfixtures import run_cli
from tidstorage.config import ConfigError, load_config


@pytest.mark.parametrize("key", ["burst_period", "full_dump_period", "in_doubt_grace"])
@pytest.mark.parametrize("value", ["nan", "inf", "+inf", "-nan"])
def test_non_finite_seconds_are_refused(tmp_path, key, value):
    path = tmp_path / "t.toml"
    path.write_text(f"[server]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}: server.{key}: must be a finite number of seconds" in str(info.value)


def test_non_finite_seconds_exit_2_naming_file_and_key(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text("[server]\nburst_period = nan\n")
    r = run_cli("serve", "-c", path, timeout=30)  # before the fix it served for ever
    assert r.returncode == 2
    assert f"{path}: server.burst_period: must be a finite number of seconds, not nan" in r.stderr


def test_finite_seconds_are_accepted(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text("[server]\nburst_period = 0.5\nfull_dump_period = 300\nin_doubt_grace = 0\n")
    server = load_config(path).server
    assert (server.burst_period, server.full_dump_period, server.in_doubt_grace) == (0.5, 300.0, 0.0)
