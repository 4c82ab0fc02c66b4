"""Rotation metrics: per-layer and per-neuron angular updates vs. the rotational equilibrium (docs/design.md §5).

`RotationTracker` measures during training and writes a checkpoint's `rotation/` folder;
`load_rotation` reads one back; `metrics_command` and `model_card_section` report on it.
The file format is documented in docs/rotation-metrics.md.
"""

from pretrain.metrics.history import EQUILIBRIUM_TOLERANCE, LAYER_METRICS, RotationHistory
from pretrain.metrics.report import find_rotation_dir, metrics_command, model_card_section
from pretrain.metrics.rotation import RotationTracker, layer_name
from pretrain.metrics.store import FORMAT_VERSION, RotationData, equilibrium_layers, load_rotation

__all__ = ["EQUILIBRIUM_TOLERANCE", "FORMAT_VERSION", "LAYER_METRICS", "RotationData", "RotationHistory",
           "RotationTracker", "equilibrium_layers", "find_rotation_dir", "layer_name", "load_rotation",
           "metrics_command", "model_card_section"]
