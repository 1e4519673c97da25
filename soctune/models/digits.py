"""Former home of the digits pretraining and classifier, kept so existing imports keep working;
everything now lives in :mod:`soctune.examples.digits` (import from there). The runtime does not
import this module."""

from ..examples.digits import ASSETS_DIR, shipped_model_path
from ..examples.digits.classifier import DigitClassifier, load_classifier
from ..examples.digits.data import heldout_split, load_digits_tensor
from ..examples.digits.pretrain import (NUM_TRAIN_TIMESTEPS, UNET_CONFIG, make_unet, pretrain_all,
                                        pretrain_classifier, pretrain_ddpm, pretrain_flow)

__all__ = ["ASSETS_DIR", "NUM_TRAIN_TIMESTEPS", "UNET_CONFIG", "DigitClassifier", "heldout_split", "load_classifier",
           "load_digits_tensor", "make_unet", "pretrain_all", "pretrain_classifier", "pretrain_ddpm", "pretrain_flow",
           "shipped_model_path"]
