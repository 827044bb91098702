from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fastkd.config import (Config, ConfigError, changed_keys, config_from_dict, config_to_dict, dump_config,
                           load_config, reference_markdown)
from tests.conftest import REPO

MINIMAL = {"data": {"root": "/data/x"}}


def error_of(raw: dict, overrides: tuple[str, ...] = ()) -> str:
    from fastkd.config import apply_override

    raw = yaml.safe_load(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        for item in overrides:
            apply_override(raw, item)
        config_from_dict(raw)
    return str(info.value)


def test_defaults_fill_every_section_from_a_minimal_config():
    cfg = config_from_dict(MINIMAL)
    assert cfg.data.image_size == 224 and cfg.data.val_resize is None and cfg.data.val_resize_size == 256
    assert cfg.optim.name == "sgd" and cfg.runtime.precision == "auto" and cfg.distill is None
    assert cfg.run_dir == Path("runs") / "run"


def test_overrides_apply_after_the_file_and_parse_yaml_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"root": "/d"}, "optim": {"lr": 0.1}}))
    cfg = load_config(path, ["optim.lr=0.05", "run.name=try2", "runtime.compile=true",
                             "optim.milestones_epochs=[10, 20]", "data.val_batch_size=null"])
    assert cfg.optim.lr == 0.05 and cfg.run.name == "try2" and cfg.runtime.compile is True
    assert cfg.optim.milestones_epochs == (10, 20) and cfg.data.val_batch_size is None


def test_exponent_floats_without_a_dot_are_numbers():
    # PyYAML reads `1e-4` as a string; the config treats it as the number the user meant.
    cfg = config_from_dict({"data": {"root": "/d"}, "optim": {"weight_decay": "1e-4"}})
    assert cfg.optim.weight_decay == pytest.approx(1e-4)


def test_unknown_key_names_its_full_path_and_suggests_the_close_one():
    assert error_of({**MINIMAL, "optim": {"lrr": 0.1}}) == "optim.lrr: unknown key (did you mean optim.lr?)"


def test_key_in_the_wrong_section_points_to_the_right_one():
    assert "data.lr: unknown key (did you mean optim.lr?)" == error_of({"data": {"root": "/d", "lr": 0.1}})


def test_unknown_section_is_named():
    assert error_of({**MINIMAL, "optimizer": {}}).startswith("optimizer: unknown key (did you mean optim?)")


def test_bad_choice_lists_the_choices_and_suggests():
    message = error_of(MINIMAL, ("runtime.precision=bf61",))
    assert message == "runtime.precision: 'bf61' is not one of auto, bf16, fp16, fp32 (did you mean 'bf16'?)"


@pytest.mark.parametrize("override, expected", [
    ("optim.epochs=ten", "optim.epochs: expected an integer, got str 'ten'"),
    ("optim.lr=fast", "optim.lr: expected a number, got str 'fast'"),
    ("runtime.compile=1", "runtime.compile: expected true or false, got int 1"),
    ("optim.lr=-0.1", "optim.lr: must be > 0, got -0.1"),
    ("data.batch_size=0", "data.batch_size: must be >= 1, got 0"),
    ("data.val_resize=100", "data.val_resize: must be >= the validation crop (data.val_image_size or "
                            "data.image_size: 224), got 100"),
    ("data.size_schedule={start_image_size: 100, ramp_epochs: [0, 1]}",
     "data.size_schedule.start_image_size: must be a multiple of data.size_schedule.image_size_step (32) and >= 16, "
     "got 100"),
    ("data.size_schedule.start_image_size=160", "data.size_schedule.ramp_epochs: is required"),
    ("data.size_schedule={start_image_size: 160, ramp_epochs: [5, 3]}",
     "data.size_schedule.ramp_epochs: must be [first, last] epochs with 0 <= first < last, got [5, 3]"),
    ("data.size_schedule={start_image_size: 160, ramp_epochs: [3, 5], image_size_step: 48}",
     "data.size_schedule.start_image_size: must be a multiple of data.size_schedule.image_size_step (48) and >= 16, "
     "got 160"),
    ("data.size_ramp_epochs=[3,5]", "data.size_ramp_epochs: moved to data.size_schedule.ramp_epochs"),
    ("distill.teacher.image_size=8", "distill.teacher.image_size: must be >= 16 or null, got 8"),
    ("optim.warmup_epochs=200", "optim.warmup_epochs: must be within [0, optim.epochs=100), got 200.0"),
    ("optim.milestones_epochs=[60, 30]", "optim.milestones_epochs: must be increasing positive epochs, got [60, 30]"),
    ("run.name=a/b", "run.name: must be a plain folder name, got 'a/b'"),
])
def test_wrong_values_name_key_and_value(override, expected):
    assert error_of(MINIMAL, (override,)) == expected


