"""Whole-workdir jobs, one module each, called by the command line (``attnlab <job>``): ``train`` (check the
workdir, record the configs, train, evaluate), ``evaluate``, ``sinks``, ``stream``, ``sweep`` (and the demo),
``compile`` (AOT for a TPU topology), ``import_hf`` (``attnlab import``: a Hugging Face checkpoint as a workdir);
``workdir`` opens a run's configuration for them. ``load(workdir, step=None) -> (model, config)`` gives any
workdir's model in Python (here, not in ``attnlab``: it needs gin, which ``import attnlab`` does not import)."""

from attnlab.app.loading import load

__all__ = ["load"]
