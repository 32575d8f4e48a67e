"""scripts/count_launches.py: the GPU code path's kernel launches, counted on a CPU with a stand-in Triton."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "count_launches.py"


def test_counts_every_adapted_layers_kernels_and_no_zero_gradients(tmp_path) -> None:
    """The tiny model (2 decoder layers, 6 adapted linears each): a mixture routes and gates once per adapted
    layer; it and LoRA project once per shared-input group (q/k/v, gate/up, down: 3 a decoder layer), and LoRA
    does nothing else in Triton; no gradient of an output that no loss reads is filled with zeros (the
    routing's top_idx, entropy, z-loss)."""
    out = tmp_path / "counts.json"
    subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--adapters", "malora,lora", "--top", "3",
                    "--json", str(out)], check=True, capture_output=True, text=True, timeout=300)
    rows = {r["adapter"]: r for r in json.loads(out.read_text())["rows"]}
    malora, lora = rows["malora"], rows["lora"]
    layers = malora["adapted_layers"]
    assert layers == lora["adapted_layers"] == 12
    # routing and gating in one Function (``routed_gated_up``): three kernels a layer, not five
    for kernel in ("_routed_expand_kernel", "_route_stats_kernel", "_routed_expand_bwd_kernel"):
        assert malora["by_kernel"][kernel] == layers
    assert not any(k in malora["by_kernel"] for k in ("_route_fwd_kernel", "_route_bwd_kernel",
                                                      "_expand_fwd_kernel", "_expand_bwd_kernel"))
    assert malora["by_kernel"]["_project_fwd_kernel"] == lora["by_kernel"]["_project_fwd_kernel"] == 6
    assert not any(k.startswith(("_route", "_expand")) for k in lora["by_kernel"])
    # autograd's zero tensors for outputs without a gradient show as ``zeros`` issued by the backward call
    assert not [n for op, where, n in malora["by_line"] if op == "zeros" and where.startswith("loop.py")]
    assert malora["total"] == malora["torch"] + malora["triton"] > lora["total"]
    # the frozen model's 5 RMSNorms (2 a decoder layer and the last) as CUDA runs them: one kernel each way
    # (no backward for the first, whose input, the frozen embeddings, needs no gradient), and none of the
    # operators the CPU decomposes them into
    ops = {op: 0 for op in ("_fused_rms_norm", "_fused_rms_norm_backward", "rsqrt", "pow")}
    for op, _where, n in malora["by_line"]:
        if op in ops:
            ops[op] += n
    assert ops == {"_fused_rms_norm": 5, "_fused_rms_norm_backward": 4, "rsqrt": 0, "pow": 0}
