"""Multi-host and sharding: device mesh, logical-axis rules, jax.distributed start-up."""

from attnlab.parallel.distributed import DistributedConfig, initialize, is_main_process, multi_process
from attnlab.parallel.mesh import MeshConfig, make_mesh
from attnlab.parallel.sharding import (DEFAULT_RULES, batch_sharding, constrain, data_shard, global_batch,
                                       logical_to_spec, replicated, shard_module, state_shardings)

__all__ = ["DEFAULT_RULES", "DistributedConfig", "MeshConfig", "batch_sharding", "constrain", "data_shard",
           "global_batch", "initialize", "is_main_process", "logical_to_spec", "make_mesh", "replicated",
           "shard_module", "state_shardings"]
