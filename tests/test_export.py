"""Exports, checked by numbers: torchvision parity, StableHLO in a fresh process, SavedModel,
ONNX, the bitwise safetensors round trip, and one-line errors for bad input.

A tiny v1.5 encoder, R18 with the cifar stem at width 8, is trained for a few steps (so BatchNorm
statistics and params are not at their init values): the checkpoint -> EMA variables -> export
path, which does not depend on depth. Random weights with random BatchNorm statistics cover the
layouts: R18 (basic blocks) and R50 (bottlenecks, imagenet stem); R18 at full width loads into
`torchvision.models.resnet18` unmodified. R50 is also trained a few steps, encoder and head alone
(its own BatchNorm updates the running statistics; the whole SODA step for R50 would add ~200 s of
compiling for a checkpoint path R18 already covers). Tests that need torch skip only if it is not
importable (requirements-test.txt installs it). Each parity test prints its max abs errors.
"""
import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from soda_jax import config_base, train
from soda_jax.data import pipeline, sources
from soda_jax import export as export_lib
from soda_jax.export import safetensors_io, stablehlo, torchvision as tv, variables as V
from soda_jax.models import soda
from tests import bn_tiny, torch_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_IDX = all(os.path.exists(p) for p in sources.idx_paths("test"))
HAS_TORCH = all(importlib.util.find_spec(m) for m in ("torch", "torchvision"))
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="torch/torchvision not importable "
                                 "(pip install -r requirements-test.txt)")
HAS_ONNX = HAS_TORCH and all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnxscript"))
TOL_TORCH = 1e-4
TOL_HLO = 1e-5
# One xdist worker runs this module (and the export notebook): the trained R18 and its exports
# are built once, and the notebook (same config) finds their programs in the compilation cache.
pytestmark = pytest.mark.xdist_group("export")


@functools.lru_cache(maxsize=None)
def _trained(depth, stem, workdir):
  config = bn_tiny.config(depth, stem)
  train.train_and_evaluate(config, workdir)
  return config


@pytest.fixture(scope="module")
def workroot(tmp_path_factory):
  return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def r18(workroot):
  """(config, workdir) of R18 (cifar stem) trained 3 steps."""
  workdir = str(workroot / "r18")
  return _trained(18, "cifar", workdir), workdir


@functools.lru_cache(maxsize=None)
def _checkpoint(workdir, online=False):
  """The checkpoint's eval variables (read once per test module)."""
  assert os.path.basename(workdir) == "r18", workdir
  config = bn_tiny.config(18, "cifar")
  return V.from_checkpoint(config, workdir, online=online)[0]


@pytest.fixture(scope="module")
def r18_export(r18, workroot):
  """{format: path}: the R18 checkpoint exported once in every format this machine can write.

  Into a directory that already holds a torchvision file of other (random) weights, with onnx
  asked for before torchvision: the ONNX parity test then also shows that the ONNX export does
  not build from a stale file left by an earlier export."""
  config, workdir = r18
  out = workroot / "r18_out"
  out.mkdir()
  tv.save(str(out / tv.FILENAME), _random_variables(config), config, step=0)
  formats = (["onnx"] if HAS_ONNX else []) + ["torchvision", "safetensors", "stablehlo",
                                               "saved_model"]
  return export_lib.export_checkpoint(config, workdir, formats, str(out), platforms=["cpu"])


def _random_variables(config, seed=0):
  """Random weights and random BatchNorm statistics in the model's exact tree (nothing compiled)."""
  rng = np.random.default_rng(seed)
  abstract = V.abstract_variables(V.build_model(config), config)
  flat = {}
  for name, a in V.flatten(abstract).items():
    if name.endswith("kernel"):
      v = rng.normal(0, np.sqrt(2.0 / np.prod(a.shape[:-1])), a.shape)
    elif name.endswith(("scale", ".var")):
      v = rng.uniform(0.5, 1.5, a.shape)
    else:  # bias, mean
      v = rng.normal(0, 0.2, a.shape)
    flat[name] = v.astype(a.dtype)
  return V.unflatten(flat)


