"""From trace.json + loss.json + perf.json to the MILP's units (what `mxmoe-jax solve` optimises).

Per MoE layer and expert (routed ``0..E-1``, then the shared expert ``E`` if the model has one):

* tokens per expert at ``--batch`` tokens: ``m_e = access_freq_e / num_tokens * batch`` (a routed
  expert sees ``batch * topk`` tokens in all); the shared expert sees every token, ``m = batch``;
* block groups: ``gate_up`` (gate and up share their input, their activation quantization and one
  GEMM ``[m, hidden] x [hidden, 2 * inter]``, so they share a scheme: loss ``Δ_gate + Δ_up``) and
  ``down`` (``[m, inter] x [inter, hidden]``); the shared expert's ``inter`` is
  ``num_shared_experts * NK[0]`` (its true size);
* time: the expert's share of its GEMM's launch, ``PerfModel.share_us`` (the perf table's best
  tile, less one launch, over the experts the point was measured with); the mixed layer is one
  launch per GEMM kind, paid once per layer as ``t0``; the layer time is then
  ``perf.predict.layer_us``;
* storage: ``QScheme.bits_per_weight(k)`` (scales and offsets included) x the block's weights;
* activation bits: 16 for weight-only schemes, ``a_bits + 16 / group_size`` (one 16-bit scale per
  group; per token: ``16 / k``) otherwise, averaged over weights like the weight bits.

Each candidate stands, in a block with K input features, for ``QScheme.for_k(K)``: where its group
size does not divide K it is offered with the substituted group size (w4a16_g128_asym is
w4a16_g96_asym on K = 192), with that scheme's bits and its perf.json entry, as calibrate measured
its Δ under the candidate's name and `Allocation` quantizes it. The qconfig names the candidate.
A scheme whose loss entry is null (loss.json from before the substitution) is not offered for that
block group (and, with expert granularity, for that expert); a scheme missing from loss.json or
perf.json altogether is an error that lists what is missing.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from mxmoe_jax.alloc.milp import Units
from mxmoe_jax.jsonio import LOSS_FORMAT, SENSITIVITY_FORMAT, TRACE_FORMAT, read_json
from mxmoe_jax.perf.model import PerfModel
from mxmoe_jax.quant.scheme import QScheme

GROUPS = ("gate_up", "down")
GRANULARITIES = ("linear", "expert")
# The loss each unit contributes: "squared" sums Δ² (the squared layer-output errors of blocks that
# perturb independently add, so Σ Δ² is the layer's expected squared error); "frobenius" sums Δ
# as the original MxMoE does. `bench/proxy_study.py` measures which predicts perplexity.
PROXIES = ("squared", "frobenius")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LayerData:
    """One MoE layer's costs; axis ``e`` = experts (shared last), ``s`` = schemes."""

    layer: str  # layer index as written in trace/loss ("3")
    experts: list[str]  # expert keys, "0".."E-1" routed, then "E" if shared
    tokens: np.ndarray  # [e] tokens per expert at --batch
    inter: np.ndarray  # [e] intermediate size of each expert
    loss: np.ndarray  # [e, 3, s] Δ of gate, up, down (NaN: not offered)
    time: np.ndarray  # [e, 2, s] µs of gate_up and down without the launch (NaN: not offered)
    bpw: np.ndarray  # [e, 2, s] storage bits per weight
    abpw: np.ndarray  # [e, 2, s] activation bits
    size: np.ndarray  # [e, 2] weight elements of gate_up and down
    t0: float  # µs every assignment pays: one launch per GEMM kind


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AllocInputs:
    """Everything `solve` needs, validated."""

    schemes: tuple[str, ...]  # QScheme names, the MILP's scheme axis
    layers: list[LayerData]
    batch: int  # tokens per forward pass the times are for
    hidden: int
    moe_inter: int
    perf: PerfModel
    trace_meta: dict  # trace.json's top-level fields (no per-layer data)
    loss_meta: dict  # loss.json "meta"


def activation_bits(s: QScheme, k: int) -> float:
    """Average stored bits per activation element the GEMM reads (scales included)."""
    if s.a_bits == 16:
        return 16.0
    return s.a_bits + 16.0 / (s.group_size if s.group_size > 0 else k)


def _moe_layers(trace: dict) -> list[str]:
    if "moe_layers" in trace:
        return [str(i) for i in trace["moe_layers"]]
    return sorted((k.split("-", 1)[1] for k in trace if k.startswith("layer-")), key=int)


