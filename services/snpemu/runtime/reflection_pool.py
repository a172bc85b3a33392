"""A descriptor pool view that also resolves method and enum-value symbols for reflection.

grpcurl resolves `describe snp.kvm.v1.KvmService.CreateVm` by asking reflection for the file
containing that symbol. protobuf's upb pool finds services, messages and fields but not
methods or enum values, so the plain pool answers "Symbol not found". This view falls back to
the parent (service or enum) and checks the child exists before answering with its file.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor


class ReflectionPool:
    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool or descriptor_pool.Default()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)

    def FindFileContainingSymbol(self, symbol: str) -> FileDescriptor:
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            parent, _, child = symbol.rpartition(".")
            if not parent:
                raise
        try:
            service = self._pool.FindServiceByName(parent)
        except KeyError:
            service = None
        if service is not None and child in service.methods_by_name:
            return service.file
        try:
            enum = self._pool.FindEnumTypeByName(parent)
        except KeyError:
            enum = None
        if enum is not None and child in enum.values_by_name:
            return enum.file
        raise KeyError(f"Couldn't find symbol {symbol}")
