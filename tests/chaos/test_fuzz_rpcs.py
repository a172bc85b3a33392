"""Every RPC of every service, found from the service descriptors, sent malformed requests that
hypothesis builds from the request's message descriptor (tests/chaos/strategies.py). For each
call: a clear status code (never UNKNOWN, INTERNAL or a timeout), google.rpc.ErrorInfo on every
refusal, the service SERVING afterwards, and a refusal that changed nothing the services report
(rmp's table, host maps and leaks, psp's platform and guest status, kvm's VMs, netd's devices,
the guest agent's status).

Short form (`make test`): a few derandomized examples per RPC. Long form:
HYPOTHESIS_PROFILE=long, 20 times as many, at random, shrunk. SNPEMU_FUZZ_FIGURES=path appends
the requests fuzzed per service and code as one JSON line (docs/reliability.md).

What the suite finds and nobody has fixed yet is FINDINGS: one strict xfail per RPC, so the
table is the list of known failures and an entry whose bug is fixed fails until it goes.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from hypothesis import HealthCheck, Phase, Verbosity, example, given, settings
from hypothesis import strategies as st
from snp.netd.v1 import netd_pb2
from snp.rmp.v1 import rmp_pb2
from snpemu.guest.errors import GuestReason
from snpemu.netd.reasons import NetdReason

from tests.chaos import strategies
from tests.chaos.host import MAC_A, METADATA, SERVICES, FuzzHost
from tests.conftest import examples
from tests.service.host_stack import HOST

# SPEC: https://grpc.github.io/grpc/core/md_doc_statuscodes.html: the codes a server answers a
# request with on purpose; UNKNOWN, INTERNAL, DEADLINE_EXCEEDED, UNAVAILABLE and the rest say
# the server broke, hung or went away
CLEAR = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
PER_RPC = 5  # examples per RPC under the ci profile
# reasons that say the request was carried out and failed in the guest (its access took a #VC
# or an unresolved #NPF, the guest terminated, the host's copy it waited for never began):
# what it did before that stays done, as on a real guest, so these are exempt from "a refusal
# changes nothing"
ACTED = frozenset({GuestReason.GUEST_FAULT, GuestReason.GUEST_TERMINATED, GuestReason.NO_COPY})
# Refused after the guest's driver had set its device up (netd refused the MAC): the driver
# puts every page back and attaches the device it had before. Two things differ, as they
# would on hardware: a 2M RMP entry the conversion split (kvm's PSMASH) stays 512 4K entries
# (nothing merges them back; Linux's set_memory_encrypted() does not), and the old device is
# a new registration (same VM and MAC, a new netd id, as a vhost-user reconnect). The RMP is
# compared without page sizes and netd's devices by VM and MAC.
RESTORED = frozenset({NetdReason.MAC_IN_USE})


def _as_restored(snapshot: dict[str, Any]) -> dict[str, Any]:
    entries = []
    for raw in snapshot["rmp"]:
        e = rmp_pb2.RmpEntry.FromString(raw)
        e.ClearField("page_size")
        e.ClearField("raw")
        entries.append(e.SerializeToString())
    devices = sorted(
        (d.vm.id, d.mac) for d in map(netd_pb2.DeviceStats.FromString, snapshot["devices"])
    )
    return {**snapshot, "rmp": entries, "devices": devices}


# Fields that would make one example wait for seconds: narrowed to quick values and to the
# out-of-range ones the RPC must refuse (never the defaults that wait 10 s).
OVERRIDES: strategies.Overrides = {
    ("snp.guest.v1.FloodReportRequestsRequest", "duration_ms"): st.sampled_from(
        [0, 1, 20, 60_001, 0xFFFFFFFF]
    ),
    ("snp.guest.v1.FlipBufferDuringCopyRequest", "timeout_ms"): st.sampled_from(
        [1, 20, 60_001, 0xFFFFFFFF]
    ),
    ("snp.guest.v1.RaceRmpAdjustRequest", "iterations"): st.sampled_from(
        [0, 1, 3, 100_001, 0xFFFFFFFF]
    ),
}

# The known failures: "service.Method" -> (the input, what it answered). Each is a strict
# xfail; the suite passes again when the RPC is fixed and its entry removed.
FINDINGS: dict[str, tuple[str, str]] = {}

MiB = 1 << 20
# Requests every run sends besides the generated ones (hypothesis's explicit examples, with the
# host credential): the cases issue 19 reported and the ones this suite found, so that a
# finding stays found when the draws move. "service.Method" -> the request's fields.
EXAMPLES: dict[str, list[dict[str, object]]] = {
    "rmp.AllocatePages": [{"count": 1, "placement": 99}, {"count": 1, "placement": -(1 << 31)}],
    "rmp.FreePages": [{"pfns": [(1 << 64) - 1]}],
    "rmp.HostWrite": [{"spa": 0x200000, "data": b"x", "origin": 99}],
    "rmp.SetViolationPolicy": [{"policy": 99}, {"policy": -1}],
    "rmp.UnmapHostPage": [{"map_id": "x" * MiB}],
    "rmp.FirmwareRead": [{"spa": 0x200000, "length": 8, "expect_states": [0]}],
    "rmp.HostSession": [{"write": {"spa": 0x200000, "data": b"x", "origin": 99}}],
    "rmp.FirmwareSession": [{"read": {"spa": 0x200000, "length": 2, "expect_states": [0]}}],
    "psp.SnpPlatformStatus": [{"status_paddr": 1 << 40}],
    "psp.SnpConfig": [{"reported_tcb": {"snp": 999}}],
    "kvm.NestedPageFault": [{"identity": {"vcpu": {"vm": {"id": "x" * MiB}}}, "gpa": 0x1000}],
    "kvm.GetVm": [{"vm": {"id": "x" * MiB}}],
    "netd.UnregisterDevice": [{"device": {"id": "x" * MiB}}],
    "netd.NotifyQueue": [{"device": {"id": "x" * MiB}, "queue": 2}],
    "kvm.GetMemoryMap": [{"vm": {"id": "x" * MiB}}],
    "kvm.HoldVm": [{"vm": {"id": "x" * MiB}}],
    "kvm.VmgexitMsr": [{"identity": {"vcpu": {"vm": {"id": "x" * MiB}}}, "ghcb_msr": 0x12}],
    "guest.AttachNetDevice": [{"mac": MAC_A}],  # VM A's device has it
    "guest.WriteMemory": [{"gpa": 0x400000, "data": b"x" * (MiB + 1)}],
    "guest.ConvertMemory": [{"gpa": 0x400000, "size": 4096, "conversion": 99, "page_size": 1}],
    "guest.SendPacket": [{"destination_mac": "02:" * (MiB // 3)}],
}

RPCS = [(name, m) for name, desc in SERVICES.items() for m in desc.methods]
FUZZED: collections.Counter[tuple[str, str]] = collections.Counter()


def _params() -> Iterator[object]:
    for service, method in RPCS:
        key = f"{service}.{method.name}"
        marks = []
        if key in FINDINGS:
            given_input, observed = FINDINGS[key]
            marks.append(
                pytest.mark.xfail(strict=True, reason=f"{given_input}: answered {observed}")
            )
        yield pytest.param(service, method, id=key, marks=marks)


class Hosts:
    """One live host at a time, for the service under test: a fresh one per service, so what
    one service's fuzzing did (a shut-down firmware, a destroyed VM) never meets the next."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory
        self.service: str | None = None
        self.host: FuzzHost | None = None

    def get(self, service: str) -> FuzzHost:
        if self.service != service:
            self.close()
            self.host = FuzzHost(
                self.factory.mktemp(f"fuzz-{service}"),
                service == "guest",
                follow_firmware=service != "psp",
            )
            self.service = service
        assert self.host is not None
        return self.host

    def close(self) -> None:
        if self.host is not None:
            self.host.close()
        self.host, self.service = None, None


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    h = Hosts(tmp_path_factory)
    yield h
    h.close()
    out = os.environ.get("SNPEMU_FUZZ_FIGURES")
    if out and FUZZED:
        per_service = collections.Counter[str]()
        for (service, _), n in FUZZED.items():
            per_service[service] += n
        line = {
            "profile": os.environ.get("HYPOTHESIS_PROFILE") or "ci",
            "requests": dict(per_service),
            "codes": {f"{s} {c}": n for (s, c), n in sorted(FUZZED.items())},
        }
        with Path(out).open("a") as f:
            f.write(json.dumps(line) + "\n")


