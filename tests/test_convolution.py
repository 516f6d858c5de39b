"""The conv with a chunked weight gradient on CPU (models/convolution.py) against XLA's own."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from soda_jax import cpu_devices
from soda_jax.models import convolution, layers, resnet
from tests.test_config_checks import ROOT

_DN = ("NHWC", "HWIO", "NHWC")


def _loss(conv_fn, x, w, stride, padding, cot):
  y = conv_fn(x, w, (stride, stride), padding, dimension_numbers=_DN)
  return jnp.sum(y * cot)


def _grads(conv_fn, x, w, stride, padding):
  y = lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=_DN)
  cot = jax.random.normal(jax.random.PRNGKey(3), y.shape)
  return jax.jit(jax.grad(_loss, argnums=(1, 2)), static_argnums=(0, 3, 4))(
      conv_fn, x, w, stride, padding, cot)


def _chunks_of_one(monkeypatch, x_shape, out_shape, itemsize=4):
  """A budget of exactly one example's input + output cotangent: chunks of 1 (the real budget,
  this machine's L2, is MiBs)."""
  monkeypatch.setenv(convolution.ENV, "chunks")
  per_example = (np.prod(x_shape[1:]) + np.prod(out_shape[1:])) * itemsize
  monkeypatch.setattr(convolution, "l2_bytes", lambda: int(per_example))


@pytest.fixture
def tiny_l2(monkeypatch):
  """1 KiB: the 6x6x3 -> 6x6x4 conv of several tests below (1008 bytes an example) in chunks of
  1."""
  monkeypatch.setenv(convolution.ENV, "chunks")
  monkeypatch.setattr(convolution, "l2_bytes", lambda: 1024)


# (H, W, kernel, stride, padding): 'SAME' at stride 2 on an even size pads (0, 1), torchvision's
# explicit k // 2 pads both sides, 7x7/2 is the imagenet stem, 1x1/2 the downsample shortcut.
CASES = [(9, 9, 3, 1, "SAME"), (8, 8, 3, 2, "SAME"), (8, 8, 3, 2, ((1, 1), (1, 1))),
         (11, 10, 7, 2, ((3, 3), (3, 3))), (8, 8, 1, 1, "SAME"), (8, 8, 1, 2, ((0, 0), (0, 0))),
         (6, 6, 3, 1, "VALID")]


@pytest.mark.parametrize("h,w,k,stride,padding", CASES)
def test_chunked_gradients_match_xla(h, w, k, stride, padding, monkeypatch):
  rng = np.random.RandomState(0)
  # 16 examples over the 8 test devices: 8 blocks of 2, chunks of 1 -> two chunk convs.
  x = jnp.asarray(rng.randn(16, h, w, 3), jnp.float32)
  kern = jnp.asarray(rng.randn(k, k, 3, 5), jnp.float32)
  pads = lax.padtype_to_pads((h, w), (k, k), (stride, stride), padding) if isinstance(
      padding, str) else padding
  out = lax.conv_general_dilated(x, kern, (stride, stride), padding, dimension_numbers=_DN)
  _chunks_of_one(monkeypatch, x.shape, out.shape)
  assert convolution.weight_grad_chunks(x.shape, kern.shape, (stride, stride), pads,
                                        jnp.float32) == (8, 1)
  want_x, want_w = _grads(lax.conv_general_dilated, x, kern, stride, padding)
  got_x, got_w = _grads(convolution.conv_general_dilated, x, kern, stride, padding)
  np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-4)
  assert got_w.shape == kern.shape and got_w.dtype == kern.dtype
  # The forward value itself is XLA's conv, bit for bit.
  y = convolution.conv_general_dilated(x, kern, (stride, stride), padding, dimension_numbers=_DN)
  np.testing.assert_array_equal(
      y, lax.conv_general_dilated(x, kern, (stride, stride), padding, dimension_numbers=_DN))


