"""qconfig.json: the per-block scheme assignment `solve` writes and the layer / `quantize` read.

Our schema (``mxmoe-jax/qconfig/1``)::

    {"format": "mxmoe-jax/qconfig/1",
     "meta": {"wbits": 4.25, "abits": null, "batch": 512, "r": 0.75, "mode": "layer",
              "granularity": "linear", "schemes": [...], "trace": "...", "loss": "...",
              "perf": {"path": "...", "source": "analytic", "device": "H200"}, "solver": "highs",
              "quantizer": {"method": "gptq", "hadamard": false, "seed": 42,
                            "calibration": {"text": ["data/c.txt"], "text_names": ["c.txt"],
                                            "windows": 128, "seqlen": 4096, "sampling": "sample"}},
              "created": "<iso date>"},
     "layers": {"<layer index>": {"<expert index>": {"gate": "w4a16_g128_asym",
                                                      "up": "w4a16_g128_asym",
                                                      "down": "w8a8_g-1_sym"}, ...}, ...},
     "summary": {"wbits": avg weight bits, "abits": avg activation bits, "L": total loss,
                 "T_us": predicted time, "layers": {"<layer>": {"L":.., "T_us":.., "wbits":..}},
                 "uniform": {"<scheme>": {"L":.., "T_us":.., "wbits":.., "abits":..} | null}}}

Layer and expert keys are the indices of trace.json / loss.json (expert ``E`` = the shared expert);
scheme names are `QScheme` names; gate and up always carry the same scheme. ``summary`` and ``meta``
are informational: readers need only ``layers``. The one exception is ``meta.quantizer``
(`quantizer_record`): the quantizer the losses were measured with, copied from loss.json by
`solve`; `quantize` and `eval` refuse another (`quantizer_mismatch`). ``calibration`` is present
for GPTQ only; a field it could not learn is null (unknown, not checked); a qconfig without
``quantizer`` (older, imported, hand-written) is not checked at all.

The original MxMoE's schema (its bits_solver output) is written by `to_original` and read by
`from_original`: ``{"<layer>": {"experts": {"<e>": {"gate": {"w_bits", "w_gsize", "w_sym",
"w_clip", "a_bits", "a_gsize", "a_sym", "a_clip"}, "up": ..., "down": ...}}}, "LT": {"<layer>":
[L, T]}}`` (a_gsize and a_sym copy the weight's; clips are [1.0, 1.0]). FP8 schemes have no
representation there and are refused.
"""

from __future__ import annotations

from pathlib import Path

from mxmoe_jax.config import BLOCKS
from mxmoe_jax.jsonio import QCONFIG_FORMAT as FORMAT
from mxmoe_jax.quant.scheme import QScheme, for_block


def quantizer_record(loss_meta: dict) -> dict | None:
    """``meta.quantizer`` of a qconfig solved from a loss.json with this ``meta``; None when the
    loss.json does not say which quantizer it measured (hand-made: nothing to check against)."""
    method = loss_meta.get("method")
    if method not in ("rtn", "gptq"):
        return None
    hadamard = loss_meta.get("hadamard")
    # calibrate seeds both the window sampling and the rotation signs with its --seed
    seed = loss_meta.get("rotation_seed", loss_meta.get("seed"))
    rec = {"method": method, "hadamard": hadamard if isinstance(hadamard, bool) else None,
           "seed": seed if isinstance(seed, int) else None}
    if method == "gptq":
        text = loss_meta.get("text")
        text = [str(t) for t in text] if isinstance(text, list) else None
        seqlen, tokens = loss_meta.get("seqlen"), loss_meta.get("num_tokens")
        known = isinstance(seqlen, int) and isinstance(tokens, int) and seqlen > 0
        rec["calibration"] = {"text": text,
                              "text_names": [Path(t).name for t in text] if text else None,
                              "windows": tokens // seqlen if known else None,
                              "seqlen": seqlen if known else None,
                              "sampling": loss_meta.get("sampling")}
    return rec


