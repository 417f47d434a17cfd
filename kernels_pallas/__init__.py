"""Pallas kernels for attnlab (GPU and TPU), each with a pure-jnp reference; tested on CPU in interpret mode.

The kernels use attnlab's score-function contract and dense reference (:mod:`attnlab.ops.scores`,
:mod:`attnlab.ops.dense`); attnlab's dispatch (:func:`attnlab.attend`) calls the kernels. Importing attnlab
first, here, fixes that order whichever package a program imports first.
"""

import attnlab.ops.dense  # noqa: F401
