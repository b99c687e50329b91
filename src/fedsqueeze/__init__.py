"""fedsqueeze: communication-efficient federated learning that counts real bytes."""

from fedsqueeze.codecs import Codec, decode, decode_state_dict, encode_state_dict, parse_spec
from fedsqueeze.errors import ConfigError, DecodeError, EncodeError, FedSqueezeError

__version__ = "0.1.0"
__all__ = [
    "Codec",
    "ConfigError",
    "DecodeError",
    "EncodeError",
    "FedSqueezeError",
    "__version__",
    "decode",
    "decode_state_dict",
    "encode_state_dict",
    "parse_spec",
]
