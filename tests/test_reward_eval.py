"""SpatialScore evaluation: accuracy by perturbed relations, the per-pair file, the `reward
eval` and `reward score` commands end to end on the tiny Qwen2.5-VL, and bad inputs."""

import dataclasses
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from spatialrl.cli import main
from spatialrl.data.pairs import PAIR_SCHEMA, decode_image, read_pairs, write_pairs
from spatialrl.data.shapes import build_shapes_pairs
from spatialrl.reward import SpatialScore, SpatialScoreConfig
from spatialrl.reward.evaluation import (
    JUDGE_FILE,
    SCORES_FILE,
    SUMMARY_FILE,
    ScoredPair,
    accuracy_summary,
    score_pairs,
)
from spatialrl.reward.loss import pair_wins


@pytest.fixture(scope="module")
def checkpoint(tiny_models_dir, tmp_path_factory):
    torch.manual_seed(0)
    config = SpatialScoreConfig(
        base_model=str(tiny_models_dir / "qwen2.5-vl"), dtype="float32", head_hidden_size=32
    )
    model = SpatialScore.from_config(config)
    with torch.no_grad():  # a head that does not start at zero, so scores differ per image
        model.head[2].bias.copy_(torch.tensor([0.3, -1.0]))
    return model.save_pretrained(tmp_path_factory.mktemp("spatialscore") / "ckpt")


@pytest.fixture(scope="module")
def model(checkpoint):
    return SpatialScore.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def shapes_pairs():
    """Six test pairs, two of each number of perturbed relations."""
    return build_shapes_pairs(6, seed=5, size=64, test_fraction=1.0).test


@pytest.fixture
def pairs_file(tmp_path, shapes_pairs):
    """The six test pairs, two train pairs, and three rows the reader must skip."""
    train = build_shapes_pairs(2, seed=6, test_fraction=0.0).train
    good = shapes_pairs[0]
    bad = [
        dataclasses.replace(good, pair_id="corrupt-1", image_rejected=b"\x89PNG not really"),
        dataclasses.replace(good, pair_id="corrupt-2", image_preferred=good.image_preferred[:40]),
        dataclasses.replace(good, pair_id="empty-prompt", prompt="  "),
    ]
    path = tmp_path / "pairs.parquet"
    write_pairs(path, [*shapes_pairs[:3], *bad, *train, *shapes_pairs[3:]])
    return path


def _scored(num_perturbed, mu_w, mu_l):
    wins = pair_wins(torch.tensor(mu_w), torch.tensor(mu_l)).tolist()
    return [
        ScoredPair(f"p{i}", n, "hand", won, 1.0, lost, 1.0, c)
        for i, (n, won, lost, c) in enumerate(zip(num_perturbed, mu_w, mu_l, wins, strict=True))
    ]


def test_accuracy_split_by_perturbed_relations_on_hand_made_scores():
    records = _scored(
        num_perturbed=[1, 1, 1, 1, 2, 2, 3, 3, 3],
        mu_w=[2.0, 0.0, 1.0, 5.0, 1.0, 3.0, 0.0, 2.0, 1.0],
        mu_l=[1.0, 1.0, 1.0, 4.0, 0.0, 4.0, 1.0, 1.0, 0.5],
    )
    # 1: right, wrong, tie, right -> 2.5/4; 2: right, wrong -> 1/2; 3: wrong, right, right
    assert [r.correct for r in records] == [1, 0, 0.5, 1, 1, 0, 0, 1, 1]
    summary = accuracy_summary(records)
    assert summary["pairs"] == 9 and summary["accuracy"] == pytest.approx(5.5 / 9)
    groups = summary["by_num_perturbed"]
    assert list(groups) == ["1", "2-3", "2", "3"]
    assert groups["1"] == {"pairs": 4, "accuracy": 0.625}
    assert groups["2-3"] == {"pairs": 5, "accuracy": pytest.approx(3 / 5)}
    assert groups["2"] == {"pairs": 2, "accuracy": 0.5}
    assert groups["3"] == {"pairs": 3, "accuracy": pytest.approx(2 / 3)}


def test_an_empty_group_has_no_accuracy():
    summary = accuracy_summary(_scored([1, 1], [1.0, 0.0], [0.0, 1.0]))
    assert summary["by_num_perturbed"]["2-3"] == {"pairs": 0, "accuracy": None}
    assert summary["by_num_perturbed"]["1"] == {"pairs": 2, "accuracy": 0.5}


