"""stepdistill.configs: config dataclasses from a YAML recipe and flags, on transformers.HfArgumentParser."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
from recipe_methods import RECIPES, recipe_config

from stepdistill.configs import ConfigParser, field_value_parser, parse_config, parse_configs
from stepdistill.trainers.digits_world import ClassifierConfig, TeacherConfig
from stepdistill.trainers.dmd import DMDConfig
from stepdistill.trainers.style_lora import StyleLoraConfig

ROOT = Path(__file__).resolve().parents[1]


def _recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(("argv", "name", "want"), [
    # bool: explicit values, a bare flag, and the --no_ complement of a field that defaults to true
    (["--use_gan", "true"], "use_gan", True),
    (["--use_gan", "false"], "use_gan", False),
    (["--use_gan"], "use_gan", True),
    (["--gradient_checkpointing", "True"], "gradient_checkpointing", True),
    (["--export", "false"], "export", False),
    (["--no_export"], "export", False),
    # bool | None
    (["--backward_simulation", "false", "--data", "digits"], "backward_simulation", False),
    (["--backward_simulation", "none"], "backward_simulation", None),
    # int, float (1e-4 and 1000.0 spellings)
    (["--max_train_steps", "1000.0"], "max_train_steps", 1000),
    (["--max_train_steps", "1e3"], "max_train_steps", 1000),
    (["--generator_learning_rate", "1e-4"], "generator_learning_rate", 1e-4),
    # float | None
    (["--real_guidance_scale", "2"], "real_guidance_scale", 2.0),
    (["--real_guidance_scale", "None"], "real_guidance_scale", None),
    # list[float]: space- and comma-separated
    (["--student_timesteps", "999", "749", "499"], "student_timesteps", [999.0, 749.0, 499.0]),
    (["--student_timesteps", "999,749"], "student_timesteps", [999.0, 749.0]),
    (["--student_timesteps", "999,749", "499"], "student_timesteps", [999.0, 749.0, 499.0]),
    # list[int] | None
    (["--sample_shape", "1", "8", "8"], "sample_shape", [1, 8, 8]),
    (["--sample_shape", "1,8,8"], "sample_shape", [1, 8, 8]),
    (["--sample_shape", "none"], "sample_shape", None),
    # list[str] | None
    (["--lora_target_modules", "conv1,conv2", "to_q"], "lora_target_modules", ["conv1", "conv2", "to_q"]),
    # str and str | None
    (["--teacher", "some/folder"], "teacher", "some/folder"),
    (["--resume_from_checkpoint", "latest"], "resume_from_checkpoint", "latest"),
    (["--resume_from_checkpoint", "null"], "resume_from_checkpoint", None),
    (["--init_generator", "none"], "init_generator", None),
])  # fmt: skip
def test_every_field_kind_from_flags(argv, name, want):
    cfg = parse_config(DMDConfig, argv)
    assert getattr(cfg, name) == want and type(getattr(cfg, name)) is type(want)


def test_yaml_values_are_converted_to_field_types(tmp_path):
    recipe = _recipe(tmp_path, (
        "teacher: t\n"
        "generator_learning_rate: 1e-4\n"  # a string in YAML 1.1
        "critic_learning_rate: 1.0e-4\n"  # a float
        "max_train_steps: 1000.0\n"
        "student_timesteps: [999, 499]\n"
        "use_ema: false\n"
        "export: 'no'\n"
        "backward_simulation: null\n"
        "sample_shape: [1, 8, 8]\n"
        "lora_target_modules: conv1,conv2\n"
        "real_guidance_scale: 3\n"
        "resume_from_checkpoint: null\n"
    ))  # fmt: skip
    cfg = parse_config(DMDConfig, ["--config", recipe])
    assert cfg.generator_learning_rate == 1e-4 and isinstance(cfg.generator_learning_rate, float)
    assert cfg.critic_learning_rate == 1e-4
    assert cfg.max_train_steps == 1000 and isinstance(cfg.max_train_steps, int)
    assert cfg.student_timesteps == [999.0, 499.0] and all(isinstance(t, float) for t in cfg.student_timesteps)
    assert cfg.use_ema is False and cfg.export is False and cfg.backward_simulation is None
    assert cfg.sample_shape == [1, 8, 8] and cfg.lora_target_modules == ["conv1", "conv2"]
    assert cfg.real_guidance_scale == 3.0 and isinstance(cfg.real_guidance_scale, float)
    assert cfg.resume_from_checkpoint is None


def test_flags_override_the_recipe_and_validation_runs(tmp_path):
    recipe = _recipe(tmp_path, "teacher: t\nstudent_timesteps: [999, 499]\nuse_ema: true\nmax_train_steps: 50\n")
    cfg = parse_config(DMDConfig, ["--config", recipe, "--student_timesteps", "999", "666", "333",
                                   "--use_ema", "false", "--real_guidance_scale", "none"])  # fmt: skip
    assert cfg.student_timesteps == [999.0, 666.0, 333.0] and cfg.use_ema is False and cfg.max_train_steps == 50
    assert cfg.teacher == "t" and cfg.uses_backward_simulation
    # the recipe's value is a default: a later flag wins whatever its position
    assert parse_config(DMDConfig, ["--max_train_steps", "7", "--config", recipe]).max_train_steps == 7
    with pytest.raises(ValueError, match="strictly decreasing"):  # __post_init__ on the merged values
        parse_config(DMDConfig, ["--config", recipe, "--student_timesteps", "499", "999"])


def test_every_shipped_recipe_parses():
    assert RECIPES
    for recipe in RECIPES:
        parse_config(recipe_config(recipe), ["--config", str(recipe)])


def test_unknown_recipe_key_names_the_valid_keys(tmp_path):
    recipe = _recipe(tmp_path, "teacher: t\nstudent_timestep: [999]\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['student_timestep'\]; valid keys: .*'student_timesteps'"):
        parse_config(DMDConfig, ["--config", recipe])
    with pytest.raises(ValueError, match="bad value for 'max_train_steps': expected an integer, got 2.5"):
        parse_config(DMDConfig, ["--config", _recipe(tmp_path, "max_train_steps: 2.5\n")])
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        parse_config(DMDConfig, ["--config", _recipe(tmp_path, "- a\n- b\n")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parse_config(DMDConfig, ["--config", str(tmp_path / "missing.yaml")])


def test_unknown_or_bad_flag_is_a_usage_error_naming_the_valid_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(DMDConfig, ["--student_timestep", "999"], prog="stepdistill train dmd")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("stepdistill train dmd: error: unrecognized arguments: --student_timestep 999")
    assert "--student_timesteps" in err and "--config" in err
    with pytest.raises(SystemExit):  # no abbreviations: a prefix of a flag is not that flag
        parse_config(DMDConfig, ["--max_train", "3"])
    for argv, message in ((["--use_gan", "maybe"], "expected true or false, got 'maybe'"),
                          (["--max_train_steps", "2.5"], "expected an integer, got '2.5'"),
                          (["--student_timesteps", "999,x"], "expected a number, got 'x'")):
        with pytest.raises(SystemExit):
            parse_config(DMDConfig, argv)
        assert message in capsys.readouterr().err


def test_help_lists_fields_with_their_help(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_config(DMDConfig, ["--help"], prog="stepdistill train dmd")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: stepdistill train dmd [-h] [--config RECIPE.yaml]")
    assert "--student_timesteps" in out and "Student timestep list" in out and "--no_export" in out


@dataclass
class _Run:
    """Script arguments."""

    out: str = field(default="o", metadata={"help": "Output."})
    verbose: bool = field(default=False, metadata={"help": "Talk."})


@dataclass
class _Model:
    """Model arguments."""

    width: int = field(default=8, metadata={"help": "Width."})
    dropout: float | None = field(default=None, metadata={"help": "Dropout."})

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ValueError("width must be >= 1")


def test_several_dataclasses_route_flags_and_recipe_keys_by_name(tmp_path):
    recipe = _recipe(tmp_path, "width: 16\nverbose: true\n")
    run, model = parse_configs((_Run, _Model), ["--config", recipe, "--dropout", "0.1", "--out", "x"])
    assert run == _Run(out="x", verbose=True) and model == _Model(width=16, dropout=0.1)
    with pytest.raises(ValueError, match="width must be >= 1"):
        parse_configs((_Run, _Model), ["--width", "0"])
    with pytest.raises(ValueError, match=r"unknown key.*valid keys: \['out', 'verbose', 'width', 'dropout'\]"):
        parse_configs((_Run, _Model), ["--config", _recipe(tmp_path, "depth: 3\n")])


def test_a_name_in_two_dataclasses_needs_prefixes(tmp_path):
    shared = r"\['batch_size', 'learning_rate', 'seed'\] declared by both ClassifierConfig and TeacherConfig"
    with pytest.raises(ValueError, match=shared):
        ConfigParser((ClassifierConfig, TeacherConfig))
    recipe = _recipe(tmp_path, "teacher_max_train_steps: 10\nclassifier_seed: 4\n")
    clf, teacher = parse_configs((ClassifierConfig, TeacherConfig), ["--config", recipe, "--teacher_seed", "3",
                                 "--classifier_learning_rate", "1e-3"], prefixes=("classifier_", "teacher_"))
    assert clf == ClassifierConfig(seed=4, learning_rate=1e-3)
    assert teacher == TeacherConfig(seed=3, max_train_steps=10)


def test_the_dataclass_fields_are_left_untouched():
    before = [(f.name, f.type) for f in dataclasses.fields(DMDConfig)]
    ConfigParser((DMDConfig,))
    assert [(f.name, f.type) for f in dataclasses.fields(DMDConfig)] == before


def test_bool_false_is_false_for_configs_that_used_type_of_default():
    """The old style-LoRA / teacher parsers built flags with ``type(f.default)``: ``bool("false")`` is True."""

    @dataclass
    class WithFlag(StyleLoraConfig):
        """A style-LoRA config with a boolean field."""

        verbose: bool = field(default=True, metadata={"help": "Talk."})

    (cfg,) = parse_configs((WithFlag,), ["--verbose", "false", "--lora_alpha", "4", "--rank", "2"])
    assert cfg.verbose is False and cfg.lora_alpha == 4.0 and cfg.rank == 2


def test_field_value_parser_errors_are_short_reasons():
    assert field_value_parser(list[float] | None)("999,749") == [999.0, 749.0]
    assert field_value_parser(tuple[int, ...])("1 2") == (1, 2)
    with pytest.raises(ValueError, match="null is only allowed for optional fields"):
        field_value_parser(int)(None)
    with pytest.raises(ValueError, match="expected an integer, got True"):
        field_value_parser(int)(True)
    assert field_value_parser(str)("none") == "none"  # only optional fields read none as None



class _Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclass
class _Choice:
    """Choices."""

    kind: Literal["a", "b"] = field(default="a", metadata={"help": "Kind."})
    mode: _Mode = field(default=_Mode.FAST, metadata={"help": "Mode."})


def test_literal_and_enum_fields():
    assert parse_config(_Choice, ["--kind", "b", "--mode", "slow"]) == _Choice(kind="b", mode=_Mode.SLOW)
    with pytest.raises(SystemExit):
        parse_config(_Choice, ["--kind", "c"])
    with pytest.raises(SystemExit):
        parse_config(_Choice, ["--mode", "medium"])