def _list_missing(items: list[str], limit: int = 8) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def check_trace(trace: dict, where: str = "trace") -> None:
    """The fields `build_inputs` reads, with their types; a ValueError naming the first bad one."""
    nk = trace.get("NK")
    if not (isinstance(nk, list) and len(nk) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in nk)):
        raise ValueError(f"{where}: NK must be [moe_intermediate_size, hidden_size] (two "
                         f"positive integers), got {nk!r}")
    tokens = trace.get("num_tokens")
    if not (_number(tokens) and 0 < tokens < math.inf):
        raise ValueError(f"{where}: num_tokens must be a positive number, got {tokens!r}")
    ratio = trace.get("num_shared_experts", 0) or 0
    if not (_number(ratio) and 0 <= ratio < math.inf):
        raise ValueError(f"{where}: num_shared_experts must be a number >= 0, got {ratio!r}")
    fp = trace.get("model_fingerprint")
    if fp is not None and not isinstance(fp, str):
        raise ValueError(f"{where}: model_fingerprint must be a string, got {fp!r}")
    layers = trace.get("moe_layers", [])
    if not (isinstance(layers, list)
            and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)):
        raise ValueError(f"{where}: moe_layers must be a list of layer indices, got {layers!r}")
    for key, value in trace.items():
        if key.startswith("layer-"):
            freq = value.get("access_freq") if isinstance(value, dict) else None
            if not key[6:].isdigit() or not (
                    isinstance(freq, list) and freq
                    and all(_number(f) and 0 <= f < math.inf for f in freq)):
                raise ValueError(f"{where}: {key}.access_freq must be a non-empty list of "
                                 "token counts >= 0")


def check_loss(loss: dict, where: str = "loss") -> None:
    """The fields `build_inputs` reads, with their types; a ValueError naming the first bad one:
    ``losses[scheme][layer][expert]`` is ``[Δ gate, Δ up, Δ down]`` (numbers or null)."""
    meta = loss.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: meta must be an object, got {type(meta).__name__}")
    fp = meta.get("model_fingerprint")
    if fp is not None and not isinstance(fp, str):
        raise ValueError(f"{where}: meta.model_fingerprint must be a string, got {fp!r}")
    subs = meta.get("group_size_substitutions", [])
    if not isinstance(subs, list) or not all(
            isinstance(d, dict) and isinstance(d.get("scheme"), str)
            and isinstance(d.get("used"), str) and isinstance(d.get("k"), int) and d["k"] > 0
            for d in subs):
        raise ValueError(f"{where}: meta.group_size_substitutions must be a list of "
                         "{scheme, k, used}")
    table = loss.get("losses")
    if not isinstance(table, dict) or not table:
        raise ValueError(f"{where}: no 'losses' table")
    for name, layers in table.items():
        try:
            QScheme.parse(name)
        except ValueError as err:
            raise ValueError(f"{where}: losses: {err}") from None
        if not isinstance(layers, dict):
            raise ValueError(f"{where}: losses.{name} must be an object of layers")
        for layer, experts in layers.items():
            if not isinstance(experts, dict):
                raise ValueError(f"{where}: losses.{name}.{layer} must be an object of experts")
            for e, row in experts.items():
                if not (isinstance(row, list) and all(v is None or _number(v) for v in row)):
                    raise ValueError(f"{where}: losses.{name}.{layer}.{e} must be a list of "
                                     f"[Δ gate, Δ up, Δ down] (numbers or null), got {row!r}")


