"""Whole-workdir jobs, one module each, called by the command line (``attnlab <job>``): ``train`` (check the
workdir, record the configs, train, evaluate), ``evaluate``, ``sinks``, ``stream``, ``sweep`` (and the demo),
``compile`` (AOT for a TPU topology); ``workdir`` opens a run's configuration for them."""
