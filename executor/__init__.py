"""executor: the streaming engine of tileplan, and the plan contract it runs.

Everything outside this package uses only the names exported here::

    from executor import StreamingCNN, analyze_trunk, load_plan
"""

from executor.axes import spatial_axes
from executor.chain import SegmentedStreamingCNN, SegmentSpec
from executor.classify import traced_trunk
from executor.errors import ContractError, GeometryError, StreamingError, UnsupportedLayerError
from executor.fileio import atomic_write, atomic_write_path
from executor.function import stream_trunk
from executor.geometry import (
    AxisGeometry,
    AxisTile,
    Tile,
    TileGrid,
    TrunkGeometry,
    analyze_trunk,
    build_tile_grid,
)
from executor.plan import (
    BATCH_NORM_MODES,
    OPTIMIZER_NAMES,
    SCHEMA_VERSION,
    BatchNormMode,
    Candidate,
    FrozenPhase,
    LayerMemory,
    MemoryBreakdown,
    ModelIdentity,
    OptimizerName,
    Plan,
    PlanError,
    Provenance,
    Segment,
    Segmentation,
    Statistic,
    TimeFit,
    TimeSample,
    Verification,
    VerifyStatus,
    check_plan_matches,
    check_same_model,
    load_plan,
    save_plan,
    trunk_fingerprint,
)
from executor.precision import DTYPE_NAMES, DtypeName, Precision
from executor.program import Program, ReducePart, Reduction, StreamPart, build_program
from executor.segments import chain, cut_points, find_node, map_cut_points, prefix, suffix
from executor.serde import from_data, to_data, to_yaml
from executor.sources import CropReader, ImageSource, TensorSource
from executor.statistics import EFFECTS
from executor.steps import streaming_step
from executor.streaming import (
    ForwardState,
    StreamedGrads,
    StreamingCNN,
    check_fits_plan,
    spatial_tile_shape,
)
from executor.trace import trace

__all__ = [
    "BATCH_NORM_MODES",
    "DTYPE_NAMES",
    "EFFECTS",
    "OPTIMIZER_NAMES",
    "SCHEMA_VERSION",
    "AxisGeometry",
    "AxisTile",
    "BatchNormMode",
    "Candidate",
    "FrozenPhase",
    "ForwardState",
    "ContractError",
    "CropReader",
    "DtypeName",
    "GeometryError",
    "ImageSource",
    "LayerMemory",
    "MemoryBreakdown",
    "ModelIdentity",
    "OptimizerName",
    "Plan",
    "PlanError",
    "Precision",
    "Program",
    "Provenance",
    "ReducePart",
    "Reduction",
    "Segment",
    "SegmentSpec",
    "Segmentation",
    "SegmentedStreamingCNN",
    "Statistic",
    "StreamingCNN",
    "StreamPart",
    "StreamedGrads",
    "StreamingError",
    "TensorSource",
    "Tile",
    "TileGrid",
    "TimeFit",
    "TimeSample",
    "TrunkGeometry",
    "UnsupportedLayerError",
    "Verification",
    "VerifyStatus",
    "analyze_trunk",
    "atomic_write",
    "atomic_write_path",
    "build_program",
    "build_tile_grid",
    "chain",
    "cut_points",
    "find_node",
    "check_fits_plan",
    "check_plan_matches",
    "check_same_model",
    "from_data",
    "load_plan",
    "map_cut_points",
    "prefix",
    "save_plan",
    "spatial_axes",
    "spatial_tile_shape",
    "stream_trunk",
    "streaming_step",
    "suffix",
    "to_data",
    "to_yaml",
    "trace",
    "traced_trunk",
    "trunk_fingerprint",
]