def test_chunk_sizes_follow_the_budget_and_the_devices():
  pads = ((1, 1), (1, 1))
  # 32 px, 128 -> 128, float32: 512 KiB of input + 512 KiB of cotangent per example.
  per_example = 2 * 32 * 32 * 128 * 4
  chunks = lambda n, budget, dtype=jnp.float32, strides=(1, 1), pads=pads: (  # noqa: E731
      convolution.weight_grad_chunks((n, 32, 32, 128), (3, 3, 128, 128), strides, pads, dtype,
                                     budget))
  assert chunks(16, 2 * per_example) == (8, 2)  # 8 devices: blocks of 2, both fit: no chunking
  assert chunks(64, 2 * per_example) == (8, 2)  # blocks of 8: chunks of 2
  assert chunks(64, 3 * per_example) == (8, 3)  # 3, 3 and a last chunk of 2
  assert chunks(64, 4 * per_example) == (8, 4)
  assert chunks(64, per_example - 1) == (8, 1)  # not even one fits: one at a time (<= 2x budget)
  assert chunks(64, per_example // 2 - 1) == (8, 8)  # one example > 2x the budget: XLA's own
  assert chunks(6, per_example) == (2, 1)  # gcd(6, 8) = 2 blocks of 3
  # At most MAX_CHUNKS per block: 8 x 64 examples need chunks of 2, which still fit 2x the budget.
  assert convolution.MAX_CHUNKS == 32
  assert chunks(8 * 64, per_example) == (8, 2)
  assert chunks(8 * 128, per_example) == (8, 128)  # chunks of 4 would be 4x the budget: XLA's
  # bfloat16 halves the bytes; a stride-2 conv's cotangent is a quarter of its input.
  assert chunks(64, per_example, jnp.bfloat16) == (8, 2)
  assert chunks(64, per_example * 5 // 8, strides=(2, 2), pads=((0, 1), (0, 1))) == (8, 1)
  assert chunks(64, per_example * 5 // 4, strides=(2, 2), pads=((0, 1), (0, 1))) == (8, 2)


def test_l2_is_read_from_sysfs_or_pinned(tmp_path, monkeypatch):
  for name, (level, kind, size) in {"index0": ("1", "Data", "48K"),
                                    "index1": ("1", "Instruction", "32K"),
                                    "index2": ("2", "Unified", "2048K"),
                                    "index3": ("3", "Unified", "32M")}.items():
    (tmp_path / name).mkdir()
    for field, value in (("level", level), ("type", kind), ("size", size)):
      (tmp_path / name / field).write_text(value + "\n")
  assert convolution.machine_l2_bytes(str(tmp_path)) == 2048 * 1024
  assert convolution.machine_l2_bytes(str(tmp_path / "absent")) == 1024 ** 2  # the default
  monkeypatch.setenv(convolution.L2_ENV, "65536")
  assert convolution.l2_bytes() == 65536
  monkeypatch.setenv(convolution.L2_ENV, "2M")
  with pytest.raises(ValueError, match="SODA_CONV_L2_BYTES='2M'"):
    convolution.l2_bytes()


@pytest.mark.parametrize("n,budget_examples", [(16, 2), (24, 2), (6, 2)])
def test_chunks_of_several_examples_match_xla(n, budget_examples, monkeypatch):
  """Chunks of 2 (blocks of 2 or 3 examples: an even split, and a last chunk of 1) and 2 device
  blocks (batch 6 on the 8 test devices)."""
  monkeypatch.setenv(convolution.ENV, "chunks")
  x = jnp.asarray(np.random.RandomState(0).randn(n, 9, 9, 3), jnp.float32)
  kern = jnp.asarray(np.random.RandomState(1).randn(3, 3, 3, 5), jnp.float32)
  per_example = (9 * 9 * 3 + 5 * 5 * 5) * 4  # stride 2, SAME: 5x5 outputs
  monkeypatch.setattr(convolution, "l2_bytes", lambda: budget_examples * per_example)
  shards, chunk = convolution.weight_grad_chunks(x.shape, kern.shape, (2, 2), ((1, 1), (1, 1)),
                                                 jnp.float32)
  assert (shards, chunk) == ((8, 2) if n % 8 == 0 else (2, 2))
  want_x, want_w = _grads(lax.conv_general_dilated, x, kern, 2, "SAME")
  got_x, got_w = _grads(convolution.conv_general_dilated, x, kern, 2, "SAME")
  np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got_w, want_w, rtol=1e-5, atol=1e-4)


def test_chunks_on_a_sharded_batch_need_one_all_reduce_and_no_resharding(tiny_l2):
  """Each chunk takes rows of every device's block: the compiled gradient of a conv whose batch
  is split over the 8 devices moves no activations between devices and sums the weight gradient
  with one all-reduce, as XLA's own does."""
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  x = jax.device_put(jnp.asarray(np.random.RandomState(0).randn(32, 6, 6, 3), jnp.float32),
                     NamedSharding(mesh, P("data")))
  kern = jnp.asarray(np.random.RandomState(1).randn(3, 3, 3, 4), jnp.float32)
  assert convolution.weight_grad_chunks(x.shape, kern.shape, (1, 1), ((1, 1),) * 2,
                                        jnp.float32) == (8, 1)  # 4 chunk convs per device

  def loss(conv_fn, w, x):
    return jnp.sum(conv_fn(x, w, (1, 1), "SAME", dimension_numbers=_DN) ** 2)

  grads = {}
  for name, fn in (("chunks", convolution.conv_general_dilated), ("xla", lax.conv_general_dilated)):
    step = jax.jit(jax.grad(lambda w, x, fn=fn: loss(fn, w, x)),
                   out_shardings=NamedSharding(mesh, P()))
    hlo = step.lower(kern, x).compile().as_text()
    assert hlo.count(" all-reduce(") == 1, name
    for op in ("all-gather(", "all-to-all(", "collective-permute("):
      assert op not in hlo, (name, op)
    # the forward and one weight-gradient conv (XLA's), or one per chunk
    assert hlo.count(" convolution(") == {"chunks": 5, "xla": 2}[name]
    grads[name] = step(kern, x)
  np.testing.assert_allclose(grads["chunks"], grads["xla"], rtol=1e-5, atol=1e-4)
  # What the check above guards against: chunks of the global batch (shards=1) straddle the
  # devices' blocks, and the partitioner moves activations between devices to build them.
  g = jnp.ones((32, 6, 6, 4))
  glob = jax.jit(lambda x, g: convolution.chunked_weight_grad(
      x, g, kern, (1, 1), ((1, 1),) * 2, None, shards=1, chunk=4),
                 out_shardings=NamedSharding(mesh, P()))
  hlo = glob.lower(x, jax.device_put(g, x.sharding)).compile().as_text()
  assert "collective-permute(" in hlo or "all-gather(" in hlo or "all-to-all(" in hlo


def test_weight_gradient_is_one_conv_per_chunk(tiny_l2, monkeypatch):
  """Compiled gradient of one layers.conv: forward + input gradient + one weight-gradient conv
  per chunk (16 examples on 8 devices, chunks of 1: 2), or XLA's one."""
  def compiled(mode):
    monkeypatch.setenv(convolution.ENV, mode)
    mod = layers.conv(4)
    x = jnp.ones((16, 6, 6, 3), jnp.float32)
    params = mod.init(jax.random.PRNGKey(0), x)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(mod.apply(p, x) ** 2), argnums=(0, 1)))
    return grad.lower(params, x).compile().as_text().count(" convolution("), grad(params, x)

  n_chunks, g_chunks = compiled("chunks")
  n_xla, g_xla = compiled("xla")
  assert (n_chunks, n_xla) == (4, 3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g_chunks,
               g_xla)


