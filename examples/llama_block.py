"""A Llama decoder block in Flax NNX whose two RMSNorms are either
`flax.nnx.RMSNorm` or `jax_rmsnorm.nnx.RMSNorm`, and an optax training step.

With jax_rmsnorm's layer and `fuse_residual=True` the residual add before
the second norm runs in one kernel (`add_and_normalize`, i.e.
`jax_rmsnorm.add_rms_norm`); otherwise it is `h = x + a; y = norm(h)`, which
XLA may fuse into the attention output projection's epilogue. Everything
else is shared.

  python -m examples.llama_block          # a few training steps, tiny size
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jax_rmsnorm.nnx


@dataclasses.dataclass(frozen=True)
class Config:
  hidden: int = 4096
  heads: int = 32
  mlp: int = 14336
  dtype: str = "bfloat16"        # activations and matmuls
  param_dtype: str = "float32"
  epsilon: float = 1e-5
  rope_base: float = 500000.0


def rope(x, base: float):
  """Rotary position embedding over the sequence axis of (B, S, H, D)."""
  seq, dim = x.shape[1], x.shape[-1]
  freqs = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None, :]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    dense = functools.partial(nnx.Linear, use_bias=False, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, rngs=rngs)
    self.q, self.k, self.v, self.o = (dense(cfg.hidden, cfg.hidden)
                                      for _ in range(4))
    self.heads, self.rope_base = cfg.heads, cfg.rope_base

  def __call__(self, x):
    b, s, d = x.shape
    split = lambda t: t.reshape(b, s, self.heads, d // self.heads)
    q = rope(split(self.q(x)), self.rope_base)
    k = rope(split(self.k(x)), self.rope_base)
    out = jax.nn.dot_product_attention(q, k, split(self.v(x)), is_causal=True)
    return self.o(out.reshape(b, s, d))


class MLP(nnx.Module):

  def __init__(self, cfg: Config, rngs: nnx.Rngs):
    dense = functools.partial(nnx.Linear, use_bias=False, dtype=cfg.dtype,
                              param_dtype=cfg.param_dtype, rngs=rngs)
    self.gate = dense(cfg.hidden, cfg.mlp)
    self.up = dense(cfg.hidden, cfg.mlp)
    self.down = dense(cfg.mlp, cfg.hidden)

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
  """Pre-norm Llama block: x + attn(norm(x)), then + mlp(norm(.))."""

  def __init__(self, cfg: Config, norm: type[nnx.RMSNorm], rngs: nnx.Rngs,
               fuse_residual: bool = True, **norm_kwargs):
    make_norm = functools.partial(norm, cfg.hidden, epsilon=cfg.epsilon,
                                  dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                  rngs=rngs, **norm_kwargs)
    self.attn_norm, self.mlp_norm = make_norm(), make_norm()
    self.attn, self.mlp = Attention(cfg, rngs), MLP(cfg, rngs)
    self.fuse_residual = fuse_residual and isinstance(
        self.mlp_norm, jax_rmsnorm.nnx.RMSNorm)

  def __call__(self, x):
    a = self.attn(self.attn_norm(x))
    if self.fuse_residual:
      y, x = self.mlp_norm.add_and_normalize(a, x)   # one kernel
    else:
      x = x + a
      y = self.mlp_norm(x)
    return x + self.mlp(y)


def make_block(cfg: Config, norm, seed: int = 0, fuse_residual: bool = True,
               **norm_kwargs) -> Block:
  return Block(cfg, norm, nnx.Rngs(seed), fuse_residual=fuse_residual,
               **norm_kwargs)


def loss_fn(model: Block, x, target):
  out = model(x).astype(jnp.float32)
  return jnp.mean((out - target.astype(jnp.float32)) ** 2)


def make_train_step(graphdef, optimizer: optax.GradientTransformation):
  """A pure (params, opt_state, x, target) -> (params, opt_state, loss)."""

  def step(params, opt_state, x, target):
    def loss_of(params):
      return loss_fn(nnx.merge(graphdef, params), x, target)
    loss, grads = jax.value_and_grad(loss_of)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def make_inference_step(graphdef):
  return lambda params, x: nnx.merge(graphdef, params)(x)


def main():
  cfg = Config(hidden=256, heads=4, mlp=512)
  x = jax.random.normal(jax.random.key(1), (2, 64, cfg.hidden), cfg.dtype)
  target = jax.random.normal(jax.random.key(2), x.shape, cfg.dtype)
  model = make_block(cfg, jax_rmsnorm.nnx.RMSNorm)
  graphdef, params = nnx.split(model)
  optimizer = optax.adamw(1e-3)
  opt_state = optimizer.init(params)
  step = jax.jit(make_train_step(graphdef, optimizer))
  for i in range(5):
    params, opt_state, loss = step(params, opt_state, x, target)
    print(f"step {i}: loss {float(loss):.4f}")


if __name__ == "__main__":
  main()
