"""executor: the streaming engine of tileplan.

Public API::

    from executor import StreamingCNN, analyze_trunk
"""

from executor.errors import GeometryError, StreamingError, UnsupportedLayerError
from executor.geometry import AxisTile, Tile, TileGrid, TrunkGeometry
from executor.streaming import StreamingCNN, analyze_trunk, spatial_tile_shape

__all__ = [
    "AxisTile",
    "GeometryError",
    "StreamingCNN",
    "StreamingError",
    "Tile",
    "TileGrid",
    "TrunkGeometry",
    "UnsupportedLayerError",
    "analyze_trunk",
    "spatial_tile_shape",
]
