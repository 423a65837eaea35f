"""Grouping rules, seed statistics, the report and the figures, on hand-made data."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from diffurec_lightning.analysis import groups, plots
from diffurec_lightning.analysis.curves import curves_figure, curves_markdown
from diffurec_lightning.analysis.report import build_report, main
from diffurec_lightning.analysis.seeds import load_runs, paired_ttest, summary_rows, ttest_rows
from diffurec_lightning.errors import ConfigError, DiffuRecError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the PNG signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


# -- grouping rules ---------------------------------------------------------------------------
def test_head_items_are_the_top_fifth_by_count() -> None:
    # items 1..10; the two most frequent are item 3 (9 interactions) and item 8 (7).
    counts = np.array([0, 5, 1, 9, 3, 3, 0, 2, 7, 1, 4])
    mask = groups.head_items(counts, 0.2)
    assert np.flatnonzero(mask).tolist() == [3, 8]
    assert not mask[0]  # padding is never head


def test_head_ties_go_to_the_smaller_id_and_size_rounds_up() -> None:
    counts = np.array([0, 4, 4, 4, 1, 1])  # 5 items: ceil(0.2 * 5) = 1 head item
    assert np.flatnonzero(groups.head_items(counts, 0.2)).tolist() == [1]
    counts = np.array([0] + [1] * 11)  # 11 items: ceil(2.2) = 3 head items, all tied
    assert np.flatnonzero(groups.head_items(counts, 0.2)).tolist() == [1, 2, 3]
    with pytest.raises(ConfigError, match="head_fraction"):
        groups.head_items(counts, 1.5)


def test_popularity_groups_follow_the_target() -> None:
    head = groups.head_items(np.array([0, 5, 1, 9, 3, 3, 0, 2, 7, 1, 4]), 0.2)  # head: 3, 8
    targets = np.array([3, 1, 8, 10, 3])
    assert groups.popularity_groups(targets, head).tolist() == [0, 1, 0, 1, 0]


def test_length_groups_split_at_percentiles() -> None:
    lengths = np.array([3, 3, 3, 4, 5, 6, 7, 8, 9, 10])
    # numpy's linear percentiles, by hand: position p/100 * (n - 1) in the sorted lengths.
    # 20% -> 1.8 -> 3; 40% -> 3.6 -> 4 + 0.6 = 4.6; 60% -> 5.4 -> 6.4; 80% -> 7.2 -> 8.2.
    edges = groups.length_edges(lengths)
    assert edges.tolist() == pytest.approx([3.0, 4.6, 6.4, 8.2])
    assert groups.length_groups(lengths, edges).tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 4, 4]
    labels = groups.length_group_labels(lengths, groups.length_groups(lengths, edges), 5)
    assert labels == ["3", "4", "5-6", "7-8", "9-10"]


def test_tied_lengths_share_a_group() -> None:
    lengths = np.array([5, 5, 5, 5, 5, 5, 5, 5, 6, 9])
    # 20/40/60%: positions 1.8, 3.6, 5.4 all fall among the 5s; 80%: 7.2 -> 5 + 0.2 * (6 - 5).
    edges = groups.length_edges(lengths)
    assert edges.tolist() == pytest.approx([5.0, 5.0, 5.0, 5.2])
    grouped = groups.length_groups(lengths, edges)
    assert grouped.tolist() == [0] * 8 + [4, 4]
    labels = groups.length_group_labels(lengths, grouped, 5)
    assert labels == ["5", "empty", "empty", "empty", "6-9"]


def test_group_metrics_by_hand() -> None:
    ranks = np.array([1, 3, 11, 2])
    result = groups.group_metrics(ranks, np.array([0, 0, 1, 1]), ["a", "b"], ks=(2, 10))
    assert result["a"] == pytest.approx(
        {"users": 2, "hr@2": 0.5, "ndcg@2": 0.5, "hr@10": 1.0, "ndcg@10": (1 + 1 / 2) / 2}
    )
    assert result["b"] == pytest.approx(
        {"users": 2, "hr@2": 0.5, "ndcg@2": (1 / math.log2(3)) / 2, "hr@10": 0.5,
         "ndcg@10": (1 / math.log2(3)) / 2}
    )  # fmt: skip


def test_case_studies_use_dataset_wide_counts_and_lengths() -> None:
    counts = np.array([0, 5, 1, 9, 3, 3, 0, 2, 7, 1, 4])  # head items: 3 and 8
    all_lengths = np.array([3, 3, 3, 4, 5, 6, 7, 8, 9, 10])
    tested = np.array([0, 3, 9])  # three of the ten users were tested
    result = groups.case_studies(
        ranks=np.array([1, 30, 4]),
        targets=np.array([3, 1, 8]),
        user_lengths=all_lengths[tested],
        all_lengths=all_lengths,
        item_counts=counts,
        ks=(5,),
    )
    assert result["num_head_items"] == 2
    assert result["popularity"]["head"]["users"] == 2
    assert result["popularity"]["head"]["hr@5"] == 1.0
    assert result["popularity"]["tail"]["hr@5"] == 0.0
    assert [result["length"][f"len{g}"]["users"] for g in range(1, 6)] == [1, 1, 0, 0, 1]
    assert math.isnan(result["length"]["len3"]["hr@5"])


# -- seeds: paired t-test ---------------------------------------------------------------------
def write_run(root: Path, model: str, seed: int, test: dict[str, float], **extra) -> Path:
    folder = root / f"{model}_s{seed}"
    folder.mkdir(parents=True)
    payload = {
        "config": {"trainer": {"max_epochs": 3}, "model": {"hidden_size": 16}},
        "dataset": "toys", "model": model, "seed": seed, "val": {}, "val_best": {},
        "test": test, "epochs": 3, "wall_time_s": 10.0, "best_checkpoint": "", **extra,
    }  # fmt: skip
    (folder / "results.json").write_text(json.dumps(payload))
    return folder


METRIC_NAMES = ("hr@5", "hr@10", "hr@20", "ndcg@5", "ndcg@10", "ndcg@20")
BASE = {0: 0.050, 1: 0.060, 2: 0.055}
OURS = {0: 0.058, 1: 0.061, 2: 0.065}


def metrics(value: float, **groups_: float) -> dict[str, float]:
    out = {f"test/{m}": value + i * 0.01 for i, m in enumerate(METRIC_NAMES)}
    out.update({f"test/{g}/{m}": v for g, v in groups_.items() for m in ("hr@10", "ndcg@10")})
    return out


def fake_runs(root: Path) -> None:
    for seed in BASE:
        write_run(root, "diffurec", seed, metrics(BASE[seed], head=0.2, tail=0.01, len1=0.05))
        write_run(root, "diffurecsys", seed, metrics(OURS[seed], head=0.3, tail=0.02, len1=0.06))


def test_paired_t_statistic_and_p_value_by_hand(tmp_path: Path) -> None:
    fake_runs(tmp_path)
    runs, notes = load_runs([tmp_path])
    assert len(runs) == 6 and notes == []
    rows = {r["metric"]: r for r in ttest_rows(runs, "diffurec")}
    # By hand: differences 0.008, 0.001, 0.010; mean 0.019 / 3; sample sd from squared deviations.
    diffs = [OURS[s] - BASE[s] for s in (0, 1, 2)]
    mean = sum(diffs) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (3 - 1))
    t = mean / (sd / math.sqrt(3))
    p = 2 * stats.t.sf(abs(t), df=2)
    assert t == pytest.approx(2.3212, abs=1e-4)  # 0.0063333 / (0.0047258 / sqrt 3)
    # With 2 degrees of freedom the two-sided p-value has a closed form: 1 - t / sqrt(t^2 + 2).
    assert p == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    for metric in METRIC_NAMES:  # every metric is shifted equally: same differences
        assert rows[metric]["t"] == pytest.approx(t, rel=1e-9)
        assert rows[metric]["p"] == pytest.approx(p, rel=1e-9)
        assert rows[metric]["n"] == 3 and rows[metric]["seeds"] == [0, 1, 2]
    rel = np.mean([(OURS[s] - BASE[s]) / BASE[s] for s in (0, 1, 2)])
    assert rows["hr@5"]["rel_diff"] == pytest.approx(rel)


def test_pairs_only_shared_seeds_and_summary_uses_sample_std(tmp_path: Path) -> None:
    fake_runs(tmp_path)
    write_run(tmp_path, "diffurecsys", 7, metrics(0.9))  # no baseline partner: not paired
    runs, _ = load_runs([tmp_path])
    (row,) = [r for r in ttest_rows(runs, "diffurec") if r["metric"] == "hr@5"]
    assert row["seeds"] == [0, 1, 2]
    summary = {r["model"]: r for r in summary_rows(runs)}
    values = [BASE[s] for s in (0, 1, 2)]
    assert summary["diffurec"]["hr@5_mean"] == pytest.approx(np.mean(values))
    assert summary["diffurec"]["hr@5_std"] == pytest.approx(np.std(values, ddof=1))
    assert summary["diffurecsys"]["n"] == 4


def test_fewer_than_two_pairs_or_no_spread_give_no_test() -> None:
    # identical differences (deterministic models over seeds): undefined, not "p = 0"
    t, p = paired_ttest(np.array([0.1, 0.1, 0.1]), np.array([0.2, 0.2, 0.2]))
    assert math.isnan(t) and math.isnan(p)
    t, p = paired_ttest(np.array([0.1]), np.array([0.2]))
    assert math.isnan(t) and math.isnan(p)


def test_duplicate_seed_keeps_the_newest_and_skips_unfinished(tmp_path: Path) -> None:
    old = write_run(tmp_path / "a", "diffurec", 0, metrics(0.01))
    new = write_run(tmp_path / "b", "diffurec", 0, metrics(0.02))
    os.utime(old / "results.json", (1, 1))
    write_run(tmp_path / "c", "diffurec", 1, {})  # test=false or crashed: no test metrics
    runs, notes = load_runs([tmp_path])
    assert [r["dir"] for r in runs] == [str(new)]
    assert any("twice" in n for n in notes) and any("no test metrics" in n for n in notes)


# -- the report ------------------------------------------------------------------------------
def test_report_on_two_fake_finished_runs(tmp_path: Path) -> None:
    val = {f"val/{m}": 0.07 for m in METRIC_NAMES}
    write_run(tmp_path / "runs", "diffurec", 0, metrics(0.05), val_best=val, val_best_epoch=4)
    write_run(tmp_path / "runs", "diffurecsys", 0, metrics(0.06))  # no validation recorded
    out = tmp_path / "docs" / "report.md"
    result = build_report([tmp_path / "runs"], "diffurec", out)
    text = out.read_text()
    # Validation of the tested checkpoint beside its test; one seed: no std.
    assert "| seeds | epoch | val hr@5 | test hr@5 | val hr@10 |" in text
    assert "| toys | diffurec | 0 | 4 | 0.0700 ± — | 0.0500 ± — | 0.0700 ± — | 0.0600 ± — |" in text
    assert "| toys | diffurecsys | 0 | — | — ± — | 0.0600 ± — |" in text
    # The published numbers of method.md, under ours.
    assert "| toys | diffurec | this project, test (mean of 1) | 0.0500 |" in text
    assert (
        "| toys | diffurec | published: DiffuRecSys paper, Table 3 (DiffuRec baseline) | 0.0557 |"
        in text
    )
    assert "| toys | sasrec | published: DiffuRecSys paper, Table 5 | — | 0.0652 |" in text
    assert "| toys | diffurecsys | hr@5 | 1 | 0.0600 | 0.0500 | +20.0% | — | — |" in text
    assert "trainer.max_epochs" in text and "| 3 |" in text
    assert len(result["ttest"]) == 6


def test_report_markdown_figure_and_wandb_files(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    fake_runs(tmp_path / "runs")
    out = tmp_path / "docs" / "report.md"
    code = main([
        "--runs", str(tmp_path / "runs"), "--baseline", "diffurec", "--out", str(out),
        "--figures", str(tmp_path / "docs" / "figures"), "--wandb-dir", str(tmp_path / "wb"),
    ])  # fmt: skip
    assert code == 0
    text = out.read_text()
    t = ttest_rows(load_runs([tmp_path / "runs"])[0], "diffurec")[0]["t"]
    assert f"| {t:.3f} | 0.146 |" in text  # the hand-checked t = 2.321 above, p = 0.146
    assert "| toys | diffurecsys | head | 0.3000 ± 0.0000 |" in text
    assert "![Case studies on toys](figures/case_studies_toys.png)" in text
    assert png_size(tmp_path / "docs" / "figures" / "case_studies_toys.png") == (1000, 400)
    offline = list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1 and offline[0].stat().st_size > 0


def test_report_includes_tsne_pictures_and_inference_curves(tmp_path: Path) -> None:
    fake_runs(tmp_path / "runs")
    rng = np.random.default_rng(0)
    for seed in (1, 2):  # the report shows the lowest seed's picture
        plots.embedding_scatter(
            rng.normal(size=(20, 2)), rng.integers(0, 3, 20), rng.random(20) < 0.5,
            tmp_path / "runs" / f"diffurecsys_s{seed}" / "tsne.png", title=f"seed {seed}",
        )  # fmt: skip
    curves = tmp_path / "eval" / "12-00-00_curves"
    rows = [
        {"curve": "steps", "x": s, "steps": s, "ensemble": 1, "hr@10": 0.1 * s, "ndcg@10": 0.05,
         "hr@20": 0.2, "ndcg@20": 0.06, "same_rank": 1.0, "seconds": 2.0}
        for s in (1, 2)
    ] + [{"curve": "ensemble", "x": 2, "steps": 2, "ensemble": 2, "hr@10": 0.3, "ndcg@10": 0.05,
          "hr@20": 0.2, "ndcg@20": 0.06, "same_rank": 0.9, "seconds": 4.0}]  # fmt: skip
    curves.mkdir(parents=True)
    (curves / "curves.md").write_text(curves_markdown(rows, 100, "diffurecsys on toys"))
    curves_figure(rows, curves / "curves.png", "diffurecsys on toys")
    (curves / ".hydra").mkdir()
    (curves / ".hydra" / "overrides.yaml").write_text("- mode=curves\n- ckpt_path=x.ckpt\n")
    out, figures = tmp_path / "docs" / "report.md", tmp_path / "docs" / "figures"
    build_report([tmp_path / "runs"], "diffurec", out, figures, curve_dirs=[curves])
    text = out.read_text()
    assert "![t-SNE of x0, diffurecsys on toys, seed 1](figures/tsne_toys_diffurecsys.png)" in text
    assert "tsne_toys_diffurec.png" not in text  # no picture in those run folders
    copied = figures / "tsne_toys_diffurecsys.png"
    assert copied.read_bytes() == (tmp_path / "runs" / "diffurecsys_s1" / "tsne.png").read_bytes()
    assert "| steps | 2 | 1 | 0.2000 |" in text
    assert "`python -m diffurec_lightning.eval mode=curves ckpt_path=x.ckpt`" in text
    assert png_size(figures / "curves_0_12-00-00_curves.png") == png_size(curves / "curves.png")
    with pytest.raises(DiffuRecError, match="no curves.md/curves.png"):
        build_report([tmp_path / "runs"], "diffurec", out, figures, curve_dirs=[tmp_path])


def test_report_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["--runs", str(tmp_path), "--out", str(tmp_path / "r.md"), "--no-wandb"]) == 2
    assert "no finished runs" in capsys.readouterr().err
    with pytest.raises(DiffuRecError, match="no such folder"):
        build_report([tmp_path / "missing"], "diffurec", tmp_path / "r.md")


# -- figures ---------------------------------------------------------------------------------
def test_figures_are_pngs_of_the_expected_size(tmp_path: Path) -> None:
    bars = plots.grouped_bar_chart(
        [("a", ["x", "y"], {"hr@10": [0.1, 0.2], "ndcg@10": [0.05, float("nan")]})],
        tmp_path / "bars.png",
    )
    lines = plots.line_chart(
        [("steps", "steps", [1, 2, 4], {"hr@10": [0.1, 0.12, 0.13]}),
         ("ensemble", "members", [1, 2], {"hr@10": [0.1, 0.11]})],
        tmp_path / "lines.png",
    )  # fmt: skip
    rng = np.random.default_rng(0)
    scatter = plots.embedding_scatter(
        rng.normal(size=(50, 2)), rng.integers(0, 4, 50), rng.random(50) < 0.3, tmp_path / "s.png"
    )
    assert png_size(bars) == (1000, 400) and png_size(lines) == (1000, 400)
    assert png_size(scatter) == (600, 600)
    assert all(p.stat().st_size < 300_000 for p in (bars, lines, scatter))
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temp files


def test_curve_ranks_come_back_in_the_order_asked(tmp_path: Path) -> None:
    """Users are batched by length inside test_ranks; every rank must land on its own user."""
    import torch
    from builders import diffurec

    from diffurec_lightning.analysis.curves import test_ranks
    from diffurec_lightning.data.datamodule import SequenceDataModule
    from diffurec_lightning.data.sources import SyntheticSource

    datamodule = SequenceDataModule(
        name="synthetic", data_dir=str(tmp_path), max_len=10, batch_size=8, eval_batch_size=8,
        source=SyntheticSource(num_users=40, num_items=30, seed=1),
    )  # fmt: skip
    datamodule.setup()
    dataset = datamodule.dataset("test")
    assert len(set(dataset.lengths.tolist())) > 2  # lengths differ: the batching reorders
    torch.manual_seed(0)
    model = diffurec(
        num_items=datamodule.num_items, hidden_size=16, num_blocks=1, num_heads=2, num_steps=4,
        max_len=10,
    ).eval()  # fmt: skip
    picked = np.random.default_rng(0).permutation(len(dataset))[:25]
    cpu = torch.device("cpu")
    batched = test_ranks(model, dataset, picked, 8, cpu)
    alone = [test_ranks(model, dataset, picked[i : i + 1], 1, cpu)[0] for i in range(len(picked))]
    assert batched.tolist() == alone
