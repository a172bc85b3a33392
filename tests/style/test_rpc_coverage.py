"""Every RPC is exercised: for each method of every service in the project's descriptors, some
test claims with `@pytest.mark.rpc(method, "ok")` and `@pytest.mark.rpc(method, "error")` that
it calls the method through gRPC and sees it succeed, and sees it refuse a wrong request (or,
for a method declared but not built yet, `"unbuilt"`: it answers UNIMPLEMENTED). The
claims are read here from the source; tests/conftest.py's pytest_runtest_call checks at run time
that each marked test really made such a call (tests/rpc_record.py), so a marker cannot stand in
for a call.

Health and reflection (grpc.health.v1, grpc.reflection.v1alpha) are grpcio's own servicers, not
the project's, and are left out.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

from tests import rpc_record
from tests.conftest import ROOT

pytestmark = pytest.mark.style

Claims = dict[tuple[str, str], list[str]]


def _is_rpc_mark(func: ast.expr) -> bool:
    """`pytest.mark.rpc` or `mark.rpc`."""
    return (
        isinstance(func, ast.Attribute)
        and func.attr == "rpc"
        and isinstance(func.value, ast.Attribute)
        and func.value.attr == "mark"
    )


def claims_in(source: str, where: str) -> tuple[Claims, list[str]]:
    """The (method, outcome) claims of the rpc marks in one file, and the marks that are not
    literal `rpc("pkg.Service/Method", "ok" | "error" | "unbuilt", ...)`."""
    claims: Claims = defaultdict(list)
    bad = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and _is_rpc_mark(node.func)):
            continue
        at = f"{where}:{node.lineno}"
        args = [a.value if isinstance(a, ast.Constant) else None for a in node.args]
        if (
            len(args) < 2
            or node.keywords
            or not all(isinstance(a, str) for a in args)
            or any(a not in rpc_record.OUTCOMES for a in args[1:])
        ):
            bad.append(f"{at}: rpc(method, 'ok' | 'error' | 'unbuilt', ...) with literal strings")
            continue
        for outcome in args[1:]:
            claims[(str(args[0]), str(outcome))].append(at)
    return claims, bad


def tree_claims(root: Path = ROOT / "tests") -> tuple[Claims, list[str]]:
    claims: Claims = defaultdict(list)
    bad: list[str] = []
    for path in sorted(root.rglob("*.py")):
        where = str(path.relative_to(ROOT))
        found, wrong = claims_in(path.read_text(), where)
        for key, places in found.items():
            claims[key].extend(places)
        bad.extend(wrong)
    return claims, bad


# Methods no caller can get wrong: the request has no fields and the method takes no
# credential, so there is no error path to test. test_no_error_path_is_checked holds each to
# that, so the list cannot hide a method that has one.
NO_ERROR_PATH = {
    "snp.guest.v1.GuestService/GetStatus": "an open status read of the guest agent",
}


def uncovered(claims: Claims, methods: set[str]) -> list[str]:
    """What each method lacks: "ok" and "error", unless a test shows it is not built yet."""
    return [
        f"{method} {outcome}"
        for method in sorted(methods)
        if (method, rpc_record.UNBUILT) not in claims
        for outcome in (rpc_record.OK, rpc_record.ERROR)
        if (method, outcome) not in claims
        and not (outcome == rpc_record.ERROR and method in NO_ERROR_PATH)
    ]


def test_no_error_path_is_checked() -> None:
    """Each exempt method really takes nothing a caller could get wrong."""
    from snpemu import guest, kvm, netd, psp, rmp

    specs = (rmp.SPEC, psp.SPEC, kvm.SPEC, netd.SPEC, guest.SPEC)
    by_service = {spec.descriptor.full_name: spec for spec in specs}
    for method in NO_ERROR_PATH:
        service, name = method.split("/")
        spec = by_service[service]
        described = spec.descriptor.methods_by_name[name]
        assert not described.input_type.fields, f"{method} takes arguments"
        assert not described.client_streaming
        assert not spec.host_only(name), f"{method} needs the host credential"


def test_the_descriptors_list_every_service() -> None:
    """The list the check runs over is the whole API (a module missed would hide its RPCs)."""
    methods = rpc_record.all_methods()
    services = {m.split("/")[0] for m in methods}
    assert services == {
        "snp.rmp.v1.RmpService",
        "snp.psp.v1.PspService",
        "snp.kvm.v1.KvmService",
        "snp.guest.v1.GuestService",
        "snp.netd.v1.NetdService",
    }
    # each method of each .proto (protos/snp/**), counted from the source text
    declared = sum(
        line.lstrip().startswith("rpc ")
        for proto in (ROOT / "protos").rglob("*.proto")
        for line in proto.read_text().splitlines()
    )
    assert len(methods) == declared


def test_every_rpc_has_a_success_and_an_error_test() -> None:
    claims, bad = tree_claims()
    assert not bad, "\n".join(bad)
    methods = rpc_record.all_methods()
    unknown = sorted(f"{m} at {places[0]}" for (m, _), places in claims.items() if m not in methods)
    contradictions = sorted(
        m for (m, o) in claims if o == rpc_record.UNBUILT and (m, rpc_record.OK) in claims
    )
    assert not contradictions, f"claimed both built (ok) and unbuilt: {contradictions}"
    assert not unknown, "rpc markers name methods that do not exist:\n" + "\n".join(unknown)
    missing = uncovered(claims, methods)
    assert not missing, (
        f"{len(missing)} RPC paths no test claims (add a test that makes the call and mark it "
        '@pytest.mark.rpc("pkg.Service/Method", "ok" | "error")):\n' + "\n".join(missing)
    )


def test_a_removed_marker_is_reported() -> None:
    """The check is sensitive to one claim: drop any one and it is named."""
    claims, _ = tree_claims()
    methods = rpc_record.all_methods()
    for key in [
        ("snp.kvm.v1.KvmService/KickVcpus", "ok"),
        ("snp.psp.v1.PspService/SevShutdown", "error"),
    ]:
        assert key in claims
        fewer = {k: v for k, v in claims.items() if k != key}
        assert uncovered(fewer, methods) == [f"{key[0]} {key[1]}"]


def test_malformed_markers_are_refused() -> None:
    source = (
        "import pytest\n"
        "@pytest.mark.rpc('snp.kvm.v1.KvmService/KickVcpus')\n"
        "@pytest.mark.rpc('snp.kvm.v1.KvmService/KickVcpus', 'fine')\n"
        "@pytest.mark.rpc(METHOD, 'ok')\n"
        "@pytest.mark.rpc('snp.kvm.v1.KvmService/KickVcpus', 'ok', 'error')\n"
        "def test_x(): pass\n"
    )
    claims, bad = claims_in(source, "x.py")
    assert [b.split(":")[1] for b in bad] == ["2", "3", "4"]
    assert set(claims) == {
        ("snp.kvm.v1.KvmService/KickVcpus", "ok"),
        ("snp.kvm.v1.KvmService/KickVcpus", "error"),
    }
