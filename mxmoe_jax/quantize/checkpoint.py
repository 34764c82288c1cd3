"""QMODEL_DIR: a quantized model on disk (the output of ``mxmoe-jax quantize``).

Layout (a MODEL_DIR for everything not quantized, plus the quantized stacks)::

    QMODEL_DIR/
      qmodel.json       {"format": "mxmoe-jax/qmodel/1", "stacks": {"<layer>/<routed|shared|dense>":
                          {"num_experts": n, "gate_up": [{"scheme", "experts", "kind", "k", "n"}],
                           "down": [...]}}, "quantizer": {...}, "rotation": seed | null,
                         "bytes": {...}}
      model.json, config.json, params/..., tokenizer files
                        the MODEL_DIR of the unquantized rest (``models.io``): every parameter
                        except the weights of the quantized stacks
      quantized/<layer>/<stack>/   Orbax checkpoint: per projection and group, the ``PackedWeight``
                        arrays (``qweight``, ``scale``, ``offset``) or, for a w16a16 group, its
                        bf16 weights ``w``; fp8 codes are stored as their uint8 bits
      qconfig.json      the allocation (``alloc.qconfig``)
      rotation.npz      the Hadamard rotation's seed and sign vectors, when rotated (never
                        re-drawn at load time)

Written to a temporary folder renamed into place (``models.io.AtomicDir``); reloading gives
bit-identical packed weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mxmoe_jax.alloc.qconfig import Allocation, make_qconfig
from mxmoe_jax.jsonio import QMODEL_FORMAT as FORMAT
from mxmoe_jax.models import from_flat_params, set_rotation, swiglu_stacks, to_flat_params
from mxmoe_jax.models import io as model_io
from mxmoe_jax.models.moe import ExpertWeights, QuantizedExperts, SchemeGroup
from mxmoe_jax.quant.packing import PackedWeight
from mxmoe_jax.quant.rotation import Rotation, load_rotation, save_rotation
from mxmoe_jax.quant.scheme import W16A16, QScheme
from mxmoe_jax.quantize.apply import replace_stack

MANIFEST = "qmodel.json"
PROJS = ("gate_up", "down")


def is_qmodel_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _stack_key(model, layer: int, idx: int | None) -> str:
    kind = "dense" if not model.layers[layer].is_moe else "routed" if idx is None else "shared"
    return f"{layer}/{kind}"


def _flat_keys_of_stack(model, layer: int, idx: int | None) -> list[str]:
    p = f"layers/{layer}/mlp"
    if not model.layers[layer].is_moe:
        return [f"{p}/{b}_proj/kernel" for b in ("gate", "up", "down")]
    if idx is None:
        return [f"{p}/experts/{b}" for b in ("gate", "up", "down")]
    return [f"{p}/shared/{b}_proj/kernel" for b in ("gate", "up", "down")]


def _group_arrays(g: SchemeGroup) -> tuple[dict, dict]:
    """(arrays to store, manifest entry) of one scheme group."""
    if isinstance(g.w, PackedWeight):
        q = np.asarray(g.w.qweight)
        arrays = {"qweight": q.view(np.uint8) if g.scheme.fp8 else q,
                  "scale": np.asarray(g.w.scale)}
        if g.w.offset is not None:
            arrays["offset"] = np.asarray(g.w.offset)
        entry = {"kind": "packed", "k": g.w.k, "n": g.w.n}
    else:
        arrays = {"w": np.asarray(jnp.asarray(g.w).astype(jnp.bfloat16))}
        entry = {"kind": "bf16", "k": int(g.w.shape[1]), "n": int(g.w.shape[2])}
    entry.update(scheme=g.scheme.name, experts=list(g.experts))
    return arrays, entry


def expert_bytes(allocation: Allocation, model) -> dict:
    """What the allocation's bits predict for the expert weights, and the unquantized rest."""
    predicted = 0.0
    quantized_keys = set()
    for layer, idx, stack in swiglu_stacks(model):
        w = stack.weights()
        _, d, i2 = _shape(w.gate_up[0].w)
        for j in range(w.num_experts):
            e = j if idx is None else idx
            s = allocation.as_dict().get((layer, e, "gate"))
            if s is None:
                continue
            sd = allocation.as_dict().get((layer, e, "down"))
            predicted += d * i2 * s.bits_per_weight(d) / 8
            predicted += (i2 // 2) * d * sd.bits_per_weight(i2 // 2) / 8
            quantized_keys.update(_flat_keys_of_stack(model, layer, idx))
    return {"experts_predicted": predicted, "quantized_keys": sorted(quantized_keys)}


def _shape(w) -> tuple[int, int, int]:
    from mxmoe_jax.ops import weight_shape

    if isinstance(w, tuple):
        e, k, n = weight_shape(w[0])
        return e, k, 2 * n
    return weight_shape(w)


def dir_bytes(path: str | os.PathLike) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def save_qmodel(qmodel, allocation: Allocation, out: str | os.PathLike, *, quantizer: dict,
                rotation: Rotation | None = None, tokenizer_dir=None, force: bool = False,
                fp_model=None, rest_dtype=None) -> dict:
    """Write ``qmodel`` (from ``quantize_model``) to QMODEL_DIR ``out``; returns the manifest.

    ``fp_model``: the FP model it was quantized from (for the predicted expert bytes).
    """
    import orbax.checkpoint as ocp

    cfg = qmodel.cfg
    stacks = {}
    store = {}
    for layer, idx, stack in swiglu_stacks(qmodel):
        if not isinstance(stack, QuantizedExperts):
            continue
        w = stack.weights()
        key = _stack_key(qmodel, layer, idx)
        entry = {"num_experts": w.num_experts}
        arrays = {}
        for proj in PROJS:
            entry[proj] = []
            arrays[proj] = {}
            for gi, g in enumerate(getattr(w, proj)):
                a, meta = _group_arrays(g)
                arrays[proj][str(gi)] = a
                entry[proj].append(meta)
        stacks[key] = entry
        store[key] = arrays
    rest = to_flat_params(qmodel)  # the remaining nnx.Params: everything not quantized
    if rest_dtype is not None:
        rest = {k: v.astype(model_io.np_dtype(rest_dtype)) for k, v in rest.items()}
    with model_io.AtomicDir(out, force=force) as tmp:
        groups: dict[str, dict] = {}
        for k, v in rest.items():
            g, sub = model_io.group_of(k)
            groups.setdefault(g, {})[sub] = np.asarray(v)
        writer = model_io.ModelDirWriter(tmp)
        for g in sorted(groups, key=model_io._group_order):
            writer.write_group(g, groups[g])
        writer.finish(cfg, tokenizer_dir=tokenizer_dir)
        # uncompressed: the bytes on disk are the packed bits (zstd took ~16% off the codes of
        # Gaussian weights, which are not uniform over the grid), and loading skips a decode
        ckpt = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False))
        for key, arrays in store.items():
            with model_io.sigint_deferred():  # Orbax saves in threads: see there
                ckpt.save((tmp / "quantized" / key).absolute(), arrays)
        (tmp / "qconfig.json").write_text(json.dumps(make_qconfig(
            allocation.to_layers(), meta={"quantizer": quantizer}, summary={}), indent=1) + "\n")
        if rotation is not None:
            save_rotation(rotation, tmp / "rotation.npz")
        manifest = {"format": FORMAT, "stacks": stacks, "quantizer": quantizer,
                    "rotation": None if rotation is None else rotation.seed}
        stored = sum(a.nbytes for a in jax.tree.leaves(store))
        sizes = {"total": dir_bytes(tmp), "experts_stored": int(stored),
                 "experts_on_disk": dir_bytes(tmp / "quantized") if store else 0,
                 "rest_on_disk": dir_bytes(tmp / "params")}
        if fp_model is not None:
            pred = expert_bytes(allocation, fp_model)
            rest_bytes = sum(np.asarray(v).nbytes for v in rest.values())
            sizes.update(experts_predicted=int(pred["experts_predicted"]), rest=int(rest_bytes),
                         predicted=int(pred["experts_predicted"] + rest_bytes))
        manifest["bytes"] = sizes
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_qmanifest(path: str | os.PathLike) -> dict:
    p = Path(path) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"{path} is not a QMODEL_DIR: no {MANIFEST}")
    manifest = json.loads(p.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{p}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_qmodel(path: str | os.PathLike, dtype=jnp.float32):
    """``(cfg, model, allocation, rotation | None)`` of a QMODEL_DIR; ``dtype`` is the compute and
    unquantized-parameter dtype (w16a16 groups are cast to it; packed weights load as stored)."""
    import orbax.checkpoint as ocp

    path = Path(path)
    manifest = read_qmanifest(path)
    cfg, flat = model_io.load_flat_params(path, dtype)
    # the quantized stacks' FP keys are absent: fill them with zeros to build the structure,
    # then put the quantized stacks in their place
    shapes = _missing_shapes(cfg, flat)
    flat.update({k: np.zeros(s, np.float32) for k, s in shapes.items()})
    model = from_flat_params(cfg, flat, dtype)
    ckpt = ocp.PyTreeCheckpointer()
    for key, entry in manifest["stacks"].items():
        layer_s, kind = key.split("/")
        layer = int(layer_s)
        arrays = ckpt.restore((path / "quantized" / key).absolute())
        groups = {}
        for proj in PROJS:
            groups[proj] = tuple(_load_group(meta, arrays[proj][str(gi)], dtype)
                                 for gi, meta in enumerate(entry[proj]))
        ew = ExpertWeights(gate_up=groups["gate_up"], down=groups["down"],
                           num_experts=int(entry["num_experts"]))
        idx = None if kind == "routed" else cfg.num_experts if kind == "shared" else 0
        replace_stack(model, layer, idx, QuantizedExperts(ew, dtype=dtype))
    rotation = None
    if (path / "rotation.npz").is_file():
        rotation = load_rotation(path / "rotation.npz")
        if rotation.online_down:
            set_rotation(model, rotation)
    from mxmoe_jax.alloc.qconfig import load_qconfig

    allocation = Allocation.from_qconfig(cfg, load_qconfig(path / "qconfig.json"))
    return cfg, model, allocation, rotation


def _missing_shapes(cfg, flat) -> dict:
    from mxmoe_jax.models import param_shapes

    return {k: s for k, s in param_shapes(cfg).items() if k not in flat}


def _load_group(meta: dict, arrays: dict, dtype) -> SchemeGroup:
    scheme = QScheme.parse(meta["scheme"])
    experts = tuple(int(e) for e in meta["experts"])
    if meta["kind"] == "bf16":
        w = jnp.asarray(arrays["w"]).astype(dtype)
        return SchemeGroup(w=w, experts=experts, scheme=W16A16)
    q = np.asarray(arrays["qweight"])
    if scheme.fp8:
        q = q.view(jnp.float8_e4m3fn)
    off = arrays.get("offset")
    w = PackedWeight(qweight=jnp.asarray(q), scale=jnp.asarray(arrays["scale"]),
                     offset=None if off is None else jnp.asarray(off), scheme=scheme,
                     k=int(meta["k"]), n=int(meta["n"]))
    return SchemeGroup(w=w, experts=experts, scheme=scheme)


def load_any(path: str | os.PathLike, dtype=jnp.float32):
    """``(cfg, model)`` of a MODEL_DIR or a QMODEL_DIR."""
    if is_qmodel_dir(path):
        cfg, model, _, _ = load_qmodel(path, dtype)
        return cfg, model
    return model_io.load_model_dir(path, dtype)


def packed_leaves(model) -> list[np.ndarray]:
    """Every array of the quantized stacks, in a fixed order (for bit-identity checks)."""
    out = []
    for _, _, stack in swiglu_stacks(model):
        if isinstance(stack, QuantizedExperts):
            out.extend(np.asarray(a) for a in jax.tree.leaves(stack.weights()))
    return out
