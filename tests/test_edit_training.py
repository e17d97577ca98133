"""Editing tasks in the training loop (issue: online RL for image editing): (instruction,
source image) records, G edits of one source per group, the edit reward, held-out edits judged
by the rule evaluator, eval grids of source | edit. In process here; on Ray in
tests/test_ray_trainer.py."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from spatialrl.config import ConfigError, load_config
from spatialrl.errors import InputError
from spatialrl.inprocess import InProcessTrainer
from spatialrl.policy_evaluation import edit_eval_metrics
from spatialrl.prompts import PromptSource, eval_tasks, read_edit_task_file, shapes_edit_task
from spatialrl.reward_functions import RewardOutput, build_reward, reward_version
from spatialrl.tracking import CAPTION_PX, CELL_PX, Tracker

EDIT_SETTINGS = ["prompts.task=edit", "sampling.kontext_resolution=false"]


def edit_config(tmp_path, tiny_flux_path, *extra):
    return load_config("configs/tiny.yaml", [
        f"model.pretrained={tiny_flux_path}", f"output_dir={tmp_path / 'run'}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "iterations=2", "eval_every=1", "checkpoint_every=0",
        "grpo.group_size=4", "grpo.top_k=1", "prompts.prompts_per_iteration=2",
        "prompts.num_eval_prompts=2", "sampling.num_steps=4", "sampling.eval_num_steps=4",
        *EDIT_SETTINGS, *extra])


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_shapes_edit_records_are_the_edit_engines_examples_and_the_same_everywhere(
        tmp_path, tiny_flux_path):
    cfg = edit_config(tmp_path, tiny_flux_path).prompts
    driver, worker = PromptSource.for_training(cfg, 0), PromptSource.for_training(cfg, 0)
    (index, instruction), = driver.slice(5, 1)
    source, = worker.condition_images([index])
    again, = driver.condition_images([index])
    assert instruction and instruction[0].isupper()
    assert np.array_equal(np.asarray(source), np.asarray(again))
    held_out = eval_tasks(cfg, 0)
    assert len(held_out.prompts) == len(held_out.condition_images) == 2
    # The held-out edits are the engine's test split, with their ground truth.
    assert [e.split for e in held_out.edit_examples] == ["test", "test"]
    correct = held_out.edit_examples[0].candidate("correct").image
    assert all(held_out.edit_examples[0].edits_done(correct))
    assert not all(held_out.edit_examples[0].edits_done(held_out.condition_images[0]))


def test_held_out_edit_figures_read_what_the_edits_made():
    """edit_eval_metrics on the engine's own candidates: the correct targets succeed without
    over-editing, the sources (no edit) neither, and the over-editing candidates make every
    edit and change an unnamed object; unparsed rewards (NaN) are left out of the mean."""
    examples = [shapes_edit_task(0, "test", i) for i in range(4)]
    scores = RewardOutput(mu=torch.tensor([1.0, 3.0, float("nan"), float("nan")]),
                          sigma=torch.ones(4))

    def figures(label):
        images = [e.source_image if label is None else e.candidate(label).image
                  for e in examples]
        return edit_eval_metrics(images, scores, examples)

    correct = figures("correct")
    kinds = {kind for e in examples for kind in e.kinds}
    assert correct == {
        "eval/reward_mean": 2.0, "eval/reward_valid_fraction": 0.5, "eval/edit_success": 1.0,
        "eval/edit_success_se": 0.0, "eval/edits_done": 1.0, "eval/over_editing": 0.0,
        "eval/edit_correct": 1.0, **{f"eval/edits_done/{kind}": 1.0 for kind in kinds}}
    assert (figures(None)["eval/edit_success"], figures(None)["eval/over_editing"]) == (0, 0)
    over = figures("over_editing")
    assert (over["eval/edit_success"], over["eval/over_editing"]) == (1.0, 1.0)
    assert over["eval/edit_correct"] == 0.0


def test_an_edits_file_is_a_record_source_and_a_bad_row_is_named(tmp_path):
    red = Image.new("RGB", (32, 32), "red")
    rows = {"instruction": ["Make it blue", "Make it blue", "Remove the square"],
            "image_source": [png(red), png(red), png(Image.new("RGB", (32, 32), "green"))]}
    pq.write_table(pa.table(rows), tmp_path / "edits.parquet")
    tasks = read_edit_task_file(tmp_path / "edits.parquet")
    assert [t.instruction for t in tasks] == ["Make it blue", "Remove the square"]  # distinct
    assert tasks[1].source.getpixel((0, 0)) == (0, 128, 0)

    rows["image_source"][2] = b"not an image"
    pq.write_table(pa.table(rows), tmp_path / "corrupt.parquet")
    with pytest.raises(InputError, match="row 2: image_source is not a readable image"):
        read_edit_task_file(tmp_path / "corrupt.parquet")
    pq.write_table(pa.table({"instruction": ["x"]}), tmp_path / "no-images.parquet")
    with pytest.raises(ValueError, match="missing column 'image_source'"):
        read_edit_task_file(tmp_path / "no-images.parquet")


def test_spatialreward_needs_edits_a_model_and_real_options(tmp_path, tiny_flux_path,
                                                           tiny_models_dir):
    with pytest.raises(ConfigError, match="spatialreward judges edits"):
        load_config("configs/tiny.yaml", ["reward.kind=spatialreward"])
    with pytest.raises(ConfigError, match="reward.spatialreward_path"):
        edit_config(tmp_path, tiny_flux_path, "reward.kind=spatialreward").reward.check_ready()
    cfg = edit_config(tmp_path, tiny_flux_path, "reward.kind=spatialreward",
                      f"reward.spatialreward_path={tiny_models_dir / 'qwen3-vl'}",
                      "reward.spatialreward_options={temperature: 1}")
    with pytest.raises(ConfigError, match="spatialreward_options.*temperature"):
        cfg.reward.check_ready()


def test_an_editing_run_samples_g_edits_per_source_and_logs_edit_figures(
        tmp_path, tiny_flux_path):
    cfg = edit_config(tmp_path, tiny_flux_path, "reward.kind=brightness_left")
    tracker = Tracker(cfg.mlflow)
    trainer = InProcessTrainer(cfg)
    history = trainer.fit(tracker)
    tracker.finish()

    assert history[-1]["policy/version"] == 2.0  # both updates applied
    ledger = pq.read_table(tmp_path / "run" / "ledger" / "000000.parquet").to_pylist()
    assert len(ledger) == 8
    instructions = [row["prompt"] for row in ledger]
    tasks = trainer.loop.prompts.slice(0, 2)
    assert instructions == [t for _, t in tasks for _ in range(4)]
    run = MlflowClient(cfg.mlflow.tracking_uri).get_run(tracker.run_id)
    metrics = run.data.metrics
    assert "edit_success" in run.data.tags["mlflow.note.content"]  # the run's last line
    for key in ("eval/edit_success", "eval/edits_done", "eval/over_editing",
                "eval/reward_valid_fraction", "eval/reward_hacking_suspected"):
        assert key in metrics, key
    assert "eval/relation_accuracy" not in metrics  # no text-to-image figures for edits
    # The eval grid cells are source | edit: twice as wide as a text-to-image cell.
    grid_path = next(a.path for a in MlflowClient(cfg.mlflow.tracking_uri).list_artifacts(
        tracker.run_id, "images") if a.path.endswith(".png"))
    grid = Image.open(MlflowClient(cfg.mlflow.tracking_uri).download_artifacts(
        tracker.run_id, grid_path, str(tmp_path)))
    assert grid.size == (4 * (2 * CELL_PX + CAPTION_PX), CELL_PX)  # four cells in a row


def test_edits_are_sampled_from_their_source(tmp_path, tiny_flux_path):
    """The same instruction and seed on two different sources give two different edits: the
    source reaches the sampler (a text-to-image sample would ignore it)."""
    from spatialrl.flux.loading import load_flux_pipeline
    from spatialrl.rollout import sample_groups

    cfg = edit_config(tmp_path, tiny_flux_path)
    pipeline = load_flux_pipeline(cfg.model)
    sources = [Image.new("RGB", (64, 64), "black"), Image.new("RGB", (64, 64), "white")]
    # one instruction and one group id for both: the same seeds, so the same noise
    groups = sample_groups(pipeline, ["Make it red"] * 2, [3, 3], 0, 0, cfg.seed, 2,
                           cfg.sampling, sources=sources)
    first, second = (g.trajectory for g in groups)
    assert torch.equal(first.states[:, 0], second.states[:, 0])
    assert not torch.equal(first.condition_latents, second.condition_latents)
    assert not np.array_equal(np.asarray(groups[0].images[0]), np.asarray(groups[1].images[0]))
    assert groups[0].source is sources[0]


def test_invalid_spatialreward_answers_drop_their_groups_and_are_counted(
        tmp_path, tiny_flux_path, tiny_models_dir):
    """The tiny random Qwen3-VL answers nothing that parses: every edit scores NaN, never a
    default, so every group is dropped (counted) and no update is applied."""
    judge = tiny_models_dir / "qwen3-vl"
    cfg = edit_config(tmp_path, tiny_flux_path, "reward.kind=spatialreward",
                      f"reward.spatialreward_path={judge}", "iterations=1",
                      "reward.spatialreward_options={dtype: float32, max_new_tokens: 8}")
    reward = build_reward(cfg.reward)
    source = Image.new("RGB", (64, 64), "white")
    out = reward([source], ["Make it red"], [source])
    assert torch.isnan(out.mu).all()
    with pytest.raises(ValueError, match="needs source images"):
        reward([source], ["Make it red"])
    assert reward_version(cfg.reward).startswith("spatialreward@")

    tracker = Tracker(cfg.mlflow)
    history = InProcessTrainer(cfg).fit(tracker)
    tracker.finish()
    assert history[0]["filter/dropped_nonfinite_groups"] == 2.0
    assert history[0]["filter/skipped_updates"] == 1.0
    assert history[0]["policy/version"] == 0.0
    assert history[0]["eval/reward_valid_fraction"] == 0.0
