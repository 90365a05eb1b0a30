"""Times the example Llama block's training and inference steps with flax's
RMSNorm, with jax_rmsnorm's (the one-import switch), with jax_rmsnorm's plus
the fused residual add, and with no norm at all (a plain multiply by the
scale, which XLA fuses into its neighbours), same run, same card (CUPTI: the
sum of the step's kernel times). The variants are timed in alternation,
`--rounds` times, and each is reported as the median over rounds of its
median over `--iterations`, so that drift in the card's clocks hits all
alike. A norm's share of the step is (its step - the no-norm step) / its
step: the norm kernels plus whatever they change in their neighbours.

  python -m benchmarks.bench_llama_block          # hidden 4096, seq 2048, batch 4

Writes <out>/llama_block_<card>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

import jax
import optax
from flax import nnx

import jax_rmsnorm.nnx
from examples import llama_block
from jax_rmsnorm._src import bench


class NoNorm(nnx.RMSNorm):
  """The block without a normalization: y = x * scale, the floor against
  which a norm's share of the step is measured."""

  def __call__(self, x, mask=None):
    del mask
    return (x * self.scale[...]).astype(x.dtype)


def make_steps(cfg, norm, x, target, fuse_residual=True):
  """(jitted train step, its args, jitted inference step, its args, loss)."""
  model = llama_block.make_block(cfg, norm, seed=0,
                                 fuse_residual=fuse_residual)
  graphdef, params = nnx.split(model)
  optimizer = optax.adamw(1e-4)
  opt_state = optimizer.init(params)
  train = jax.jit(llama_block.make_train_step(graphdef, optimizer))
  infer = jax.jit(llama_block.make_inference_step(graphdef))
  loss = float(train(params, opt_state, x, target)[2])
  return dict(train=(train, (params, opt_state, x, target)),
              inference=(infer, (params, x)), first_loss=loss)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.bench_llama_block", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--hidden", type=int, default=4096)
  parser.add_argument("--heads", type=int, default=32)
  parser.add_argument("--mlp", type=int, default=14336)
  parser.add_argument("--seq", type=int, default=2048)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--iterations", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=3,
                      help="alternated rounds of every variant")
  parser.add_argument("--out", default=os.path.join(
      os.path.dirname(__file__), "results"))
  args = parser.parse_args(argv)
  cfg = llama_block.Config(hidden=args.hidden, heads=args.heads, mlp=args.mlp)
  card = jax.devices()[0].device_kind
  x = jax.random.normal(jax.random.key(0), (args.batch, args.seq, cfg.hidden),
                        cfg.dtype)
  target = jax.random.normal(jax.random.key(1), x.shape, cfg.dtype)
  variants = {
      "flax": (nnx.RMSNorm, True),
      # The one-import switch: the same block, jax_rmsnorm's layer.
      "jax_rmsnorm": (jax_rmsnorm.nnx.RMSNorm, False),
      # And with the residual add fused into the second norm.
      "jax_rmsnorm_fused_residual": (jax_rmsnorm.nnx.RMSNorm, True),
      "no_norm": (NoNorm, True),
  }
  steps = {name: make_steps(cfg, norm, x, target, fuse_residual=fuse)
           for name, (norm, fuse) in variants.items()}
  times = {name: {"train": [], "inference": []} for name in variants}
  names = list(steps)
  for r in range(args.rounds):
    # Each round starts at the next variant, so that a drift of the card's
    # clocks within a round favours none of them.
    for name in names[r % len(names):] + names[:r % len(names)]:
      step = steps[name]
      for kind in ("train", "inference"):
        fn, fn_args = step[kind]
        times[name][kind].append(bench.measure_us(
            fn, *fn_args, iterations=args.iterations))
  result = dict(card=card, jax=jax.__version__, config=vars(args),
                activations=cfg.dtype, params=cfg.param_dtype)
  for name in variants:
    result[name] = dict(
        train_us=statistics.median(times[name]["train"]),
        inference_us=statistics.median(times[name]["inference"]),
        train_rounds_us=times[name]["train"],
        inference_rounds_us=times[name]["inference"],
        first_loss=steps[name]["first_loss"])
  for name in ("jax_rmsnorm", "jax_rmsnorm_fused_residual"):
    for kind in ("train", "inference"):
      result[f"{kind}_ratio_{name}_over_flax"] = (
          result[name][f"{kind}_us"] / result["flax"][f"{kind}_us"])
  for name in ("flax", "jax_rmsnorm", "jax_rmsnorm_fused_residual"):
    for kind in ("train", "inference"):
      total = result[name][f"{kind}_us"]
      result[f"{kind}_norm_share_{name}"] = (
          total - result["no_norm"][f"{kind}_us"]) / total
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
