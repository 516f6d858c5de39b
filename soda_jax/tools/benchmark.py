r"""Throughput, compile time, memory and FLOPs of the real train step (and encode/sample/data).

  python -m soda_jax.tools.benchmark --config=configs/demo.py --steps=10 --warmup=2 \
      --mode=all --json=/tmp/demo.json [--config.batch_size=32] [--peak_tflops=989]

`train` builds exactly the step `train.py` runs (`train_step.create_state` + `jit_train_step` on
the config's mesh) and feeds it a synthetic batch that already lives on the devices, so input
cost is excluded; `data` measures the input pipeline on its own. `encode` is the feature
extractor (probes), `sample` one DDIM step (one `SODA.denoise` call at w_z = w_p = 1).

FLOPs come from XLA's cost analysis of the compiled executable. Under SPMD that executable is
the per-device program, so `flops_per_device` is what one chip runs per step and
`flops_per_step = flops_per_device * num_devices` (replicated work, e.g. the optimizer update of
unsharded params, is counted once per device). MFU = flops_per_device / step_s / peak.
`hand_count_flops` is an independent count from the config (convs, dense layers and attention
matmuls only) used to check those numbers; see docs/benchmarks.md.
"""
import functools
import json
import math
import os
import resource
import statistics
import sys
import time
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from soda_jax import config_checks, sharding, train_step as ts
from soda_jax.models import convolution, soda
from soda_jax.models.unet import level_sizes

MODES = ("train", "encode", "sample", "data")

# Dense bf16 peak per chip (TFLOP/s), matched as a substring of `device.device_kind`. CPUs have
# no meaningful peak here: MFU is reported as None.
PEAK_TFLOPS = (
    ("H100", 989.0),
    ("H200", 989.0),
    ("TPU v4", 275.0),
    ("TPU v5 lite", 197.0),  # v5e reports itself as "TPU v5 lite"
    ("TPU v5e", 197.0),
    ("TPU v5p", 459.0),
    ("TPU v5", 459.0),  # v5p on some runtimes
    ("TPU v6 lite", 918.0),  # v6e (Trillium)
    ("TPU v6e", 918.0),
)


def peak_tflops_for(device_kind: str) -> Optional[float]:
  for key, tflops in PEAK_TFLOPS:
    if key.lower() in device_kind.lower():
      return tflops
  return None


