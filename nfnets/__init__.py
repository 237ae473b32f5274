"""NFNets in JAX/Haiku: models, adaptive gradient clipping, training and evaluation.

The top level re-exports what a user reaches for first; everything else lives in its own module
(`nfnets.agc`, `nfnets.optim`, `nfnets.train_step`, `nfnets.data.pipeline`, ...).
"""
from nfnets.flops import count_macs
from nfnets.flops import nfnet_macs
from nfnets.nfnet import NFNet
from nfnets.nfnet import VARIANTS
from nfnets.pretrained import CheckpointError
from nfnets.pretrained import infer_variant
from nfnets.pretrained import load_official_params

__all__ = ['NFNet', 'VARIANTS', 'load_official_params', 'infer_variant', 'CheckpointError', 'count_macs',
           'nfnet_macs']
