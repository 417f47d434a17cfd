"""Conformance of the GPU-style (Triton) flash kernel, run in Pallas interpret mode on CPU."""

import pytest

from kernels_pallas.testing import check_case
from tests.flash_conformance import CASES, SLOW_CASES, kernel_fn, reference_fn


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_conformance(case):
  check_case(kernel_fn("gpu", case), reference_fn, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=lambda c: c.name)
def test_conformance_slow(case):
  check_case(kernel_fn("gpu", case), reference_fn, case)
