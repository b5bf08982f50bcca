"""Building blocks of the typed params: the strict frozen base model and the shared constrained types."""
from __future__ import annotations

import posixpath
from typing import Annotated, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
Positive = Annotated[int, Field(gt=0)]
Seed = Annotated[int, Field(ge=0)]   # numpy and scikit-learn take none below 0 (torch does): one rule for all


def _inside_project(path: str) -> str:
    normal = posixpath.normpath(path.replace("\\", "/"))
    if posixpath.isabs(normal) or normal == ".." or normal.startswith("../"):
        raise ValueError(f"{path!r} leaves the project: a folder the pipeline writes must be a relative path "
                         "inside the project (no leading / and no '..' out of it)")
    return path


#: A folder the pipeline writes (caches, artifact store, sweep copies): relative to the project and inside it, so no
#: params file (a sweep recipe, a profile, a pull request) can make a stage write outside the project.
ProjectPath = Annotated[str, Field(min_length=1), AfterValidator(_inside_project)]


def distinct(noun: str) -> AfterValidator:
    """A list validator: no value twice (a recipe stage, an ablation seed, a float module)."""

    def check(values: list) -> list:
        if len(set(values)) != len(values):
            raise ValueError(f"lists a {noun} twice: {values}")
        return values

    return AfterValidator(check)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ModelArch(Strict):
    """A model's architecture, as its model file records it (``tasks.artifacts``): ``MODEL`` names the ``nn.Module``
    built from it, ``"<module>:<class>"``, imported only when a file of it is loaded."""

    MODEL: ClassVar[str]
