"""Simulation: local client training, the round loop, client sampling, the seed tree."""

from fedsqueeze.sim.local import ENGINES as ENGINES
from fedsqueeze.sim.local import GradHook as GradHook
from fedsqueeze.sim.local import LocalResult as LocalResult
from fedsqueeze.sim.local import LocalTrainConfig as LocalTrainConfig
from fedsqueeze.sim.local import choose_engine as choose_engine
from fedsqueeze.sim.local import client_batches as client_batches
from fedsqueeze.sim.local import train_clients as train_clients
