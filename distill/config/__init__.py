"""A recipe as a typed, validated config: the schema (schema.py), its checks (checks.py), loading
a recipe with overrides (recipe.py) and the search grammar (search_space.py). `distill.config.X`
names what the other layers use."""

from distill.config.checks import validate  # noqa: F401
from distill.config.recipe import load_config  # noqa: F401
from distill.config.schema import (  # noqa: F401
    TEACHER_STAGE,
    AugmentConfig,
    Config,
    DataConfig,
    DistillConfig,
    HubConfig,
    RunConfig,
    SearchConfig,
    SearchLatencyConfig,
    StudentConfig,
    TaskConfig,
    TeacherConfig,
    TrackingConfig,
    TrainConfig,
    TransferSource,
    VocabConfig,
    has_teacher,
    main_teacher,
    stage_train,
    teacher_list,
    teacher_of_stage,
    teacher_stage_name,
    to_dict,
    to_yaml,
)
from distill.config.search_space import leaf_types  # noqa: F401
from distill.errors import ConfigError  # noqa: F401
