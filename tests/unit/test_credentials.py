"""Per-guest VMM credentials and who each credential makes the caller."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st
from snpemu.errors import PermissionDenied, Unauthenticated
from snpemu.runtime.caller import Role
from snpemu.runtime.credentials import vmm_credential, vmm_principal
from snpemu.runtime.servicer import CREDENTIAL_HEADER, Authority

HOST = "h" * 64


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
