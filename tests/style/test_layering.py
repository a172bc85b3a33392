"""The layering rules of docs/design.md#layers, checked on the source.

- Only servicers (they translate RPCs) and gRPC adapters (they implement a port on a generated
  stub) import the generated `snp.*_pb2` modules; models reach peers through typed ports.
- A constant two modules need lives in one module (abi/ when two services share it): an
  UPPER_CASE module-level name, and an enum class, is defined once in services/snpemu.
- A page shift is written once, in abi/addr.py: no raw `<< 12` / `>> 12` outside abi/.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.style

PKG = ROOT / "services" / "snpemu"

# Modules that may import snp.*_pb2, each with why.
PB2_ALLOWED = {
    # the service's wiring: its ServiceSpec names the proto service descriptor
    "*/__init__.py",
    # servicers translate between the wire and the model (the codec and the session streams
    # they share included)
    "*servicer.py",
    "*/wire.py",
    "rmp/sessions.py",
    # gRPC adapters: a port implemented on the generated stubs
    "*_client.py",
    "rmp/client.py",
    # the bootstrap every service shares: status mapping, health, reflection
    "runtime/*.py",
    # host-side tools that drive the services as any gRPC client does (grpcurl's role)
    "lab/*.py",
    "launcher/*.py",
}

# Names each module defines for itself on purpose: a service's spec and descriptor, its own
# list of guest RPCs, type variables, local struct formats.
OWN_PER_MODULE = {"SPEC", "_SERVICE", "GUEST_RPCS", "BUCKETS", "RESULTS", "T", "P", "R", "U64"}


def _modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(PKG).as_posix()


def _allowed_pb2(rel: str) -> bool:
    return any(Path(rel).match(pattern) for pattern in PB2_ALLOWED)


def _pb2_imports(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("snp."):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.endswith("_pb2")]
            if node.module.endswith("_pb2"):
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("snp.")]
    return found


def test_only_servicers_and_adapters_import_generated_code() -> None:
    offenders = {
        _rel(p): imports
        for p in _modules()
        if not _allowed_pb2(_rel(p)) and (imports := _pb2_imports(ast.parse(p.read_text())))
    }
    assert offenders == {}, "models reach peers through ports (e.g. kvm/ports.py), not stubs"


def _constants(tree: ast.Module) -> list[str]:
    names = []
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        for t in targets:
            elts = t.elts if isinstance(t, ast.Tuple) else [t]
            names += [e.id for e in elts if isinstance(e, ast.Name) and e.id.isupper()]
    return names


def test_each_constant_is_defined_once() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for p in _modules():
        for name in _constants(ast.parse(p.read_text())):
            where[name].append(_rel(p))
    twice = {n: m for n, m in where.items() if len(m) > 1 and n not in OWN_PER_MODULE}
    assert twice == {}, "define a shared constant once (abi/ when services share it) and import it"


ENUM_BASES = {"Enum", "IntEnum", "StrEnum", "IntFlag", "Flag"}


def _enums(tree: ast.Module) -> list[str]:
    """The module-level enum classes (values two services agree on belong in abi/ once)."""

    def name(base: ast.expr) -> str:
        return base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")

    return [
        n.name
        for n in tree.body
        if isinstance(n, ast.ClassDef) and any(name(b) in ENUM_BASES for b in n.bases)
    ]


def test_each_enum_is_defined_once() -> None:
    where: dict[str, list[str]] = defaultdict(list)
    for p in _modules():
        for name in _enums(ast.parse(p.read_text())):
            where[name].append(_rel(p))
    twice = {n: m for n, m in where.items() if len(m) > 1}
    assert twice == {}, "an enum two modules need is defined once (abi/ when services share it)"


def _is_twelve(node: ast.expr) -> bool:
    if isinstance(node, ast.Constant):
        return node.value == 12
    # numpy: x >> np.uint64(12)
    return (
        isinstance(node, ast.Call)
        and len(node.args) == 1
        and isinstance(node.args[0], ast.Constant)
        and node.args[0].value == 12
    )


def test_no_raw_page_shift_outside_abi() -> None:
    found = []
    for p in _modules():
        rel = _rel(p)
        if rel.startswith("abi/"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if (
                isinstance(node, ast.BinOp | ast.AugAssign)
                and isinstance(node.op, ast.LShift | ast.RShift)
                and _is_twelve(node.right if isinstance(node, ast.BinOp) else node.value)
            ):
                found.append(f"{rel}:{node.lineno}")
    assert found == [], "use abi/addr.py (pfn_to_spa, gpa_to_gfn, PAGE_SHIFT, ...)"


def test_the_checks_see_what_they_forbid() -> None:
    # each rule, fed a line it forbids, objects (so an empty finding above means something)
    assert _pb2_imports(ast.parse("from snp.rmp.v1 import rmp_pb2")) == ["snp.rmp.v1.rmp_pb2"]
    assert _constants(ast.parse("PAGE = 4096\nA, B = 1, 2")) == ["PAGE", "A", "B"]
    assert _enums(ast.parse("class P(enum.IntEnum): ...\nclass Q(StrEnum): ...")) == ["P", "Q"]
    shift = ast.parse("x = pfn << 12").body[0]
    assert isinstance(shift, ast.Assign) and isinstance(shift.value, ast.BinOp)
    assert _is_twelve(shift.value.right)
    assert _is_twelve(ast.parse("np.uint64(12)", mode="eval").body)
    assert not _allowed_pb2("kvm/machine.py") and _allowed_pb2("kvm/servicer.py")
    assert _allowed_pb2("kvm/rmp_client.py") and not _allowed_pb2("kvm/exits/psc.py")
