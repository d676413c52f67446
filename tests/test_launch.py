"""The launch scripts (launch/): flags and MMADA_* environment defaults, errors, and the exact gcloud / xpk / sbatch
commands of their dry runs (they cannot run here; the command lines follow the Cloud TPU, xpk and Slurm docs)."""

import importlib.util
import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch")


def load(name: str):
  sys.path.insert(0, LAUNCH)
  try:
    spec = importlib.util.spec_from_file_location(f"launch_{name}", os.path.join(LAUNCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  finally:
    sys.path.remove(LAUNCH)


tpu, xpk, gpu = load("tpu"), load("xpk"), load("gpu_slurm")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
  for k in list(os.environ):
    if k.startswith("MMADA_"):
      monkeypatch.delenv(k)


def lines(capsys) -> list[list[str]]:
  """The printed dry-run commands, split back into arguments."""
  return [shlex.split(line) for line in capsys.readouterr().out.strip().splitlines()]


@pytest.mark.parametrize("script", ["tpu.py", "xpk.py", "gpu_slurm.py"])
def test_help(script):
  res = subprocess.run([sys.executable, os.path.join(LAUNCH, script), "--help"], capture_output=True, text=True)
  assert res.returncode == 0 and "--dry_run" in res.stdout and "MMADA_" in res.stdout, res.stderr


def test_tpu_create_single_slice_and_queued(capsys):
  tpu.main(["create", "--name", "m", "--zone", "us-east5-a", "--accelerator_type", "v5p-64", "--spot", "--dry_run"])
  tpu.main(["create", "--name", "m", "--zone", "us-east5-a", "--accelerator_type", "v6e-256", "--queued",
            "--project", "p", "--dry_run"])
  single, queued = lines(capsys)
  assert single == ["gcloud", "compute", "tpus", "tpu-vm", "create", "m", "--zone=us-east5-a",
                    "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot"]
  assert queued == ["gcloud", "compute", "tpus", "queued-resources", "create", "m", "--zone=us-east5-a",
                    "--project=p", "--accelerator-type=v6e-256", "--runtime-version=v2-alpha-tpuv6e", "--node-id=m"]


def test_tpu_multislice_uses_queued_resources_on_all_nodes(capsys, monkeypatch):
  monkeypatch.setenv("MMADA_ZONE", "us-central2-b")  # flags default to MMADA_* variables
  monkeypatch.setenv("MMADA_NAME", "ms")
  monkeypatch.setenv("MMADA_NUM_SLICES", "4")
  tpu.main(["create", "--accelerator_type", "v4-128", "--reserved", "--dry_run"])
  tpu.main(["run", "--dry_run", "--env", "XLA_FLAGS=--xla_dump_to=/tmp/d", "--", "train", "--config",
            "experiments/mmada_8b_stages.py:1.1", "--workdir", "gs://b/r"])
  tpu.main(["delete", "--dry_run"])
  create, run, delete = lines(capsys)
  assert create == ["gcloud", "compute", "tpus", "queued-resources", "create", "ms", "--zone=us-central2-b",
                    "--accelerator-type=v4-128", "--runtime-version=tpu-ubuntu2204-base", "--node-count=4",
                    "--node-prefix=ms", "--reserved"]
  assert run[:9] == ["gcloud", "compute", "tpus", "queued-resources", "ssh", "ms", "--zone=us-central2-b",
                     "--worker=all", "--node=all"]
  remote = run[9].removeprefix("--command=")
  assert remote.startswith("mkdir -p ~/mmada-logs; nohup bash -c ") and remote.endswith("> ~/mmada-logs/mmada.log "
                                                                                        "2>&1 < /dev/null &")
  job = shlex.split(remote)[6]  # the quoted job of `bash -c`
  assert job == ("export XLA_FLAGS=--xla_dump_to=/tmp/d; cd ~/mmada-jax && ~/mmada-venv/bin/python -m mmada_jax.cli "
                 "train --config experiments/mmada_8b_stages.py:1.1 --workdir gs://b/r")
  assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "ms", "--zone=us-central2-b", "--quiet",
                    "--force"]


def test_tpu_setup_and_logs(capsys):
  base = ["--name", "m", "--zone", "z", "--dry_run"]
  tpu.main(["setup", *base, "--source", "/src"])
  tpu.main(["logs", *base, "--out", "out", "--job", "j"])
  pack, copy, install, mkdir, logs = lines(capsys)
  assert pack[:3] == ["tar", "-czf", "/tmp/mmada-jax-src.tar.gz"] and pack[-3:] == ["-C", "/src", "."]
  assert copy == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "/tmp/mmada-jax-src.tar.gz", "m:~/", "--zone=z",
                  "--worker=all"]
  assert install[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "m", "--zone=z", "--worker=all"]
  assert 'pip install -q -e "~/mmada-jax[tpu]"' in install[8]
  assert mkdir == ["mkdir", "-p", "out"]
  assert logs[-2:] == ["--command=cat ~/mmada-logs/j.log", "--output-directory=out"]