def test_scores_do_not_depend_on_the_batch_size(model, shapes_pairs):
    one = score_pairs(model, shapes_pairs, batch_size=1)
    four = score_pairs(model, shapes_pairs, batch_size=4)
    assert [r.pair_id for r in four] == [p.pair_id for p in shapes_pairs]
    for a, b in zip(one, four, strict=True):
        assert a.mu_preferred == pytest.approx(b.mu_preferred, abs=1e-4)
        assert a.mu_rejected == pytest.approx(b.mu_rejected, abs=1e-4)
    with pytest.raises(ValueError, match="batch_size"):
        score_pairs(model, shapes_pairs, batch_size=0)


def test_a_nan_score_is_an_error(checkpoint, shapes_pairs):
    broken = SpatialScore.from_pretrained(checkpoint)
    with torch.no_grad():
        broken.head[2].bias[0] = float("nan")
    message = f"non-finite scores for pairs .*{shapes_pairs[0].pair_id}"
    with pytest.raises(ValueError, match=message):
        score_pairs(broken, shapes_pairs[:2], batch_size=2)


def test_eval_cli_end_to_end_with_judge(
    checkpoint, model, pairs_file, shapes_pairs, tiny_models_dir, tmp_path, capsys
):
    out = tmp_path / "eval"
    judge = tiny_models_dir / "qwen2.5-vl"
    argv = ["reward", "eval", "--model", str(checkpoint), "--pairs", str(pairs_file),
            "--out", str(out), "--judge", str(judge), "--batch-size", "4", "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 rows skipped" in printed and "spatialscore" in printed and "judge" in printed

    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["split"] == "test"
    assert summary["skipped_rows"] == 3
    assert summary["skipped_by_reason"] == {
        "corrupt_image_rejected": 1, "corrupt_image_preferred": 1, "empty_prompt": 1
    }

    # Per-pair file: the valid test pairs in file order, scored like SpatialScore.score.
    scores = pq.read_table(out / SCORES_FILE).to_pylist()
    assert [r["pair_id"] for r in scores] == [p.pair_id for p in shapes_pairs]
    assert [r["num_perturbed"] for r in scores] == [p.num_perturbed for p in shapes_pairs]
    assert {r["source"] for r in scores} == {"shapes"}
    pair = shapes_pairs[4]
    expected = model.score(
        [decode_image(pair.image_preferred), decode_image(pair.image_rejected)], [pair.prompt] * 2
    )
    assert scores[4]["mu_preferred"] == pytest.approx(expected.mu[0].item(), abs=1e-4)
    assert scores[4]["mu_rejected"] == pytest.approx(expected.mu[1].item(), abs=1e-4)
    assert scores[4]["sigma_rejected"] == pytest.approx(expected.sigma[1].item(), rel=1e-4)
    for row in scores:
        assert row["correct"] == float(row["mu_preferred"] > row["mu_rejected"])
        assert row["sigma_preferred"] > 0
    result = summary["spatialscore"]
    assert result["model"] == str(checkpoint) and result["pairs"] == 6
    assert result["accuracy"] == pytest.approx(sum(r["correct"] for r in scores) / 6)
    assert {g: v["pairs"] for g, v in result["by_num_perturbed"].items()} == {
        "1": 2, "2-3": 4, "2": 2, "3": 2
    }
    by_one = [r["correct"] for r in scores if r["num_perturbed"] == 1]
    assert result["by_num_perturbed"]["1"]["accuracy"] == pytest.approx(sum(by_one) / 2)

    judged = pq.read_table(out / JUDGE_FILE).to_pylist()
    assert [r["pair_id"] for r in judged] == [p.pair_id for p in shapes_pairs]
    for row in judged:
        mean = (row["p_preferred_shown_first"] + row["p_preferred_shown_second"]) / 2
        assert row["p_preferred"] == pytest.approx(mean)
        assert row["correct"] == float(row["p_preferred"] > 0.5)
    assert summary["judge"]["model"] == str(judge)
    assert summary["judge"]["accuracy"] == pytest.approx(sum(r["correct"] for r in judged) / 6)


def test_eval_cli_train_split_and_all(checkpoint, pairs_file, tmp_path, capsys):
    for split, count in (("train", 2), ("all", 8)):
        out = tmp_path / split
        argv = ["reward", "eval", "--model", str(checkpoint), "--pairs", str(pairs_file),
                "--out", str(out), "--split", split]
        assert main(argv) == 0
        summary = json.loads((out / SUMMARY_FILE).read_text())
        assert summary["spatialscore"]["pairs"] == count
        assert not (out / JUDGE_FILE).exists()
        # A progress bar over the pairs, with their total.
        err = capsys.readouterr().err
        assert "spatialscore: 100%" in err and f"| {count}/{count} [" in err


def test_eval_cli_bad_pair_files(checkpoint, shapes_pairs, tmp_path, capsys):
    def run(path):
        argv = ["reward", "eval", "--model", str(checkpoint), "--pairs", str(path),
                "--out", str(tmp_path / "out")]
        assert main(argv) == 2
        return capsys.readouterr().err

    table = pa.Table.from_pylist([dataclasses.asdict(shapes_pairs[0])], schema=PAIR_SCHEMA)
    pq.write_table(table.drop_columns(["num_perturbed"]), tmp_path / "no-column.parquet")
    assert "missing column 'num_perturbed'" in run(tmp_path / "no-column.parquet")

    (tmp_path / "text.parquet").write_text("prompt,image\n")
    assert "not a readable parquet file" in run(tmp_path / "text.parquet")

    assert "pairs file not found" in run(tmp_path / "nowhere.parquet")

    only_bad = dataclasses.replace(shapes_pairs[0], image_preferred=b"junk")
    write_pairs(tmp_path / "all-bad.parquet", [only_bad])
    err = run(tmp_path / "all-bad.parquet")
    assert "no valid pairs in split 'test'" in err and "corrupt_image_preferred" in err
    assert read_pairs(tmp_path / "all-bad.parquet").skipped == {"corrupt_image_preferred": 1}


def test_score_cli_prints_mu_and_sigma_per_image(model, checkpoint, shapes_pairs, tmp_path, capsys):
    paths = []
    for index, pair in enumerate(shapes_pairs[:3]):
        paths.append(tmp_path / f"image-{index}.png")
        decode_image(pair.image_preferred).save(paths[-1])
    prompt = shapes_pairs[0].prompt
    argv = ["reward", "score", "--model", str(checkpoint), "--prompt", prompt, "--batch-size", "2",
            *map(str, paths)]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    images = [decode_image(p.image_preferred) for p in shapes_pairs[:3]]
    expected = model.score(images, [prompt] * 3)
    assert [line["image"] for line in lines] == list(map(str, paths))
    assert [line["prompt"] for line in lines] == [prompt] * 3
    assert [line["mu"] for line in lines] == pytest.approx(expected.mu.tolist(), abs=1e-4)
    assert [line["sigma"] for line in lines] == pytest.approx(expected.sigma.tolist(), rel=1e-4)

    # The same requests as JSON lines, image paths relative to the file.
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(
        json.dumps({"prompt": prompt, "image": path.name}) + "\n" for path in paths[:2]
    ) + "\n")
    assert main(["reward", "score", "--model", str(checkpoint), "--jsonl", str(requests)]) == 0
    from_file = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["mu"] for line in from_file] == pytest.approx(expected.mu[:2].tolist(), abs=1e-4)


