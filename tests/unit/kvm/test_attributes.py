"""A VM's private ranges (KVM_SET_MEMORY_ATTRIBUTES) against the plainest model: a set of
private pages, as KVM's mem_attr_array holds an attribute per GFN."""

from __future__ import annotations

import itertools

from hypothesis import example, given, settings
from hypothesis import strategies as st
from snpemu.kvm.attributes import PrivateRanges

from tests.conftest import examples

PAGES = 16  # a small space, so ranges touch and overlap often
op = st.tuples(st.integers(0, PAGES - 1), st.integers(1, 4), st.booleans())


@settings(max_examples=examples(200))
@example(ops=[(0, 4, True), (4, 4, True)], start=0, length=8)  # touching: one range
@example(ops=[(0, 8, True), (2, 2, False)], start=0, length=8)  # a hole cut
@given(st.lists(op, max_size=30), st.integers(0, PAGES - 1), st.integers(1, PAGES))
def test_private_ranges_are_the_pages_set_private(
    ops: list[tuple[int, int, bool]], start: int, length: int
) -> None:
    ranges, model = PrivateRanges(), set[int]()
    for first, n, private in ops:
        ranges.set(first, first + n, private)
        pages = set(range(first, first + n))
        model = model | pages if private else model - pages
    assert {p for s, e in ranges.ranges() for p in range(s, e)} == model
    # disjoint, sorted, never touching (merged)
    spans = ranges.ranges()
    assert all(e1 < s2 for (_, e1), (s2, _) in itertools.pairwise(spans))
    end = start + length
    prefix = 0
    while start + prefix < end and start + prefix in model:
        prefix += 1
    assert ranges.private_prefix(start, end) == prefix
