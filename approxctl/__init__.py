"""approxctl: make pretrained CNNs work on approximate hardware.

The public API of SPEC section 2: ``convert``, ``set_mode``, ``calibrate``, ``fit_error_model``,
``save``, ``load``, ``functional`` (the bit-exact integer ops), and the targets' option
dataclasses.
"""

from approxctl import functional, luts
from approxctl.convert import (
    calibrate,
    convert,
    fit_error_model,
    get_mode,
    recalibrate_batchnorm,
    set_mode,
)
from approxctl.errors import ApproxError
from approxctl.io import load, save
from approxctl.layers import ApproxConv2d, ApproxLayer, ApproxLinear, approx_layers
from approxctl.targets import AnalogConfig, ApproxMultConfig, ScConfig

__version__ = "0.1.0"

__all__ = [
    "AnalogConfig",
    "ApproxConv2d",
    "ApproxError",
    "ApproxLayer",
    "ApproxLinear",
    "ApproxMultConfig",
    "ScConfig",
    "approx_layers",
    "calibrate",
    "convert",
    "fit_error_model",
    "functional",
    "get_mode",
    "load",
    "luts",
    "recalibrate_batchnorm",
    "save",
    "set_mode",
]
