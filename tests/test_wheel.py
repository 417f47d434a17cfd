"""A built wheel ships the experiments: installed into a clean virtual environment (no network: its dependencies
come from the running interpreter's site-packages through a .pth file), ``attnlab train --gin_file
experiments/smoke_tiny.gin`` works from a directory that is not the repository."""

import os
import shutil
import site
import subprocess
import sys
import venv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("attnlab", "kernels_pallas", "experiments", "pyproject.toml", "setup.py", "README.md")


def _run(cmd, **kwargs):
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)
  assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
  return out


def test_wheel_installs_and_trains_from_the_packaged_experiments(tmp_path):
  src = tmp_path / "src"  # a copy, so the build leaves nothing in the repository
  for name in SOURCES:
    path = os.path.join(ROOT, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
      shutil.copy(path, src / name)
  _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
        str(src)])
  (wheel,) = (tmp_path / "dist").glob("attnlab-*.whl")

  env_dir = tmp_path / "env"
  venv.create(env_dir, with_pip=False)
  python = env_dir / "bin" / "python"
  _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)])
  env_site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
  # The dependencies, not attnlab: a .pth line adds a directory but runs none of its .pth files (so the dev venv's
  # editable finder stays out), and the environment's own site-packages come first.
  with open(os.path.join(env_site, "dev_dependencies.pth"), "w") as f:
    f.write("\n".join(site.getsitepackages()) + "\n")

  run_dir = tmp_path / "elsewhere"
  run_dir.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  where = _run([str(python), "-c", "import attnlab; from attnlab.configs import resolve_path; "
                "print(attnlab.__file__); print(resolve_path('experiments/sinks'))"], cwd=run_dir, env=env)
  attnlab_file, sweep_dir = where.stdout.split()
  assert attnlab_file.startswith(env_site), attnlab_file
  assert sweep_dir.startswith(env_site) and os.path.isdir(sweep_dir), sweep_dir

  train = _run([str(env_dir / "bin" / "attnlab"), "train", "--gin_file", "experiments/smoke_tiny.gin", "--workdir",
                "W", "--gin.TrainConfig.steps=2", "--gin.TrainConfig.eval_at_end=False"], cwd=run_dir, env=env)
  assert "finished at step 2" in train.stdout
  assert (run_dir / "W" / "checkpoints" / "2").is_dir()