def test_a_batch_that_fits_keeps_xlas_gradient(monkeypatch):
  """With the machine's real L2, a small conv is differentiated by XLA alone: same program."""
  monkeypatch.setenv(convolution.ENV, "chunks")
  x = jnp.ones((16, 6, 6, 3))
  w = jnp.ones((3, 3, 3, 4))
  f = lambda fn: lambda w: jnp.sum(fn(x, w, (1, 1), "SAME", dimension_numbers=_DN))  # noqa: E731
  assert (str(jax.make_jaxpr(jax.grad(f(convolution.conv_general_dilated)))(w))
          == str(jax.make_jaxpr(jax.grad(f(lax.conv_general_dilated)))(w)))


def test_bfloat16_kernel_gets_a_bfloat16_gradient(monkeypatch):
  x = jnp.ones((16, 6, 6, 3), jnp.bfloat16)
  w = jnp.ones((3, 3, 3, 4), jnp.bfloat16)
  _chunks_of_one(monkeypatch, x.shape, (16, 6, 6, 4), itemsize=2)
  assert convolution.weight_grad_chunks(x.shape, w.shape, (1, 1), ((1, 1),) * 2,
                                        jnp.bfloat16) == (8, 1)
  gw = jax.grad(lambda w: jnp.sum(convolution.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=_DN).astype(jnp.float32)))(w)
  assert gw.dtype == jnp.bfloat16
  # Interior taps see all 9 inputs of 1: every output pixel's cotangent is 1, so dW[i, j] counts
  # the output pixels whose tap (i, j) lands inside the 6x6 image: 16 images x 5 x 5 off-centre.
  assert float(gw[1, 1, 0, 0]) == 16 * 36 and float(gw[0, 0, 0, 0]) == 16 * 25


