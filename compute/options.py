"""The floor's choices as a user writes them (CLI, YAML): compute dtypes,
weight formats and devices, by name, with their checks. Nothing here
imports torch: `pipeinfer --help` and a YAML's validation read them."""

from __future__ import annotations

# Compute dtypes by name (CLI, YAML, per-stage plans); compute.stage_model.DTYPES maps them to torch's.
DTYPE_NAMES = ("float32", "bfloat16", "float16")

QUANTIZE_CHOICES = ("auto", "gguf", "int4", "int8", "none")
QUANTIZE_HELP = ("weights as the stages hold them: auto (a GGUF's own quantization, a safetensors model's dtype), "
                 "gguf (the GGUF's blocks), int4 (group-32 round to nearest), int8 (per-row), none (dense --dtype)")

# Where a stage may compute: "cpu", "cuda" (the current GPU) or "cuda:N".
DEVICE_HELP = "cpu, cuda or cuda:N"


class QuantizeError(ValueError):
    """A quantization this model or machine cannot have."""


class DeviceError(ValueError):
    """A device this machine cannot compute on."""


def check_quantize(name: str) -> str:
    if name not in QUANTIZE_CHOICES:
        raise QuantizeError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {name!r}")
    return name


def check_device_name(name: str) -> str:
    """The syntax only (the coordinator's machine may have no GPU where a
    stage's has). -> the name."""
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (kind == "cpu" and index) or (index and not index.isdigit()):
        raise DeviceError(f"device {name!r}: expected {DEVICE_HELP}")
    return name