def quantizer_mismatch(q: dict, *, method: str, hadamard: bool, calib: list[str],
                       calib_windows: int, seqlen: int, seed: int, allowed: bool = False,
                       where: str = "qconfig") -> tuple[str | None, list[str]]:
    """``(error, warnings)`` of quantizing ``q`` with this quantizer, against ``meta.quantizer``.

    ``error``: one line, when the method or the rotation differs from the recorded one (the
    allocation's losses describe another quantizer); None when they agree, nothing is recorded,
    or ``allowed`` (``--allow-quantizer-mismatch``: the error becomes the first warning).
    ``warnings``: GPTQ calibration text, windows, seqlen, sampling or seed (rotation seed with
    Hadamard) that differ from the recorded ones: other numbers, the same quantizer.
    """
    rec = (q.get("meta") or {}).get("quantizer")
    if not isinstance(rec, dict) or rec.get("method") not in ("rtn", "gptq"):
        return None, []
    warnings = []
    r_method, r_had = rec["method"], rec.get("hadamard")
    method_diff = r_method != method
    had_diff = isinstance(r_had, bool) and r_had != hadamard
    if method_diff or had_diff:
        solved = f"{r_method.upper()} losses"
        flags = f"--method {r_method}"
        if had_diff:
            solved += " of the Hadamard-rotated model" if r_had else " of the unrotated model"
            flags += " --hadamard" if r_had else ", no --hadamard"
        give = []
        if method_diff:
            give.append("--method gptq --calib FILE" if r_method == "gptq" else "--method rtn")
        if had_diff and r_had:
            give.append("--hadamard")
        fix = [f"pass {' '.join(give)}"] if give else []
        if had_diff and not r_had:
            fix.append("drop --hadamard")
        run = method.upper()
        if had_diff:
            run += " with --hadamard" if hadamard else " without --hadamard"
        head = f"{where} was solved from {solved} (calibrate {flags})"
        if not allowed:
            return (f"{head}; {' and '.join(fix)}, or pass --allow-quantizer-mismatch to run "
                    f"{run} anyway"), []
        warnings.append(f"{head}, but runs {run} (--allow-quantizer-mismatch): the allocation "
                        "was optimised for another quantizer")
    if method_diff:
        return None, warnings  # other calibration numbers mean nothing for another method
    diffs = []
    cal = rec.get("calibration") if method == "gptq" else None
    if isinstance(cal, dict):
        names = [Path(c).name for c in calib]
        if cal.get("text_names") is not None and cal["text_names"] != names:
            diffs.append(f"text {' '.join(names)} (recorded {' '.join(cal['text_names'])})")
        for name, have in (("windows", calib_windows), ("seqlen", seqlen)):
            if cal.get(name) is not None and cal[name] != have:
                diffs.append(f"{name} {have} (recorded {cal[name]})")
        if cal.get("sampling") not in (None, "sample"):
            # quantize and eval draw GPTQ windows at seeded random offsets only
            diffs.append(f"random windows (recorded sampling {cal['sampling']!r})")
    if (method == "gptq" or (hadamard and r_had)) and rec.get("seed") not in (None, seed):
        diffs.append(f"seed {seed} (recorded {rec['seed']})")
    if diffs:
        what = "GPTQ calibration" if method == "gptq" else "Hadamard rotation"
        warnings.append(f"{where}: this run's {what} differs from the one its losses were "
                        f"measured with: {', '.join(diffs)}")
    return None, warnings


def make_qconfig(layers: dict, *, meta: dict, summary: dict) -> dict:
    return {"format": FORMAT, "meta": meta, "layers": layers, "summary": summary}


