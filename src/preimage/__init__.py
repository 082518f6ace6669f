"""preimage: invert deep generative models exactly, one layer at a time.

>>> import preimage
>>> net = preimage.random_network([20, 100, 500], seed=0)
>>> x = net.forward(z)
>>> result = preimage.invert(net, x)

Layers, each importing only from those below it (an import-linter contract in
``pyproject.toml``): ``model`` (network, activations, operators, loading) ->
``results`` (statuses, result types) -> ``solvers`` (one layer or one cell) ->
``methods`` (drivers over a network) -> ``api`` (`invert`) -> ``apps`` (CLI,
demo, experiments).
"""

from preimage.api import METHODS, invert
from preimage.methods.search import GlobalSettings
from preimage.model.activations import Activation
from preimage.model.layer import Layer
from preimage.model.network import Network, random_network
from preimage.model.operators import (
    DenseOperator,
    GaussianMatrix,
    LinearOperator,
    Mask,
    MatrixMeasurement,
)
from preimage.results import STATUSES, InversionResult, LayerReport, LayerResult
from preimage.solvers.certificate import Certificate, certify_unique
from preimage.solvers.layer import invert_layer
from preimage.solvers.noisy_layer import invert_layer_noisy

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
