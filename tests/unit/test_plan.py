"""The launcher's process plan and Prometheus config."""

from __future__ import annotations

from pathlib import Path

import yaml
from snpemu.hostconfig import HostConfig
from snpemu.launcher import prometheus
from snpemu.launcher.plan import plan
from snpemu.runtime.credentials import vmm_principal


def test_plan_order_commands_and_credentials(tmp_path: Path) -> None:
    config = HostConfig.load({})
    owners = {"guest-0": "o0", "guest-1": "o1"}
    specs = plan(
        config, state_dir=tmp_path, host_credential="c", owner_credentials=owners, python="py"
    )
    assert [s.name for s in specs] == ["rmp", "psp", "kvm", "netd", "guest-0", "guest-1"]
    assert specs[0].argv == ("py", "-m", "snpemu.rmp")
    assert specs[4].argv == ("py", "-m", "snpemu.guest")
    for s in specs:
        assert s.env["SNPEMU_GRPC_PORT"] == str(s.endpoint.grpc_port)
        assert s.env["SNPEMU_METRICS_PORT"] == str(s.endpoint.metrics_port)
        assert s.env["SNPEMU_INSTANCE"] == s.name
        assert s.env["SNPEMU_KVM_ADDR"] == "127.0.0.1:50073"
        # docs/design.md#host-credential: guests never hold the host credential
        assert ("SNPEMU_HOST_CREDENTIAL" in s.env) == s.is_host_side
        # each guest its own VMM and owner credentials; no host service holds either
        if s.is_host_side:
            assert "SNPEMU_VMM_CREDENTIAL" not in s.env and "SNPEMU_OWNER_CREDENTIAL" not in s.env
        else:
            assert vmm_principal("c", s.env["SNPEMU_VMM_CREDENTIAL"]) == s.name
            assert s.env["SNPEMU_OWNER_CREDENTIAL"] == owners[s.name]
    vmms = {s.env["SNPEMU_VMM_CREDENTIAL"] for s in specs if not s.is_host_side}
    assert len(vmms) == 2
    assert [s.service_name for s in specs][-1] == "snp.guest.v1.GuestService"


def test_prometheus_config_has_every_target() -> None:
    config = HostConfig.load({})
    parsed = yaml.safe_load(prometheus.render(config.endpoints, lambda _e: "127.0.0.1"))
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in parsed["scrape_configs"]}
    assert jobs == {
        "rmp": ["127.0.0.1:9471"],
        "psp": ["127.0.0.1:9472"],
        "kvm": ["127.0.0.1:9473"],
        "netd": ["127.0.0.1:9474"],
        "guest": ["127.0.0.1:9481", "127.0.0.1:9482"],
    }


def test_service_name_of_instances() -> None:
    from snpemu.launcher.plan import service_name_of

    assert service_name_of("rmp") == "snp.rmp.v1.RmpService"
    assert service_name_of("guest-12") == "snp.guest.v1.GuestService"
