"""Delta pushes: wire bytes of a full push vs a delta push after one realistic optimizer step.

A bf16 serving copy of an fp32 master model (mixed-precision training) takes one Adam step at
lr 1e-6 with random gradients; the new bf16 weights are pushed as a full push and as a delta
against the previous version. Bytes are the serialized PushWeights requests (manifest, chunks,
commit), so the manifest's overhead counts. The delta is applied by the real WeightReceiver and
checked bit-exact against the new weights.
"""

from __future__ import annotations

import time

import torch

from bench._common import parse, report
from flywheel.common.weight_push import wrap_requests
from flywheel.common.weights import WeightReceiver, encode_push


def make_master(params: int, hidden: int = 1024) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    layers = max(1, params // (8 * hidden * hidden))
    state: dict[str, torch.nn.Parameter] = {}
    for i in range(layers):
        state[f"layers.{i}.mlp.up.weight"] = torch.nn.Parameter(0.02 * torch.randn(4 * hidden, hidden, generator=g))
        state[f"layers.{i}.mlp.down.weight"] = torch.nn.Parameter(0.02 * torch.randn(hidden, 4 * hidden, generator=g))
        state[f"layers.{i}.norm.weight"] = torch.nn.Parameter(torch.ones(hidden))
    return state


def wire_bytes(plan_messages: object) -> int:
    return sum(r.ByteSize() for r in wrap_requests(plan_messages))  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse(__doc__ or "", argv)
    master = make_master(25_000_000 if args.quick else 200_000_000)
    before = {k: p.detach().to(torch.bfloat16) for k, p in master.items()}
    optimizer = torch.optim.Adam(master.values(), lr=1e-6)
    for p in master.values():
        p.grad = torch.randn_like(p)
    optimizer.step()
    after = {k: p.detach().to(torch.bfloat16) for k, p in master.items()}
    numel = sum(t.numel() for t in after.values())
    changed = sum(int((a.view(torch.int16) != b.view(torch.int16)).sum()) for a, b in zip(after.values(), before.values(), strict=True))

    start = time.perf_counter()
    full = wire_bytes(encode_push(after, 2).messages())
    full_s = time.perf_counter() - start
    start = time.perf_counter()
    plan = encode_push(after, 2, base=before, base_version=1, xor_zlib=True)
    delta = wire_bytes(plan.messages())
    delta_s = time.perf_counter() - start

    receiver = WeightReceiver(before, 1, 1 << 40)
    for kind, message in plan.messages():
        receiver.feed(kind, message)
    staged = receiver.finish()
    assert all(torch.equal(staged.tensors[k].view(torch.int16), after[k].view(torch.int16)) for k in staged.tensors)
    rows = [
        ("parameters", f"{numel / 1e6:.0f} M", "bf16 serving copy of an fp32 master"),
        ("elements changed", f"{100 * changed / numel:.2f} %", "one Adam step, lr 1e-6"),
        ("full push", f"{full / 1e6:.1f} MB", f"encode+serialize {full_s:.2f}s"),
        ("delta push", f"{delta / 1e6:.2f} MB", f"sparse or XOR+zlib per tensor; encode+serialize {delta_s:.2f}s; applied bit-exact"),
    ]
    # Lower is better: ours = delta bytes, baseline = full-push bytes, ratio = how many times smaller.
    return report("delta_push", rows, delta / 1e6, full / 1e6, target=10.0, unit="MB", ratio=full / delta)


if __name__ == "__main__":
    main()
