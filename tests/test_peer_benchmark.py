"""``kdet bench --compare``: the side-by-side harness's plumbing (no timing is asserted).

Tiny size, one repeat: each side runs in its own subprocess, rows come back
with wall and CPU time, the ratio table lists every (task, batch) and a
missing peer is skipped with a message instead of failing.
"""
import pytest
from conftest import backend

from kdet.workflow import peer_benchmark
from kdet.workflow.benchmark import benchmark


def _check_rows(rows, out, tasks, batch):
    sides = {r["side"] for r in rows}
    assert "kdet" in sides
    if peer_benchmark.peer_installed("effdet"):
        assert sides == {"kdet", "effdet"}
        assert "CPU ratio peer/kdet" in out
    else:
        assert "effdet is not installed" in out
    for r in rows:
        assert "error" not in r, r
        assert r["image_size"] == 128 and r["batch"] == batch and r["threads"] == 1
        assert r["wall_s"] > 0 and r["cpu_s"] >= 0
        assert r["cpu_s_per_image"] == r["cpu_s"] / batch
    assert {r["task"] for r in rows} == set(tasks)
    for task in tasks:
        assert f"| {task} | efficientdet lite0 @ 128 | {batch} |" in out


def test_predict_rows_and_ratio_table_from_subprocesses(capsys):
    if backend() != "tensorflow":
        pytest.skip("the subprocesses' plumbing does not depend on the backend; checked once, "
                    "on TensorFlow (JAX compiles the detector for ~1 min on CPU)")
    rows = benchmark({"model": "efficientdet", "phi": "lite0", "image_size": 128,
                      "compare": "effdet", "bench_batches": "1", "bench_train": False,
                      "bench_steps": 1, "warmup": 1, "verbose": 1})
    _check_rows(rows, capsys.readouterr().out, ["predict"], 1)


@pytest.mark.slow  # ~40 s CPU: tracing kdet's training step
def test_train_rows_from_subprocesses(capsys):
    if backend() != "tensorflow":
        pytest.skip("checked once, on TensorFlow (see above)")
    rows = benchmark({"model": "efficientdet", "phi": "lite0", "image_size": 128,
                      "compare": "effdet", "bench_batches": "2", "bench_steps": 1,
                      "warmup": 1, "verbose": 1})
    _check_rows(rows, capsys.readouterr().out, ["predict", "train"], 2)


def test_missing_peer_is_skipped_with_a_message(monkeypatch, capsys):
    monkeypatch.setattr(peer_benchmark, "peer_installed", lambda peer: False)
    monkeypatch.setattr(peer_benchmark, "_launch", lambda job, timeout: [dict(
        job, task=t, wall_s=1.0, cpu_s=0.5, cpu_s_per_image=0.5, images_per_s=1.0,
        first_wall_s=2.0) for t in job["tasks"]])
    rows, table = peer_benchmark.compare("maskrcnn", image_size=64, batches=(1,))
    assert "torchvision is not installed" in capsys.readouterr().out
    assert {r["side"] for r in rows} == {"kdet"} and rows[0]["image_size"] == 64
    assert "| predict | maskrcnn @ 64 | 1 | 0.500 |" in table and "torchvision" not in table


def test_ratio_is_peer_cpu_time_over_kdet():
    rows = [{"side": s, "model": "retinanet", "phi": 0, "image_size": 64, "batch": 8,
             "task": "predict", "cpu_s_per_image": c, "images_per_s": w}
            for s, c, w in (("kdet", 0.5, 4.0), ("torchvision", 1.0, 2.0))]
    assert "| 2.00x | 2.00x |" in peer_benchmark.format_ratio_table(rows)


def test_wrong_peer_or_model_is_an_error():
    with pytest.raises(ValueError, match="effdet"):
        peer_benchmark.compare("efficientdet", peer="torchvision")
    with pytest.raises(ValueError, match="one of"):
        peer_benchmark.compare("yolo")


@pytest.mark.slow  # two subprocesses building Lite0 / effdet: 20-80 s by the machine's load
def test_bfloat16_rows_run_both_sides_in_mixed_precision(capsys):
    """``precision="bfloat16"``: kdet under Keras' mixed_bfloat16 policy, effdet under torch
    AMP; the rows say so (the GPU script's bfloat16 rows, here on CPU)."""
    if backend() != "tensorflow":
        pytest.skip("checked once, on TensorFlow (see above)")
    rows, table = peer_benchmark.compare("efficientdet", phi="lite0", image_size=128,
                                         batches=(1,), tasks=("predict",), warmup=1, repeats=1,
                                         precision="bfloat16", backend="tensorflow")
    for r in rows:
        assert "error" not in r, r
        assert r["precision"] == "bfloat16" and r["device"] == "cpu"
    assert "| predict | efficientdet lite0 (bfloat16) @ 128 | 1 |" in table


def test_gpu_script_runs_every_row_and_trains_in_float32_only(monkeypatch):
    from conftest import load_benchmark
    gpu_speed = load_benchmark("gpu_speed")
    jobs = []

    def fake_launch(job, timeout):
        jobs.append(job)
        return [dict(job, task=t, wall_s=1.0, cpu_s=0.5, cpu_s_per_image=0.5,
                     images_per_s=job["batch"] / 1.0, first_wall_s=2.0) for t in job["tasks"]]
    monkeypatch.setattr(peer_benchmark, "_launch", fake_launch)
    monkeypatch.setattr(peer_benchmark, "peer_installed", lambda peer: True)
    rows = gpu_speed.main(["--batches", "maskrcnn=4"])
    assert {(j["model"], j["phi"], j["image_size"]) for j in jobs} == {
        ("retinanet", 0, 800), ("fasterrcnn", 0, 800), ("maskrcnn", 0, 800),
        ("efficientdet", 0, 512), ("efficientdet", 3, 896)}
    assert all(j["device"] == "gpu" and j["backend"] == "jax" for j in jobs)
    assert {j["batch"] for j in jobs if j["model"] == "maskrcnn"} == {4}
    for j in jobs:
        assert j["tasks"] == (["predict", "train"] if j["precision"] == "float32"
                              else ["predict"])
    assert len(rows) == 5 * 2 * 3  # rows x sides x (fp32 predict, fp32 train, bf16 predict)


def test_append_to_results_adds_to_the_named_section(tmp_path):
    """A table lands at the end of its own section (not the file's last one); a new
    section, with its intro, is made at the end when there is none."""
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## COCO evaluator speed\n\nold table\n\n"
                    "## Other\n\nother text\n")
    peer_benchmark.append_to_results(path, "COCO evaluator", "new table", intro="unused")
    peer_benchmark.append_to_results(path, "Peers (issue #13)", "| a |\n|---|", intro="Intro.")
    assert path.read_text() == (
        "# Benchmark results\n\n## COCO evaluator speed\n\nold table\n\nnew table\n\n"
        "## Other\n\nother text\n\n## Peers (issue #13)\n\nIntro.\n\n| a |\n|---|\n")
    missing = tmp_path / "new.md"
    peer_benchmark.append_to_results(missing, "Section", "text")
    assert missing.read_text() == "# Benchmark results\n\n## Section\n\ntext\n"
