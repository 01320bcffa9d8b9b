"""What an embedded target is, as plain data: the RAM and storage a quantized model may use.

Nothing here knows about plugins, so the hook that registers profiles, the built-in ladder and
the memory accountant can all import it without importing each other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class DeviceProfile(BaseModel):
    """One emulated target: its memory budget and the real part whose datasheet it follows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="short id used on the command line, e.g. esp32-s3")
    ram_bytes: int = Field(gt=0, description="RAM usable by the model (weights not in place + working memory)")
    storage_bytes: int = Field(gt=0, description="flash / SD / eMMC the weights are stored in")
    weights_execute_in_place: bool = Field(
        False, description="weights are read straight from memory-mapped flash (XIP) and need no RAM copy"
    )
    part: str = Field(description="the real part or board this profile stands for")
    note: str = Field("", description="where the numbers come from (datasheet figure) and what was left out")
