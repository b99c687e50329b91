"""Which bit width (and sketch size) each method of the budget sweep uses: the one with the lowest
relative reconstruction error ``||x - x_hat||^2 / ||x||^2`` of a client update at each budget.

    python examples/budget_bitwidth_study.py --data-dir /path/to/data [--dataset fashion_mnist]

The update is one client's first-round difference: ``cifar_cnn`` from its seed-0 initialisation,
50 SGD steps (batch 32, lr 0.05) on random training batches. Every candidate is encoded as the
sweep sends it (``budget:bits=R > TEMPLATE`` on the whole update, container included), so each fits
the same ``floor(R d / 8)`` bytes. Prints one Markdown table per budget.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F  # noqa: N812

from fedsqueeze.codecs import decode_state_dict, encode_state_dict, parse_spec
from fedsqueeze.data import load_dataset
from fedsqueeze.models.zoo import build_model

CANDIDATES = {
    "M22 M=0": [f"m22:bits={b},M=0" for b in (1, 2, 3, 4, 5)],
    "M22 M=2": [f"m22:bits={b},M=2" for b in (1, 2, 3, 4, 5)],
    "Weibull-LM": [f"weibull_lloyd:{b}" for b in (1, 2, 3, 4, 5)],
    "TinyScript": [f"tinyscript:{b}" for b in (2, 3, 4, 5)],
    "uniform": [f"uniform:{b}" for b in (1, 2, 3, 4, 5, 6)],
    "fp8/fp4": ["fp8", "fp8:e5m2", "fp4"],
    "CountSketch": [
        f"countsketch:rows={r},k={k},table=fp16" for r in (1, 3) for k in ("0.02%", "0.1%", "0.3%", "1%")
    ],
}


def client_update(dataset: str, data_dir: str) -> dict[str, torch.Tensor]:
    data = load_dataset(dataset, data_dir)
    torch.manual_seed(0)
    model = build_model("cifar_cnn", data.input_shape, data.num_classes)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(50):
        idx = torch.randint(0, len(data.train), (32,))
        loss = F.cross_entropy(model(data.train.x[idx]), data.train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: p.detach() - start[n] for n, p in model.named_parameters()}


def rel_error(update: dict[str, torch.Tensor], spec: str) -> tuple[float, int]:
    payload = encode_state_dict(update, parse_spec(spec), rng=torch.Generator().manual_seed(0))
    back = decode_state_dict(payload)
    err = sum(float(((back[n] - t) ** 2).sum()) for n, t in update.items())
    return err / sum(float((t**2).sum()) for t in update.values()), len(payload)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--dataset", default="fashion_mnist")
    args = ap.parse_args()
    update = client_update(args.dataset, args.data_dir)
    d = sum(t.numel() for t in update.values())
    for bits in (0.6, 1.8):
        print(f"\n### R = {bits} d = {math.floor(bits * d / 8):,} bytes per update (d = {d:,})\n")
        print("| method | candidates: relative error (payload bytes) |\n|---|---|")
        for method, templates in CANDIDATES.items():
            cells = []
            for t in templates:
                e, n = rel_error(update, f"budget:bits={bits} > {t}")
                cells.append(f"`{t}` {e:.3f} ({n:,})")
            print(f"| {method} | {'; '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
