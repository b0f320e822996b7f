"""fastdae.evaluation end to end at a tiny budget: the three arms through the CLI, resume, the ablation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from fastdae import cli
from fastdae import evaluation as compare
from fastdae.evaluation import METRICS, EvalConfig
from fastdae.evaluation.report import capacity_curves as _capacity_curves
from fastdae.evaluation.report import summarize as _summarize

TINY_EVAL = dict(
    eval_images=32,
    classifier_images=256,
    classifier_steps=20,
    lipschitz_pairs=4,
    probe_latents=4,
    capacity_images=16,
    capacity_widths=[4, 8],
    capacity_steps=3,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_summarize_mean_std_and_missing():
    runs = {
        "a": [{"psnr": 10.0, "min_width": None}, {"psnr": 14.0, "min_width": None}],
        "b": [{"psnr": 12.0, "min_width": 8}, {"min_width": None}],
    }
    s = _summarize(runs)
    # sample std; 95% interval mean +- t_{0.975, 1} std / sqrt(2) = 12 +- 12.706205 * 2
    assert s["a"]["psnr"] == {
        "mean": 12.0,
        "std": pytest.approx(2**0.5 * 2),
        "n": 2,
        "ci95": pytest.approx([12 - 25.41241, 12 + 25.41241]),
    }
    assert s["a"]["min_width"] == {"n": 0}
    assert s["b"]["psnr"] == {"mean": 12.0, "std": 0.0, "n": 1, "ci95": None} and s["b"]["min_width"]["mean"] == 8
    assert "ssim" not in s["a"]


def test_verdict_states_wins_losses_probes_and_learning():
    from fastdae.evaluation.report import markdown, pairwise_tests

    # dae: clearly better FD-feat and Lipschitz bound than joint, clearly worse PSNR; control as dae on PSNR
    runs = {
        "joint": [
            {"psnr": 21.0 + e, "fd_feat": 20.0 + e, "lipschitz": 5.0 + e, "class_accuracy": 0.9 + e / 10}
            for e in (0.0, 0.1, -0.1)
        ],
        "dae": [
            {"psnr": 20.0 + e, "fd_feat": 10.0 + e, "lipschitz": 3.0 + e, "class_accuracy": 0.7 + e / 10}
            for e in (0.0, 0.1, -0.1)
        ],
        "control": [
            {"psnr": 20.0 + e, "fd_feat": 10.2 + e, "lipschitz": 3.1 + 2 * e, "class_accuracy": 0.7}
            for e in (0.0, 0.1, -0.1)
        ],
    }
    report = {
        "title": "t",
        "seeds": 3,
        "device": "cpu",
        "torch": "x",
        "summary": _summarize(runs),
        "tests": pairwise_tests(runs),
        "reference": {"num_classes": 4, "class_accuracy_real": 1.0},
    }
    md = markdown(report)
    assert (
        "- **DAE vs joint**: DAE is significantly better on FD-feat (samples), Lipschitz lower bound; joint on "
        "PSNR (dB), class accuracy; no significant difference on the other 0 of 4 metrics. Complexity probes (the "
        "paper predicts DAE's decoder is the simpler): DAE's mean is lower on 1 of 1 (Lipschitz lower bound)."
    ) in md
    assert (
        "- **DAE vs control**: DAE is significantly better on no metric; control on no metric; no significant "
        "difference on the other 4 of 4 metrics."
    ) in md
    assert (
        "Class accuracy of samples: joint 0.90, dae 0.70, control 0.70 (chance 0.25, real images 1); at or above "
        "0.8: joint."
    ) in md
    runs["joint"] = [{**r, "class_accuracy": 0.5} for r in runs["joint"]]
    report.update(summary=_summarize(runs), tests=pairwise_tests(runs))
    assert "no arm reaches 0.8: the generation metrics compare priors that learned the classes only partly" in markdown(
        report
    )


def test_capacity_curves_in_psnr():
    # MSE 0.04 on the [-1, 1] range (4 = range^2) is 20 dB, 0.004 is 30 dB
    runs = {
        "a": [
            {"capacity_curve": [{"width": 4, "error": 0.04}, {"width": 8, "error": 0.004}]},
            {"capacity_curve": [{"width": 4, "error": 0.04}, {"width": 8, "error": 0.004}]},
        ]
    }
    c = _capacity_curves(runs)
    assert c["a"]["4"] == {"mean": pytest.approx(20.0), "std": 0.0, "n": 2, "ci95": pytest.approx([20.0, 20.0])}
    assert c["a"]["8"]["mean"] == pytest.approx(30.0)


def test_compare_cli_end_to_end_and_resume(tmp_path):
    eval_file = tmp_path / "eval.yaml"
    eval_file.write_text(yaml.safe_dump(TINY_EVAL))
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--preset",
        "tiny",
        "--arms",
        "joint,dae,control",
        "--seeds",
        "1",
        "--out",
        str(out),
        "--eval",
        str(eval_file),
        "--prior.num_samples",
        "8",
    ]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["summary"]) == ["joint", "dae", "control"]
    assert report["config"]["prior"]["num_samples"] == 8  # the override reached every run
    assert report["command"].startswith("python -m fastdae compare --preset tiny --arms joint,dae,control")
    for arm in ("joint", "dae", "control"):
        (run,) = report["runs"][arm]
        assert run["num_samples"] == 8
        for key in (
            "psnr",
            "ssim",
            "rfd_feat",
            "fd_feat",
            "validity",
            "class_accuracy",
            "prior_loss",
            "lipschitz",
            "jac_spectral",
            "jac_frobenius",
            "penalised_distance",
        ):
            assert isinstance(run[key], float), (arm, key)
        assert [c["width"] for c in run["capacity_curve"]] == [4, 8]
        assert (out / "runs" / f"{arm}-s0" / "eval.json").is_file()
    # joint has no stage 2; the decoupled arms trained a fresh decoder in stage 2
    assert not (out / "runs" / "joint-s0" / "stage2").exists()
    assert (out / "runs" / "dae-s0" / "stage2" / "decoder.safetensors").is_file()
    md = (out / "report.md").read_text()
    assert "| PSNR (dB) | ↑ |" in md and "| FD-feat (samples) | ↓ |" in md
    assert "| FID" not in md and "| rFID" not in md  # no Inception weights given: never called FID
    assert "Minimal-capacity probe" in md and "| 4 |" in md and "| 8 |" in md
    # one seed: every arm pair is listed per metric, and said to be untestable rather than tested
    assert {(t["a"], t["b"]) for t in report["tests"]} == {("dae", "joint"), ("dae", "control"), ("control", "joint")}
    assert all(t["p"] is None for t in report["tests"]) and "- DAE vs joint on FD-feat (samples): DAE - joint = " in md
    for png in ("metrics.png", "samples.png"):
        assert (out / png).stat().st_size > 0
    # a second call reuses the finished runs' evaluations and the judge's classifier instead of training again
    stamps = [(out / p).stat().st_mtime_ns for p in ("runs/dae-s0/eval.json", "judge/classifier.safetensors")]
    assert cli.main(argv) == 0
    assert [(out / p).stat().st_mtime_ns for p in ("runs/dae-s0/eval.json", "judge/classifier.safetensors")] == stamps
    assert json.loads((out / "report.json").read_text())["runs"] == report["runs"]
    # an eval.json written before a config key existed is reused while the key is at its default
    older = json.loads((out / "runs/dae-s0/eval.json").read_text())
    del older["identity"]["config"]["stage1.chroma_weight"]
    (out / "runs/dae-s0/eval.json").write_text(json.dumps(older))
    stamps[0] = (out / "runs/dae-s0/eval.json").stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert (out / "runs/dae-s0/eval.json").stat().st_mtime_ns == stamps[0]
    # another EvalConfig: every run is evaluated again (nothing retrained); another training config: refused
    eval_file.write_text(yaml.safe_dump({**TINY_EVAL, "lipschitz_pairs": 6}))
    weights = (out / "runs/dae-s0/stage2/decoder.safetensors").stat().st_mtime_ns
    assert cli.main(argv) == 0
    assert (out / "runs/dae-s0/eval.json").stat().st_mtime_ns != stamps[0]
    assert (out / "runs/dae-s0/stage2/decoder.safetensors").stat().st_mtime_ns == weights
    assert cli.main([*argv, "--stage2.l1_weight", "2"]) == 2  # the runs hold another config: not mixed in


def test_ablation_picks_a_value(tmp_path):
    from fastdae.config import preset

    report = compare.ablation(
        preset("tiny"),
        "dropout",
        [0.0, 0.3],
        seeds=1,
        out_dir=tmp_path / "abl",
        eval_config=EvalConfig(**TINY_EVAL),
        select="psnr",
    )
    assert list(report["summary"]) == ["dropout=0.0", "dropout=0.3"]
    psnr = {v: s["psnr"]["mean"] for v, s in report["summary"].items()}
    assert report["best"] == {"variant": max(psnr, key=psnr.get), "select": "psnr", "mean": max(psnr.values())}
    cfg = yaml.safe_load((tmp_path / "abl" / "runs" / "dropout=0.3-s0" / "config.yaml").read_text())
    assert cfg["weak_decoder"]["dropout"] == 0.3 and cfg["mode"] == "dae"
    assert "Best by psnr" in (tmp_path / "abl" / "report.md").read_text()


def test_argument_errors():
    with pytest.raises(ValueError, match="arms"):
        compare.compare({"out_dir": "unused"}, arms=("joint", "vae"))
    with pytest.raises(ValueError, match="knob"):
        compare.ablation({"out_dir": "unused"}, "depth", [1])
    with pytest.raises(ValueError, match="select"):
        compare.ablation({"out_dir": "unused"}, "dropout", [0.1], select="accuracy")
    assert {k for k, _, _ in METRICS} >= {"psnr", "fd_feat", "min_width", "penalised_distance"}


@pytest.mark.parametrize("matplotlib", [True, False])
def test_report_charts_with_and_without_matplotlib(tmp_path, monkeypatch, matplotlib):
    import sys

    from fastdae.evaluation import write_report

    if not matplotlib:
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    else:
        pytest.importorskip("matplotlib")
    report = {
        "title": "t",
        "command": None,
        "seeds": 2,
        "device": "cpu",
        "torch": "x",
        "reference": {},
        "eval": {},
        "capacity": {},
        "sample_grids": {},
        "summary": {
            "a": {"psnr": {"mean": 20.0, "std": 1.0, "n": 2}},
            "b": {"psnr": {"mean": 22.0, "std": 0.5, "n": 2}},
        },
    }
    write_report(report, tmp_path)
    md = (tmp_path / "report.md").read_text()
    if matplotlib:
        assert (tmp_path / "metrics.png").stat().st_size > 0 and "![metrics](metrics.png)" in md
    else:
        assert not (tmp_path / "metrics.png").exists() and "pip install 'fastdae[plots]'" in md


# ---- the judge sees held-out items only, on a class-subfolder folder and a labelled .npz ----------------
def _class_folder(root, classes: int, per_class: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):  # a class is a colour, plus noise: learnable, never identical
            pixels = np.clip(rng.normal(60 * c + 40, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i:02d}.png")


def _labelled_npz(path, classes: int, per_class: int, size: int) -> None:
    rng = np.random.default_rng(1)
    labels = rng.permutation(np.repeat(np.arange(classes), per_class))
    images = np.clip(rng.normal(60 * labels[:, None, None, None] + 40, 20, size=(len(labels), size, size, 3)), 0, 255)
    np.savez(path, images=images.astype(np.uint8), labels=labels)


@pytest.mark.parametrize("kind", ["folder", "array"])
def test_compare_judges_only_heldout_items(tmp_path, monkeypatch, kind):
    from fastdae.cache import LatentCache
    from fastdae.config import apply_overrides, preset
    from fastdae.data import build_dataset, dataset_fingerprint, split_dataset
    from fastdae.evaluation import build_judge

    monkeypatch.setenv("FASTDAE_INDEX_DIR", str(tmp_path / "index"))
    classes, per_class = 5, 10  # sorted class folders: the last class's label (4) only among the last items
    root = tmp_path / ("imgs" if kind == "folder" else "data.npz")
    (_class_folder if kind == "folder" else _labelled_npz)(root, classes, per_class, 16)
    cfg = apply_overrides(preset("tiny"), {"data.name": kind, "data.root": str(root), "data.holdout": "0.4"})
    ev = EvalConfig(**{**TINY_EVAL, "eval_images": 8, "classifier_images": 8})  # + 4 floor (prior.num_samples)
    out = tmp_path / "cmp"
    report = compare.compare(cfg, arms=("dae",), seeds=1, out_dir=out, eval_config=ev, log=lambda *_: None)

    ds = build_dataset(cfg.data)
    train, heldout = split_dataset(ds, cfg.data)
    assert ds.num_classes == classes and (len(train), len(heldout)) == (30, 20)
    assert report["split"] == {
        "train_items": 30,
        "heldout_items": 20,
        "eval_images": 8,
        "floor_images": 4,
        "classifier_images": 8,
    }
    assert "20 held out" in (out / "report.md").read_text()
    (run,) = report["runs"]["dae"]
    assert isinstance(run["psnr"], float) and isinstance(run["class_accuracy"], float)
    assert 0.0 <= report["reference"]["classifier_accuracy"] <= 1.0 and "fd_feat_real" in report["reference"]
    # the cache saw exactly the training split: its fingerprint covers the split's indices, and its labels match
    run_dir = out / "runs" / "dae-s0"
    cache = LatentCache(run_dir / "cache")
    cache.check(dataset_fingerprint=dataset_fingerprint(train))
    assert len(cache) == len(train)
    assert np.array_equal(cache.gather(np.arange(len(cache)))["label"].numpy(), train.labels)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stages"]["prior"]["num_classes"] == classes  # from the dataset, not from a sample of labels
    # the judge (reused from the study: the classifier is not trained again) uses held-out items only
    stamp = (out / "judge" / "classifier.safetensors").stat().st_mtime_ns
    judge = build_judge(cfg, ev, out, log=lambda *_: None)
    assert (out / "judge" / "classifier.safetensors").stat().st_mtime_ns == stamp
    assert judge.classifier.num_classes == classes
    used = np.concatenate(list(judge.indices.values()))
    assert len(set(used.tolist())) == len(used) == 20
    assert set(used.tolist()) == set(heldout.indices.tolist()) and not set(used.tolist()) & set(train.indices.tolist())
    assert np.array_equal(judge.labels.numpy(), ds.labels[judge.indices["eval"]])


def test_judge_parts_are_consecutive_and_share_a_short_split():
    from fastdae.measure.judge import judge_parts

    assert judge_parts(100, 20, 10, 30) == {"eval": range(20), "floor": range(20, 30), "classifier": range(30, 60)}
    # too few held-out items: the classifier gets half, evaluation and floor the rest in proportion
    assert judge_parts(20, 12, 4, 100) == {"eval": range(8), "floor": range(8, 10), "classifier": range(10, 20)}


def test_compare_on_textures_with_two_seeds_tests_the_arms(tmp_path):
    # the second procedural dataset through the CLI, as the study's commands run it; two seeds per arm,
    # so Welch's test has a spread to scale and every pair and metric gets a p-value or a reason
    eval_file = tmp_path / "eval.yaml"
    eval_file.write_text(yaml.safe_dump(TINY_EVAL))
    out = tmp_path / "tex"
    argv = [
        "compare",
        "--preset",
        "tiny",
        "--arms",
        "dae,joint",
        "--seeds",
        "2",
        "--out",
        str(out),
        "--eval",
        str(eval_file),
        "--data.name",
        "textures",
        "--prior.num_samples",
        "8",
    ]
    assert cli.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["data"]["name"] == "textures" and report["split"]["heldout_items"] == 16384
    assert [len(report["runs"][a]) for a in ("dae", "joint")] == [2, 2]
    s = report["summary"]["dae"]["psnr"]
    assert s["n"] == 2 and s["ci95"][0] < s["mean"] < s["ci95"][1]
    tests = {t["metric"]: t for t in report["tests"]}
    assert {(t["a"], t["b"]) for t in report["tests"]} == {("dae", "joint")}  # control did not run
    psnr = tests["psnr"]
    assert (psnr["n_a"], psnr["n_b"]) == (2, 2) and 0.0 <= psnr["p"] <= 1.0 and psnr["dof"] > 0
    md = (out / "report.md").read_text()
    assert "### DAE vs joint" in md and md.split("## Significance")[1].count("\n- ") == len(report["tests"])
    assert "- **DAE vs joint**: DAE is significantly better on" in md.split("## Significance")[0]  # the verdict
