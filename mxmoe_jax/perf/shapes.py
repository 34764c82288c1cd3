"""MoE layer shapes for the performance table: from a model folder, HF ``config.json`` or a preset.

A layer's expert GEMMs are ``gate_up`` ([m, hidden] x [hidden, 2 * moe_intermediate]: gate and up
share an input and a scheme and run as one GEMM) and ``down`` ([m, moe_intermediate] x
[moe_intermediate, hidden]); a shared expert adds the same two with its own intermediate size.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MoEShapes:
    """The sizes of one model's MoE layers that the kernel cost depends on."""

    name: str  # model name or path, for perf.json notes
    hidden: int  # hidden_size (K of gate_up, N of down)
    moe_inter: int  # one routed expert's intermediate size
    num_experts: int  # routed experts per layer
    top_k: int  # experts per token
    shared_inter: int = 0  # total intermediate size of the shared expert(s); 0 = none
    num_moe_layers: int = 1  # MoE layers in the model

    def __post_init__(self):
        for field in ("hidden", "moe_inter", "num_experts", "top_k", "num_moe_layers"):
            if getattr(self, field) <= 0:
                raise ValueError(f"{field}: must be positive, got {getattr(self, field)}")
        if self.shared_inter < 0:
            raise ValueError(f"shared_inter: must be >= 0, got {self.shared_inter}")

    def gemms(self) -> list[tuple[int, int]]:
        """Distinct (n, k) of the layer's expert GEMMs: gate_up and down, routed then shared."""
        out = [(2 * self.moe_inter, self.hidden), (self.hidden, self.moe_inter)]
        if self.shared_inter:
            out += [(2 * self.shared_inter, self.hidden), (self.hidden, self.shared_inter)]
        return list(dict.fromkeys(out))


# Model-shape presets of ../shared/BENCHMARKS.md (E, K, N/2, top-k) plus the shared experts and
# MoE layer counts from each model's config.json.
PRESETS: dict[str, MoEShapes] = {
    "qwen1.5-moe": MoEShapes(name="qwen1.5-moe", hidden=2048, moe_inter=1408, num_experts=60,
                             top_k=4, shared_inter=5632, num_moe_layers=24),
    "deepseek-v2-lite": MoEShapes(name="deepseek-v2-lite", hidden=2048, moe_inter=1408,
                                  num_experts=64, top_k=6, shared_inter=2816, num_moe_layers=26),
    "mixtral-8x7b": MoEShapes(name="mixtral-8x7b", hidden=4096, moe_inter=14336, num_experts=8,
                              top_k=2, num_moe_layers=32),
    "qwen3-30b-a3b": MoEShapes(name="qwen3-30b-a3b", hidden=2048, moe_inter=768, num_experts=128,
                               top_k=8, num_moe_layers=48),
}


def shapes_from_hf_config(cfg: dict, name: str = "model") -> MoEShapes:
    """Read the MoE sizes from an HF ``config.json`` dict (qwen2_moe, qwen3_moe, mixtral, olmoe,
    deepseek_v2)."""
    mtype = cfg.get("model_type")
    layers = int(cfg.get("num_hidden_layers", 1))

    def need(key):
        if key not in cfg:
            raise ValueError(f"config {name}: model_type {mtype!r} needs field {key!r}")
        return cfg[key]

    if mtype in ("qwen2_moe", "qwen3_moe"):
        step = int(cfg.get("decoder_sparse_step", 1) or 1)
        dense = set(cfg.get("mlp_only_layers", []) or [])
        moe_layers = [i for i in range(layers) if i not in dense and (i + 1) % step == 0]
        shared = int(cfg.get("shared_expert_intermediate_size", 0) or 0)
        return MoEShapes(name=name, hidden=need("hidden_size"),
                         moe_inter=need("moe_intermediate_size"), num_experts=need("num_experts"),
                         top_k=need("num_experts_per_tok"), shared_inter=shared,
                         num_moe_layers=max(1, len(moe_layers)))
    if mtype == "mixtral":
        return MoEShapes(name=name, hidden=need("hidden_size"), moe_inter=need("intermediate_size"),
                         num_experts=need("num_local_experts"), top_k=need("num_experts_per_tok"),
                         num_moe_layers=layers)
    if mtype == "olmoe":
        return MoEShapes(name=name, hidden=need("hidden_size"), moe_inter=need("intermediate_size"),
                         num_experts=need("num_experts"), top_k=need("num_experts_per_tok"),
                         num_moe_layers=layers)
    if mtype == "deepseek_v2":
        inter = need("moe_intermediate_size")
        shared = int(cfg.get("n_shared_experts", 0) or 0) * inter
        first_dense = int(cfg.get("first_k_dense_replace", 0) or 0)
        return MoEShapes(name=name, hidden=need("hidden_size"), moe_inter=inter,
                         num_experts=need("n_routed_experts"), top_k=need("num_experts_per_tok"),
                         shared_inter=shared, num_moe_layers=max(1, layers - first_dense))
    raise ValueError(f"config {name}: model_type {mtype!r} is not supported; expected one of "
                     "qwen2_moe, qwen3_moe, mixtral, olmoe, deepseek_v2")


def load_shapes(spec: str) -> MoEShapes:
    """``spec`` is a preset name, a ``config.json`` path, or a folder holding one."""
    key = spec.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    path = Path(spec)
    if path.is_dir():
        candidates = [path / "config.json", path / "model_config.json"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"{path}: no config.json in this folder")
        path = found[0]
    elif not path.is_file():
        raise FileNotFoundError(
            f"--shapes {spec!r}: neither a file, a folder nor a preset ({', '.join(PRESETS)})")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    # A saved mxmoe-jax config may wrap the HF fields; accept {"hf_config": {...}} too.
    if "model_type" not in cfg and isinstance(cfg.get("hf_config"), dict):
        cfg = cfg["hf_config"]
    return shapes_from_hf_config(cfg, name=str(spec))
