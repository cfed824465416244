"""Step-time overhead of each sparse-training mode vs dense training of the same model.

One small Llama (vnm_recipes.models.llama), one run, one batch of random tokens; every
mode's jitted train step (loss, gradient, optimizer update, params update) is timed
in the same process, rounds alternating between modes so that a change in machine
load hits all of them alike. A time is the median over rounds of (time of
--steps-per-round steps, ended by block_until_ready) / --steps-per-round.

Modes and their baselines:
  dense          AdamW on all params                                  (baseline)
  fixed_mask     fixed_mask(AdamW, masks), params pruned once         vs dense, target <= 1.1
  sr_ste_k1      sr_ste(AdamW, configs, update_every=1)               vs dense, target <= 1.3
  sr_ste_k10     the same with update_every=10                        vs dense (no target)
  lora_dense     dense LoRA, AdamW on the adapters                    (baseline)
  lora_stage1/2/3  three_stage_lora(AdamW) held in stage 1, 2 (mask every step) or 3
                                                                       vs lora_dense, target <= 1.2
  lora_schedule  the default schedule's mean: 5 % stage 1, 5 % stage 2, 90 % stage 3

    python bench/training.py                           # size picked by backend (cpu: small)
    python bench/training.py --size medium --dtype bfloat16 --rounds 7
    python bench/training.py --modes dense fixed_mask --steps-per-round 3
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from vnm_jax.config import VNMConfig
from vnm_jax.lora import init_lora, lora_params, three_stage_lora
from vnm_jax.sparse_training import fixed_mask, sparse_params, sr_ste
from vnm_jax.trees import tree_configs, tree_masks
from vnm_recipes.checks import ArgumentParser, config_argument, positive_int_argument
from vnm_recipes.models.llama import Llama, LlamaConfig

SIZES = {
    # name: (model, batch, sequence length)
    "small": (LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=768, num_layers=2,
                          num_heads=4, num_kv_heads=4, head_dim=64), 8, 128),
    "medium": (LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816,
                           num_layers=4, num_heads=16, num_kv_heads=16, head_dim=64), 16, 512),
}
TARGETS = {"fixed_mask": 1.1, "sr_ste_k1": 1.3, "lora_stage1": 1.2, "lora_stage2": 1.2,
           "lora_stage3": 1.2, "lora_schedule": 1.2}
BASELINES = {"fixed_mask": "dense", "sr_ste_k1": "dense", "sr_ste_k10": "dense",
             "lora_stage1": "lora_dense", "lora_stage2": "lora_dense",
             "lora_stage3": "lora_dense"}
ALL_MODES = ("dense", "fixed_mask", "sr_ste_k1", "sr_ste_k10", "lora_dense", "lora_stage1",
             "lora_stage2", "lora_stage3")
# Stage lengths that hold a three-stage run in one stage for the whole benchmark.
FOREVER = 10**9


@dataclasses.dataclass
class Mode:
  """A train step and its carried arguments: step(*carry, tokens) -> (*carry, loss)."""

  step: object
  carry: tuple


def lm_loss(graphdef, params, tokens):
  logits = nnx.merge(graphdef, params)(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), tokens[:, 1:]).mean()


def full_model_modes(graphdef, params, config: VNMConfig, lr: float) -> dict[str, Mode]:
  adamw = optax.adamw(lr, weight_decay=0.05)
  configs = tree_configs(params, config)
  modes = {}

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def dense_step(params, opt_state, tokens):
    loss, grads = jax.value_and_grad(lambda p: lm_loss(graphdef, p, tokens))(params)
    updates, opt_state = adamw.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  copy = functools.partial(jax.tree_util.tree_map, jnp.copy)
  modes["dense"] = Mode(dense_step, (copy(params), adamw.init(params)))

  # Fixed mask: params pruned once, so the loss uses them as they are.
  tx = fixed_mask(adamw, tree_masks(params, config))
  state = tx.init(params)
  modes["fixed_mask"] = Mode(_sparse_step(graphdef, tx, forward=False),
                             (copy(sparse_params(params, state)), state))
  for k in (1, 10):
    tx = sr_ste(adamw, configs, update_every=k)
    modes[f"sr_ste_k{k}"] = Mode(_sparse_step(graphdef, tx, forward=True),
                                 (copy(params), tx.init(params)))
  return modes


def _sparse_step(graphdef, tx, *, forward: bool):
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, tokens):
    def loss_fn(p):
      return lm_loss(graphdef, sparse_params(p, opt_state) if forward else p, tokens)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def lora_modes(graphdef, base, config: VNMConfig, lr: float, rank: int) -> dict[str, Mode]:
  adamw = optax.adamw(lr, weight_decay=0.0)
  adapters = init_lora(jax.random.key(1), base, rank=rank, alpha=2.0 * rank)
  modes = {}

  @functools.partial(jax.jit, donate_argnums=(1, 2))
  def dense_lora_step(base, adapters, opt_state, tokens):
    loss, grads = jax.value_and_grad(
        lambda ad: lm_loss(graphdef, lora_params(base, ad), tokens))(adapters)
    updates, opt_state = adamw.update(grads, opt_state, adapters)
    return base, optax.apply_updates(adapters, updates), opt_state, loss

  modes["lora_dense"] = Mode(dense_lora_step, (base, adapters, adamw.init(adapters)))
  configs = tree_configs(base, config)
  # (dense_steps, dynamic_steps): the warm-up step moves stages 2 and 3 past stage 1.
  for stage, (dense, dynamic) in {1: (FOREVER, 0), 2: (1, FOREVER), 3: (1, 0)}.items():
    tx = three_stage_lora(adamw, configs, total_steps=2 * FOREVER, dense_steps=dense,
                          dynamic_steps=dynamic)

    @functools.partial(jax.jit, donate_argnums=(1, 2))
    def step(base, adapters, opt_state, tokens, tx=tx):
      loss, grads = jax.value_and_grad(
          lambda ad: lm_loss(graphdef, lora_params(base, ad, opt_state), tokens))(adapters)
      updates, opt_state = tx.update(grads, opt_state, adapters, base=base)
      return base, optax.apply_updates(adapters, updates), opt_state, loss

    modes[f"lora_stage{stage}"] = Mode(step, (base, jax.tree_util.tree_map(jnp.copy, adapters),
                                              tx.init(adapters)))
  return modes


def run_steps(mode: Mode, tokens, steps: int) -> float:
  start = time.perf_counter()
  for _ in range(steps):
    *carry, loss = mode.step(*mode.carry, tokens)
    mode.carry = tuple(carry)
  jax.block_until_ready((mode.carry, loss))
  return (time.perf_counter() - start) / steps


def main(argv=None) -> list[dict]:
  parser = ArgumentParser(prog="python bench/training.py", description=__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--size", choices=sorted(SIZES), default=None,
                      help="model size; default small on CPU, medium on GPU/TPU")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                      help="params dtype; default float32 on CPU, bfloat16 elsewhere")
  parser.add_argument("--config", type=config_argument, default=VNMConfig.parse("64:2:8"),
                      help="V:N:M of the block kernels")
  parser.add_argument("--rank", type=positive_int_argument, default=16, help="LoRA rank")
  parser.add_argument("--rounds", type=positive_int_argument, default=5)
  parser.add_argument("--steps-per-round", type=positive_int_argument, default=5)
  parser.add_argument("--modes", nargs="+", choices=ALL_MODES, default=list(ALL_MODES))
  args = parser.parse_args(argv)
  on_cpu = jax.default_backend() == "cpu"
  size = args.size or ("small" if on_cpu else "medium")
  dtype = jnp.dtype(args.dtype or ("float32" if on_cpu else "bfloat16"))
  model_config, batch, length = SIZES[size]
  config = args.config

  model = Llama(model_config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = jax.tree_util.tree_map(lambda x: x.astype(dtype), params)
  tokens = jax.random.randint(jax.random.key(2), (batch, length + 1), 0, model_config.vocab_size)
  modes = {**full_model_modes(graphdef, params, config, 1e-4),
           **lora_modes(graphdef, params, config, 1e-4, args.rank)}
  modes = {name: modes[name] for name in args.modes}

  device = jax.devices()[0].device_kind
  print(f"device: {device} ({jax.default_backend()}), jax {jax.__version__}; model {size} "
        f"(hidden {model_config.hidden_size}, {model_config.num_layers} layers), {dtype.name}, "
        f"batch {batch} x {length} tokens, {config}, LoRA rank {args.rank}", flush=True)
  for name, mode in modes.items():
    start = time.perf_counter()
    run_steps(mode, tokens, 2)  # compile, and move stages 2 and 3 past stage 1
    print(f"  compiled {name} in {time.perf_counter() - start:.1f} s", flush=True)
  samples = {name: [] for name in modes}
  for round_index in range(args.rounds):
    for name, mode in modes.items():
      samples[name].append(run_steps(mode, tokens, args.steps_per_round))
    print(f"  round {round_index + 1}/{args.rounds}: " +
          ", ".join(f"{n} {s[-1] * 1e3:.1f} ms" for n, s in samples.items()), flush=True)
  times = {name: statistics.median(s) for name, s in samples.items()}
  for name, mode in modes.items():
    if name.startswith("lora_stage"):
      stage = int(mode.carry[2].stage)
      assert stage == int(name[-1]), f"{name} ran in stage {stage}"

  if {"lora_stage1", "lora_stage2", "lora_stage3"} <= times.keys():
    times["lora_schedule"] = (0.05 * times["lora_stage1"] + 0.05 * times["lora_stage2"]
                              + 0.9 * times["lora_stage3"])
    BASELINES["lora_schedule"] = "lora_dense"
  rows = []
  print("\n| mode | step (ms) | baseline | ratio | target |")
  print("|---|---|---|---|---|")
  for name, seconds in times.items():
    baseline = BASELINES.get(name)
    ratio = seconds / times[baseline] if baseline in times else None
    target = TARGETS.get(name)
    verdict = "" if target is None or ratio is None else (
        f"<= {target} {'met' if ratio <= target else 'MISSED'}")
    rows.append(dict(mode=name, step_ms=seconds * 1e3, baseline=baseline, ratio=ratio,
                     target=target, device=device, size=size, dtype=dtype.name,
                     config=str(config)))
    print(f"| {name} | {seconds * 1e3:.2f} | {baseline or '-'} | "
          f"{'-' if ratio is None else f'{ratio:.3f}'} | {verdict or '-'} |")
  return rows


if __name__ == "__main__":
  main()
