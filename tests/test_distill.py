from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torchvision

from fastkd import commands, loop
from fastkd.config import config_from_dict
from fastkd.checkpoint import load_checkpoint, save_checkpoint
from fastkd.losses import kd_loss
from fastkd.steps import DistillationStep
from tests.conftest import backend_data, batch_of, cli_error, distill_dict, run_cli, stop_after, tiny_config_dict, write_config


def make_step(stream=None, *, teacher_input_dtype=None, label_smoothing=0.0, term=None) -> DistillationStep:
    """A step over a fresh (not frozen) teacher: the step itself must freeze it."""
    torch.manual_seed(0)
    student = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    teacher = torchvision.models.resnet18(num_classes=10)
    return DistillationStep(student, teacher, term=term or (lambda s, t, y: kd_loss(s, t, 3.0)), kd_weight=0.6,
                            ce_weight=0.4, autocast=contextlib.nullcontext, teacher_autocast=contextlib.nullcontext,
                            stream=stream, teacher_input_dtype=teacher_input_dtype, label_smoothing=label_smoothing)


def test_teacher_stays_in_eval_after_train_mode_and_gets_no_gradients():
    step = make_step()
    step.train()
    assert step.model.training and not step.teacher.training
    assert all(not m.training for m in step.teacher.modules())
    before = {k: v.clone() for k, v in step.teacher.state_dict().items()}
    optimizer = torch.optim.SGD(step.model.parameters(), lr=0.1)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for _ in range(2):
        out = step(batch_of(images, labels))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in step.teacher.parameters())
    for key, value in step.teacher.state_dict().items():  # BN running stats untouched too
        assert torch.equal(value, before[key]), key
    assert set(out.parts) == {"ce", "kd", "agree"}


def test_teacher_forward_builds_no_graph_even_with_trainable_teacher_weights():
    step = make_step().train()
    step.teacher.requires_grad_(True)  # no_grad must hold on its own, not only requires_grad_(False)
    logits = step.teacher_outputs(torch.randn(2, 3, 32, 32)).logits
    assert logits.grad_fn is None and not logits.requires_grad


def test_loss_is_the_weighted_sum_of_its_logged_parts():
    out = make_step().train()(batch_of(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))))
    assert out.loss.item() == pytest.approx(0.4 * out.parts["ce"].item() + 0.6 * out.parts["kd"].item(), rel=1e-6)


def test_label_smoothing_reaches_the_distillation_cross_entropy():
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = make_step(label_smoothing=0.2).train()(batch_of(images, labels))
    expected = torch.nn.functional.cross_entropy(out.logits.float(), labels, label_smoothing=0.2)
    assert out.parts["ce"].item() == pytest.approx(expected.item(), rel=1e-6)
    plain = torch.nn.functional.cross_entropy(out.logits.float(), labels)
    assert abs(expected.item() - plain.item()) > 1e-3


def test_fp32_teacher_takes_half_batches_by_casting_them():
    images = torch.randn(2, 3, 32, 32).half()
    with pytest.raises(RuntimeError):  # what a GPU bf16 run with teacher.precision fp32 met before
        make_step().teacher_outputs(images)
    logits = make_step(teacher_input_dtype=torch.float32).teacher_outputs(images).logits
    reference = make_step().teacher_outputs(images.float()).logits
    assert logits.dtype == torch.float32 and torch.equal(logits, reference)


class FakeStream:
    """Stands in for torch.cuda.Stream on the CPU: records waits into a shared event list."""

    def __init__(self, name: str, events: list[str]):
        self.name, self.events = name, events

    def wait_stream(self, other: "FakeStream") -> None:
        self.events.append(f"{self.name} waits for {other.name}")


def test_side_stream_orders_teacher_student_and_loss(monkeypatch):
    """The stream protocol, rehearsed on the CPU with a test double of torch.cuda's stream API."""
    events: list[str] = []
    main, side = FakeStream("main", events), FakeStream("side", events)
    current = [main]

    @contextlib.contextmanager
    def use(stream):
        current.append(stream)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: events.append(f"recorded on {s.name}"),
                        raising=False)

    def term(s, t, y):
        events.append("loss reads the teacher's logits")
        return kd_loss(s, t, 3.0)

    step = make_step(side, term=term).train()
    step.teacher.register_forward_pre_hook(lambda *_: events.append(f"teacher forward on {current[-1].name}"))
    step.model.register_forward_pre_hook(lambda *_: events.append(f"student forward on {current[-1].name}"))
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = step(batch_of(images, labels))
    assert events == ["side waits for main", "teacher forward on side", "student forward on main",
                      "main waits for side", "recorded on main", "loss reads the teacher's logits"]
    reference = make_step().train()(batch_of(images, labels))
    assert torch.equal(out.loss, reference.loss)


