"""ESTA training: `TrainConfig` (settings), `Trainer` (the adapt-and-stitch loop, checkpoints), the
learning-rate schedule (`esta.train.schedule`) and the data order (`esta.train.data`)."""
from esta.train.config import TrainConfig
from esta.train.data import calibration_images
from esta.train.trainer import NonFiniteLossError, Trainer, load_model_state, prepare_model

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "prepare_model", "load_model_state",
           "calibration_images"]
