"""Novel view synthesis (3-D views): scores of DDIM samples of held-out views of test objects.

For each of `evals.nvs_objects` test objects (`data.eval_split`, spread evenly over the split), a
fixed draw (`evals.nvs_seed`, object) picks one target view and K_max source views; the K-view
case uses the first K of them, so the 1-view sources are among the 3-view ones and every method
is scored on the same target views.
Scored against the true target (PSNR and SSIM, images in [-1, 1], mean over objects):

  soda            encode the K source views (+ rays), mean z, DDIM-sample the target camera
                  (guidance w_z, w_p from config.diffusion)
  nearest_view    copy the source view whose camera centre is closest to the target's
  unconditional   the same model, same noise, latent dropped (pose kept): what the decoder
                  makes of the target camera alone. It does not depend on K; each row repeats it.

All samples start from the same x_T per object, so differences between rows are the methods'.
Written: `workdir/nvs_eval.json`, a turntable grid PNG (`workdir/samples/nvs_turntable_*.png`:
per object the K_max sources, then for several target cameras the true view and the sample),
TensorBoard scalars `nvs/k<K>/<method>_<metric>` and the grid; a table is printed.
"""
import functools
import json
import os
from typing import Any, Dict, Optional, Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from soda_jax import diffusion, multihost, sharding
from soda_jax.data import cameras, multiview, sources, views
from soda_jax.evaluate import generate, metrics
from soda_jax.models import soda

METHODS = ("soda", "nearest_view", "unconditional")
DATA_RANGE = 2.0  # images in [-1, 1]


def heldout_objects(num_objects: int, total: int) -> np.ndarray:
  """Indices of the evaluated objects: num_objects spread evenly over the split (readers list
  objects by category, so the first N would all be of the first category)."""
  n = min(int(num_objects), int(total))
  return (np.arange(n) * int(total)) // max(n, 1)


def heldout_examples(src: Any, num_objects: int, num_source_views: int,
                     seed: int) -> Dict[str, np.ndarray]:
  """`multiview.sample_example` of `heldout_objects`, object i drawn with rng (seed, i),
  stacked, plus camera centres: source_centres (N, K, 3), target_centre (N, 3)."""
  out = []
  for i in heldout_objects(num_objects, len(src)).tolist():
    ex = multiview.sample_example(src, i, np.random.default_rng([int(seed), i]),
                                  num_source_views)
    centres = cameras.camera_centers(src.cameras(i)[0])
    ex["source_centres"] = centres[ex["source_views"]].astype(np.float32)
    ex["target_centre"] = centres[ex["target_view"]].astype(np.float32)
    out.append(ex)
  if not out:
    raise ValueError(f"no objects to evaluate in {src!r} (num_objects={num_objects})")
  return {k: np.stack([ex[k] for ex in out]) for k in out[0]}


def nearest_view(source: np.ndarray, source_centres: np.ndarray,
                 target_centre: np.ndarray):
  """The source view (N, K, H, W, C) whose camera centre (N, K, 3) is closest to the target's
  (N, 3): returns (images (N, H, W, C), chosen index (N,))."""
  dist = np.linalg.norm(np.asarray(source_centres) - np.asarray(target_centre)[:, None], axis=-1)
  idx = np.argmin(dist, axis=1)
  return np.asarray(source)[np.arange(len(idx)), idx], idx


def scores(images, target) -> Dict[str, float]:
  """Mean PSNR and SSIM over the batch (data range 2: images in [-1, 1])."""
  return {"psnr": float(jnp.mean(metrics.psnr(images, target, DATA_RANGE))),
          "ssim": float(jnp.mean(metrics.ssim(images, target, DATA_RANGE)))}


CHUNK = 64  # examples per sampler call: bounded memory for NMR/SRN's hundreds of objects


@functools.partial(multihost.compile_then_meet, name="nvs_encode")
@functools.partial(jax.jit, static_argnames=("model",))
def _encode(model, variables, source, source_rays, source_mask):
  # source_mask is an array, not static: 1 and K views share one compiled encoder.
  return model.apply(variables, source, source_rays=source_rays, source_mask=source_mask,
                     method=soda.SODA.encode)[1]


@functools.partial(multihost.compile_then_meet, name="nvs_step")
@functools.partial(jax.jit, static_argnames=generate.STEP_STATIC)
def _step(model, variables, z, target_rays, use_latent, x, k, rng, *, schedule, pred_type,
          num_steps, eta, w_z, w_p, clip_x0):
  # use_latent is an array, not static: the samples with and without z share one program.
  b = target_rays.shape[0]

  def predict(x_t, t, use_z, use_pose):
    keep = jnp.logical_and(jnp.full((b, model.num_subvectors), use_z), use_latent)
    return model.apply(variables, x_t, t, z, keep, None, jnp.full((b,), use_pose),
                       target_rays=target_rays, method=soda.SODA.denoise)

  return diffusion.ddim_update(predict, x, k, rng=rng, num_steps=num_steps, eta=eta,
                               schedule=schedule, pred_type=pred_type, w_z=w_z, w_p=w_p,
                               clip_x0=clip_x0)


