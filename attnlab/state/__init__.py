"""The train state: the model on a batch (``forward``), the optimizer, building the state (sharded or not),
orbax checkpoints and restoring the newest one. Training, evaluation, analysis and streaming all build on it."""

from attnlab.state.checkpoint import Checkpointer, CheckpointMismatchError, NoRestorableCheckpointError
from attnlab.state.forward import MODEL_INPUTS, forward, split_model, token_losses
from attnlab.state.optimizer import OptimizerConfig, make_optimizer
from attnlab.state.train_state import build_sharded_state, build_state, init_state, restore_state

__all__ = ["MODEL_INPUTS", "CheckpointMismatchError", "Checkpointer", "NoRestorableCheckpointError",
           "OptimizerConfig", "build_sharded_state", "build_state", "forward",
           "init_state", "make_optimizer", "restore_state", "split_model", "token_losses"]
