"""The README's "Not built yet" list names exactly the RPCs that are not built."""

from __future__ import annotations

from pathlib import Path

import pytest
from snpemu import guest, kvm, netd, psp, rmp
from snpemu.runtime.config import ServiceConfig
from snpemu.runtime.server import ServiceRuntime
from snpemu.runtime.servicer import built_methods

from tests.style.readme import not_built_from_readme

pytestmark = pytest.mark.style


def test_readme_lists_exactly_the_unbuilt_rpcs(tmp_path: Path) -> None:
    expected = {}
    env = {"SNPEMU_DATA_DIR": str(tmp_path), "SNPEMU_KDS_PORT": "0", "SNPEMU_RMP_MEMORY": "64M"}
    for spec in (rmp.SPEC, psp.SPEC, kvm.SPEC, netd.SPEC, guest.SPEC):
        config = ServiceConfig.from_env(spec.name, env)
        impl = spec.make_impl(ServiceRuntime(spec, config, spec.options(env)))
        built = set(built_methods(spec.descriptor, spec.servicers(impl)))
        missing = [m.name for m in spec.descriptor.methods if m.name not in built]
        if missing:
            expected[spec.descriptor.full_name] = missing
    assert not_built_from_readme() == expected


def test_readme_gives_the_two_commands() -> None:
    from tests.conftest import ROOT

    text = (ROOT / "README.md").read_text()
    assert "make up " in text and "make test " in text