def test_missing_data_section_and_root_are_required():
    assert error_of({}) == "data: is required"
    assert error_of({"data": {}}).startswith("data.root: is required")
    assert config_from_dict({"data": {"backend": "synthetic"}}).data.root == ""


def test_distill_alpha_is_shorthand_for_the_two_weights():
    teacher = {"arch": "resnet50", "checkpoint": "t.pt"}
    cfg = config_from_dict({**MINIMAL, "distill": {"teacher": teacher, "alpha": 0.6, "temperature": 3}})
    assert cfg.distill.kd_weight == pytest.approx(0.6) and cfg.distill.ce_weight == pytest.approx(0.4)
    assert "give either alpha or kd_weight" in error_of(
        {**MINIMAL, "distill": {"teacher": teacher, "alpha": 0.6, "kd_weight": 0.5}})
    assert error_of({**MINIMAL, "distill": {"teacher": teacher, "temperature": 0}}) == \
        "distill.temperature: must be > 0, got 0.0"
    assert error_of({**MINIMAL, "distill": {"alpha": 0.5}}) == "distill.teacher: is required"


def test_override_syntax_errors_are_reported():
    assert error_of(MINIMAL, ("optim.lr",)).startswith("override 'optim.lr': expected key=value")
    assert error_of(MINIMAL, ("data.root.x=1",)) == "override 'data.root.x=1': data.root is not a section"


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  root: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML at line \d"):
        load_config(bad)


def test_a_config_that_is_not_utf8_text_or_has_a_control_character_is_one_line_naming_the_file(tmp_path, capsys):
    from tests.conftest import cli_error

    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    assert cli_error(capsys, "train", "--config", str(binary)) == (
        f"fastkd: error: {binary}: not a UTF-8 text file (byte 0 is 0xff): a config is YAML text")
    nul = tmp_path / "nul.yaml"
    nul.write_bytes(b"data: \x00")
    assert cli_error(capsys, "train", "--config", str(nul)).startswith(f"fastkd: error: {nul}: not valid YAML: ")


def test_saved_config_loads_back_to_the_same_config():
    cfg = config_from_dict({"data": {"root": "/d"}, "optim": {"milestones_epochs": [5, 9], "betas": [0.8, 0.9]},
                            "distill": {"teacher": {"arch": "resnet50", "checkpoint": "t.pt"}, "alpha": 0.7}})
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg and changed_keys(cfg, again) == []


def test_changed_keys_ignores_only_resume_safe_keys():
    a = config_from_dict(MINIMAL)
    b = config_from_dict({"data": {"root": "/elsewhere", "num_workers": 3}, "optim": {"lr": 0.2}})
    assert changed_keys(a, b) == ["optim.lr"]


def shipped_configs() -> list[Path]:
    return sorted((REPO / "configs").rglob("*.yaml"))


def test_every_config_the_readme_names_is_shipped():
    """The README's and the docs' commands name configs by path; each is a file (and the list below
    is not empty)."""
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    named = set(re.findall(r"configs/[\w/.-]+\.yaml", "\n".join(page.read_text() for page in pages)))
    assert named, "the README and docs name no config"
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, f"the README or docs name configs that are not shipped: {missing}"
    assert set(map(str, (REPO / n for n in named))) <= set(map(str, shipped_configs()))


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates(path):
    from fastkd.models import check_arch

    cfg = load_config(path)
    assert isinstance(cfg, Config)
    check_arch(cfg.model.arch)
    if cfg.distill is not None:
        check_arch(cfg.distill.teacher.arch, "distill.teacher.arch")


