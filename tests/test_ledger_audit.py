"""audit_ledger: what a run's per-sample ledger says was trained on, group by group."""

from spatialrl.config import load_config
from spatialrl.train_batch import audit_ledger, write_ledger


def rows(iteration: int, group_id: int, kept: list[bool]) -> list[dict]:
    return [{"prompt": "p", "group_id": group_id, "iteration": iteration, "seed": i,
             "version": iteration, "mu": 0.0, "sigma": 0.0, "advantage": 0.0, "kept": k}
            for i, k in enumerate(kept)]


def test_every_kind_of_loss_is_counted(tmp_path):
    cfg = load_config("configs/tiny.yaml", [
        f"output_dir={tmp_path}", "iterations=3", "prompts.prompts_per_iteration=2",
        "grpo.group_size=4", "grpo.top_k=1"])
    whole = [True, False, False, True]
    write_ledger(tmp_path, 0, rows(0, 0, whole) + rows(0, 1, whole))
    # Iteration 1: group 2 twice, group 3 missing, and a row of iteration 0's group 1.
    write_ledger(tmp_path, 1, rows(1, 2, whole) * 2 + rows(0, 1, [True]))
    # Iteration 2: group 4 in part, group 5 with three kept.
    write_ledger(tmp_path, 2, rows(2, 4, whole[:3]) + rows(2, 5, [True, True, True, False]))
    # Group 2, trained twice, also kept 4 samples instead of 2: wrong_kept counts it too.
    assert audit_ledger(cfg) == {"groups_twice": 1, "groups_partial": 1, "groups_missing": 1,
                                 "groups_wrong_kept": 3, "foreign_rows": 1}
    write_ledger(tmp_path, 1, rows(1, 2, whole) + rows(1, 3, whole))
    write_ledger(tmp_path, 2, rows(2, 4, whole) + rows(2, 5, whole))
    assert set(audit_ledger(cfg).values()) == {0}
