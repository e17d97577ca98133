"""SpatialScore training: the pure core (batches, shards, loss statistics), the Ray Train +
DeepSpeed trainer on 2 CPU workers with MLflow in sqlite (metrics, model artifact, resume),
and bad input."""

import dataclasses
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from spatialrl.actors.local_cluster import LocalRayHead, connected
from spatialrl.cli import main
from spatialrl.config import ConfigError, load_config
from spatialrl.data.pairs import PairFileError, decode_image, read_pairs, write_pairs
from spatialrl.data.shapes import build_shapes_pairs
from spatialrl.errors import InputError
from spatialrl.reward.loss import gaussian_bt_loss
from spatialrl.reward.model import HeadOutput
from spatialrl.reward.train_config import RewardTrainConfig
from spatialrl.reward.training import (
    batch_at,
    batches,
    load_pairs,
    pair_loss,
    step_seed,
)

LOCAL_CONFIG = "configs/reward/local.yaml"
CORRUPT_TRAIN_ROWS = 2


@pytest.fixture(scope="module")
def tiny_qwen_path(tiny_models_dir):
    return tiny_models_dir / "qwen2.5-vl"


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
    """12 train pairs (+ 2 with a corrupt image) and 6 test pairs, 1-3 perturbed relations."""
    folder = tmp_path_factory.mktemp("pairs")
    pairs = build_shapes_pairs(18, seed=3, size=64, test_fraction=1 / 3)
    corrupt = [
        dataclasses.replace(pairs.train[0], image_preferred=b"not a png", pair_id="bad-0"),
        dataclasses.replace(pairs.train[1], image_rejected=b"\x89PNG\r\n", pair_id="bad-1"),
    ]
    write_pairs(folder / "train.parquet", [*pairs.train, *corrupt])
    write_pairs(folder / "test.parquet", pairs.test)
    return folder


# ------------------------------------------------------------------------------- pure core


def ids(batch):
    return [pair.pair_id for pair in batch]


def test_batches_cover_each_epoch_once_and_depend_only_on_seed_and_step(pairs_dir):
    pairs = load_pairs(str(pairs_dir / "train.parquet"), "train").pairs
    n = len(pairs)
    assert n == 12
    run = batches(pairs, batch_size=5, seed=7)
    first = [ids(next(run)) for _ in range(6)]  # 30 positions: epochs 0, 1 and half of 2
    flat = [pair_id for batch in first for pair_id in batch]
    for epoch in range(2):
        assert sorted(flat[epoch * n : (epoch + 1) * n]) == sorted(ids(pairs))
    assert flat[:n] != flat[n : 2 * n]  # each epoch reshuffled
    # A run resumed at step 4 sees what the uninterrupted run saw from step 4 on.
    resumed = batches(pairs, batch_size=5, seed=7, start_step=4)
    assert [ids(next(resumed)) for _ in range(2)] == first[4:]
    assert ids(batch_at(pairs, 5, 7, 3)) == first[3]
    assert ids(batch_at(pairs, 5, 8, 0)) != first[0]


def test_shards_are_disjoint_complete_and_count_skipped_rows(pairs_dir):
    path = str(pairs_dir / "train.parquet")
    whole = load_pairs(path, "train")
    shards = [load_pairs(path, "train", rank, 2) for rank in range(2)]
    assert sorted(ids(shards[0].pairs) + ids(shards[1].pairs)) == sorted(ids(whole.pairs))
    assert not set(ids(shards[0].pairs)) & set(ids(shards[1].pairs))
    assert [len(s.pairs) for s in shards] == [6, 6]
    expected = {"corrupt_image_preferred": 1, "corrupt_image_rejected": 1}
    assert whole.skipped == expected and all(s.skipped == expected for s in shards)
    with pytest.raises(InputError, match="0 valid test pairs"):  # only the asked-for split
        load_pairs(path, "test")
    with pytest.raises(InputError, match="12 valid train pairs, fewer than the 13 workers"):
        load_pairs(path, "train", 0, 13)
    # A limit keeps the first valid pairs, still sharded.
    first = [load_pairs(path, "train", rank, 2, limit=5) for rank in range(2)]
    assert sorted(ids(first[0].pairs) + ids(first[1].pairs)) == sorted(ids(whole.pairs[:5]))


