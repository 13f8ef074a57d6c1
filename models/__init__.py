"""Flax NNX models served by xlaserve; they name logical axes and never import serving/."""

from models.dlrm import DLRM, DLRMConfig
