"""The example Llama block: jax_rmsnorm's layers give flax's loss and
gradients, and its training step trains."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jax_rmsnorm.nnx
from examples import llama_block
from jax_rmsnorm._src import testing
from tests.conftest import IMPLEMENTATIONS

TINY = dict(hidden=64, heads=4, mlp=128)


def _pair(dtype, impl):
  cfg = llama_block.Config(dtype=dtype, **TINY)
  theirs = llama_block.make_block(cfg, nnx.RMSNorm, seed=0)
  ours = llama_block.make_block(cfg, jax_rmsnorm.nnx.RMSNorm, seed=1,
                                implementation=impl[0], interpret=impl[1])
  nnx.update(ours, nnx.state(theirs))   # flax's weights load unchanged.
  x = jax.random.normal(jax.random.key(3), (2, 8, cfg.hidden), dtype)
  target = jax.random.normal(jax.random.key(4), x.shape, dtype)
  return theirs, ours, x, target


# Relative tolerances of the loss and of each gradient's norm: float32 blocks
# differ only in the norms' float32 summation order (a few ulps, amplified
# through the attention and MLP); bfloat16 blocks round every activation to
# 8 bits, and one ulp of difference in a normalized value (2**-8) propagates.
TOL = {"float32": (1e-6, 1e-5), "bfloat16": (1e-2, 2e-2)}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loss_and_gradients_match_flax_block(impl, dtype):
  theirs, ours, x, target = _pair(dtype, impl)
  grad = nnx.value_and_grad(llama_block.loss_fn)
  loss_t, g_t = grad(theirs, x, target)
  loss_o, g_o = nnx.jit(grad)(ours, x, target)
  loss_tol, grad_tol = TOL[dtype]
  assert abs(float(loss_o) - float(loss_t)) <= loss_tol * abs(float(loss_t))
  leaves_t = jax.tree.leaves(nnx.state(g_t))
  leaves_o = jax.tree.leaves(nnx.state(g_o))
  assert len(leaves_t) == len(leaves_o) == 2 + 4 + 3
  for a, b in zip(leaves_o, leaves_t):
    err = testing.relative_error(a, np.asarray(b, np.float64))
    assert err <= grad_tol, err


def test_training_step_lowers_the_loss():
  cfg = llama_block.Config(**TINY)
  model = llama_block.make_block(cfg, jax_rmsnorm.nnx.RMSNorm,
                                 implementation="triton", interpret=True)
  graphdef, params = nnx.split(model)
  optimizer = optax.adamw(3e-3)
  opt_state = optimizer.init(params)
  step = jax.jit(llama_block.make_train_step(graphdef, optimizer))
  x = jax.random.normal(jax.random.key(5), (2, 8, cfg.hidden), cfg.dtype)
  target = jax.random.normal(jax.random.key(6), x.shape, cfg.dtype)
  losses = []
  for _ in range(4):
    params, opt_state, loss = step(params, opt_state, x, target)
    losses.append(float(loss))
  assert losses[-1] < losses[0] and all(np.isfinite(losses)), losses
  y = jax.jit(llama_block.make_inference_step(graphdef))(params, x)
  assert y.shape == x.shape and y.dtype == jnp.bfloat16
