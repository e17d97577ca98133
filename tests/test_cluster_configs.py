"""cluster/: the autoscaler config and KubeRay manifests pass Ray's own validation and offer
every resource the trainer's cluster config asks for. No cloud credentials, no network."""

from __future__ import annotations

import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from spatialrl.cli import main
from spatialrl.cluster_fit import check_placement, node_types, peak_bundles
from spatialrl.commands.cluster import autoscaling_config
from spatialrl.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
AWS = REPO / "cluster" / "aws.yaml"
GCP = REPO / "cluster" / "gcp.yaml"
RAYCLUSTER = REPO / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB = REPO / "cluster" / "kuberay" / "rayjob.yaml"
CLUSTER_CONFIG = REPO / "configs" / "flux-dev-cluster.yaml"
CLUSTER_FILES = [AWS, GCP, RAYCLUSTER]
ROLE_RESOURCES = {"rollout": "rollout_node", "reward": "reward_node", "learner": "learner_node"}


@pytest.fixture(scope="module")
def cfg():
    return load_config(CLUSTER_CONFIG)


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize(("path", "provider"), [(AWS, "aws"), (GCP, "gcp")], ids=["aws", "gcp"])
def test_ray_up_config_passes_ray_schema_validation(path, provider):
    config = autoscaling_config(path)  # prepare_config + validate_config, as `ray up`
    assert config["provider"]["type"] == provider
    assert config["head_node_type"] == "head"
    assert config["idle_timeout_minutes"] > 0
    assert ("pip install --quiet -c /home/ray/spatialrl/constraints.txt /home/ray/spatialrl"
            in config["worker_setup_commands"])  # the tested versions of constraints.txt
    for name, spec in config["available_node_types"].items():
        assert spec["min_workers"] == 0, f"{name}: the run starts with the head node only"


def test_gcp_gpu_nodes_stop_for_maintenance_and_only_the_learner_is_on_demand():
    types = autoscaling_config(GCP)["available_node_types"]
    for role in ROLE_RESOURCES:
        scheduling = types[role]["node_config"]["scheduling"]
        # Compute Engine refuses to create a GPU VM that would live-migrate.
        assert scheduling["onHostMaintenance"] == "TERMINATE", role
        spot = scheduling.get("provisioningModel") == "SPOT"
        assert spot == (role != "learner"), f"{role}: spot {spot}"
    machines = {role: types[role]["node_config"]["machineType"] for role in ROLE_RESOURCES}
    assert len(set(machines.values())) == 3, machines


def test_ray_schema_validation_is_not_vacuous(tmp_path):
    broken = load_yaml(AWS)
    broken["available_node_types"]["rollout"]["resources"]["GPU"] = 0.5  # must be integer
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(jsonschema.ValidationError, match="integer"):
        autoscaling_config(path)


