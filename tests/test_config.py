import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from conkd_scale.config import build_config, config_to_dict
from conkd_scale.utils.errors import ConfigError


@dataclass
class Inner:
    tau: float = 1.0
    mode: Literal["hard", "soft"] = "hard"

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ConfigError(f"inner.tau must be > 0, got {self.tau}")


@dataclass
class Outer:
    steps: int = 10
    name: str | None = None
    flag: bool = False
    sizes: list[str] = field(default_factory=lambda: ["a"])
    kg: Literal["kbrd", "none"] | None = "kbrd"
    inner: Inner = field(default_factory=Inner)


def test_file_then_overrides(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"steps": 3, "inner": {"tau": 2}}))
    cfg = build_config(Outer, f, ["inner.mode=soft", "flag=true", "sizes=x,y", "name=none"])
    assert cfg.steps == 3 and cfg.inner.tau == 2.0 and cfg.inner.mode == "soft"
    assert cfg.flag is True and cfg.sizes == ["x", "y"] and cfg.name is None
    assert config_to_dict(cfg)["inner"] == {"tau": 2.0, "mode": "soft"}
    assert build_config(Outer, None, ["kg=none"]).kg == "none"  # the choice, not None
    assert build_config(Outer, None, ["kg=null"]).kg is None
    y = tmp_path / "c.yaml"
    y.write_text("steps: 4\ninner:\n  mode: soft\n")
    assert build_config(Outer, y).steps == 4


@pytest.mark.parametrize(
    "override, needle",
    [
        ("inner.tua=1", "unknown config key 'inner.tua'"),
        ("steps=1.5", "steps: expected an integer"),
        ("inner.mode=medium", "inner.mode: 'medium' is not one of"),
        ("flag=maybe", "flag: expected true/false"),
        ("inner.tau=-1", "inner.tau must be > 0"),
        ("steps", "not of the form key=value"),
        ("steps.x=1", "has no sub-keys"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        build_config(Outer, None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(Outer, tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(ConfigError, match="bad.json: cannot parse"):
        build_config(Outer, bad)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("dataset=redial", "data_dir is required for dataset='redial'"),
        ("max_length=8", "max_length: expected >= 16"),
        ("max_length=2048", "exceeds student.n_positions 1024"),
    ],
)
def test_distill_config_checks(override, needle):
    from conkd_scale.distill.config import DistillConfig

    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        build_config(DistillConfig, None, [override])


@pytest.mark.parametrize(
    "overrides, preset",
    [
        ([], "mini"),  # the distillation default
        (["teachers.dialog_preset=small"], "small"),
        # a preset among the teacher's own overrides wins over teachers.dialog_preset
        (["teachers.dialog_preset=small", "teachers.dialog_overrides=model.preset=tiny"], "tiny"),
    ],
)
def test_auto_trained_dialog_teacher_gets_the_configured_preset(overrides, preset):
    from conkd_scale.distill.config import DistillConfig
    from conkd_scale.distill.teachers import dialog_teacher_overrides
    from conkd_scale.training.dialog_teacher import DialogTeacherConfig

    cfg = build_config(DistillConfig, None, overrides)
    dcfg = build_config(DialogTeacherConfig, None, dialog_teacher_overrides(cfg))
    assert dcfg.model.preset == preset
    assert dcfg.dataset == cfg.dataset and dcfg.max_length == cfg.max_length


def test_auto_trained_rec_teacher_reads_its_config_file_and_the_overrides_win(tmp_path):
    from conkd_scale.distill.config import DistillConfig
    from conkd_scale.distill.teachers import rec_teacher_overrides
    from conkd_scale.jobs import teacher_commands
    from conkd_scale.rec.train import RecTeacherConfig

    rec_file = tmp_path / "rec.json"
    rec_file.write_text('{"dataset": "redial", "copy_roles": true, "dim": 32, "seed": 7}')
    overrides = [
        f"teachers.rec_config={rec_file}",
        'teachers.rec_overrides=["dim=16"]',
        f"teachers.rec_dir={tmp_path / 'rec'}",
        f"teachers.dialog_dir={tmp_path / 'dialog'}",
    ]
    cfg = build_config(DistillConfig, None, overrides)
    rcfg = build_config(RecTeacherConfig, cfg.teachers.rec_config, rec_teacher_overrides(cfg))
    assert rcfg.copy_roles and rcfg.seed == 7  # from the file
    assert rcfg.dim == 16 and rcfg.dataset == cfg.dataset  # the overrides and the run win
    (rec_cmd,) = [c for t, c in teacher_commands(2, overrides) if t == "rec"]
    assert rec_cmd[rec_cmd.index("--config") + 1] == str(rec_file)
