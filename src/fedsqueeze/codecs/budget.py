"""Bit-budget policy ``budget``: pick Top-K sparsity ``k`` and bit width ``b`` so the payload fits.

Given a budget in bytes per tensor -- ``budget:bytes=N``, or ``budget:bits=R`` meaning
``floor(R * d / 8)`` bytes for a ``d``-entry tensor (M22's "0.6 d bits" is ``budget:bits=0.6``) --
the encoder tries these candidates and keeps, among those whose **actual payload** (frame header,
positions, scales, values: ``len(payload)``) fits, the one with the smallest measured
reconstruction error ``||x - decode(payload)||^2`` (ties: fewer bytes, then larger ``k``):

* ``fp32`` (lossless for float32 input) when ``4 d`` bytes plus the header fit;
* dense ``uniform:b`` for every ``b`` in ``1 .. max_bits``;
* ``topk:k=K > uniform:b`` for every ``b`` in ``1 .. max_bits``, with the largest ``K < d`` that
  fits (binary search on the exact payload size, to within 0.4% of the largest; the index
  section is Top-K's own, Rice or bitmap, whichever is smaller).

With ``budget:... > ans`` (or ``ans=True``) every candidate is also entropy-coded by the ``ans``
stage and the smaller of the plain and coded payloads counts, so the budget buys more ``k`` or
``b`` at the same bytes. Quantization is deterministic (round to nearest, biased, as Top-K is):
pair the policy with error feedback.

**Wire format: none of its own.** ``budget`` is an encoder-side policy. Its payload is simply the
chosen codec's payload (a ``fp32``, ``uniform``, ``topk`` or ``ans`` frame), which is
self-describing, so any receiver decodes it without knowing a budget was involved, and
``parse_spec(choice.spec).encode(x)`` reproduces it byte for byte. The id 97 is registered only
so that the spec grammar and the codec listing know the name; it never appears in a payload, and
a frame that claims it is a :class:`~fedsqueeze.errors.DecodeError`.

**Never over budget.** ``len(payload) <= budget`` always; when even the smallest candidate
(``fp32`` of a tiny tensor, dense 1-bit, or one kept entry at 1 bit) does not fit, encoding raises
:class:`~fedsqueeze.errors.EncodeError` naming the minimum. Small tensors (biases) have minimums of
~40-60 bytes, far above ``0.6 d`` bits; a whole model update therefore shares one budget
across its tensors: :meth:`Budget.encode_update` (what :func:`~fedsqueeze.codecs.encode_state_dict`
and every channel call) runs :func:`encode_state_dict_within_budget` on the whole container.

``budget:... > zstd`` is refused: the budget could not count zstd's bytes (use ``> ans``).

**Template mode: a fixed method, sized to the budget.** ``budget:... > TEMPLATE`` keeps the method
the template names and binary-searches its one size knob for the largest payload that fits, the
payload being measured the same way (``len``). Templates (the knob is never written in them):

* a value codec ``V`` (or ``topk > V``): Top-K with the largest ``k`` such that
  ``topk:k=K > V`` fits, e.g. ``budget:bits=0.6 > weibull_lloyd:2``, ``> tinyscript:3``,
  ``> uniform:2``, ``> fp8``, ``> fp4`` (``V = fp32`` for plain Top-K);
* ``m22:bits=B,M=...`` (M22, the inline Top-K + GenNorm Lloyd–Max codec): the largest ``k``;
* ``countsketch:rows=R,k=...`` (``k`` best as a fraction of the tensor, e.g. ``k=1%``): the largest
  number of columns ``cols``.

On a whole model update (:meth:`Budget.encode_update`, which
:func:`~fedsqueeze.codecs.encode_state_dict` and therefore every channel uses) **one** budget covers
the whole container -- ``floor(bits * D / 8)`` bytes for ``D`` floating-point entries, or
``bytes`` -- and the knob is global: Top-K/M22 keep the ``K`` largest ``|x|`` of the whole model
(M22's global selection, :func:`~fedsqueeze.codecs.rd.global_topk_counts`; ``topk`` keeps at least
one entry per tensor), and CountSketch gives each tensor ``cols_i = max(1, C * d_i // D)`` columns.
The search runs on exact *predicted* sizes: each tensor's frame is encoded once per candidate knob
with zeros in place of its values (so no law fitting or codebook design runs during the search), and
the index section of the zeros' positions is swapped for that of the real Top-K positions
(:func:`index_section_nbytes`). For every fixed-rate value codec (all of the above) the prediction
is the real size byte for byte (tested), so the search lands on the largest fitting knob; the real
payload is then built and measured, and if it is larger than predicted (a data-dependent value coder
such as ``qsgd:coding=elias``) the knob is bisected on real payloads. The payload is the template's
own frames (in a container for an update): ``parse_spec(spec).encode(t)`` with
:attr:`TemplateFit.specs` reproduces each one. Stochastic value coders (``tinyscript``) draw from
``rng`` exactly as that one encode would. Cost: two stable sorts of ``|x|``, ~20-40 size probes
(cached per tensor and knob), one real encode. Measured on cifar_cnn's 93,322-entry update on two
busy cores: 0.2-0.4 s per update (M22, Lloyd–Max, TinyScript, fp8/fp4), 0.05 s (CountSketch).

**Entropy-coded templates** (M22's last step: sparsify to meet ``R``, then code losslessly):
``budget:bits=0.6 > m22:bits=3,M=2 > ans``, ``> weibull_lloyd:2 > ans``, ``> uniform:3 > ans``,
``> tinyscript:4 > ans`` (any template whose values have quantization symbols; ``fp8``, ``fp4``,
``fp32`` and ``countsketch`` have none and are refused at spec time). Each frame sent is the
template's frame coded by the ``ans`` stage (:mod:`fedsqueeze.codecs.entropy`), and the knob ``K``
is searched against the **real coded size of the whole container**: ANS sizes depend on the data
(the law fit and codebook change with ``K``), so the search predicts, then verifies. The plain size
``P(K)`` is predicted exactly as above; the bytes the coder saves, ``e(K) = P(K) - A(K)``, are
modelled as linear in ``K`` through real coded payloads (first measured at ``K = 0``, then at each
prediction); a few predict-build rounds bracket the answer and a bisection on real payloads pins it
to one entry: the result fits, and ``K + 1`` was built and does not. Guarantees are those of the
plain templates: ``len(payload) <= budget`` (the final payload is measured), deterministic (every
build starts from a clone of ``rng``; the caller's generator advances as for the one encode at
``K``), self-describing (``ans`` frames, decoded by :func:`~fedsqueeze.codecs.decode_state_dict`
alone, to exactly what the plain template sends at the same ``K``; :attr:`TemplateFit.specs` end in
``> ans`` and reproduce each frame), and an :class:`~fedsqueeze.errors.EncodeError` naming the
smallest coded payload (``K = 0``/one entry per tensor) when the budget is below it.
``Budget(template=T, ans=True)`` is the same as the template ``T > ans``. Cost: 5-11 real encodes
instead of one; measured on a round-1 cifar_cnn update (93,322 entries, two busy cores): 0.15-0.22 s
per update at 0.6 bits per entry (plain templates: 0.05-0.07 s), 0.23-0.43 s at 1.8. The coder buys
1.11-1.20x more kept entries at 0.6 bits per entry (M22 M=2 3 bits: 6,013 -> 6,698; Weibull
Lloyd–Max 2 bits: 6,679 -> 7,800; uniform 3 bits: 5,734 -> 6,877), and lowers the update's relative
error (0.327 -> 0.303, 0.333 -> 0.303, 0.356 -> 0.318). **Caveat:** the search maximizes ``K``, not
accuracy. Where the codes become very skewed as ``K`` grows (min-max ``uniform``, ``M > 0``), the
largest ``K`` can cost more error than it saves: at 1.8 bits per entry ``uniform:3 > ans`` keeps
46,307 entries (plain 26,099) at relative error 0.190 (plain 0.128), ``m22:bits=3,M=2 > ans`` 0.141
(plain 0.107), while the 4-bit widths gain (``uniform:4`` 0.080 -> 0.051, ``m22:bits=4,M=2`` 0.072
-> 0.048); on a Student-t update a ``uniform > ans`` template can keep every entry. Choose the bit
width with the coder on (the lowest-error width can move up by one), or use the built-in search
(``budget:bits=R > ans``), which picks the candidate of least measured error. Effect on training
at equal bytes (Fashion-MNIST, cifar_cnn, 0.6 bits per entry, 4 seeds): +0.09 to +0.24 accuracy
points over the plain templates (``docs/results/fmnist_budget_sweep.md``, "Entropy-coded budgets").

Cost of the built-in search: one stable sort of ``|x|`` (or of the top ``8 * budget`` entries),
about 5-8 exact size evaluations per bit width (index-section sizes are shared across widths; with
``ans`` each also quantizes and ANS-codes the kept values), and one encode + decode per fitting
candidate to measure its error. Measured on 10^6 N(0, 1) entries on two busy cores: ~0.8 s at
0.6 bits per entry, ~1.3 s at 2 bits, ~2.5-5 s with ``ans``. Use ``max_bits`` to cut the search.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from fedsqueeze.codecs import select
from fedsqueeze.codecs.base import FLOAT_DTYPES, Codec, decode
from fedsqueeze.codecs.entropy import Ans, _encode_symbols, entropy_code
from fedsqueeze.codecs.identity import Fp32, Raw
from fedsqueeze.codecs.registry import register
from fedsqueeze.codecs.sparse import TopK, _rice_cost_bits, _values_frame, encode_indices
from fedsqueeze.codecs.spec import SpecArgs, parse_number
from fedsqueeze.codecs.uniform import Uniform
from fedsqueeze.errors import ConfigError, DecodeError, EncodeError
from fedsqueeze.wire.bits import packed_nbytes
from fedsqueeze.wire.container import encode_container
from fedsqueeze.wire.frame import FrameHeader, build_frame, header_size, inspect

#: The smallest payload of any tensor: a scalar's frame header.
MIN_BUDGET_NBYTES = header_size(0)
_REL_TOL = 1.0 / 256  # binary search stops within this fraction of the largest fitting k


def _last_fit(lo: int, hi: int, fits: Callable[[int], bool]) -> int:
    """Bisection: the largest ``k`` in ``[lo, hi)`` with ``fits(k)``, given ``fits(lo)`` and not
    ``fits(hi)`` (sizes grow with ``k``)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class BudgetChoice:
    """The candidate a :class:`Budget` picked for one tensor."""

    #: spec of the codec that wrote ``payload`` (``parse_spec(spec).encode(x)`` reproduces it)
    spec: str
    #: kept entries (``numel`` for dense candidates)
    k: int
    #: bits per kept value (32 for ``fp32``)
    bits: int
    #: ``len(payload)``, everything included
    nbytes: int
    #: the budget it had to fit
    budget_nbytes: int
    #: ``||x - decode(payload)||^2`` in float64
    sq_error: float
    #: how many fitting candidates were compared
    ncandidates: int
    payload: bytes


