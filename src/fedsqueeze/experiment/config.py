"""Run configuration: frozen Pydantic models, loaded from TOML (or YAML) and validated up front.

Every key is checked before any work starts: an unknown key is an error that names it and suggests
the nearest valid one; a bad value names the key, what came and what is expected. Overrides use
dotted keys (``--set clients.lr=0.05``). The resolved config is written into every run directory.

Example (``examples/mnist_cnn_dirichlet.toml``)::

    name = "mnist-cnn"
    rounds = 100
    [data]
    dataset = "mnist"
    partition = "dirichlet"
    alpha = 0.5
    num_clients = 100
    [model]
    name = "cnn"
    [clients]
    per_round = 10
    epochs = 1
    batch_size = 32
    lr = 0.05
    [compression]
    uplink = "topk:1% > uniform:4"
    uplink_ef = "ef14"
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedsqueeze.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Section):
    """Which dataset, where it lives, and how it is split over clients."""

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    partition: Literal["iid", "dirichlet", "shards", "natural"] = "iid"
    alpha: float = Field(0.5, gt=0)
    shards_per_client: int = Field(2, ge=1)
    num_clients: int = Field(10, ge=1)
    min_client_size: int = Field(1, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)


class ModelConfig(_Section):
    """Model architecture by name (``fedsqueeze.models``) and its options."""

    name: str = "mlp"
    options: dict[str, Any] = Field(default_factory=dict)


class ClientsConfig(_Section):
    """Client sampling and local training. Give ``per_round`` (a count) or ``fraction``.

    ``sampling`` picks who participates (``fedsqueeze.sim.sampling``): ``uniform`` (default),
    ``importance`` (options ``by = "size" | "norm"``, ``floor``, ``prior_norm``; unbiased
    Horvitz-Thompson reweighting) or ``cyclic`` (options ``groups``, ``whole_group``); its options go
    in ``sampling_options`` and are checked at load time.
    """

    per_round: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0, le=1)
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_steps: int | None = Field(None, ge=1)
    engine: Literal["auto", "sequential", "vmap"] = "auto"
    sampling: str = "uniform"
    sampling_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_of(self) -> ClientsConfig:
        if self.per_round is not None and self.fraction is not None:
            raise ValueError("give clients.per_round or clients.fraction, not both")
        return self


class ServerConfig(_Section):
    """Server optimizer on the aggregated update: ``x += lr * v``, ``v = momentum * v + delta``."""

    lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)


class AlgorithmConfig(_Section):
    """The algorithm (``fedsqueeze.algorithms``; options checked at load time, errors name
    ``algorithm.options.<key>``) and its aggregation rule (``fedsqueeze.algorithms.aggregators``).

    ``num_byzantine`` is how many Byzantine clients per round the aggregator is configured to
    tolerate (checked against clients per round up front).
    """

    name: Literal[
        "fedavg",
        "fedprox",
        "scaffold",
        "fedadam",
        "scaffnew",
        "fedcomloc",
        "ef21",
        "fetchsgd",
        "locodl",
    ] = "fedavg"
    options: dict[str, Any] = Field(default_factory=dict)
    aggregator: str = "mean"
    aggregator_options: dict[str, Any] = Field(default_factory=dict)
    num_byzantine: int = Field(0, ge=0)


class AttackConfig(_Section):
    """A simulated Byzantine attack by a seeded ``fraction`` of all clients (``none`` = honest run)."""

    name: str = "none"
    fraction: float = Field(0.0, ge=0, lt=1)
    options: dict[str, Any] = Field(default_factory=dict)


class PrivacyConfig(_Section):
    """Differential privacy: per-client clipping to ``clip_norm`` and Gaussian noise.

    ``central``: the server clips each decoded update, sums, adds N(0, σ²C²) once, divides by the
    cohort size. ``local``: each client clips and adds N(0, σ²C²) before error feedback and encoding
    (compression after noise is post-processing). ε is reported with Opacus's RDP accountant.
    """

    mode: Literal["none", "central", "local"] = "none"
    clip_norm: float = Field(1.0, gt=0)
    noise_multiplier: float = Field(1.0, ge=0)
    delta: float = Field(1e-5, gt=0, lt=1)


class CompressionConfig(_Section):
    """Codec specs (see ``fedsqueeze codecs``) per direction, and error feedback.

    ``uplink`` compresses each client's model difference; ``downlink`` compresses what the server
    broadcasts: the change of the global model since the clients' replica (``downlink_mode="delta"``)
    or the whole model (``"model"``).
    """

    uplink: str = "fp32"
    downlink: str = "fp32"
    uplink_ef: Literal["none", "ef14", "ef21"] = "none"
    downlink_ef: Literal["none", "ef14"] = "none"
    downlink_mode: Literal["delta", "model"] = "delta"
    state_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    state_offload: bool = False
    #: uplink frames: one per parameter tensor ("tensor") or one for the whole flat update ("model":
    #: global top-k, one CountSketch of the whole model as FetchSGD needs); see channel.ModelCodec
    uplink_scope: Literal["tensor", "model"] = "tensor"

    @field_validator("uplink", "downlink")
    @classmethod
    def _spec_parses(cls, v: str) -> str:
        from fedsqueeze.codecs import parse_spec

        parse_spec(v)  # raises ConfigError with a precise message
        return v


class NetworkConfig(_Section):
    """Network model (``fedsqueeze.network``): a profile, a mix, or custom bandwidth/latency."""

    profile: str = "4g"
    compute: Literal["measured", "modelled"] = "modelled"
    compute_s_per_step: float = Field(0.01, ge=0)
    deadline_s: float | None = Field(None, gt=0)


class EvalConfig(_Section):
    every: int = Field(1, ge=1)
    batch_size: int = Field(1000, ge=1)


class CheckpointConfig(_Section):
    every: int = Field(0, ge=0)


class RunConfig(_Section):
    """One federated run. ``seed`` drives everything (partition, sampling, training, codecs)."""

    name: str = "run"
    seed: int = 0
    rounds: int = Field(20, ge=1)
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    clients: ClientsConfig = ClientsConfig()
    server: ServerConfig = ServerConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    compression: CompressionConfig = CompressionConfig()
    attack: AttackConfig = AttackConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    network: NetworkConfig = NetworkConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()

    def clients_per_round(self) -> int:
        n = self.data.num_clients
        if self.clients.per_round is not None:
            k = self.clients.per_round
        elif self.clients.fraction is not None:
            k = max(1, round(self.clients.fraction * n))
        else:
            k = n
        if k > n:
            raise ConfigError(
                f"clients.per_round = {k} but data.num_clients = {n}: cannot sample more clients per "
                "round than exist; lower clients.per_round or raise data.num_clients"
            )
        return k

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------- loading
def _known_keys(model: type[BaseModel], prefix: str = "") -> dict[str, type[BaseModel] | None]:
    out: dict[str, type[BaseModel] | None] = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        out[prefix + name] = sub
        if sub is not None:
            out.update(_known_keys(sub, prefix + name + "."))
    return out


def _check_keys(raw: Mapping[str, Any], model: type[BaseModel], prefix: str = "") -> None:
    fields = model.model_fields
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            where = f"[{prefix.rstrip('.')}]" if prefix else "the top level"
            hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
            raise ConfigError(f"unknown config key {prefix + key!r} in {where}{hint}")
        ann = fields[key].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {prefix + key!r} must be a table, got {value!r}")
            _check_keys(value, ann, prefix + key + ".")


def _parse_value(text: str) -> Any:
    """Parse an override value as TOML (numbers, booleans, strings, arrays); else keep the text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Apply ``key=value`` (dotted keys) overrides to a raw config dict (a new dict is returned)."""
    out = json.loads(json.dumps(raw))
    items = overrides.items() if isinstance(overrides, Mapping) else [_split_override(o) for o in overrides]
    known = _known_keys(RunConfig)
    for key, value in items:
        parts = key.split(".")
        # free-form tables (data.options, clients.sampling_options, ...) accept any sub-key here
        free = len(parts) > 2 and parts[1].endswith("options")
        top = ".".join(parts[:2]) if free else key
        if top not in known and not free:
            close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"--set: unknown config key {key!r}{hint}")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set: {key!r} goes through a non-table value")
        node[parts[-1]] = value
    return out


def _split_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. clients.lr=0.05), got {text!r}")
    return key.strip(), _parse_value(value.strip())


def config_from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a raw dict into a :class:`RunConfig` (errors name the key and suggest fixes)."""
    _check_keys(raw, RunConfig)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            got = err.get("input")
            msgs.append(f"{loc or '<config>'}: {err['msg']} (got {got!r})")
        raise ConfigError("invalid config: " + "; ".join(msgs)) from None
    except ConfigError:
        raise
    _check_cross_fields(cfg)
    return cfg


