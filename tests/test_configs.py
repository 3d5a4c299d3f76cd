"""What ships must load: every training config passes its method's checks, and the shipped models
load from their folders (int8 weight-only, indexed shards) and generate."""
from pathlib import Path

import numpy as np
import pytest

from flowflash.methods import DISTILL_METHODS
from flowflash.models.flow_model import ModelConfig
from flowflash.train.common import load_config
from flowflash.train.configs import DistillConfig, TeacherConfig
from flowflash.train.loop import LOOP_FIELDS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_is_accepted_by_its_method(path):
    if path.name.startswith("teacher"):
        c = load_config(TeacherConfig, path)
        assert bool(c.model) != bool(c.init_from)  # a fresh architecture or a model to start from
        if c.model:
            ModelConfig.from_dict({**c.model, "vocab": []})
        return
    method = {"tg": "tg", "dmd2": "dmd2"}.get(path.stem.split("-")[1], "flash")  # as scripts/distill-emoji.sh
    DISTILL_METHODS[method].check_config(load_config(DistillConfig, path, {"method": method}), LOOP_FIELDS)


def test_the_shipped_models_load_and_the_student_draws():
    from flowflash.models import storage
    from flowflash.runtime.pipeline import Pipeline, resolve_model

    for name in ("student", "teacher"):
        info = storage.storage_of(resolve_model(name))
        assert info["int8_tensors"] > 0 and info["bytes"] < 25e6  # the repository budget holds
    pipe = Pipeline.load("student")  # the tests' tiny MiniLM stands in: shapes match, values do not
    a = pipe.generate("grinning face, twemoji style", seed=3)[0]
    b = pipe.generate("grinning face, twemoji style", seed=3)[0]
    assert a.size == (64, 64) and (np.asarray(a) == np.asarray(b)).all()
    assert pipe.last.params.steps == 4 and pipe.last.params.guidance == 1.0
