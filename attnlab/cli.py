"""The ``attnlab`` command line (t5x-style gin flags).

    attnlab train --gin_file experiments/X.gin [--gin_file more.gin] [--gin.KEY=VALUE ...] --workdir DIR [--force]
    attnlab eval  --workdir DIR [--step N] [--gin_file ...] [--gin.KEY=VALUE ...]   (defaults to DIR/config.gin)
    attnlab sinks --workdir DIR [--step N] [--probe_file F] [--bos on|off|both] [--all_steps]
                  (sink report: sinks.json + PNGs + report.html; the last line printed is the report's path)
    attnlab stream --workdir DIR [--length 512] [--streams 4] [--window W ...] [--sinks 1 4 ...]
                  [--pos_shift on|off|both]   (StreamingLLM: full / window / sink + window, one subdirectory of
                  DIR/streaming/ per setting)
    attnlab sweep [--sweep experiments/sinks] --workdir DIR [--short] [--tasks bb,text] [--arms softmax,relu]
                  [--seeds 0,1,2]
                  [--gin.KEY=VALUE ...]   (train + analyse every arm; DIR/sink_table.{md,json,png})
    attnlab demo  [--workdir runs/demo]   (= make demo: attnlab sweep --short, ~15 min on a 2-core CPU)
    attnlab import --hf SRC --workdir DIR [--revision REV] [--dtype float32|bfloat16] [--max_seq_len N]
                  (a Hugging Face checkpoint, local dir or hub id, as an ordinary workdir at step 0)
    attnlab compile --topology v5e:2x2 --gin_file experiments/X.gin [--gin.KEY=VALUE ...]
                  (AOT-compile the sharded train step for a TPU topology here; prints memory per device)

Re-running ``train`` with the same workdir resumes from the newest checkpoint; SIGTERM/SIGINT save and exit.

Multi-process runs start ``jax.distributed`` before anything else, from (later wins) gin
(``DistributedConfig.*``), the environment (``ATTNLAB_COORDINATOR``, ``ATTNLAB_NUM_PROCESSES``,
``ATTNLAB_PROCESS_ID``) and ``--coordinator/--num_processes/--process_id``; ``--distributed_auto`` lets JAX
detect a TPU pod / SLURM / Open MPI job. Every process runs the same command. A process that loses a peer exits
within ``--heartbeat_timeout`` (``--initialization_timeout`` at start-up) with one line naming it (exit code 3).

Errors: one line ``attnlab CMD: error: ...`` naming the field and the value; exit code 2 for usage errors (bad
flags, configs, data files, workdirs), 1 for failures of the run itself (non-finite loss, no restorable
checkpoint, I/O); ``--debug`` shows the traceback. Workdirs are data: ``eval``/``sinks``/``stream`` refuse a
recorded ``config.gin`` that imports modules unless given ``--trust_workdir_imports``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import traceback

from attnlab.app import compile as aot, evaluate, generate, import_hf, sinks, stream, sweep, train
from attnlab.app.workdir import DistributedFlags, trust_workdir_imports
from attnlab.configs import ConfigError
from attnlab.parallel.distributed import multi_process, parse_address
from attnlab.state import NoRestorableCheckpointError
from attnlab.train import NonFiniteLossError
from attnlab.train.stop import STOP

USAGE_ERROR, RUN_ERROR = 2, 1


class UsageError(ValueError):
  """A malformed command line."""


def _split_gin_flags(argv: list[str]) -> tuple[list[str], list[str]]:
  """Pulls ``--gin.KEY=VALUE`` out of argv as gin bindings ``KEY = VALUE``."""
  rest, bindings = [], []
  for a in argv:
    if a.startswith("--gin."):
      key, sep, value = a[len("--gin."):].partition("=")
      if not sep or not key:
        raise UsageError(f"{a!r} must look like --gin.KEY=VALUE")
      if not value.strip():
        raise UsageError(f"{a!r} has an empty value (write --gin.{key}=VALUE)")
      bindings.append(f"{key} = {value}")
    else:
      rest.append(a)
  return rest, bindings


def _int_at_least(minimum: int):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"must be >= {minimum}; got {value}")
    return value
  parse.__name__ = "int"
  return parse


def _seeds(text: str) -> tuple[int, ...]:
  parts = [t.strip() for t in text.split(",")]
  if not all(t.isdigit() for t in parts):
    raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0 (e.g. 0,1,2); got {text!r}")
  seeds = tuple(int(t) for t in parts)
  if len(set(seeds)) != len(seeds):
    raise argparse.ArgumentTypeError(f"a seed is repeated in {text!r}")
  return seeds


def _address(text: str) -> str:
  try:
    parse_address(text, "the address")
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None
  return text


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="attnlab", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, help_ in (("train", "train (or resume) a run in --workdir"),
                      ("eval", "evaluate the newest checkpoint of --workdir into eval.json"),
                      ("sinks", "sink report of the newest checkpoint of --workdir (sinks.json + PNGs)"),
                      ("stream", "StreamingLLM perplexity of --workdir: full / window / sink + window caches"),
                      ("generate", "continue a prompt with the model of --workdir (KV cache: full, window, sinks)"),
                      ("sweep", "train and analyse every arm of a sink sweep; write the comparison table"),
                      ("demo", "the short sink sweep (--short) into runs/demo, ~15 min on a 2-core CPU"),
                      ("compile", "AOT-compile the train step for a TPU topology and print memory per device")):
    p = sub.add_parser(name, help=help_)
    if name in ("sweep", "demo"):
      p.add_argument("--sweep", default=os.path.join("experiments", "sinks"),
                     help="sweep directory: <task>/<arm>.gin files (+ <task>/_short.gin)")
      p.add_argument("--workdir", required=name == "sweep", default="runs/demo" if name == "demo" else None)
      p.add_argument("--short", action="store_true", default=name == "demo", help="apply each task's _short.gin")
      p.add_argument("--tasks", help="comma-separated task folders (default: all)")
      p.add_argument("--arms", help="comma-separated arms (default: all)")
      p.add_argument("--seeds", type=_seeds, default=(0,),
                     help="comma-separated seeds; each binds TrainConfig.seed and DataConfig.seed, and with several "
                          "each arm trains in <workdir>/<task>/<arm>/seed<k> (default: 0)")
      p.add_argument("--gin_bindings", action="append", default=[], help="a gin binding for every arm")
      p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
      continue
    if name == "compile":
      p.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5e:4x4, v5p:2x2x2, v4:2x2x2")
      p.add_argument("--platform", default="tpu")
      p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable; later files win)")
      p.add_argument("--gin_bindings", action="append", default=[], help="a gin binding 'KEY = VALUE'")
      p.add_argument("--gin_search_path", action="append", default=[], help="directory for gin includes")
      p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
      continue
    p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable; later files win)")
    p.add_argument("--gin_bindings", action="append", default=[], help="a gin binding 'KEY = VALUE'")
    p.add_argument("--gin_search_path", action="append", default=[], help="directory for gin includes")
    p.add_argument("--workdir", required=True)
    p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    if name in ("eval", "sinks", "generate"):
      p.add_argument("--step", type=int, help="the kept checkpoint to use (default: the newest)")
    if name == "sinks":
      p.add_argument("--probe_file", help="probe your own text: .txt (paragraphs), .jsonl/.json/.parquet "
                     "(DataConfig.text_field) or .prompts (one per line); default: the run's held-out split")
      p.add_argument("--bos", choices=("on", "off", "both"),
                     help="probe with BOS, without it, or both (default: on for synthetic tasks, both for text)")
      p.add_argument("--all_steps", action="store_true",
                     help="also the sink metrics over every kept checkpoint (sinks_over_steps.json/.png)")
    if name == "stream":
      p.add_argument("--length", type=_int_at_least(2), default=512, help="tokens per stream")
      p.add_argument("--streams", type=_int_at_least(1), default=4, help="number of held-out streams")
      p.add_argument("--window", type=_int_at_least(1), nargs="+",
                     help="cache size(s) (default: the training length)")
      p.add_argument("--sinks", type=_int_at_least(0), nargs="+", default=[4],
                     help="initial tokens kept by the sink + window cache (several values: one setting each)")
      p.add_argument("--pos_shift", choices=("on", "off", "both"), default="on",
                     help="positions inside the cache (StreamingLLM) or the original ones, or both")
    if name == "generate":
      p.add_argument("--prompt", help="prompt text")
      p.add_argument("--prompt_file", help="file holding the prompt (UTF-8)")
      p.add_argument("--max_new_tokens", type=_int_at_least(1), default=64)
      p.add_argument("--cache", default="full", help="cache policy: full | window:W | sink:S+W")
      p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
      p.add_argument("--top_k", type=_int_at_least(1))
      p.add_argument("--seed", type=int, default=0)
    if name in ("eval", "sinks", "stream", "generate"):
      p.add_argument("--trust_workdir_imports", action="store_true",
                     help="let the workdir's config.gin import its plugin modules (only for workdirs you trust)")
    else:
      p.add_argument("--force", action="store_true",
                     help="resume even if the workdir holds another config; start over if no checkpoint restores")
    g = p.add_argument_group("multi-process (jax.distributed)")
    g.add_argument("--coordinator", type=_address, help="host:port of process 0")
    g.add_argument("--num_processes", type=_int_at_least(1))
    g.add_argument("--process_id", type=_int_at_least(0))
    g.add_argument("--distributed_auto", action="store_true", help="detect the cluster (TPU pod, SLURM, Open MPI)")
    g.add_argument("--initialization_timeout", type=_int_at_least(1),
                   help="seconds for every process to join (default 60)")
    g.add_argument("--heartbeat_timeout", type=_int_at_least(1),
                   help="seconds of silence after which a peer counts as lost (default 60)")
    g.add_argument("--coordinator_bind_address", type=_address,
                   help="address the coordinator listens on (default: the --coordinator address)")
  p = sub.add_parser("import", help="import a Hugging Face checkpoint (local dir or hub id) into a new --workdir")
  p.add_argument("--hf", required=True, help="a local checkpoint directory or a hub model id (e.g. gpt2)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--revision", help="hub branch, tag or commit (e.g. Pythia's step1000)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
  p.add_argument("--max_seq_len", type=int, help="context length (default: the checkpoint's)")
  p.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
  p.set_defaults(gin_bindings=[])  # no gin: the model comes from the checkpoint
  return parser


def _distributed(args) -> DistributedFlags:
  return DistributedFlags(coordinator_address=args.coordinator, num_processes=args.num_processes,
                          process_id=args.process_id, auto=args.distributed_auto or None,
                          initialization_timeout=args.initialization_timeout,
                          heartbeat_timeout_seconds=args.heartbeat_timeout,
                          coordinator_bind_address=args.coordinator_bind_address)


def _run(args, bindings: list[str]) -> int:
  if getattr(args, "trust_workdir_imports", False):
    trust_workdir_imports()
  if args.command == "import":
    return import_hf.run(args.hf, args.workdir, revision=args.revision, dtype=args.dtype, max_seq_len=args.max_seq_len,
                         command_line=f"import {' '.join(shlex.quote(a) for a in sys.argv[2:])}")
  if args.command == "eval":
    return evaluate.run(args.workdir, args.gin_file, bindings, search_paths=args.gin_search_path,
                        distributed=_distributed(args), step=args.step)
  if args.command == "sinks":
    return sinks.run(args.workdir, args.gin_file, bindings, search_paths=args.gin_search_path, step=args.step,
                     probe_file=args.probe_file, bos=args.bos, all_steps=args.all_steps)
  if args.command == "stream":
    return stream.run(args.workdir, args.gin_file, bindings, search_paths=args.gin_search_path, length=args.length,
                      num_streams=args.streams, windows=args.window, n_sinks=args.sinks, pos_shift=args.pos_shift)
  if args.command == "generate":
    return generate.run(args.workdir, args.gin_file, bindings, prompt=args.prompt, prompt_file=args.prompt_file,
                        max_new_tokens=args.max_new_tokens, cache=args.cache, temperature=args.temperature,
                        top_k=args.top_k, seed=args.seed, step=args.step)
  if args.command in ("sweep", "demo"):
    return sweep.run(args.sweep, args.workdir, short=args.short, tasks=_split(args.tasks), arms=_split(args.arms),
                     bindings=bindings, seeds=args.seeds)
  if not args.gin_file:
    raise UsageError("give at least one --gin_file")
  if args.command == "compile":
    return aot.run(args.gin_file, bindings, topology=args.topology, platform=args.platform,
                   search_paths=args.gin_search_path)
  command_line = f"{args.command} {' '.join(shlex.quote(a) for a in sys.argv[2:])}"
  return train.run(args.workdir, args.gin_file, bindings, search_paths=args.gin_search_path, force=args.force,
                   distributed=_distributed(args), command_line=command_line)


def _split(csv: str | None) -> list[str] | None:
  return [x.strip() for x in csv.split(",") if x.strip()] if csv else None


def exit_code(e: BaseException) -> int:
  """2 for usage errors (the user's flags, configs, data files, workdirs), 1 for failures of the run."""
  if isinstance(e, (NonFiniteLossError, NoRestorableCheckpointError, ConnectionError, TimeoutError, MemoryError)):
    return RUN_ERROR
  if isinstance(e, (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
                    PermissionError, FileExistsError, UnicodeDecodeError)):
    return USAGE_ERROR
  return RUN_ERROR


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  if isinstance(e, (ConfigError, ValueError, NonFiniteLossError, NoRestorableCheckpointError)) and text:
    return text
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
  logging.raiseExceptions = False  # a library's malformed log call prints no "--- Logging error ---" traceback
  STOP.clear()
  mine = STOP.install()  # SIGTERM/SIGINT from here on: a clean stop, even during start-up
  try:
    return _main(sys.argv[1:] if argv is None else argv)
  finally:
    if mine:
      STOP.uninstall()


def _main(argv: list[str]) -> int:
  command = next((a for a in argv if not a.startswith("-")), "")
  try:
    rest, bindings = _split_gin_flags(argv)
  except UsageError as e:
    print(f"attnlab {command}: error: {e}".replace("  ", " "), file=sys.stderr)
    return USAGE_ERROR
  try:
    args = _parser().parse_args(rest)
  except SystemExit as e:  # argparse: usage errors are 2, --help is 0
    return e.code if isinstance(e.code, int) else USAGE_ERROR
  try:
    return _run(args, args.gin_bindings + bindings)
  except KeyboardInterrupt:
    print(f"attnlab {args.command}: interrupted", file=sys.stderr)
    return 130
  except Exception as e:  # noqa: BLE001 (every error becomes one line; --debug shows the traceback)
    if args.debug:
      traceback.print_exc()
    code = exit_code(e)
    hint = "" if code == USAGE_ERROR or args.debug else " (rerun with --debug for the traceback)"
    print(f"attnlab {args.command}: error: {_one_line(e)}{hint}", file=sys.stderr)
    if multi_process():  # never wait on (or abort over) peers at exit: leave now, having said why
      sys.stderr.flush()
      sys.stdout.flush()
      os._exit(code)
    return code


if __name__ == "__main__":
  sys.exit(main())
