from __future__ import annotations

from pathlib import Path

import pytest

from boincd_containers.core.settings import DEFAULT_SOCKET, Settings, SettingsError, load_settings


def test_defaults_without_config_file(tmp_path: Path) -> None:
    settings = load_settings({"config": None}, {})
    assert settings.socket == DEFAULT_SOCKET
    assert settings.state_dir == "/var/lib/boincd-containers"


def test_flag_beats_env_beats_file_beats_default(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('socket = "/file.sock"\nstate_dir = "/file-state"\npids_limit = 77\n')
    env = {"BOINCD_CONFIG": str(config), "BOINCD_SOCKET": "/env.sock", "BOINCD_STATE_DIR": "/env"}
    settings = load_settings({"socket": "/flag.sock"}, env)
    assert settings.socket == "/flag.sock"
    assert settings.state_dir == "/env"
    assert settings.pids_limit == 77
    assert settings.relist_interval_s == Settings().relist_interval_s


def test_env_values_are_typed(tmp_path: Path) -> None:
    env = {
        "BOINCD_CONFIG": str(tmp_path / "none.toml"),
        "BOINCD_LOG_JSON": "yes",
        "BOINCD_PIDS_LIMIT": "12",
    }
    # An explicitly named config file that is missing is an error...
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings({}, env)
    # ...but the default path may be absent.
    env.pop("BOINCD_CONFIG")
    settings = load_settings({"config": None}, env)
    assert settings.log_json is True
    assert settings.pids_limit == 12


def test_unknown_and_badly_typed_config_keys_are_clear_errors(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("sokcet = '/x'\n")
    with pytest.raises(SettingsError, match=r"unknown setting.*sokcet"):
        load_settings({"config": str(config)}, {})
    config.write_text("pids_limit = 'many'\n")
    with pytest.raises(SettingsError, match="pids_limit"):
        load_settings({"config": str(config)}, {})
    config.write_text("not toml [")
    with pytest.raises(SettingsError, match="cannot read config file"):
        load_settings({"config": str(config)}, {})


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.socket = "/x"  # type: ignore[misc]
