"""The bench workloads: `train`, `generate`, `t2i`, `rl`, `magvit`.

Each `run_<workload>(config, args, log)` builds its model with random weights, compiles its program ahead of time,
times it and returns `{"cases": [case, ...], ...}`; a case has the timing statistics (`median_s`, `min_s`, `max_s`,
`times_s`), `compile_s`, throughput (`tokens_per_s` or `images_per_s`), FLOPs (`flops_per_call`,
`achieved_flops_per_s`, `mfu`, from the analytic count of `train/flops.py`: model FLOPs, the LM head counted at every
position it would be evaluated by a plain implementation) and XLA's `memory` analysis. With `--official DIR` the train
and generate workloads also time the official PyTorch code on the identical workload (same weights and inputs), in
alternating rounds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mmada_jax.bench import common, official
from mmada_jax.bench.official import ratio_summary
from mmada_jax.config import ConfigError, head_dim
from mmada_jax.diffusion import losses, sampling_image as si, sampling_text as st
from mmada_jax.models import llada, magvit
from mmada_jax.rl import masks, schedule, step as rl_step
from mmada_jax.train import flops as flops_lib, optim, step as step_lib
from mmada_jax.train.state import TrainState

Options = Any  # the parsed options of `mmada-jax bench` (workload flags, repeats, warmup, ...)


def _backbone(config):
  model = llada.build_model(config.model)
  return model, llada.init_params(model, jax.random.key(int(config.seed)))


def _case(name: str, compiled: common.Compiled, times: list[float], peak: dict, flops: float | None,
          **extra) -> dict:
  case = {"name": name, "compile_s": compiled.compile_s, **common.stats(times)}
  case.update(common.throughput(flops, case["median_s"], peak))
  if compiled.xla_flops:
    case["xla_cost_flops"] = compiled.xla_flops
  case["memory"] = compiled.memory
  case.update(extra)
  return case


def _rounds(args) -> int:
  return max(1, int(args.rounds)) if args.official else 1


def _official_runner(args, params, config, log):
  if not args.official:
    return None
  runner = official.OfficialRunner(args.official, args.official_python, params, config, threads=args.threads, log=log)
  log(f"official code: {runner.checkout['path']} (commit {runner.checkout['commit'] or 'unknown'}), "
      f"python {runner.python}")
  return runner


# ----------------------------------------------------------------------------------------------------------------------
# train


def train_inputs(batch: int, length: int, mask_id: int, eps: float, seed: int) -> dict[str, np.ndarray]:
  """The fixtures' training batch: clean ids uniform in [0, mask_id), per row t ~ U(0, 1), p = (1 - eps) t + eps,
  each position masked iff u < p. Returns clean, noisy [B, L] int32 and p_mask [B] float32."""
  rng = np.random.default_rng(seed)
  clean = rng.integers(0, mask_id, (batch, length)).astype(np.int32)
  p = ((1.0 - eps) * rng.uniform(size=batch) + eps).astype(np.float32)
  noisy = np.where(rng.uniform(size=(batch, length)) < p[:, None], mask_id, clean).astype(np.int32)
  return {"clean": clean, "noisy": noisy, "p_mask": p}


class FixedMaskObjective:
  """Train-step hooks (`train.step.LossHooks`) for an already corrupted batch, so that the bench feeds the official
  code and ours the same masks; numerators and denominators are the MMaDA objective's (`diffusion.losses`)."""

  def __init__(self, config, model):
    self._objective = losses.Objective(config, model)
    self.coefficients = self._objective.coefficients

  def corrupt(self, batch, key):
    del key
    return {t: {k: v for k, v in a.items() if k != "example_id"} for t, a in batch.items()}

  def denominators(self, corrupted):
    return self._objective.denominators(corrupted)

  def numerators(self, params, corrupted):
    return self._objective.numerators(params, corrupted)


