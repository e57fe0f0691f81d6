"""executor: the streaming engine of tileplan.

Public API::

    from executor import StreamingCNN, analyze_trunk
"""

from executor.errors import GeometryError, StreamingError, UnsupportedLayerError
from executor.geometry import AxisGeometry, AxisTile, Tile, TileGrid, TrunkGeometry
from executor.plan import (
    SCHEMA_VERSION,
    Candidate,
    MemoryBreakdown,
    Plan,
    PlanError,
    check_plan_matches,
    dtype_of,
    load_plan,
    save_plan,
    trunk_fingerprint,
)
from executor.steps import streaming_step
from executor.streaming import StreamingCNN, analyze_trunk, spatial_tile_shape

__all__ = [
    "SCHEMA_VERSION",
    "AxisGeometry",
    "AxisTile",
    "Candidate",
    "MemoryBreakdown",
    "Plan",
    "PlanError",
    "check_plan_matches",
    "dtype_of",
    "load_plan",
    "save_plan",
    "trunk_fingerprint",
    "GeometryError",
    "StreamingCNN",
    "StreamingError",
    "Tile",
    "TileGrid",
    "TrunkGeometry",
    "UnsupportedLayerError",
    "analyze_trunk",
    "spatial_tile_shape",
    "streaming_step",
]
