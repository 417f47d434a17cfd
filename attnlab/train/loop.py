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
import json
import os
import time
import warnings
from collections.abc import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from attnlab.analysis.probe import probe_batch, probe_scalars
from attnlab.data.pipeline import make_dataset
from attnlab.data.tokenizer import check_fits_vocab, make_tokenizer
from attnlab.eval.extrapolation import heldout_batches
from attnlab.eval.lm_eval import evaluate_batches
from attnlab.parallel.mesh import make_mesh
from attnlab.parallel.sharding import data_shard, global_batch
from attnlab.state import MODEL_INPUTS, Checkpointer, NoRestorableCheckpointError, build_sharded_state, build_state
from attnlab.train.experiment import ExperimentConfig
from attnlab.train.metrics import MetricsWriter, matmul_flops_per_token, measure_matmul_peak
from attnlab.train.step import train_step_fn
from attnlab.train.stop import failpoint, installed as stop_handlers

RUN_CONFIG = "run_config.txt"
RUN_RECORD = "run_config.json"
# Fields that may change between invocations of one run without --force: the run's length and the cadence of
# logging, evaluation and checkpoints, and evaluation/analysis settings (none of them changes the trained weights
# of a step already taken).
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                     "train.async_checkpoint", "train.eval_every", "train.eval_at_end", "train.peak_flops",
                     "train.progress", "eval.", "analysis.")


class NonFiniteLossError(RuntimeError):
  """The loss or the updated state became NaN/inf; the run stopped without checkpointing that state."""


class RunMismatchError(ValueError):
  """The workdir holds a run of another configuration."""


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


