"""The cluster entry: the README's `ray job submit` recipe, run word for word against a
`ray start --head` cluster on this machine, from a fresh copy of the repository, as a user
would run it after `make install`.

The recipe is read from the README code block that follows RECIPE_MARKER, so the README and
this test cannot drift apart. The test appends only `--set` overrides that shorten the run
(iterations, group size, steps); paths, working dir and runtime environment are the README's.
"""

import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from spatialrl.actors.local_cluster import LocalRayHead

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
README = REPO / "README.md"
RECIPE_MARKER = "<!-- tests/test_ray_job_submit.py runs the next block word for word -->"
# Appended to the recipe so that the job takes about a minute, not the config's 60 iterations.
SHORTER = ["--set", "iterations=2", "--set", "eval_every=1", "--set", "checkpoint_every=0",
           "--set", "prompts.prompts_per_iteration=2", "--set", "grpo.group_size=4",
           "--set", "grpo.top_k=1", "--set", "sampling.num_steps=4",
           "--set", "prompts.num_eval_prompts=2"]


def readme_recipe() -> str:
    """The bash block after RECIPE_MARKER, as written."""
    text = README.read_text()
    assert text.count(RECIPE_MARKER) == 1, "README.md must mark exactly one job-submit recipe"
    match = re.match(r"\s*```bash\n(.*?)```", text.split(RECIPE_MARKER, 1)[1], re.S)
    assert match, "the marker must be followed by a ```bash block"
    return match.group(1)


def recipe_words() -> list[str]:
    """The recipe as the words bash would pass, without expanding anything."""
    return shlex.split(readme_recipe().replace("\\\n", " "), comments=True)


def overridden_keys(words: list[str]) -> dict[str, str]:
    return dict(words[i + 1].split("=", 1) for i, word in enumerate(words) if word == "--set")


def test_readme_recipe_is_one_job_submit_of_the_local_config():
    words = recipe_words()
    assert words[:5] == ["ray", "job", "submit", "--working-dir", "."]
    assert words[words.index("--"):][:4] == ["--", "spatialrl", "train", "--config"]
    assert words[words.index("--config") + 1] == "configs/local.yaml"
    # One command: no second command, no `&&` or `;` hidden in the block.
    assert not {"&&", ";", "|", "ray"} & set(words[1:])


def test_readme_recipe_overrides_every_git_ignored_path_of_the_local_config():
    """`--working-dir .` uploads what git does not ignore, and the driver runs in Ray's copy of
    it: a relative path to an ignored folder is missing there, and a relative
    output (runs/, mlflow.db) would be written into the throw-away copy. The recipe must give
    each such key an absolute path."""
    config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    local_paths = {
        "model.pretrained": config["model"]["pretrained"],
        "reward.spatialscore_path": config["reward"]["spatialscore_path"],
        "output_dir": config["output_dir"],
        "mlflow.tracking_uri": config["mlflow"]["tracking_uri"].removeprefix("sqlite:///"),
    }
    ignored = subprocess.run(["git", "check-ignore", "--no-index", *local_paths.values()],
                             cwd=REPO, capture_output=True, text=True).stdout.split()
    assert ignored, "configs/local.yaml names no git-ignored path: update this test"
    overrides = overridden_keys(recipe_words())
    for key, path in local_paths.items():
        if path in ignored:
            assert key in overrides, f"the recipe must set {key} (config: {path}, git-ignored)"
            assert "$PWD/" in overrides[key], f"{key} must be absolute: {overrides[key]}"


def fresh_copy_of_repository(dest: Path) -> Path:
    """What a clone holds: tracked files and new files git does not ignore (no .venv, runs/,
    tiny-models/, mlflow.db)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, check=True, capture_output=True).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture
def head_node():
    """A one-node cluster with token authentication (RAY_AUTH_MODE=token); its processes find
    `spatialrl` on PATH, as after `source .venv/bin/activate` or in a cluster image."""
    head = LocalRayHead(num_cpus=2, host="127.0.0.1", dashboard=True, env={
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)})
    try:
        head.start()
        yield head.dashboard_address, head.env
    finally:
        head.shutdown()


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.slow
def test_readme_job_submit_recipe_runs_word_for_word(head_node, tmp_path):
    address, env = head_node
    clone = fresh_copy_of_repository(tmp_path / "clone")
    script = readme_recipe().rstrip() + " " + shlex.join(SHORTER) + "\n"
    job = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", script], cwd=clone,
        env={**env, "RAY_ADDRESS": address, "PWD": str(clone)},
        capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr

    # The run's database and outputs are in the user's folder, not in Ray's working-dir copy.
    tracking_uri = f"sqlite:///{clone / 'mlflow.db'}"
    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs(client.get_experiment_by_name("spatialrl-local").experiment_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["backend"] == "ray"
    # The shipped models travel with the working directory (they are in the repository).
    assert run.data.params["model.pretrained"] == "models/shapes-flux"
    assert run.data.params["reward.spatialscore_path"] == "models/spatialscore-shapes"
    history = client.get_metric_history(run.info.run_id, "policy/version")
    assert [m.value for m in history] == [1.0, 2.0]
    (output,) = (clone / "runs" / "job").iterdir()
    assert run.data.params["output_dir"] == str(output)
    assert (output / "checkpoints" / "iteration-000001" / "run_state.json").is_file()