def build_inputs(trace: dict, loss: dict, perf: PerfModel, *, batch: int,
                 schemes: list[str] | None = None, names: tuple[str, str] = ("trace", "loss")
                 ) -> AllocInputs:
    """Validate the three inputs against each other and compute every unit's costs."""
    tname, lname = names
    if batch <= 0:
        raise ValueError(f"--batch: must be a positive number of tokens, got {batch}")
    if trace.get("format", TRACE_FORMAT) != TRACE_FORMAT:
        raise ValueError(f"{tname}: format {trace.get('format')!r}, expected {TRACE_FORMAT!r}")
    if loss.get("format") != LOSS_FORMAT:
        raise ValueError(f"{lname}: format {loss.get('format')!r}, expected {LOSS_FORMAT!r}")
    for field in ("NK", "num_tokens"):
        if field not in trace:
            raise ValueError(f"{tname}: missing field {field!r}")
    check_trace(trace, tname)
    check_loss(loss, lname)
    moe_inter, hidden = (int(v) for v in trace["NK"])
    num_tokens = float(trace["num_tokens"])
    ratio = float(trace.get("num_shared_experts", 0) or 0)
    shared_inter = round(ratio * moe_inter)
    if ratio and abs(shared_inter - ratio * moe_inter) > 1e-6 * moe_inter:
        raise ValueError(f"{tname}: num_shared_experts {ratio} x NK[0] {moe_inter} is not whole")

    table = loss["losses"]
    for sub in loss.get("meta", {}).get("group_size_substitutions", []):
        used = QScheme.parse(sub["scheme"]).for_k(int(sub["k"])).name
        if used != sub["used"]:  # the Δ is of another scheme than the one quantize would use
            raise ValueError(f"{lname}: measured {sub['scheme']} as {sub['used']} at K={sub['k']}, "
                             f"but it is quantized as {used} there now; recalibrate")
    want = [QScheme.parse(s).name for s in (schemes or table)]
    want = list(dict.fromkeys(want))
    canon = {QScheme.parse(k).name: k for k in table}
    missing = [s for s in want if s not in canon]
    if missing:
        raise ValueError(f"{lname}: no losses for scheme(s) {', '.join(missing)} "
                         f"(it has {', '.join(sorted(canon))}); calibrate them or drop them "
                         "from --schemes")

    fp_t, fp_l = trace.get("model_fingerprint"), loss.get("meta", {}).get("model_fingerprint")
    if fp_t and fp_l and fp_t != fp_l:
        raise ValueError(f"{tname} and {lname} are of different models (model_fingerprint "
                         f"{fp_t} vs {fp_l}); trace and calibrate the same model")
    t_layers = _moe_layers(trace)
    for name in want:  # layers the trace does not have: another model (missing ones: gaps)
        extra = sorted(set(table[canon[name]]) - set(t_layers))
        if extra:
            raise ValueError(f"{lname}: {name} has layers {extra} that {tname} does not (its MoE "
                             f"layers: {t_layers}); they are not of the same model")
    layers, gaps, perf_missing = [], [], set()
    for layer in t_layers:
        key = f"layer-{layer}"
        if key not in trace:
            raise ValueError(f"{tname}: moe_layers lists {layer} but has no {key!r}")
        freq = np.asarray(trace[key]["access_freq"], dtype=float)
        n_routed = len(freq)
        experts = [str(e) for e in range(n_routed)] + ([str(n_routed)] if ratio else [])
        tokens = np.append(freq / num_tokens * batch, [float(batch)] if ratio else [])
        inter = np.array([moe_inter] * n_routed + ([shared_inter] if ratio else []))
        n_e, n_s = len(experts), len(want)
        d = np.full((n_e, 3, n_s), np.nan)
        for j, s in enumerate(want):
            per_layer = table[canon[s]].get(layer)
            if per_layer is None:
                gaps.append(f"{s} layer {layer}")
                continue
            if set(per_layer) - set(experts):
                raise ValueError(f"{lname}: {s} layer {layer} has {len(per_layer)} experts, "
                                 f"{tname} {len(experts)} (routed + shared); they are not of "
                                 "the same model")
            for i, e in enumerate(experts):
                row = per_layer.get(e)
                if row is None or len(row) != 3:
                    gaps.append(f"{s} layer {layer} expert {e}")
                    continue
                d[i, :, j] = [np.nan if v is None else float(v) for v in row]
        if (d[np.isfinite(d)] < 0).any():
            raise ValueError(f"{lname}: negative loss in layer {layer}")
        t = np.full((n_e, 2, n_s), np.nan)
        bpw = np.full((n_e, 2, n_s), np.nan)
        abpw = np.full((n_e, 2, n_s), np.nan)
        size = np.stack([2.0 * inter * hidden, 1.0 * inter * hidden], axis=1)
        for j, s in enumerate(want):
            for i in range(n_e):
                for g, (n, k) in enumerate([(2 * inter[i], hidden), (hidden, inter[i])]):
                    n, k = int(n), int(k)
                    q = QScheme.parse(s).for_k(k)  # what this block is quantized with
                    bpw[i, g, j] = q.bits_per_weight(k)
                    abpw[i, g, j] = activation_bits(q, k)
                    if not perf.has(q, n, k):
                        what = "" if q.name == s else f" (what {s} is at this K)"
                        perf_missing.add(f"{q.name} n={n} k={k}{what}")
                        continue
                    # the expert's share of the layer's one launch (perf.predict)
                    t[i, g, j] = perf.share_us(q, tokens[i], n, k)
        # gate and up share one scheme: the group is offered only where both have a loss
        layers.append(LayerData(layer=layer, experts=experts, tokens=tokens, inter=inter, loss=d,
                                time=t, bpw=bpw, abpw=abpw, size=size, t0=2 * perf.launch_us))
    if gaps:
        raise ValueError(f"{lname}: missing entries: {_list_missing(gaps)}")
    if perf_missing:
        raise ValueError(f"{perf.path or 'perf table'} ({perf.label}) has no entry for "
                         f"{_list_missing(sorted(perf_missing))}; profile these schemes and shapes")
    if not layers:
        raise ValueError(f"{tname}: no MoE layers")
    meta = {k: v for k, v in trace.items() if not k.startswith("layer-")}
    return AllocInputs(schemes=tuple(want), layers=layers, batch=int(batch), hidden=hidden,
                       moe_inter=moe_inter, perf=perf, trace_meta=meta,
                       loss_meta=dict(loss.get("meta", {})))


