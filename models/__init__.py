"""Flax NNX models served by xlaserve; they name logical axes and never import serving/."""

from models.dcn_v2 import DCNv2, DCNv2Config
from models.dlrm import DLRM, DLRMConfig
from models.encoder import Encoder, EncoderConfig
from models.relevance import RelevanceConfig, RelevanceModel
from models.two_tower import TwoTower, TwoTowerConfig
