"""The flash conformance grid, shared by every backend's test file (GPU-style kernel, TPU kernel, ...)."""

import functools

from kernels_pallas.flash import BlockSizes, flash_attention
from kernels_pallas.testing import Case
from tests.ref_flash import naive_flash

BIG = (-30.0, 0.0, 5.0, 30.0)  # sink logits driven large (a zero sink hides behind 1e-6 differences)

# Fast cases (default run): each one covers several features so the unmarked suite stays small.
CASES = [
    Case("softmax_causal_gqa_segments_sinks", segments=True, sinks=BIG),
    Case("softmax_decode_q_lt_kv", q_len=16, kv_len=48, sinks=(30.0, -30.0, 0.0, 2.0)),
    Case("softmax_noncausal_mha_rect_blocks", causal=False, heads=2, kv_heads=2, block_q=32, block_kv=8),
    Case("softmax_bf16_causal_gqa_sinks", dtype="bfloat16", segments=True, sinks=BIG),
    Case("sigmoid_causal_segments", score="sigmoid", segments=True),
    Case("sigmoid_l1_b_minus30_noncausal", score="sigmoid", params=(("b", -30.0), ("normalize", True)),
         causal=False),
    Case("softpick_causal_segments", score="softpick", segments=True),
    Case("relu_decode_q_lt_kv", score="relu", q_len=16, kv_len=32),
    Case("softplus_causal_segments", score="softplus", segments=True),
    # sliding window: band narrower than a block, wider than one, not a multiple; with GQA, segments, sinks, decode
    Case("softmax_window_gqa_segments_sinks", window=11, segments=True, sinks=BIG, block_q=8, block_kv=8),
    Case("softmax_window_decode_sinks", q_len=16, kv_len=48, window=20, sinks=(30.0, -30.0, 0.0, 2.0),
         block_q=8, block_kv=8),
    Case("relu_window_segments", score="relu", window=5, segments=True, block_q=8, block_kv=8),
    Case("sigmoid_window_noncausal_flag", score="sigmoid", causal=False, window=9, block_q=8, block_kv=16),
]

# Slow cases: more block sizes, bf16 for every score, bias +30, MQA.
SLOW_CASES = [
    Case("softmax_mqa_blocks_8x32", heads=4, kv_heads=1, block_q=8, block_kv=32, segments=True),
    Case("softmax_decode_segments_free_bf16", q_len=16, kv_len=64, dtype="bfloat16", sinks=BIG),
    Case("sigmoid_b_plus30", score="sigmoid", params=(("b", 30.0),), segments=True),
    Case("sigmoid_bf16", score="sigmoid", dtype="bfloat16", segments=True),
    Case("sigmoid_l1_bf16", score="sigmoid", params=(("normalize", True),), dtype="bfloat16"),
    Case("softpick_bf16_noncausal", score="softpick", causal=False, dtype="bfloat16"),
    Case("relu_segments_bf16", score="relu", segments=True, dtype="bfloat16"),
    Case("softplus_decode", score="softplus", q_len=16, kv_len=64, block_kv=32),
    Case("softplus_window_segments", score="softplus", window=7, segments=True, block_q=8, block_kv=8),
    Case("softpick_window_bf16", score="softpick", window=13, dtype="bfloat16", block_q=8, block_kv=8),
]


def kernel_fn(backend: str, case: Case, interpret: bool = True):
  """The kernel under test as ``fn(q, k, v, *, segment_ids, sink_logits, **kw) -> (o, r)``."""
  blocks = BlockSizes(case.block_q, case.block_kv)
  return functools.partial(flash_attention, block_sizes=blocks, backend=backend, interpret=interpret,
                           return_residuals=True)


reference_fn = naive_flash
