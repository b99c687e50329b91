"""Regenerate tests/golden/codecs.json. Run only for an intended format change:

python tests/golden/make_golden.py
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))

import fedsqueeze  # noqa: E402
from codec_cases import CASES  # noqa: E402
from test_conformance import golden_input  # noqa: E402


def main() -> None:
    cases = {}
    for spec in CASES:
        payload = fedsqueeze.parse_spec(spec).encode(golden_input(), rng=torch.Generator().manual_seed(1234))
        y = fedsqueeze.decode(payload)
        cases[spec] = {
            "payload_hex": payload.hex(),
            "decoded_sha256": hashlib.sha256(y.numpy().tobytes()).hexdigest(),
        }
    out = {
        "torch_version": torch.__version__,
        "input": "tests/test_conformance.py:golden_input",
        "rng": "torch.Generator().manual_seed(1234)",
        "cases": cases,
    }
    (HERE / "codecs.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {len(cases)} cases")


if __name__ == "__main__":
    main()