def test_several_train_files_are_one_mixed_set(pairs_dir, tmp_path):
    """A curriculum stage that must not forget the last one trains on both sets: the
    files' pairs in turn, sharded and limited as one file would be."""
    path = str(pairs_dir / "train.parquet")
    other = tmp_path / "other.parquet"
    write_pairs(other, [dataclasses.replace(p, pair_id=f"other-{p.pair_id}")
                        for p in read_pairs(path, split="train").pairs[:4]])
    mixed = load_pairs([path, str(other)], "train")
    assert ids(mixed.pairs) == ids(load_pairs(path, "train").pairs) + ids(
        load_pairs(str(other), "train").pairs)
    shards = [load_pairs([path, str(other)], "train", rank, 2) for rank in range(2)]
    assert sorted(ids(shards[0].pairs) + ids(shards[1].pairs)) == sorted(ids(mixed.pairs))
    config = load_config(LOCAL_CONFIG, [f"data.train=[{path},{other}]"], model=RewardTrainConfig)
    assert config.data.train == [path, str(other)]
    one = load_config(LOCAL_CONFIG, [f"data.train={path}"], model=RewardTrainConfig)
    assert one.data.train == [path]
    with pytest.raises(ConfigError, match=r"data\.train"):
        load_config(LOCAL_CONFIG, ["data.train=[]"], model=RewardTrainConfig)


def test_pair_loss_statistics():
    mu = torch.tensor([2.0, 0.0, 1.0, 1.0])  # preferred [2, 0], rejected [1, 1]
    log_sigma = torch.log(torch.tensor([1.0, 2.0, 1.0, 4.0]))
    loss, stats = pair_loss(HeadOutput(mu=mu, log_sigma=log_sigma), mc_samples=0)
    expected = gaussian_bt_loss(mu[:2], log_sigma[:2], mu[2:], log_sigma[2:], 0)
    assert loss.item() == pytest.approx(expected.item())
    assert stats["accuracy"].item() == 0.5
    assert stats["margin_mean"].item() == pytest.approx(0.0)  # (1 + -1) / 2
    assert stats["mu_mean"].item() == 1.0 and stats["mu_std"].item() == pytest.approx(0.5**0.5)
    assert stats["sigma_mean"].item() == pytest.approx(2.0)
    assert not any(value.requires_grad for value in stats.values())


def test_pair_loss_gradient_pushes_the_preferred_image_up():
    mu = torch.zeros(4, requires_grad=True)
    loss, _ = pair_loss(HeadOutput(mu=mu, log_sigma=torch.zeros(4)), mc_samples=64)
    loss.backward()
    assert (mu.grad[:2] < 0).all() and (mu.grad[2:] > 0).all()


def test_step_seeds_are_stable_and_distinct():
    seeds = [step_seed(0, step, rank, micro) for step in range(3) for rank in range(2)
             for micro in range(2)]
    assert len(set(seeds)) == len(seeds)
    assert step_seed(0, 1, 1, 0) == step_seed(0, 1, 1, 0)
    assert step_seed(1, 0) != step_seed(0, 0)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["optim.lrr=1"], "optim.lrr"),
        (["optim.batch_size=6", "optim.micro_batch_size=4"], "micro_batch_size"),
        (["optim.warmup_steps=5000"], "warmup_steps"),
        (["distributed.zero_stage=3"], "distributed.zero_stage"),
        (["model.min_pixels=5000", "model.max_pixels=100"], "min_pixels"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(LOCAL_CONFIG, overrides, model=RewardTrainConfig)


# ------------------------------------------------------------------- CLI: bad input, no Ray


def overrides(tiny_qwen_path, pairs_dir, tmp_path):
    return [
        f"model.base_model={tiny_qwen_path}",
        f"data.train={pairs_dir / 'train.parquet'}",
        f"data.test={pairs_dir / 'test.parquet'}",
        f"output_dir={tmp_path / 'run'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]


def cli_args(tiny_qwen_path, pairs_dir, tmp_path, *extra):
    sets = [arg for value in overrides(tiny_qwen_path, pairs_dir, tmp_path)
            for arg in ("--set", value)]
    return ["reward", "train", "--config", LOCAL_CONFIG, *sets, *extra]


def test_cli_names_a_bad_config_key(tiny_qwen_path, pairs_dir, tmp_path, capsys):
    code = main(cli_args(tiny_qwen_path, pairs_dir, tmp_path, "--set", "optim.stepz=3"))
    assert code == 2
    assert "optim.stepz" in capsys.readouterr().err


def test_cli_names_a_missing_column(tiny_qwen_path, pairs_dir, tmp_path, capsys):
    table = pq.read_table(pairs_dir / "train.parquet").drop_columns(["num_perturbed"])
    pq.write_table(table, tmp_path / "no-column.parquet")
    code = main(cli_args(tiny_qwen_path, pairs_dir, tmp_path,
                         "--set", f"data.train={tmp_path / 'no-column.parquet'}"))
    assert code == 2
    assert "missing column 'num_perturbed'" in capsys.readouterr().err


def test_data_and_run_problems_fail_before_any_worker_starts(tiny_qwen_path, pairs_dir,
                                                             tmp_path):
    from spatialrl.learners.spatialscore_trainer import train_reward_model

    cfg = load_config(LOCAL_CONFIG, overrides(tiny_qwen_path, pairs_dir, tmp_path),
                      model=RewardTrainConfig)
    swapped = cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"test": str(pairs_dir / "train.parquet")})})
    with pytest.raises(ConfigError, match="data.test: .* has no valid test pairs"):
        train_reward_model(swapped)
    with pytest.raises(ConfigError, match="--resume: no run to continue"):
        train_reward_model(cfg, resume=True)
    missing = cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"train": [str(tmp_path / "absent.parquet")]})})
    with pytest.raises(FileNotFoundError, match="absent.parquet"):
        train_reward_model(missing)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(PairFileError, match="not a readable parquet file"):
        train_reward_model(cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"train": [str(bad)]})}))


