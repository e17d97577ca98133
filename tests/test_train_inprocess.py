"""The in-process trainer end to end: real tiny FLUX, real MLflow (sqlite), real files."""

import pyarrow.parquet as pq
import pytest
import torch
from diffusers import FluxPipeline
from mlflow.tracking import MlflowClient

from spatialrl import storage
from spatialrl.config import load_config
from spatialrl.inprocess import InProcessTrainer
from spatialrl.run_state import checkpoint_dir
from spatialrl.tracking import Tracker
from spatialrl.train_batch import ledger_file


def tiny_config(tmp_path, tiny_flux_path, *extra):
    return load_config(
        "configs/tiny.yaml",
        [
            f"model.pretrained={tiny_flux_path}",
            f"output_dir={tmp_path / 'run'}",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "iterations=2", "eval_every=1", "checkpoint_every=0",
            "grpo.group_size=4", "grpo.top_k=1", "prompts.prompts_per_iteration=2",
            "prompts.num_eval_prompts=2", "sampling.num_steps=4", "sampling.eval_num_steps=4",
            *extra,
        ],
    )


def test_two_iterations_log_metrics_ledger_and_a_loadable_lora(tmp_path, tiny_flux_path):
    cfg = tiny_config(tmp_path, tiny_flux_path, "reward.kind=brightness_left")
    tracker = Tracker(cfg.mlflow)
    trainer = InProcessTrainer(cfg)
    history = trainer.fit(tracker)
    tracker.finish()

    assert len(history) == 2 and history[-1]["policy/version"] == 2.0
    # top_k=1 of G=4 keeps half of each group.
    assert history[0]["filter/kept_fraction"] == pytest.approx(0.5)
    run = MlflowClient(cfg.mlflow.tracking_uri).get_run(tracker.run_id)
    for key in ("reward/mean", "learn/policy_loss", "learn/kl", "learn/grad_norm",
                "time/rollout_s", "eval/reward_mean", "eval/relation_accuracy"):
        assert key in run.data.metrics, key
    assert run.data.params["grpo.group_size"] == "4"
    # One captioned eval image per evaluated iteration: the UI's image slider.
    images = [a.path for a in MlflowClient(cfg.mlflow.tracking_uri).list_artifacts(
        tracker.run_id, "images")]
    for step in (0, 1):
        assert any(f"eval~samples+step+{step}+" in path for path in images), step

    ledger = pq.read_table(tmp_path / "run" / "ledger" / "000001.parquet").to_pylist()
    assert len(ledger) == 8 and sum(row["kept"] for row in ledger) == 4
    assert all(row["advantage"] == 0.0 for row in ledger if not row["kept"])

    # The final checkpoint loads into a stock diffusers pipeline and reproduces the policy.
    lora_dir = tmp_path / "run" / "checkpoints" / "iteration-000001" / "learner" / "lora"
    pipe = FluxPipeline.from_pretrained(tiny_flux_path)
    pipe.load_lora_weights(lora_dir)
    kwargs = dict(prompt="a red circle above a blue square", height=64, width=64,
                  num_inference_steps=4, output_type="pt", max_sequence_length=32)
    ours = trainer.pipeline(generator=torch.Generator().manual_seed(3), **kwargs).images
    theirs = pipe(generator=torch.Generator().manual_seed(3), **kwargs).images
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(
        FluxPipeline.from_pretrained(tiny_flux_path)(
            generator=torch.Generator().manual_seed(3), **kwargs).images,
        theirs, atol=1e-6,
    ), "training should have moved the policy away from the base model"


def test_a_nan_reward_drops_its_group_and_the_ledger_keeps_every_row(tmp_path, tiny_flux_path):
    from spatialrl.flux.loading import load_flux_pipeline
    from spatialrl.rollout import sample_groups
    from spatialrl.train_batch import ScoredGroup, build_train_batch, gather_trajectory

    cfg = tiny_config(tmp_path, tiny_flux_path)
    pipeline = load_flux_pipeline(cfg.model)
    groups = sample_groups(pipeline, ["a red circle above a blue square", "a green star"],
                           [10, 11], iteration=0, version=3, run_seed=0, group_size=4,
                           cfg=cfg.sampling)
    good = torch.tensor([0.1, 0.4, 0.2, 0.9])
    bad = torch.tensor([0.5, float("nan"), 0.1, 0.2])
    batch = build_train_batch(
        [ScoredGroup.of(groups[0], good, torch.zeros(4)),
         ScoredGroup.of(groups[1], bad, torch.zeros(4))],
        cfg.grpo,
    )
    assert batch.metrics["filter/dropped_nonfinite_groups"] == 1.0
    trajectory = gather_trajectory(batch.samples, resolve=lambda source: source)
    assert len(trajectory) == 2  # top_k=1: best and worst of the finite group
    assert set(trajectory.prompts) == {"a red circle above a blue square"}
    # In reward order: 0.1 (sample 0) then 0.9 (sample 3) of the first group.
    assert trajectory.seeds.tolist() == groups[0].trajectory.seeds[[0, 3]].tolist()
    assert batch.versions.tolist() == [3, 3]
    assert len(batch.ledger) == 8
    assert not any(r["kept"] for r in batch.ledger if r["group_id"] == 11)
    assert batch.advantages.sign().tolist() == [-1.0, 1.0]  # reward 0.1 then 0.9, in order


