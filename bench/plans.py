"""The memory planner's tables for the published models of configs/models/ (docs/SCALING.md, "Memory plans").

Plans Llama-3.1-8B, Qwen2.5-7B and Llama-3.1-70B on 1 GPU and on 8 GPUs (FSDP2) of 80 GB with
full, LoRA and adjacent recovery, from their config.json alone, with the same functions as
`iterabre plan --json`; writes bench/results/plans.json. `bench/render.py plans` prints the tables.

    .venv/bin/python bench/plans.py
"""

from __future__ import annotations

import common

MODELS = ("llama-3.1-8b", "qwen2.5-7b", "llama-3.1-70b")
SETUPS = {"1 GPU": dict(num_processes=1, fsdp=False), "8 GPUs, FSDP2": dict(num_processes=8, fsdp=True),
          "8 GPUs, FSDP2, --eval-parallelize": dict(num_processes=8, fsdp=True, eval_parallelize=True)}
TRAINABLE = ("all", "lora", "adjacent")
# One sequence per GPU on 8 GPUs; the same global batch on one. A quarter of the blocks removed.
SIZES = dict(batch_size=8, seq_len=512, ratio=0.75)
DEVICE_MEMORY = 80 * 10**9  # an "80 GB" A100/H100: 80 GB = 74.5 GiB


def plans() -> dict:
    """{model: {setup: {trainable: plan dict}}}."""
    from iterabre import planner

    out = {}
    for name in MODELS:
        m = planner.counts_for(str(common.REPO / "configs" / "models" / name))
        target = round(SIZES["ratio"] * m.num_layers)
        out[name] = {setup: {t: planner.plan(m, planner.Job(target_layers=target, trainable=t, device="cuda",
                                                            batch_size=SIZES["batch_size"],
                                                            seq_len=SIZES["seq_len"], **kw),
                                             DEVICE_MEMORY, None).to_dict()
                             for t in TRAINABLE} for setup, kw in SETUPS.items()}
    return out


def main() -> None:
    common.write_json("plans", {"machine": common.machine_info(), "settings": {**SIZES, "device_memory": DEVICE_MEMORY,
                                                                            "dtype": "auto (bfloat16)"},
                                "plans": plans()})
    print(common.result_path("plans"))


if __name__ == "__main__":
    main()
