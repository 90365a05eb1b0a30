"""Times the example Llama block's training and inference steps with flax's
RMSNorm, with jax_rmsnorm's (the one-import switch) and with jax_rmsnorm's
plus the fused residual add, same run, same card (CUPTI: the sum of the
step's kernel times, median of `--iterations`).

  python -m benchmarks.bench_llama_block          # hidden 4096, seq 2048, batch 4

Writes <out>/llama_block_<card>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

import jax
import optax
from flax import nnx

import jax_rmsnorm.nnx
from examples import llama_block
from jax_rmsnorm._src import bench


def time_steps(cfg, norm, x, target, iterations, fuse_residual=True):
  model = llama_block.make_block(cfg, norm, seed=0,
                                 fuse_residual=fuse_residual)
  graphdef, params = nnx.split(model)
  optimizer = optax.adamw(1e-4)
  opt_state = optimizer.init(params)
  train = jax.jit(llama_block.make_train_step(graphdef, optimizer))
  infer = jax.jit(llama_block.make_inference_step(graphdef))
  loss = float(train(params, opt_state, x, target)[2])
  return dict(
      train_us=bench.measure_us(train, params, opt_state, x, target,
                                iterations=iterations),
      inference_us=bench.measure_us(infer, params, x, iterations=iterations),
      first_loss=loss)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.bench_llama_block", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--hidden", type=int, default=4096)
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--mlp", type=int, default=14336)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--iterations", type=int, default=20)
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results"))
  args = parser.parse_args(argv)
  cfg = llama_block.Config(hidden=args.hidden, heads=args.heads, mlp=args.mlp)
  card = jax.devices()[0].device_kind
  x = jax.random.normal(jax.random.key(0), (args.batch, args.seq, cfg.hidden),
                        cfg.dtype)
  target = jax.random.normal(jax.random.key(1), x.shape, cfg.dtype)
  flax_t = time_steps(cfg, nnx.RMSNorm, x, target, args.iterations)
  # The one-import switch: the same block, jax_rmsnorm's layer.
  ours_t = time_steps(cfg, jax_rmsnorm.nnx.RMSNorm, x, target,
                      args.iterations, fuse_residual=False)
  # And with the residual add fused into the second norm (add_rms_norm).
  fused_t = time_steps(cfg, jax_rmsnorm.nnx.RMSNorm, x, target,
                       args.iterations, fuse_residual=True)
  result = dict(
      card=card, jax=jax.__version__, config=vars(args),
      activations=cfg.dtype, params=cfg.param_dtype, flax=flax_t,
      jax_rmsnorm=ours_t, jax_rmsnorm_fused_residual=fused_t,
      train_ratio_ours_over_flax=ours_t["train_us"] / flax_t["train_us"],
      inference_ratio_ours_over_flax=(ours_t["inference_us"]
                                      / flax_t["inference_us"]),
      train_ratio_fused_over_flax=fused_t["train_us"] / flax_t["train_us"],
      inference_ratio_fused_over_flax=(fused_t["inference_us"]
                                       / flax_t["inference_us"]))
  print(json.dumps(result, indent=1))
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "llama_block_"
                      + re.sub(r"\W+", "_", card).strip("_") + ".json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