@register
class Budget(Codec):
    """Choose Top-K ``k`` and bit width ``b`` so that the actual payload fits a byte budget; with a
    template (``budget:bits=0.6 > m22:bits=3,M=2``), size that method's one knob instead.

    A tensor gets :meth:`budget_nbytes`, a whole update (:meth:`encode_update`) one shared
    :meth:`update_budget_nbytes`. ``bits`` or ``bytes`` first; ``max_bits`` caps the built-in search.
    """

    codec_id = 97  # reserved: never written to a payload (see the module docstring)
    name = "budget"
    stage = "sparsifier"
    #: ``parse_spec`` hands this stage everything after it as a template (module docstring)
    takes_template = True

    def __init__(
        self,
        *,
        bits_per_entry: float | None = None,
        nbytes: int | None = None,
        max_bits: int = 8,
        ans: bool = False,
        template: str | None = None,
    ) -> None:
        if (bits_per_entry is None) == (nbytes is None):
            raise ConfigError(
                "budget: give exactly one of bits_per_entry (e.g. 'budget:bits=0.6', 0.6 bits per "
                "entry) or nbytes (e.g. 'budget:bytes=4096', bytes per tensor)"
            )
        if bits_per_entry is not None and not (math.isfinite(bits_per_entry) and bits_per_entry > 0):
            raise ConfigError(f"budget: bits per entry must be a finite number > 0, got {bits_per_entry}")
        if nbytes is not None and (isinstance(nbytes, bool) or not isinstance(nbytes, int)):
            raise ConfigError(f"budget: bytes must be an integer, got {nbytes!r}")
        if nbytes is not None and nbytes < MIN_BUDGET_NBYTES:
            raise ConfigError(
                f"budget: {nbytes} bytes cannot hold even a frame header; the minimum is "
                f"{MIN_BUDGET_NBYTES} bytes (a scalar), ~40-60 bytes for a small vector"
            )
        if isinstance(max_bits, bool) or not isinstance(max_bits, int) or not 1 <= max_bits <= 16:
            raise ConfigError(f"budget: max_bits must be an integer in 1..16, got {max_bits!r}")
        self.bits_per_entry = None if bits_per_entry is None else float(bits_per_entry)
        self.nbytes = nbytes
        self.max_bits = max_bits
        self.template = None if template is None else _Template.parse(template)
        if self.template is not None and ans and not self.template.ans:
            # Budget(template=T, ans=True) is the template "T > ans" (module docstring, template mode)
            self.template = _Template.parse(f"{self.template.text} > ans")
        #: the built-in search entropy-codes its candidates (a template carries its own ``ans``)
        self.ans = bool(ans) and self.template is None
        if self.template is not None and max_bits != 8:
            raise ConfigError(
                f"budget: max_bits caps the built-in search; the template {self.template.text!r} "
                "fixes its own bit width"
            )

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.template is not None and self.template.stochastic

    @classmethod
    def from_spec(
        cls, args: SpecArgs, values: Codec | None = None, template: str | None = None, **_: Any
    ) -> Codec:
        bits_raw = args.optional("bits")
        bytes_raw = args.optional("bytes")
        max_bits = args.int("max_bits", 8, lo=1, hi=16)
        args.finish()
        if values is not None:  # only reachable by calling from_spec directly
            template = values.spec
        ans = False
        if template is not None and template.strip().lower() == "ans":
            template, ans = None, True
        bits = None if bits_raw is None else parse_number(bits_raw, "budget: bits")
        nbytes = None
        if bytes_raw is not None:
            try:
                nbytes = int(bytes_raw)
            except ValueError:
                raise ConfigError(f"budget: bytes={bytes_raw!r} is not an integer") from None
        return cls(bits_per_entry=bits, nbytes=nbytes, max_bits=max_bits, ans=ans, template=template)

    def with_ans(self) -> Budget:
        """The same budget with every candidate also entropy-coded by ``ans`` (with a template: the
        template followed by ``> ans``)."""
        if self.template is not None:
            if self.template.ans:
                raise ConfigError(f"budget: the template {self.template.text!r} is already entropy-coded")
            return Budget(
                bits_per_entry=self.bits_per_entry, nbytes=self.nbytes, template=f"{self.template.text} > ans"
            )
        return Budget(
            bits_per_entry=self.bits_per_entry, nbytes=self.nbytes, max_bits=self.max_bits, ans=True
        )

    @property
    def spec(self) -> str:
        s = f"budget:bits={self.bits_per_entry!r}" if self.nbytes is None else f"budget:bytes={self.nbytes}"
        if self.max_bits != 8:
            s += f",max_bits={self.max_bits}"
        if self.template is not None:
            s += f" > {self.template.text}"
        return s + (" > ans" if self.ans else "")

    def budget_nbytes(self, numel: int) -> int:
        """Bytes allowed for a tensor of ``numel`` entries: ``nbytes``, or ``floor(bits * numel / 8)``."""
        if self.nbytes is not None:
            return self.nbytes
        assert self.bits_per_entry is not None
        return math.floor(self.bits_per_entry * numel / 8)

    # ------------------------------------------------------------------ encoding
    def encode(self, x: torch.Tensor, *, rng: torch.Generator | None = None) -> bytes:
        """The chosen candidate's payload (see :meth:`choose`), or with a template the sized
        template's frame (:meth:`fit`); ``rng`` feeds a stochastic template only."""
        if self.template is not None:
            return self.fit(x, rng=rng).payload
        return self.choose(x).payload

    def choose(self, x: torch.Tensor) -> BudgetChoice:
        """Try the candidates (module docstring) and return the best one that fits."""
        if self.template is not None:
            raise ConfigError(f"budget: {self.spec!r} sizes a template; use fit() instead of choose()")
        t = self._check_input(x)
        budget = self.budget_nbytes(t.numel())
        return _Search(t, self.max_bits, self.ans).best(budget)

    def min_nbytes(self, x: torch.Tensor) -> int:
        """Smallest payload this policy can produce for ``x`` (its budget must be at least this)."""
        if self.template is not None:
            return _TemplateSearch(self.template, {"": self._check_input(x)}, None).min_nbytes()
        return _Search(self._check_input(x), self.max_bits, self.ans).min_nbytes()

    def fit(self, x: torch.Tensor, *, rng: torch.Generator | None = None) -> TemplateFit:
        """Size the template to ``x``'s budget (module docstring); one frame, no container."""
        if self.template is None:
            raise ConfigError(f"budget: {self.spec!r} has no template; use choose()")
        t = self._check_input(x)
        return _TemplateSearch(self.template, {"": t}, None).fit(self.budget_nbytes(t.numel()), rng)

    # ------------------------------------------------------------------ whole updates
    def update_budget_nbytes(self, state: Mapping[str, torch.Tensor]) -> int:
        """Bytes allowed for a whole update: ``nbytes``, or ``floor(bits * D / 8)`` with ``D`` the
        entries of its floating-point tensors."""
        if self.nbytes is not None:
            return self.nbytes
        d = sum(t.numel() for t in state.values() if t.dtype in FLOAT_DTYPES)
        return self.budget_nbytes(d)

    def fit_update(
        self, state: Mapping[str, torch.Tensor], *, rng: torch.Generator | None = None
    ) -> TemplateFit:
        """Size the template to a whole update: one container within :meth:`update_budget_nbytes`."""
        if self.template is None:
            raise ConfigError(f"budget: {self.spec!r} has no template; use encode_update()")
        floats = {n: self._check_input(t) for n, t in state.items() if t.dtype in FLOAT_DTYPES}
        return _TemplateSearch(self.template, floats, state).fit(self.update_budget_nbytes(state), rng)

    def encode_update(
        self, state: Mapping[str, torch.Tensor], *, rng: torch.Generator | None = None
    ) -> bytes:
        """One container for the whole update, ``len <= update_budget_nbytes(state)``: the sized
        template (:meth:`fit_update`), or without one :func:`encode_state_dict_within_budget`."""
        if self.template is not None:
            return self.fit_update(state, rng=rng).payload
        if self.nbytes is not None:
            out = encode_state_dict_within_budget(
                state, nbytes=self.nbytes, max_bits=self.max_bits, ans=self.ans
            )
        else:
            out = encode_state_dict_within_budget(
                state, bits_per_entry=self.bits_per_entry, max_bits=self.max_bits, ans=self.ans
            )
        return out.payload

    def _encode_body(self, flat: torch.Tensor, rng: torch.Generator | None) -> bytes:
        raise NotImplementedError  # encode() is overridden: the payload is the chosen codec's

    @classmethod
    def _decode_body(cls, body: memoryview, header: FrameHeader) -> torch.Tensor:
        raise DecodeError(
            "budget: codec id 97 is reserved and never written (a budget payload carries the id of "
            "the codec it chose); this frame was not produced by fedsqueeze"
        )


