"""Bytes on the wire per update, over the fp32 size of the same delta.

The wire size is the whole signed envelope that ``shared.codec.encode`` makes of a real
``shared.messages.Update`` whose payload comes from ``shared.quantize.encode_delta``:
msgpack envelope, header fields (the coordinator's signed task token among them, as every
update carries since issue 11), Ed25519 signature, per-block scales and int8 values.
The fp32 size is 4 bytes per parameter (the exact int64 buffer counted as one parameter).
Sizes are deterministic; the timings beside them are informative only.

    .venv/bin/python benchmarks/wire.py [--json] [--quick]
"""

from __future__ import annotations

import time
from typing import Any

import torch
from _common import SIZES, emit, machine, parser, say, signed_task, synthetic_delta, synthetic_state, table

from shared.codec import encode
from shared.messages import Update
from shared.quantize import DEFAULT_BLOCK, encode_delta
from shared.settings import Settings
from shared.signing import Signer
from shared.tensors import FlatModel

TARGET = 0.26
INLINE_LIMIT = Settings.inline_limit  # above this an update travels by claim check (store reference)


def measure(n: int, scheme: str, signer: Signer, block: int) -> dict[str, Any]:
    task, token = signed_task(
        Signer.generate(), "bench-job", base_version=123, incarnation="0123456789abcdef", max_samples=3200
    )
    model = FlatModel.from_state_dict(synthetic_state(n))
    spec = model.spec
    floats, exact = synthetic_delta(spec.n_float, spec.n_exact)
    t0 = time.perf_counter()
    payload = encode_delta(floats, exact, spec, scheme, block, torch.Generator().manual_seed(7))
    t1 = time.perf_counter()
    update = Update(
        task_id=task.task_id,
        job_id="bench-job",
        worker_id="bench-worker-0001",
        base_version=123,
        num_samples=1600,
        quant=scheme,
        block=block,
        metrics={"train_loss": 0.4321, "train_accuracy": 0.8765, "seconds": 1.234},
        sent_at=time.time(),
        task=token,
        delta=payload,
    )
    raw = encode(update, signer)
    t2 = time.perf_counter()
    fp32 = 4 * (spec.n_float + spec.n_exact)
    return {
        "size": n,
        "scheme": scheme,
        "tensors": len(spec.tensors),
        "fp32_bytes": fp32,
        "payload_bytes": len(payload),
        "wire_bytes": len(raw),
        "envelope_overhead_bytes": len(raw) - len(payload),
        "payload_ratio": len(payload) / fp32,
        "wire_ratio": len(raw) / fp32,
        "claim_check_by_default": len(payload) > INLINE_LIMIT,
        "quantize_ms": (t1 - t0) * 1e3,
        "sign_encode_ms": (t2 - t1) * 1e3,
    }


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    torch.set_num_threads(1)
    block = DEFAULT_BLOCK
    signer = Signer.generate()
    rows = [measure(n, scheme, signer, block) for n in SIZES.values() for scheme in ("int8", "none")]
    worst = max(r["wire_ratio"] for r in rows if r["scheme"] == "int8")
    say(f"wire: signed update envelope / fp32 delta, block {block}, one core")
    say(
        table(
            ["params", "scheme", "fp32 B", "wire B", "overhead B", "wire/fp32", "claim check", "quant ms"],
            [
                [
                    f"{r['size']:,}",
                    r["scheme"],
                    f"{r['fp32_bytes']:,}",
                    f"{r['wire_bytes']:,}",
                    r["envelope_overhead_bytes"],
                    f"{r['wire_ratio']:.5f}",
                    "yes" if r["claim_check_by_default"] else "no",
                    round(r["quantize_ms"], 1),
                ]
                for r in rows
            ],
        )
    )
    ideal = 0.25 + 1.0 / block  # 8 bits per value + one fp32 scale per block
    verdict = "holds" if worst <= TARGET else "does NOT hold"
    say(f"int8 payload floor 0.25 + 1/{block} = {ideal:.5f}; worst int8 wire ratio {worst:.5f}")
    say(f"target <= {TARGET}: {verdict}")
    say(
        f"(updates above the {INLINE_LIMIT:,}-byte inline limit travel by claim check: the envelope stays "
        "small and the same payload bytes go to the store instead of through the broker)"
    )
    emit(
        {
            "benchmark": "wire",
            "wire_ratio": worst,
            "target": TARGET,
            "target_met": worst <= TARGET,
            "block": block,
            "rows": rows,
            "machine": machine(),
        },
        args.json,
    )


if __name__ == "__main__":
    main()
