"""Run every per-spec check of the shared conformance harness on one spec.

``tests/codec_cases.py`` lists the specs the main harness runs; feature test files call
:func:`run_spec_checks` only for *extra* specs they want covered (never for ones already listed).
"""

from __future__ import annotations

import test_conformance as tc
import test_fuzz as tf
from codec_cases import CASES


def extra(specs: list[str]) -> list[str]:
    """The specs not already run by the main harness."""
    return [s for s in specs if s not in CASES]


def run_spec_checks(spec: str, *, fuzz: bool = True) -> None:
    tc.test_spec_round_trips(spec)
    for shape in tc.SHAPES:
        tc.test_round_trip_shape_and_dtype(spec, shape)
    tc.test_reconstruction_is_sane(spec)
    tc.test_fixed_rng_is_deterministic(spec)
    if tc.make(spec).unbiased and not tc.make(spec).lossless:
        tc.test_unbiased_claim_holds_statistically(spec)
    else:
        tc.test_biased_codecs_are_really_biased_or_deterministic(spec)
    tc.test_every_truncation_is_a_decode_error(spec)
    tc.test_single_bit_flips_are_detected(spec)
    tc.test_non_finite_input_is_refused(spec)
    if fuzz:
        tf.test_mutated_payloads_never_crash(spec)
