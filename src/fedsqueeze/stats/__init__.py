"""Statistics of model updates: law fits, kurtosis, Wasserstein-2, independence checks, teacher/student.

* :func:`fit_layer` -- per-layer ML fits of Gaussian, Laplace, generalized Gaussian (``gennorm``) and
  double Weibull laws, each with its log-likelihood and W2 distance, plus the layer's mean, std and
  excess kurtosis (:mod:`fedsqueeze.stats.fit`).
* :func:`spearman_pass_rate`, :func:`ks_pass_rate` -- the M22 slides' i.i.d. checks: the fraction of
  random Spearman / Kolmogorov-Smirnov tests that pass, within a layer or between iterations
  (:mod:`fedsqueeze.stats.independence`).
* :class:`TeacherStudent` -- a fixed random teacher MLP and an SGD-trained student; yields per-step
  per-layer gradients to study cheaply (:mod:`fedsqueeze.stats.teacher`).

Bad input raises :class:`StatsError` (a :class:`~fedsqueeze.errors.ConfigError`).
"""

from fedsqueeze.stats.fit import LAWS, LawFit, LayerFit, StatsError, fit_layer
from fedsqueeze.stats.independence import PassRate, ks_pass_rate, spearman_pass_rate
from fedsqueeze.stats.teacher import MLP, TeacherStudent

__all__ = [
    "LAWS",
    "MLP",
    "LawFit",
    "LayerFit",
    "PassRate",
    "StatsError",
    "TeacherStudent",
    "fit_layer",
    "ks_pass_rate",
    "spearman_pass_rate",
]
