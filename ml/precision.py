"""Numeric precision: which one the hardware runs fastest, and a model rebuilt to compute in it.

``auto`` picks bfloat16 on CPUs with bf16 units (Intel AMX or AVX512-BF16), mixed float16 on
GPUs with Tensor Cores (compute capability 7.0 and up), and float32 everywhere else (e.g. AMD Zen 3,
whose AVX2 has no bf16 arithmetic). A version is always saved in float32; :func:`with_precision`
rebuilds any saved model so that its layers compute in the chosen precision while its output
layer (the softmax) stays float32, so the decision rule, calibration and evaluation read float32
probabilities whatever the precision.

Reading the CPU's flags needs nothing; GPU detection imports TensorFlow (workers only).
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    import keras

__all__ = [
    "PRECISIONS",
    "Hardware",
    "Precision",
    "choose_precision",
    "cpu_model_and_flags",
    "detect_hardware",
    "keras_policy",
    "with_precision",
]

Precision = Literal["float32", "bfloat16", "float16"]
"""A precision a model can compute in (mixed: variables and the output stay float32)."""

PRECISIONS: tuple[str, ...] = get_args(Precision)

# Keras's policy for each precision: "mixed" keeps variables in float32 and computes in 16 bits.
_KERAS_POLICY: dict[str, str] = {
    "float32": "float32",
    "bfloat16": "mixed_bfloat16",
    "float16": "mixed_float16",
}

# x86 flags of a CPU that executes bf16 arithmetic natively (oneDNN then uses it).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
# Tensor Cores: float16 from Volta (7.0), bfloat16 from Ampere (8.0).
TENSOR_CORE_CAPABILITY = (7, 0)


@dataclass(frozen=True)
class Gpu:
    """One GPU that TensorFlow sees."""

    name: str
    compute_capability: tuple[int, int] | None


@dataclass(frozen=True)
class Hardware:
    """What decides the precision: the CPU's bf16 units and the GPUs."""

    cpu_model: str
    cpu_bf16_flags: list[str]
    gpus: list[Gpu] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for heartbeats, /readyz and benchmark results)."""
        return asdict(self)


def cpu_model_and_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, list[str]]:
    """Return the CPU's model name and its flags (no flags where /proc/cpuinfo is missing)."""
    model = platform.processor() or platform.machine() or "unknown"
    flags: list[str] = []
    try:
        text = cpuinfo.read_text()
    except OSError:
        return model, flags
    found_model = False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not found_model:
            model, found_model = value.strip(), True
        elif key == "flags" and not flags:
            flags = value.split()
    return model, flags


def detect_gpus() -> list[Gpu]:
    """The GPUs TensorFlow sees, with their compute capability (imports TensorFlow)."""
    import tensorflow as tf

    gpus = []
    for device in tf.config.list_physical_devices("GPU"):
        details: dict[str, Any] = tf.config.experimental.get_device_details(device)
        capability = details.get("compute_capability")
        gpus.append(
            Gpu(
                name=str(details.get("device_name", device.name)),
                compute_capability=tuple(capability) if capability else None,
            )
        )
    return gpus


def detect_hardware(*, gpus: bool = True, cpuinfo: Path = Path("/proc/cpuinfo")) -> Hardware:
    """Read the CPU's model and bf16 flags, and (with ``gpus``) ask TensorFlow for GPUs."""
    model, flags = cpu_model_and_flags(cpuinfo)
    return Hardware(
        cpu_model=model,
        cpu_bf16_flags=[f for f in BF16_CPU_FLAGS if f in flags],
        gpus=detect_gpus() if gpus else [],
    )


def choose_precision(requested: str, hardware: Hardware) -> Precision:
    """Resolve ``auto`` (or check a forced precision) for ``hardware``.

    ``auto``: mixed float16 on a GPU with Tensor Cores, bfloat16 on a CPU with bf16 units,
    float32 otherwise. A forced ``float32``, ``bfloat16`` or ``float16`` is returned as is: it runs
    everywhere (without the units it is emulated, and slower).
    """
    if requested == "auto":
        capabilities = [g.compute_capability for g in hardware.gpus if g.compute_capability]
        if hardware.gpus:
            if capabilities and min(capabilities) >= TENSOR_CORE_CAPABILITY:
                return "float16"
            return "float32"
        return "bfloat16" if hardware.cpu_bf16_flags else "float32"
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}: {requested!r}")
    return requested  # type: ignore[return-value]


def keras_policy(precision: str) -> str:
    """The Keras dtype policy name of ``precision`` (``bfloat16`` -> ``mixed_bfloat16``)."""
    try:
        return _KERAS_POLICY[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}") from None


def model_precision(model: keras.Model) -> str:
    """The precision most of ``model``'s layers compute in."""
    names = [layer.dtype_policy.compute_dtype for layer in model.layers]
    common = max(set(names), key=names.count) if names else "float32"
    return {"float16": "float16", "bfloat16": "bfloat16"}.get(common, "float32")


def with_precision(model: keras.Model, precision: str) -> keras.Model:
    """Return ``model`` rebuilt to compute in ``precision``, with the same weights.

    Every layer (nested models included) gets the precision's policy except the model's output
    layers, which stay float32 so that probabilities are float32. Variables stay float32 under a
    mixed policy, so the weights carry over exactly and a model rebuilt in float32 again saves
    the same way as one that never left it. A model already in ``precision`` is returned as is.
    """

    policy = keras_policy(precision)
    if model_precision(model) == precision:
        return model
    config = model.get_config()
    outputs = _output_layer_names(config.get("output_layers", []))
    for layer in config["layers"]:
        dtype = "float32" if layer["name"] in outputs else policy
        _set_policy(layer, dtype)
    rebuilt = model.__class__.from_config(config)
    rebuilt.set_weights(model.get_weights())
    return rebuilt


def _output_layer_names(entries: list[Any]) -> set[str]:
    """Names of a functional config's output layers: ``[name, 0, 0]`` or a list of those."""
    if entries and isinstance(entries[0], str):
        return {entries[0]}
    return {entry[0] for entry in entries}


def _set_policy(layer_config: dict[str, Any], policy: str) -> None:
    """Set the dtype policy of a layer's config, and of every layer nested inside it."""
    inner = layer_config.get("config", {})
    if "dtype" in inner:
        inner["dtype"] = _policy_config(policy, inner["dtype"])
    for nested in inner.get("layers", []):
        _set_policy(nested, policy)


def _policy_config(policy: str, current: Any) -> Any:
    """A serialised DTypePolicy named ``policy`` in place of ``current``.

    Only policies are replaced: a plain dtype string (an InputLayer's tensor dtype) stays as is.
    """
    if isinstance(current, dict) and current.get("class_name") in (
        "DTypePolicy",
        "FloatDTypePolicy",
    ):
        return {**current, "class_name": "DTypePolicy", "config": {"name": policy}}
    return current