def flat_fields(obj, prefix: str = "") -> dict[str, str]:
  """{"model.d_model": "32", "model.attention.num_heads": "2", ...}: the leaves of a config as reprs."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    out = {f"{prefix}__class__": type(obj).__name__} if prefix else {}
    for f in dataclasses.fields(obj):
      if f.repr:
        out.update(flat_fields(getattr(obj, f.name), f"{prefix}{f.name}."))
    return out
  if isinstance(obj, (tuple, list)) and any(dataclasses.is_dataclass(x) for x in obj):
    out = {f"{prefix}__len__": str(len(obj))}
    for i, x in enumerate(obj):
      out.update(flat_fields(x, f"{prefix}{i}."))
    return out
  return {prefix.rstrip("."): repr(obj)}


def _record(cfg: ExperimentConfig, shards: int) -> ExperimentConfig:
  return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=cfg.data.batch_size * shards))


def _differences(old: dict, new: dict) -> list[str]:
  keys = sorted(set(old) | set(new), key=lambda k: (k not in old or k not in new, k))  # changed before added
  return [f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}" for k in keys
          if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)]


def check_run_record(workdir: str, cfg: ExperimentConfig, *, force: bool = False, shards: int | None = None) -> None:
  """Refuses (:class:`RunMismatchError`, listing the fields that differ) a workdir that holds a run of a different
  configuration, unless ``force``. Changing only the run length or the logging/eval/checkpoint cadence is not a
  different run. Writes nothing."""
  check_writable(workdir)
  if force:
    return
  if shards is None:
    shards = data_layout(cfg)[2]
  new = flat_fields(_record(cfg, shards))
  json_path, txt_path = os.path.join(workdir, RUN_RECORD), os.path.join(workdir, RUN_CONFIG)
  if os.path.exists(json_path):
    with open(json_path) as f:
      try:
        old = json.load(f)
      except ValueError as e:
        raise RunMismatchError(f"the run record {json_path} is unreadable ({e}); use --force to rewrite it") from None
    diffs = _differences(old, new)
  elif os.path.exists(txt_path):  # a workdir of an older attnlab: only the text record
    with open(txt_path) as f:
      diffs = [] if f.read() == repr(_record(cfg, shards)) + "\n" else ["(the recorded text differs)"]
  else:
    return
  if diffs:
    more = f" (and {len(diffs) - 6} more)" if len(diffs) > 6 else ""
    raise RunMismatchError(f"workdir {workdir!r} holds a run of a different configuration: {'; '.join(diffs[:6])}"
                           f"{more}; use a new workdir, or --force to overwrite the record and resume from its "
                           "checkpoint anyway")


def check_writable(workdir: str) -> None:
  """The workdir is (or can be created as) a writable directory: ValueError naming it otherwise."""
  if not isinstance(workdir, (str, os.PathLike)) or not str(workdir):
    raise ValueError(f"workdir must be a directory path; got {workdir!r}")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f"workdir {workdir!r} is not a directory")
  probe = os.path.abspath(workdir)
  while not os.path.exists(probe):
    probe = os.path.dirname(probe)
  if not os.path.isdir(probe):
    raise ValueError(f"workdir {workdir!r} cannot be created: {probe!r} is not a directory")
  if not os.access(probe, os.W_OK | os.X_OK):
    raise ValueError(f"workdir {workdir!r} is not writable ({probe!r})")


def write_run_record(workdir: str, cfg: ExperimentConfig, *, shards: int | None = None) -> None:
  """Records ``cfg`` (process 0 writes; atomic). The record holds the GLOBAL batch size (``DataConfig.batch_size``
  is per process) and not the mesh, so a run may resume on another mesh or number of hosts with the same global
  batch."""
  if jax.process_index() != 0:
    return
  if shards is None:
    shards = data_layout(cfg)[2]
  record = _record(cfg, shards)
  os.makedirs(workdir, exist_ok=True)
  for name, text in ((RUN_CONFIG, repr(record) + "\n"), (RUN_RECORD, json.dumps(flat_fields(record), indent=0))):
    path = os.path.join(workdir, name)
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)  # atomic: other processes read either the old or the new record


def check_workdir(workdir: str, cfg: ExperimentConfig, *, force: bool = False) -> None:
  """:func:`check_run_record` then :func:`write_run_record`."""
  check_run_record(workdir, cfg, force=force)
  write_run_record(workdir, cfg)


def check_vocab(cfg: ExperimentConfig, tokenizer) -> None:
  """The tokenizer's ids must fit the model's embedding table (text sources; synthetic tasks have their own
  vocabulary, checked batch by batch by :func:`check_batch`)."""
  if cfg.data.source != "synthetic":
    check_fits_vocab(tokenizer, cfg.model.vocab_size, f"DataConfig.tokenizer {cfg.data.tokenizer!r}")


def check_batch(batch: dict, vocab_size: int, step: int) -> None:
  top = int(np.max(batch["inputs"])) if np.size(batch["inputs"]) else 0
  if top >= vocab_size or int(np.min(batch["inputs"])) < 0:
    raise ValueError(f"the batch of step {step} holds token id {top}, outside ModelConfig.vocab_size "
                     f"({vocab_size}); raise ModelConfig.vocab_size or check the data")


def _device_batch(batch: dict, keys=MODEL_INPUTS + ("targets", "loss_mask")) -> dict:
  return jax.device_put({k: batch[k] for k in keys})


def train(cfg: ExperimentConfig, workdir: str, *, force: bool = False, process_index: int | None = None,
          process_count: int | None = None, on_started: Callable[[], None] | None = None) -> TrainResult:
  """Trains ``cfg`` in ``workdir``, resuming from its newest readable checkpoint. Raises
  :class:`NonFiniteLossError` on a NaN/inf loss or state (naming the step and the last checkpoint, which is
  finite) without checkpointing it.

  Start-up (checks, state, data, tokenizer, restore) writes nothing: the run record (``run_config.*``) and
  ``on_started()`` (process 0: e.g. ``config.gin``) come only after it succeeded, so a failed start never blocks
  the corrected rerun. A SIGTERM/SIGINT during start-up stops before the first step, writing nothing."""
  tc = cfg.train
  mesh, pi, pc = data_layout(cfg)
  shards = pc
  check_run_record(workdir, cfg, force=force, shards=shards)
  main = jax.process_index() == 0
  with stop_handlers() as stop:
    return _train(cfg, workdir, tc, mesh, pi, pc, shards, main, force, process_index, process_count, on_started,
                  stop)


def _train(cfg, workdir, tc, mesh, pi, pc, shards, main, force, process_index, process_count, on_started, stop):
  tokenizer = make_tokenizer(cfg.data.tokenizer)
  check_vocab(cfg, tokenizer)
  if mesh is None:
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
  data = make_dataset(cfg.data, split="train", process_index=pi, process_count=pc, tokenizer=tokenizer)
  failpoint("data")
  eval_batches = None
  if tc.eval_every:
    eval_batches = heldout_batches(cfg.data, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                                   num_batches=cfg.eval.in_training_batches, tokenizer=tokenizer)
  acfg = cfg.analysis
  probe = probe_batch(cfg.data, acfg, tokenizer=tokenizer) if acfg.every else None
  if mesh is None:
    graphdef, eval_graphdef, state = build_state(cfg)
    to_device = _device_batch
  else:
    graphdef, eval_graphdef, state = build_sharded_state(cfg, mesh)
    to_device = lambda b: {k: global_batch(b[k], mesh) for k in MODEL_INPUTS + ("targets", "loss_mask")}
  step_fn = train_step_fn(graphdef, cfg.optimizer, tc.steps, tc.z_loss, tc.grad_accum, mesh)
  failpoint("state")

  restored, start = None, 0
  if stop.requested:  # signalled during start-up: stop before writing anything
    return TrainResult(step=0, status="interrupted", history=[], eval_graphdef=eval_graphdef, state=state)
  ckpt = Checkpointer(workdir, keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
  try:
    restored = ckpt.restore_latest(state)
  except NoRestorableCheckpointError as e:
    if not force:
      ckpt.close()
      raise
    _warn(f"{e}; --force: starting over from step 0")
  except BaseException:
    ckpt.close()
    raise
  if restored is not None:
    start, state, data_state, _ = restored
    data.set_state(data_state)
  failpoint("restore")
  if stop.requested:
    ckpt.close()
    return TrainResult(step=start, status="interrupted", history=[], eval_graphdef=eval_graphdef, state=state)
  write_run_record(workdir, cfg, shards=shards)
  if on_started is not None and main:
    on_started()
  writer = MetricsWriter(workdir, active=main, resume_step=start)
  flops_per_token = matmul_flops_per_token(state["params"], cfg.model, cfg.data.seq_len)
  peak = tc.peak_flops or measure_matmul_peak()

  def log_sinks(step: int) -> None:  # sink metrics on the fixed probe batch (AnalysisConfig.every)
    writer.write(step, probe_scalars(eval_graphdef, state["params"], state["rest"], probe, acfg))

  history: list[dict] = []
  last_saved = start if restored is not None else None  # restored steps are verified finite
  clock = {"t": time.perf_counter(), "tokens": 0.0}
  bar = tqdm(total=tc.steps, initial=start, disable=not (tc.progress and main), dynamic_ncols=True, mininterval=1.0,
             desc="train")

  def finish_step(step: int, metrics) -> None:
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    finite = m.pop("finite") == 1.0
    if not (np.isfinite(m["loss"]) and finite):
      where = (f"step {last_saved} (finite)" if last_saved is not None else "none")
      what = f"non-finite loss ({m['loss']})" if not np.isfinite(m["loss"]) else \
          "non-finite parameters or optimizer state after the update"
      raise NonFiniteLossError(f"{what} at step {step}; stopped without saving this state (last checkpoint: "
                               f"{where})")
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
    if step == last_saved:  # never twice (orbax: "Checkpoint for step N already exists")
      return
    ckpt.save(step, state, data.get_state(), {"step": step})
    last_saved = step
    failpoint("save")

  pending = None  # (step, metrics) dispatched to the device and not yet fetched

  def flush() -> None:  # the host waits for the device here
    nonlocal pending
    if pending is not None:
      finish_step(*pending)
      pending = None

  status, step = "finished", start
  try:
    if probe is not None and start == 0:
      log_sinks(0)
    for step in range(start, tc.steps):
      if stop.requested:
        status = "interrupted"
        break
      batch = next(data)
      check_batch(batch, cfg.model.vocab_size, step + 1)
      state, metrics = step_fn(state, to_device(batch))
      failpoint("step")
      flush()  # the previous step's metrics, fetched while this step runs
      done = step + 1
      pending = (done, metrics)
      save_now = done % tc.checkpoint_every == 0 or done == tc.steps
      eval_now = tc.eval_every and done % tc.eval_every == 0
      sinks_now = probe is not None and (done % acfg.every == 0 or done == tc.steps)
      if save_now or eval_now or sinks_now:  # host work on this state: it must be known finite first
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
    if step > 0 and step != last_saved:
      save(step)
    if status == "interrupted":
      saved = f"saved a checkpoint at step {step}" if last_saved is not None else "no step completed, nothing saved"
      bar.write(f"received signal {stop.signal}: {saved} and stopped")
  finally:
    bar.close()
    ckpt.close()
    writer.close()
  return TrainResult(step=step, status=status, history=history, eval_graphdef=eval_graphdef, state=state)


def _warn(msg: str) -> None:
  warnings.warn(msg, RuntimeWarning, stacklevel=3)


__all__ = ["NonFiniteLossError", "RunMismatchError", "TrainResult", "check_run_record", "check_workdir", "data_layout",
           "train", "write_run_record"]