def run_train(config, args, log) -> dict:
  """The masked-denoising train step (`train.step.make_train_step`, AdamW) on the fixtures' lm batch."""
  model, params = _backbone(config)
  b, length = int(args.batch_size), int(args.seq_len)
  host = train_inputs(b, length, int(config.vocab.mask_id), float(config.loss.text_eps), int(config.seed))
  runner = _official_runner(args, params, config, log)
  tx = optim.make_optimizer(config.optimizer)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  hooks = FixedMaskObjective(config, model)
  fn = step_lib.make_train_step(hooks, tx, hooks.coefficients, int(config.train.micro_batches), int(config.seed))
  batch = {"lm": {"input_ids": jnp.asarray(host["noisy"]), "labels": jnp.asarray(host["clean"]),
                  "valid_mask": jnp.ones((b, length), jnp.int32), "p_mask": jnp.asarray(host["p_mask"])}}
  compiled = common.compile_aot(jax.jit(fn, donate_argnums=0), state, batch)
  holder, losses = [state], []

  def call():
    holder[0], metrics = compiled.call(holder[0], batch)
    losses.append(metrics["loss"])
    return metrics

  masked = int(np.sum(host["noisy"] == config.vocab.mask_id))
  peak = common.device_peak(str(config.model.dtype), float(config.train.peak_tflops))
  times, official_times = [], []
  for r in range(_rounds(args)):
    times += common.time_calls(call, int(args.repeats), int(args.warmup))
    log(f"train step round {r + 1}: median {np.median(times):.3f} s")
    if runner is not None:
      res = runner.run("train", host, int(args.repeats), int(args.warmup), lr=float(config.optimizer.learning_rate),
                       betas=[float(config.optimizer.b1), float(config.optimizer.b2)],
                       weight_decay=float(config.optimizer.weight_decay), eps=float(config.optimizer.eps))
      official_times += res["times_s"]
      official_losses = (res["first_loss"], res["last_loss"])
      log(f"official train step round {r + 1}: median {np.median(res['times_s']):.3f} s")
  flops = flops_lib.train_step_flops(config.model, b, length, length)
  case = _case(f"train_b{b}x{length}", compiled, times, peak, flops, tokens_per_s=b * length / float(np.median(times)),
               masked_positions=masked, masked_fraction=masked / (b * length),
               useful_flops_per_call=flops_lib.train_step_flops(config.model, b, length, masked / b),
               first_loss=float(losses[0]), last_loss=float(losses[-1]))
  if runner is not None:
    case["official"] = dict(ratio_summary(times, official_times), first_loss=official_losses[0],
                            last_loss=official_losses[1])
    runner.close()
  return {"cases": [case], "peak": peak, "n_params": common.n_params(params)}


# ----------------------------------------------------------------------------------------------------------------------
# generate (text)


def text_settings(variant: str, args) -> Any:
  """`TextSampling` of a bench variant: "exact", "dual_cache", "threshold=P", "bf16" or several joined with "+"."""
  extra = {}
  for part in filter(None, variant.split("+")):
    if part in ("exact", "bf16"):
      continue
    if part == "dual_cache":
      extra["dual_cache"] = True
    elif part.startswith("threshold="):
      extra["threshold"] = float(part.split("=", 1)[1])
    else:
      raise ConfigError(f"--variants: unknown variant {part!r} (exact, dual_cache, threshold=P, bf16)")
  return st.TextSampling(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps, **extra)


def variant_model(model: llada.Transformer, variant: str) -> llada.Transformer:
  """The backbone of a variant: "bf16" computes in bfloat16 (fp32 accumulation, fp32 confidences; approximate)."""
  if "bf16" not in variant.split("+"):
    return model
  return llada.Transformer(dataclasses.replace(model.args, dtype=jnp.bfloat16))


