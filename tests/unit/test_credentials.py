"""Per-guest VMM credentials and who each credential makes the caller."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from snpemu.errors import PermissionDenied, Unauthenticated
from snpemu.launcher import credentials
from snpemu.runtime.caller import Role
from snpemu.runtime.config import ServiceConfig
from snpemu.runtime.credentials import vmm_credential, vmm_principal
from snpemu.runtime.servicer import CREDENTIAL_HEADER, Authority

HOST = "h" * 64
ROOT = Path(__file__).resolve().parents[2]


def test_a_vmm_credential_is_the_hmac_of_its_guests_name() -> None:
    # RFC 2104 HMAC-SHA256 computed here with the standard library, not the module's helper
    mac = hmac.new(HOST.encode(), b"snpemu vmm credential v1\0guest-0", hashlib.sha256)
    assert vmm_credential(HOST, "guest-0") == "guest-0." + mac.hexdigest()
    assert vmm_principal(HOST, vmm_credential(HOST, "guest-0")) == "guest-0"
    assert vmm_credential(HOST, "guest-0") != vmm_credential(HOST, "guest-1")
    assert vmm_principal("other host", vmm_credential(HOST, "guest-0")) is None


@given(st.text(max_size=200))
def test_nothing_but_a_derived_credential_names_a_guest(given_text: str) -> None:
    name = vmm_principal(HOST, given_text)
    assert name is None or given_text == vmm_credential(HOST, name)


def test_a_guest_name_outside_the_pattern_has_no_credential() -> None:
    for bad in ("", "Guest", "g" * 64, "guest.0", "guest 0"):
        with pytest.raises(ValueError):
            vmm_credential(HOST, bad)


def test_authority() -> None:
    a = Authority(host_credential=HOST, vmm_rpcs=frozenset({"CreateVm"}))
    vmm = {CREDENTIAL_HEADER: vmm_credential(HOST, "guest-3")}
    assert a.caller("CreateVm", {CREDENTIAL_HEADER: HOST}).role is Role.HOST
    got = a.caller("CreateVm", vmm)
    assert (got.role, got.name, got.is_host) == (Role.VMM, "guest-3", False)
    with pytest.raises(PermissionDenied):
        a.caller("ListVms", vmm)  # not a VMM RPC
    with pytest.raises(Unauthenticated):
        a.caller("CreateVm", {})
    assert Authority().caller("ListVms", {}).is_host  # no credential configured: open
    owned = Authority(host_credential=HOST, owner_credential="o" * 64)
    assert owned.caller("ReadMemory", {"x-snpemu-owner-credential": "o" * 64}).role is Role.OWNER
    with pytest.raises(Unauthenticated):
        owned.caller("ReadMemory", {CREDENTIAL_HEADER: HOST})
    with pytest.raises(PermissionDenied):
        owned.caller("ReadMemory", {"x-snpemu-owner-credential": HOST})


def test_generated_credentials_reach_each_guest_under_compose_and_kubernetes(
    tmp_path: Path,
) -> None:
    assert credentials.main(["--guests", "2", "--dir", str(tmp_path)]) == 0
    host = (tmp_path / "host-credential").read_text()
    assert oct((tmp_path / "guest-1.owner-credential").stat().st_mode & 0o777) == "0o600"
    # Kubernetes: the Secret mounted as files, each pod reading its own by its name
    for n in (0, 1):
        cfg = ServiceConfig.from_env(
            "guest", {"SNPEMU_INSTANCE": f"guest-{n}", "SNPEMU_CREDENTIALS_DIR": str(tmp_path)}
        )
        assert cfg.vmm_credential and vmm_principal(host, cfg.vmm_credential) == f"guest-{n}"
        assert cfg.owner_credential == (tmp_path / f"guest-{n}.owner-credential").read_text()
    kvm = ServiceConfig.from_env("kvm", {"SNPEMU_CREDENTIALS_DIR": str(tmp_path)})
    assert kvm.vmm_credential is None and kvm.owner_credential is None
    # compose: the variables the generator prints are the ones docker-compose.yml reads
    env = dict(line.split("=", 1) for line in credentials.as_env(credentials.make(2)).splitlines())
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, svc in compose["services"].items():
        e = svc.get("environment", {})
        if not name.startswith("guest-"):
            assert "SNPEMU_VMM_CREDENTIAL" not in e and "SNPEMU_OWNER_CREDENTIAL" not in e
            continue
        n = name.split("-")[1]
        for kind in ("VMM", "OWNER"):
            var = f"SNPEMU_GUEST_{n}_{kind}_CREDENTIAL"
            assert e[f"SNPEMU_{kind}_CREDENTIAL"] == f"${{{var}:-}}" and var in env
