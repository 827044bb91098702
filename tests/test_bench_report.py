from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import pytest
import torch

from fastkd import commands, engine
from fastkd.cli import main
from tests.conftest import tiny_config, tiny_config_dict, write_config

ROW_KEYS = {"what", "backend", "images_per_sec", "min", "max", "batch_size", "image_size", "model", "teacher",
            "precision", "channels_last", "device", "cpu_count", "torch", "torchvision", "dali", "git", "timestamp"}


@pytest.mark.slow
def test_bench_measures_every_what_and_writes_well_formed_rows(tiny_imagefolder, tmp_path, capsys):
    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", model={"arch": "shufflenet_v2_x0_5"})
    raw["distill"] = {"teacher": {"arch": "resnet18", "checkpoint": str(tmp_path / "absent.pt")}}
    config = write_config(tmp_path / "bench.yaml", raw)
    out = tmp_path / "results.jsonl"
    main(["bench", "--config", str(config), "--backends", "torchvision,dali-cpu,dali-gpu,synthetic",
          "--steps", "2", "--warmup", "1", "--repeats", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    measured = {(r["what"], r["backend"]) for r in rows}
    for backend in ("torchvision", "dali-cpu", "synthetic"):  # the config's runtime is the CPU, GPU or not
        assert {("loader", backend), ("train", backend), ("distill", backend)} <= measured
    for row in rows:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        assert len(row["rates"]) == row["repeats"] == 2 and row["steps"] == 2
        # a DALI loader's warm-up drains its prefetch queue (the DataLoader here has no workers)
        drained = row["what"] != "loader-stage" and row["backend"].startswith("dali")
        assert row["warmup"] == (row["dali_prefetch_queue"] + 1 if drained else 1)
        assert row["images_per_sec"] == pytest.approx(statistics.median(row["rates"]), abs=0.11)
        assert (row["min"], row["max"]) == (min(row["rates"]), max(row["rates"]))
        assert row["torch"] == torch.__version__ and row["batch_size"] == 8
        if row["what"] in ("train", "distill"):
            assert 0 <= row["data_wait_fraction"] <= 1
            assert set(row["stages"]) >= {"data wait", "student forward+backward", "optimizer"}
        if row["what"] == "distill":
            assert row["teacher"] == "resnet18" and row["stages"]["teacher forward"] > 0
        if row["what"] == "loader":
            assert row["batch_image_size"] == 32
            if row["backend"] != "synthetic" and Path("/proc/stat").exists():
                # None when these 2-batch windows ran under MIN_TICKS (a fast machine); the share
                # itself is tested in test_cpu_busy_is_the_share_of_cpu_time_not_idle
                assert row["cpu_busy"] is None or 0 < row["cpu_busy"] <= 1
    assert ("loader", "dali-gpu") not in measured
    assert "dali-gpu skipped: needs a CUDA training device (runtime.device)" in printed
    assert "teacher weights: random" in printed
    assert "is bounded by the" in printed and re.search(r"\| loader +\| torchvision +\|", printed)
    plan = printed[printed.index("bench plan:"):printed.index("| what")]  # printed before the results
    assert len(re.findall(r"^  \d+\. ", plan, flags=re.M)) == len(rows)


@pytest.mark.parametrize("what", ["loader-stages,loader", "loader,loader-stages"])
def test_bench_loader_stages_and_the_decode_ceiling(tiny_imagefolder, tmp_path, capsys, what):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from pipelines.dali_stages import CEILING, STAGES

    config = write_config(tmp_path / "bench.yaml", tiny_config_dict(tiny_imagefolder, tmp_path / "runs"))
    out = tmp_path / "results.jsonl"
    main(["bench", "--config", str(config), "--what", what, "--backends", "dali-cpu,torchvision",
          "--steps", "2", "--warmup", "1", "--repeats", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    stages = [r["stage"] for r in rows if r["what"] == "loader-stage"]
    assert sorted(stages) == sorted(STAGES)  # each once: the loader's ceiling is not measured twice
    assert [r["stage"] for r in rows if r.get("ceiling")] == [CEILING]
    assert all(r["images_per_sec"] > 0 for r in rows)
    loaders = {r["backend"]: r["images_per_sec"] for r in rows if r["what"] == "loader"}
    ceiling = next(r["images_per_sec"] for r in rows if r.get("ceiling"))
    assert (f"The dali-cpu loader yields {loaders['dali-cpu']:.0f} images/s: {loaders['dali-cpu'] / ceiling:.0%} of "
            f"DALI's bare {CEILING}") in printed
    assert f"{loaders['dali-cpu'] / loaders['torchvision']:.2f}x the torchvision DataLoader" in printed
    assert f"dali-cpu: {CEILING}" in printed


def test_bench_rejects_unknown_backends_and_whats(tiny_imagefolder, tmp_path, capsys):
    config = write_config(tmp_path / "bench.yaml", tiny_config_dict(tiny_imagefolder, tmp_path / "runs"))
    for flag, value, message in (("--backends", "dali-tpu", "--backends: 'dali-tpu' is not one of"),
                                 ("--what", "loader,speed", "--what: 'speed' is not one of"),
                                 ("--what", "distill", "--what distill needs a config with a distill section")):
        with pytest.raises(SystemExit) as info:
            main(["bench", "--config", str(config), flag, value])
        assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_report_renders_a_table_and_pngs_from_runs(tiny_imagefolder, tmp_path, capsys):
    runs = []
    for name, arch in (("a", "resnet18"), ("b", "shufflenet_v2_x0_5")):
        cfg = tiny_config(tiny_imagefolder, tmp_path / "runs", run={"name": name}, model={"arch": arch},
                          optim={"epochs": 1, "warmup_epochs": 0})
        runs.append(commands.train(cfg, progress=False).run_dir)
    out = tmp_path / "report" / "report.md"
    main(["report", *map(str, runs), "--out", str(out)])
    text = out.read_text()
    header = text.splitlines()[0]
    assert header.startswith("| run ") and "best top-1" in header and "images/s" in header
    assert "| a " in text and "| b " in text and "shufflenet_v2_x0_5" in text
    for png in ("report-speed.png", "report-curves.png"):
        data = (out.parent / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_of_an_unfinished_run_is_an_error(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["report", str(tmp_path / "half")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"skipping {tmp_path / 'half'}: no summary.json (not a finished run)" in err
    assert f"no finished fastkd run (a folder with summary.json) among: {tmp_path / 'half'}" in err


def _fake_run(folder: Path, name: str, top1: float, *, speed: float = 100.0, val_loss: float = 1.0) -> Path:
    run = folder / name
    run.mkdir(parents=True)
    summary = {"model": "resnet18", "backend": "dali", "best_val_top1": top1, "best_val_top5": 99.0,
               "final_val_top1": top1, "final_val_top5": 99.0, "train_val_gap": 1.0, "images_per_sec": speed,
               "wall_seconds": 10.0, "device": "CPU"}
    (run / "summary.json").write_text(json.dumps(summary))
    records = [{"epoch": e, "val_top1": top1 - 2 + e, "train_top1": top1 - 3 + e, "val_loss": val_loss * (3 - e)}
               for e in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def test_report_takes_a_folder_of_runs_and_skips_what_is_not_a_run(tmp_path, capsys):
    runs = tmp_path / "demo"
    for name, top1 in (("teacher", 60.0), ("student-s0", 40.0), ("student-s1", 44.0)):
        _fake_run(runs, name, top1)
    (runs / "teacher-cache").mkdir()
    (runs / "demo.json").write_text("{}")
    out = tmp_path / "report" / "report.md"
    # what `fastkd report runs/demo/*` passes, and the folder itself
    main(["report", *sorted(map(str, runs.iterdir())), "--out", str(out)])
    err = capsys.readouterr().err
    assert f"skipping {runs / 'demo.json'}: a file, not a run folder" in err
    assert f"skipping {runs / 'teacher-cache'}: no summary.json" in err
    text = out.read_text()
    assert "| teacher " in text and "| student-s0 " in text and "| student-s1 " in text
    main(["report", str(runs), "--out", str(out)])
    assert f"skipping {runs / 'teacher-cache'}: no summary.json" in capsys.readouterr().err
    assert out.read_text() == text


def test_report_groups_runs_that_differ_only_by_a_seed_suffix(tmp_path):
    from fastkd.report import group_name

    assert [group_name(Path(n)) for n in ("student-s0", "student_seed12", "kd-dali-s3", "s1", "res-s1x")] == [
        "student", "student", "kd-dali", "s1", "res-s1x"]
    runs = tmp_path / "runs"
    _fake_run(runs, "student-s0", 40.0, speed=90.0)
    _fake_run(runs, "student-s1", 44.0, speed=110.0)
    _fake_run(runs, "teacher", 60.0, val_loss=300.0)
    out = tmp_path / "report.md"
    main(["report", str(runs), "--out", str(out)])
    grouped = out.read_text().split("Mean ± standard deviation")[1]
    row = next(line for line in grouped.splitlines() if line.startswith("| student "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and cells[5] == f"42.00 ± {statistics.stdev([40.0, 44.0]):.2f}" and cells[8] == \
        f"100 ± {statistics.stdev([90.0, 110.0]):.0f}"
    assert any(line.startswith("| teacher ") and "| 1 " in line for line in grouped.splitlines())


def test_report_curves_use_a_log_loss_axis_and_whole_epochs(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: saved.append(fig))
    runs = tmp_path / "runs"
    _fake_run(runs, "teacher", 60.0, val_loss=300.0)
    from fastkd.report import write_report

    write_report([runs], tmp_path / "report.md")
    curves = saved[1]
    accuracy, loss = curves.axes[:2]
    assert loss.get_yscale() == "log" and accuracy.get_yscale() == "linear"
    for ax in (accuracy, loss):
        assert all(float(t).is_integer() for t in ax.get_xticks())


def test_cpu_busy_is_the_share_of_cpu_time_not_idle():
    from fastkd.bench import busy_fraction, cpu_times

    assert busy_fraction((1000, 400), (1200, 450)) == 0.75  # 200 ticks, 50 of them idle
    assert busy_fraction((1000, 400), (1000, 400)) is None and busy_fraction(None, (1, 1)) is None
    assert busy_fraction((1000, 400), (1009, 409)) is None  # 9 ticks, each sampled whole: too few to tell
    assert busy_fraction((1000, 400), (1010, 405)) == 0.5
    before = cpu_times()
    if before is not None:  # Linux
        deadline = time.perf_counter() + 0.2  # 20+ ticks on any machine: more than MIN_TICKS
        while time.perf_counter() < deadline:  # one core spins: at least a share of the machine is busy
            pass
        assert 0 < busy_fraction(before, cpu_times()) <= 1


def test_warm_up_drains_what_the_loader_prefetched():
    from types import SimpleNamespace

    from fastkd.bench import Window, warmup_for

    window = Window(steps=20, warmup=8, repeats=3)
    assert warmup_for(window, SimpleNamespace(prefetched_batches=64)).warmup == 65  # 16 workers x 4
    assert warmup_for(window, SimpleNamespace(prefetched_batches=0)).warmup == 8


def test_the_bench_plan_runs_each_row_once_and_says_why_it_runs_those_not_asked_for():
    from types import SimpleNamespace

    from fastkd.bench import Window, format_plan, plan_bench

    cpu = SimpleNamespace(device=torch.device("cpu"))
    plan, notes = plan_bench(["distill", "loader", "train"], ["torchvision", "synthetic"], cpu)
    assert [(p.label, p.backend, bool(p.why)) for p in plan] == [
        ("train", "torchvision", False),  # asked for after distill needed it: no reason printed
        ("distill", "torchvision", False), ("loader", "torchvision", False),
        ("train", "synthetic", False), ("distill", "synthetic", False), ("loader", "synthetic", False)]
    plan, notes = plan_bench(["distill-cached", "loader-stages"], ["torchvision"], cpu)
    assert [(p.label, p.why) for p in plan] == [
        ("train", "the student alone on the same loader, for the ratio"), ("distill-cached", "")]
    assert notes == ["loader-stages measures dali-cpu pipelines; torchvision has none (--what loader times it)"]
    printed = format_plan(plan, Window(steps=4, warmup=2, repeats=3)).splitlines()
    assert printed[0].startswith("bench plan: 2 row(s), each the median of 3 window(s) of 4 batches after 2 ")
    assert printed[1:] == ["  1. train with torchvision (the student alone on the same loader, for the ratio)",
                           "  2. distill-cached with torchvision"]


def test_the_bench_plan_of_dali_rows_on_a_cpu_and_on_a_gpu():
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    from types import SimpleNamespace

    from fastkd.bench import plan_bench
    from pipelines.dali_stages import CEILING, STAGES

    cpu, gpu = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(device=torch.device("cuda"))
    plan, notes = plan_bench(["loader", "train"], ["dali-gpu", "dali-cpu"], cpu)
    assert [(p.label, p.backend, p.variant, bool(p.why)) for p in plan] == [
        ("loader", "dali-cpu", "", False), ("loader-stage", "dali-cpu", CEILING, True), ("train", "dali-cpu", "", False)]
    assert notes == ["dali-gpu skipped: needs a CUDA training device (runtime.device)"]
    plan, _ = plan_bench(["loader-stages", "loader"], ["dali-cpu"], cpu)  # the ceiling is one of the stages asked for
    assert [(p.label, p.variant, p.why) for p in plan] == [("loader-stage", stage, "") for stage in STAGES] + [
        ("loader", "", "")]
    plan, _ = plan_bench(["distill"], ["dali-gpu"], gpu)  # on a GPU: the side stream's worth beside it
    assert [(p.label, p.why) for p in plan] == [("train", "the student alone on the same loader, for the ratio"),
                                                ("distill", ""), ("distill-no-side-stream", "what the side stream saves")]


def test_the_bench_times_the_step_the_engine_builds_for_the_run(tiny_imagefolder, tmp_path, monkeypatch):
    """The bench's rows time runs the engine builds (`build_run`): their loaders, step and EMA with the
    config's settings: the teacher's own view of each crop (even when the config replays a cache),
    label smoothing, the distillation weights, gradient clipping."""
    from fastkd import loop
    from fastkd.bench import Window, run_bench
    from fastkd.config import config_from_dict

    built, views, emas, clips = [], [], [], []
    build_step, build_loaders, build_ema = engine.build_step, engine.build_loaders, engine.build_ema
    apply_update = loop.apply_update
    monkeypatch.setattr(engine, "build_step", lambda *a, **kw: built.append(build_step(*a, **kw)) or built[-1])
    monkeypatch.setattr(engine, "build_loaders",
                        lambda *a, **kw: views.append(kw["teacher_image_size"]) or build_loaders(*a, **kw))
    monkeypatch.setattr(engine, "build_ema", lambda *a: emas.append(build_ema(*a)) or emas[-1])
    monkeypatch.setattr(loop, "apply_update", lambda *a: clips.append(a[3]) or apply_update(*a))
    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", model={"arch": "shufflenet_v2_x0_5", "ema_decay": 0.9},
                           optim={"label_smoothing": 0.2, "grad_clip_norm": 5.0})
    raw["distill"] = {"teacher": {"arch": "resnet18", "checkpoint": str(tmp_path / "absent.pt"), "image_size": 24},
                      "alpha": 0.3, "teacher_cache": str(tmp_path / "cache")}
    rows = run_bench(config_from_dict(raw), config_path="x", what=["distill"], backends=["torchvision"],
                     window=Window(steps=1, warmup=0, repeats=1), echo=lambda text: None)
    assert [r["what"] for r in rows] == ["train", "distill"]
    assert views == [None, 24]  # the live row's loader makes the teacher's 24 px view
    # each row's timed step (on the CPU its windows' batches are also its stage breakdown's: no second step)
    assert [type(step).__name__ for step in built] == ["ClassificationStep", "DistillationStep"]
    assert all(step.label_smoothing == 0.2 for step in built)
    assert (built[1].kd_weight, built[1].ce_weight) == (0.3, 0.7)
    assert len(emas) == 2 and all(ema.module is not None and ema.decay == 0.9 for ema in emas)
    assert clips and set(clips) == {5.0}


def test_report_keeps_runs_of_other_folders_apart_and_refuses_a_group_of_other_models(tmp_path):
    from fastkd.errors import FastkdError
    from fastkd.report import write_report

    _fake_run(tmp_path / "a", "teacher", 60.0)
    _fake_run(tmp_path / "b", "teacher", 70.0)
    out = tmp_path / "report.md"
    write_report([tmp_path / "a", tmp_path / "b"], out)
    grouped = out.read_text().split("Mean ± standard deviation")
    assert len(grouped) == 1  # two single runs named alike in two folders: no seed group
    mixed = tmp_path / "mixed"
    _fake_run(mixed, "student-s0", 40.0)
    other = _fake_run(mixed, "student-s1", 41.0)
    summary = json.loads((other / "summary.json").read_text())
    (other / "summary.json").write_text(json.dumps({**summary, "model": "resnet34"}))
    with pytest.raises(FastkdError, match="student-s0, student-s1 differ only by a seed suffix but have different "
                                          "model"):
        write_report([mixed], tmp_path / "mixed-report" / "report.md")
    assert not (tmp_path / "mixed-report").exists()


def test_the_bench_times_each_device_stage_of_the_loader_by_name(tiny_imagefolder, tmp_path):
    """The stage breakdown runs the loader's host stage, then its device stages one by one as the
    loader does (`pipelines.base.run_stages`): the copy, RandAugment and mixing each get a time."""
    from fastkd.bench import Window, format_rows, run_bench
    from fastkd.config import config_from_dict

    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", model={"arch": "shufflenet_v2_x0_5"},
                           data={"randaugment": {}, "mix": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}})
    rows = run_bench(config_from_dict(raw), config_path="x", what=["train"], backends=["torchvision", "synthetic"],
                     window=Window(steps=2, warmup=1, repeats=1), echo=lambda text: None)
    stages = {row["backend"]: row["stages"] for row in rows}
    assert list(stages["torchvision"]) == ["data wait", "host-to-device copy", "auto-augment", "mix",
                                           "student forward+backward", "optimizer", "untimed"]  # untimed: the CPU's rest
    assert list(stages["synthetic"]) == ["data wait", "auto-augment", "mix", "student forward+backward", "optimizer",
                                         "untimed"]
    assert all(ms > 0 for stage, ms in stages["torchvision"].items() if stage != "untimed")
    table = [re.sub(" +", " ", line) for line in format_rows(rows).splitlines()]
    assert "| what | backend | data wait | host-to-device copy | auto-augment | mix | teacher forward | cache lookup | " \
           "student forward+backward | optimizer | untimed |" in table


def test_the_stage_timing_draws_each_epochs_augmentations_as_training_does(tiny_imagefolder, tmp_path, monkeypatch):
    """Timed stage by stage, the loader's device stages still get each epoch set before they run
    (the bench feeds them its host stage's batches itself): windows that cross an epoch boundary
    augment the second epoch with that epoch's draws, not the first's or none."""
    from fastkd.bench import Window, run_bench
    from fastkd.config import config_from_dict
    from pipelines.auto_augment import AutoAugment
    from pipelines.batch_stage import Mixing

    epochs_set: dict[str, list[int]] = {"auto-augment": [], "mix": []}
    epochs_run: dict[str, list[int]] = {"auto-augment": [], "mix": []}
    for name, cls in (("auto-augment", AutoAugment), ("mix", Mixing)):
        set_epoch, call = cls.set_epoch, cls.__call__

        def recorded_set(self, epoch, _name=name, _set=set_epoch):
            epochs_set[_name].append(epoch)
            _set(self, epoch)

        def recorded_call(self, batch, _name=name, _call=call):
            epochs_run[_name].append(epochs_set[_name][-1] if epochs_set[_name] else None)
            return _call(self, batch)

        monkeypatch.setattr(cls, "set_epoch", recorded_set)
        monkeypatch.setattr(cls, "__call__", recorded_call)
    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", model={"arch": "shufflenet_v2_x0_5"},
                           data={"randaugment": {}, "mix": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}})
    run_bench(config_from_dict(raw), config_path="x", what=["train"], backends=["torchvision"],
              window=Window(steps=3, warmup=1, repeats=2), echo=lambda text: None)  # 7 batches of 5 an epoch
    for stage in ("auto-augment", "mix"):
        assert epochs_run[stage] == [0] * 5 + [1] * 2, (stage, epochs_set[stage], epochs_run[stage])


def test_on_the_cpu_the_stages_are_timed_on_the_windows_own_batches_and_add_up_to_them(tiny_imagefolder, tmp_path):
    """The throughput windows and the stage breakdown are one measurement on the CPU: the same
    batches, so a row's stages (with `untimed`, what no stage names) add up to its time per batch."""
    from fastkd.bench import Window, run_bench
    from fastkd.config import config_from_dict

    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", model={"arch": "shufflenet_v2_x0_5"})
    raw["distill"] = {"teacher": {"arch": "resnet18", "checkpoint": str(tmp_path / "absent.pt")}}
    rows = run_bench(config_from_dict(raw), config_path="x", what=["train", "distill-cached"],
                     backends=["torchvision"], window=Window(steps=3, warmup=1, repeats=2), echo=lambda text: None)
    assert [r["what"] for r in rows] == ["train", "distill-cached"]
    for row in rows:
        stages = row["stages"]
        per_batch = 1000 * sum(row["steps"] * row["batch_size"] / rate for rate in row["rates"]) / (3 * 2)
        assert sum(stages.values()) == pytest.approx(per_batch, rel=2e-3), stages  # rates are rounded to 0.1
        assert stages["untimed"] >= -0.01 and stages["untimed"] < 0.5 * per_batch, stages
    assert "cache lookup" in rows[1]["stages"] and "teacher forward" not in rows[1]["stages"]


def test_the_advice_for_a_student_bound_run_names_only_what_helps_on_that_device():
    from types import SimpleNamespace

    from fastkd.bench import bottleneck_sentences

    row = {"what": "train", "backend": "synthetic", "images_per_sec": 900.0,
           "stages": {"data wait": 1.0, "student forward+backward": 50.0, "optimizer": 5.0}}
    cpu, gpu = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(device=torch.device("cuda"))
    on_cpu = bottleneck_sentences([row], cpu)  # type: ignore[arg-type]
    on_gpu = bottleneck_sentences([row], gpu)  # type: ignore[arg-type]
    assert len(on_cpu) == len(on_gpu) == 1 and "bounded by the student" in on_cpu[0]
    # bf16 autocast measured slower on a CPU (issue 39): unmeasured, only a GPU is told to try it
    assert "bf16" not in on_cpu[0] and "runtime.compile" in on_cpu[0] and "--what settings" in on_cpu[0]
    assert "bf16" in on_gpu[0] and "runtime.compile" in on_gpu[0]
    # measured (--what settings): what helped on this backend, with its ratio, and what did not
    measured = [row, {"what": "train-bf16", "backend": "synthetic", "setting": "bf16", "vs_configured": 0.71,
                      "stages": dict(row["stages"])},
                {"what": "train-compile", "backend": "synthetic", "setting": "compile", "vs_configured": 1.75,
                 "beyond_spread": True, "compile_seconds": 83.0, "stages": dict(row["stages"])}]
    for runtime in (cpu, gpu):
        [sentence] = bottleneck_sentences(measured, runtime)  # type: ignore[arg-type]  # none for the setting rows
        assert sentence.endswith("try runtime.compile: true (1.75x here), or a larger batch (measured not to "
                                 "help: bf16 0.71x)."), sentence
    measured[2]["beyond_spread"] = False  # faster by its median, not beyond the windows' spread: not advised
    [sentence] = bottleneck_sentences(measured, cpu)  # type: ignore[arg-type]
    assert sentence.endswith("try a larger batch (measured not to help: bf16 0.71x, compile 1.75x, within the "
                             "windows' spread)."), sentence
    measured[2].update(vs_configured=1.02, beyond_spread=True)  # beyond the spread, but under 1.05x
    [sentence] = bottleneck_sentences(measured, cpu)  # type: ignore[arg-type]
    assert sentence.endswith("try a larger batch (measured not to help: bf16 0.71x, compile 1.02x)."), sentence
    # measured on another backend only: this one's advice is the unmeasured one
    other = [dict(r, backend="dali-cpu") if r.get("setting") else r for r in measured]
    assert bottleneck_sentences(other, cpu) == on_cpu  # type: ignore[arg-type]


def test_compiling_pays_back_once_the_time_it_saves_exceeds_its_compile_time():
    from fastkd.bench import compare_settings, payback_seconds, settings_sentences

    assert payback_seconds(2.0, 10.0) == pytest.approx(20.0)  # 20 s uncompiled = 10 s compiled + 10 s compiling
    assert payback_seconds(1.25, 10.0) == pytest.approx(50.0)
    assert payback_seconds(1.0, 10.0) is None and payback_seconds(0.8, 10.0) is None
    rows = [{"what": "train", "backend": "synthetic", "images_per_sec": 100.0, "min": 95.0, "max": 105.0,
             "warmup_seconds": 2.0},
            {"what": "train", "backend": "dali-cpu", "images_per_sec": 50.0, "min": 45.0, "max": 52.0,
             "warmup_seconds": 3.0},
            {"what": "train-compile", "backend": "synthetic", "setting": "compile", "images_per_sec": 200.0,
             "min": 190.0, "max": 210.0, "warmup_seconds": 32.0},
            {"what": "train-bf16", "backend": "dali-cpu", "setting": "bf16", "images_per_sec": 40.0, "min": 38.0,
             "max": 46.0, "warmup_seconds": 3.5}]
    compare_settings(rows)
    assert (rows[2]["vs_configured"], rows[2]["compile_seconds"]) == (2.0, 30.0)  # each against its own backend
    assert rows[3]["vs_configured"] == 0.8 and "compile_seconds" not in rows[3]
    assert rows[2]["beyond_spread"] and not rows[3]["beyond_spread"]  # 46 > 45: the windows overlap
    assert "vs_configured" not in rows[0] and "vs_configured" not in rows[1]
    assert settings_sentences(rows) == [
        "runtime.compile: true made train with synthetic 2.00x as fast, after 30 s of compiling (with inductor's "
        "cache as it stood): it pays back on runs whose training steps take over 60 s uncompiled (evaluation "
        "compiles once more, and every new batch shape again).",
        "bf16 autocast with channels-last (runtime.precision: bf16, runtime.channels_last: true) made train with "
        "dali-cpu 0.80x as fast."]
    rows[2]["warmup_seconds"] = 2.5  # no slower than the configured warm-up: compiled code from the cache
    compare_settings(rows)
    assert rows[2]["compile_seconds"] == 0.5 and "not measured here" in settings_sentences(rows)[0]
    assert "pays back" not in settings_sentences(rows)[0]


def test_the_settings_rows_time_the_configured_step_with_bf16_and_with_compile(tiny_imagefolder, tmp_path,
                                                                                monkeypatch, capsys):
    """`--what settings`: beside the configured student's step, the same run built with bf16
    autocast and channels-last, and with runtime.compile (here torch.compile records its model and
    returns it uncompiled: compiling takes minutes on the CPU)."""
    from types import SimpleNamespace

    from fastkd.bench import plan_bench

    from fastkd import bench, runtime as runtime_module

    compiled, runtimes = [], []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    monkeypatch.setattr(runtime_module, "STARTING_THREADS", 2)  # as on a machine of 2 cores or more
    monkeypatch.setattr(bench, "CACHED_COMPILE", float("inf"))  # the stub compiles nothing: no compile time
    build_run = engine.build_run
    monkeypatch.setattr(engine, "build_run", lambda cfg, runtime, **kw: runtimes.append(runtime) or build_run(
        cfg, runtime, **kw))
    raw = tiny_config_dict(tiny_imagefolder, tmp_path / "runs", model={"arch": "shufflenet_v2_x0_5"})
    raw["runtime"]["channels_last"] = False  # the bf16 row turns it on
    config = write_config(tmp_path / "bench.yaml", raw)
    out = tmp_path / "rows.jsonl"
    main(["bench", "--config", str(config), "--what", "settings", "--backends", "synthetic", "--steps", "2",
          "--warmup", "1", "--repeats", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["what"], r["setting"], r["precision"], r["channels_last"], r["compile"], r["torch_threads"])
            for r in rows] == [
        ("train", None, "fp32", False, False, 2), ("train-bf16", "bf16", "bf16", True, False, 2),
        ("train-compile", "compile", "fp32", False, True, 2), ("train-one-thread", "one-thread", "fp32", False, False, 1)]
    # each row's run was built with the runtime its record names; only the compile row's student compiled
    assert [(r.precision, r.channels_last, r.compile) for r in runtimes] == [
        (r["precision"], r["channels_last"], r["compile"]) for r in rows]
    assert len(compiled) == 1 and isinstance(compiled[0], torch.nn.Module)
    assert rows[1]["vs_configured"] == round(rows[1]["images_per_sec"] / rows[0]["images_per_sec"], 3)
    assert all(r["warmup_seconds"] > 0 for r in rows)
    assert torch.get_num_threads() == 2  # the bench leaves the config's threads, not its last row's
    # torch.compile here returns the model as it is: no compile time to measure
    assert "runtime.compile: true made train with synthetic" in printed and "not measured here" in printed
    assert "runtime.threads: 1 made train with synthetic" in printed
    # a setting already configured is timed as train, with one note for every backend; a config on one
    # thread tries torch's default instead; threads are a CPU setting
    cpu = SimpleNamespace(device=torch.device("cpu"), precision="fp32", channels_last=True, compile=True)
    plan, notes = plan_bench(["settings"], ["synthetic", "torchvision"], cpu, threads=1)  # type: ignore[arg-type]
    assert [(p.label, p.backend, bool(p.why)) for p in plan] == [
        ("train", "synthetic", True), ("train-bf16", "synthetic", False), ("train-all-threads", "synthetic", False),
        ("train", "torchvision", True), ("train-bf16", "torchvision", False), ("train-all-threads", "torchvision", False)]
    assert notes == ["settings: runtime.compile: true is the configured setting, timed as train"]
    gpu = SimpleNamespace(device=torch.device("cuda"), precision="bf16", channels_last=True, compile=False)
    plan, notes = plan_bench(["settings"], ["synthetic"], gpu)  # type: ignore[arg-type]
    assert [p.label for p in plan] == ["train", "train-compile"] and len(notes) == 1
    monkeypatch.setattr(runtime_module, "STARTING_THREADS", 1)  # a 1-core machine: no other count to try
    plan, _ = plan_bench(["settings"], ["synthetic"], cpu, threads=1)  # type: ignore[arg-type]
    assert [p.label for p in plan] == ["train", "train-bf16"]