def generate_flops(model_config, settings, batch: int, prompt_len: int, calls: int, blocks: int) -> float:
  """FLOPs of one generate call: full-sequence calls with the head on the block, and under `dual_cache` window calls
  (the block's K queries against L keys, head on the block)."""
  length, k = prompt_len + settings.gen_length, settings.block_length
  full = flops_lib.forward_flops(model_config, length, k)
  if not settings.dual_cache:
    return float(batch * calls * full)
  m = model_config
  window = flops_lib.per_token_flops(m) * k + m.num_layers * 4 * k * length * m.num_heads * head_dim(m) + \
      2 * m.d_model * m.vocab_size * k
  return float(batch * (blocks * full + (calls - blocks) * window))


def _jit_generate(model, settings, mask_id: int) -> Callable:
  return jax.jit(lambda params, prompt: st.generate(model, params, prompt, mask_id=mask_id, settings=settings))


def _recording_call(compiled: common.Compiled, params, prompt, outputs: dict, key) -> Callable:
  def call():
    outputs[key] = compiled.call(params, prompt)
    return outputs[key]["tokens"]

  return call


def bench_text(config, batches: list[int], variants: list[str], args, log=print) -> list[dict]:
  """Times `sampling_text.generate` per variant and batch size on random weights (one case per pair).

  args: `prompt_len`, `gen_length`, `block_length`, `steps`, `repeats`, and optionally `warmup`, `official`,
  `official_python`, `rounds`, `threads`. Generated tokens of each variant are compared with the "exact" variant's
  (`tokens_match_exact`: fraction of generated positions equal) and, with `official`, with the official sampler's.
  """
  model, params = _backbone(config)
  mask_id = int(config.vocab.mask_id)
  log(f"model: {common.n_params(params):,} parameters, {config.model.dtype}, devices: {jax.devices()[0].platform} x "
      f"{len(jax.devices())}")
  prompts = {b: np.random.default_rng(0).integers(0, mask_id, (b, args.prompt_len)).astype(np.int32) for b in batches}
  runner = _official_runner(args, params, config, log) if getattr(args, "official", None) else None
  programs = {}
  for variant in variants:
    settings = text_settings(variant, args)
    for b in batches:
      programs[variant, b] = (settings, common.compile_aot(_jit_generate(variant_model(model, variant), settings,
                                                                         mask_id), params, jnp.asarray(prompts[b])))
  times = {key: [] for key in programs}
  outputs, official_times, official_tokens = {}, {b: [] for b in batches}, {}
  repeats, warmup = int(args.repeats), int(getattr(args, "warmup", 1))
  for r in range(_rounds(args) if runner is not None else 1):
    for key, (_, compiled) in programs.items():
      times[key] += common.time_calls(_recording_call(compiled, params, jnp.asarray(prompts[key[1]]), outputs, key),
                                      repeats, warmup)
    if runner is not None:
      res = runner.run("generate", {f"prompt_b{b}": prompts[b] for b in batches}, repeats, warmup,
                       gen_length=args.gen_length, block_length=args.block_length, steps=args.steps)
      for b in batches:
        official_times[b] += res[str(b)]["times_s"]
        official_tokens[b] = np.asarray(res[str(b)]["tokens"])
        log(f"official generate batch {b} round {r + 1}: median {np.median(res[str(b)]['times_s']):.3f} s")
  official = (official_times, official_tokens) if runner is not None else None
  results = [_text_result(config, model, args, variant, b, settings, compiled, times[variant, b], outputs, official,
                          log) for (variant, b), (settings, compiled) in programs.items()]
  if runner is not None:
    runner.close()
  return results