def test_mode_selection(monkeypatch):
  """auto: chunks for YNNPACK's convolutions (XLA:CPU's default), XLA's own for Eigen's."""
  monkeypatch.delenv(convolution.ENV, raising=False)
  on_cpu = jax.default_backend() == "cpu"
  monkeypatch.setenv("XLA_FLAGS", f"{cpu_devices.FLAG}=8")
  assert convolution.weight_grad_mode() == ("chunks" if on_cpu else "xla")
  monkeypatch.setenv("XLA_FLAGS", f"{cpu_devices.FLAG}=8 {cpu_devices.EIGEN_CONVS}")
  assert convolution.weight_grad_mode() == "xla"
  monkeypatch.setenv(convolution.ENV, "taps")  # the per-tap matmuls of sessions 10-24: removed
  with pytest.raises(ValueError, match="SODA_CONV_WEIGHT_GRAD='taps'"):
    convolution.weight_grad_mode()


def test_uncovered_convs_are_xlas(tiny_l2):
  """Grouped or dilated convs keep lax's own gradient (the chunked form does not cover them)."""
  x = jnp.ones((16, 6, 6, 4))
  w = jnp.ones((3, 3, 2, 4))
  f = lambda w: jnp.sum(convolution.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), "SAME", dimension_numbers=_DN, feature_group_count=2))
  jaxpr = str(jax.make_jaxpr(jax.grad(f))(w))
  assert jaxpr.count("conv_general_dilated[") == 2  # forward + XLA's weight gradient, unchunked


def test_symbolic_batch_exports_with_xlas_conv(tiny_l2):
  """`jax.export` with a polymorphic batch (the export path) traces lax's conv: no chunk sizes
  can be chosen for a batch that is not a number."""
  w = jnp.ones((3, 3, 3, 4))
  f = jax.jit(lambda x: convolution.conv_general_dilated(x, w, (1, 1), "SAME",
                                                         dimension_numbers=_DN))
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 6, 6, 3"), jnp.float32)
  exp = jax.export.export(f)(spec)
  x = jnp.ones((5, 6, 6, 3))
  np.testing.assert_array_equal(exp.call(x), f(x))


def test_resnet_convs_use_it(monkeypatch):
  mod = resnet._conv(4, 3, 2, dtype=jnp.float32)  # pylint: disable=protected-access
  x = jnp.ones((16, 8, 8, 3))
  _chunks_of_one(monkeypatch, x.shape, (16, 4, 4, 4))
  params = mod.init(jax.random.PRNGKey(0), x)
  grad = jax.jit(jax.grad(lambda p: jnp.sum(mod.apply(p, x) ** 2)))
  # forward + 2 weight-gradient chunks (no input gradient: x is not differentiated)
  assert grad.lower(params).compile().as_text().count(" convolution(") == 3


