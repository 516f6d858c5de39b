"""TrainState, optimizer and the one pure train step `(state, batch, rng) -> (state, metrics)`.

Kept apart from `train.py` so the benchmark tool and tests build exactly the step that trains.
"""
import functools
from typing import Any, Callable, Dict, NamedTuple, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from soda_jax import compile_once, diffusion, multihost, sharding
from soda_jax.models import soda

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # {'encoder', 'head', 'decoder'}
  batch_stats: Any  # encoder BatchNorm statistics ({} for GroupNorm encoders)
  opt_state: Any
  ema_params: Any
  # EMA of batch_stats at the same decay: BatchNorm statistics that belong to the EMA weights
  # (the online statistics track the online weights, which run ahead of the EMA ones).
  ema_batch_stats: Any

  def eval_variables(self, use_ema: bool = True) -> Dict[str, Any]:
    """The `apply` variables for evaluation: EMA params with *their* BatchNorm statistics."""
    if use_ema:
      return model_variables(self.ema_params, self.ema_batch_stats)
    return model_variables(self.params, self.batch_stats)


def model_variables(params, batch_stats) -> Dict[str, Any]:
  """{'params'[, 'batch_stats']}: the one place that assembles a variables dict."""
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


# Parts of the model whose gradient norms are logged separately (first matching rule wins), so
# a run shows when the encoder starts to receive signal through z.
GRAD_PARTS = (("encoder", lambda p: p.startswith("encoder/")),
              ("head", lambda p: p.startswith("head/")),
              ("latent_proj", lambda p: "/latent_proj/" in p),
              ("decoder_rest", lambda p: p.startswith("decoder/")))


def part_grad_norms(grads) -> Dict[str, jax.Array]:
  """{'grad_norm/<part>': global L2 norm of that part's gradient} for GRAD_PARTS."""
  sq = {name: jnp.zeros((), jnp.float32) for name, _ in GRAD_PARTS}
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    p = _path_str(path)
    name = next((n for n, rule in GRAD_PARTS if rule(p)), None)
    if name is None:
      raise ValueError(f"gradient leaf {p!r} belongs to none of {[n for n, _ in GRAD_PARTS]}")
    sq[name] = sq[name] + jnp.sum(jnp.square(g.astype(jnp.float32)))
  return {f"grad_norm/{k}": jnp.sqrt(v) for k, v in sq.items()}


def build_model(config: ml_collections.ConfigDict) -> soda.SODA:
  return soda.build_model(config.model, image_channels=config.data.channels,
                          dtype=COMPUTE_DTYPES[config.compute_dtype])


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _mask(params, predicate):
  return jax.tree_util.tree_map_with_path(lambda p, _: predicate(_path_str(p)), params)


def lr_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup, then cosine decay to 0 at num_train_steps (or constant)."""
  o = config.optim
  warmup = max(1, o.warmup_steps)
  if o.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, o.lr, warmup,
                                              max(config.num_train_steps, warmup + 1))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, o.lr, warmup), optax.constant_schedule(o.lr)], [warmup])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with warmup, global-norm clipping, decay on kernels only, encoder lr multiplier."""
  o = config.optim
  decay_mask = functools.partial(_mask, predicate=lambda p: p.endswith("kernel"))
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  chain.append(optax.adamw(lr_schedule(config), b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                           mask=decay_mask))
  if o.encoder_lr_mult != 1.0:
    enc_mask = functools.partial(_mask, predicate=lambda p: p.startswith("encoder"))
    chain.append(optax.masked(optax.scale(o.encoder_lr_mult), enc_mask))
  return optax.chain(*chain)