def _diff(before: object, after: object) -> str:
    """What changed in one part of the snapshot, briefly."""
    if isinstance(before, list) and isinstance(after, list):
        gone = [x for x in before if x not in after]
        new = [x for x in after if x not in before]
        return f"{len(gone)} gone {str(gone[:2])[:200]}, {len(new)} new {str(new[:2])[:200]}"
    return f"{str(before)[:200]!r} -> {str(after)[:200]!r}"


def _shrink() -> bool:
    return settings.default.max_examples > 100 or bool(os.environ.get("SNPEMU_FUZZ_SHRINK"))


@pytest.mark.parametrize(("service", "method"), list(_params()))
def test_rpc_answers_malformed_requests_clearly(
    hosts: Hosts, service: str, method: MethodDescriptor
) -> None:
    host = hosts.get(service)
    one = strategies.message(method.input_type, host.known, OVERRIDES)
    requests = (
        st.lists(one, min_size=1, max_size=3) if method.client_streaming else one.map(lambda m: [m])
    )
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if _shrink():
        phases.append(Phase.shrink)
    state: dict[str, object] = {}

    @settings(
        max_examples=examples(PER_RPC),
        phases=phases,
        # the assertion names the request (each field cut short): hypothesis's own print of
        # the example would repeat its megabyte of bytes
        verbosity=Verbosity.quiet,
        print_blob=False,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )
    @given(requests=requests, metadata=st.sampled_from(METADATA))
    def fuzz(requests: list[object], metadata: tuple[tuple[str, str], ...]) -> None:
        host = hosts.get(service)
        before = state.pop("snapshot", None) or host.snapshot()
        out = host.call(service, method, requests, metadata)  # type: ignore[arg-type]
        shown = " | ".join(str(r)[:300].replace("\n", " ") for r in requests)
        if service == "rmp" and host.panicked():
            # a host-kernel access to a guest's page panics the host, as on hardware (SPEC:
            # AMD64 APM vol. 2, "RMP checks": an RMP #PF in kernel mode; Linux panics): a
            # host-only RPC acting as the kernel may do that; the next example gets a new host
            FUZZED[(service, "HOST_PANIC")] += 1
            hosts.close()
            return
        FUZZED[(service, out.code.name)] += 1
        assert out.code in CLEAR, f"{out.code.name} ({out.details[:300]!r}) for {shown}"
        if out.code != grpc.StatusCode.OK:
            assert out.info is not None, f"{out.code.name} without ErrorInfo for {shown}"
        assert host.serving(service), f"not SERVING after {out.code.name} for {shown}"
        if out.code != grpc.StatusCode.OK and out.info.reason not in ACTED:  # type: ignore[union-attr]
            after = host.snapshot()
            reason = out.info.reason  # type: ignore[union-attr]
            seen: tuple[dict[str, Any], dict[str, Any]] = (before, after)  # type: ignore[assignment]
            if reason in RESTORED:
                seen = (_as_restored(seen[0]), _as_restored(seen[1]))
            changed = sorted(k for k in seen[1] if seen[1].get(k) != seen[0].get(k))
            assert not changed, (
                f"{out.code.name} ({reason}) changed {changed} for {shown}: "
                + "; ".join(_diff(seen[0][k], seen[1][k]) for k in changed)
            )
            state["snapshot"] = after
        elif out.held:
            host.settled()

    request_cls = message_factory.GetMessageClass(method.input_type)
    for fields in EXAMPLES.get(f"{service}.{method.name}", []):
        fuzz = example(requests=[request_cls(**fields)], metadata=HOST)(fuzz)
    fuzz()
