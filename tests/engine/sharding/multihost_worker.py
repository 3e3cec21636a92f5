"""One process of a 2-process, 4-CPU-devices-each engine on localhost, run by test_multihost.py.

Owns: what every host of a multi-host engine does, in miniature: start jax.distributed, build the
global mesh, load the same checkpoint, and run steps on process 0's plan (process 0 schedules with
TinyPagedEngine and broadcasts each step's inputs; the others only execute). Modes `forward` (a
greedy run written to --out by process 0), `die` and `hang` (process 1 dies or hangs mid-run; the
test watches how process 0 fails), `leader-hang` (process 0 stops publishing plans). Must not: be
imported by the test process (it initializes jax.distributed at import of main()).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time


def _log(msg: str) -> None:
    print(f"[worker {os.environ.get('TGX_WORKER_ID', '?')}] {msg}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--process-id", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=("forward", "die", "hang", "leader-hang"), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--heartbeat", type=int, default=10)
    p.add_argument("--step-timeout", type=float, default=4.0)
    args = p.parse_args()
    os.environ["TGX_WORKER_ID"] = str(args.process_id)
    out = pathlib.Path(args.out)

    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # cross-process CPU collectives
    from engine.sharding import distributed
    from engine.sharding.config import ShardingConfig

    cfg = ShardingConfig(tensor_parallel=args.tp, data_parallel=args.dp,
                         coordinator_address=f"localhost:{args.port}", num_processes=2,
                         process_id=args.process_id, heartbeat_timeout_s=args.heartbeat,
                         initialization_timeout_s=60, step_timeout_s=args.step_timeout)
    info = distributed.initialize(cfg)
    cache = os.environ.get("TGX_TEST_JAX_CACHE")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    _log(f"process {info.process_id} of {info.num_processes}: {jax.local_device_count()} local, "
         f"{jax.device_count()} global devices")
    from engine.sharding.mesh import make_mesh

    mesh = make_mesh(cfg)
    channel = distributed.PlanChannel(info, timeout_s=args.step_timeout)
    watchdog = distributed.StepWatchdog(args.step_timeout, name=f"process {info.process_id}")
    if args.mode == "forward":
        return _forward(args, info, mesh, channel, watchdog, out)
    return _failure(args, info, mesh, channel, watchdog)


def _forward(args, info, mesh, channel, watchdog, out: pathlib.Path) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from engine.pallas_kernels.ragged_paged_attention.metadata import AttentionMetadata
    from engine.sharding import distributed, rules
    from engine.sharding.load import layout_report, load_sharded
    from engine.sharding.placement import zeros
    from engine.sharding.replicas import over_replicas, put_stacked
    from tests.engine.sharding import harness as H

    spec = json.loads((out / "spec.json").read_text())
    config = H.model_config(spec["model"])
    with np.load(out / "tensors.npz") as z:
        tensors = {k: z[k] for k in z.files}
    sharded = load_sharded(config, tensors, dtype=jnp.float32, mesh=mesh)
    if info.is_leader:
        report = layout_report(sharded, kv_dtype=jnp.float32, memory_fraction=0.9)
        (out / "report.txt").write_text(str(report))
    replicate = rules.sharding(mesh, ())
    one = H.logits_step(sharded.model)
    dp = args.dp

    def step(weights, ids, caches, md):
        logits, caches = over_replicas(one, mesh)(weights, ids, caches, md)  # [R, T, V]
        # Gathered whole so each host can read it; a real engine gathers only the sampled tokens.
        return jax.lax.with_sharding_constraint(logits, replicate), caches

    jitted = jax.jit(step, donate_argnums=(2,))
    weights = nnx.state(sharded.model)
    cache_sharding = rules.kv_cache_sharding(mesh, stacked=True)
    caches = tuple(zeros((dp, *c.shape), c.dtype, cache_sharding) for c in H.zero_caches(sharded.config))
    drivers = [H.GreedyDriver(b, seed=s) for b, s in zip(spec["batches"], spec["seeds"], strict=True)]
    fields = ("positions", "slot_mapping", "token_seq", "page_table", "seq_lens")
    for s in range(H.DECODE_STEPS + 1):
        if info.is_leader:
            inputs = [d.next_inputs(s) for d in drivers]
            plan = {"input_ids": np.stack([np.asarray(x.input_ids) for x in inputs])}
            plan.update({f: np.stack([np.asarray(getattr(x.md, f)) for x in inputs]) for f in fields})
            channel.publish(distributed.encode_arrays(plan))
        else:
            plan = distributed.decode_arrays(channel.receive())
        ids = put_stacked(plan["input_ids"], mesh)
        md = put_stacked(AttentionMetadata(**{f: plan[f] for f in fields}), mesh)
        with watchdog.step(f"step {s}"):
            logits, caches = jitted(weights, ids, caches, md)
            logits = np.asarray(logits)
        if info.is_leader:
            for d, replica_logits in zip(drivers, logits, strict=True):
                d.take(replica_logits)
    if info.is_leader:
        np.savez(out / "runs.npz", **{
            f"{r}_{i}": x for r, d in enumerate(drivers) for i, x in enumerate(d.run.logits)})
        (out / "tokens.json").write_text(json.dumps([d.run.tokens for d in drivers]))
    _log("done")
    watchdog.close()
    return 0


def _failure(args, info, mesh, channel, watchdog) -> int:
    """A tiny global step (a matmul over all 8 devices) in a loop, with a failure injected."""
    import jax
    import numpy as np

    from engine.sharding import rules
    from engine.sharding.placement import place

    x = place(np.ones((8, 8), np.float32), rules.sharding(mesh, ("vocab",)))
    step = jax.jit(lambda a: (a @ a.T).sum(0), out_shardings=rules.sharding(mesh, ()))
    for s in range(1000):
        if info.is_leader:
            if args.mode == "leader-hang" and s == 3:
                _log("leader hanging")
                time.sleep(600)
            channel.publish(b"plan")
        else:
            channel.receive()
            if s == 3 and args.mode == "die":
                _log("dying")
                os._exit(1)
            if s == 3 and args.mode == "hang":
                _log("hanging")
                time.sleep(600)
        with watchdog.step(f"step {s}"):
            np.asarray(step(x))
        if s == 2:
            _log("steady")
        time.sleep(0.05)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # noqa: BLE001 - the test reads this one line
        print(f"tgx: error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        os._exit(3)  # not sys.exit: jax.distributed's shutdown would wait on the dead peer
