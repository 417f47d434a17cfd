"""The training loop: resume, train, log, checkpoint, stop cleanly (SIGTERM/SIGINT, NaN).

Host/device overlap: step ``s + 1`` is dispatched before the metrics of step ``s`` are fetched, so the host never
waits for the device except at checkpoints (whose step must be known finite first) and evaluations.

Sharding and multiple processes: the mesh comes from ``cfg.mesh``. A one-device, one-process mesh runs the plain
jitted step (unchanged, bit-identical); otherwise the state is created directly in its sharded layout
(``jit`` with ``out_shardings``), each process reads its own slice of the global batch (``data_shard``) and the
batches are assembled with ``jax.make_array_from_process_local_data``. Every process runs the loop and writes its
part of each orbax checkpoint; only process 0 writes metrics, TensorBoard, the progress bar and run records.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from attnlab.analysis.probe import probe_batch, probe_scalars
from attnlab.data.pipeline import make_dataset
from attnlab.data.tokenizer import make_tokenizer
from attnlab.eval.extrapolation import heldout_batches
from attnlab.eval.lm_eval import evaluate_batches
from attnlab.parallel.mesh import make_mesh
from attnlab.parallel.sharding import data_shard, global_batch
from attnlab.state import MODEL_INPUTS, Checkpointer, build_sharded_state, build_state
from attnlab.train.experiment import ExperimentConfig
from attnlab.train.metrics import MetricsWriter, matmul_flops_per_token, measure_matmul_peak
from attnlab.train.step import train_step_fn

RUN_CONFIG = "run_config.txt"


class NonFiniteLossError(RuntimeError):
  """The loss became NaN/inf; the run stopped without checkpointing that state."""


@dataclasses.dataclass
class TrainResult:
  step: int  # completed optimizer steps
  status: str  # "finished" | "interrupted"
  history: list[dict]  # per-step {"step", "loss", ...} of this invocation
  eval_graphdef: object  # the model in eval mode, to evaluate ``state`` with
  state: dict  # the train state at ``step``


def data_layout(cfg: ExperimentConfig):
  """(mesh or None, this process's batch-slice index, number of slices). ``None``: one device, one process: the
  plain unsharded step."""
  mesh = make_mesh(cfg.mesh)
  if mesh.size == 1 and jax.process_count() == 1:
    return None, 0, 1
  index, count = data_shard(mesh)
  per_slice = mesh.shape["data"] * mesh.shape["fsdp"] // count
  if cfg.data.batch_size % per_slice:
    raise ValueError(f"DataConfig.batch_size ({cfg.data.batch_size} per process) does not split over this process's "
                     f"{per_slice} data-parallel devices (mesh {dict(mesh.shape)}); change the batch size or "
                     "MeshConfig (e.g. MeshConfig.data = 1 for a single device)")
  return mesh, index, count


def check_workdir(workdir: str, cfg: ExperimentConfig, *, force: bool = False) -> None:
  """Refuses a workdir that holds a run of a different configuration (unless ``force``); records ``cfg`` (process
  0 writes). The record holds the GLOBAL batch size (``DataConfig.batch_size`` is per process) and not the mesh,
  so a run may resume on another mesh or number of hosts with the same global batch."""
  os.makedirs(workdir, exist_ok=True)
  _, _, shards = data_layout(cfg)
  record = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size * shards))
  path, text = os.path.join(workdir, RUN_CONFIG), repr(record) + "\n"
  if os.path.exists(path) and not force:
    with open(path) as f:
      old = f.read()
    if old != text:
      raise ValueError(f"workdir {workdir!r} holds a run of a different configuration (see {path}); use a new "
                       "workdir or --force to overwrite the record and resume from its checkpoint anyway")
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)  # atomic: other processes read either the old or the new record


class _StopFlag:
  """Set by SIGTERM/SIGINT; the loop checks it between steps, saves and returns."""

  def __init__(self):
    self.signal: int | None = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in (signal.SIGTERM, signal.SIGINT):
        self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signum

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)


def _device_batch(batch: dict, keys=MODEL_INPUTS + ("targets", "loss_mask")) -> dict:
  return jax.device_put({k: batch[k] for k in keys})


def train(cfg: ExperimentConfig, workdir: str, *, force: bool = False, process_index: int | None = None,
          process_count: int | None = None) -> TrainResult:
  """Trains ``cfg`` in ``workdir``, resuming from its newest readable checkpoint. Raises
  :class:`NonFiniteLossError` on a NaN/inf loss (naming the step) without checkpointing it."""
  tc = cfg.train
  check_workdir(workdir, cfg, force=force)
  main = jax.process_index() == 0
  mesh, pi, pc = data_layout(cfg)
  if mesh is None:
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    graphdef, eval_graphdef, state = build_state(cfg)
    to_device = _device_batch
  else:
    graphdef, eval_graphdef, state = build_sharded_state(cfg, mesh)
    to_device = lambda b: {k: global_batch(b[k], mesh) for k in MODEL_INPUTS + ("targets", "loss_mask")}
  step_fn = train_step_fn(graphdef, cfg.optimizer, tc.steps, tc.z_loss, tc.grad_accum, mesh)
  data = make_dataset(cfg.data, split="train", process_index=pi, process_count=pc)
  tokenizer = make_tokenizer(cfg.data.tokenizer)

  ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
  restored = ckpt.restore_latest(state)
  start = 0
  if restored is not None:
    start, state, data_state, _ = restored
    data.set_state(data_state)
  writer = MetricsWriter(workdir, active=main)
  flops_per_token = matmul_flops_per_token(state["params"], cfg.model, cfg.data.seq_len)
  peak = tc.peak_flops or measure_matmul_peak()
  eval_batches = None
  if tc.eval_every:
    eval_batches = heldout_batches(cfg.data, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                                   num_batches=cfg.eval.in_training_batches, tokenizer=tokenizer)
  acfg = cfg.analysis
  probe = probe_batch(cfg.data, acfg, tokenizer=tokenizer) if acfg.every else None

  def log_sinks(step: int) -> None:  # sink metrics on the fixed probe batch (AnalysisConfig.every)
    writer.write(step, probe_scalars(eval_graphdef, state["params"], state["rest"], probe, acfg))

  history: list[dict] = []
  last_saved = start if restored is not None else None
  clock = {"t": time.perf_counter(), "tokens": 0.0}
  bar = tqdm(total=tc.steps, initial=start, disable=not (tc.progress and main), dynamic_ncols=True, mininterval=1.0,
             desc="train")

  def finish_step(step: int, metrics) -> None:
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(m["loss"]):
      where = f"step {last_saved}" if last_saved is not None else "none"
      raise NonFiniteLossError(f"non-finite loss ({m['loss']}) at step {step}; stopped without saving this "
                               f"state (last checkpoint: {where})")
    history.append({"step": step, **m})
    clock["tokens"] += m.pop("tokens") * (pc if mesh is None else 1)  # the sharded step counts global tokens
    bar.update(1)
    if step % tc.log_every == 0 or step == tc.steps:
      now = time.perf_counter()
      tok_s = clock["tokens"] / max(now - clock["t"], 1e-9)
      clock.update(t=now, tokens=0.0)
      m.update(tokens_per_s=tok_s, mfu=tok_s * flops_per_token / peak)
      writer.write(step, m)
      bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tok_s:,.0f}")

  def save(step: int) -> None:
    nonlocal last_saved
    ckpt.save(step, state, data.get_state(), {"step": step})
    last_saved = step

  pending = None  # (step, metrics) dispatched to the device and not yet fetched

  def flush() -> None:  # the host waits for the device here
    nonlocal pending
    if pending is not None:
      finish_step(*pending)
      pending = None

  status, step = "finished", start
  try:
    with _StopFlag() as stop:
      if probe is not None and start == 0:
        log_sinks(0)
      for step in range(start, tc.steps):
        if stop.signal is not None:
          status = "interrupted"
          break
        state, metrics = step_fn(state, to_device(next(data)))
        flush()  # the previous step's metrics, fetched while this step runs
        done = step + 1
        pending = (done, metrics)
        save_now = done % tc.checkpoint_every == 0 or done == tc.steps
        eval_now = tc.eval_every and done % tc.eval_every == 0
        sinks_now = probe is not None and (done % acfg.every == 0 or done == tc.steps)
        if save_now or eval_now or sinks_now:  # host work on this state: its loss must be known finite first
          flush()
        if save_now:
          save(done)
        if eval_now:
          res = evaluate_batches(eval_graphdef, state["params"], state["rest"], eval_batches,
                                 tokenizer.byte_lengths())
          writer.write(done, {f"eval/{k}": v for k, v in res.items() if k in ("loss", "bits_per_byte")})
        if sinks_now:
          log_sinks(done)
        step = done
      flush()
      if status == "interrupted" or step != last_saved:
        save(step)
      if status == "interrupted":
        bar.write(f"received signal {stop.signal}: saved a checkpoint at step {step} and stopped")
  finally:
    bar.close()
    ckpt.close()
    writer.close()
  return TrainResult(step=step, status=status, history=history, eval_graphdef=eval_graphdef, state=state)


__all__ = ["NonFiniteLossError", "TrainResult", "check_workdir", "data_layout", "train"]
