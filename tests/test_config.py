"""The TOML configuration: values are checked, errors name the file and key."""

from __future__ import annotations

import pytest

from support.fsfixtures import run_cli
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


# -- secret files, the token, the listening address (issue 9.19) ---------------

TOKEN = "0123456789abcdef-token"


def _token_file(tmp_path, mode=0o600, token=TOKEN):
    path = tmp_path / "token"
    path.write_text(token + "\n")
    path.chmod(mode)
    return path


def _config(tmp_path, **server):
    path = tmp_path / "t.toml"
    lines = ["[server]"] + [f'{k} = "{v}"' for k, v in server.items()]
    path.write_text("\n".join(lines) + "\n")
    return load_config(path)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o666, 0o620, 0o602, 0o610])
def test_a_token_file_others_may_access_is_refused(tmp_path, mode):
    config = _config(tmp_path, auth_token_file=_token_file(tmp_path, mode))
    with pytest.raises(ConfigError) as info:
        config.auth_token()
    assert f"auth token file {tmp_path / 'token'} has mode {mode:04o}" in str(info.value)
    assert "owner only" in str(info.value)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_an_owner_only_token_file_is_read(tmp_path, mode):
    assert _config(tmp_path, auth_token_file=_token_file(tmp_path, mode)).auth_token() == TOKEN


def test_a_short_token_is_refused(tmp_path):
    from tidstorage.config import MIN_TOKEN_LENGTH, read_token

    short = _token_file(tmp_path, token="x" * (MIN_TOKEN_LENGTH - 1))
    with pytest.raises(ConfigError, match=f"15 characters long, at least {MIN_TOKEN_LENGTH}"):
        read_token(short)
    assert read_token(_token_file(tmp_path, token="x" * MIN_TOKEN_LENGTH)) == "x" * 16


def test_serve_refuses_a_loose_token_file_naming_it_and_its_mode(tmp_path):
    token = _token_file(tmp_path, 0o644)
    path = tmp_path / "t.toml"
    path.write_text(f'[server]\nport = 0\nauth_token_file = "{token}"\n')
    r = run_cli("serve", "-c", path, timeout=30)
    assert r.returncode == 2
    assert f"auth token file {token} has mode 0644" in r.stderr


def _tls_files(tmp_path, key_mode):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not read: the mode is checked first\n")
    key.write_text("not read: the mode is checked first\n")
    key.chmod(key_mode)
    return cert, key


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_tls_key_others_may_read_is_refused_at_daemon_start(tmp_path, mode):
    from tidstorage.config import check_daemon

    cert, key = _tls_files(tmp_path, mode)
    config = _config(tmp_path, tls_cert=cert, tls_key=key)  # clients read it: no check
    with pytest.raises(ConfigError, match=f"TLS key {key} has mode {mode:04o}"):
        check_daemon(config)
    path = tmp_path / "t.toml"
    r = run_cli("serve", "-c", path, timeout=30)
    assert r.returncode == 2
    assert f"TLS key {key} has mode {mode:04o}: it must be accessible by its owner only" in r.stderr


def test_an_owner_only_tls_key_passes_the_check(tmp_path):
    from tidstorage.config import check_daemon

    cert, key = _tls_files(tmp_path, 0o600)
    assert check_daemon(_config(tmp_path, tls_cert=cert, tls_key=key)) == []


@pytest.mark.parametrize("address, warned", [
    ("0.0.0.0", True), ("::", True), ("192.0.2.7", True), ("no-such-host.invalid", True),
    ("127.0.0.1", False), ("127.1.2.3", False), ("::1", False), ("[::1]", False),
    ("localhost", False),
])
def test_listening_beyond_loopback_without_a_token_is_warned(tmp_path, address, warned):
    from tidstorage.config import check_daemon

    config = _config(tmp_path, address=address)
    warnings = check_daemon(config)
    assert bool(warnings) == warned
    if warned:
        assert f"listening on {address}, not a loopback address, without an auth token" in (
            warnings[0])
    # a token, or a loopback address given on the command line: no warning
    assert check_daemon(_config(tmp_path, address=address,
                                auth_token_file=_token_file(tmp_path))) == []
    assert check_daemon(config, "127.0.0.1") == []
    assert bool(check_daemon(_config(tmp_path), address)) == warned


def test_serve_logs_the_warning_when_listening_on_all_interfaces(tmp_path):
    from tidstorage.demo.cluster import DaemonProcess

    d = DaemonProcess(tmp_path / "d", server={"address": "0.0.0.0"}).start()
    try:
        with d.client() as c:
            assert c.dump() == {}
    finally:
        assert d.stop() == 0
    assert "WARNING tidstorage: listening on 0.0.0.0, not a loopback address" in d.log()
    d = DaemonProcess(tmp_path / "e").start()
    assert d.stop() == 0
    assert "not a loopback address" not in d.log()


# -- the TID log is never written through a symbolic link (issue 9.19) ---------


def test_the_status_file_keeps_its_last_component(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "dirlink").symlink_to(real)
    (real / "log.tid").touch()
    (real / "link.tid").symlink_to(real / "log.tid")
    server = _config(tmp_path, status_file="dirlink/link.tid").server
    assert server.status_file == real / "link.tid"  # directories resolved, not the file


def test_the_tid_log_writer_refuses_a_symbolic_link(tmp_path):
    from tidstorage.formats.tidlog import TidLogWriter, read_log

    target = tmp_path / "elsewhere"
    target.write_text("")
    link = tmp_path / "log.tid"
    link.symlink_to(target)
    with pytest.raises(OSError, match=f"the TID log {link} is a symbolic link"):
        TidLogWriter(link, None, None)
    (tmp_path / "dangling.tid").symlink_to(tmp_path / "nothing")
    with pytest.raises(OSError, match="is a symbolic link"):
        TidLogWriter(tmp_path / "dangling.tid", None, None)
    assert not (tmp_path / "nothing").exists() and target.read_text() == ""
    # its directories may be links
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "dirlink").symlink_to(real)
    with TidLogWriter(tmp_path / "dirlink" / "log.tid", None, None) as writer:
        writer.published({"a": 1}, {"a": 1})
    assert read_log(real / "log.tid").final_tids() == {"a": 1}


def test_serve_refuses_a_status_file_that_is_a_symbolic_link(tmp_path):
    target = tmp_path / "target.tid"
    target.write_text("")
    (tmp_path / "log.tid").symlink_to(target)
    path = tmp_path / "t.toml"
    path.write_text('[server]\nport = 0\nstatus_file = "log.tid"\n')
    r = run_cli("serve", "-c", path, timeout=30)
    assert r.returncode == 2
    assert f"the TID log {tmp_path / 'log.tid'} is a symbolic link" in r.stderr
    path.write_text("[server]\nport = 0\n")
    r = run_cli("serve", "-c", path, "--status-file", tmp_path / "log.tid", timeout=30)
    assert r.returncode == 2
    assert "is a symbolic link" in r.stderr
    assert target.read_text() == ""


def test_more_storages_than_the_daemon_tracks_are_refused(tmp_path):
    from tidstorage.core.protocol import MAX_STORAGES

    path = tmp_path / "t.toml"
    path.write_text("".join(f"[storages.s{i}]\n" for i in range(MAX_STORAGES + 1)))
    with pytest.raises(ConfigError, match=f"storages: {MAX_STORAGES + 1} storages, more than"):
        load_config(path)
    path.write_text("".join(f"[storages.s{i}]\n" for i in range(MAX_STORAGES)))
    assert len(load_config(path).storages) == MAX_STORAGES
