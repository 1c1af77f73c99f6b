"""Cost models of clusters we do not have: how long a stage takes for a run,
and a link for a message. The simulated transport charges these times while
the real model computes the real tokens.

A stage reads its weights once per run (memory-bound) and does 2 x params
FLOPs per token (compute-bound); the two add, which is pessimistic for large
runs on GPUs and close to measured llama.cpp behaviour on CPUs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GB = 1e9


@dataclass(frozen=True, slots=True)
class ClusterProfile:
    name: str
    description: str
    num_stages: int
    # The target model being modelled (not the small one that computes the tokens).
    num_layers: int
    params_per_layer: float
    head_params: float  # the output projection, on the last stage
    hidden_size: int
    bytes_per_param: float  # weight storage (quantized: below 1)
    activation_bytes: int  # per element sent between stages
    # One node.
    memory_bandwidth_Bps: float
    flops: float  # sustained, for matrix-vector/matrix-matrix work
    run_overhead_s: float  # per run per stage: graph build, kernel launches
    # Links between consecutive stages and back to the coordinator.
    link_latency_s: float
    link_bandwidth_Bps: float
    # The draft, on its own node next to the coordinator.
    draft_token_s: float  # one draft forward pass (one token)
    draft_call_s: float  # per propose() call: a round trip to the draft node
    # Measured instead of modelled (a profile calibrated on a real run): per
    # stage, the seconds of a run of n <= max_decode_tokens tokens are a + b * n,
    # and of a longer one (a prompt) n times its prefill_token_s (computed
    # as one batch, a prompt's token costs far less than a decode run's).
    stage_costs: tuple[tuple[float, float], ...] = ()
    max_decode_tokens: int = 0  # 0: a + b * n for every run
    prefill_token_s: tuple[float, ...] = ()

    def layers_of(self, stage: int) -> int:
        base, extra = divmod(self.num_layers, self.num_stages)
        return base + (1 if stage < extra else 0)

    def params_of(self, stage: int) -> float:
        head = self.head_params if stage == self.num_stages - 1 else 0.0
        return self.layers_of(stage) * self.params_per_layer + head

    def weight_bytes_of(self, stage: int) -> float:
        return self.params_of(stage) * self.bytes_per_param

    def stage_time_s(self, stage: int, num_tokens: int) -> float:
        if self.stage_costs:
            if self.max_decode_tokens and num_tokens > self.max_decode_tokens:
                return num_tokens * self.prefill_token_s[stage]
            a, b = self.stage_costs[stage]
            return a + b * num_tokens
        return (self.run_overhead_s + self.weight_bytes_of(stage) / self.memory_bandwidth_Bps
                + num_tokens * 2 * self.params_of(stage) / self.flops)

    def layer_time_s(self, stage: int, num_tokens: int) -> float:
        """Granularity of a mid-forward cancellation."""
        return self.stage_time_s(stage, num_tokens) / max(1, self.layers_of(stage))

    def link_time_s(self, num_bytes: int) -> float:
        return self.link_latency_s + num_bytes / self.link_bandwidth_Bps

    def hidden_bytes(self, num_tokens: int) -> int:
        return num_tokens * self.hidden_size * self.activation_bytes

    def floor_s_per_run(self) -> float:
        """The physical limit of one single-token run: every weight byte read
        once at memory bandwidth, plus one hop per stage and back (for a
        measured profile: the measured single-token stage times)."""
        if self.stage_costs:
            weights = sum(self.stage_time_s(s, 1) for s in range(self.num_stages))
        else:
            weights = sum(self.weight_bytes_of(s) / self.memory_bandwidth_Bps for s in range(self.num_stages))
        hops = self.num_stages * self.link_time_s(self.hidden_bytes(1))
        return weights + hops

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict) -> ClusterProfile:
        data = dict(data)
        data["stage_costs"] = tuple(tuple(c) for c in data.get("stage_costs", ()))
        data["prefill_token_s"] = tuple(data.get("prefill_token_s", ()))
        return cls(**data)


# Llama-2-70B: 80 layers of 8192 hidden, 28672 MLP, 64 query / 8 KV heads.
_LLAMA70B = dict(num_layers=80, params_per_layer=0.856e9, head_params=8192 * 32000, hidden_size=8192)

PROFILES: dict[str, ClusterProfile] = {
    profile.name: profile
    for profile in (
        ClusterProfile(
            name="pipeinfer-2024",
            description="PipeInfer's published setting: a 70B target (4-bit, llama.cpp) over 8 CPU nodes on "
                        "Gigabit Ethernet, float32 activations, a ~1B draft on its own node",
            num_stages=8,
            **_LLAMA70B,
            bytes_per_param=0.56,  # Q4_K_M
            activation_bytes=4,
            memory_bandwidth_Bps=20 * GB,  # a dual-channel DDR4 node, effective
            flops=0.5e12,
            run_overhead_s=2e-3,
            link_latency_s=100e-6,  # MPI over TCP
            link_bandwidth_Bps=0.117 * GB,  # Gigabit Ethernet payload rate
            draft_token_s=35e-3,  # TinyLlama-1.1B Q4 on one such node
            draft_call_s=0.3e-3,
        ),
        ClusterProfile(
            name="gpu-2025",
            description="A modern GPU cluster: a 70B target (bfloat16) over 8 H100s, 100 Gb/s links, "
                        "a 1B draft on a GPU next to the coordinator",
            num_stages=8,
            **_LLAMA70B,
            bytes_per_param=2.0,
            activation_bytes=2,
            memory_bandwidth_Bps=2.6e3 * GB,  # ~80% of 3.35 TB/s
            flops=400e12,
            run_overhead_s=0.4e-3,  # eager kernel launches for 10 layers
            link_latency_s=10e-6,
            link_bandwidth_Bps=12.5 * GB,
            draft_token_s=1.5e-3,
            draft_call_s=20e-6,
        ),
    )
}


def get_profile(name: str) -> ClusterProfile:
    """A named profile, or a JSON file of one (what `pipeinfer bench --calibrate` writes)."""
    if name in PROFILES:
        return PROFILES[name]
    if name.endswith(".json"):
        try:
            return ClusterProfile.from_dict(json.loads(Path(name).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"simulation profile {name}: {exc}") from None
    raise ValueError(f"unknown simulation profile {name!r}; choose from {', '.join(PROFILES)}, or a profile .json")