def test_init_from_problems_fail_before_any_worker_starts(tiny_qwen_path, pairs_dir, tmp_path):
    from spatialrl.learners.spatialscore_trainer import train_reward_model
    from spatialrl.reward.model import SpatialScore

    cfg = load_config(LOCAL_CONFIG, overrides(tiny_qwen_path, pairs_dir, tmp_path),
                      model=RewardTrainConfig)
    with pytest.raises(ConfigError, match="init_from: .*not found: .*nowhere"):
        train_reward_model(cfg.model_copy(update={"init_from": str(tmp_path / "nowhere")}))
    (tmp_path / "empty-run" / "ray-train").mkdir(parents=True)
    with pytest.raises(ConfigError, match="init_from: .*empty-run holds no checkpoint"):
        train_reward_model(cfg.model_copy(update={"init_from": str(tmp_path / "empty-run")}))
    full = SpatialScore.from_config(cfg.model.model_copy(update={"finetune": "full"}))
    folder = full.save_pretrained(tmp_path / "full")
    with pytest.raises(ConfigError, match="init_from: .*set model.finetune full"):
        train_reward_model(cfg.model_copy(update={"init_from": str(folder)}))
    assert not (tmp_path / "run").exists()  # no run was started


# -------------------------------------------------- Ray Train + DeepSpeed + MLflow, 2 workers


@pytest.fixture(scope="module")
def local_ray():
    with connected(LocalRayHead(num_cpus=2)):
        yield


def train_overrides(tiny_qwen_path, pairs_dir, out, db, *extra) -> list[str]:
    """4 steps of 2 pairs per worker, in micro-batches of 1 (DeepSpeed accumulates 2)."""
    return [
        f"model.base_model={tiny_qwen_path}", f"data.train={pairs_dir / 'train.parquet'}",
        f"data.test={pairs_dir / 'test.parquet'}", f"output_dir={out}",
        f"mlflow.tracking_uri=sqlite:///{db}", "optim.steps=4", "optim.warmup_steps=1",
        "optim.batch_size=2", "optim.micro_batch_size=1", "optim.lr=1e-2",
        "model.mc_samples=8", "model.lora.dropout=0.1", "checkpoint_every=2",
        "eval_every=2", "log_every=1", "distributed.num_workers=2",
        "distributed.cpus_per_worker=0.5", *extra,
    ]


def train_config(tiny_qwen_path, pairs_dir, out, db, *extra):
    return load_config(LOCAL_CONFIG, train_overrides(tiny_qwen_path, pairs_dir, out, db, *extra),
                       model=RewardTrainConfig)


