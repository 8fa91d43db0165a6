"""One parser for host:port everywhere (the daemon's address, ZEO servers)."""

import pytest

from tidstorage.core.addresses import format_address, parse_host_port, parse_zeo_address


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:9001", ("127.0.0.1", 9001)),
    ("[::1]:9001", ("::1", 9001)),
    (" localhost:1 ", ("localhost", 1)),
])
def test_host_port(text, expected):
    assert parse_host_port(text) == expected
    assert parse_host_port(format_address(expected)) == expected


@pytest.mark.parametrize("text", ["/run/zeo.sock", "localhost", "h:0", "h:70000", "::1:9001", ""])
def test_host_port_refuses_and_names_the_text(text):
    with pytest.raises(ValueError) as info:
        parse_host_port(text, "daemon address")
    assert "daemon address" in str(info.value) and repr(text) in str(info.value)


def test_zeo_address_takes_a_socket_path_and_the_same_host_port_rules():
    assert parse_zeo_address("/run/zeo.sock") == "/run/zeo.sock"
    assert parse_zeo_address("[::1]:8100") == ("::1", 8100)
    with pytest.raises(ValueError, match="unix socket path"):
        parse_zeo_address("nowhere")
    with pytest.raises(ValueError, match="brackets"):
        parse_zeo_address("::1:8100")


def test_wrap_and_dump_use_it(tmp_path):
    from click.testing import CliRunner

    from tidstorage.cli import main

    result = CliRunner().invoke(main, ["dump", "--server", "::1:9001"])
    assert result.exit_code == 2
    assert "brackets" in result.output
