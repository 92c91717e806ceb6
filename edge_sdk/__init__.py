"""edge-sdk: take a trained ONNX model to a fleet of edge devices and keep it running well there.

Public API::

    import edge_sdk
    manifest = edge_sdk.convert("model.onnx", profiles=["raspberry-pi-4"], output="release/")
    model = edge_sdk.EdgeModel.load("release/")
    outputs = model.run({"input": x})
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import EdgeSDKError
from .types import Precision, Target

__version__ = "0.1.0"

__all__ = ["EdgeModel", "EdgeSDKError", "Precision", "Target", "convert", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .converters.pipeline import convert
    from .runtime.model import EdgeModel


def __getattr__(name: str) -> Any:
    # Lazy: `import edge_sdk` on a device must not import the converter stack, and vice versa.
    if name == "convert":
        from .converters.pipeline import convert

        return convert
    if name == "EdgeModel":
        from .runtime.model import EdgeModel

        return EdgeModel
    raise AttributeError(f"module 'edge_sdk' has no attribute {name!r}")
