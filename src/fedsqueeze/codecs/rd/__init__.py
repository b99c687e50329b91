"""Rate-distortion codecs: a law fitted to each tensor and a quantizer designed on it.

* :mod:`~fedsqueeze.codecs.rd.design`: closed-form (incomplete-gamma) Lloyd–Max design for the
  M-magnitude-weighted distortion ``E[|X|^M (X - Q(X))^2]`` on GenNorm / double-Weibull laws, the
  TinyScript knob design, and the maximum-likelihood fits:
  ``from fedsqueeze.codecs.rd.design import design``; ``design(law, shape, M, bits)``. (The function
  is deliberately not re-exported here: it would shadow the ``design`` submodule.)
* :mod:`~fedsqueeze.codecs.rd.codecs`: the codecs ``lloydmax`` (id 64), ``m22`` (65),
  ``weibull_lloyd`` (66) and ``tinyscript`` (67); importing this package registers them.
"""

from fedsqueeze.codecs.rd.codecs import (
    M22,
    LloydMax,
    TinyScript,
    WeibullLloyd,
    encode_state_dict_m22,
    global_topk_counts,
)
from fedsqueeze.codecs.rd.design import (
    KnobDesign,
    LawFit,
    QuantizerDesign,
    design_knobs,
    fit_dweibull,
    fit_gennorm,
    fit_weibull,
    partial_moment,
)

__all__ = [
    "M22",
    "KnobDesign",
    "LawFit",
    "LloydMax",
    "QuantizerDesign",
    "TinyScript",
    "WeibullLloyd",
    "design_knobs",
    "encode_state_dict_m22",
    "fit_dweibull",
    "fit_gennorm",
    "fit_weibull",
    "global_topk_counts",
    "partial_moment",
]
