"""Training a MAGVIT-v2 tokenizer from scratch: reconstruction + LFQ commitment + LFQ entropy losses.

The loss of one batch is `recon_weight * recon + commit_weight * quantizer_loss + entropy_weight * entropy_loss`, where
`recon` is the mean L1 (or squared) error on [-1, 1] pixels and the two LFQ terms are the official ones (already scaled
by `magvit.commit_multiplier` / `magvit.entropy_multiplier`, see `magvit.lfq`). Gradients reach the encoder through the
straight-through estimator. No perceptual or adversarial term: ToyWorld's flat-coloured shapes do not need one.

Parallelism: the step is one jitted function; the batch is split over the mesh's batch axes (`data`, `fsdp`) of
`config.sharding` and the parameters are replicated (the tokenizer is small next to the LLM). Checkpoints: the full
training state with an Orbax CheckpointManager under `workdir/state` (resumed automatically), and at the end the
parameters as a `kind: "magvit"` parameter checkpoint under `workdir/params` (read by `load_magvit`, `export_magvit`).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from mmada_jax import checkpoint as ckpt
from mmada_jax.convert import magvit as conv
from mmada_jax.data import toyworld as tw, toyworld_checkers as checkers
from mmada_jax.models import image_io
from mmada_jax.models import magvit as mv
from mmada_jax.parallel import mesh as mesh_lib

BATCH_AXES = ("data", "fsdp")


def make_optimizer(t) -> optax.GradientTransformation:
  """AdamW with linear warm-up then cosine decay to 10 % of the peak, after global-norm clipping (`magvit.train`)."""
  warmup = max(1, t.warmup_steps)
  schedule = optax.warmup_cosine_decay_schedule(0.0, t.learning_rate, warmup, max(t.steps, warmup + 1),
                                                end_value=0.1 * t.learning_rate)
  chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  return optax.chain(*chain, optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=t.weight_decay))


def psnr(images: jax.Array, recon: jax.Array) -> jax.Array:
  """Per-image PSNR in dB on [0, 1] pixels (reconstructions clipped). [b, h, w, c] x2 -> [b]."""
  a = (images.astype(jnp.float32) + 1) / 2
  b = jnp.clip((recon.astype(jnp.float32) + 1) / 2, 0, 1)
  mse = jnp.mean((a - b) ** 2, axis=(1, 2, 3))
  return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


def loss_fn(params: Any, model: mv.MagvitV2, images: jax.Array, t) -> tuple[jax.Array, dict]:
  """Total loss and metrics for images [batch, H, W, 3] in [-1, 1]."""
  recon, aux = model.apply({"params": params}, images)
  err = recon - images
  rec = jnp.mean(jnp.abs(err)) if t.recon_loss == "l1" else jnp.mean(err ** 2)
  loss = t.recon_weight * rec + t.commit_weight * aux["quantizer_loss"] + t.entropy_weight * aux["entropy_loss"]
  used = jnp.zeros((model.cfg.codebook_size,), jnp.int32).at[aux["indices"].reshape(-1)].set(1)
  metrics = {"loss": loss, "recon": rec, "quantizer_loss": aux["quantizer_loss"], "entropy_loss": aux["entropy_loss"],
             "psnr": psnr(images, recon).mean(), "codes_used": used.sum()}
  return loss, metrics


def init_state(cfg: mv.MagvitConfig, optimizer: optax.GradientTransformation, seed: int) -> dict:
  params = jax.tree.map(jnp.asarray, mv.init_params(cfg, seed))
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


STEP_KEYS = ("steps", "learning_rate", "warmup_steps", "weight_decay", "grad_clip", "recon_loss", "recon_weight",
             "entropy_weight", "commit_weight")


def _train_key(t) -> tuple:
  """The `magvit.train` values the compiled step depends on (logging / checkpoint cadence do not recompile)."""
  return tuple((k, t[k]) for k in STEP_KEYS)


@functools.lru_cache(maxsize=8)
def _cached_step(cfg: mv.MagvitConfig, train_key: tuple, mesh) -> tuple[Callable, optax.GradientTransformation]:
  """The jitted step (and its optimizer) per architecture / training settings / mesh, so repeated runs compile once."""
  t = ml_collections.ConfigDict(dict(train_key))
  optimizer = make_optimizer(t)
  return make_train_step(mv.MagvitV2(cfg), optimizer, t, mesh), optimizer


def make_train_step(model: mv.MagvitV2, optimizer: optax.GradientTransformation, t, mesh) -> Callable:
  """Jitted `(state, images [batch, H, W, 3]) -> (state, metrics)`; batch split over BATCH_AXES, state replicated."""
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P(BATCH_AXES))

  def step(state, images):
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], model, images, t)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return jax.jit(step, in_shardings=(replicated, batch), out_shardings=(replicated, replicated), donate_argnums=0)


def make_reconstruct(model: mv.MagvitV2) -> Callable:
  """Jitted `(params, images [b, H, W, 3]) -> (reconstruction [b, H, W, 3], indices [b, h*w])` via encode/decode."""

  def run(params, images):
    indices = model.apply({"params": params}, images, method="get_code")
    side = images.shape[1] // model.cfg.downsample_factor
    return model.apply({"params": params}, indices, (side, images.shape[2] // model.cfg.downsample_factor),
                       method="decode_code"), indices

  return jax.jit(run)


def reconstruct(params: Any, model: mv.MagvitV2, images: np.ndarray, batch: int = 64) -> np.ndarray:
  """Round trip through discrete codes, batched: float [n, H, W, 3] in [-1, 1] -> float32 [n, H, W, 3]."""
  fn = make_reconstruct(model)
  out = []
  for i in range(0, len(images), batch):
    chunk = images[i:i + batch]
    pad = batch - len(chunk) if len(images) > batch else 0  # one compiled shape for every chunk
    recon, _ = fn(params, jnp.asarray(np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])))
    out.append(np.asarray(recon)[:len(chunk)])
  return np.concatenate(out)


# ----------------------------------------------------------------------------------------------------------------------
# Data: ToyWorld images (mmada_jax/data/toyworld.py), generated in memory


def toyworld_images(config, split: str, count: int, start: int = 0) -> tuple[np.ndarray, list[dict]]:
  """`count` ToyWorld records of `split` -> (float32 [count, S, S, 3] in [-1, 1], the records)."""
  world = tw.ToyWorld.from_config(config)
  records = [world.example(split, start + i) for i in range(count)]
  images = np.stack([r["image"] for r in records]).astype(np.float32) / np.float32(127.5) - np.float32(1.0)
  return images, records


class _Batches:
  """Endless shuffled batches over an in-memory image array; the position is a pure function of the step."""

  def __init__(self, images: np.ndarray, batch_size: int, seed: int):
    self.images, self.batch_size, self.seed = images, batch_size, seed

  def __call__(self, step: int) -> np.ndarray:
    n, per_epoch = len(self.images), max(1, len(self.images) // self.batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([self.seed, epoch]).permutation(n)
    idx = perm[k * self.batch_size:(k + 1) * self.batch_size]
    if len(idx) < self.batch_size:  # fewer images than one batch: sample with replacement
      idx = np.random.default_rng([self.seed, step]).integers(0, n, self.batch_size)
    return self.images[idx]


# ----------------------------------------------------------------------------------------------------------------------
# The loop


def _batch_shards(mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))


def _manager(workdir: str, t) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=t.keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "state")), options=options)


def train(config, workdir: str, *, images: np.ndarray | None = None, log: Callable[[str], None] = print,
          devices=None, stop_after: int | None = None) -> dict:
  """Trains the tokenizer of `config.magvit` for `magvit.train.steps` steps, resuming from `workdir/state`.

  Args:
    images: float32 [n, S, S, 3] in [-1, 1]; default: the first `data.toyworld.num_train` ToyWorld train images.
    stop_after: end after this step (checkpointed) as an interruption would; a later call resumes the same schedule.
  Returns:
    {"params", "state_step", "metrics" (last logged), "seconds"}; final parameters also saved to `workdir/params`.
  """
  cfg, t = mv.MagvitConfig.from_config(config.magvit), config.magvit.train
  mesh = mesh_lib.create_mesh(config.sharding, devices)
  if t.batch_size % _batch_shards(mesh):
    raise ValueError(f"magvit.train.batch_size={t.batch_size} is not divisible by the {_batch_shards(mesh)} batch "
                     f"shards of the mesh {dict(mesh.shape)}")
  if images is None:
    images, _ = toyworld_images(config, "train", int(config.data.toyworld.num_train))
  if images.shape[1] % cfg.downsample_factor or images.shape[2] % cfg.downsample_factor:
    raise ValueError(f"images of {images.shape[1]}x{images.shape[2]} px are not divisible by the downsampling factor "
                     f"{cfg.downsample_factor} of magvit.encoder_channel_mult")
  step_fn, optimizer = _cached_step(cfg, _train_key(t), mesh)
  batches = _Batches(images, t.batch_size, int(config.seed))
  manager = _manager(workdir, t)
  state = init_state(cfg, optimizer, int(config.seed))
  if manager.latest_step() is not None:
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
    log(f"resumed from step {int(state['step'])}")
  state = jax.device_put(state, NamedSharding(mesh, P()))
  metrics, start, t0 = {}, int(state["step"]), time.time()
  end = min(t.steps, stop_after) if stop_after else t.steps
  for step in range(start, end):
    state, m = step_fn(state, batches(step))
    done = step + 1
    if done % t.log_every == 0 or done == t.steps:
      metrics = {k: float(v) for k, v in m.items()}
      log(f"step {done}/{t.steps} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()) +
          f" ({(time.time() - t0) / max(1, done - start):.3f} s/step)")
    if done % t.checkpoint_every == 0 or done == end:
      manager.save(done, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()
  params = jax.device_get(state["params"])
  save_trained_params(os.path.join(workdir, "params"), params, cfg, int(state["step"]))
  return {"params": params, "state_step": int(state["step"]), "metrics": metrics, "seconds": time.time() - t0}


def save_trained_params(path: str, params: Any, cfg: mv.MagvitConfig, step: int) -> None:
  """Writes a `kind: "magvit"` parameter checkpoint (readable by convert.magvit.load_magvit / export_magvit)."""
  meta = {"kind": "magvit", "magvit": {**cfg.arch_dict(), **conv.structure_of(cfg)},
          "source": {"format": "trained", "step": step}, "export": {}}
  ckpt.save_params(path, params, meta, overwrite=True)


def evaluate(config, params: Any, *, count: int | None = None, out_png: str | None = None) -> dict:
  """Held-out ToyWorld test images: PSNR of the code round trip, checker pass rates on originals vs reconstructions.

  Returns {"psnr", "scene_acc_original", "scene_acc_recon", "ratio", "codes_used", "count"}.
  """
  cfg = mv.MagvitConfig.from_config(config.magvit)
  count = count or int(config.magvit.train.eval_images)
  images, records = toyworld_images(config, "test", count)
  model = mv.MagvitV2(cfg)
  recon = reconstruct(params, model, images)
  _, indices = make_reconstruct(model)(params, jnp.asarray(images[:64]))
  rec_u8, orig_u8 = image_io.to_uint8(recon), np.stack([r["image"] for r in records])
  grid = int(records[0]["grid"])
  ok_orig = [checkers.check_scene(o, tw.objects_of(r), grid) for o, r in zip(orig_u8, records)]
  ok_rec = [checkers.check_scene(x, tw.objects_of(r), grid) for x, r in zip(rec_u8, records)]
  if out_png:
    image_io.save_grid(image_io.side_by_side(images[:16], recon[:16]), out_png, nrow=8)
  acc_o, acc_r = float(np.mean(ok_orig)), float(np.mean(ok_rec))
  return {"psnr": float(np.asarray(psnr(jnp.asarray(images), jnp.asarray(recon))).mean()),
          "scene_acc_original": acc_o, "scene_acc_recon": acc_r, "ratio": acc_r / acc_o if acc_o else float("nan"),
          "codes_used": int(len(np.unique(np.asarray(indices)))), "count": count}
