"""Every rmp request field is checked before anything changes: a value the proto does not define,
an address beyond memory, a u8 field above 255, a list naming a page twice is INVALID_ARGUMENT
with an RmpReason member, and the host is as it was.

The reported cases (issue 19) first, through gRPC: each once answered UNKNOWN with a traceback,
freed a page twice, or killed a whole session stream. Then hypothesis over the servicer on an
in-process machine, comparing a snapshot of the whole model before and after each refusal.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from snp.common.v1 import handles_pb2, types_pb2
from snp.rmp.v1 import rmp_pb2 as pb
from snpemu.abi.addr import PAGE_SIZE
from snpemu.abi.rmp import Placement
from snpemu.errors import InvalidArgument
from snpemu.rmp.machine import RmpMachine
from snpemu.rmp.reasons import RmpReason
from snpemu.rmp.servicer import RmpServicer
from snpemu.rmp.sessions import run_session
from snpemu.rmp.violations import KickHub

from tests.conftest import examples
from tests.service.test_rpc_netd import refused
from tests.service.test_rpc_rmp import HOST, KEY, Stub, alloc, make, rmp_stub

U64_MAX = (1 << 64) - 1
BAD = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    """A 64 MiB rmp with the gmem policy, reached through its stub."""
    async with rmp_stub() as served:
        yield served


async def free_pages(stub: Stub) -> int:
    r = await stub.GetPlatformInfo(pb.GetPlatformInfoRequest(), metadata=HOST)
    return int(r.free_pages)


# --- the reported cases, through gRPC --------------------------------------------------------


async def test_reported_enums_and_pfns_are_invalid_argument(stub: Stub) -> None:
    (pfn,) = await alloc(stub)
    before = await free_pages(stub)
    await refused(
        stub.HostWrite(pb.HostWriteRequest(spa=pfn << 12, data=b"x", origin=99), metadata=HOST),
        BAD,
        RmpReason.UNKNOWN_ENUM_VALUE,
    )
    await refused(
        stub.AllocatePages(pb.AllocatePagesRequest(count=1, placement=99), metadata=HOST),
        BAD,
        RmpReason.UNKNOWN_ENUM_VALUE,
    )
    await refused(
        stub.FreePages(pb.FreePagesRequest(pfns=[U64_MAX]), metadata=HOST),
        BAD,
        RmpReason.BEYOND_MEMORY,
    )
    await refused(
        stub.SetViolationPolicy(pb.SetViolationPolicyRequest(policy=99), metadata=HOST),
        BAD,
        RmpReason.UNKNOWN_ENUM_VALUE,
    )
    assert await free_pages(stub) == before
    got = await stub.GetViolationPolicy(pb.GetViolationPolicyRequest(), metadata=HOST)
    assert got.policy == pb.VIOLATION_POLICY_GMEM  # the fixture's, unchanged
    read = await stub.HostRead(pb.HostReadRequest(spa=pfn << 12, length=1), metadata=HOST)
    assert read.data == b"\0"  # the refused write wrote nothing


async def test_free_pages_naming_a_page_twice_frees_nothing(stub: Stub) -> None:
    a, b = await alloc(stub, 2)
    before = await free_pages(stub)
    await refused(
        stub.FreePages(pb.FreePagesRequest(pfns=[a, b, a]), metadata=HOST),
        BAD,
        RmpReason.DUPLICATE_PAGE,
    )
    assert await free_pages(stub) == before
    # both are still allocated: each frees once, and a second free finds it free
    await stub.FreePages(pb.FreePagesRequest(pfns=[a, b]), metadata=HOST)
    assert await free_pages(stub) == before + 2
    await refused(
        stub.FreePages(pb.FreePagesRequest(pfns=[a]), metadata=HOST),
        grpc.StatusCode.FAILED_PRECONDITION,
        RmpReason.NOT_ALLOCATED,
    )


async def test_leak_pages_naming_a_page_twice_leaks_nothing(stub: Stub) -> None:
    (a,) = await alloc(stub)
    await refused(
        stub.LeakPages(pb.LeakPagesRequest(pfns=[a, a], reason="test"), metadata=HOST),
        BAD,
        RmpReason.DUPLICATE_PAGE,
    )
    listed = await stub.ListLeakedPages(pb.ListLeakedPagesRequest(), metadata=HOST)
    assert a not in listed.pfns


async def test_a_bad_enum_on_a_host_session_answers_that_op_and_keeps_the_stream(
    stub: Stub,
) -> None:
    (pfn,) = await alloc(stub)
    session = stub.HostSession(metadata=HOST)
    await session.write(
        pb.HostSessionRequest(write=pb.HostWriteRequest(spa=pfn << 12, data=b"x", origin=99))
    )
    reply = await session.read()
    assert reply.WhichOneof("result") == "error"
    assert reply.error.code == BAD.value[0]
    assert reply.error.reason == RmpReason.UNKNOWN_ENUM_VALUE
    # an op the session does not know, then a good one: the same stream answers both
    await session.write(pb.HostSessionRequest())
    reply = await session.read()
    assert reply.error.reason == RmpReason.UNKNOWN_SESSION_OP
    await session.write(pb.HostSessionRequest(read=pb.HostReadRequest(spa=pfn << 12, length=1)))
    reply = await session.read()
    assert reply.read.data == b"\0"  # the refused write wrote nothing
    # a bad enum inside a sequence stops the sequence there and answers in-band too
    seq = pb.HostSequenceRequest(
        ops=[
            pb.HostSessionRequest(
                write=pb.HostWriteRequest(spa=pfn << 12, data=b"y", origin=pb.ACCESS_ORIGIN_USER)
            ),
            pb.HostSessionRequest(write=pb.HostWriteRequest(spa=pfn << 12, data=b"z", origin=7)),
        ]
    )
    await session.write(pb.HostSessionRequest(sequence=seq))
    reply = await session.read()
    results = reply.sequence.results
    assert [r.WhichOneof("result") for r in results] == ["write", "error"]
    assert results[1].error.reason == RmpReason.UNKNOWN_ENUM_VALUE
    await session.done_writing()
    assert await session.read() is grpc.aio.EOF


async def test_a_bad_enum_on_a_firmware_session_answers_that_op_and_keeps_the_stream(
    stub: Stub,
) -> None:
    (pfn,) = await alloc(stub)
    await make(stub, pfn, assigned=True, immutable=True)  # a firmware page
    session = stub.FirmwareSession(metadata=HOST)
    for bad in (
        pb.FirmwareReadRequest(spa=pfn << 12, length=8, expect_states=[99]),
        pb.FirmwareReadRequest(
            spa=pfn << 12, length=8, checks=[pb.PageCheck(spa=pfn << 12, expect_states=[-3])]
        ),
    ):
        await session.write(pb.FirmwareSessionRequest(read=bad))
        reply = await session.read()
        assert reply.error.code == BAD.value[0]
        assert reply.error.reason == RmpReason.UNKNOWN_ENUM_VALUE
    await session.write(
        pb.FirmwareSessionRequest(
            write=pb.FirmwareWriteRequest(spa=U64_MAX & ~0xFFF, data=b"x")  # beyond memory
        )
    )
    reply = await session.read()
    assert reply.error.reason == RmpReason.BEYOND_MEMORY
    fw = [types_pb2.PAGE_STATE_FIRMWARE]
    await session.write(
        pb.FirmwareSessionRequest(
            read=pb.FirmwareReadRequest(spa=pfn << 12, length=8, expect_states=fw)
        )
    )
    reply = await session.read()
    assert reply.read.data == bytes(8)
    await session.done_writing()
    assert await session.read() is grpc.aio.EOF


async def test_errors_quote_only_a_prefix_of_the_input(stub: Stub) -> None:
    huge = "m" * (1 << 20)
    for call in (
        stub.UnmapHostPage(pb.UnmapHostPageRequest(map_id=huge), metadata=HOST),
        stub.HostWrite(
            pb.HostWriteRequest(spa=0, data=b"x", origin=pb.ACCESS_ORIGIN_USER, writer=huge),
            metadata=HOST,
        ),
        stub.RevokeVcpuIdentity(
            pb.RevokeVcpuIdentityRequest(
                identity=handles_pb2.VcpuIdentity(
                    vcpu=handles_pb2.VcpuHandle(vm=handles_pb2.VmHandle(id=huge))
                )
            ),
            metadata=HOST,
        ),
    ):
        message = await refused(call, BAD, RmpReason.TOO_LONG)
        assert len(message) < 200


# --- hypothesis over the servicer: a clear refusal, and the whole model unchanged ------------

MEMORY = 4 << 20
NPAGES = MEMORY // PAGE_SIZE
VCPU = handles_pb2.VcpuIdentity(
    vcpu=handles_pb2.VcpuHandle(vm=handles_pb2.VmHandle(id="vm-v"), vcpu_id=0),
    asid=5,
    token=b"v" * 32,
)


def snapshot(m: RmpMachine) -> tuple[Any, ...]:
    """Everything a request could change: the RMP, frames, the allocator, counters, policy,
    keys, identities, host maps and the nested page tables."""
    c = m.counters
    return (
        m.table.lo.tobytes(),
        m.table.hi.tobytes(),
        m.table.kind.tobytes(),
        m.allocator.free.tobytes(),
        m.allocator.leaked.tobytes(),
        {pfn: bytes(frame) for pfn, frame in m.frames._frames.items()},
        (dict(c.updates), dict(c.violations), c.leaked_pages, c.panics, c.leaked_maps),
        m.policy,
        sorted(m.keys._keys),
        dict(m.identities._by_vcpu),
        {k: (v.pfn, v.holder) for k, v in m.maps.items()},
        {a: t.mappings() for a, t in m.paging.npts.items()},
        m.wbinvd_indicator,
    )


class Host:
    """A 4 MiB machine with one shared page mapped at GPA 0 for VCPU, one firmware page, a key
    for ASID 5 and a host map: something for every check to get past its first test."""

    def __init__(self) -> None:
        self.m = RmpMachine(MEMORY)
        self.servicer = RmpServicer(self.m, KickHub(1.0))
        self.shared, self.fw = self.m.allocate(2, Placement.ANY)
        self.m.update_npt(5, unmap=[], map=[(0, self.shared, 1)])
        self.m.rmpupdate(self.fw << 12, gpa=0, assigned=True, size_2m=False, immutable=True, asid=0)
        self.m.install_key(5, KEY)
        self.m.map_page(self.shared, "test")
        asyncio.run(
            self.servicer.RegisterVcpuIdentity(pb.RegisterVcpuIdentityRequest(identity=VCPU), None)
        )

    def refuses(self, rpc: str, request: Any) -> str:
        """Call rpc; it must raise InvalidArgument with an RmpReason and change nothing."""
        before = snapshot(self.m)
        with pytest.raises(InvalidArgument) as info:
            asyncio.run(getattr(self.servicer, rpc)(request, None))
        assert info.value.reason in set(RmpReason), info.value.reason
        assert snapshot(self.m) == before, rpc
        return info.value.reason


@pytest.fixture(scope="module")
def host() -> Host:
    return Host()


def _undefined(enum: Any) -> st.SearchStrategy[int]:
    """int32 values the proto enum does not define (an open enum carries any of them)."""
    defined = set(enum.values())
    return st.integers(-(1 << 31), (1 << 31) - 1).filter(lambda v: v not in defined)


def _enum_cases(h: Host) -> list[tuple[str, Any, Callable[[int], Any]]]:
    """(rpc, the proto enum, a request with that enum field set to v)."""
    spa, fw = h.shared << 12, h.fw << 12
    return [
        ("AllocatePages", pb.Placement, lambda v: pb.AllocatePagesRequest(count=1, placement=v)),
        (
            "HostWrite",
            pb.AccessOrigin,
            lambda v: pb.HostWriteRequest(spa=spa, data=b"x", origin=v),
        ),
        (
            "HostCopy",
            pb.AccessOrigin,
            lambda v: pb.HostCopyRequest(src_spa=spa, dst_spa=spa, length=8, origin=v),
        ),
        (
            "SetViolationPolicy",
            pb.ViolationPolicy,
            lambda v: pb.SetViolationPolicyRequest(policy=v),
        ),
        (
            "FirmwareTransition",
            pb.FirmwareOp,
            lambda v: pb.FirmwareTransitionRequest(spas=[fw], op=v),
        ),
        (
            "FirmwareRead",
            types_pb2.PageState,
            lambda v: pb.FirmwareReadRequest(spa=fw, length=8, expect_states=[v]),
        ),
        (
            "FirmwareRead",
            types_pb2.PageState,
            lambda v: pb.FirmwareReadRequest(
                spa=fw, length=8, checks=[pb.PageCheck(spa=fw, expect_states=[v])]
            ),
        ),
        (
            "FirmwareWrite",
            types_pb2.PageState,
            lambda v: pb.FirmwareWriteRequest(spa=fw, data=b"x", expect_states=[v]),
        ),
        (
            "RmpUpdate",
            types_pb2.PageSize,
            lambda v: pb.RmpUpdateRequest(spa=spa, state=pb.RmpState(page_size=v)),
        ),
        (
            "Pvalidate",
            types_pb2.PageSize,
            lambda v: pb.PvalidateRequest(identity=VCPU, gpa=0, page_size=v, validate=True),
        ),
        (
            "RmpAdjust",
            types_pb2.PageSize,
            lambda v: pb.RmpAdjustRequest(identity=VCPU, gpa=0, page_size=v, target_vmpl=1),
        ),
    ]


@settings(deadline=None)
@given(data=st.data())
def test_undefined_enum_values_are_refused_and_change_nothing(host: Host, data: Any) -> None:
    cases = _enum_cases(host)
    rpc, enum, build = cases[data.draw(st.integers(0, len(cases) - 1), label="case")]
    value = data.draw(_undefined(enum), label="value")
    reason = host.refuses(rpc, build(value))
    assert reason == (RmpReason.MISSING_FIELD if value == 0 else RmpReason.UNKNOWN_ENUM_VALUE)


def _range_cases(h: Host) -> list[tuple[str, st.SearchStrategy[int], Callable[[int], Any]]]:
    """(rpc, values outside the field's range, a request with the field set to v)."""
    spa, fw = h.shared << 12, h.fw << 12
    pfn_beyond = st.integers(NPAGES, U64_MAX)
    spa_beyond = st.integers(MEMORY, U64_MAX)
    asid_beyond = st.integers(1024, (1 << 32) - 1)
    u8_beyond = st.integers(256, (1 << 32) - 1)
    user = pb.ACCESS_ORIGIN_USER
    return [
        ("FreePages", pfn_beyond, lambda v: pb.FreePagesRequest(pfns=[h.shared, v])),
        ("LeakPages", pfn_beyond, lambda v: pb.LeakPagesRequest(pfns=[v], reason="r")),
        ("ReadRmpEntry", pfn_beyond, lambda v: pb.ReadRmpEntryRequest(pfn=v)),
        ("ListRmpEntries", pfn_beyond, lambda v: pb.ListRmpEntriesRequest(first_pfn=v, count=1)),
        ("HostRead", spa_beyond, lambda v: pb.HostReadRequest(spa=v, length=1)),
        ("HostWrite", spa_beyond, lambda v: pb.HostWriteRequest(spa=v, data=b"x", origin=user)),
        (
            "HostCopy",
            spa_beyond,
            lambda v: pb.HostCopyRequest(src_spa=v, dst_spa=spa, length=1, origin=user),
        ),
        (
            "HostCopy",
            spa_beyond,
            lambda v: pb.HostCopyRequest(src_spa=spa, dst_spa=v, length=1, origin=user),
        ),
        ("MapHostPage", spa_beyond, lambda v: pb.MapHostPageRequest(spa=v, holder="h")),
        ("FirmwareRead", spa_beyond, lambda v: pb.FirmwareReadRequest(spa=v, length=1)),
        (
            "FirmwareRead",
            spa_beyond,
            lambda v: pb.FirmwareReadRequest(spa=fw, length=1, checks=[pb.PageCheck(spa=v)]),
        ),
        ("FirmwareWrite", spa_beyond, lambda v: pb.FirmwareWriteRequest(spa=v, data=b"x")),
        (
            "FirmwareTransition",
            spa_beyond,
            lambda v: pb.FirmwareTransitionRequest(spas=[fw, v], op=pb.FIRMWARE_OP_RECLAIM),
        ),
        (
            "UpdateNestedPageTable",
            pfn_beyond,
            lambda v: pb.UpdateNestedPageTableRequest(
                asid=5, map=[pb.NptMapping(gpa=1 << 30, first_pfn=v, npages=1)]
            ),
        ),
        ("RemoveMemoryKey", asid_beyond, lambda v: pb.RemoveMemoryKeyRequest(asid=v)),
        ("InstallMemoryKey", asid_beyond, lambda v: pb.InstallMemoryKeyRequest(asid=v, key=KEY)),
        (
            "FirmwareRead",
            asid_beyond,
            lambda v: pb.FirmwareReadRequest(spa=fw, length=1, asid=v),
        ),
        (
            "FirmwareTransition",
            asid_beyond,
            lambda v: pb.FirmwareTransitionRequest(spas=[fw], op=pb.FIRMWARE_OP_CONTEXT, asid=v),
        ),
        (
            "UpdateNestedPageTable",
            asid_beyond,
            lambda v: pb.UpdateNestedPageTableRequest(
                asid=v, map=[pb.NptMapping(gpa=0, first_pfn=0, npages=1)]
            ),
        ),
        (
            "MapHostPage",
            asid_beyond,
            lambda v: pb.MapHostPageRequest(guest=pb.GuestPageAddress(asid=v), holder="h"),
        ),
        (
            "RmpAdjust",
            u8_beyond,
            lambda v: pb.RmpAdjustRequest(
                identity=VCPU, gpa=0, page_size=types_pb2.PAGE_SIZE_4K, target_vmpl=v
            ),
        ),
        (
            "RmpAdjust",
            u8_beyond,
            lambda v: pb.RmpAdjustRequest(
                identity=VCPU, gpa=0, page_size=types_pb2.PAGE_SIZE_4K, target_vmpl=1, perms=v
            ),
        ),
    ]


@settings(deadline=None)
@given(data=st.data())
def test_integers_beyond_their_range_are_refused_and_change_nothing(host: Host, data: Any) -> None:
    cases = _range_cases(host)
    rpc, values, build = cases[data.draw(st.integers(0, len(cases) - 1), label="case")]
    reason = host.refuses(rpc, build(data.draw(values, label="value")))
    assert reason in (RmpReason.BEYOND_MEMORY, RmpReason.OUT_OF_RANGE)


@settings(deadline=None, max_examples=examples(30))
@given(pages=st.lists(st.integers(0, NPAGES - 1), min_size=1, max_size=6), dup=st.data())
def test_a_list_naming_a_page_twice_is_refused_and_changes_nothing(
    host: Host, pages: list[int], dup: Any
) -> None:
    twice = [*pages, dup.draw(st.sampled_from(pages), label="again")]
    for rpc, request in (
        ("FreePages", pb.FreePagesRequest(pfns=twice)),
        ("LeakPages", pb.LeakPagesRequest(pfns=twice, reason="r")),
        (
            "FirmwareTransition",
            pb.FirmwareTransitionRequest(spas=[p << 12 for p in twice], op=pb.FIRMWARE_OP_RECLAIM),
        ),
    ):
        assert host.refuses(rpc, request) == RmpReason.DUPLICATE_PAGE


def test_a_refused_nested_page_table_update_changes_no_mapping(host: Host) -> None:
    """Unmaps then maps, all or nothing: a bad second mapping leaves the first unmapped range
    mapped."""
    host.refuses(
        "UpdateNestedPageTable",
        pb.UpdateNestedPageTableRequest(
            asid=5,
            unmap=[pb.NptMapping(gpa=0, npages=1)],
            map=[
                pb.NptMapping(gpa=0x10000, first_pfn=host.shared, npages=1),
                pb.NptMapping(gpa=0x20000, first_pfn=NPAGES, npages=1),
            ],
        ),
    )


def test_a_session_op_that_fails_unexpectedly_answers_internal_and_the_stream_goes_on() -> None:
    """Not a caller's error (a bug): that op answers INTERNAL in-band, the next op is served."""

    async def broken(request: Any, context: Any) -> Any:
        raise ValueError("a bug")

    async def read(request: Any, context: Any) -> Any:
        return pb.HostReadResponse(data=b"ok")

    async def ops() -> Any:
        yield pb.HostSessionRequest(write=pb.HostWriteRequest())
        yield pb.HostSessionRequest(read=pb.HostReadRequest())

    async def run() -> list[Any]:
        handlers = {"write": broken, "read": read}
        return [r async for r in run_session(ops(), None, pb.HostSessionResponse, handlers)]

    first, second = asyncio.run(run())
    assert first.error.code == grpc.StatusCode.INTERNAL.value[0]
    assert "a bug" not in first.error.message  # the exception text stays in the log
    assert second.read.data == b"ok"