def _encoder_steps(config, steps=3, seed=0):
  """Encoder + head after `steps` Adam steps in train mode, from an init-like start (running
  statistics at 0 / 1): params move and BatchNorm's own momentum updates set the statistics."""
  model = V.build_model(config)
  variables = _random_variables(config, seed)
  params = {k: variables["params"][k] for k in ("encoder", "head")}
  stats = jax.tree_util.tree_map_with_path(
      lambda path, v: np.full_like(v, path[-1].key == "var"), variables["batch_stats"])
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, stats, opt, x):
    def loss(p):
      (_, z), new = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"], method=soda.SODA.encode)
      return jnp.mean(jnp.square(z - x.mean(axis=(1, 2, 3))[:, None])), new["batch_stats"]
    (_, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), stats, opt

  opt = tx.init(params)
  for i in range(steps):
    params, stats, opt = step(params, stats, opt, jnp.asarray(_images(config, seed=10 + i)))
  return jax.tree.map(np.asarray, {"params": params, "batch_stats": stats})


def _images(config, n=6, seed=1):
  """NHWC float32 in [-1, 1]: a third random pixels, a third synthetic shapes, a third real
  Fashion-MNIST test images (grey repeated to the config's channels, resized to its size; more
  shapes if the Debian package's IDX files are absent)."""
  s, c = config.data.image_size, config.data.channels
  k = n // 3
  rand = np.random.default_rng(seed).uniform(-1, 1, (k, s, s, c)).astype(np.float32)
  real = np.zeros((0, s, s, c), np.float32)
  if HAVE_IDX:
    fm = config.copy_and_resolve_references()
    fm.data.name = "fashion_mnist"
    real = pipeline.make_eval_arrays(fm, "test", k)["image"]
  shapes = pipeline.make_eval_arrays(config, "test", n - k - len(real))["image"]
  return np.concatenate([rand, shapes, real]).astype(np.float32)


def _encode(config, variables, images):
  model = V.build_model(config)
  fn = jax.jit(functools.partial(model.apply, method=soda.SODA.encode))
  return tuple(np.asarray(a) for a in fn(variables, images))


@pytest.fixture(scope="module")
def torch_side():
  """`torchvision.run_torch`'s answers from one torch process for the module (tests/
  torch_worker.py): seven fresh processes cost ~35 s of imports. `run_torch` itself runs in
  the export notebook, the ONNX export and the CLI exports."""
  worker = torch_worker.TorchWorker()
  yield worker.run
  worker.close()


def _torch_features(run_torch, path, images):
  """(h, z) from torchvision in the torch process (strict load, eval mode)."""
  d = os.path.dirname(path)
  np.save(os.path.join(d, "images.npy"), images)
  run_torch("features", path, os.path.join(d, "images.npy"), os.path.join(d, "torch.npz"))
  out = np.load(os.path.join(d, "torch.npz"))
  return out["h"], out["z"]


