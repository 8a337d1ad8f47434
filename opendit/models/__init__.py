"""STDiT and its checkpoint loading."""

from opendit.models.stdit import MODEL_PRESETS, STDiT, STDiTBlock, STDiTConfig, build_model
from opendit.models.weights import CheckpointError, LoadReport, load_checkpoint, load_state_dict_checked, read_state_dict

__all__ = [
    "MODEL_PRESETS",
    "STDiT",
    "STDiTBlock",
    "STDiTConfig",
    "build_model",
    "CheckpointError",
    "LoadReport",
    "load_checkpoint",
    "load_state_dict_checked",
    "read_state_dict",
]
