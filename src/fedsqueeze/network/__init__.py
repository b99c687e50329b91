"""Network model: link profiles and pure functions of bytes -> **modelled** seconds.

Nothing here measures a network: every time is modelled from assumed link figures (see
:mod:`fedsqueeze.network.profiles` for the numbers and where they come from) and is named
``modelled_*`` wherever it is reported.

>>> from fedsqueeze.network import NetworkModel
>>> net = NetworkModel("mix:3g=0.5,4g=0.5", num_clients=10, seed=0)
>>> timing = net.round_time(0, [0, 1], down_nbytes=[10**6] * 2, up_nbytes=[10**5] * 2, compute_s=[1.0] * 2)
"""

from fedsqueeze.network.model import NetworkModel, RoundTiming
from fedsqueeze.network.profiles import PROFILES, LinkProfile, NetworkSpec, parse_network

__all__ = ["PROFILES", "LinkProfile", "NetworkModel", "NetworkSpec", "RoundTiming", "parse_network"]
