"""Pallas kernels for attnlab (GPU and TPU), each with a pure-jnp reference; tested on CPU in interpret mode.

The kernels use attnlab's score-function contract and dense reference (:mod:`attnlab.attention.scores`,
:mod:`attnlab.attention.dense`); attnlab's dispatch (:func:`attnlab.attend`) calls the kernels. Importing attnlab
first, here, fixes that order whichever package a program imports first.
"""

import attnlab.attention.dense  # noqa: F401
