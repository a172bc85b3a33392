"""Reflection resolves every symbol grpcurl may ask for, including methods and enum values."""

from __future__ import annotations

import pytest
from snp.kvm.v1 import kvm_pb2  # noqa: F401  (registers the file in the default pool)
from snpemu.runtime.reflection_pool import ReflectionPool


@pytest.mark.parametrize(
    "symbol",
    [
        "snp.kvm.v1.KvmService",
        "snp.kvm.v1.KvmService.CreateVm",
        "snp.kvm.v1.VmConfig",
        "snp.kvm.v1.VmConfig.policy",
        "snp.kvm.v1.VcpuType",
        "snp.kvm.v1.VcpuType.VCPU_TYPE_EPYC_MILAN",
    ],
)
def test_symbols_resolve_to_their_file(symbol: str) -> None:
    assert ReflectionPool().FindFileContainingSymbol(symbol).name == "snp/kvm/v1/kvm.proto"


@pytest.mark.parametrize(
    "symbol",
    ["snp.kvm.v1.KvmService.NoSuchRpc", "snp.kvm.v1.VcpuType.NOPE", "nothing", "no.such.Thing"],
)
def test_unknown_symbols_raise_key_error(symbol: str) -> None:
    with pytest.raises(KeyError):
        ReflectionPool().FindFileContainingSymbol(symbol)


def test_other_lookups_are_delegated() -> None:
    assert ReflectionPool().FindFileByName("snp/kvm/v1/kvm.proto").package == "snp.kvm.v1"