def _check_cross_fields(cfg: RunConfig) -> None:
    """Checks that need several sections (all raise ConfigError before any work starts)."""
    from fedsqueeze.algorithms.aggregators import make_aggregator
    from fedsqueeze.algorithms.attacks import make_attack
    from fedsqueeze.algorithms.registry import validate_algorithm
    from fedsqueeze.sim.sampling import validate_sampling

    per_round = cfg.clients_per_round()
    a = cfg.algorithm
    agg = make_aggregator(a.aggregator, **a.aggregator_options)
    agg.require(per_round, a.num_byzantine)
    validate_algorithm(cfg)
    validate_sampling(cfg)
    if cfg.attack.name != "none":
        make_attack(cfg.attack.name, cfg.attack.fraction, **cfg.attack.options)
    if cfg.privacy.mode == "central" and a.aggregator != "mean":
        raise ConfigError(
            f"privacy.mode = 'central' replaces the aggregator with the clipped noisy mean; "
            f"it cannot be combined with algorithm.aggregator = {a.aggregator!r}"
        )


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file into a raw dict."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError("YAML configs need PyYAML (pip install pyyaml); or use TOML") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: invalid YAML ({exc})") from None
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: invalid TOML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a table of settings at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Load and validate a config file (or the built-in defaults when ``path`` is None)."""
    raw = read_config_file(path) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides))
