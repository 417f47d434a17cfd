"""Conformance of the TPU (Mosaic-style) flash kernel under the TPU simulator (``pltpu.InterpretParams``).

The simulator is 10-100x slower than plain interpret mode: one tiny case runs by default, the grid is ``slow``.
"""

import pytest

from kernels_pallas.testing import Case, check_case
from tests.flash_conformance import CASES, SLOW_CASES, kernel_fn, reference_fn

TINY = Case("tpu_tiny_softmax_causal_gqa_segments_sinks", batch=1, q_len=16, kv_len=16, heads=2, kv_heads=1,
            block_q=8, block_kv=8, segments=True, sinks=(-30.0, 30.0))


TINY_WINDOW = Case("tpu_tiny_window_decode_gqa_sinks", batch=1, q_len=8, kv_len=32, heads=2, kv_heads=1,
                   block_q=8, block_kv=8, window=12, sinks=(-30.0, 30.0))


def test_conformance_tiny():
  check_case(kernel_fn("tpu", TINY), reference_fn, TINY)


def test_conformance_tiny_window():
  """Tiles below the band are skipped (pl.when) and not fetched (index maps clamped into the band)."""
  check_case(kernel_fn("tpu", TINY_WINDOW), reference_fn, TINY_WINDOW)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES + SLOW_CASES, ids=lambda c: c.name)
def test_conformance_slow(case):
  check_case(kernel_fn("tpu", case), reference_fn, case)