@pytest.mark.parametrize("argv,message", [
    (["create", "--name", "m", "--zone", "z"], "create needs --accelerator_type"),
    (["create", "--name", "m", "--zone", "z", "--accelerator_type", "v9-8"], "unknown generation 'v9'"),
    (["create", "--name", "m", "--zone", "z", "--accelerator_type", "v5p-8", "--spot", "--reserved"], "exclude"),
    (["run", "--name", "m", "--zone", "z"], "give the mmada-jax command after `--`"),
    (["stop", "--name", "m", "--zone", "z", "--num_slices", "2"], "cannot be stopped"),
    (["run", "--name", "m", "--zone", "z", "--env", "nope", "--", "info"], "expected NAME=VALUE")])
def test_tpu_errors(argv, message):
  with pytest.raises(SystemExit, match=message):
    tpu.main([*argv, "--dry_run"])


def test_tpu_required_flags(capsys):
  with pytest.raises(SystemExit):
    tpu.main(["create", "--dry_run"])
  assert "--name" in capsys.readouterr().err


def test_xpk_cluster_and_workload(capsys):
  scope = ["--cluster", "c", "--zone", "us-east5-a", "--tpu_type", "v5p-128", "--num_slices", "2", "--dry_run"]
  xpk.main(["cluster", *scope, "--reservation", "r1"])
  xpk.main(["workload", *scope, "--workload", "w", "--max_restarts", "10", "--", "train", "--config",
            "experiments/mmada_8b_stages.py:1.1"])
  xpk.main(["workload", *scope, "--workload", "w", "--docker_image", "gcr.io/p/mmada:1", "--", "info"])
  cluster, built, prebuilt = lines(capsys)
  assert cluster == ["xpk", "cluster", "create", "--cluster=c", "--zone=us-east5-a", "--tpu-type=v5p-128",
                     "--num-slices=2", "--reservation=r1"]
  assert built[:8] == ["xpk", "workload", "create", "--cluster=c", "--zone=us-east5-a", "--workload=w",
                       "--tpu-type=v5p-128", "--num-slices=2"]
  assert "--base-docker-image=python:3.11-slim" in built and f"--script-dir={ROOT}" in built
  assert "--max-restarts=10" in built
  assert built[-1] == ("--command=pip install -q -e '.[tpu]' && python3 -m mmada_jax.cli train --config "
                       "experiments/mmada_8b_stages.py:1.1")
  assert "--docker-image=gcr.io/p/mmada:1" in prebuilt and prebuilt[-1] == "--command=python3 -m mmada_jax.cli info"


def test_xpk_errors():
  with pytest.raises(SystemExit, match="exactly one of"):
    xpk.main(["cluster", "--cluster", "c", "--zone", "z", "--tpu_type", "v5p-8", "--dry_run"])
  with pytest.raises(SystemExit, match="needs --tpu_type and --workload"):
    xpk.main(["workload", "--cluster", "c", "--zone", "z", "--dry_run", "--", "info"])


def test_gpu_slurm_batch_script(capsys, tmp_path):
  script = tmp_path / "job.sbatch"
  gpu.main(["--nodes", "4", "--partition", "a3", "--time", "24:00:00", "--venv", "/shared/venv", "--workdir",
            "/shared/mmada-jax", "--port", "23456", "--script", str(script), "--dry_run", "--", "train", "--config",
            "experiments/mmada_8b_stages.py:1.1", "--workdir", "/shared/runs/a b"])
  out = capsys.readouterr().out
  assert out.startswith("sbatch <<'EOF'\n#!/bin/bash\n") and out.rstrip().endswith("EOF")
  text = script.read_text()
  assert text in out
  for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=a3", "#SBATCH --time=24:00:00", "cd /shared/mmada-jax",
               'export MMADA_COORDINATOR="$head_node:23456"', 'export MMADA_NUM_PROCESSES="$SLURM_NNODES"'):
    assert line in text.splitlines(), line
  srun = text.strip().splitlines()[-1]
  assert srun.startswith("srun --kill-on-bad-exit=1 --ntasks=4 --ntasks-per-node=1 bash -c ")
  task = shlex.split(srun)[-1]
  assert task == ("export MMADA_PROCESS_ID=$SLURM_PROCID; exec /shared/venv/bin/python -m mmada_jax.cli train "
                  "--config experiments/mmada_8b_stages.py:1.1 --workdir '/shared/runs/a b'")
  res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
  assert res.returncode == 0, res.stderr  # the script is valid bash


def test_gpu_slurm_needs_a_command():
  with pytest.raises(SystemExit, match="give the mmada-jax command"):
    gpu.main(["--dry_run"])