def test_raycluster_is_a_sane_autoscaling_kuberay_manifest():
    manifest = load_yaml(RAYCLUSTER)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayCluster"
    spec = manifest["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == set(ROLE_RESOURCES)
    for role, group in groups.items():
        assert group["minReplicas"] == 0 < group["maxReplicas"]
        assert ROLE_RESOURCES[role] in group["rayStartParams"]["resources"]
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no actor on the head
    pods = [g["template"]["spec"] for g in [head, *groups.values()]]
    images = {container["image"] for pod in pods for container in pod["containers"]}
    assert len(images) == 1, f"one image for every pod, got {images}"


def test_raycluster_translates_with_the_kuberay_autoscaler_code():
    # The translation the autoscaler sidecar runs on the head; it validates the result.
    config = autoscaling_config(RAYCLUSTER)
    types = {t.name: t for t in node_types(config)}
    for role, resource in ROLE_RESOURCES.items():
        assert types[role].resources[resource] >= 1


def test_rayjob_runs_the_trainer_on_the_raycluster(cfg):
    job = load_yaml(RAYJOB)
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    cluster_name = load_yaml(RAYCLUSTER)["metadata"]["name"]
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster_name}
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:4] == ["spatialrl", "train", "--config", "configs/flux-dev-cluster.yaml"]
    assert (REPO / words[3]).is_file()
    overrides = [words[i + 1] for i, word in enumerate(words) if word == "--set"]
    assert not any("$" in o for o in overrides), "no shell variables (see rayjob.yaml)"
    # The overrides name real keys and valid values: the config loads with them.
    loaded = load_config(REPO / words[3], overrides)
    assert loaded.cluster.wait_for_autoscaler is True
    assert loaded.output_dir.startswith("/mnt/spatialrl/")


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_every_requested_custom_resource_is_offered(cfg, path):
    types = node_types(autoscaling_config(path))
    offered = {name for t in types for name in t.resources}
    requested = {name for bundles in peak_bundles(cfg).values() for b in bundles for name in b}
    assert requested - offered == set()
    check_placement(cfg, types)  # and enough of it, with the GPUs and CPUs alongside


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_role_node_types_advertise_one_unit_per_gpu(cfg, path):
    types = node_types(autoscaling_config(path))
    for role, resource in ROLE_RESOURCES.items():
        (node,) = [t for t in types if resource in t.resources]
        assert node.resources[resource] == node.resources["GPU"], node
        per_worker = peak_bundles(cfg)[role][0]
        assert node.resources["GPU"] >= per_worker["GPU"]
        assert node.resources["CPU"] >= per_worker["CPU"] * node.resources[resource]


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.name)
def test_a_resource_no_node_type_offers_is_caught(path):
    cfg = load_config(CLUSTER_CONFIG, ["learner.custom_resources={learner_h200_node: 1}"])
    with pytest.raises(ConfigError, match="learner: no node type offers learner_h200_node"):
        check_placement(cfg, node_types(autoscaling_config(path)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learner.num_workers=24"], r"learner: 24 bundles .* do not fit"),
        (["rollout.gpus_per_actor=8"], r"rollout: no node type has room for one bundle"),
        (["reward.serving.autoscaling.max_replicas=64"], r"reward: 64 bundles"),
    ],
)
def test_too_little_room_is_caught(overrides, message):
    cfg = load_config(CLUSTER_CONFIG, overrides)
    with pytest.raises(ConfigError, match=message):
        check_placement(cfg, node_types(autoscaling_config(AWS)))


def test_head_type_counts_its_node_and_global_max_bounds_workers():
    config = {
        "max_workers": 3,
        "head_node_type": "head",
        "available_node_types": {
            "head": {"resources": {"CPU": 4, "learner_node": 1}},
            "gpu": {"resources": {"CPU": 8, "GPU": 1}, "max_workers": 10},
        },
    }
    assert {t.name: t.max_nodes for t in node_types(config)} == {"head": 1, "gpu": 3}


def test_cluster_check_cli(capsys, tmp_path):
    assert main(["cluster-check", "--config", str(CLUSTER_CONFIG), str(AWS), str(RAYCLUSTER)]) == 0
    out = capsys.readouterr().out
    assert f"{AWS}: holds" in out and f"{RAYCLUSTER}: holds" in out

    assert main(["cluster-check", "--config", str(CLUSTER_CONFIG), str(RAYJOB)]) == 2
    assert "not a RayCluster" in capsys.readouterr().err

    small = load_yaml(AWS)
    small["available_node_types"]["rollout"]["max_workers"] = 1
    path = tmp_path / "small.yaml"
    path.write_text(yaml.safe_dump(small))
    assert main(["cluster-check", "--config", str(CLUSTER_CONFIG), str(path)]) == 2
    assert "rollout: 16 bundles" in capsys.readouterr().err


def test_dockerfile_copies_what_exists():
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    copied = [
        part for line in dockerfile.splitlines() if line.startswith("COPY")
        for part in line.split()[1:-1] if not part.startswith("--")
    ]
    assert copied and all((REPO / part).exists() for part in copied), copied
    ignore = (REPO / "cluster" / "Dockerfile.dockerignore").read_text().split()
    assert all(f"!{part}" in ignore for part in copied)



def test_the_kontext_editing_config_fits_every_cluster_file(capsys):
    kontext = REPO / "configs" / "flux-kontext-dev-cluster.yaml"
    cfg = load_config(kontext)
    assert (cfg.model.pretrained, cfg.prompts.task, cfg.reward.kind) == (
        "black-forest-labs/FLUX.1-Kontext-dev", "edit", "spatialreward")
    cfg.reward.check_ready()  # the options are SpatialRewardConfig fields
    assert main(["cluster-check", "--config", str(kontext), *map(str, CLUSTER_FILES)]) == 0
    assert capsys.readouterr().out.count(": holds") == len(CLUSTER_FILES)
