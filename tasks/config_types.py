"""Building blocks of the typed params: the strict frozen base model and the shared constrained types."""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

Fraction = Annotated[float, Field(ge=0.0, lt=1.0)]
Positive = Annotated[int, Field(gt=0)]


def distinct(noun: str) -> AfterValidator:
    """A list validator: no value twice (a recipe stage, an ablation seed, a float module)."""

    def check(values: list) -> list:
        if len(set(values)) != len(values):
            raise ValueError(f"lists a {noun} twice: {values}")
        return values

    return AfterValidator(check)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
