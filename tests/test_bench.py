"""`mmada-jax bench`: every workload runs at tiny sizes and reports the documented fields; `--json` parses; the
official-comparison plumbing checks its inputs (a real side-by-side run needs torch and a checkout:
MMADA_OFFICIAL_DIR + MMADA_OFFICIAL_PYTHON). No test asserts a timing."""

import json
import os

import jax
import numpy as np
import pytest

from mmada_jax.bench import common, official, workloads
from mmada_jax.cli import bench as cli

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(os.path.dirname(HERE), "experiments", "tiny.py")
RL_SMALL = ["--config.rl.prompt_len=8", "--config.rl.gen_length=8", "--config.rl.block_length=8",
            "--config.rl.rollout_steps=8"]
ARGS = {
    "train": ["--batch_size", "2", "--seq_len", "16"],
    "generate": ["--batch", "1,2", "--prompt_len", "4", "--gen_length", "8", "--block_length", "4", "--steps", "4",
                 "--variants", "exact,dual_cache", "--threshold", "0.5"],
    "t2i": ["--config.sampling.image.timesteps=2"],
    "rl": RL_SMALL,
    "magvit": [],
}
CASE_FIELDS = ("name", "median_s", "min_s", "max_s", "times_s", "compile_s", "memory", "tokens_per_s")


def _run(workload: str, *extra: str) -> dict:
  argv = [workload, "--config", TINY, "--repeats", "2", "--warmup", "0", "--json", *ARGS[workload], *extra]
  return cli.run(argv, log=lambda msg: None)


@pytest.mark.parametrize("workload", sorted(ARGS))
def test_workload_report(workload):
  report = _run(workload)
  assert report["workload"] == workload and report["repeats"] == 2
  assert report["rss_peak_bytes"] > 0 and report["env"]["platform"] == "cpu"
  assert report["peak"]["flops_per_s"] > 0 and "measured" in report["peak"]["source"]
  assert report["cases"]
  for case in report["cases"]:
    for field in CASE_FIELDS:
      assert field in case, (workload, case["name"], field)
    assert len(case["times_s"]) == 2 and case["min_s"] <= case["median_s"] <= case["max_s"]
    assert case["memory"].get("peak_estimate", 0) > 0
    assert case["achieved_flops_per_s"] > 0 and case["mfu"] > 0
  json.dumps(report)  # serialisable


def test_train_report_fields():
  case = _run("train")["cases"][0]
  assert case["name"] == "train_b2x16"
  assert 0 < case["masked_fraction"] < 1 and case["useful_flops_per_call"] < case["flops_per_call"]
  assert np.isfinite(case["first_loss"]) and np.isfinite(case["last_loss"])


def test_generate_variants_and_token_match():
  cases = {(c["variant"], c["batch"]): c for c in _run("generate")["cases"]}
  assert set(cases) == {(v, b) for v in ("exact", "dual_cache", "threshold=0.5") for b in (1, 2)}
  for (variant, _), c in cases.items():
    assert 0.0 <= c["tokens_match_exact"] <= 1.0
    if variant == "exact":
      assert c["tokens_match_exact"] == 1.0 and c["model_calls"] == 4


def test_main_prints_json(capsys):
  argv = ["magvit", "--config", TINY, "--repeats", "1", "--warmup", "0", "--json"]
  assert cli.main(argv) == 0
  report = json.loads(capsys.readouterr().out)
  assert [c["name"] for c in report["cases"]] == ["encode_b1", "decode_b1"]


def test_main_prints_summary(capsys):
  assert cli.main(["magvit", "--config", TINY, "--repeats", "1", "--warmup", "0"]) == 0
  out = capsys.readouterr().out
  assert "encode_b1: median" in out and "MFU" in out and "peak RSS" in out


def test_bad_input_errors(tmp_path):
  with pytest.raises(common.BenchError, match="--official applies to train, generate"):
    cli.run(["rl", "--config", TINY, "--official", str(tmp_path)], log=lambda m: None)
  with pytest.raises(common.BenchError, match="not a Gen-Verse/MMaDA checkout"):
    official.check_checkout(str(tmp_path))
  with pytest.raises(common.BenchError, match="no such file"):
    cli.run(["train", "--config", str(tmp_path / "missing.py")], log=lambda m: None)
  with pytest.raises(ValueError, match="unknown variant 'fast'"):
    _run("generate", "--variants", "fast")