def metric_history(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key),
                                              key=lambda m: (m.step, m.timestamp))]


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.slow
def test_train_stop_resume_matches_an_uninterrupted_run(
    local_ray, tiny_qwen_path, pairs_dir, tmp_path, capsys
):
    from spatialrl.learners.spatialscore_trainer import RUN_FILE, train_reward_model
    from spatialrl.reward.model import SpatialScore

    db = tmp_path / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")

    whole = train_reward_model(train_config(tiny_qwen_path, pairs_dir, tmp_path / "a", db))
    assert whole.steps_done == 4

    cfg = train_config(tiny_qwen_path, pairs_dir, tmp_path / "b", db, "stop_after=2")
    first = train_reward_model(cfg)
    assert first.steps_done == 2
    assert client.get_run(first.mlflow_run_id).info.status == "KILLED"
    with pytest.raises(ConfigError, match="already holds a run"):
        train_reward_model(cfg)
    # Its checkpoint is verified before anything loads (then restored: the resume below
    # still has to match the uninterrupted run).
    assert_changed_checkpoint_files_are_named(
        Path(first.checkpoint), capsys,
        train_overrides(tiny_qwen_path, pairs_dir, tmp_path / "b", db, "stop_after=2"),
        train_config(tiny_qwen_path, pairs_dir, tmp_path / "next", db,
                     f"init_from={tmp_path / 'b'}"))
    resumed = train_reward_model(cfg.model_copy(update={"stop_after": None}), resume=True)
    assert resumed.mlflow_run_id == first.mlflow_run_id
    assert resumed.steps_done == 4
    run = client.get_run(resumed.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert json.loads((tmp_path / "b" / RUN_FILE).read_text())["run_id"] == run.info.run_id

    # Every step logged once, none lost; the resumed steps equal the uninterrupted ones.
    losses = metric_history(client, run.info.run_id, "train/loss")
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    reference = metric_history(client, whole.mlflow_run_id, "train/loss")
    assert [v for _, v in losses] == pytest.approx([v for _, v in reference], abs=1e-5)
    for key in ("train/accuracy", "train/mu_mean", "train/mu_std", "train/sigma_mean",
                "train/margin_mean", "train/lr", "train/grad_norm", "train/pairs_per_s"):
        assert [step for step, _ in metric_history(client, run.info.run_id, key)] == [1, 2, 3, 4]
    lrs = [v for _, v in metric_history(client, run.info.run_id, "train/lr")]
    assert lrs[0] == 0 and lrs[1] == pytest.approx(1e-2)  # 1 warmup step (from 0)
    assert lrs[3] < lrs[2] < lrs[1]  # then cosine decay
    evals = metric_history(client, run.info.run_id, "eval/accuracy")
    assert [step for step, _ in evals] == [2, 4] and all(0 <= v <= 1 for _, v in evals)
    assert metric_history(client, run.info.run_id, "eval/pairs")[-1][1] == 6
    for group in ("1", "2_3"):
        assert metric_history(client, run.info.run_id, f"eval/accuracy_{group}")
    skipped = metric_history(client, run.info.run_id, "data/train_skipped_rows")
    assert skipped == [(0, CORRUPT_TRAIN_ROWS), (2, CORRUPT_TRAIN_ROWS)]  # each read counts
    assert metric_history(
        client, run.info.run_id, "data/train_skipped_corrupt_image_preferred")[0][1] == 1
    assert run.data.params["optim.lr"] == "0.01"
    assert run.data.params["distributed.zero_stage"] == "2"

    # The model artifact: safetensors only, loadable, and equal to the final checkpoint.
    model_dir = client.download_artifacts(run.info.run_id, "model", str(tmp_path / "artifact"))
    files = sorted(p.name for p in (tmp_path / "artifact" / "model").iterdir())
    assert not [f for f in files if not f.endswith((".json", ".safetensors"))], files
    model = SpatialScore.from_pretrained(model_dir, base_model=str(tiny_qwen_path))
    final = SpatialScore.from_pretrained(f"{resumed.checkpoint}/model",
                                         base_model=str(tiny_qwen_path))
    pair = read_pairs(pairs_dir / "test.parquet", split="test").pairs[0]
    images = [decode_image(pair.image_preferred), decode_image(pair.image_rejected)]
    scores = model.score(images, [pair.prompt] * 2)
    torch.testing.assert_close(scores.mu, final.score(images, [pair.prompt] * 2).mu)
    assert torch.isfinite(scores.mu).all() and (scores.sigma > 0).all()


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.slow
def test_a_full_finetune_continues_from_an_earlier_run(
    local_ray, tiny_qwen_path, pairs_dir, tmp_path
):
    """A curriculum's next stage: init_from an earlier run's output_dir starts from its newest
    checkpoint, every backbone weight included (finetune full)."""
    from spatialrl.learners.spatialscore_trainer import train_reward_model
    from spatialrl.reward.model import SpatialScore

    db = tmp_path / "mlflow.db"
    full = ("model.finetune=full", "distributed.num_workers=1", "distributed.cpus_per_worker=1",
            "checkpoint_every=0", "eval_every=0")
    first = train_reward_model(train_config(
        tiny_qwen_path, pairs_dir, tmp_path / "first", db, *full, "optim.steps=2"))
    # One step at a negligible rate: the second run ends where it started.
    second = train_reward_model(train_config(
        tiny_qwen_path, pairs_dir, tmp_path / "second", db, *full, "optim.steps=1",
        "optim.warmup_steps=0", "optim.lr=1e-12", f"init_from={tmp_path / 'first'}"))

    pair = read_pairs(pairs_dir / "test.parquet", split="test").pairs[0]
    images = [decode_image(pair.image_preferred), decode_image(pair.image_rejected)]

    def mu(folder):
        return SpatialScore.from_pretrained(folder).score(images, [pair.prompt] * 2).mu

    trained, continued = mu(f"{first.checkpoint}/model"), mu(f"{second.checkpoint}/model")
    torch.manual_seed(0)
    untrained = SpatialScore.from_config(SpatialScore.from_pretrained(
        f"{first.checkpoint}/model").config).score(images, [pair.prompt] * 2).mu
    assert not torch.allclose(trained, untrained, atol=1e-3)
    torch.testing.assert_close(continued, trained, atol=1e-5, rtol=1e-5)
    params = MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(second.mlflow_run_id).data.params
    assert params["init_from"] == f"{first.checkpoint}/model"


def assert_changed_checkpoint_files_are_named(folder: Path, capsys, run_overrides: list[str],
                                              init_from_cfg) -> None:
    """Each rank lists the sha256 of the files it wrote; a file of another rank than 0,
    changed, stops `reward train --resume` with one line naming it, before anything loads,
    and `init_from` the run likewise. Restored, the checkpoint verifies; a planted file, a
    lost one or a lost list is named. The folder is left as it was found."""
    from spatialrl.checkpoint_digests import CheckpointError
    from spatialrl.learners.spatialscore_trainer import train_reward_model, verify_checkpoint

    assert sorted(p.name for p in (folder / "checksums").iterdir()) == [
        "rank-0.json", "rank-1.json"]
    shard = folder / "engine/spatialscore/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert shard.name in (folder / "checksums/rank-1.json").read_text()
    original = shard.read_bytes()
    shard.write_bytes(original + b"\0")
    sets = [arg for value in run_overrides for arg in ("--set", value)]
    assert main(["reward", "train", "--config", LOCAL_CONFIG, *sets, "--resume"]) == 2
    assert f"{shard}: sha256 differs from the one in checksums/rank-*.json" in (
        capsys.readouterr().err)
    assert shard.read_bytes() == original + b"\0"  # nothing overwritten
    with pytest.raises(CheckpointError, match=f"{shard}: sha256 differs"):
        train_reward_model(init_from_cfg)  # init_from checks before any worker starts
    shard.write_bytes(original)
    steps_done = verify_checkpoint(folder)["steps_done"]

    planted = folder / "engine/spatialscore/extra.pt"
    planted.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=f"{planted}: not listed"):
        verify_checkpoint(folder)
    planted.unlink()
    listed = folder / "model/spatialscore.json"
    moved = folder.parent / "moved.json"
    listed.rename(moved)
    with pytest.raises(CheckpointError, match="model/spatialscore.json: listed in .*, missing"):
        verify_checkpoint(folder)
    moved.rename(listed)
    rank_list = folder / "checksums/rank-1.json"
    kept = rank_list.read_bytes()
    rank_list.unlink()
    with pytest.raises(CheckpointError, match=f"{shard}: not listed"):
        verify_checkpoint(folder)
    rank_list.write_bytes(kept)
    assert verify_checkpoint(folder)["steps_done"] == steps_done


def test_config_counts_accumulation():
    cfg = RewardTrainConfig.model_validate({"data": {"train": "x"}, "optim": {
        "batch_size": 8, "micro_batch_size": 2}})
    assert cfg.optim.accumulation_steps == 4
    assert RewardTrainConfig.model_validate({"data": {"train": "x"}}).optim.accumulation_steps == 1



def test_the_step_line_names_the_step_of_the_total_and_the_loss():
    from spatialrl.learners.spatialscore_trainer import step_line

    metrics = {"train/loss": 0.693147, "train/accuracy": 0.5, "train/step_s": 3.0,
               "eval/accuracy": 0.75}
    assert step_line(40, 1000, metrics) == (
        "step 40/1000: train/loss=0.6931 train/accuracy=0.5 eval/accuracy=0.75")