def index_section_nbytes(idx: npt.NDArray[np.int64], d: int) -> int:
    """``len(sparse.encode_indices(idx, d))`` without writing the section (same choices: the Rice
    parameter among the five near the optimum, and bitmap when it is smaller)."""
    k = idx.size
    if k == 0:
        return 6
    gm1 = np.diff(idx, prepend=-1) - 1
    mean = float(gm1.mean())
    b0 = int(np.floor(np.log2(mean * 0.69 + 1.0))) if mean > 0 else 0
    cands = [b for b in range(b0 - 2, b0 + 3) if 0 <= b <= 40]
    best = min(cands, key=lambda b: _rice_cost_bits(gm1, b))
    unary_nbytes = (int((gm1 >> best).sum()) + k + 7) // 8
    low_nbytes = packed_nbytes(k, best) if best else 0
    bitmap_nbytes = packed_nbytes(d, 1)
    if bitmap_nbytes < 1 + low_nbytes + 4 + unary_nbytes:
        return 1 + bitmap_nbytes
    return 2 + low_nbytes + 4 + unary_nbytes


class _Search:
    """Candidate payloads for one tensor.

    Sizes during the search are exact but computed from parts: the Top-K index section (memoised
    per ``k``, shared by every ``b``) plus the analytic size of the values frame, or, with ``ans``,
    plus the real ANS symbol section. Every payload that is returned is then built for real and
    measured.
    """

    def __init__(self, t: torch.Tensor, max_bits: int, ans: bool) -> None:
        self.t = t
        self.shape = tuple(t.shape)
        self.flat = t.detach().reshape(-1).to(device="cpu", dtype=torch.float32).contiguous()
        self.d = self.flat.numel()
        self.hsize = header_size(len(self.shape))
        self.max_bits = max_bits
        self.ans = ans
        self._order: npt.NDArray[np.int64] | None = None  # top-kmax positions by decreasing |x|
        self._cand: npt.NDArray[np.int64] | None = None  # the same, ascending
        self._rank: npt.NDArray[np.int64] | None = None  # their rank by decreasing |x|
        self._index: dict[int, int] = {}
        self._last: tuple[int, npt.NDArray[np.int64]] | None = None
        self._xd: torch.Tensor | None = None

    # -------------------------------------------------------------- Top-K positions
    def _prepare(self, kmax: int) -> None:
        """Rank the ``kmax`` largest ``|x|`` (ties to the lower index, as ``topk`` does)."""
        if self._order is not None and self._order.size >= kmax:
            return
        if 4 * kmax >= self.d:
            order = torch.sort(-self.flat.abs(), stable=True).indices[:kmax].numpy()
        else:
            top = select.topk_indices(self.flat, kmax)  # ascending positions
            order = top[torch.sort(-self.flat[top].abs(), stable=True).indices].numpy()
        self._order = order.astype(np.int64)
        pos = np.argsort(self._order, kind="stable")
        self._cand = self._order[pos]
        self._rank = pos.astype(np.int64)

    def positions(self, k: int) -> npt.NDArray[np.int64]:
        """``topk_indices(x, k)`` for any ``k <= kmax``, from the prepared ranking (last one cached)."""
        assert self._order is not None and self._cand is not None and self._rank is not None
        if self._last is None or self._last[0] != k:
            idx = np.sort(self._order[:k]) if 4 * k < self._order.size else self._cand[self._rank < k]
            self._last = (k, idx)
        return self._last[1]

    def index_nbytes(self, k: int) -> int:
        if k not in self._index:
            self._index[k] = index_section_nbytes(self.positions(k), self.d)
        return self._index[k]

    # -------------------------------------------------------------- payloads
    def _wrap(self, payload: bytes) -> bytes:
        if not self.ans:
            return payload
        coded = entropy_code(payload)
        return coded if len(coded) < len(payload) else payload

    def fp32(self) -> bytes:
        return Fp32().encode(self.t)

    def dense(self, bits: int) -> bytes:
        return self._wrap(Uniform(bits).encode(self.t))

    def dense_nbytes(self, bits: int) -> int:
        return self.hsize + 6 + (8 if self.d else 0) + packed_nbytes(self.d, bits)

    def sparse(self, k: int, bits: int) -> bytes:
        """Exactly ``TopK(k=k, values=Uniform(bits)).encode(x)`` (then ``ans`` if asked)."""
        idx = self.positions(k)
        vals = self.flat[torch.from_numpy(idx)]
        body = b"".join(
            (struct.pack("<I", k), encode_indices(idx, self.d), _values_frame(vals, Uniform(bits), None))
        )
        return self._wrap(build_frame(TopK.codec_id, self.t.dtype, self.shape, body))

    def sparse_nbytes(self, k: int, bits: int) -> int:
        """``len(self.sparse(k, bits))`` without building the payload (1 <= k)."""
        ixn = self.index_nbytes(k)
        plain = self.hsize + 4 + ixn + 4 + header_size(1) + 6 + 8 + packed_nbytes(k, bits)
        if not self.ans:
            return plain
        vals = self.flat[torch.from_numpy(self.positions(k))]
        parts = Uniform(bits)._encode_body(vals, None)
        symbols = _encode_symbols(memoryview(parts[2]), bits, k)
        return min(plain, self.hsize + 2 + 4 + ixn + 2 + 6 + 8 + len(symbols))

    # -------------------------------------------------------------- search
    def _largest_k(self, bits: int, budget: int, kmax: int, guess: int) -> int | None:
        """Largest ``k`` in ``1 .. kmax`` (to within ``_REL_TOL``) whose payload fits, assuming the
        size grows with ``k``; None if ``k = 1`` does not fit. ``guess`` seeds the bracket."""
        if self.sparse_nbytes(1, bits) > budget:
            return None

        def fits(k: int) -> bool:
            return self.sparse_nbytes(k, bits) <= budget

        g = min(max(guess, 1), kmax)
        lo, hi = 1, kmax + 1  # lo fits, hi does not (kmax + 1 is virtual)
        a, b = max(1, int(g * 0.97)), min(kmax, int(g * 1.03) + 1)
        if fits(a):
            lo = a
            if fits(b):
                lo = b
                step = max(1, b // 8)
                while lo < kmax:  # gallop up
                    nxt = min(kmax, lo + step)
                    if not fits(nxt):
                        hi = nxt
                        break
                    lo, step = nxt, 2 * step
            else:
                hi = b
        else:
            hi = a
        while hi - lo > max(1, int(lo * _REL_TOL)):
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo

    def _guess(self, budget: int, bits: int, prev: tuple[int, float] | None) -> int:
        """Entries that fit at ``bits`` bits each, from the last search's cost per entry or, for the
        first, from Rice's ``log2(d/k) + 1.5`` bits per position."""
        room = 8.0 * max(budget - self.hsize - 50, 1)
        if prev is not None:
            return max(1, int(room / (prev[1] + 1.0)))
        est = room / (bits + 4.0)
        for _ in range(4):
            est = room / (bits + max(1.0, float(np.log2(self.d / max(est, 1.0))) + 1.5))
        return max(1, int(est))

    def _scored(self, spec: str, k: int, bits: int, payload: bytes) -> _Candidate:
        if self._xd is None:
            self._xd = self.flat.double()
        err = float(((decode(payload).reshape(-1).double() - self._xd) ** 2).sum())
        return _Candidate(err, len(payload), spec, k, bits, payload)

    def candidates(self, budget: int) -> list[_Candidate]:
        """Every candidate that fits, with its measured error.

        Dense widths stop at the first that does not fit. Top-K widths stop at the first where one
        kept entry does not fit, or once the error has grown at two successive widths (it is
        U-shaped in ``b``: more bits per value buy fewer entries).
        """
        d, out = self.d, []
        if self.hsize + 4 * d <= budget:
            out.append(self._scored("fp32", d, 32, self.fp32()))
        for b in range(1, self.max_bits + 1):
            if not self.ans and self.dense_nbytes(b) > budget:
                break
            p = self.dense(b)
            if len(p) > budget:
                break  # more bits never shrink the payload
            out.append(self._scored(_spec(f"uniform:{b}", p), d, b, p))
        if d < 2:
            return out
        # Values cost >= 1 bit each unless entropy-coded; positions >= 1 bit each unless a bitmap.
        bitmap_fits = self.hsize + 50 + packed_nbytes(d, 1) <= budget
        kmax = d - 1 if (self.ans and bitmap_fits) else min(d - 1, 8 * budget)
        if kmax < 1:
            return out
        self._prepare(kmax)
        prev: tuple[int, float] | None = None
        errors: list[float] = []
        for b in range(1, self.max_bits + 1):
            k = self._largest_k(b, budget, kmax, self._guess(budget, b, prev))
            if k is None:
                break  # one entry at b bits does not fit, so none at more bits does either
            p = self.sparse(k, b)
            while len(p) > budget and k > 1:  # sizes are exact, so this is only a safety net
                k = max(1, k - max(1, k // 64))
                p = self.sparse(k, b)
            if len(p) > budget:
                break
            cand = self._scored(_spec(f"topk:k={k} > uniform:{b}", p), k, b, p)
            out.append(cand)
            errors.append(cand.sq_error)
            if len(errors) >= 3 and errors[-1] > errors[-2] > errors[-3]:
                break
            prev = (k, 8.0 * max(len(p) - self.hsize - 50, 1) / k)
            if not self.ans:
                kmax = k  # more bits per value never fit more entries
        return out

    def min_nbytes(self) -> int:
        sizes = [len(self.fp32()), len(self.dense(1))]
        if self.d >= 2:
            self._prepare(1)
            sizes.append(len(self.sparse(1, 1)))
        return min(sizes)

    def best(self, budget: int) -> BudgetChoice:
        cands = self.candidates(budget)
        if not cands:
            raise EncodeError(
                f"budget: {budget} bytes cannot hold any payload for a tensor of shape "
                f"{list(self.shape)} ({self.d} entries); the smallest possible is {self.min_nbytes()} "
                "bytes (fp32, dense 1-bit, or one kept entry at 1 bit, frame header included). "
                "Raise the budget, or share one budget across a model's tensors with "
                "encode_state_dict_within_budget"
            )
        c = min(cands, key=lambda c: (c.sq_error, c.nbytes, -c.k))
        return BudgetChoice(c.spec, c.k, c.bits, c.nbytes, budget, c.sq_error, len(cands), c.payload)


@dataclass(frozen=True)
class _Candidate:
    sq_error: float
    nbytes: int
    spec: str
    k: int
    bits: int
    payload: bytes


def _spec(base: str, payload: bytes) -> str:
    return base + (" > ans" if inspect(payload).codec_id == Ans.codec_id else "")


# ---------------------------------------------------------------------------- whole model
@dataclass(frozen=True)
class BudgetedUpdate:
    """A model update encoded within one byte budget."""

    #: the container payload (``decode_state_dict`` reads it)
    payload: bytes
    #: the budget ``len(payload)`` had to fit
    budget_nbytes: int
    #: per floating-point tensor, what was chosen (in the container's order)
    choices: dict[str, BudgetChoice]


def encode_state_dict_within_budget(
    state: Mapping[str, torch.Tensor],
    *,
    bits_per_entry: float | None = None,
    nbytes: int | None = None,
    max_bits: int = 8,
    ans: bool = False,
) -> BudgetedUpdate:
    """Encode a whole update into one container of at most ``nbytes`` (or
    ``floor(bits_per_entry * D / 8)``, ``D`` = entries of all floating-point tensors) bytes.

    Everything counts: the container's own bytes, the names, the ``raw`` frames of integer/bool
    buffers. Each floating-point tensor first gets its minimum payload (:meth:`Budget.min_nbytes`);
    the rest is shared in proportion to size, smallest tensors first, and whatever a tensor leaves
    unused passes on to the next ones. Raises :class:`~fedsqueeze.errors.EncodeError` naming the
    minimum total when the budget cannot hold every tensor's minimum.
    """
    if (bits_per_entry is None) == (nbytes is None):
        raise ConfigError("budget: give exactly one of bits_per_entry or nbytes for the whole update")
    floats = {n: t for n, t in state.items() if isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES}
    total_entries = sum(t.numel() for t in floats.values())
    if nbytes is not None:
        budget = int(nbytes)
    else:
        assert bits_per_entry is not None
        if not (math.isfinite(bits_per_entry) and bits_per_entry > 0):
            raise ConfigError(f"budget: bits per entry must be a finite number > 0, got {bits_per_entry}")
        budget = math.floor(bits_per_entry * total_entries / 8)

    def policy(n: int) -> Budget:
        return Budget(nbytes=n, max_bits=max_bits, ans=ans)

    raw = Raw()
    fixed_frames = {n: raw.encode(t) for n, t in state.items() if n not in floats}
    overhead = len(encode_container({n: b"" for n in state}))  # magic, count, names, lengths, CRC
    fixed = overhead + sum(len(f) for f in fixed_frames.values())
    mins = {n: policy(MIN_BUDGET_NBYTES).min_nbytes(t) for n, t in floats.items()}
    need = fixed + sum(mins.values())
    if need > budget:
        raise EncodeError(
            f"budget: {budget} bytes cannot hold this update; its minimum is {need} bytes "
            f"({fixed} for the container and non-float tensors, {need - fixed} for the smallest "
            f"payloads of {len(floats)} float tensors)"
        )
    left = budget - fixed
    pending_min = sum(mins.values())
    pending_entries = total_entries
    frames: dict[str, bytes] = dict(fixed_frames)
    choices: dict[str, BudgetChoice] = {}
    for name in sorted(floats, key=lambda n: (floats[n].numel(), n)):
        t = floats[name]
        extra = left - pending_min
        share = extra if pending_entries == 0 else extra * t.numel() // pending_entries
        choice = policy(mins[name] + share).choose(t)
        frames[name] = choice.payload
        choices[name] = choice
        left -= choice.nbytes
        pending_min -= mins[name]
        pending_entries -= t.numel()
    payload = encode_container({n: frames[n] for n in state})
    if len(payload) > budget:  # unreachable by construction; never send an over-budget update
        raise EncodeError(f"budget: internal error, {len(payload)} bytes exceed the budget of {budget}")
    return BudgetedUpdate(payload, budget, {n: choices[n] for n in state if n in choices})


# ---------------------------------------------------------------------------- template mode
_SENTINEL = 987_654_321  # stands for the knob while a template is parsed (never in a payload)
_TEMPLATE_FORMS = (
    "a value codec (budget:bits=0.6 > uniform:2, > weibull_lloyd:2, > tinyscript:3, > fp8, > fp4), "
    "topk > a value codec, m22:bits=2,M=2, or countsketch:rows=1,k=1%; optionally followed by "
    "'> ans' (e.g. budget:bits=0.6 > m22:bits=3,M=2 > ans)"
)


@dataclass(frozen=True)
class _Template:
    """A codec spec with one size knob left open: ``k`` (Top-K, M22) or ``cols`` (CountSketch),
    optionally entropy-coded by a trailing ``ans`` stage."""

    #: canonical text, as written after ``budget:... >`` (the knob omitted; ``... > ans`` if coded)
    text: str
    #: ``"topk"``, ``"m22"`` or ``"countsketch"``
    kind: str
    #: per-tensor spec of the *plain* (not entropy-coded) payload with ``{}`` where the knob goes
    pattern: str
    stochastic: bool
    #: a trailing ``> ans``: the payload sent is the plain one entropy-coded (module docstring)
    ans: bool = False

    @classmethod
    def parse(cls, text: str) -> _Template:
        from fedsqueeze.codecs.spec import _SEP, _split_stage, parse_spec

        stages = [s.strip() for s in _SEP.split(text.strip())]
        if not stages or any(not s for s in stages):
            raise ConfigError(f"budget: empty template {text!r}; expected {_TEMPLATE_FORMS}")
        if len(stages) > 1 and _split_stage(stages[-1])[0] == "ans":
            _, apos, akw = _split_stage(stages[-1])
            if apos or akw:
                raise ConfigError(f"budget: 'ans' takes no arguments, got {stages[-1]!r} in {text!r}")
            plain = cls._parse_plain(" > ".join(stages[:-1]), stages[:-1])
            try:  # the spec-time check of the ans stage (fp8, fp4, fp32, countsketch have no symbols)
                parse_spec(f"{plain.pattern.format(1)} > ans")
            except ConfigError as exc:
                raise ConfigError(
                    f"budget: cannot entropy-code the template {plain.text!r} with ans: {exc}"
                ) from None
            return cls(f"{plain.text} > ans", plain.kind, plain.pattern, plain.stochastic, ans=True)
        return cls._parse_plain(text, stages)

    @classmethod
    def _parse_plain(cls, text: str, stages: list[str]) -> _Template:
        from fedsqueeze.codecs.spec import _split_stage, parse_spec

        name, pos, kw = _split_stage(stages[0])
        if name in ("m22", "countsketch"):
            knob = "k" if name == "m22" else "cols"
            if len(stages) > 1:
                raise ConfigError(
                    f"budget: nothing but 'ans' may follow {name!r} in a budget template (got "
                    f"{text!r}); the budget measures the template's own payload, entropy-coded by "
                    "'> ans' if asked"
                )
            given = [a for a in (knob, "ratio") if a in kw]
            if pos or given:
                raise ConfigError(
                    f"budget: chooses {name}'s {knob} itself; drop {(pos or given)[0]!r} from {stages[0]!r}"
                )
            args = "".join(f",{k}={v}" for k, v in kw.items())
            try:
                probe = parse_spec(f"{name}:{knob}={_SENTINEL}{args}")
            except ConfigError as exc:  # name the template, not the placeholder knob
                raise ConfigError(
                    f"budget: bad template {stages[0]!r}: " + str(exc).replace(f"{knob}={_SENTINEL},", "")
                ) from None
            canon = probe.spec
            mark = f"{knob}={_SENTINEL}"
            if canon.count(mark) != 1:  # pragma: no cover - the codec's spec format changed
                raise ConfigError(f"budget: cannot place {knob} in {canon!r}")
            pattern = canon.replace(mark, knob + "={}")
            short = pattern.replace(knob + "={},", "").replace("," + knob + "={}", "")
            short = short.replace(":" + knob + "={}", "")
            return cls(short, name, pattern, probe.stochastic)
        rest = stages
        if name == "topk":
            if pos or kw:
                bare = " > ".join(["topk", *stages[1:]])
                raise ConfigError(
                    f"budget: chooses Top-K's k itself; write {bare!r} (no size on {stages[0]!r})"
                )
            rest = stages[1:]
        values = parse_spec(" > ".join(rest)) if rest else parse_spec("fp32")
        if values.stage != "values":
            raise ConfigError(
                f"budget: cannot size the template {text!r} ({values.spec!r} is a {values.stage} "
                f"stage); expected {_TEMPLATE_FORMS}"
            )
        pattern = parse_spec(f"topk:k={_SENTINEL} > {values.spec}").spec.replace(f"k={_SENTINEL}", "k={}")
        return cls(values.spec, "topk", pattern, values.stochastic)

    def spec_for(self, knob: int) -> str:
        """The spec of the payload sent at ``knob`` (``parse_spec(...).encode(t)`` reproduces it)."""
        return self.pattern.format(knob) + (" > ans" if self.ans else "")

    def plain_spec_for(self, knob: int) -> str:
        """The spec without the ``ans`` stage (what the zero-valued size probes encode)."""
        return self.pattern.format(knob)


@dataclass(frozen=True)
class TemplateFit:
    """What a budget with a template produced for one tensor or one whole update."""

    #: the template (``Budget.spec`` after ``>``)
    template: str
    #: the global knob: kept entries ``K`` over all tensors (``topk``, ``m22``) or total sketch
    #: columns ``C`` (``countsketch``)
    knob: int
    #: per floating-point tensor, the spec that reproduces its frame (name ``""`` for one tensor)
    specs: dict[str, str]
    #: ``len(payload)``, everything included
    nbytes: int
    #: the budget it had to fit
    budget_nbytes: int
    #: one frame (a tensor) or a container (an update)
    payload: bytes


def _clone(rng: torch.Generator | None) -> torch.Generator | None:
    if rng is None:
        return None
    g = torch.Generator()
    g.set_state(rng.get_state())
    return g


class _TemplateSearch:
    """The largest knob whose payload fits (module docstring, "Template mode").

    ``floats`` are the tensors the template codes, in order; ``state`` is the whole update (None
    for a bare frame), whose other tensors go ``raw`` and whose container bytes are counted.
    """

    def __init__(
        self,
        tmpl: _Template,
        floats: Mapping[str, torch.Tensor],
        state: Mapping[str, torch.Tensor] | None,
    ) -> None:
        self.tmpl = tmpl
        self.names = list(floats)
        self.ts = list(floats.values())
        self.flats = [t.detach().reshape(-1).to(device="cpu", dtype=torch.float32) for t in self.ts]
        self.ds = [f.numel() for f in self.flats]
        self.total = sum(self.ds)
        self.state = state
        self.fixed = 0
        self.raw_frames: dict[str, bytes] = {}
        if state is not None:
            raw = Raw()
            self.raw_frames = {n: raw.encode(t) for n, t in state.items() if n not in floats}
            overhead = len(encode_container({n: b"" for n in state}))
            self.fixed = overhead + sum(len(f) for f in self.raw_frames.values())
        self._codecs: dict[int, Codec] = {}
        self._probe: dict[tuple[int, int], int] = {}
        self._zeros = [torch.zeros(t.shape, dtype=t.dtype) for t in self.ts]
        self._orders: list[npt.NDArray[np.int64]] = []
        self._tid_sorted = np.zeros(0, np.int64)
        if tmpl.kind != "countsketch":
            self._orders = [torch.sort(-f.abs(), stable=True).indices.numpy() for f in self.flats]
            if self.total:
                order = torch.sort(-torch.cat(self.flats).abs(), stable=True).indices.numpy()
                tid = np.repeat(np.arange(len(self.ts), dtype=np.int64), self.ds)
                self._tid_sorted = tid[order]  # ties: earlier tensor, then lower index, as global_topk_counts

    # -------------------------------------------------------------- knobs
    @property
    def kmin(self) -> int:
        return 1 if self.tmpl.kind == "countsketch" else 0

    @property
    def kmax(self) -> int:
        if self.tmpl.kind == "countsketch":
            return max(1, self.total)  # a sketch as long as the tensor is never useful
        return self.total

    def knobs(self, knob: int) -> list[int]:
        """Per-tensor knob for the global one (module docstring)."""
        if self.tmpl.kind == "countsketch":
            if self.total == 0:
                return [1] * len(self.ds)
            return [max(1, knob * d // self.total) for d in self.ds]
        counts = np.bincount(self._tid_sorted[:knob], minlength=len(self.ds))
        if self.tmpl.kind == "topk":  # topk needs k >= 1 (an empty tensor still keeps 0)
            return [max(1, int(c)) for c in counts]
        return [int(c) for c in counts]

    def codec(self, q: int) -> Codec:
        """The plain codec at per-tensor knob ``q`` (the size probes encode zeros with it)."""
        if q not in self._codecs:
            from fedsqueeze.codecs.spec import parse_spec

            self._codecs[q] = parse_spec(self.tmpl.plain_spec_for(q))
        return self._codecs[q]

    def sent_codec(self, q: int) -> Codec:
        """The codec whose payload is sent: :meth:`codec`, entropy-coded if the template ends in ``ans``."""
        return Ans(self.codec(q)) if self.tmpl.ans else self.codec(q)

    # -------------------------------------------------------------- sizes
    def _frame_nbytes(self, i: int, q: int) -> int:
        """Exact size of tensor ``i``'s frame at knob ``q`` for a fixed-rate value coder."""
        key = (i, q)
        if key not in self._probe:
            n = len(self.codec(q).encode(self._zeros[i]))
            if self.tmpl.kind != "countsketch":
                k, d = min(q, self.ds[i]), self.ds[i]
                real = np.sort(self._orders[i][:k]).astype(np.int64)
                n += index_section_nbytes(real, d) - index_section_nbytes(np.arange(k, dtype=np.int64), d)
            self._probe[key] = n
        return self._probe[key]

    def predicted_nbytes(self, knob: int) -> int:
        return self.fixed + sum(self._frame_nbytes(i, q) for i, q in enumerate(self.knobs(knob)))

    def build(self, knob: int, rng: torch.Generator | None) -> tuple[bytes, torch.Generator | None]:
        g = _clone(rng)
        qs = self.knobs(knob)
        frames = {
            n: self.sent_codec(q).encode(t, rng=g) for n, t, q in zip(self.names, self.ts, qs, strict=True)
        }
        if self.state is None:
            return frames[self.names[0]], g
        frames.update(self.raw_frames)
        return encode_container({n: frames[n] for n in self.state}), g

    def min_nbytes(self) -> int:
        return len(self.build(self.kmin, None)[0])

    # -------------------------------------------------------------- search
    def _largest(self, size: Any, lo: int, hi: int | None, budget: int, guess: int) -> int:
        """Largest knob in ``[lo, kmax]`` with ``size(knob) <= budget``, given that ``lo`` fits and
        ``hi`` (if any) does not; ``size`` is assumed non-decreasing. Gallops from ``guess``."""
        top = self.kmax if hi is None else hi - 1
        x = min(max(guess, lo), top)
        step = max(1, x // 64)
        if x > lo:
            if size(x) <= budget:
                lo = x
                while lo < top:  # gallop up
                    nxt = min(top, lo + step)
                    if size(nxt) > budget:
                        hi = nxt
                        break
                    lo, step = nxt, 2 * step
            else:
                hi = x
                while hi - step > lo:  # gallop down
                    nxt = hi - step
                    if size(nxt) <= budget:
                        lo = nxt
                        break
                    hi, step = nxt, 2 * step
        if hi is None:
            hi = top + 1
        return _last_fit(lo, hi, lambda k: size(k) <= budget)

    def _guess(self, budget: int, p0: int) -> int:
        """Secant steps on the predicted size from ``kmin`` (sizes are nearly linear in the knob)."""
        k0 = self.kmin
        k1 = min(self.kmax, k0 + max(1, (budget - p0) // 4))
        for _ in range(2):
            p1 = self.predicted_nbytes(k1)
            if p1 <= p0:
                break
            g = k0 + (k1 - k0) * (budget - p0) / (p1 - p0)
            k1 = min(self.kmax, max(k0 + 1, int(g)))
        return k1

    def _too_small(self, budget: int, least_nbytes: int) -> EncodeError:
        least = {"countsketch": "1 column", "m22": "no kept entry", "topk": "1 kept entry"}
        return EncodeError(
            f"budget: {budget} bytes cannot hold {self.tmpl.text!r} for "
            f"{len(self.ts)} tensor(s) of {self.total} entries; its smallest payload "
            f"({least[self.tmpl.kind]} per tensor, frame headers"
            f"{' and container' if self.state is not None else ''} included"
            f"{', entropy-coded' if self.tmpl.ans else ''}) is {least_nbytes} bytes. Raise the budget"
        )

    def fit(self, budget: int, rng: torch.Generator | None) -> TemplateFit:
        if self.tmpl.ans:
            return self._fit_coded(budget, rng)
        k0 = self.kmin
        p0 = self.predicted_nbytes(k0)
        if p0 > budget:
            payload, g = self.build(k0, rng)
            if len(payload) > budget:
                raise self._too_small(budget, len(payload))
            return self._result(k0, payload, g, budget, rng)
        knob = self._largest(self.predicted_nbytes, k0, None, budget, self._guess(budget, p0))
        payload, g = self.build(knob, rng)
        if len(payload) > budget:  # a data-dependent value coder: bisect on real payloads
            if len(self.build(k0, rng)[0]) > budget:
                raise EncodeError(
                    f"budget: {budget} bytes cannot hold {self.tmpl.text!r} for this input; "
                    f"its smallest payload is {len(self.build(k0, rng)[0])} bytes"
                )

            def real(q: int) -> int:
                return len(self.build(q, rng)[0])

            knob = self._largest(real, k0, knob, budget, knob - max(1, knob // 64))
            payload, g = self.build(knob, rng)
        return self._result(knob, payload, g, budget, rng)

    def _fit_coded(self, budget: int, rng: torch.Generator | None) -> TemplateFit:
        """Largest knob whose *entropy-coded* payload fits: predict, then verify on real payloads.

        The plain size ``P(K)`` is predicted exactly (:meth:`predicted_nbytes`); the bytes the
        entropy coder saves, ``e(K) = P(K) - A(K)`` with ``A`` the real coded size, are modelled as
        linear in ``K`` through the latest real payload and an earlier one at least ~3% of ``K``
        away (at first: constant, measured at ``kmin``). Up to six predict-build rounds narrow a
        bracket (``lo`` a measured fit, ``hi`` a measured misfit); a bisection (after a gallop up
        from ``lo``, steps 1, 2, 4, ..., when the bracket is still wide) then pins the answer to one
        knob unit on real sizes. Every size that decides is a real ``len(payload)``; builds are
        memoised per knob and deterministic (``rng`` cloned for each).
        """
        k0 = self.kmin
        built: dict[int, tuple[bytes, torch.Generator | None]] = {}

        def real(q: int) -> int:
            if q not in built:
                built[q] = self.build(q, rng)
            return len(built[q][0])

        if real(k0) > budget:
            raise self._too_small(budget, real(k0))
        points = [k0]  # knobs built by the prediction rounds, in order

        def estimate(q: int) -> float:
            b = points[-1]
            a = next((a for a in reversed(points[:-1]) if abs(b - a) > max(1, b // 32)), b)
            eb = self.predicted_nbytes(b) - real(b)
            if a == b:
                return self.predicted_nbytes(q) - eb
            ea = self.predicted_nbytes(a) - real(a)
            return self.predicted_nbytes(q) - (eb + (eb - ea) * (q - b) / (b - a))

        lo, hi = k0, self.kmax + 1  # lo fits (measured); hi does not (measured, or past kmax)
        p0 = self.predicted_nbytes(k0)
        guess = self._guess(budget, p0) if p0 <= budget else k0
        for _ in range(6):
            if hi - lo <= 1:
                break
            q = self._largest(estimate, lo, hi if hi <= self.kmax else None, budget, guess)
            if q in built:
                break  # the model predicts nothing beyond what was measured
            if real(q) <= budget:
                lo = q
            else:
                hi = q
            points.append(q)
            guess = q
        step = 1 if hi - lo > 64 else hi - lo
        while lo + step < hi and real(lo + step) <= budget:  # gallop up from the last fit
            lo, step = lo + step, 2 * step
        hi = min(hi, lo + step)
        lo = _last_fit(lo, hi, lambda k: real(k) <= budget)
        payload, g = built[lo]
        return self._result(lo, payload, g, budget, rng)

    def _result(
        self,
        knob: int,
        payload: bytes,
        g: torch.Generator | None,
        budget: int,
        rng: torch.Generator | None,
    ) -> TemplateFit:
        if len(payload) > budget:  # unreachable by construction; never send an over-budget payload
            raise EncodeError(f"budget: internal error, {len(payload)} bytes exceed the budget of {budget}")
        if rng is not None and g is not None:
            rng.set_state(g.get_state())  # the caller's generator advances as for one encode
        specs = {n: self.tmpl.spec_for(q) for n, q in zip(self.names, self.knobs(knob), strict=True)}
        return TemplateFit(self.tmpl.text, knob, specs, len(payload), budget, payload)