def test_official_config_and_weights(tmp_path):
  """The official MMadaConfig dictionary has the fixtures' keys; exported weights have the official names/shapes."""
  from mmada_jax import config as config_lib
  from mmada_jax.models import llada

  config = config_lib.load_config(TINY)
  cfg = official.official_config(config)
  fixture = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "fixtures", "baseline-official-cpu-1.json")
  if os.path.exists(fixture):  # every field of the config the official baseline was timed with
    with open(fixture) as f:
      assert set(json.load(f)["model_config"]) <= set(cfg)
  assert cfg["d_model"] == 64 and cfg["mask_token_id"] == 230 and cfg["block_type"] == "llama"
  model = llada.build_model(config.model)
  params = llada.init_params(model, jax.random.key(0))
  path = str(tmp_path / "w.npz")
  official.export_weights(params, config, path)
  w = np.load(path)
  assert w["model.transformer.wte.weight"].shape == (300, 64)
  assert w["model.transformer.blocks.0.q_proj.weight"].shape == (64, 64)
  assert w["model.transformer.ff_out.weight"].shape == (300, 64)


def test_train_inputs_follow_the_fixture_recipe():
  host = workloads.train_inputs(8, 256, 31000, 1e-3, 0)
  assert host["clean"].max() < 31000 and host["clean"].min() >= 0
  masked = host["noisy"] == 31000
  assert np.array_equal(np.where(masked, host["clean"], host["noisy"]), host["clean"])
  assert np.all((host["p_mask"] >= 1e-3) & (host["p_mask"] <= 1.0))
  assert abs(masked.mean(axis=1) - host["p_mask"]).max() < 0.15


@pytest.mark.skipif(not (os.environ.get("MMADA_OFFICIAL_DIR") and os.environ.get("MMADA_OFFICIAL_PYTHON")),
                    reason="needs MMADA_OFFICIAL_DIR (Gen-Verse/MMaDA checkout) and MMADA_OFFICIAL_PYTHON (with torch)")
def test_official_side_by_side_tiny():
  """Both sides run on the tiny model: same first loss, and the exact sampler's tokens equal the official ones."""
  report = _run("train", "--official", os.environ["MMADA_OFFICIAL_DIR"], "--rounds", "1")
  case = report["cases"][0]
  assert case["official"]["speedup"] > 0
  assert abs(case["official"]["first_loss"] - case["first_loss"]) < 1e-3 * abs(case["first_loss"])
  gen = _run("generate", "--official", os.environ["MMADA_OFFICIAL_DIR"], "--rounds", "1", "--variants", "exact")
  exact = [c for c in gen["cases"] if c["variant"] == "exact"]
  assert len(exact) == 2
  for c in exact:  # the approximate threshold variant of ARGS may differ
    assert c["official"]["tokens_match_official"] == 1.0


# ----------------------------------------------------------------------------------------------------------------------
# The optimised paths give the plain paths' outputs


def test_stacked_matmul_equals_separate_matmuls():
  import jax
  import jax.numpy as jnp

  from mmada_jax import config as config_lib
  from mmada_jax.models import layers

  args = layers.ModelArgs.from_config(config_lib.load_config(TINY).model)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 64)).astype(np.float32))
  for eq, shape in (("bld,dhk->blhk", (64, 4, 16)), ("bld,df->blf", (64, 192))):
    ws = [jnp.asarray(rng.normal(size=shape).astype(np.float32)) for _ in range(3)]
    fused = jax.jit(lambda x, ws: layers.stacked_matmul(eq, x, ws, args))(x, ws)
    for y, w in zip(fused, ws):
      np.testing.assert_allclose(np.asarray(y), np.asarray(layers.matmul(eq, x, w, args)), rtol=1e-5, atol=1e-5)
  # grouped-query attention (k/v kernels with fewer heads): three separate matmuls
  wq = jnp.asarray(rng.normal(size=(64, 4, 16)), jnp.float32)
  wk = jnp.asarray(rng.normal(size=(64, 2, 16)), jnp.float32)
  q, k, v = layers.qkv_projections(x, [wq, wk, wk], args)
  assert q.shape == (2, 5, 4, 16) and k.shape == v.shape == (2, 5, 2, 16)


