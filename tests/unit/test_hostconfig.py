"""The host layout from .env: parsing, overrides, validation."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from snpemu.hostconfig import ConfigError, HostConfig, parse_env_file

from tests.conftest import ROOT


def test_parse_env_file_syntax() -> None:
    text = "# comment\n\nA=1\nexport B = two\nC='quoted value'\nD=\"x=y\"\nE=\n"
    assert parse_env_file(text) == {"A": "1", "B": "two", "C": "quoted value", "D": "x=y", "E": ""}


@pytest.mark.parametrize("line", ["no equals sign", "=value", "1A=2", "BAD-KEY=1"])
def test_parse_env_file_rejects_with_line_number(line: str) -> None:
    with pytest.raises(ConfigError, match=r"x.env:2: expected KEY=VALUE"):
        parse_env_file(f"OK=1\n{line}\n", "x.env")


@given(st.text())
def test_parse_env_file_only_raises_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        parse_env_file(text)


@given(
    st.dictionaries(
        st.from_regex(r"[A-Z_][A-Z0-9_]{0,20}", fullmatch=True),
        st.from_regex(r"[a-z0-9:./-]{0,20}", fullmatch=True),
    )
)
def test_parse_env_file_round_trip(values: dict[str, str]) -> None:
    text = "\n".join(f"{k}={v}" for k, v in values.items())
    assert parse_env_file(text) == values


def test_committed_layout_is_the_documented_one() -> None:
    config = HostConfig.load({"SNPEMU_CONFIG": str(ROOT / ".env")})
    assert [(e.name, e.module, e.grpc_port, e.metrics_port) for e in config.endpoints] == [
        ("rmp", "snpemu.rmp", 50071, 9471),
        ("psp", "snpemu.psp", 50072, 9472),
        ("kvm", "snpemu.kvm", 50073, 9473),
        ("netd", "snpemu.netd", 50074, 9474),
        ("guest-0", "snpemu.guest", 50081, 9481),
        ("guest-1", "snpemu.guest", 50082, 9482),
    ]
    assert (config.prometheus_port, config.grafana_port) == (9090, 3000)


def test_environment_overrides_file() -> None:
    config = HostConfig.load({"SNPEMU_KVM_GRPC_PORT": "6000", "SNPEMU_GUESTS": "4"})
    assert config.endpoint("kvm").grpc_port == 6000
    # guests beyond the spelled-out ones continue from the base
    assert [e.grpc_port for e in config.guests] == [50081, 50082, 50083, 50084]
    assert [e.metrics_port for e in config.guests] == [9481, 9482, 9483, 9484]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SNPEMU_RMP_GRPC_PORT": "abc"}, "SNPEMU_RMP_GRPC_PORT='abc': not a port number"),
        (
            {"SNPEMU_PSP_GRPC_PORT": "70000"},
            "SNPEMU_PSP_GRPC_PORT='70000': port must be in 1..65535",
        ),
        ({"SNPEMU_KVM_METRICS_PORT": "0"}, "SNPEMU_KVM_METRICS_PORT='0': port must be in 1..65535"),
        ({"SNPEMU_GUESTS": "65"}, "SNPEMU_GUESTS='65': must be in 0..64"),
        ({"SNPEMU_GUESTS": "two"}, "SNPEMU_GUESTS='two': not a whole number"),
        ({"SNPEMU_NETD_GRPC_PORT": "50071"}, "port 50071 is given to both rmp gRPC and netd gRPC"),
        ({"SNPEMU_CONFIG": "/nonexistent/.env"}, "SNPEMU_CONFIG=/nonexistent/.env: no such file"),
    ],
)
def test_bad_values_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        HostConfig.load(env)
    assert info.value.message == message


def test_missing_value_is_named(tmp_path) -> None:  # type: ignore[no-untyped-def]
    text = (ROOT / ".env").read_text().replace("SNPEMU_PSP_GRPC_PORT=50072\n", "")
    (tmp_path / ".env").write_text(text)
    with pytest.raises(ConfigError, match="SNPEMU_PSP_GRPC_PORT is not set"):
        HostConfig.load({"SNPEMU_CONFIG": str(tmp_path / ".env")})
