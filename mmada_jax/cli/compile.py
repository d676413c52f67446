"""`mmada-jax compile --config FILE --topology v5p-64`: compiles the train step (or the UniGRPO step) for a Cloud TPU
topology from this host (needs libtpu) and reports per-chip memory, XLA's step-time estimate and MFU. Exit status 3:
the program does not fit in HBM."""

from __future__ import annotations

import json

import jax

from mmada_jax.cli import common
from mmada_jax.parallel import aot


def _parser():
  p = common.parser("compile", "Compile the train step or the UniGRPO step for a Cloud TPU topology from this host "
                               "(needs libtpu) and report per-chip memory, XLA's step-time estimate and MFU. "
                               "Exit status 3: does not fit.")
  p.add_argument("--topology", required=True, help="e.g. v4-32, v5e-16, v5p-128, v6e-256")
  p.add_argument("--num_slices", type=int, default=1, help="multislice: number of slices joined over DCN")
  p.add_argument("--step", choices=("train", "rl"), default="train",
                 help="train: the masked-denoising train step; rl: UniGRPO's policy step and log-prob precompute "
                      "(shapes from the config's rl section)")
  p.add_argument("--estimate", action="store_true",
                 help="also estimate the step time and MFU of the configured depth from XLA's cost model, "
                      "extrapolated from 1- and 2-layer unrolled copies (two more, smaller compiles)")
  return p


def _rounded(values: dict) -> dict:
  return {k: float(f"{v:.5g}") if isinstance(v, float) else v for k, v in values.items()}


def main(argv: list[str]) -> int:
  cfg = common.ConfigArgs(argv)
  args = _parser().parse_args(cfg.rest)
  config = cfg.load()
  devices, chip = aot.tpu_devices(args.topology, args.num_slices)
  print(f"{args.topology} x {args.num_slices} slice(s): {len(devices)} chips ({devices[0].device_kind}), "
        f"{chip.hbm_gib:g} GiB HBM each; preset {config.sharding.preset!r}; {args.step} step", flush=True)
  compile_fn = aot.compile_rl_step if args.step == "rl" else aot.compile_train_step
  try:
    programs, facts = compile_fn(config, devices)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    print(json.dumps({"fits": False, "error": str(e).splitlines()[0]}))
    print(f"DOES NOT FIT: {str(e).splitlines()[0]}")
    return 3
  reports = [aot.report(program, chip, len(devices)) for program in programs]
  for program, rep in zip(programs, reports):
    _print_report(program, rep, facts)
  if args.estimate:
    _print_estimates(aot.extrapolated_estimate(config, devices, args.step, programs, chip), config)
  elif "estimated_mfu" not in reports[0]:
    print("XLA's cost model counts a loop body once; for a step-time / MFU estimate of the configured depth add "
          "--estimate")
  return 0 if all(rep["fits"] for rep in reports) else 3


def _print_report(program, rep: dict, facts: dict) -> None:
  print(json.dumps({"mesh": facts["mesh"], **_rounded(rep)}))
  verdict = "fits" if rep["fits"] else "DOES NOT FIT"
  extra = f", other resident buffers {rep['resident_gib']:.2f}" if rep["resident_gib"] else ""
  print(f"{program.name}: {verdict}: {rep['total_gib']:.2f} of {rep['hbm_gib']:g} GiB per chip (arguments "
        f"{rep['arguments_gib']:.2f}, temporaries {rep['temporaries_gib']:.2f}{extra})")
  if "estimated_mfu" in rep:
    print(f"  XLA cost model: {rep['xla_estimated_step_s']:.3f} s/step, MFU {rep['estimated_mfu']:.1%}")


def _print_estimates(estimates, config) -> None:
  for est in estimates:
    print(json.dumps(_rounded(est)))
    if "estimated_mfu" in est:
      print(f"{est['program']}: XLA cost model extrapolated to {config.model.num_layers} layers: "
            f"{est['extrapolated_step_s']:.3f} s/step, MFU {est['estimated_mfu']:.1%} (an optimistic bound: "
            "XLA's estimate of an ideal schedule, not a measurement)")
    else:
      print(f"{est['program']}: no estimate (its unrolled copies still loop)")
