"""The package's shape: modules import only what lies below them, rendering needs no torch, one
rank-zero rule for every launcher, and the settings validate themselves."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from fmnist_lightning.errors import UsageError
from fmnist_lightning.hardware import is_global_zero
from fmnist_lightning.settings import (
    BenchConfig,
    EvaluationRun,
    ModelSettings,
    Section,
    Sectioned,
    Settings,
    resolve_settings,
)

PACKAGE = Path(__file__).parent.parent / "fmnist_lightning"


def _unit(path: Path) -> str:
    """The layout's unit a file belongs to: a top-level module, or a subpackage as a whole."""
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """The package's units a module imports, anywhere in it (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fmnist_lightning"):
            if node.module == "fmnist_lightning":
                found |= {a.name for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
            else:
                found.add(node.module.split(".")[1])
    return found - {_unit(path)}


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):  # a subpackage's modules count as one unit of the layout
        graph.setdefault(_unit(path), set()).update(_imports(path))
    order: list[str] = []
    visiting: list[str] = []

    def visit(module: str) -> None:
        if module in order:
            return
        assert module not in visiting, f"import cycle: {' -> '.join([*visiting, module])}"
        visiting.append(module)
        for dependency in sorted(graph.get(module, ())):
            visit(dependency)
        visiting.pop()
        order.append(module)

    for module in sorted(graph):
        visit(module)
    assert order.index("settings") < order.index("trainer_factory") < order.index("training") < order.index("cli")


def test_rendering_a_report_imports_neither_torch_nor_lightning(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from fmnist_lightning import html_report, render, runs\n"
        "html_report.stale_outputs(Path(sys.argv[1])); runs.read_metrics(Path(sys.argv[1]) / 'metrics.csv')\n"
        "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    )
    command = [sys.executable, "-c", code, str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "[]"


RANK_CASES = [
    ({}, True),  # one process, no launcher
    ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, True),  # torchrun, node 0
    ({"RANK": "3", "LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # torchrun, first process of node 1
    ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),  # Lightning's launcher, second process
    ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),  # Lightning's launcher, node 1
    ({"LOCAL_RANK": "0", "NODE_RANK": "0", "SLURM_PROCID": "0"}, True),  # Lightning's launcher in a batch step
    ({"LOCAL_RANK": "1", "SLURM_PROCID": "0"}, False),  # ... its child inherits SLURM_PROCID=0
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, True),  # srun, task 0
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, False),  # srun, task 1
    ({"NODE_RANK": "1"}, False),  # node 1 before a launcher started anything
]


@pytest.mark.parametrize(("env", "zero"), RANK_CASES, ids=[str(c[0]) for c in RANK_CASES])
def test_rank_zero_under_every_launcher(env: dict[str, str], zero: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert is_global_zero() is zero


def test_settings_name_the_key_the_rule_and_where_the_value_came_from(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("max-epochs: 0\nlr: 1e-3\n")  # dashes allowed; YAML 1.1 reads 1e-3 as text
    with pytest.raises(
        UsageError, match=rf"^config file {config}: max_epochs: Input should be greater than or equal to 1, got 0$"
    ):
        resolve_settings(config)
    s = resolve_settings(config, {"max_epochs": 3, "limit_train_batches": "10", "limit_val_batches": "0.5"})
    limits = (s.run.limit_train_batches, s.run.limit_val_batches)
    assert (s.run.max_epochs, s.optimisation.lr, *limits) == (3, 0.001, 10, 0.5)
    with pytest.raises(
        UsageError, match=r"^dropout_conv: Input should be less than 1, got 1.5 \(from --dropout-conv\)$"
    ):
        resolve_settings(config, {"max_epochs": 3, "dropout_conv": 1.5})
    with pytest.raises(UsageError, match=r"^dropout: Input should be a valid boolean, got 'yes' \(from --dropout\)$"):
        resolve_settings(None, {"dropout": "yes"})  # strict: no guessing at booleans
    with pytest.raises(
        UsageError,
        match=r"^devices: Input should be 'auto', a count >= 1 or a list like '0,1', got '0' \(from --devices\)$",
    ):
        resolve_settings(None, {"devices": "0"})
    assert resolve_settings(None, {"devices": 2}).hardware.devices == "2"  # YAML `devices: 2`


def test_settings_are_frozen_values_with_one_set_of_defaults() -> None:
    s = Settings()
    with pytest.raises(ValueError):
        s.optimisation.lr = 1.0  # type: ignore[misc]
    assert s.replace(lr=0.5).optimisation.lr == 0.5 and s.optimisation.lr == 1e-3


def test_settings_are_sections_with_flat_unique_names() -> None:
    """52 settings in sections; each name belongs to one section and is no section's name, so flat
    YAML keys and options sort into sections unambiguously."""
    sections = Settings.sections()
    names = [name for section in sections.values() for name in section.model_fields]
    assert len(names) == len(set(names)) == 52
    assert not set(names) & set(sections)
    assert list(Settings.flat_fields()) == names and all(issubclass(s, Section) for s in sections.values())
    # Evaluating a checkpoint validates only what it reads: its sections are the training run's own.
    assert EvaluationRun.sections() == {k: sections[k] for k in ("hardware", "data", "evaluation")}


def test_every_shipped_config_and_a_saved_config_yaml_load_flat(tmp_path: Path) -> None:
    from fmnist_lightning.settings import save_yaml

    configs = sorted(Path("configs").glob("*.yaml"))
    assert len(configs) >= 5
    for config in configs:
        s = resolve_settings(config)
        saved = tmp_path / f"{config.stem}.yaml"
        save_yaml(s, saved, {"torch": "x"})  # as fit writes config.yaml: flat keys, provenance beside them
        assert "lr:" in saved.read_text() and "optimisation" not in saved.read_text()
        assert resolve_settings(saved) == s, config
    assert resolve_settings(Path("configs/tutorial.yaml")).model.dropout is False


def test_each_consumer_takes_only_its_sections() -> None:
    """Read from the signatures: the data module takes the data section, the LightningModule the
    model and optimisation sections, hardware resolution the hardware section, evaluation the
    evaluation run (hardware, data, evaluation), and MLflow the tracking section; none takes the
    whole `Settings`."""
    from fmnist_lightning import data, evaluation, hardware, inference, model, tracking

    def takes(fn: object) -> set[str]:  # the annotations as written (the modules postpone them)
        return {str(v) for k, v in fn.__annotations__.items() if k != "return"}  # type: ignore[attr-defined]

    consumers = {
        data.FashionMNISTDataModule.from_settings: "DataSettings",
        model.FashionClassifier.from_settings: "ModelSettings",
        hardware.resolve_hardware: "HardwareSettings",
        evaluation.evaluate: "EvaluationRun",
        evaluation.run_test: "EvaluationRun",
        evaluation.predict_samples: "EvaluationRun",
        evaluation.make_report: "EvaluationRun",
        evaluation.analyse_data: "DataSettings",
        inference.export_checkpoint: "DataSettings",
        inference.classify: "HardwareSettings",
        tracking.build_loggers: "TrackingSettings",
    }
    for fn, section in consumers.items():
        assert section in takes(fn) and "Settings" not in takes(fn), (fn, takes(fn))
    assert "OptimisationSettings" in takes(model.FashionClassifier.from_settings)


def test_bench_config_is_flat_with_its_own_defaults() -> None:
    """The benchmark's few settings are its own plain fields, not a training run's sections; those it
    shares with `fit` (layout, evaluation batch) default to fit's, every path starts from seed 0, and
    `precision` is a list (each path in each)."""
    assert BenchConfig.sections() == {} and all(f.section is None for f in BenchConfig.flat_fields().values())
    assert BenchConfig(precision="32-true,bf16-mixed").precision == ("32-true", "bf16-mixed")
    b = BenchConfig(accelerator="cpu", batch_size=64)
    assert (b.accelerator, b.batch_size, b.channels_last, b.eval_batch_size, b.seed) == ("cpu", 64, True, 250, 0)
    with pytest.raises(TypeError, match="steps must be sections"):  # the two kinds of model do not mix

        class Mixed(Sectioned):
            model: ModelSettings = ModelSettings()
            steps: int = 1


def test_bench_config_quick_and_epochs_set_the_steps() -> None:
    assert (BenchConfig().steps, BenchConfig().warmup_steps) == (400, 20)
    assert (BenchConfig(quick=True).steps, BenchConfig(quick=True).warmup_steps) == (40, 5)
    assert BenchConfig(quick=True, steps=3).steps == 3
    assert BenchConfig(epochs=1.0, batch_size=500).steps == 110 - 20
    assert BenchConfig(paths="raw, fmnist-fast").paths == ("raw", "fmnist-fast")
    with pytest.raises(ValueError):
        BenchConfig(paths="raw,tensorflow")


def test_data_dir_that_is_a_file_is_a_usage_error(cli, tmp_path: Path) -> None:
    picture = tmp_path / "some.png"
    picture.write_bytes(b"\x89PNG")
    code, _, err = cli("data", "--data-dir", picture, "--out", tmp_path / "out")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "is a file, not a folder" in lines[0], err