def _sample(model, variables, source, source_rays, source_mask, target_rays, use_latent, rng,
            **kwargs) -> jax.Array:
  """DDIM samples (B, H, W, C) in [-1, 1] of the target cameras: encode, x_T, steps."""
  z = _encode(model, variables, source, source_rays, source_mask)
  x_T, k_steps = generate.initial_noise(rng, target_rays.shape[:-1] + source.shape[-1:],
                                        target_rays)
  step = functools.partial(_step, model, variables, z, target_rays, use_latent, rng=k_steps,
                           **kwargs)
  return jnp.clip(diffusion.ddim_sample(step, x_T, kwargs["num_steps"]), -1.0, 1.0)


def chunk_rows(n: int, mesh: jax.sharding.Mesh) -> int:
  """Examples per sampler call for n examples: at most CHUNK, a multiple of the mesh size."""
  return min(CHUNK + (-CHUNK % mesh.size), n + (-n % mesh.size))


def sample_views(model: soda.SODA, variables: Any, source, source_rays, target_rays,
                 rng: jax.Array, dcfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 use_latent: bool = True, num_views: Optional[int] = None,
                 rows: Optional[int] = None) -> np.ndarray:
  """DDIM samples (B, H, W, C) of the target cameras `target_rays` (B, H, W, 6) given K source
  views (B, K, H, W, C) and their rays; use_latent=False drops z (the unconditional model).

  num_views >= K pads the sources to that many views, masked out of the latent
  (`SODA.encode`'s source_mask), and rows sets the examples per call (default
  `chunk_rows(B, mesh)`): calls with the same num_views and rows share one compiled sampler.
  Host arrays in, host numpy out, the same on every process: every process passes the same
  full arrays; each chunk of `rows` examples is split over the mesh's devices (the params'
  mesh, `sharding.make_mesh(config)`), sampled, and gathered back.
  """
  source, source_rays, target_rays = (np.asarray(a) for a in (source, source_rays, target_rays))
  n, k = source.shape[:2]
  num_views = k if num_views is None else int(num_views)
  if num_views < k:
    raise ValueError(f"num_views={num_views} is fewer than the {k} source views given")
  if num_views > k:  # real views (the first), masked out of z
    pad = lambda a: np.concatenate([a, np.repeat(a[:, :1], num_views - k, axis=1)], axis=1)
    source, source_rays = pad(source), pad(source_rays)
  mask = np.arange(num_views)[None].repeat(n, axis=0) < k  # (B, num_views)
  rows = chunk_rows(n, mesh) if rows is None else int(rows)
  if rows % mesh.size:
    raise ValueError(f"rows={rows} is not a multiple of the mesh's {mesh.size} devices")
  kwargs = dict(schedule=dcfg.schedule, pred_type=dcfg.pred_type,
                num_steps=int(dcfg.sample_steps), eta=float(dcfg.eta),
                w_z=float(dcfg.w_z) if use_latent else 1.0,  # no z: guidance on it is moot
                w_p=float(dcfg.w_p),
                clip_x0=None if dcfg.get("clip_x0") is None else float(dcfg.clip_x0))
  flag = np.bool_(use_latent)  # an argument like rng: traced, so True and False share a program
  out = []
  for i, start in enumerate(range(0, n, rows)):
    part = slice(start, start + rows)
    # Padding rows count every view (a row with none would divide by zero in the encoder).
    m = np.concatenate([mask[part], np.ones((rows - len(mask[part]), num_views), bool)])
    args = [sharding.batch_from_host(a, mesh, rows)[0]
            for a in (source[part], source_rays[part], m, target_rays[part])]
    chunk_rng = rng if i == 0 else jax.random.fold_in(rng, i)
    sampled = _sample(model, variables, *args, flag, chunk_rng, **kwargs)
    out.append(np.asarray(multihost_utils.process_allgather(sampled, tiled=True))
               [:len(target_rays[part])])
  return np.concatenate(out)


def turntable_views(src: Any, index: int, num_cameras: int) -> np.ndarray:
  """View indices of a turntable: num_cameras views evenly spread over the source's first
  camera ring (`src.views_per_ring` views, e.g. the synthetic objects' 24 azimuths at the lower
  elevation), else over all of the object's views (NMR: one ring of 24)."""
  ring = int(getattr(src, "views_per_ring", src.num_views(index)))
  return (np.arange(int(num_cameras)) * ring) // int(num_cameras)


