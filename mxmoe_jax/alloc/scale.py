"""A small model's measured trace and loss pattern, scaled to a real-sized layer shape.

``run --shapes-of PRESET`` solves the allocation at a preset's shapes (``perf.shapes.PRESETS``:
hidden, intermediate, experts, top-k, shared expert, MoE layers) so that the speed side of the
co-design is visible without a large checkpoint: accuracy comes from the small model, speed from
the preset's shapes. The mapping is plain and stated in the files' ``meta.scaled_from``:

* MoE layer ``l`` of the preset takes the pattern of the small model's MoE layer
  ``floor(l * L_small / L_preset)``;
* routed expert ``e`` takes routed expert ``e mod E_small`` (its Δ row and its share of tokens;
  each layer's token counts are renormalised to ``num_tokens * top_k`` of the preset);
* the preset's shared expert takes the small model's shared expert, or the mean of its routed
  experts where it has none.

Δ values are copied as they are (a preset block's true Δ would scale with its size, which only
rescales the loss term of a layer as a whole).
"""

from __future__ import annotations

import copy

import numpy as np

from mxmoe_jax.perf.shapes import MoEShapes


def _moe_layers(trace: dict) -> list[int]:
    layers = trace.get("moe_layers")
    if not layers:
        raise ValueError("trace: no moe_layers to scale")
    return [int(x) for x in layers]


def scale_trace(trace: dict, shapes: MoEShapes) -> dict:
    """The trace of ``shapes`` with ``trace``'s expert-load pattern (module docstring)."""
    src_layers = _moe_layers(trace)
    n_src = len(src_layers)
    e_new, k_new = shapes.num_experts, shapes.top_k
    num_tokens = float(trace["num_tokens"])
    out = {k: v for k, v in trace.items() if not k.startswith("layer-")}
    out.update(NK=[shapes.moe_inter, shapes.hidden], topk=k_new,
               num_layers=shapes.num_moe_layers, moe_layers=list(range(shapes.num_moe_layers)),
               num_shared_experts=shapes.shared_inter / shapes.moe_inter,
               model_fingerprint=f"preset-{shapes.name}",  # no longer the small model's
               scaled_from=dict(model=trace.get("model"), shapes=shapes.name,
                                rule="layer l <- floor(l * L_small / L_preset); expert e <- "
                                     "e mod E_small; tokens renormalised"))
    for layer in range(shapes.num_moe_layers):
        src = src_layers[layer * n_src // shapes.num_moe_layers]
        freq = np.asarray(trace[f"layer-{src}"]["access_freq"], float)
        f = freq[np.arange(e_new) % len(freq)]
        f = f / max(f.sum(), 1e-30) * num_tokens * k_new
        out[f"layer-{layer}"] = {"access_freq": [float(v) for v in f]}
    return out


def scale_loss(loss: dict, trace: dict, shapes: MoEShapes) -> dict:
    """The loss table of ``shapes`` with ``loss``'s Δ pattern (module docstring)."""
    src_layers = _moe_layers(trace)
    n_src = len(src_layers)
    e_small = len(trace[f"layer-{src_layers[0]}"]["access_freq"])
    has_shared = float(trace.get("num_shared_experts", 0) or 0) > 0
    out = {"format": loss["format"], "meta": copy.deepcopy(loss.get("meta", {})), "losses": {}}
    out["meta"]["scaled_from"] = dict(shapes=shapes.name, rule="see mxmoe_jax.alloc.scale")
    out["meta"]["model_fingerprint"] = f"preset-{shapes.name}"
    for scheme, per_layer in loss["losses"].items():
        new = {}
        for layer in range(shapes.num_moe_layers):
            src = per_layer.get(str(src_layers[layer * n_src // shapes.num_moe_layers]))
            if src is None:
                continue
            rows = {str(e): src.get(str(e % e_small)) for e in range(shapes.num_experts)}
            if shapes.shared_inter:
                shared = src.get(str(e_small)) if has_shared else None
                if shared is None:
                    routed = [src[str(e)] for e in range(e_small) if src.get(str(e)) is not None
                              and None not in src[str(e)]]
                    shared = [float(v) for v in np.mean(routed, axis=0)] if routed else None
                rows[str(shapes.num_experts)] = shared
            new[str(layer)] = rows
        out["losses"][scheme] = new
    return out