def test_a_uri_output_dir_gets_the_ledger_and_the_lora(tmp_path, tiny_flux_path):
    """A file:// URI takes the object-store path: the LoRA is staged locally and uploaded."""
    output_dir = (tmp_path / "remote" / "run").as_uri()
    cfg = tiny_config(tmp_path, tiny_flux_path, "iterations=1", "eval_every=0",
                      f"output_dir={output_dir}")
    tracker = Tracker(cfg.mlflow)
    InProcessTrainer(cfg).fit(tracker)
    tracker.finish()

    assert len(pq.read_table(ledger_file(output_dir, 0))) == 8
    lora = storage.join(checkpoint_dir(output_dir, 0), "learner", "lora")
    assert storage.list_files(lora) == ["pytorch_lora_weights.safetensors"]
    logged = MlflowClient(cfg.mlflow.tracking_uri).list_artifacts(
        tracker.run_id, "checkpoints/iteration-000000/lora")
    assert [a.path for a in logged] == ["checkpoints/iteration-000000/lora/"
                                        "pytorch_lora_weights.safetensors"]


def test_an_unsupported_output_dir_scheme_fails_before_loading_models(tmp_path):
    from spatialrl.config import ConfigError

    cfg = tiny_config(tmp_path, tmp_path / "no-model-needed", "output_dir=nope://bucket/run")
    with pytest.raises(ConfigError, match="output_dir nope://bucket/run"):
        InProcessTrainer(cfg)


def test_an_output_dir_holding_a_run_is_refused_before_loading_models(tmp_path):
    from spatialrl.config import ConfigError

    ledger = tmp_path / "run" / "ledger" / "000000.parquet"
    ledger.parent.mkdir(parents=True)
    ledger.write_bytes(b"an earlier run's ledger")
    cfg = tiny_config(tmp_path, tmp_path / "no-model-needed")
    with pytest.raises(ConfigError, match=r"already holds a run \(ledger\)"):
        InProcessTrainer(cfg)
    assert ledger.read_bytes() == b"an earlier run's ledger"


def test_the_cli_refuses_an_output_dir_holding_a_run_before_opening_an_mlflow_run(
    tmp_path, capsys
):
    from spatialrl.cli import main

    ledger = tmp_path / "run" / "ledger" / "000000.parquet"
    ledger.parent.mkdir(parents=True)
    ledger.write_bytes(b"an earlier run's ledger")
    database = tmp_path / "mlflow.db"
    argv = [
        "train", "--backend", "inprocess", "--config", "configs/tiny.yaml",
        "--set", f"output_dir={tmp_path / 'run'}",
        "--set", f"mlflow.tracking_uri=sqlite:///{database}",
    ]
    assert main(argv) == 2
    assert "already holds a run (ledger)" in capsys.readouterr().err
    assert ledger.read_bytes() == b"an earlier run's ledger"
    # No empty FAILED run is left on the dashboard (the store need not even exist).
    if database.exists():
        client = MlflowClient(f"sqlite:///{database}")
        experiments = [experiment.experiment_id for experiment in client.search_experiments()]
        assert client.search_runs(experiments) == []


@pytest.mark.parametrize(
    ("error", "status"), [(KeyboardInterrupt(), "KILLED"), (RuntimeError("boom"), "FAILED")]
)
def test_a_run_ended_by_an_exception_is_killed_on_interrupt_and_failed_otherwise(
    tmp_path, error, status
):
    cfg = tiny_config(tmp_path, tmp_path / "no-model-needed")
    with pytest.raises(type(error)), Tracker(cfg.mlflow) as tracker:
        raise error
    assert MlflowClient(cfg.mlflow.tracking_uri).get_run(tracker.run_id).info.status == status


@pytest.mark.parametrize(("own_status", "status"), [(None, "FINISHED"), ("KILLED", "KILLED")])
def test_a_run_whose_block_returns_is_finished_unless_the_block_ended_it(
    tmp_path, own_status, status
):
    cfg = tiny_config(tmp_path, tmp_path / "no-model-needed")
    with Tracker(cfg.mlflow) as tracker:
        assert MlflowClient(cfg.mlflow.tracking_uri).get_run(tracker.run_id).info.status == (
            "RUNNING"
        )
        if own_status:
            tracker.finish(own_status)
    assert MlflowClient(cfg.mlflow.tracking_uri).get_run(tracker.run_id).info.status == status


def test_nan_rewards_are_counted_and_the_run_trains_on_the_finite_groups(tmp_path,
                                                                         tiny_flux_path):
    """The reward is the loop's input: one returning NaN for one prompt's images (as a
    broken reward model would) drops that group every iteration, counted from iteration 0."""
    from spatialrl.reward_functions import RewardOutput

    cfg = tiny_config(tmp_path, tiny_flux_path, "reward.kind=brightness_left", "eval_every=0")
    trainer = InProcessTrainer(cfg)
    brightness = trainer.backend.rollouts.reward

    def nan_for_the_first_prompt(images, prompts):
        scores = brightness(images, prompts)
        broken = torch.tensor([p == prompts[0] for p in prompts])
        return RewardOutput(scores.mu.masked_fill(broken, float("nan")), scores.sigma)

    trainer.backend.rollouts.reward = nan_for_the_first_prompt
    with Tracker(cfg.mlflow) as tracker:
        history = trainer.fit(tracker)
    assert [h["filter/dropped_nonfinite_groups"] for h in history] == [1.0, 2.0]
    assert [h["policy/version"] for h in history] == [1.0, 2.0]  # the other group trained
    counter = MlflowClient(cfg.mlflow.tracking_uri).get_metric_history(
        tracker.run_id, "filter/dropped_nonfinite_groups")
    assert [(m.step, m.value) for m in counter] == [(0, 1.0), (1, 2.0)]
