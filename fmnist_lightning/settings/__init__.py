"""The tool's settings: what can be set, and how it is read and written.

- `sections.py`: the machinery of models with flat names (`FlatModel`, `Sectioned` made of
  `Section`s, `arguments_for`). No torch.
- `models.py`: the settings themselves, in sections (`Settings`, `EvaluationRun`, `ServeRun`) and
  the benchmark's flat `BenchConfig`. No torch.
- `files.py`: defaults, a YAML file and the options given, validated into settings with one-line
  errors; `config.yaml` in and out.

Import the names from here (`from fmnist_lightning.settings import Settings`). Each module uses
only the ones listed above it.
"""

from fmnist_lightning.settings.files import (
    PROVENANCE_KEY,
    describe_error,
    fit_settings,
    from_options,
    load_yaml,
    option_name,
    read_config,
    resolve_settings,
    save_yaml,
    validated,
)
from fmnist_lightning.settings.models import (
    MAX_SEED,
    TRAIN_IMAGES,
    Accelerator,
    AugmentationSettings,
    BatchLimit,
    BenchConfig,
    BenchPath,
    DataSettings,
    EvaluationRun,
    EvaluationSettings,
    HardwareSettings,
    Logger,
    ModelSettings,
    OptimisationSettings,
    Precision,
    Rate,
    ResultsSettings,
    RunSettings,
    ServeRun,
    ServeSettings,
    Settings,
    ToolkitSettings,
    TrackingSettings,
)
from fmnist_lightning.settings.sections import (
    FlatField,
    FlatModel,
    Number,
    Section,
    Sectioned,
    StrictModel,
    arguments_for,
    comma_list,
    number_from_text,
)

__all__ = [
    "MAX_SEED",
    "PROVENANCE_KEY",
    "TRAIN_IMAGES",
    "Accelerator",
    "AugmentationSettings",
    "BatchLimit",
    "BenchConfig",
    "ResultsSettings",
    "BenchPath",
    "DataSettings",
    "EvaluationRun",
    "EvaluationSettings",
    "FlatField",
    "FlatModel",
    "HardwareSettings",
    "Logger",
    "ModelSettings",
    "Number",
    "OptimisationSettings",
    "Precision",
    "Rate",
    "RunSettings",
    "Section",
    "Sectioned",
    "ServeRun",
    "ServeSettings",
    "Settings",
    "StrictModel",
    "ToolkitSettings",
    "TrackingSettings",
    "arguments_for",
    "comma_list",
    "describe_error",
    "fit_settings",
    "from_options",
    "load_yaml",
    "number_from_text",
    "option_name",
    "read_config",
    "resolve_settings",
    "save_yaml",
    "validated",
]