def load_inputs(trace: str | Path, loss: str | Path, perf: str | Path, *, batch: int,
                schemes: list[str] | None = None) -> AllocInputs:
    return build_inputs(read_json(trace, "trace"), read_json(loss, "loss table"),
                        PerfModel.load(perf), batch=batch, schemes=schemes,
                        names=(str(trace), str(loss)))


def proxy_loss(delta: np.ndarray, proxy: str) -> np.ndarray:
    """Each block's contribution to the objective from its Δ (``PROXIES``)."""
    if proxy == "squared":
        return delta ** 2
    if proxy == "frobenius":
        return delta
    raise ValueError(f"--proxy: {proxy!r} is not one of {PROXIES}")


def load_sensitivity(path) -> dict:
    """A sensitivity.json (``mxmoe-jax sensitivity``, `eval.sensitivity`), format checked and
    ``layers`` checked to map layer indices to ``{"alpha": number, ...}``."""
    sens = read_json(path, "sensitivity.json", SENSITIVITY_FORMAT)
    layers = sens.get("layers")
    if not isinstance(layers, dict) or not all(
            isinstance(li, str) and li.isdigit() and isinstance(m, dict) and _number(m.get("alpha"))
            for li, m in layers.items()):
        raise ValueError(f"{path}: layers must map layer indices to {{\"alpha\": number, ...}}")
    return sens


def layer_weights(sens: dict, layers) -> dict[str, float]:
    """Per-layer proxy weights ``alpha_l / mean(alpha)`` for the layer keys ``layers``; an error
    naming what to do where the file lacks a layer or a weight is not positive."""
    have = sens["layers"]
    missing = [li for li in layers if li not in have]
    if missing:
        raise ValueError(f"--sensitivity: no measurement for layers {missing} (it has "
                         f"{sorted(have, key=int)}); rerun `mxmoe-jax sensitivity` on this model")
    alpha = {li: float(have[li]["alpha"]) for li in layers}
    bad = [li for li, a in alpha.items() if not a > 0]
    if bad:
        raise ValueError(f"--sensitivity: layers {bad} have no positive alpha (quantizing them "
                         "did not raise the NLL); measure with a lower-bit --scheme or more "
                         "--nsamples")
    mean = sum(alpha.values()) / len(alpha)
    return {li: a / mean for li, a in alpha.items()}


def weigh_layers(inputs: AllocInputs, weights: dict[str, float], proxy: str) -> AllocInputs:
    """Inputs whose layer ``l`` proxy is ``weights[l]`` times the original: Δ scaled by
    ``sqrt(w)`` for ``squared``, by ``w`` for ``frobenius`` (the solver then sees w · proxy)."""
    if proxy not in PROXIES:
        raise ValueError(f"--proxy: {proxy!r} is not one of {PROXIES}")
    scale = {li: (math.sqrt(w) if proxy == "squared" else w) for li, w in weights.items()}
    layers = [dataclasses.replace(ld, loss=ld.loss * scale[ld.layer]) for ld in inputs.layers]
    return dataclasses.replace(inputs, layers=layers)