@pytest.mark.parametrize("scan", [True, False])
def test_compute_params_cast_and_stack_once_is_exact(scan):
  """Inference loops prepare the weights once (cast to bf16, q/k/v and gate/up stacked): the same logits and tokens as
  casting and stacking at every use, in both layer layouts, exact and cached decoding."""
  import dataclasses

  import jax
  import jax.numpy as jnp

  from mmada_jax import config as config_lib
  from mmada_jax.diffusion import sampling_text as st
  from mmada_jax.models import llada

  config = config_lib.load_config(TINY, {"model.scan_layers": str(scan)})
  model = llada.build_model(config.model)
  bf16 = llada.Transformer(dataclasses.replace(model.args, dtype=jnp.bfloat16))
  params = llada.init_params(model, jax.random.key(0))
  for m in (model, bf16):
    prepared = llada.compute_params(params, m.args)
    assert all(x.dtype == m.args.dtype for x in jax.tree.leaves(prepared))
    attn = prepared["blocks"]["attn"] if scan else prepared["blocks_1"]["attn"]
    mlp = prepared["blocks"]["mlp"] if scan else prepared["blocks_1"]["mlp"]
    assert set(attn) == {"qkv_stacked", "attn_out"} and set(mlp) == {"gate_up_stacked", "ff_out"}
    assert attn["qkv_stacked"].shape == (2,) * scan + (64, 3, 4, 16)
    assert mlp["gate_up_stacked"].shape == (2,) * scan + (64, 2, 192)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 228, (2, 6)))
    plain = m.apply({"params": params}, ids)
    once = m.apply({"params": prepared}, ids)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(once))
    for cached in (False, True):
      settings = st.TextSampling(gen_length=8, block_length=4, steps=4, dual_cache=cached)
      a = st.generate(m, params, ids, mask_id=230, settings=settings)["tokens"]
      b = st.generate(m, prepared, ids, mask_id=230, settings=settings)["tokens"]
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    eager = jax.jit(lambda p: m.apply({"params": p}, ids, output="hidden", return_cache=True)[0])  # cached mode
    np.testing.assert_array_equal(np.asarray(eager(params)), np.asarray(eager(prepared)))


def test_stack_kernels_keeps_grouped_query_kernels():
  """k/v kernels with fewer heads than q are not stacked (three matmuls, as in training)."""
  import jax

  from mmada_jax import config as config_lib
  from mmada_jax.models import layers, llada

  config = config_lib.load_config(TINY, {"model.num_kv_heads": "2"})
  params = llada.init_params(llada.build_model(config.model), jax.random.key(0))
  attn = layers.stack_kernels(params)["blocks"]["attn"]
  assert {"q_proj", "k_proj", "v_proj"} <= set(attn) and "qkv_stacked" not in attn


def test_single_head_chunk_equals_chunked_head():
  """The bench config's one-chunk loss head (no recomputation) gives the multi-chunk head's CE."""
  import jax
  import jax.numpy as jnp

  from mmada_jax import config as config_lib
  from mmada_jax.diffusion import losses
  from mmada_jax.models import llada

  config = config_lib.load_config(TINY)
  model = llada.build_model(config.model)
  params = llada.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(4, 32, 64)).astype(np.float32))
  labels = jnp.asarray(rng.integers(0, 300, (4, 32)))
  mask = jnp.asarray(rng.uniform(size=(4, 32)) < 0.5)
  kernel = params["lm_head"]["kernel"]
  ce = {}
  for chunk in (4, 64):
    f = lambda k, chunk=chunk: jnp.sum(losses.token_ce(k, h, labels, mask, model.args, chunk=chunk, groups=1)[0])
    ce[chunk] = jax.jit(jax.value_and_grad(f))(kernel)
  np.testing.assert_allclose(float(ce[4][0]), float(ce[64][0]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(ce[4][1]), np.asarray(ce[64][1]), rtol=1e-5, atol=1e-6)
