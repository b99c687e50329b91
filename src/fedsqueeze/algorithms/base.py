"""The algorithm interface the round loop (``fedsqueeze.experiment.run._one_round``) calls.

One round, as the loop runs it, with the hooks an algorithm overrides::

    plan  = algo.plan_round(t, local)             # local SGD config of the round (+ metrics)
    bc    = downlink.broadcast(x)                 # generic: codec, replica, catch-up bytes
    ext   = algo.broadcast_extras(t)              # {name: flat vector} sent with x (default {})
    algo.receive_broadcast_extras(t, decoded ext) # what clients decoded from those bytes
    start_c = algo.client_start(c, t, bc.decoded) # the flat model client c trains from
    hook  = algo.grad_hook(clients, starts)       # optional per-step gradient correction
    res   = algo.local_train(...) or train_clients(..., grad_hook=hook)
    msg_c = algo.client_message(c, t, start_c, delta_c, steps_c)   # ClientMessage(update, extras)
    # update -> uplink channel (EF + codec), extras -> one more payload each (same codec, no EF)
    agg   = algo.aggregate_payloads(payloads, weights)   # None (default): the lines below
    agg   = aggregator(decoded updates, algo.client_weight(c, n_c))   # or central DP
    x     = algo.server_update(x, agg, accepted=..., extras=..., t=t)
    rec  |= algo.round_metrics()

Every hook has a default that reproduces FedAvg, so an algorithm overrides only what differs.
State that must survive a checkpoint (server optimizer moments, per-client control variates in a
:class:`~fedsqueeze.sim.state.VectorStore`) goes through ``state_dict``/``load_state_dict`` with
keys unique to the algorithm.

Broadcast extras (downlink). An algorithm that sends more than the model down (SCAFFOLD's server
control variate ``c``; later LoCoDL/EF21-style shifts) returns them from :meth:`broadcast_extras`
as model-sized flat float32 vectors (``layout.numel`` each, the layout of the model). Once per
round the loop encodes each one with the ``compression.downlink`` codec as a whole vector (a
``ModelCodec``, model mode: no replica, no EF), adds the summed payload lengths to *every* sampled
client's downlink bytes, and hands the vectors decoded from those bytes to
:meth:`receive_broadcast_extras` *before* ``client_start``/``grad_hook``/``client_message``, so
client-side computations use what clients decoded while the server keeps its exact copy. Empty
dict (the default): nothing is encoded or charged.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedsqueeze.errors import ConfigError
from fedsqueeze.sim.local import GradHook, LocalResult, LocalTrainConfig
from fedsqueeze.sim.state import VectorStore

if TYPE_CHECKING:
    from fedsqueeze.channel import ParamLayout
    from fedsqueeze.experiment.config import RunConfig


@dataclass(frozen=True)
class AlgoContext:
    """What an algorithm may know about the run (no data, no model)."""

    layout: ParamLayout
    num_clients: int
    clients_per_round: int
    client_lr: float
    seed: int = 0
    state_dtype: torch.dtype = torch.float32
    offload_dir: str | None = None
    model: torch.nn.Module | None = None  # the architecture (for algorithms with their own local loop)


@dataclass
class RoundPlan:
    """The round's local-training config and the algorithm's per-round metrics."""

    local: LocalTrainConfig
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientMessage:
    """What a client uploads: ``update`` through the uplink channel (EF + codec), and named
    ``extras`` (e.g. SCAFFOLD's control-variate difference), each encoded as one more payload
    with the uplink codec (no EF) and counted in the client's uplink bytes."""

    update: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class Algorithm:
    """Base class: every hook defaults to FedAvg's behaviour (see the module docstring)."""

    name = "base"
    #: option name -> default; ``check_options`` rejects any other key
    OPTIONS: ClassVar[dict[str, Any]] = {}
    #: False: the loop does not decode client update payloads (no per-client decode cost, and no
    #: decoded update exists); :meth:`aggregate_payloads` must then return the aggregate.
    decodes_uplink: ClassVar[bool] = True

    # ------------------------------------------------------------------ options
    @classmethod
    def validate(cls, cfg: RunConfig) -> dict[str, Any]:
        """Check ``cfg.algorithm.options`` (and cross-section constraints) at config time; return
        the resolved options. Errors are ConfigErrors naming the key."""
        return cls.check_options(cfg.algorithm.options)

    @classmethod
    def from_config(cls, cfg: RunConfig, ctx: AlgoContext) -> Algorithm:
        """Build the algorithm for a run (options validated by :meth:`validate`)."""
        raise NotImplementedError

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults merged with ``options``; unknown keys are ConfigErrors naming the nearest one."""
        for key in options:
            if key not in cls.OPTIONS:
                close = difflib.get_close_matches(key, list(cls.OPTIONS), n=1, cutoff=0.5)
                hint = (
                    f"; did you mean 'algorithm.options.{close[0]}'?"
                    if close
                    else f"; valid options for {cls.name!r}: {', '.join(cls.OPTIONS) or '(none)'}"
                )
                raise ConfigError(
                    f"unknown option 'algorithm.options.{key}' for algorithm {cls.name!r}{hint}"
                )
        return {**cls.OPTIONS, **dict(options)}

    # ------------------------------------------------------------------ hooks
    def plan_round(self, t: int, local: LocalTrainConfig) -> RoundPlan:
        """The local-training config of round ``t`` (default: the configured one)."""
        return RoundPlan(local)

    def broadcast_extras(self, t: int) -> dict[str, torch.Tensor]:
        """Vectors broadcast with the model in round ``t`` (model-sized, flat; default none).

        Each is one more downlink payload charged to every sampled client (module docstring)."""
        return {}

    def receive_broadcast_extras(self, t: int, decoded: Mapping[str, torch.Tensor]) -> None:
        """The clients' decoded copies of :meth:`broadcast_extras` (same keys), before local training."""
        return None

    def client_start(self, c: int, t: int, broadcast: torch.Tensor) -> torch.Tensor:
        """The flat model client ``c`` trains from; default: what it decoded from the broadcast.

        Return the *same tensor object* for every client when they share it (the batched engine
        then trains from one shared start)."""
        return broadcast

    def grad_hook(self, clients: Sequence[int], starts: Sequence[torch.Tensor]) -> GradHook | None:
        """Optional gradient correction at every local step (``client_index`` = position in clients)."""
        return None

    def local_train(
        self,
        t: int,
        clients: Sequence[int],
        starts: Sequence[torch.Tensor],
        datasets: Sequence[tuple[torch.Tensor, torch.Tensor]],
        local: LocalTrainConfig,
        seeds: Sequence[int],
    ) -> list[LocalResult] | None:
        """Override local training entirely (None: the loop uses ``train_clients``)."""
        return None

    def client_message(
        self, c: int, t: int, start: torch.Tensor, delta: torch.Tensor, steps: int
    ) -> ClientMessage:
        """What client ``c`` uploads, given its start model, ``delta = trained - start`` and the
        number of local steps it took."""
        return ClientMessage(delta)

    def bind_participation(self, accept_prob: Sequence[float] | None) -> None:
        """Called once by the round loop before the first round: client ``c``'s probability that a
        message of it is accepted in a round (sampler inclusion × (1 − network drop probability)),
        or None when that is not a fixed probability (cyclic schedules, importance by norm, a
        deadline). For algorithms whose theory needs it (EF21-PP's step size); default: ignored."""
        return None

    def client_weight(self, c: int, num_samples: int) -> float:
        """Aggregation weight of client ``c`` (default: its sample count, as FedAvg)."""
        return float(num_samples)

    def aggregate_payloads(
        self,
        payloads: Mapping[int, bytes],
        weights: Mapping[int, float],
        *,
        denominator: float | None = None,
    ) -> torch.Tensor | None:
        """Aggregate the accepted clients' uplink payload *bytes* without the loop's aggregator.

        ``payloads[c]`` is exactly what client ``c`` sent (its bytes are counted as usual) and
        ``weights[c]`` its :meth:`client_weight`. Under ``clients.sampling = "importance"`` with the
        ``mean`` aggregator the weights include the Horvitz-Thompson factor and ``denominator`` is the
        cohort's *fixed* denominator: an algorithm that uses the weights must then return
        ``Σ_c w_c u_c / denominator`` (not ``/ Σ_c w_c``, which is biased); otherwise it is None.
        Return a tensor to use it as ``agg`` in
        :meth:`server_update` (its meaning and shape are the algorithm's: FetchSGD returns the summed
        sketch tables); return None (the default) for the aggregator on the decoded updates.
        """
        return None

    def server_update(
        self,
        x: torch.Tensor,
        agg: torch.Tensor,
        *,
        accepted: Sequence[int] = (),
        extras: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
        t: int = 0,
    ) -> torch.Tensor:
        """The new global model from the aggregated (decoded) updates; default ``x + agg``."""
        return x + agg

    def round_metrics(self) -> dict[str, Any]:
        """Extra keys for this round's metrics line (default: none)."""
        return {}

    # ------------------------------------------------------------------ state
    def stores(self) -> list[VectorStore]:
        """Per-client state stores (checkpointed through ``state_dict``)."""
        return []

    def state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for st in self.stores():
            out.update(st.state_dict())
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for st in self.stores():
            st.load_state_dict(state)


# ---------------------------------------------------------------------- option validators
def opt_float(
    options: Mapping[str, Any],
    key: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> float:
    """``options[key]`` as a finite float within the bounds, else a ConfigError naming the key."""
    v = options[key]
    name = f"algorithm.options.{key}"
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ConfigError(f"{name} must be a finite number, got {v!r}")
    v = float(v)
    bounds = []
    if gt is not None:
        bounds.append(f"> {gt}")
    if ge is not None:
        bounds.append(f">= {ge}")
    if lt is not None:
        bounds.append(f"< {lt}")
    if le is not None:
        bounds.append(f"<= {le}")
    ok = (
        (gt is None or v > gt)
        and (ge is None or v >= ge)
        and (lt is None or v < lt)
        and (le is None or v <= le)
    )
    if not ok:
        raise ConfigError(f"{name} must be {' and '.join(bounds)}, got {v!r}")
    return v


def opt_choice(options: Mapping[str, Any], key: str, choices: Sequence[str]) -> str:
    v = options[key]
    if v not in choices:
        raise ConfigError(f"algorithm.options.{key} must be one of {list(choices)}, got {v!r}")
    return str(v)