def _init_boxed(model, tx, config, rng):
  """State with logically-partitioned (boxed) params; optax states inherit the boxes."""
  inputs = soda.init_inputs(1, config.data.image_size, config.data.channels, model.num_subvectors)
  variables = model.init(rng, **inputs)
  params = variables["params"]
  stats = variables.get("batch_stats", {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                    opt_state=tx.init(params), ema_params=params, ema_batch_stats=stats)


def _init_state(model, tx, config, rng) -> TrainState:
  """The state as plain arrays: what `create_state` and `programs` compile (named, so compile
  reports list it apart from other jitted lambdas)."""
  return nn.meta.unbox(_init_boxed(model, tx, config, rng))


def abstract_state(model, tx, config, mesh, rng) -> Tuple[TrainState, Any, int]:
  """The state as `jax.ShapeDtypeStruct`s with their shardings (no array is allocated).

  Returns (abstract state, state_shardings, number of leaves replicated because a dim was not
  divisible): the restore target, so a resumed run never holds an initialised copy as well.
  """
  boxed = jax.eval_shape(functools.partial(_init_boxed, model, tx, config), rng)
  shardings, num_replicated = sharding.logical_shardings(
      boxed, mesh, config.sharding_rules, config.mesh.min_shard_elements)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  return abstract, shardings, num_replicated


def create_state(model, tx, config, mesh, rng) -> Tuple[TrainState, Any, int]:
  """Params created already sharded: `jit(init, out_shardings=...)`.

  Returns (state, state_shardings, number of leaves replicated because a dim was not divisible).
  """
  _, shardings, num_replicated = abstract_state(model, tx, config, mesh, rng)
  state = compile_once.run(functools.partial(_init_state, model, tx, config), rng,
                           out_shardings=shardings)
  return state, shardings, num_replicated


def train_step(state: TrainState, batch: Dict[str, jax.Array], rng: jax.Array, *,
               model: soda.SODA, tx: optax.GradientTransformation,
               config: ml_collections.ConfigDict) -> Tuple[TrainState, Dict[str, jax.Array]]:
  """One SODA update. batch: source/target (B, H, W, C) in [-1, 1], target_box (B, 4); 3-D
  views: source (B, K, H, W, 3), source_rays (B, K, H, W, 6), target_rays (B, H, W, 6),
  source_mask (B, K) (the views each latent averages)."""
  d = config.diffusion
  rng = jax.random.fold_in(rng, state.step)
  k_t, k_noise, k_mask, k_drop = jax.random.split(rng, 4)
  source, target = batch["source"], batch["target"]
  b = target.shape[0]
  t = diffusion.timesteps(k_t, b, d.t_power)
  noise = jax.random.normal(k_noise, target.shape, jnp.float32)
  x_t = diffusion.q_sample(target, t, noise, d.schedule)
  keep, pose_keep = diffusion.sample_masks(
      k_mask, b, model.num_subvectors, layer_mask_rate=d.layer_mask_rate,
      latent_drop_rate=d.latent_drop_rate, pose_drop_rate=d.pose_drop_rate)

  def loss_fn(params):
    variables = model_variables(params, state.batch_stats)
    mutable = ["batch_stats"] if state.batch_stats else []
    out = model.apply(variables, source, x_t, t, keep, batch.get("target_box"), pose_keep,
                      train=True, rngs={"dropout": k_drop}, mutable=mutable or False,
                      source_rays=batch.get("source_rays"), target_rays=batch.get("target_rays"),
                      source_mask=batch.get("source_mask"))
    pred, new_vars = out if mutable else (out, {})
    per_example = diffusion.diffusion_loss(pred, target, noise, t, pred_type=d.pred_type,
                                           schedule=d.schedule, weighting=d.loss_weighting)
    return jnp.mean(per_example), new_vars.get("batch_stats", state.batch_stats)

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = config.optim.ema_decay
  ema = functools.partial(jax.tree.map, lambda e, p: decay * e + (1.0 - decay) * p)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
             "learning_rate": lr_schedule(config)(state.step), **part_grad_norms(grads)}
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, ema_params=ema(state.ema_params, params),
                            ema_batch_stats=ema(state.ema_batch_stats, batch_stats))
  return new_state, metrics


def jit_train_step(model, tx, config, mesh, state_shardings) -> Callable:
  """The jitted step: state donated, batch split over all devices, metrics replicated."""
  return multihost.compile_then_meet(jax.jit(
      functools.partial(train_step, model=model, tx=tx, config=config),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,)), "train_step")


# ------------------------------------------------------------------ programs, once per process
# Config fields no program below reads: run control and evaluation settings, and the run's length
# when the schedule does not depend on it. The programs are built from the config *without* them,
# so a later change that made a program read one fails at once (AttributeError) instead of being
# served a program built for another value.
RUN_ONLY_FIELDS = ("seed", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                   "async_checkpointing", "evals", "distributed", "compilation_cache_dir")


def program_config(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """`config` less RUN_ONLY_FIELDS (and num_train_steps under a constant schedule), frozen:
  hashable, equal for two runs that compile to the same programs."""
  d = config.to_dict()
  for key in RUN_ONLY_FIELDS:
    d.pop(key, None)
  if d["optim"]["lr_schedule"] != "cosine":
    d.pop("num_train_steps")
  return ml_collections.FrozenConfigDict(d)


class Programs(NamedTuple):
  """What `train.train_and_evaluate` runs, for one (program config, mesh)."""
  model: soda.SODA
  tx: optax.GradientTransformation
  abstract: TrainState  # jax.ShapeDtypeStructs with shardings: the restore target
  shardings: Any
  num_replicated: int
  init: Callable[[jax.Array], TrainState]  # rng -> sharded state, compiled on first use
  step: Callable  # jit_train_step


def programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Programs:
  """The model, optimizer, state layout, init and train step of `config` on `mesh`, built once
  per process: a second run of the same programs (a notebook cell run again, a learning curve's
  next point, a resume in the same process) reuses them without tracing again (5-7 s for the
  tiny config on a 2-core CPU even when the persistent cache then serves the binary)."""
  return _programs(program_config(config), mesh)


@functools.lru_cache(maxsize=4)
def _programs(config: ml_collections.FrozenConfigDict, mesh: jax.sharding.Mesh) -> Programs:
  model, tx = build_model(config), make_optimizer(config)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)  # jax.random.PRNGKey's shape: only traced
  abstract, shardings, num_replicated = abstract_state(model, tx, config, mesh, key)
  compiled = []

  def init(rng):  # a resumed run never compiles it
    if not compiled:
      compiled.append(compile_once.compile(functools.partial(_init_state, model, tx, config),
                                           rng, out_shardings=shardings))
    return compiled[0](rng)

  return Programs(model, tx, abstract, shardings, num_replicated, init,
                  jit_train_step(model, tx, config, mesh, shardings))