def _text_result(config, model, args, variant: str, b: int, settings, compiled, times: list[float], outputs: dict,
                 official: tuple[dict, dict] | None, log) -> dict:
  """The case of one (variant, batch) of `bench_text`: timing, throughput, MFU, token agreement (with the exact
  variant, and with the official sampler when `official` = (its times, its tokens) per batch)."""
  out = outputs[variant, b]
  calls, blocks = int(out["calls"]), int(out["blocks"])
  med = float(np.median(times))
  flops = generate_flops(config.model, settings, b, args.prompt_len, calls, blocks)
  variant_dtype = jnp.dtype(variant_model(model, variant).args.dtype).name  # MFU against the variant's own dtype
  variant_peak = common.device_peak(variant_dtype, float(config.train.peak_tflops))
  res = _case(f"{variant}_b{b}", compiled, times, variant_peak, flops, variant=variant, batch=b,
              first_call_s=compiled.compile_s, model_calls=calls, tokens_per_s=b * args.gen_length / med,
              calls_per_s=calls / med)
  tokens = np.asarray(out["tokens"])[:, args.prompt_len:]
  if ("exact", b) in outputs:
    exact = np.asarray(outputs["exact", b]["tokens"])[:, args.prompt_len:]
    res["tokens_match_exact"] = float(np.mean(tokens == exact))
  if official is not None:
    res["official"] = ratio_summary(times, official[0][b])
    res["official"]["tokens_match_official"] = float(np.mean(tokens == official[1][b][:, args.prompt_len:]))
  log(f"{variant:>24} batch {b:>3}: {med:8.3f} s median of {len(times)} (compile "
      f"{compiled.compile_s:.2f} s), {calls} model calls, {res['tokens_per_s']:.1f} tokens/s, "
      f"{res['calls_per_s']:.2f} forward passes/s"
      + (f", official {res['official']['official_median_s']:.3f} s = {res['official']['speedup']:.2f}x, tokens "
         f"{res['official']['tokens_match_official']:.1%} identical" if official is not None else ""))
  return res


def parse_batches(text: str) -> list[int]:
  try:
    batches = [int(b) for b in text.split(",") if b]
  except ValueError:
    raise ConfigError(f"--batch must be comma-separated integers, got {text!r}") from None
  if not batches or min(batches) < 1:
    raise ConfigError(f"--batch must list positive integers, got {text!r}")
  return batches


def generate_variants(args) -> list[str]:
  """`--variants`, plus the variant of the `--dual_cache` / `--threshold P` flags when given."""
  variants = [v for v in args.variants.split(",") if v]
  extra = "+".join((["dual_cache"] if args.dual_cache else []) + ([f"threshold={args.threshold}"] if args.threshold
                                                                   else []))
  if extra and extra not in variants:
    variants.append(extra)
  for v in variants:
    try:
      text_settings(v, args)
    except ValueError as e:
      raise type(e)(f"sampler settings: {e}") from None
  return variants


def run_generate(config, args, log) -> dict:
  cases = bench_text(config, parse_batches(args.batch or "1,8"), generate_variants(args), args, log)
  return {"cases": cases, "peak": common.device_peak(str(config.model.dtype), float(config.train.peak_tflops))}


# ----------------------------------------------------------------------------------------------------------------------
# t2i