def test_score_cli_bad_inputs_are_named(checkpoint, shapes_pairs, tmp_path, capsys):
    image = tmp_path / "ok.png"
    decode_image(shapes_pairs[0].image_preferred).save(image)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    jsonl = tmp_path / "requests.jsonl"
    model = ["reward", "score", "--model", str(checkpoint)]
    cases = [
        (["--prompt", "", str(image)], "--prompt: empty prompt"),
        (["--prompt", "a red circle", str(tmp_path / "missing.png")],
         f"image not found: {tmp_path / 'missing.png'}"),
        (["--prompt", "a red circle", str(not_image)], f"{not_image}: not a readable image"),
        (["--prompt", "a red circle"], "at least one IMAGE"),
        (["--jsonl", str(jsonl), "--prompt", "a red circle"], "not both"),
        (["--jsonl", str(jsonl)], f"{jsonl}:2: empty prompt"),
    ]
    jsonl.write_text(
        json.dumps({"prompt": "a red circle", "image": "ok.png"}) + "\n"
        + json.dumps({"prompt": " ", "image": "ok.png"}) + "\n"
    )
    for extra, message in cases:
        assert main([*model, *extra]) == 2, extra
        assert message in capsys.readouterr().err
    for content, message in [("{oops\n", f"{jsonl}:1: not JSON"),
                             ('{"prompt": "a cat"}\n', "needs the keys 'prompt' and 'image'")]:
        jsonl.write_text(content)
        assert main([*model, "--jsonl", str(jsonl)]) == 2
        assert message in capsys.readouterr().err


def test_empty_prompt_reaches_the_model_as_a_clear_error(model, shapes_pairs):
    empty = dataclasses.replace(shapes_pairs[0], prompt="")
    with pytest.raises(ValueError, match=r"prompts\[0\]: empty prompt"):
        score_pairs(model, [empty], batch_size=1)
