"""Lightning attention (Qin et al. 2024, "Various Lengths, Constant Speed"; TransNormerLLM): causal linear
attention with a per-head exponential decay, ``O = ((Q K^T) ⊙ M) V``, ``M_ij = lambda^(i-j)`` (i >= j).

Three forms that agree in forward and gradient: :func:`lightning_naive` (dense reference),
:func:`lightning_chunked` (training), :func:`lightning_recurrent` / :func:`lightning_step` (decoding).
The Pallas kernel lives in ``kernels_pallas.lightning``.
"""

from attnlab.ops.lightning.chunked import lightning_chunked
from attnlab.ops.lightning.decay import DECAYS, alibi_slopes, log_decay
from attnlab.ops.lightning.naive import lightning_naive, lightning_weights
from attnlab.ops.lightning.recurrent import lightning_recurrent, lightning_step

__all__ = ["DECAYS", "alibi_slopes", "lightning_chunked", "lightning_naive", "lightning_recurrent",
           "lightning_step", "lightning_weights", "log_decay"]
