"""Per-process configuration from the environment."""

from __future__ import annotations

import pytest
from snpemu.hostconfig import ConfigError
from snpemu.runtime.config import ServiceConfig


def test_defaults_come_from_the_host_layout() -> None:
    rmp = ServiceConfig.from_env("rmp", {})
    assert (rmp.bind, rmp.grpc_port, rmp.metrics_port) == ("127.0.0.1", 50071, 9471)
    assert rmp.instance == "rmp"
    assert rmp.log_level == "INFO"
    assert rmp.shutdown_grace_s == 5.0
    assert dict(rmp.peers) == {
        "rmp": "127.0.0.1:50071",
        "psp": "127.0.0.1:50072",
        "kvm": "127.0.0.1:50073",
        "netd": "127.0.0.1:50074",
    }
    guest = ServiceConfig.from_env("guest", {})
    assert (guest.grpc_port, guest.metrics_port) == (50081, 9481)


def test_explicit_values() -> None:
    config = ServiceConfig.from_env(
        "guest",
        {
            "SNPEMU_GRPC_PORT": "0",
            "SNPEMU_METRICS_PORT": "0",
            "SNPEMU_INSTANCE": "guest-3",
            "SNPEMU_LOG_LEVEL": "debug",
            "SNPEMU_SHUTDOWN_GRACE_S": "0.5",
            "SNPEMU_KVM_ADDR": "kvm:50073",
            "SNPEMU_HOST_CREDENTIAL": "s3cret",
        },
    )
    assert (config.grpc_port, config.metrics_port, config.instance) == (0, 0, "guest-3")
    assert config.log_level == "DEBUG"
    assert config.shutdown_grace_s == 0.5
    assert config.peers["kvm"] == "kvm:50073"
    assert config.host_credential == "s3cret"
    assert str(config.data_dir).endswith("data/guest-3")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"SNPEMU_GRPC_PORT": "x"}, "SNPEMU_GRPC_PORT='x': not a port number"),
        ({"SNPEMU_METRICS_PORT": "-1"}, "SNPEMU_METRICS_PORT='-1': port must be in 0..65535"),
        ({"SNPEMU_LOG_LEVEL": "LOUD"}, "SNPEMU_LOG_LEVEL='LOUD': must be one of DEBUG, INFO"),
        ({"SNPEMU_SHUTDOWN_GRACE_S": "soon"}, "SNPEMU_SHUTDOWN_GRACE_S='soon': not a number"),
        ({"SNPEMU_SHUTDOWN_GRACE_S": "-1"}, "SNPEMU_SHUTDOWN_GRACE_S='-1': must be in 0..300"),
        ({"SNPEMU_RMP_ADDR": "nohost"}, "SNPEMU_RMP_ADDR='nohost': expected host:port"),
        ({"SNPEMU_PSP_ADDR": "psp:http"}, "SNPEMU_PSP_ADDR='http': not a port number"),
        ({"SNPEMU_BIND": "a b"}, "SNPEMU_BIND='a b': not an address"),
    ],
)
def test_bad_values_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServiceConfig.from_env("kvm", env)
    assert info.value.message.startswith(message)