def _max_err(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ------------------------------------------------------------------------------ torchvision
@needs_torch
@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_names_shapes_match_torchvision_itself(depth, torch_side):
  """Our state_dict == torchvision.models.resnetNN(num_classes=latent)'s: names, shapes, dtypes;
  and build_resnet at width 64 / imagenet stem / 3 channels is that model unchanged."""
  config = bn_tiny.config(depth, "imagenet", width=64, image_size=32)
  abstract = V.abstract_variables(V.build_model(config), config)
  zeros = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  ours = {k: [list(v.shape), str(v.dtype)] for k, v in tv.state_dict(zeros, step=3).items()}
  theirs = json.loads(torch_side("keys", str(depth), str(config.model.latent_dim)))
  assert ours == theirs["torchvision"]
  assert theirs["build_resnet"] == theirs["torchvision"]


@needs_torch
@pytest.mark.parametrize("depth,stem,weights", [
    (18, "cifar", "random"), (50, "imagenet", "random"),
    (18, "cifar", "trained"), (50, "imagenet", "encoder_steps"),
])
def test_torchvision_parity(depth, stem, weights, request, tmp_path, torch_side):
  if weights == "trained":
    config, workdir = request.getfixturevalue("r18")
    paths = request.getfixturevalue("r18_export")
    variables = _checkpoint(workdir)
  else:
    config = bn_tiny.config(depth, stem)
    variables = (_encoder_steps(config) if weights == "encoder_steps"
                 else _random_variables(config))
    paths = {"torchvision": tv.save(str(tmp_path / "enc.safetensors"), variables, config,
                                    step=0)}
  if weights != "random":  # training moved the statistics away from their init (0 mean, 1 var)
    stats = traverse_util.flatten_dict(variables["batch_stats"])
    assert max(np.abs(v - (k[-1] == "var")).max() for k, v in stats.items()) > 1e-3
  images = _images(config)
  h, z = _encode(config, variables, images)
  th, tz = _torch_features(torch_side, paths["torchvision"], images)
  err_h, err_z = _max_err(h, th), _max_err(z, tz)
  print(f"\ntorchvision parity R{depth} {stem} {weights}: max|h| {np.abs(h).max():.3g}, "
        f"max abs err h {err_h:.3g}, z {err_z:.3g}")
  # 1e-4 absolute for O(1) features; random BatchNorm statistics blow R50's h up to ~200, where
  # float32 summation order alone gives ~1e-6 relative: scale the bound by the magnitude.
  scale = max(1.0, float(np.abs(h).max()))
  assert err_h < TOL_TORCH * scale and err_z < TOL_TORCH * scale, (err_h, err_z, scale)


@needs_torch
def test_torchvision_full_width_r18(tmp_path, torch_side):
  """Width 64, imagenet stem, 3 channels: torchvision's resnet18 itself (no swap)."""
  config = bn_tiny.config(18, "imagenet", width=64, image_size=32)
  variables = _random_variables(config, seed=2)
  path = tv.save(str(tmp_path / "r18.safetensors"), variables, config, step=0)
  images = _images(config, n=4)
  h, z = _encode(config, variables, images)
  th, tz = _torch_features(torch_side, path, images)
  err_h, err_z = _max_err(h, th), _max_err(z, tz)
  print(f"\ntorchvision resnet18 (width 64, unmodified): max abs err h {err_h:.3g}, z {err_z:.3g}")
  assert err_h < TOL_TORCH and err_z < TOL_TORCH


def test_torch_format_names_v2_encoder():
  """The GroupNorm v2 encoder: its own torchvision-style names, OIHW kernels, no running stats."""
  config = config_base.load_config(os.path.join(ROOT, "configs", "tiny.py"))
  variables = _random_variables(config)
  sd = tv.state_dict(variables, step=0)
  flat = V.flatten(variables)
  assert {"conv1.weight", "layer1.0.norm1.weight", "layer2.0.downsample.0.weight", "norm.bias",
          "fc.weight", "fc.bias"} <= set(sd)
  assert not any("running" in k or "num_batches" in k for k in sd)
  assert len(sd) == len(flat) - sum(k.startswith("params.decoder") for k in flat)
  np.testing.assert_array_equal(
      sd["layer1.0.conv1.weight"],
      flat["params.encoder.layer1_0.conv1.kernel"].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(sd["fc.weight"], flat["params.head.kernel"].T)


# ------------------------------------------------------------------------------ safetensors
def _cli_export(tmp_path, workdir, *flags):
  """`python -m soda_jax.export` on the bn_tiny R18 config (a config file importing it);
  returns {format: path} from its stdout."""
  cfg = tmp_path / "bn_tiny_r18.py"
  cfg.write_text("from tests import bn_tiny\n\ndef get_config():\n"
                 "  return bn_tiny.config(18, 'cifar')\n")
  proc = subprocess.run(
      [sys.executable, "-m", "soda_jax.export", f"--config={cfg}", f"--workdir={workdir}",
       f"--out={tmp_path / 'cli_out'}", *flags], capture_output=True, text=True, cwd=ROOT,
      timeout=300, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())


def test_safetensors_round_trip_is_bitwise(r18, r18_export, tmp_path):
  """The EMA export (Python API) and the online one (the CLI, with an explicit --step) load
  back bitwise equal to the checkpoint's variables."""
  config, workdir = r18
  for online in (False, True):  # r18_export holds the EMA params; --online the raw ones
    path = (_cli_export(tmp_path, workdir, "--to=safetensors", "--step=3", "--online")
            if online else r18_export)["safetensors"]
    loaded, loaded_config, meta = safetensors_io.load(path)
    want = _checkpoint(workdir, online)
    got_flat, want_flat = V.flatten(loaded), V.flatten(want)
    assert list(got_flat) == list(want_flat)
    for k in want_flat:
      assert got_flat[k].dtype == want_flat[k].dtype and got_flat[k].tobytes() == \
          want_flat[k].tobytes(), k
    assert meta["params"] == ("online" if online else "ema") and meta["step"] == "3"
    assert loaded_config.model.to_dict() == json.loads(config.model.to_json())
  # EMA and online params differ after training, so --online really changes what is written.
  ema, onl = _checkpoint(workdir), _checkpoint(workdir, True)
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(ema["params"]),
                                             jax.tree.leaves(onl["params"])))