def validate_qconfig(q: dict, where: str = "qconfig") -> dict:
    """Check the schema; returns ``q``. Raises ValueError naming the first problem."""
    if q.get("format") != FORMAT:
        raise ValueError(f"{where}: format {q.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(q.get("meta", {}), dict):
        raise ValueError(f"{where}: 'meta' must be an object")
    layers = q.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise ValueError(f"{where}: 'layers' must be a non-empty object")
    for layer, experts in layers.items():
        if not layer.isdigit() or not isinstance(experts, dict):
            raise ValueError(f"{where}: layers.{layer} must be a layer index holding an object of "
                             "experts")
        for e, blocks in experts.items():
            if not e.isdigit() or not isinstance(blocks, dict) or set(blocks) != set(BLOCKS):
                raise ValueError(f"{where}: layer {layer} expert {e} needs exactly {BLOCKS}")
            for b in BLOCKS:
                try:
                    QScheme.parse(blocks[b])
                except ValueError as err:
                    raise ValueError(f"{where}: layer {layer} expert {e} {b}: {err}") from None
            if QScheme.parse(blocks["gate"]) != QScheme.parse(blocks["up"]):
                raise ValueError(f"{where}: layer {layer} expert {e}: gate and up must share a "
                                 "scheme (they run as one GEMM)")
    return q


def load_qconfig(path: str | Path) -> dict:
    """Read and validate a qconfig.json."""
    from mxmoe_jax.jsonio import read_json

    return validate_qconfig(read_json(path, "qconfig"), str(path))


def _scheme_to_original(name: str) -> dict:
    s = QScheme.parse(name)
    if s.fp8:
        raise ValueError(f"{name}: the original schema has no FP8 format; cannot export")
    return {"w_bits": s.w_bits, "w_gsize": s.group_size, "w_sym": s.sym, "w_clip": [1.0, 1.0],
            "a_bits": s.a_bits, "a_gsize": s.group_size, "a_sym": s.sym, "a_clip": [1.0, 1.0]}


def _scheme_from_original(d: dict, where: str) -> str:
    try:
        w, a, g, sym = int(d["w_bits"]), int(d["a_bits"]), int(d["w_gsize"]), bool(d["w_sym"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: expected w_bits, a_bits, w_gsize, w_sym ({err})") from None
    if w >= 16:
        return "w16a16"
    try:
        return QScheme(w_bits=w, a_bits=a, group_size=g, sym=sym).name
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def to_original(q: dict) -> dict:
    """Our qconfig in the original MxMoE bits_solver schema."""
    out = {}
    for layer, experts in q["layers"].items():
        out[layer] = {"experts": {e: {b: _scheme_to_original(blocks[b]) for b in BLOCKS}
                                  for e, blocks in experts.items()}}
    per_layer = q.get("summary", {}).get("layers", {})
    out["LT"] = {layer: [v["L"], v["T_us"]] for layer, v in per_layer.items()}
    return out


def from_original(orig: dict, *, source: str = "original") -> dict:
    """An original MxMoE qconfig as ours (meta records the source; no summary)."""
    layers = {}
    for layer, body in orig.items():
        if layer == "LT":
            continue
        if not isinstance(body, dict) or "experts" not in body:
            raise ValueError(f"{source}: layer {layer!r} has no 'experts'")
        layers[str(layer)] = {
            str(e): {b: _scheme_from_original(blocks[b], f"{source} layer {layer} expert {e} {b}")
                     for b in BLOCKS}
            for e, blocks in body["experts"].items()}
    q = make_qconfig(layers, meta={"imported_from": source, "schema": "MxMoE bits_solver"},
                     summary={})
    # the original does not force gate == up in its expert-granularity files: say so clearly
    return validate_qconfig(q, source)


# ------------------------------------------------------------------------------ Allocation

def _stack_widths(cfg, layer: int, expert: int) -> tuple[int, int] | None:
    """``(K of gate/up, K of down)`` of expert ``expert`` of ``layer``, or None if it has none."""
    d = cfg.hidden_size
    if not cfg.is_moe_layer(layer):
        return (d, cfg.intermediate_size) if expert == 0 else None
    if 0 <= expert < cfg.num_experts:
        return (d, cfg.moe_intermediate_size)
    if expert == cfg.num_experts and cfg.shared_intermediate_size > 0:
        return (d, cfg.shared_intermediate_size)
    return None


def _block_label(cfg, layer: int, expert: int, block: str) -> str:
    """How a block is named in the group-size note (``down_proj``, ``shared gate_proj/up_proj``;
    gate and up share K, and the note is given once per K)."""
    name = "down_proj" if block == "down" else "gate_proj/up_proj"
    if not cfg.is_moe_layer(layer):
        return f"dense {name}"
    return f"shared {name}" if expert == cfg.num_experts else name


class Allocation:
    """The scheme of each quantized expert block: ``(layer, expert, block) -> QScheme``.

    The one in-memory form of an allocation (qconfig.json is its file form: `from_qconfig`,
    `to_layers`). Experts are numbered as in MxMoE: routed ``0..E-1``, the shared expert ``E``; a
    dense layer's MLP is expert 0. Blocks absent stay unquantized. Checked against the model on
    construction: layers and experts exist and gate and up share a scheme (they run as one GEMM).
    Each block holds the scheme it is quantized with: ``QScheme.for_k(K)`` of the one asked for, so
    a qconfig (or ``--scheme``) naming w4a16_g128_asym for a down_proj with K = 192 gives
    w4a16_g96_asym there (noted once on stderr), and `to_layers` (the QMODEL's qconfig.json)
    names what was stored. Hashable (a static argument of jit).
    """

    __slots__ = ("items",)

    def __init__(self, cfg, mapping, *, where: str = "allocation"):
        items = []
        per_expert: dict[tuple[int, int], dict[str, QScheme]] = {}
        for key, s in mapping.items():
            layer, expert, block = key
            layer, expert = int(layer), int(expert)
            if block not in BLOCKS:
                raise ValueError(f"{where}: block {block!r} is not one of {BLOCKS}")
            if not 0 <= layer < cfg.num_layers:
                raise ValueError(f"{where}: layer {layer} is not a layer of this model (it has "
                                 f"layers 0..{cfg.num_layers - 1})")
            widths = _stack_widths(cfg, layer, expert)
            if widths is None:
                top = (cfg.num_experts + (cfg.shared_intermediate_size > 0)
                       if cfg.is_moe_layer(layer) else 1)
                raise ValueError(f"{where}: layer {layer} has no expert {expert} (experts "
                                 f"0..{top - 1})")
            try:
                scheme = QScheme.parse(s)
            except ValueError as err:
                raise ValueError(f"{where}: layer {layer} expert {expert} {block}: {err}") from None
            k = widths[1] if block == "down" else widths[0]
            scheme = for_block(scheme, k, _block_label(cfg, layer, expert, block))
            per_expert.setdefault((layer, expert), {})[block] = scheme
            items.append(((layer, expert, block), scheme))
        for (layer, expert), blocks in per_expert.items():
            if blocks.get("gate") != blocks.get("up"):
                raise ValueError(f"{where}: layer {layer} expert {expert}: gate and up must share "
                                 "a scheme (they run as one GEMM)")
        self.items = tuple(sorted(items, key=lambda kv: kv[0]))

    @classmethod
    def from_qconfig(cls, cfg, q: dict, where: str = "qconfig") -> Allocation:
        """The allocation of a qconfig.json dict, checked against the model ``cfg`` (and its
        ``meta.model_fingerprint``, when the qconfig records one)."""
        validate_qconfig(q, where)
        fp = (q.get("meta") or {}).get("model_fingerprint")
        if fp and fp != cfg.fingerprint():
            raise ValueError(f"{where}: made for model {fp}, this model is {cfg.fingerprint()} "
                             "(solve it from this model's trace and loss)")
        return cls(cfg, {(int(li), int(e), b): s for li, experts in q["layers"].items()
                         for e, blocks in experts.items() for b, s in blocks.items()},
                   where=where)

    @classmethod
    def uniform(cls, cfg, scheme, *, shared: bool = True, dense: bool = False) -> Allocation:
        """Every routed expert block of every MoE layer (and the shared expert / dense MLPs)."""
        m = {}
        for layer in range(cfg.num_layers):
            if cfg.is_moe_layer(layer):
                experts = list(range(cfg.num_experts))
                if shared and cfg.shared_intermediate_size > 0:
                    experts.append(cfg.num_experts)
            else:
                experts = [0] if dense else []
            for e in experts:
                for b in BLOCKS:
                    m[(layer, e, b)] = scheme
        return cls(cfg, m, where=f"scheme {QScheme.parse(scheme).name}")

    def as_dict(self) -> dict[tuple[int, int, str], QScheme]:
        return dict(self.items)

    def layer(self, i: int) -> dict[tuple[int, str], QScheme]:
        """``(expert, block) -> scheme`` of layer ``i``."""
        return {(e, b): s for (li, e, b), s in self.items if li == i}

    def to_layers(self) -> dict:
        """The ``layers`` object of qconfig.json."""
        out: dict = {}
        for (li, e, b), s in self.items:
            out.setdefault(str(li), {}).setdefault(str(e), {})[b] = s.name
        return out

    def __eq__(self, other) -> bool:
        return isinstance(other, Allocation) and self.items == other.items

    def __hash__(self) -> int:
        return hash(self.items)

    def __len__(self) -> int:
        return len(self.items)
