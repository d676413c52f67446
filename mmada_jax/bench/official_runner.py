"""Times the official MMaDA PyTorch code on a bench workload; run by `mmada_jax.bench.official` in a separate Python
that has torch (never imported by mmada-jax itself, and it imports nothing from mmada-jax).

  python official_runner.py SPEC.json

SPEC: {"checkout": official repository (Gen-Verse/MMaDA), "config": MMadaConfig dict, "weights": .npz of the official
state dict, "inputs": .npz, "workload": "train" | "generate", "repeats", "warmup", "threads", "out": result .json,
plus "lr", "betas", "weight_decay", "eps" (train) or "gen_length", "block_length", "steps", "mask_id" (generate)}.
The official modules are imported from the checkout at run time; the train step follows the workload described in
the shared fixtures README (logits = model(noisy ids); Σ masked CE / p_mask ÷ (B·L); backward; AdamW step;
zero_grad(set_to_none=True)).
"""

import json
import os
import sys
import time


def _model(spec):
  import numpy as np
  import torch

  sys.path.insert(0, os.path.abspath(spec["checkout"]))
  from models import MMadaConfig, MMadaModelLM  # the official code, from the user's checkout

  model = MMadaModelLM(MMadaConfig(**spec["config"]))
  weights = np.load(spec["weights"])
  state = {k: torch.from_numpy(np.ascontiguousarray(weights[k])) for k in weights.files}
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if "rotary" not in k]
  if missing or unexpected:
    raise SystemExit(f"official model: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
  return model.float()


def _time(fn, repeats, warmup):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def run_train(spec, model, inputs):
  import torch
  import torch.nn.functional as F

  noisy = torch.from_numpy(inputs["noisy"]).long()
  clean = torch.from_numpy(inputs["clean"]).long()
  p_mask = torch.from_numpy(inputs["p_mask"]).float()
  masked = noisy == int(spec["mask_id"])
  b, length = noisy.shape
  opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=tuple(spec["betas"]),
                          weight_decay=spec["weight_decay"], eps=spec["eps"])
  model.train()
  losses = []

  def step():
    logits = model(noisy).logits
    ce = F.cross_entropy(logits.reshape(b * length, -1), clean.reshape(-1), reduction="none").reshape(b, length)
    loss = (ce * masked / p_mask[:, None]).sum() / (b * length)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss))

  times = _time(step, spec["repeats"], spec["warmup"])
  return {"times_s": times, "first_loss": losses[0], "last_loss": losses[-1]}


def run_generate(spec, model, inputs):
  import numpy as np
  import torch

  import generate as official_generate  # generate.py at the checkout root

  model.eval()
  out = {}
  for name in sorted(k for k in inputs.files if k.startswith("prompt_b")):
    prompt = torch.from_numpy(inputs[name]).long()
    result = {}

    def call():
      with torch.no_grad():
        result["x"] = official_generate.generate(model, prompt, steps=spec["steps"], gen_length=spec["gen_length"],
                                                 block_length=spec["block_length"], temperature=0.0, cfg_scale=0.0,
                                                 remasking="low_confidence", mask_id=int(spec["mask_id"]))

    times = _time(call, spec["repeats"], spec["warmup"])
    out[name[len("prompt_b"):]] = {"times_s": times, "tokens": np.asarray(result["x"]).tolist()}
  return out


def main(argv):
  spec = json.load(open(argv[0]))
  import numpy as np
  import torch

  torch.manual_seed(0)
  if spec.get("threads"):
    torch.set_num_threads(int(spec["threads"]))
  model = _model(spec)
  inputs = np.load(spec["inputs"])
  fn = {"train": run_train, "generate": run_generate}[spec["workload"]]
  result = fn(spec, model, inputs)
  result["env"] = {"torch": torch.__version__, "torch_num_threads": torch.get_num_threads(),
                   "python": sys.version.split()[0]}
  with open(spec["out"], "w") as f:
    json.dump(result, f)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
