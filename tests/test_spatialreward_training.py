"""SpatialReward SFT: samples and labels (only the answer is trained on), the loss on a tiny
overfit set, LoRA checkpoints merged into a folder the judge loads, bad configs and files,
and a real run on the tiny random Qwen3-VL through the shared Ray Train + DeepSpeed trainer
(2 CPU workers, MLflow in sqlite, stop and resume)."""

import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from test_reward_training import local_ray, metric_history  # noqa: F401 (a fixture)

from spatialrl.cli import main
from spatialrl.config import ConfigError, load_config
from spatialrl.spatialreward.edit_examples import (
    build_edit_examples,
    read_edit_rows,
    write_edit_examples,
)
from spatialrl.spatialreward.sft import (
    IGNORED,
    TURN_END,
    SftLearner,
    SftSample,
    answer_token_stats,
    encode_samples,
    load_samples,
)
from spatialrl.spatialreward.train_config import SftModelConfig, SpatialRewardTrainConfig

LOCAL_CONFIG = "configs/spatialreward/local.yaml"


@pytest.fixture(scope="module")
def tiny_qwen3_path(tiny_models_dir):
    return tiny_models_dir / "qwen3-vl"


@pytest.fixture(scope="module")
def edits_dir(tmp_path_factory):
    """4 train examples (19 candidate rows) and 2 test examples (9 rows), 1-3 edits."""
    folder = tmp_path_factory.mktemp("edits")
    for split, examples in build_edit_examples(6, seed=1, test_fraction=0.34).items():
        write_edit_examples(folder / f"{split}.parquet", examples)
    return folder


def model_config(tiny_qwen3_path, finetune="full"):
    return SftModelConfig(base_model=str(tiny_qwen3_path), dtype="float32", finetune=finetune,
                          min_pixels=4096, max_pixels=4096)


@pytest.fixture(scope="module")
def learner(tiny_qwen3_path):
    torch.manual_seed(0)
    return SftLearner.from_config(model_config(tiny_qwen3_path))


def train_samples(edits_dir, quality_every=3):
    return load_samples([str(edits_dir / "train.parquet")], "train", quality_every)


# ---------------------------------------------------------------------- samples and labels


def test_every_row_is_an_edit_sample_and_every_nth_also_a_quality_one(edits_dir):
    rows = read_edit_rows(edits_dir / "train.parquet", "train")
    samples = train_samples(edits_dir, quality_every=3)
    edit = [s for s in samples if s.judgement == "edit"]
    quality = [s for s in samples if s.judgement == "quality"]
    assert [s.row for s in edit] == rows
    assert [s.row for s in quality] == rows[2::3]
    assert quality[0].target == rows[2].quality_answer and edit[0].target == rows[0].edit_answer
    assert len(train_samples(edits_dir, quality_every=0)) == len(rows)
    shards = [load_samples([str(edits_dir / "train.parquet")], "train", 3, rank, 2)
              for rank in range(2)]
    assert shards[0] + shards[1] != samples and sorted(
        shards[0] + shards[1], key=samples.index) == samples


def test_labels_are_the_answer_and_the_turn_end_only(learner, edits_dir):
    samples = train_samples(edits_dir)[2:4]  # an edit and a quality sample
    assert [s.judgement for s in samples] == ["edit", "quality"]
    inputs = encode_samples(learner.judge, samples, 25)
    tokenizer = learner.judge.encoder.tokenizer
    labels, ids, mask = inputs["labels"], inputs["input_ids"], inputs["attention_mask"]
    for row, sample in enumerate(samples):
        labelled = labels[row] != IGNORED
        assert tokenizer.decode(ids[row][labelled]) == sample.target + TURN_END
        assert (labels[row][labelled] == ids[row][labelled]).all()
        first = int(labelled.nonzero()[0])
        prompt = tokenizer.decode(ids[row][:first])
        assert prompt.endswith("<|im_start|>assistant\n")  # the judge's own chat, opened
        assert labelled[first:].all() == bool(mask[row][first:].all())  # right padding
        images = 2 if sample.judgement == "edit" else 1
        assert int(inputs["mm_token_type_ids"][row].sum()) == 4 * images
        assert not (labelled & (inputs["mm_token_type_ids"][row] == 1)).any()
    assert (mask[1] == 0).any() and (labels[1][mask[1] == 0] == IGNORED).all()


