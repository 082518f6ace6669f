"""preimage: invert deep generative models exactly, one layer at a time.

>>> import preimage
>>> net = preimage.random_network([20, 100, 500], seed=0)
>>> x = net.forward(z)
>>> result = preimage.invert(net, x)
"""

from preimage.certificate import Certificate, certify_unique
from preimage.global_search import GlobalSettings
from preimage.invert import METHODS, InversionResult, LayerReport, invert
from preimage.layer_inversion import STATUSES, LayerResult, invert_layer
from preimage.measurements import GaussianMatrix, Mask, MatrixMeasurement
from preimage.network import Activation, Layer, Network, random_network
from preimage.noisy import invert_layer_noisy
from preimage.operators import DenseOperator, LinearOperator

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "STATUSES",
    "Activation",
    "Certificate",
    "DenseOperator",
    "GaussianMatrix",
    "GlobalSettings",
    "InversionResult",
    "Layer",
    "LayerReport",
    "LayerResult",
    "LinearOperator",
    "Mask",
    "MatrixMeasurement",
    "Network",
    "certify_unique",
    "invert",
    "invert_layer",
    "invert_layer_noisy",
    "random_network",
]
