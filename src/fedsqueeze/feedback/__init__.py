"""Error feedback and the per-client state it needs.

* :class:`ErrorFeedback` -- EF14 "memory" (Seide 2014, Stich 2018, Karimireddy 2019): wraps a codec,
  adds each client's residual before encoding, keeps what the payload did not carry. Use it with
  biased compressors (Top-K, threshold, low-bit).
* :class:`EF21Sender` / :class:`EF21Receiver` -- EF21 (Richtárik, Sokolov, Fatkhullin 2021): both
  ends keep a per-client estimate ``g_i`` and only ``C(x - g_i)`` travels; converges exactly with
  contractive compressors under client heterogeneity.
* :class:`ClientStateStore` -- per-client named tensors, memory accounting (``nbytes``), optional
  reduced-precision storage, safetensors-friendly ``state_dict``.

The equations, the learning-rate placement pitfall and when to use which are in
:mod:`fedsqueeze.feedback.ef`.
"""

from fedsqueeze.feedback.ef import EF21Receiver, EF21Sender, ErrorFeedback
from fedsqueeze.feedback.store import ClientStateStore

__all__ = ["ClientStateStore", "EF21Receiver", "EF21Sender", "ErrorFeedback"]
