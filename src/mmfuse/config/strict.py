"""The base of every config section: unknown keys are errors that name the closest valid key."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from mmfuse.core.errors import did_you_mean


class StrictModel(BaseModel):
    """Rejects unknown keys with a 'did you mean' hint instead of pydantic's generic message."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields)
            for key in data:
                if key not in known:
                    raise ValueError(f"unknown key '{key}'{did_you_mean(str(key), known)}")
        return data
