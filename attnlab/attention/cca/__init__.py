"""Core Context Aware (CCA) attention (Chen et al., ICML 2025): globality pooling + locality window."""

from attnlab.attention.cca.decode import CCACache, cca_decode_step, cca_init_cache, cca_prefill
from attnlab.attention.cca.forward import CCA_IMPLS, cca_attention, cca_num_keys, cca_weights, check_cca_impl
from attnlab.attention.cca.pooling import check_cca_params, pool_core, pooling_weights, visible_core_count

__all__ = ["CCACache", "CCA_IMPLS", "cca_attention", "cca_decode_step", "cca_init_cache", "cca_num_keys", "cca_prefill",
           "cca_weights", "check_cca_impl", "check_cca_params", "pool_core", "pooling_weights", "visible_core_count"]