@pytest.mark.gpu
@pytest.mark.parametrize("late", ["teacher", "batch"])
def test_side_stream_matches_the_sequential_step_under_a_forced_race(late):
    """Forced races. "teacher": the side stream sleeps before the teacher's forward and the batch
    is overwritten on the main stream right after the step (a loader reusing its buffer): the
    main stream must wait for the teacher. "batch": the main stream sleeps before it writes the
    batch (a late producer): the teacher must wait for the main stream before reading it."""
    images = torch.randn(8, 3, 32, 32, device="cuda")
    labels = torch.randint(0, 10, (8,), device="cuda")
    reference = make_step().cuda().train()(batch_of(images.clone(), labels))
    step = make_step(torch.cuda.Stream()).cuda().train()
    batch = torch.zeros_like(images)
    if late == "teacher":
        step.teacher.register_forward_pre_hook(lambda *_: torch.cuda._sleep(200_000_000))  # ~0.1 s, side stream
        batch.copy_(images)
        out = step(batch_of(batch, labels))
        batch.zero_()  # main stream: must not overtake the teacher's read of the batch
    else:
        torch.cuda._sleep(200_000_000)  # main stream: the batch arrives late
        batch.copy_(images)
        out = step(batch_of(batch, labels))
    torch.testing.assert_close(out.parts["kd"], reference.parts["kd"])
    torch.testing.assert_close(out.loss, reference.loss)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_distillation_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tiny_imagefolder, tiny_teacher,
                                                                               tmp_path, monkeypatch, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    configs = {}
    for name in ("straight", "interrupted"):
        raw = distill_dict(tiny_imagefolder, tmp_path / name, tiny_teacher)
        raw["data"].update(**backend_data(backend), num_workers=2)
        configs[name] = config_from_dict(raw)
    commands.distill(configs["straight"], progress=False)
    with monkeypatch.context() as patch:
        stop_after(patch, 7)  # inside epoch 2 (5 steps per epoch)
        with pytest.raises(loop.Interrupted):
            commands.distill(configs["interrupted"], progress=False)
    assert load_checkpoint(configs["interrupted"].run_dir / "last.pt")["step"] == 7
    commands.distill(configs["interrupted"], resume=True, progress=False)
    a = load_checkpoint(configs["straight"].run_dir / "last.pt")
    b = load_checkpoint(configs["interrupted"].run_dir / "last.pt")
    assert a["step"] == b["step"] == 10
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