def test_safetensors_bad_files_name_the_problem(r18_export, tmp_path):
  path = r18_export
  good = open(path["safetensors"], "rb").read()
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes(good[: len(good) // 2])
  with pytest.raises(ValueError, match=r"truncated.safetensors .* not a complete safetensors"):
    safetensors_io.load(str(truncated))
  with pytest.raises(ValueError, match=r"not a soda_jax export: metadata format='torchvision'"):
    safetensors_io.load(path["torchvision"])
  with pytest.raises(ValueError, match="no such file"):
    safetensors_io.load(str(tmp_path / "absent.safetensors"))
  # A soda_jax file whose tensors do not fit its config: each bad name is listed.
  flat, meta = safetensors_io.read(path["safetensors"])
  del flat["params.head.bias"]
  flat["params.head.kernel"] = flat["params.head.kernel"][:, :3].copy()
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  edited = str(tmp_path / "edited.safetensors")
  safetensors.numpy.save_file(flat, edited, metadata=meta)
  with pytest.raises(ValueError, match=r"missing params.head.bias .*params.head.kernel: shape"):
    safetensors_io.load(edited)


# ------------------------------------------------------------------------------ StableHLO
_FRESH = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, safetensors.numpy
    d = sys.argv[1]
    io = np.load(d + '/io.npz')
    out = {}
    for name in ('encode', 'denoise'):
      exp = jax.export.deserialize(bytearray(open(d + f'/{name}.stablehlo', 'rb').read()))
      weights = safetensors.numpy.load_file(d + f'/{name}.safetensors')
      for b in (2, 5):
        args = [io[f'{name}_in{i}_{b}'] for i in range(len(exp.in_avals) - len(weights))]
        res = exp.call(weights, *args)
        res = res if isinstance(res, (tuple, list)) else (res,)
        out[f'{name}_{b}'] = max(float(np.abs(np.asarray(r) - io[f'{name}_out{i}_{b}']).max())
                                 for i, r in enumerate(res))
    assert not any(m.startswith('soda_jax') for m in sys.modules)
    print(json.dumps(out))
""")


def _fresh_process_errors(config, variables, out, tmp_path):
  """Max abs error of out/{encode,denoise}.stablehlo called in a fresh process (no soda_jax
  import) against `model.apply` here, at batch sizes 2 and 5, on inputs made from the exported
  signature (stablehlo.encode_inputs / denoise_inputs: every pose's inputs)."""
  model = V.build_model(config)
  rng = np.random.default_rng(0)

  def value(name, spec):
    if name == "x":
      return _images(config, n=spec.shape[0] + 1)[:spec.shape[0]]
    if spec.dtype == jnp.bool_:
      return rng.uniform(size=spec.shape) > 0.3
    if name == "t":
      return rng.uniform(0, 1, spec.shape).astype(np.float32)
    if name == "target_box":  # (y0, x0, y1, x1): crops of the source
      lo, hi = rng.uniform(0, 0.4, (spec.shape[0], 2)), rng.uniform(0.6, 1, (spec.shape[0], 2))
      return np.concatenate([lo, hi], axis=1).astype(np.float32)
    return rng.normal(size=spec.shape).astype(np.float32)

  io = {}
  for b in (2, 5):
    for name, specs, method in (("encode", stablehlo.encode_inputs(config, b), soda.SODA.encode),
                                ("denoise", stablehlo.denoise_inputs(model, config, b),
                                 soda.SODA.denoise)):
      args = {k: value(k, spec) for k, spec in specs.items()}
      for i, a in enumerate(args.values()):
        io[f"{name}_in{i}_{b}"] = a
      res = jax.jit(lambda v, a, m=method: model.apply(v, **a, method=m))(variables, args)
      for i, o in enumerate(res if isinstance(res, tuple) else (res,)):
        io[f"{name}_out{i}_{b}"] = np.asarray(o)
  np.savez(os.path.join(out, "io.npz"), **io)  # the subprocess reads only files in `out`
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", _FRESH, out], capture_output=True, text=True,
                        env=env, cwd=str(tmp_path), timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  errs = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f"\nStableHLO ({config.model.pose} pose) fresh process max abs errors: {errs}")
  assert set(errs) == {"encode_2", "encode_5", "denoise_2", "denoise_5"}
  scales = {f"{name}_{b}": max(1.0, max(float(np.abs(v).max()) for k, v in io.items()
                                        if k.startswith(f"{name}_out") and k.endswith(f"_{b}")))
            for name in ("encode", "denoise") for b in (2, 5)}
  return errs, scales


def test_stablehlo_in_a_fresh_process(r18, r18_export, tmp_path):
  config, workdir = r18
  out = os.path.dirname(r18_export["stablehlo"])
  errs, _ = _fresh_process_errors(config, _checkpoint(workdir), out, tmp_path)
  assert max(errs.values()) < TOL_HLO  # absolute: the trained model's outputs are O(1)
  sig = json.load(open(os.path.join(out, "stablehlo.json")))
  assert sig["encode"]["in"] == ["float32[b,16,16,3]"]
  assert sig["denoise"]["in_names"] == ["x_t", "t", "z", "keep"]


@pytest.mark.parametrize("pose,encode_in,denoise_in", [
    ("box", ["x"], ["x_t", "t", "z", "keep", "target_box", "pose_keep"]),
    ("rays", ["x", "source_rays"], ["x_t", "t", "z", "keep", "pose_keep", "target_rays"]),
])
def test_stablehlo_pose_inputs(pose, encode_in, denoise_in, tmp_path):
  """The pose models (the demo's box, the 3-D demo's camera rays) export with their pose inputs
  and match in a fresh process (random weights: the signature is what is under test)."""
  config = bn_tiny.config(18, "cifar")
  config.model.pose = pose
  variables = _random_variables(config)
  out = str(tmp_path / "out")
  stablehlo.save(out, variables, config, platforms=["cpu"])
  # Random weights and BatchNorm statistics make |h| >> 1: relative to the output's scale.
  errs, scales = _fresh_process_errors(config, variables, out, tmp_path)
  assert max(errs[k] / scales[k] for k in errs) < TOL_HLO, (errs, scales)
  sig = json.load(open(os.path.join(out, "stablehlo.json")))
  assert (sig["encode"]["in_names"], sig["denoise"]["in_names"]) == (encode_in, denoise_in)
  if pose == "rays":
    assert sig["encode"]["in"] == ["float32[b,16,16,3]", "float32[b,16,16,6]"]


def test_stablehlo_lowers_for_cpu_cuda_tpu(r18):
  config, workdir = r18
  variables = _checkpoint(workdir)
  exp = stablehlo.export_encode(V.build_model(config), variables, config)
  assert exp.platforms == ("cpu", "cuda", "tpu")
  assert len(exp.serialize()) < 10 * 2**20  # params are arguments, not constants


# ------------------------------------------------------------------------------ SavedModel / ONNX
def test_saved_model_matches_encode(r18, r18_export):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  config, workdir = r18
  variables = _checkpoint(workdir)
  serve = tf.saved_model.load(r18_export["saved_model"]).signatures["serving_default"]
  errs = {}
  for b in (2, 5):
    images = _images(config, n=b + 1)[:b]
    h, z = _encode(config, variables, images)
    out = serve(images=tf.constant(images))
    errs[b] = (_max_err(h, out["h"].numpy()), _max_err(z, out["z"].numpy()))
  print(f"\nSavedModel max abs errors (h, z) by batch: {errs}")
  assert max(max(e) for e in errs.values()) < TOL_TORCH


@pytest.mark.skipif(not HAS_ONNX, reason="torch, onnxscript or onnxruntime not importable "
                           "(pip install -r requirements-test.txt)")
def test_onnx_matches_encode(r18, r18_export):
  import onnxruntime  # pylint: disable=g-import-not-at-top
  config, workdir = r18
  path = r18_export["onnx"]
  variables = _checkpoint(workdir)
  session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
  errs = {}
  for b in (2, 5):
    images = _images(config, n=b + 1)[:b]
    h, z = _encode(config, variables, images)
    oh, oz = session.run(["h", "z"], {"images": images.transpose(0, 3, 1, 2).copy()})
    errs[b] = (_max_err(h, oh), _max_err(z, oz))
  print(f"\nONNX Runtime max abs errors (h, z) by batch: {errs}")
  assert max(max(e) for e in errs.values()) < TOL_TORCH


# ------------------------------------------------------------------------------ bad input
class _CompileCounter:
  """Counts lowerings to MLIR and XLA compiles while active (a persistent-cache hit skips the
  compile event but not the lowering one)."""

  def __enter__(self):
    self.count = 0
    def listener(event, duration, **kwargs):
      del duration, kwargs
      if event in ("/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration"):
        self.count += 1
    self._listener = listener
    jax.monitoring.register_event_duration_secs_listener(listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)


def test_bad_input_one_line_errors_before_compiling(r18, tmp_path):
  config, workdir = r18
  with _CompileCounter() as counter:  # the counter itself sees a compilation
    jax.jit(lambda x: x * 3 + 1)(jnp.zeros(7)).block_until_ready()
  assert counter.count >= 1
  tiny_v2 = config_base.load_config(os.path.join(ROOT, "configs", "tiny.py"))
  nvs = config_base.load_config(os.path.join(ROOT, "configs", "nvs_synthetic.py"), "variant=tiny")
  cases = [
      (config, workdir, ["pytorch"], None, r"^--to='pytorch' is not one of \("),
      (config, workdir, ["safetensors"], 7,
       r"^--step=7 is not a checkpoint in .* \(steps: \[3\]\)"),
      (tiny_v2, workdir, ["safetensors", "torchvision"], None,
       r"^--to=torchvision: config.model.encoder.version='v2' \(pre-activation GroupNorm"),
      (nvs, workdir, ["stablehlo", "saved_model"], None,
       r"^--to=saved_model: config.model.pose='rays' encodes images with their camera rays"),
  ]
  for cfg, wd, formats, step, pattern in cases:
    with _CompileCounter() as counter, pytest.raises(ValueError, match=pattern) as e:
      export_lib.export_checkpoint(cfg, wd, formats, str(tmp_path / "out"), step=step)
    assert "\n" not in str(e.value) and counter.count == 0, (str(e.value), counter.count)
  assert not os.path.exists(tmp_path / "out")


def test_cli_prints_one_line_error_and_exits_2(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "soda_jax.export", "--config=configs/tiny.py",
       f"--workdir={tmp_path}", "--to=torchvision", f"--out={tmp_path / 'out'}"],
      capture_output=True, text=True, cwd=ROOT, timeout=300, check=False,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "soda_jax.export: error: --to=torchvision: config.model.encoder.version='v2'")