def test_answer_token_stats_score_each_labelled_token_from_the_position_before():
    logits = torch.full((1, 4, 3), -10.0)
    logits[0, 0, 2] = 10.0  # predicts token 2 at position 1: right
    logits[0, 1, 0] = 10.0  # predicts token 0 at position 2: wrong (label 1)
    labels = torch.tensor([[IGNORED, 2, 1, IGNORED]])
    nll, tokens, correct = answer_token_stats(logits, labels)
    assert (int(tokens), int(correct)) == (2, 1)
    assert float(nll) == pytest.approx(20.0, abs=1e-3)  # ~0 for the right one, 20 for the other


def test_the_loss_falls_on_a_tiny_overfit_set(tiny_qwen3_path, edits_dir):
    torch.manual_seed(0)
    model = SftLearner.from_config(model_config(tiny_qwen3_path))
    inputs = encode_samples(model.judge, train_samples(edits_dir)[:4], 25)
    labels = inputs.pop("labels")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        nll, tokens, _ = answer_token_stats(model(**inputs).logits, labels)
        (nll / tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(nll.detach() / tokens))
    assert losses[0] > 6  # about log(vocabulary): random
    assert losses[-1] < 0.5 * losses[0]


def test_a_lora_run_saves_its_backbone_merged_in_safetensors(tiny_qwen3_path, edits_dir,
                                                             tmp_path):
    from spatialrl.spatialreward.model import SpatialReward, SpatialRewardConfig

    torch.manual_seed(0)
    lora = SftLearner.from_config(model_config(tiny_qwen3_path, finetune="lora"))
    trainable = [name for name, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert not any("visual" in name for name in trainable)
    with torch.no_grad():  # an adapter that changes the model (B starts at zero)
        for name, parameter in lora.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    folder = lora.save_pretrained(tmp_path / "model")
    assert {p.suffix for p in folder.iterdir()} <= {".json", ".safetensors", ".jinja"}
    inputs = encode_samples(lora.judge, train_samples(edits_dir)[:2], 25)
    inputs.pop("labels")
    lora.eval()
    loaded = SpatialReward.from_config(SpatialRewardConfig(model=str(folder), dtype="float32"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(**inputs).logits, lora(**inputs).logits,
                                   atol=1e-4, rtol=1e-4)
        base = SpatialReward.from_config(SpatialRewardConfig(model=str(tiny_qwen3_path),
                                                             dtype="float32"))
        assert not torch.allclose(base.model(**inputs).logits, lora(**inputs).logits, atol=1e-3)


# ------------------------------------------------------------------- bad configs and files


@pytest.mark.parametrize("overrides, key", [
    (["optim.lrr=1"], "optim.lrr"),
    (["model.dtype=bfloat16"], "dtype"),  # finetune full needs fp32 weights
    (["data.quality_every=-1"], "data.quality_every"),
    (["model.finetune=partial"], "model.finetune"),
])
def test_a_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(LOCAL_CONFIG, overrides, model=SpatialRewardTrainConfig)


def cli_args(tiny_qwen3_path, edits_dir, tmp_path, *sets):
    values = [f"model.base_model={tiny_qwen3_path}",
              f"data.train={edits_dir / 'train.parquet'}",
              f"data.test={edits_dir / 'test.parquet'}", f"output_dir={tmp_path / 'run'}",
              f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *sets]
    return ["spatialreward", "train", "--config", LOCAL_CONFIG,
            *[arg for value in values for arg in ("--set", value)]]


@pytest.mark.parametrize("sets, message", [
    (["data.train=/nowhere/absent.parquet"], "edits file not found: /nowhere/absent.parquet"),
    (["data.lr=1"], "data.lr"),
    (["init_from=/nowhere/model"], "init_from: model folder not found: /nowhere/model"),
])
def test_the_cli_names_a_missing_file_or_bad_key(tiny_qwen3_path, edits_dir, tmp_path, capsys,
                                                 sets, message):
    assert main(cli_args(tiny_qwen3_path, edits_dir, tmp_path, *sets)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing started


def test_a_split_without_rows_is_named(tiny_qwen3_path, edits_dir, tmp_path, capsys):
    test_file = edits_dir / "test.parquet"
    assert main(cli_args(tiny_qwen3_path, edits_dir, tmp_path, f"data.train={test_file}")) == 2
    assert f"data.train: {test_file} has no train rows" in capsys.readouterr().err


# ------------------------------------------------- Ray Train + DeepSpeed + MLflow, 2 workers


def train_config(tiny_qwen3_path, edits_dir, out, db, *extra):
    """4 steps of 2 samples per worker in micro-batches of 1, on 2 workers."""
    return load_config(LOCAL_CONFIG, [
        f"model.base_model={tiny_qwen3_path}", f"data.train={edits_dir / 'train.parquet'}",
        f"data.test={edits_dir / 'test.parquet'}", f"output_dir={out}",
        f"mlflow.tracking_uri=sqlite:///{db}", "optim.steps=4", "optim.warmup_steps=0",
        "optim.batch_size=2", "optim.micro_batch_size=1", "optim.lr=3e-3",
        "checkpoint_every=2", "eval_every=2", "log_every=1", "eval_batch_size=4",
        "data.max_test_rows=4", "distributed.num_workers=2",
        "distributed.cpus_per_worker=0.5", *extra,
    ], model=SpatialRewardTrainConfig)


@pytest.mark.ray
@pytest.mark.deepspeed
@pytest.mark.slow
@pytest.mark.usefixtures("local_ray")
def test_sft_run_stops_resumes_and_ships_a_judge(tiny_qwen3_path, edits_dir, tmp_path):
    from spatialrl.learners.deepspeed_trainer import RUN_FILE
    from spatialrl.learners.spatialreward_trainer import train_spatialreward
    from spatialrl.spatialreward.model import SpatialReward, SpatialRewardConfig

    db = tmp_path / "mlflow.db"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    whole = train_spatialreward(train_config(tiny_qwen3_path, edits_dir, tmp_path / "a", db))
    cfg = train_config(tiny_qwen3_path, edits_dir, tmp_path / "b", db, "stop_after=2")
    first = train_spatialreward(cfg)
    assert first.steps_done == 2
    assert client.get_run(first.mlflow_run_id).info.status == "KILLED"
    resumed = train_spatialreward(cfg.model_copy(update={"stop_after": None}), resume=True)
    assert (resumed.mlflow_run_id, resumed.steps_done) == (first.mlflow_run_id, 4)
    run = client.get_run(resumed.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "spatialreward"
    assert json.loads((tmp_path / "b" / RUN_FILE).read_text())["run_id"] == run.info.run_id

    # Every step logged once; the resumed steps are the uninterrupted run's; it learns.
    losses = metric_history(client, run.info.run_id, "train/loss")
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    reference = metric_history(client, whole.mlflow_run_id, "train/loss")
    assert [v for _, v in losses] == pytest.approx([v for _, v in reference], abs=1e-4)
    assert losses[-1][1] < losses[0][1] - 1
    for key in ("train/token_accuracy", "train/answer_tokens", "train/lr", "train/grad_norm",
                "train/samples_per_s"):
        assert [step for step, _ in metric_history(client, run.info.run_id, key)] == [1, 2, 3, 4]
    evals = metric_history(client, run.info.run_id, "eval/loss")
    assert [step for step, _ in evals] == [2, 4] and evals[1][1] < evals[0][1]
    assert 0 <= metric_history(client, run.info.run_id, "eval/token_accuracy")[-1][1] <= 1
    assert metric_history(client, run.info.run_id, "data/train_samples_per_rank")[0][1] == 11
    assert run.data.params["model.finetune"] == "full"

    # Checkpoints: the model folder holds no pickle; the logged artifact is the final model,
    # and the judge loads it as it loads the published model, and answers.
    checkpoint = tmp_path / "b" / "ray-train" / "checkpoint_0000004"
    assert str(checkpoint) == resumed.checkpoint
    model_files = {p.name for p in (checkpoint / "model").iterdir()}
    assert "model.safetensors" in model_files
    assert not [f for f in model_files if f.endswith((".bin", ".pt", ".pkl", ".pth"))]
    assert (checkpoint / "engine" / "spatialreward").is_dir()
    artifact = client.download_artifacts(run.info.run_id, "model", str(tmp_path / "artifact"))
    judge = SpatialReward.from_config(SpatialRewardConfig(model=artifact, dtype="float32",
                                                          max_new_tokens=8))
    final = SpatialReward.from_config(SpatialRewardConfig(model=str(checkpoint / "model"),
                                                          dtype="float32", max_new_tokens=8))
    sample = SftSample(read_edit_rows(edits_dir / "test.parquet")[0], "edit")
    inputs = encode_samples(judge, [sample], 25)
    inputs.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(judge.model(**inputs).logits, final.model(**inputs).logits)
    content, images = sample.chat(25)
    answer = judge.judge_edits(images[:1], images[1:], [sample.row.instruction])
    assert len(answer) == 1 and isinstance(answer[0], str)
