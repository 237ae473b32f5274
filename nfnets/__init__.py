"""NFNets in JAX/Haiku: models, adaptive gradient clipping, training and evaluation.

The top level re-exports what a user reaches for first; everything else lives in its own module
(`nfnets.models` (the registry), `nfnets.agc`, `nfnets.optim`, `nfnets.train_step`, `nfnets.data.pipeline`, ...).
"""
from nfnets.errors import CheckpointError
from nfnets.errors import UserError
from nfnets.flops import count_macs
from nfnets.flops import model_macs
from nfnets.flops import model_param_count
from nfnets.models.nf_regnet import NFRegNet
from nfnets.models.nf_resnet import NFResNet
from nfnets.models.nfnet import NFNet
from nfnets.models.se_resnext import SEResNeXtD
from nfnets.pretrained import load_reference

__all__ = ['NFNet', 'NFResNet', 'NFRegNet', 'SEResNeXtD', 'load_reference', 'CheckpointError', 'UserError',
           'count_macs', 'model_macs', 'model_param_count']