def group_arrays(ld: LayerData, proxy: str = "frobenius") -> dict[str, np.ndarray]:
    """Per (expert, group, scheme) loss/time/bits with gate and up merged; NaN = not offered."""
    d = proxy_loss(ld.loss, proxy)
    loss = np.stack([d[:, 0] + d[:, 1], d[:, 2]], axis=1)  # [e, 2, s]
    ok = np.isfinite(loss) & np.isfinite(ld.time) & np.isfinite(ld.bpw)
    nan = np.full_like(loss, np.nan)
    return dict(loss=np.where(ok, loss, nan), time=np.where(ok, ld.time, nan),
                wbits=np.where(ok, ld.bpw * ld.size[..., None], nan),
                abits=np.where(ok, ld.abpw * ld.size[..., None], nan))


def unit_devices(ld: LayerData, granularity: str, devices: int, *, shared: bool) -> np.ndarray:
    """``[units]`` device of each of ``ld``'s units when its routed experts are placed
    contiguously on ``devices`` (``parallel.Placement.contiguous``); -1 for the shared expert,
    which runs data-parallel on every device."""
    n_routed = len(ld.experts) - int(shared)
    if devices < 1 or n_routed % devices:
        raise ValueError(f"--devices: {devices} does not divide the {n_routed} routed experts of "
                         f"layer {ld.layer}")
    per = n_routed // devices
    dev = np.array([e // per if e < n_routed else -1 for e in range(len(ld.experts))])
    return np.repeat(dev, 2 if granularity == "linear" else 1)


def make_units(layers: list[LayerData], granularity: str = "linear",
               proxy: str = "frobenius", *, devices: int = 1, shared: bool = False) -> Units:
    """The MILP units of these layers: (expert, group) pairs, or whole experts, with the loss
    of ``proxy``.

    ``devices > 1`` (one layer): the routed experts placed contiguously on that many devices
    (`unit_devices`; ``shared``: the last expert is the shared one), T counts the busiest
    device (``Units.device``), and the shared expert's time is divided by ``devices`` (its tokens
    split over them; the perf model's time at 1/N of the tokens would be a little more).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"--granularity: {granularity!r} is not one of {GRANULARITIES}")
    if devices > 1 and len(layers) != 1:
        raise ValueError("--devices: expert-parallel balancing solves one layer per MILP "
                         "(--mode layer)")
    parts = {k: [] for k in ("loss", "time", "wbits", "abits", "size")}
    for ld in layers:
        a = group_arrays(ld, proxy)
        if granularity == "linear":
            for k in ("loss", "time", "wbits", "abits"):
                parts[k].append(a[k].reshape(-1, a[k].shape[-1]))
            parts["size"].append(ld.size.reshape(-1))
        else:  # NaN anywhere in an expert's groups removes the scheme from the expert
            for k in ("loss", "time", "wbits", "abits"):
                parts[k].append(a[k].sum(axis=1))
            parts["size"].append(ld.size.sum(axis=1))
    cat = {k: np.concatenate(v) for k, v in parts.items()}
    device = None
    if devices > 1:
        device = unit_devices(layers[0], granularity, devices, shared=shared)
        cat["time"] = np.where((device < 0)[:, None], cat["time"] / devices, cat["time"])
    return Units(t0=float(sum(ld.t0 for ld in layers)), device=device, **cat)


def decode(layers: list[LayerData], granularity: str, choice: np.ndarray,
           schemes: tuple[str, ...]) -> dict[str, dict[str, dict[str, str]]]:
    """Unit choices back to {layer: {expert: {gate, up, down}}} scheme names."""
    out, pos = {}, 0
    for ld in layers:
        per = {}
        for e in ld.experts:
            if granularity == "linear":
                gu, dn = schemes[choice[pos]], schemes[choice[pos + 1]]
                pos += 2
            else:
                gu = dn = schemes[choice[pos]]
                pos += 1
            per[e] = {"gate": gu, "up": gu, "down": dn}
        out[ld.layer] = per
    if pos != len(choice):
        raise ValueError(f"choice: {len(choice)} entries, expected {pos}")
    return out


def uniform_choice(units: Units, s: int) -> np.ndarray | None:
    """Every unit on scheme ``s``, or None if some unit cannot take it."""
    if not units.available[:, s].all():
        return None
    return np.full(units.loss.shape[0], s)