def test_conv_bench_measures_both_gradients_on_the_same_numbers():
  from soda_jax.tools import conv_bench  # pylint: disable=g-import-not-at-top
  per_example = 6 * 6 * (3 + 4) * 4
  row = conv_bench.measure((16, 6, 3, 4), budget=per_example, reps=1)
  assert (row["shards"], row["chunk"], row["per_example_bytes"]) == (8, 1, per_example)
  assert row["max_rel_diff"] < 1e-5
  assert all(row[k] > 0 for k in ("forward_ms", "xla_weight_grad_ms", "chunked_weight_grad_ms"))
  table = conv_bench.format_table([row])
  assert "| 16x6x3x4 | 1 of 2 |" in table
  with pytest.raises(ValueError, match="shape '16x32x128'"):
    conv_bench.parse_shape("16x32x128")


@pytest.mark.parametrize("flags,want", [
    ("", True),
    ("--xla_force_host_platform_device_count=2", True),
    (cpu_devices.EIGEN_CONVS, False),
    (f"{cpu_devices.YNN_FLAG}=+eltwise,+reduce", True),
    (f"{cpu_devices.YNN_FLAG}=+eltwise,-individual_convolution", False),
    (f"{cpu_devices.YNN_FLAG}=individual_dot,reduce", False),  # a plain list replaces the default
    (f"{cpu_devices.YNN_FLAG}=individual_convolution", True),
    (f"{cpu_devices.EIGEN_CONVS} {cpu_devices.YNN_FLAG}=+eltwise", True),  # the last one wins
])
def test_which_library_runs_the_convolutions(flags, want):
  assert convolution.ynnpack_convolutions(flags) is want


_BOTH_LIBRARIES = """
import numpy as np, jax, jax.numpy as jnp
from soda_jax.models import convolution
r = np.random.default_rng(0)
x = jnp.asarray(r.normal(size=(8, 10, 10, 16)), jnp.float32)
w = jnp.asarray(r.normal(size=(3, 3, 16, 24)) * 0.1, jnp.float32)
def loss(x, w):
  y = convolution.conv_general_dilated(x, w, (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.sum(jnp.sin(y)), y
(l, y), (gx, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
txt = jax.jit(jax.grad(lambda w: loss(x, w)[0])).lower(w).compile().as_text()
entry = txt[txt.index("ENTRY"):]  # Eigen's convs are plain instructions; YNNPACK's in fusions
np.savez(OUT, y=y, gx=gx, gw=gw, mode=convolution.weight_grad_mode(),
         eigen=" convolution(" in entry.split(chr(10) + "}")[0])
"""


def test_both_conv_libraries_compute_the_same_gradients(tmp_path):
  """The machine picks YNNPACK + L2 chunks or Eigen + XLA's weight gradient
  (cpu_devices.use_fastest_convolutions): both must give the same numbers. Each runs in its own
  process, since XLA reads the library choice from XLA_FLAGS when it starts."""
  out = {}
  for name, flags in (("ynnpack", ""), ("eigen", cpu_devices.EIGEN_CONVS)):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", convolution.ENV)}
    env.update(XLA_FLAGS=f"{cpu_devices.FLAG}=1 {flags}".strip(),
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               SODA_CONV_L2_BYTES=str(10 * 10 * (16 + 24) * 4))  # chunks of one example
    path = tmp_path / f"{name}.npz"
    subprocess.run([sys.executable, "-c", f"OUT = {str(path)!r}" + _BOTH_LIBRARIES], env=env,
                   check=True, timeout=300, capture_output=True)
    out[name] = np.load(path)
  assert str(out["ynnpack"]["mode"]) == "chunks" and str(out["eigen"]["mode"]) == "xla"
  assert not out["ynnpack"]["eigen"] and out["eigen"]["eigen"]  # the flag did switch libraries
  for k in ("y", "gx", "gw"):
    a, b = out["ynnpack"][k], out["eigen"][k]
    assert np.abs(a - b).max() <= 2e-5 * np.abs(a).max(), k