# ------------------------------------------------------------------------------------ helpers
def _cost_flops(compiled) -> Optional[float]:
  """'flops' from `Compiled.cost_analysis()`: a dict, or (older jax) a list of one dict."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def _compiled_memory(compiled) -> Optional[Dict[str, int]]:
  """XLA's static memory plan of the executable (per device): known even where the runtime
  does not report a peak (CPU)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  out = {f: int(getattr(m, f, 0)) for f in fields}
  # Donated (aliased) outputs reuse argument buffers.
  out["total_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                        - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out


def _peak_device_memory():
  """(max over local devices of peak_bytes_in_use, note). The peak is process-lifetime."""
  peaks = []
  for d in jax.local_devices():
    try:
      stats = d.memory_stats()
    except Exception:  # pylint: disable=broad-except
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(int(stats["peak_bytes_in_use"]))
  if not peaks:
    return None, (f"{jax.default_backend()} does not report memory_stats(); see "
                  "compiled_memory for XLA's static plan")
  return max(peaks), "peak_bytes_in_use since process start, max over local devices"


def _host_peak_rss() -> int:
  return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _time_calls(call, steps: int, warmup: int):
  """(wall seconds per call, process CPU seconds per call) after `warmup` untimed calls.

  `call` must block on its own results. CPU time is less disturbed than wall time by other
  processes on a shared host (a loaded 2-core CI machine varies wall time by 1.5x).
  """
  for _ in range(warmup):
    call()
  times = []
  cpu0 = time.process_time()
  for _ in range(steps):
    t0 = time.perf_counter()
    call()
    times.append(time.perf_counter() - t0)
  return times, (time.process_time() - cpu0) / max(steps, 1)


def _timing_fields(times, batch, num_devices, flops_per_device, peak_tflops) -> Dict[str, Any]:
  med = statistics.median(times)
  mfu = None
  if flops_per_device is not None and peak_tflops:
    mfu = flops_per_device / med / (peak_tflops * 1e12)
  return dict(
      steps=len(times), step_s_median=med, step_s_min=min(times), step_s_max=max(times),
      images_per_s=batch / med, images_per_s_per_device=batch / med / num_devices,
      flops_per_device=flops_per_device,
      flops_per_step=None if flops_per_device is None else flops_per_device * num_devices,
      achieved_tflops_per_device=(None if flops_per_device is None
                                  else flops_per_device / med / 1e12),
      mfu=mfu)


def param_counts(config: ml_collections.ConfigDict) -> Dict[str, int]:
  """Parameters of the encoder, head, decoder and in total (shapes only: nothing compiles)."""
  model = ts.build_model(config)
  inputs = soda.init_inputs(1, config.data.image_size, config.data.channels,
                            model.num_subvectors)
  shapes = nn.meta.unbox(
      jax.eval_shape(lambda r: model.init(r, **inputs), jax.random.PRNGKey(0))["params"])
  count = lambda t: int(sum(math.prod(x.shape) for x in jax.tree.leaves(t)))
  out = {k: count(shapes.get(k, {})) for k in ("encoder", "head", "decoder")}
  out["total"] = count(shapes)
  return out


def synthetic_batch(config: ml_collections.ConfigDict, mesh, seed: int = 0) -> Dict[str, Any]:
  """A device-resident global batch with the pipeline's shapes, split over the batch axes."""
  b, s, c = config.batch_size, config.data.image_size, config.data.channels
  rs = np.random.RandomState(seed)
  y0x0 = rs.uniform(0.0, 0.3, (b, 2))
  host = dict(
      source=rs.uniform(-1, 1, (b, s, s, c)).astype(np.float32),
      target=rs.uniform(-1, 1, (b, s, s, c)).astype(np.float32),
      target_box=np.concatenate([y0x0, y0x0 + rs.uniform(0.5, 0.7, (b, 2))], 1).astype(
          np.float32),
      label=rs.randint(0, 10, (b,)).astype(np.int32))
  return jax.device_put(host, sharding.batch_sharding(mesh))


# ------------------------------------------------------------------------------------ modes
class _Setup:
  """Model, mesh and a sharded TrainState, built once and shared by the modes."""

  def __init__(self, config, devices):
    self.config = config
    self.mesh = sharding.make_mesh(config, devices)
    self.num_devices = self.mesh.size
    self.model = ts.build_model(config)
    self.tx = ts.make_optimizer(config)
    t0 = time.perf_counter()
    self.state, self.shardings, self.num_replicated = ts.create_state(
        self.model, self.tx, config, self.mesh, jax.random.PRNGKey(config.seed))
    jax.block_until_ready(self.state)
    self.init_s = time.perf_counter() - t0
    self.batch = synthetic_batch(config, self.mesh)
    self.rng = jax.device_put(jax.random.PRNGKey(1), sharding.replicated(self.mesh))


def _measure(jitted, args, steps, warmup, batch, num_devices, peak_tflops, *,
             donate_first=False):
  """Compile `jitted` for `args`, then time it. With `donate_first`, arg 0 is threaded through
  (the train state is donated and replaced by the step's output)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  flops = _cost_flops(compiled)
  holder = list(args)

  def call():
    out = compiled(*holder)
    if donate_first:
      holder[0] = out[0]
    jax.block_until_ready(out)

  times, cpu_s = _time_calls(call, steps, warmup)
  peak, note = _peak_device_memory()
  row = dict(compile_s=compile_s, warmup=warmup)
  row.update(_timing_fields(times, batch, num_devices, flops, peak_tflops))
  row["host_cpu_s_per_step"] = cpu_s
  row.update(peak_device_memory_bytes=peak, device_memory_note=note,
             compiled_memory=_compiled_memory(compiled), host_peak_rss_bytes=_host_peak_rss())
  return row, holder[0]


def _bench_train(setup: _Setup, steps, warmup, peak_tflops):
  step_fn = ts.jit_train_step(setup.model, setup.tx, setup.config, setup.mesh, setup.shardings)
  row, setup.state = _measure(step_fn, (setup.state, setup.batch, setup.rng), steps, warmup,
                              setup.config.batch_size, setup.num_devices, peak_tflops,
                              donate_first=True)
  row["init_s"] = setup.init_s
  row["replicated_leaves"] = setup.num_replicated
  return row


def _bench_encode(setup: _Setup, steps, warmup, peak_tflops):
  model = setup.model
  fn = jax.jit(lambda v, x: model.apply(v, x, method=soda.SODA.encode))
  variables = setup.state.eval_variables(use_ema=False)
  row, _ = _measure(fn, (variables, setup.batch["source"]), steps, warmup,
                    setup.config.batch_size, setup.num_devices, peak_tflops)
  return row


def _bench_sample(setup: _Setup, steps, warmup, peak_tflops):
  """One DDIM step = one denoiser call with latent and pose kept (w_z = w_p = 1)."""
  model, c = setup.model, setup.config
  b = c.batch_size
  batch_sh = sharding.batch_sharding(setup.mesh)
  z = jax.device_put(np.random.RandomState(2).normal(size=(b, c.model.latent_dim)).astype(
      np.float32), batch_sh)
  t = jax.device_put(np.full((b,), 0.5, np.float32), batch_sh)
  keep = jax.device_put(np.ones((b, model.num_subvectors), bool), batch_sh)
  pose_keep = jax.device_put(np.ones((b,), bool), batch_sh)
  fn = jax.jit(lambda v, *a: model.apply(v, *a, method=soda.SODA.denoise))
  variables = setup.state.eval_variables()
  args = (variables, setup.batch["target"], t, z, keep, setup.batch["target_box"], pose_keep)
  row, _ = _measure(fn, args, steps, warmup, b, setup.num_devices, peak_tflops)
  n = int(c.diffusion.sample_steps)
  row["ddim_steps"] = n
  # A full reconstruction: `n` denoiser calls (the encoder's cost is in the `encode` row).
  row["images_per_s_full_sampling"] = b / (row["step_s_median"] * n)
  return row


def _bench_data(config, steps, warmup):
  """Two-view batches per second per host from the real grain pipeline."""
  from soda_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config_checks.check(config, jax.device_count(), jax.process_count())  # names missing data
  per_process = config.batch_size // jax.process_count()
  t0 = time.perf_counter()
  it = pipeline.make_train_iterator(config, seed=config.seed, process_index=jax.process_index(),
                                    process_count=jax.process_count())
  for _ in range(warmup):
    next(it)
  first_s = time.perf_counter() - t0
  if hasattr(pipeline, "measure_throughput"):
    raw = pipeline.measure_throughput(it, steps)
    batches_per_s = float(raw["batches_per_s"] if isinstance(raw, dict) else raw)
    times = None
  else:
    times = []
    for _ in range(steps):
      t1 = time.perf_counter()
      next(it)
      times.append(time.perf_counter() - t1)
    batches_per_s = 1.0 / statistics.mean(times)
  row = dict(
      compile_s=None, warmup=warmup, steps=steps, startup_s=first_s,
      step_s_median=statistics.median(times) if times else 1.0 / batches_per_s,
      step_s_min=min(times) if times else None, step_s_max=max(times) if times else None,
      host_cpu_s_per_step=None,
      batches_per_s=batches_per_s, per_process_batch=per_process,
      # An example is one (source, target) pair, as in the train row; views = 2 x examples.
      images_per_s=batches_per_s * per_process, views_per_s=2 * batches_per_s * per_process,
      images_per_s_per_device=batches_per_s * per_process / jax.local_device_count(),
      flops_per_device=None, flops_per_step=None, achieved_tflops_per_device=None, mfu=None,
      peak_device_memory_bytes=None, device_memory_note="host-only pipeline",
      compiled_memory=None, host_peak_rss_bytes=_host_peak_rss())
  return row


def run_benchmark(config: ml_collections.ConfigDict, mode: str = "train", steps: int = 10,
                  warmup: int = 2, peak_tflops: Optional[float] = None,
                  devices: Optional[Sequence[Any]] = None) -> Dict[str, Any]:
  """Benchmark `mode` ('train' | 'encode' | 'sample' | 'data' | 'all'); a JSON-able dict.

  `devices` defaults to all devices (the mesh is built from config.mesh over them).
  """
  modes = MODES if mode == "all" else (mode,)
  if any(m not in MODES for m in modes):
    raise ValueError(f"mode={mode!r} is not one of {MODES + ('all',)}")
  if steps < 1 or warmup < 0:
    raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
  devices = list(jax.devices() if devices is None else devices)
  config_checks.check(config)  # model + diffusion; data is synthetic except in 'data' mode
  if config.model.pose == "rays" and any(m != "data" for m in modes):
    raise ValueError(f"config.model.pose='rays' (the multi-view dataset "
                     f"config.data.name={config.data.name!r}): the synthetic batches of modes "
                     "train/encode/sample are 2-D (no camera rays, no K source views); only "
                     "--mode=data is supported for 3-D configs")
  if config.batch_size % len(devices):
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{len(devices)} devices")
  kind = devices[0].device_kind
  table_peak = peak_tflops_for(kind)
  peak = peak_tflops if peak_tflops else table_peak
  result = dict(
      jax_version=jax.__version__, backend=devices[0].platform, device_kind=kind,
      num_devices=len(devices), process_count=jax.process_count(),
      mesh=None, batch_size=config.batch_size, image_size=config.data.image_size,
      channels=config.data.channels, compute_dtype=config.compute_dtype,
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),  # huge pages (cpu_devices.py)
      ld_preload=os.environ.get("LD_PRELOAD", ""),  # tcmalloc where installed (cpu_devices.py)
      conv_weight_grad=convolution.weight_grad_mode(),  # chunks | xla (models/convolution.py)
      compilation_cache_dir=jax.config.jax_compilation_cache_dir or "",
      peak_tflops_per_device=peak,
      peak_tflops_source=("--peak_tflops" if peak_tflops else
                          ("device table" if table_peak else None)),
      params=param_counts(config), results={})
  setup = None
  for m in modes:
    if m == "data":
      try:
        result["results"][m] = _bench_data(config, steps, warmup)
      except (ValueError, OSError) as e:  # e.g. the dataset is not prepared on this machine
        if mode != "all":
          raise
        result["results"][m] = dict(error=f"{type(e).__name__}: {e}")
      continue
    if setup is None:
      setup = _Setup(config, devices)
      result["mesh"] = dict(setup.mesh.shape)
    bench = {"train": _bench_train, "encode": _bench_encode, "sample": _bench_sample}[m]
    result["results"][m] = bench(setup, steps, warmup, peak)
  result["host_peak_rss_bytes"] = _host_peak_rss()
  return result


# ------------------------------------------------------------------------------------ report
def _fmt_bytes(n) -> str:
  return "n/a" if n is None else f"{n / 2**20:.0f} MiB"


def format_table(result: Dict[str, Any]) -> str:
  """Param counts, then one markdown table with a row per mode."""
  p = result["params"]
  lines = [f"params: encoder {p['encoder']:,}  head {p['head']:,}  decoder {p['decoder']:,}  "
           f"total {p['total']:,}",
           f"{result['num_devices']} x {result['device_kind']} ({result['backend']}), mesh "
           f"{result['mesh']}, batch {result['batch_size']}, {result['compute_dtype']}",
           "| mode | compile s | step s (median [min, max]) | img/s | img/s/device | "
           "GFLOP/step | MFU | peak device mem | XLA plan/device | host peak RSS |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for mode, r in result["results"].items():
    if "error" in r:
      lines.append(f"| {mode} | {' '.join(r['error'].split())} |" + " |" * 8)
      continue
    compile_s = "-" if r.get("compile_s") is None else f"{r['compile_s']:.1f}"
    if r.get("step_s_min") is None:
      step = f"{r['step_s_median']:.4f}"
    else:
      step = f"{r['step_s_median']:.4f} [{r['step_s_min']:.4f}, {r['step_s_max']:.4f}]"
    gflop = "-" if r.get("flops_per_step") is None else f"{r['flops_per_step'] / 1e9:.2f}"
    mfu = "n/a" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
    plan = r.get("compiled_memory")
    lines.append(
        f"| {mode} | {compile_s} | {step} | {r['images_per_s']:.1f} | "
        f"{r['images_per_s_per_device']:.1f} | {gflop} | {mfu} | "
        f"{_fmt_bytes(r.get('peak_device_memory_bytes'))} | "
        f"{_fmt_bytes(plan['total_bytes'] if plan else None)} | "
        f"{_fmt_bytes(r.get('host_peak_rss_bytes'))} |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------ hand count
def _valid_taps(n: int, k: int, s: int, pad_lo: Optional[int] = None) -> int:
  """Sum over output positions of the kernel taps that land inside the input (side n).

  XLA's cost analysis counts only those (padding taps multiply zeros). pad_lo=None is Flax's
  'SAME' (extra padding at the end); the encoder pads k // 2 on both sides. Both give
  ceil(n / s) outputs for odd k.
  """
  out = -(-n // s)
  if pad_lo is None:
    pad_lo = max((out - 1) * s + k - n, 0) // 2
  return sum(1 for o in range(out) for t in range(k) if 0 <= o * s + t - pad_lo < n)


def conv_flops(n: int, cin: int, cout: int, k: int = 3, s: int = 1, *,
               exact_padding: bool = True, pad_lo: Optional[int] = None) -> int:
  """2 * (output pixels x taps) * Cin * Cout for a square conv on an n x n input.

  exact_padding=False is the textbook 2*Ho*Wo*kh*kw*Cin*Cout (taps on padding included).
  """
  per_dim = _valid_taps(n, k, s, pad_lo) if exact_padding else -(-n // s) * k
  return 2 * per_dim * per_dim * cin * cout


def _attention_flops(length: int, c: int) -> int:
  """qkv + out projections and the two L x L matmuls (QK^T, AV), summed over heads."""
  return 2 * length * c * 3 * c + 2 * length * c * c + 2 * (2 * length * length * c)


def _encoder_flops(enc, n: int, channels: int, exact: bool):
  """ResNet forward (per example): (flops, flops of layers whose input is data, out features).

  Mirrors torchvision's layouts: basic blocks (18/34) or bottlenecks (50), stride on the 3x3
  conv (v1.5), a 1x1 projection when the shape changes, 'cifar' stem 3x3/1 without max-pool or
  'imagenet' stem 7x7/2 + 3x3/2 max-pool (a pool has no multiplies).
  """
  def conv(n, cin, cout, k, s):  # symmetric k // 2 padding, like torchvision
    return conv_flops(n, cin, cout, k, s, exact_padding=exact, pad_lo=k // 2)

  stages = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}[enc.depth]
  bottleneck = enc.depth == 50
  if enc.stem == "cifar":
    stem = conv(n, channels, enc.width, 3, 1)
  else:
    stem = conv(n, channels, enc.width, 7, 2)
    n = -(-n // 2)
    n = -(-n // 2)  # max-pool 3x3 stride 2, SAME
  total, cin = stem, enc.width
  for i, blocks in enumerate(stages):
    c = enc.width * 2**i
    cout = 4 * c if bottleneck else c
    for j in range(blocks):
      s = 2 if (i > 0 and j == 0) else 1
      n_out = -(-n // s)
      if bottleneck:
        total += conv(n, cin, c, 1, 1) + conv(n, c, c, 3, s) + conv(n_out, c, cout, 1, 1)
      else:
        total += conv(n, cin, c, 3, s) + conv(n_out, c, c, 3, 1)
      if s != 1 or cin != cout:
        total += conv(n, cin, cout, 1, s)
      cin, n = cout, n_out
  return total, stem, cin


def _decoder_flops(config, exact: bool):
  """UNet forward (per example): (flops, flops of layers whose input is data). Follows
  models/unet.py: res blocks (conv, time/latent projections, conv, 1x1 skip), attention,
  strided-conv downsampling, nearest + conv upsampling."""
  m, dec = config.model, config.model.decoder
  conv = functools.partial(conv_flops, exact_padding=exact)
  base, mult = dec.base_channels, tuple(dec.channel_mult)
  levels = len(mult)
  sizes = level_sizes(config.data.image_size, levels)
  temb = 4 * base
  if m.modulation == "layer":
    zdims = soda.split_sizes(m.latent_dim, levels + 1)
  else:
    zdims = (m.latent_dim,) * (levels + 1)

  def res(n, cin, cout, zdim):
    f = conv(n, cin, cout) + conv(n, cout, cout) + 2 * temb * 2 * cout + 2 * zdim * 2 * cout
    return f + (conv(n, cin, cout, 1) if cin != cout else 0)

  def attn(n, c):
    return _attention_flops(n * n, c)

  time_dense0 = 2 * base * temb  # its input is a fixed sinusoid of t: no input gradient
  pose_ch = soda.pose_channels(m.pose, m.get("ray_freqs", soda.DEFAULT_RAY_FREQS))
  conv_in = conv(sizes[0], config.data.channels + pose_ch, base)
  total = time_dense0 + 2 * temb * temb + conv_in
  skips, c = [base], base
  for i, mu in enumerate(mult):
    for _ in range(dec.num_res_blocks):
      total += res(sizes[i], c, mu * base, zdims[i])
      c = mu * base
      if sizes[i] in dec.attention_resolutions:
        total += attn(sizes[i], c)
      skips.append(c)
    if i < levels - 1:
      total += conv(sizes[i], c, c, 3, 2)
      skips.append(c)
  total += 2 * res(sizes[-1], c, c, zdims[levels]) + attn(sizes[-1], c)
  for i in reversed(range(levels)):
    for _ in range(dec.num_res_blocks + 1):
      cin = c + skips.pop()
      total += res(sizes[i], cin, mult[i] * base, zdims[i])
      c = mult[i] * base
      if sizes[i] in dec.attention_resolutions:
        total += attn(sizes[i], c)
    if i > 0:
      total += conv(sizes[i - 1], c, c)
  total += conv(sizes[0], base, config.data.channels)
  return total, time_dense0 + conv_in


def hand_count_flops(config: ml_collections.ConfigDict, *,
                     exact_padding: bool = True) -> Dict[str, int]:
  """FLOPs of convs, dense layers and attention matmuls, counted from the config (global batch).

  Convention: a multiply-add is 2 FLOPs. Forward: 2*Ho*Wo*kh*kw*Cin*Cout per conv (with
  `exact_padding`, only taps inside the image, as XLA counts), 2*in*out per dense row, 2*L*L*C
  for each of QK^T and AV. Train step = forward + backward, where backward = weight gradient
  (= forward cost) + input gradient (= forward cost), except that layers whose input is data
  (the encoder stem, the decoder's conv_in, the first time-embedding dense) need no input
  gradient: train = 3 * forward - those. Elementwise work (norms, activations, softmax, the loss,
  AdamW, EMA) is not counted; XLA counts it, so XLA's number is a little higher.
  """
  b = config.batch_size
  enc, enc_data, feat = _encoder_flops(config.model.encoder, config.data.image_size,
                                       config.data.channels, exact_padding)
  head = 2 * feat * config.model.latent_dim
  dec, dec_data = _decoder_flops(config, exact_padding)
  forward = enc + head + dec
  return dict(
      encoder_forward=b * (enc + head), decoder_forward=b * dec, forward=b * forward,
      train_step=b * (3 * forward - enc_data - dec_data))


# ------------------------------------------------------------------------------------ CLI
def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  config = f.config
  from soda_jax import cpu_devices  # pylint: disable=g-import-not-at-top
  cpu_devices.use_fast_malloc()  # the CLI's allocator (restarts the process once)
  cpu_devices.use_fastest_convolutions()  # the CLI's conv library; the device count stays XLA's
  cpu_devices.keep_optimization_barriers()  # as the CLI
  # Only an explicit directory (compile_s then measures a hit); 'auto' stays off here so that
  # compile_s is a cold compile.
  if config.get("compilation_cache_dir") not in ("", "auto", None):
    jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
  result = run_benchmark(config, f.mode, f.steps, f.warmup, f.peak_tflops)
  result["command"] = " ".join(sys.argv)
  print(format_table(result))
  if f.json:
    os.makedirs(os.path.dirname(os.path.abspath(f.json)), exist_ok=True)
    with open(f.json, "w") as fp:
      json.dump(result, fp, indent=2, default=str)
    print(f"wrote {f.json}")


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Config file (path[:args]).",
                                  lock_config=False)
  flags.DEFINE_integer("steps", 10, "Timed steps.")
  flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
  flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device for MFU (default: a table "
                     "by device kind; none on CPU).")
  flags.DEFINE_string("json", None, "Write every measured field here.")
  flags.DEFINE_enum("mode", "train", MODES + ("all",), "What to measure.")
  flags.mark_flags_as_required(["config"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