@pytest.mark.slow
def test_distill_end_to_end_then_export(tiny_imagefolder, tiny_teacher, tmp_path):
    config = write_config(tmp_path / "kd.yaml", distill_dict(tiny_imagefolder, tmp_path / "runs", tiny_teacher))
    done = run_cli("distill", "--config", str(config), "run.name=kd")
    assert done.returncode == 0, done.stderr
    assert "teacher resnet18" in done.stdout and "val top1" in done.stdout
    run_dir = tmp_path / "runs" / "kd"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("train_ce", "train_kd", "train_agree"):
        assert all(key in r for r in records), key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["teacher"]["arch"] == "resnet18" and "val_top1" in summary["teacher"]
    assert summary["kd_weight"] == pytest.approx(0.6) and summary["ce_weight"] == pytest.approx(0.4)
    checkpoint = load_checkpoint(run_dir / "last.pt")
    assert checkpoint["arch"] == "shufflenet_v2_x0_5"
    assert not any(k.startswith("teacher") for k in checkpoint["model"])  # the teacher is never saved

    out = tmp_path / "export" / "student.pt"
    exported = run_cli("export", str(run_dir), "--out", str(out), "--onnx")
    assert exported.returncode == 0, exported.stderr
    model = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["classes"] == checkpoint["classes"] and meta["image_size"] == 32
    assert out.with_suffix(".onnx").stat().st_size > 0
    best = load_checkpoint(run_dir / "best.pt")["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, best[key]), key


def test_missing_teacher_is_an_error_not_a_random_teacher(tiny_imagefolder, tmp_path, capsys):
    config = write_config(tmp_path / "kd.yaml", distill_dict(tiny_imagefolder, tmp_path / "runs", tmp_path / "nope.pt"))
    assert cli_error(capsys, "distill", "--config", str(config)) == \
        f"fastkd: error: distill.teacher.checkpoint: checkpoint not found: {tmp_path / 'nope.pt'}"
    assert not (tmp_path / "runs").exists()


def test_corrupt_teacher_is_named(tiny_imagefolder, tiny_teacher, tmp_path, capsys):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(tiny_teacher.read_bytes()[:5000])
    config = write_config(tmp_path / "kd.yaml", distill_dict(tiny_imagefolder, tmp_path / "runs", broken))
    message = cli_error(capsys, "distill", "--config", str(config))
    assert message.startswith(f"fastkd: error: distill.teacher.checkpoint: checkpoint is corrupt, truncated or not a PyTorch file: {broken}")


def test_teacher_of_other_classes_says_how_they_differ(tiny_imagefolder, tiny_teacher, tmp_path, capsys):
    payload = load_checkpoint(tiny_teacher)
    renamed = tmp_path / "renamed.pt"
    payload["classes"] = [c.replace("cool_disc", "cool_blob") for c in payload["classes"]]
    save_checkpoint(renamed, {k: v for k, v in payload.items() if k != "format"})
    config = write_config(tmp_path / "kd.yaml", distill_dict(tiny_imagefolder, tmp_path / "runs", renamed))
    assert cli_error(capsys, "distill", "--config", str(config)) == (
        f"fastkd: error: distill.teacher.checkpoint: {renamed} was trained on other classes than this dataset's: "
        "teacher has 10 classes, the data 10; not in the teacher: cool_disc; not in the data: cool_blob")
    payload = load_checkpoint(tiny_teacher)
    payload["classes"] = payload["classes"][::-1]
    reordered = tmp_path / "reordered.pt"
    save_checkpoint(reordered, {k: v for k, v in payload.items() if k != "format"})
    config = write_config(tmp_path / "kd.yaml", distill_dict(tiny_imagefolder, tmp_path / "runs", reordered))
    assert "same 10 classes in another order (label 0 is 'warm_triangle' for the teacher, 'cool_cross' in the data)" \
        in cli_error(capsys, "distill", "--config", str(config))


def test_wrong_architecture_teacher_is_an_error(tiny_imagefolder, tiny_teacher, tmp_path, capsys):
    raw = distill_dict(tiny_imagefolder, tmp_path / "runs", tiny_teacher)
    raw["distill"]["teacher"]["arch"] = "resnet34"
    config = write_config(tmp_path / "kd.yaml", raw)
    assert cli_error(capsys, "distill", "--config", str(config)) == (
        f"fastkd: error: distill.teacher.checkpoint: {tiny_teacher} holds a resnet18, but distill.teacher.arch "
        "is resnet34")
    plain = tmp_path / "plain.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), plain)
    raw["distill"]["teacher"]["checkpoint"] = str(plain)
    config = write_config(tmp_path / "kd.yaml", raw)
    message = cli_error(capsys, "distill", "--config", str(config))
    assert message.startswith(f"fastkd: error: distill.teacher.checkpoint: {plain} does not fit resnet34 with 10 classes")


def test_plain_torchvision_state_dict_teacher_is_accepted(tiny_imagefolder, tmp_path):
    plain = tmp_path / "plain.pt"
    model = torchvision.models.resnet18(num_classes=10)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, plain)
    from fastkd.models import load_teacher

    teacher = load_teacher("resnet18", plain, [f"c{i}" for i in range(10)])
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(teacher.state_dict()[key], value)


def test_teacher_near_chance_stops_the_run_unless_allowed(tiny_imagefolder, tmp_path, capsys):
    random_teacher = tmp_path / "random.pt"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), random_teacher)
    config = write_config(tmp_path / "kd.yaml", distill_dict(tiny_imagefolder, tmp_path / "runs", random_teacher,
                                                             allow_weak_teacher=False))
    message = cli_error(capsys, "distill", "--config", str(config))
    assert "near chance (10.00%)" in message and "allow_weak_teacher" in message
    assert not (tmp_path / "runs").exists()


def test_distill_without_a_distill_section_and_train_with_one_are_refused(tiny_imagefolder, tiny_teacher,
                                                                           tmp_path, capsys):
    plain = write_config(tmp_path / "plain.yaml", tiny_config_dict(tiny_imagefolder, tmp_path / "runs"))
    assert "`fastkd distill` needs a distill section" in cli_error(capsys, "distill", "--config", str(plain))
    kd = write_config(tmp_path / "kd.yaml", distill_dict(tiny_imagefolder, tmp_path / "runs", tiny_teacher))
    assert "run it with `fastkd distill`" in cli_error(capsys, "train", "--config", str(kd))