def t2i_layouts(config, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(ids, valid, uncond ids, uncond valid) [B, S + N + 3] of the t2i_gen layout with random caption ids:
  `<|t2i|> <bos> text <eos>` (S + 1 positions) `<|soi|> [MASK] × N <|eoi|>`; the null prompt left-pads with [iPAD]."""
  v, s, n = config.vocab, int(config.data.max_text_len), int(config.vocab.num_image_tokens)
  rng = np.random.default_rng(seed)
  text = rng.integers(0, min(v.text_vocab_size, v.mask_id), (batch, s - 2))
  image = np.concatenate([[v.soi_id], np.full(n, v.mask_id), [v.eoi_id]])
  cond = np.concatenate([np.tile([v.t2i_id, v.bos_id], (batch, 1)), text, np.full((batch, 1), v.eos_id),
                         np.tile(image, (batch, 1))], axis=1).astype(np.int32)
  null = np.concatenate([np.full(s - 2, v.ipad_id), [v.t2i_id, v.bos_id, v.eos_id], image]).astype(np.int32)
  un = np.tile(null, (batch, 1))
  return cond, np.ones_like(cond), un, (un != v.ipad_id).astype(np.int32)


def run_t2i(config, args, log) -> dict:
  """MaskGIT text-to-image token generation (`sampling_image.t2i_generate`, `sampling.image` settings)."""
  model, params = _backbone(config)
  settings = si.ImageSampling.from_config(config.sampling.image)
  b = parse_batches(args.batch or "1")
  v = config.vocab
  vocab = {"mask_id": v.mask_id, "image_offset": v.image_offset, "codebook_size": v.codebook_size,
           "num_image_tokens": v.num_image_tokens}
  peak = common.device_peak(str(config.model.dtype), float(config.train.peak_tflops))
  cases = []
  for batch in b:
    ids, valid, un, un_valid = (jnp.asarray(a) for a in t2i_layouts(config, batch, int(config.seed)))
    fn = jax.jit(lambda p, i, m, u, um, key: si.t2i_generate(model, p, i, m, u, um, settings=settings, rng=key,
                                                             **vocab)["codes"])
    key = jax.random.key(int(config.seed))
    compiled = common.compile_aot(fn, params, ids, valid, un, un_valid, key)
    times = common.time_calls(lambda: compiled.call(params, ids, valid, un, un_valid, key), int(args.repeats),
                              int(args.warmup))
    rows = batch * (2 if settings.guidance_scale > 0 else 1)
    flops = settings.timesteps * rows * flops_lib.forward_flops(config.model, ids.shape[1], 0) + \
        settings.timesteps * rows * 2 * config.model.d_model * v.codebook_size * v.num_image_tokens
    med = float(np.median(times))
    cases.append(_case(f"t2i_b{batch}", compiled, times, peak, flops, batch=batch, model_calls=settings.timesteps,
                       rows_per_call=rows, images_per_s=batch / med, tokens_per_s=batch * v.num_image_tokens / med))
    log(f"t2i batch {batch}: {med:.3f} s median, {settings.timesteps} steps x {rows} rows of {ids.shape[1]} tokens")
  return {"cases": cases, "peak": peak}


# ----------------------------------------------------------------------------------------------------------------------
# rl


def rl_batch(config, seed: int) -> dict[str, np.ndarray]:
  """A host RLBatch (`rl.step`) of random prompts ⊕ responses: rows = prompts_per_step × group_size, each response
  ending at a random position with EOS padding."""
  r, v = config.rl, config.vocab
  rows, p, c = int(r.prompts_per_step) * int(r.group_size), int(r.prompt_len), int(r.gen_length)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, v.mask_id, (rows, p + c)).astype(np.int32)
  for i, end in enumerate(rng.integers(1, c, rows)):
    tokens[i, p + end:] = v.eos_id
  maskable, eligible = masks.response_positions(jnp.asarray(tokens[:, p:]), (int(v.eos_id),))
  uid = np.arange(rows, dtype=np.int32)
  ratios = schedule.multi_mask_ratios(jax.random.key(seed), jnp.asarray(uid), int(r.inner_steps),
                                      int(r.masks_per_step))
  return dict(tokens=tokens, attn=np.ones_like(tokens), maskable=np.asarray(maskable), eligible=np.asarray(eligible),
              adv=rng.normal(size=rows).astype(np.float32), row_weight=np.ones(rows, np.float32), uid=uid,
              ratios=np.asarray(ratios), mask_key=np.asarray(jax.random.key_data(jax.random.key(seed + 1))))


def run_rl(config, args, log) -> dict:
  """The UniGRPO policy step (`rl.step.make_policy_step`: K masks, clipped surrogate, k3 KL, AdamW) and the
  old/reference log-prob precompute, on one device."""
  model, params = _backbone(config)
  tx = optim.make_optimizer(config.optimizer)
  s = rl_step.StepSettings.from_config(config)
  batch = {k: jnp.asarray(a) for k, a in rl_batch(config, int(config.rl.seed)).items()}
  with_ref = float(config.rl.kl_beta) > 0
  pre = common.compile_aot(jax.jit(rl_step.make_precompute(model, s)), params, params if with_ref else None, batch)
  ref = jax.tree.map(lambda x: jnp.array(x, copy=True), params) if with_ref else None
  base = dict(batch)
  batch.update(pre.call(params, ref, base))
  pre_times = common.time_calls(lambda: pre.call(params, ref, base), int(args.repeats), int(args.warmup))
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  step = common.compile_aot(jax.jit(rl_step.make_policy_step(model, tx, s), donate_argnums=0), state, batch,
                            jnp.int32(0))
  holder = [state]

  def call():
    holder[0], metrics = step.call(holder[0], batch, jnp.int32(0))
    return metrics

  times = common.time_calls(call, int(args.repeats), int(args.warmup))
  r = config.rl
  rows, length = int(r.prompts_per_step) * int(r.group_size), int(r.prompt_len) + int(r.gen_length)
  k, mu = int(r.masks_per_step), int(r.inner_steps)
  fwd = flops_lib.forward_flops(config.model, length, length)
  peak = common.device_peak(str(config.model.dtype), float(config.train.peak_tflops))
  cases = [_case("policy_step", step, times, peak, 3.0 * k * rows * fwd, rows=rows, masks=k, length=length,
                 tokens_per_s=k * rows * length / float(np.median(times))),
           _case("precompute", pre, pre_times, peak, (2 if with_ref else 1) * mu * k * rows * fwd, rows=rows,
                 tokens_per_s=(2 if with_ref else 1) * mu * k * rows * length / float(np.median(pre_times)))]
  for c in cases:
    log(f"rl {c['name']}: {c['median_s']:.3f} s median ({rows} rows x {length} tokens, K={k}, mu={mu})")
  return {"cases": cases, "peak": peak}


# ----------------------------------------------------------------------------------------------------------------------
# magvit


def run_magvit(config, args, log) -> dict:
  """MAGVIT-v2 encode (images -> codes) and decode (codes -> images) at the config's resolution."""
  cfg = magvit.MagvitConfig.from_config(config.magvit)
  model = magvit.MagvitV2(cfg)
  params = jax.device_put(magvit.init_params(cfg, int(config.seed)))
  peak = common.device_peak(str(config.magvit.dtype), float(config.train.peak_tflops))
  cases = []
  for batch in parse_batches(args.batch or "1"):
    images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, cfg.resolution, cfg.resolution,
                                                                   cfg.in_channels)).astype(np.float32))
    enc = common.compile_aot(jax.jit(lambda p, x: model.apply({"params": p}, x, method=magvit.MagvitV2.get_code)),
                             params, images)
    codes = enc.call(params, images)
    dec = common.compile_aot(jax.jit(lambda p, c: model.apply({"params": p}, c, method=magvit.MagvitV2.decode_code)),
                             params, codes)
    for name, compiled, arg in (("encode", enc, images), ("decode", dec, codes)):
      times = common.time_calls(lambda: compiled.call(params, arg), int(args.repeats), int(args.warmup))
      med = float(np.median(times))
      cases.append(_case(f"{name}_b{batch}", compiled, times, peak, compiled.xla_flops, batch=batch,
                         images_per_s=batch / med, tokens_per_s=batch * codes.shape[1] / med))
      log(f"magvit {name} batch {batch} at {cfg.resolution} px: {med:.3f} s median")
  return {"cases": cases, "peak": peak, "flops_note": "MAGVIT FLOPs are XLA's cost analysis of the program"}


WORKLOADS: dict[str, Callable[[Any, Options, Callable], dict]] = {
    "train": run_train, "generate": run_generate, "t2i": run_t2i, "rl": run_rl, "magvit": run_magvit}
