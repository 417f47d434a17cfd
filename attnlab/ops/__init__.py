"""Attention ops below every backend: the score-function contract (``scores``), masks, the dense reference with the
input checks every backend shares (``dense``), and the linear-attention (lightning) forms and references.

The Pallas kernels (:mod:`kernels_pallas`) import only this package; :mod:`attnlab.attention` (the dispatch, configs
and variants) sits above both.
"""