def test_the_docs_configuration_reference_is_current():
    page = (REPO / "docs" / "configuration.md").read_text()
    match = re.search(r"<!-- config-reference:start -->\n(.*?)<!-- config-reference:end -->", page, re.S)
    assert match, "docs/configuration.md lacks the generated configuration reference"
    assert match.group(1).strip() == reference_markdown().strip(), \
        "docs/configuration.md's reference is stale: regenerate it with `fastkd config reference`"


def test_config_to_dict_holds_only_plain_yaml_types():
    """Checkpoints store it and load it with weights_only=True: no tuples, Paths or dataclasses."""

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return value is None or type(value) in (str, int, float, bool)

    raw = config_to_dict(config_from_dict({**MINIMAL, "optim": {"betas": [0.8, 0.9], "milestones_epochs": [3]},
                                           "distill": {"teacher": {"arch": "resnet50", "checkpoint": "t.pt"}}}))
    assert plain(raw) and raw["optim"]["betas"] == [0.8, 0.9]


def test_a_config_saved_by_an_earlier_fastkd_is_read_into_todays_sections():
    """Checkpoints keep the config they ran with: one of 2026-12-04 (flat mixing, DALI and schedule
    keys, every key written out) still resumes, exports and evaluates; a user's YAML with those keys
    is refused naming the new place instead (tests/test_batch_stage.py)."""
    from fastkd.config import upgrade_saved_config

    saved = yaml.safe_load((REPO / "benchmarks/results/cifar10/2026-12-04-mixup-grad-clip/kd-mixup-s0/config.yaml")
                           .read_text())
    assert saved["data"]["mixup_alpha"] == 1.0 and "mix" not in saved["data"]
    with pytest.raises(ConfigError, match="^data.dali_device: moved to data.dali.device$"):
        config_from_dict(saved)
    cfg = config_from_dict(upgrade_saved_config(saved))
    assert cfg.data.mix is not None and cfg.data.mix.mixup_alpha == 1.0 and cfg.data.mix.cutmix_alpha == 0.0
    assert not cfg.data.drop_last  # it trained on every partial batch: a resume goes on doing so
    assert cfg.data.randaugment is None and cfg.data.trivialaugment is None and cfg.data.size_schedule is None
    assert cfg.data.backend == "dali" and cfg.data.dali is not None and cfg.data.dali.device == saved["data"]["dali_device"]
    old = {**saved, "data": {**saved["data"], "mixup_alpha": 0.0, "auto_augment": "trivialaugment",
                             "augment_magnitude_bins": 11, "start_image_size": 16, "size_ramp_epochs": [0, 2],
                             "image_size_step": 16, "image_size": 32}}
    cfg = config_from_dict(upgrade_saved_config(old))
    assert cfg.data.mix is None and cfg.data.trivialaugment is not None and cfg.data.trivialaugment.magnitude_bins == 11
    assert cfg.data.size_schedule is not None and cfg.data.size_schedule.ramp_epochs == (0, 2)
    assert upgrade_saved_config(config_to_dict(cfg)) == config_to_dict(cfg)  # today's configs pass unchanged


def test_drop_last_with_no_full_batch_is_refused_naming_the_key():
    from fastkd.data import build_loaders
    from tests.conftest import CPU

    cfg = config_from_dict({"data": {"backend": "synthetic", "batch_size": 8, "image_size": 32,
                                     "synthetic": {"train_samples": 5, "val_samples": 4, "num_classes": 3}}})
    with pytest.raises(ConfigError, match=r"^data.drop_last: 5 training image\(s\) over 1 process\(es\) make no full "
                                          r"batch of data.batch_size 8: lower the batch size, or set data.drop_last: "
                                          r"false$"):
        build_loaders(cfg.data, spec=CPU, seed=0)
    kept = config_from_dict({"data": {**config_to_dict(cfg)["data"], "drop_last": False}})
    assert len(build_loaders(kept.data, spec=CPU, seed=0).train) == 1
