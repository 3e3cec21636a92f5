"""Scale-out: device meshes, the one logical-axis table, sharded models and multi-host bootstrap.

Modules: `config` (ShardingConfig, jax-free so EngineConfig and the CLI can hold it), `mesh` (the
("data", "model") mesh), `rules` (every parameter, cache and activation layout), `kv_heads`
(replicating kv heads at load when shards outnumber them), `load` (placing a model on a mesh and
the start-up layout report), `placement` (host arrays onto global shardings), `replicas`
(data-parallel steps), `distributed` (jax.distributed, step-plan broadcast, step watchdog).
This file imports nothing, so importing the package is free.
"""