def turntable_grid(model, variables, src, ex: Dict[str, np.ndarray], num_objects: int,
                   num_cameras: int, rng: jax.Array, dcfg, mesh: jax.sharding.Mesh,
                   rows: Optional[int] = None) -> Optional[np.ndarray]:
  """uint8 grid, a row per object: its K source views | (true view, sample) at num_cameras
  target cameras around it (`turntable_views`); rows as in `sample_views`."""
  g = min(int(num_objects), len(ex["index"]))
  if g == 0 or num_cameras == 0:
    return None
  size = src.image_size
  trues, rays = [], []
  for i in ex["index"][:g]:
    w2c, k = src.cameras(int(i))
    cams = turntable_views(src, int(i), num_cameras)
    trues.append(views.to_unit_range(src.images(int(i), cams)))
    rays.append(cameras.ray_map(w2c[cams], k[cams], size, size))
  trues, rays = np.stack(trues), np.stack(rays)  # (G, T, S, S, 3 | 6)
  rep = lambda a: np.repeat(a[:g], num_cameras, axis=0)  # (G * T, ...) object-major
  samples = sample_views(model, variables, rep(ex["source"]), rep(ex["source_rays"]),
                         rays.reshape((-1,) + rays.shape[2:]), rng, dcfg, mesh, rows=rows)
  samples = samples.reshape(trues.shape)
  columns = [ex["source"][:g, j] for j in range(ex["source"].shape[1])]
  for j in range(num_cameras):
    columns += [trues[:, j], samples[:, j]]
  return generate.image_grid(columns)


def format_table(results: Dict[str, Dict[str, Dict[str, float]]]) -> str:
  lines = [f"{'views':>5}  {'method':<14}{'PSNR':>8}{'SSIM':>8}"]
  for key, row in results.items():
    for method, s in row.items():
      lines.append(f"{key[1:]:>5}  {method:<14}{s['psnr']:8.2f}{s['ssim']:8.3f}")
  return "\n".join(lines)


def evaluate(config: ml_collections.ConfigDict, model: soda.SODA, variables: Any, workdir: str,
             step: int, writer: Any = None,
             mesh: Optional[jax.sharding.Mesh] = None) -> Dict[str, Any]:
  """The NVS evaluation of `variables` (EMA params + their statistics); see the module doc.
  Samples are split over `mesh` (default: the config's), so it runs across processes too.

  Returns (and writes to workdir/nvs_eval.json) {'step', 'dataset', 'split', 'num_objects',
  'image_size', 'sample_steps', 'w_z', 'w_p', 'source_views', 'seed', 'results':
  {'k<K>': {method: {'psnr', 'ssim'}}}}.
  """
  ev, dcfg = config.evals, config.diffusion
  ks: Sequence[int] = sorted(set(int(k) for k in ev.nvs_source_views))
  src = sources.get_source(config.data, config.data.eval_split)
  # Not config.seed: every training seed is scored on the same views with the same noise.
  ex = heldout_examples(src, ev.nvs_objects, max(ks), seed=ev.nvs_seed)
  rng = jax.random.fold_in(jax.random.PRNGKey(ev.nvs_seed), 0x4E5653)  # 'NVS'
  if mesh is None:
    mesh = sharding.make_mesh(config)
  target = ex["target"]
  # Every sampler call below (K views, no z, the turntable) pads to K_max views and one chunk
  # size: one compiled program when w_z = 1, two otherwise (the z-free rows sample at w_z = 1).
  same = dict(num_views=max(ks), rows=chunk_rows(len(target), mesh))
  one = slice(0, 1)
  uncond = scores(sample_views(model, variables, ex["source"][:, one], ex["source_rays"][:, one],
                               ex["target_rays"], rng, dcfg, mesh, use_latent=False, **same),
                  target)
  results = {}
  for k in ks:
    sampled = sample_views(model, variables, ex["source"][:, :k], ex["source_rays"][:, :k],
                           ex["target_rays"], rng, dcfg, mesh, **same)
    near, _ = nearest_view(ex["source"][:, :k], ex["source_centres"][:, :k], ex["target_centre"])
    results[f"k{k}"] = {"soda": scores(sampled, target), "nearest_view": scores(near, target),
                        "unconditional": dict(uncond)}
  out = dict(step=int(step), dataset=config.data.name, split=config.data.eval_split,
             num_objects=int(len(target)), image_size=int(src.image_size),
             sample_steps=int(dcfg.sample_steps), w_z=float(dcfg.w_z), w_p=float(dcfg.w_p),
             source_views=list(ks), seed=int(ev.nvs_seed), results=results)
  grid = turntable_grid(model, variables, src, ex, ev.nvs_grid_objects, ev.nvs_turntable,
                        jax.random.fold_in(rng, 1), dcfg, mesh=mesh, rows=same["rows"])
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "nvs_eval.json"), "w") as f:
      json.dump(out, f, indent=2)
    if grid is not None:
      path = generate.save_png(grid, os.path.join(workdir, "samples",
                                                  f"nvs_turntable_{step:07d}.png"))
      logging.info("Wrote %s", path)
    print(f"\nNovel views after {step} steps ({out['num_objects']} {config.data.name} "
          f"{config.data.eval_split} objects, {out['sample_steps']} DDIM steps):\n"
          + format_table(results), flush=True)
  if writer is not None:
    writer.write_scalars(step, {f"nvs/{key}/{m}_{s}": v for key, row in results.items()
                                for m, sc in row.items() for s, v in sc.items()})
    if grid is not None:
      writer.write_images(step, {"nvs_turntable": grid[None]})
  return out
