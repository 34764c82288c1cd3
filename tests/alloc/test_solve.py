"""`solve` end to end on small synthetic trace/loss files (analytic perf table)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

pytest.importorskip("pulp", reason="the solver needs PuLP, which is not installed here")

from mxmoe_jax.alloc.check_uniform import check_against_uniform, perf_for_trace
from mxmoe_jax.alloc.milp import BudgetError
from mxmoe_jax.alloc.problem import build_inputs
from mxmoe_jax.alloc.qconfig import from_original, to_original, validate_qconfig
from mxmoe_jax.alloc.solve import SolveConfig, solve_allocation
from mxmoe_jax.alloc.synthetic import synthetic_loss, synthetic_trace
from mxmoe_jax.cli import main as cli
from mxmoe_jax.perf.model import PerfModel
from mxmoe_jax.quant.scheme import QScheme

SCHEMES = ["w16a16", "w8a8_g-1_sym", "w4a4_g-1_sym", "w4a16_g128_asym", "w4a16_g-1_asym",
           "w2a16_g128_asym"]
HIDDEN, INTER, RATIO = 256, 128, 2.0


@pytest.fixture(scope="module")
def files():
    trace = synthetic_trace(num_layers=2, num_experts=6, top_k=2, moe_inter=INTER, hidden=HIDDEN,
                            shared_ratio=RATIO, num_tokens=512, seed=3)
    loss = synthetic_loss(trace, SCHEMES, seed=3)
    perf = perf_for_trace(trace, SCHEMES)
    return trace, loss, perf


def inputs_of(files, **kw):
    trace, loss, perf = files
    return build_inputs(trace, loss, perf, batch=kw.pop("batch", 256), **kw)


def block_bits(q: dict) -> dict[str, tuple[float, float]]:
    """Per layer: (Σ bits, Σ weights), from the schemes alone (independent of the solver)."""
    out = {}
    for layer, experts in q["layers"].items():
        bits = size = 0.0
        for e, blocks in experts.items():
            inter = INTER * (RATIO if int(e) == len(experts) - 1 else 1)
            for b, (k, n) in {"gate": (HIDDEN, inter), "up": (HIDDEN, inter),
                              "down": (inter, HIDDEN)}.items():
                bits += QScheme.parse(blocks[b]).bits_per_weight(int(k)) * k * n
                size += k * n
        out[layer] = (bits, size)
    return out


@pytest.mark.parametrize("r", [1.0, 0.5])
def test_layer_budget_holds_exactly_and_gate_equals_up(files, r):
    res = solve_allocation(inputs_of(files), SolveConfig(wbits=4.5, r=r, hull=0), progress=False)
    q = validate_qconfig(res.qconfig)
    for bits, size in block_bits(q).values():
        assert bits / size <= 4.5 + 1e-12
    for experts in q["layers"].values():
        assert len(experts) == 7  # 6 routed + the shared expert
        assert all(b["gate"] == b["up"] for b in experts.values())
    assert q["summary"]["wbits"] == pytest.approx(
        sum(b for b, _ in block_bits(q).values()) / sum(s for _, s in block_bits(q).values()))


def test_model_mode_budget_and_expert_granularity(files):
    res = solve_allocation(inputs_of(files), SolveConfig(wbits=4.2, r=0.75, mode="model",
                                                         granularity="expert", hull=0),
                           progress=False)
    per_layer = block_bits(res.qconfig)
    assert sum(b for b, _ in per_layer.values()) / sum(s for _, s in per_layer.values()) \
        <= 4.2 + 1e-12
    for experts in res.qconfig["layers"].values():
        assert all(b["gate"] == b["up"] == b["down"] for b in experts.values())


def test_solver_loss_is_at_most_every_uniform_loss_at_equal_bits(files):
    trace, loss, _ = files
    rows = check_against_uniform(inputs_of(files))
    assert {r["scheme"] for r in rows} == set(SCHEMES)
    for row in rows:
        # the uniform loss, summed straight from loss.json (the default proxy: Σ Δ²)
        uni = sum(sum(d * d for d in v) for per_layer in loss["losses"][row["scheme"]].values()
                  for v in per_layer.values())
        assert row["uniform_L"] == pytest.approx(uni)
        assert row["solver_L"] <= uni * (1 + 1e-9) + 1e-12
        assert row["solver_wbits"] <= row["wbits"] + 1e-8


def test_infeasible_budget_names_the_smallest_feasible_one(files):
    with pytest.raises(BudgetError, match=r"smallest feasible budget is --wbits 2\.25"):
        solve_allocation(inputs_of(files), SolveConfig(wbits=2.0, r=1.0), progress=False)
    res = solve_allocation(inputs_of(files), SolveConfig(wbits=2.25, r=1.0, hull=0),
                           progress=False)
    assert res.totals["wbits"] <= 2.25 + 1e-12


def test_missing_schemes_and_entries_are_named(files):
    trace, loss, perf = files
    with pytest.raises(ValueError, match=r"no losses for scheme\(s\) w3a16_g128_asym"):
        build_inputs(trace, loss, perf, batch=64, schemes=["w4a16_g128_asym", "w3a16_g128_asym"])
    holed = copy.deepcopy(loss)
    del holed["losses"]["w4a4_g-1_sym"]["1"]["6"]
    with pytest.raises(ValueError, match="missing entries: w4a4_g-1_sym layer 1 expert 6"):
        build_inputs(trace, holed, perf, batch=64)
    table = copy.deepcopy(perf.table)
    table["points"] = [p for p in table["points"] if p["scheme"] != "w8a8_g-1_sym"]
    with pytest.raises(ValueError, match=r"has no entry for w8a8_g-1_sym n=256 k=128"):
        build_inputs(trace, loss, PerfModel(table), batch=64)


def test_original_schema_round_trip(files):
    res = solve_allocation(inputs_of(files), SolveConfig(wbits=5.0, r=0.75, hull=0),
                           progress=False)
    orig = to_original(res.qconfig)
    assert set(orig["LT"]) == set(res.qconfig["layers"])
    blk = orig["0"]["experts"]["0"]["down"]
    assert set(blk) == {"w_bits", "w_gsize", "w_sym", "w_clip", "a_bits", "a_gsize", "a_sym",
                        "a_clip"}
    assert from_original(json.loads(json.dumps(orig)))["layers"] == res.qconfig["layers"]


def test_cli_writes_everything_and_reports_bad_input(files, tmp_path, capsys):
    trace, loss, perf = files
    paths = {}
    for name, obj in (("trace", trace), ("loss", loss), ("perf", perf.table)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(obj))
    out = tmp_path / "q.json"
    args = ["solve", "--trace", str(paths["trace"]), "--loss", str(paths["loss"]), "--perf",
            str(paths["perf"]), "--batch", "128", "--out", str(out), "--hull", "3"]
    assert cli(args + ["--wbits", "4.25", "--r", "0.75",
                       "--export-original", str(tmp_path / "orig.json")]) == 0
    text = capsys.readouterr().out
    assert "mixed (solver)" in text and "analytic perf table, H200" in text
    for suffix in (".pareto.csv", ".frontier.png", ".heatmap.png"):
        assert (tmp_path / f"q{suffix}").stat().st_size > 0
    head = (tmp_path / "q.pareto.csv").read_text().splitlines()[0]
    assert head == "layer,kind,tau_us,L,T_us,wbits,abits,objective,chosen"
    assert cli(["solve", "--import-original", str(tmp_path / "orig.json"), "--out",
                str(tmp_path / "back.json")]) == 0
    back = json.loads((tmp_path / "back.json").read_text())
    assert back["layers"] == json.loads(out.read_text())["layers"]
    capsys.readouterr()
    assert cli(args + ["--wbits", "1.5", "--force"]) == 2
    assert "smallest feasible budget is --wbits 2.25" in capsys.readouterr().err


def test_parallel_layers_give_the_same_assignment(files):
    one = solve_allocation(inputs_of(files), SolveConfig(wbits=4.5, r=0.75, hull=0, jobs=1),
                           progress=False)
    two = solve_allocation(inputs_of(files), SolveConfig(wbits=4.5, r=0.75, hull=0, jobs=2),
                           progress=False)
    assert one.qconfig["layers"] == two.qconfig["layers"]


def test_qconfig_records_the_quantizer_of_the_losses(files):
    trace, loss, perf = files
    gptq = copy.deepcopy(loss)
    gptq["meta"].update(method="gptq", hadamard=True, rotation_seed=7, seed=7,
                        text=["data/books-calib.txt"], sampling="sample")
    cfg = SolveConfig(wbits=4.5, r=1.0, hull=0)
    res = solve_allocation(build_inputs(trace, gptq, perf, batch=256), cfg, progress=False)
    tokens = gptq["meta"]["num_tokens"]
    assert res.qconfig["meta"]["quantizer"] == {
        "method": "gptq", "hadamard": True, "seed": 7,
        "calibration": {"text": ["data/books-calib.txt"], "text_names": ["books-calib.txt"],
                        "windows": tokens // gptq["meta"]["seqlen"],
                        "seqlen": gptq["meta"]["seqlen"], "sampling": "sample"}}
    # a loss.json that does not say how it was measured: nothing recorded, nothing checked later
    bare = copy.deepcopy(loss)
    bare["meta"] = {}
    res = solve_allocation(build_inputs(trace, bare, perf, batch=256), cfg, progress=False)
    assert res.qconfig["meta"]["quantizer"] is None


@pytest.mark.parametrize("proxy", ["squared", "frobenius"])
def test_proxy_sets_what_the_solver_minimises(files, proxy):
    """L is Σ Δ² or Σ Δ of the chosen blocks, summed straight from loss.json."""
    _, loss, _ = files
    res = solve_allocation(inputs_of(files), SolveConfig(wbits=4.5, r=1.0, proxy=proxy, hull=0),
                           progress=False)
    f = (lambda d: d * d) if proxy == "squared" else (lambda d: d)
    want = sum(f(loss["losses"][schemes[b]][layer][e][i])
               for layer, experts in res.qconfig["layers"].items()
               for e, schemes in experts.items()
               for i, b in enumerate(("gate", "up", "down")))
    assert res.totals["L"] == pytest.approx(want)
    assert res.qconfig["meta"]["proxy"] == proxy


def test_unknown_proxy_is_refused():
    with pytest.raises(ValueError, match="proxy"):
        SolveConfig(wbits=4.0, proxy="l1")


def test_sensitivity_weights_move_bits_to_the_weighted_layer(files, tmp_path):
    """Model mode: a layer weighted up by --sensitivity gets at least the bits it had; the weights
    are recorded in the qconfig's meta; a file that lacks a layer is a one-line error."""
    trace, loss, perf = files
    paths = {}
    for name, obj in (("trace", trace), ("loss", loss), ("perf", perf.table)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(obj))
    layers = sorted(loss["losses"][next(iter(loss["losses"]))], key=int)
    heavy = layers[0]
    sens = {"format": "mxmoe-jax/sensitivity/1", "meta": {},
            "layers": {li: {"alpha": 50.0 if li == heavy else 1.0} for li in layers}}
    (tmp_path / "sens.json").write_text(json.dumps(sens))
    base = ["solve", "--trace", str(paths["trace"]), "--loss", str(paths["loss"]), "--perf",
            str(paths["perf"]), "--batch", "128", "--wbits", "3.5", "--r", "1", "--mode", "model",
            "--hull", "0", "--no-plots"]
    assert cli([*base, "--out", str(tmp_path / "plain.json")]) == 0
    assert cli([*base, "--sensitivity", str(tmp_path / "sens.json"),
                "--out", str(tmp_path / "weighted.json")]) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())
    weighted = json.loads((tmp_path / "weighted.json").read_text())
    w = weighted["meta"]["layer_weights"]
    assert w[heavy] == pytest.approx(50 * len(layers) / (49 + len(layers)))

    def layer_bits(q, li):
        return sum(QScheme.parse(s).w_bits for blocks in q["layers"][li].values()
                   for s in blocks.values())

    assert layer_bits(weighted, heavy) > layer_bits(plain, heavy)
    del sens["layers"][layers[-1]]
    (tmp_path / "short.json").write_text(json.dumps(sens))
    assert cli([*base, "--sensitivity", str(tmp_path / "short.json"),
                "--out", str(tmp_path / "bad.json")]) == 2
    assert not (tmp_path / "bad.json").exists()


def test_solver_time_is_the_predicted_layer_time(files):
    """The MILP's time of an allocation (Σ per-expert times + t0) is `perf.predict.layer_us`."""
    from mxmoe_jax.perf.predict import layer_us
    from mxmoe_jax.perf.shapes import MoEShapes

    inputs = inputs_of(files, schemes=["w16a16", "w8a8_g-1_sym", "w4a16_g128_asym"])
    rng = np.random.default_rng(0)
    for ld in inputs.layers:
        e = len(ld.experts) - 1  # the shared expert is last
        pick = rng.integers(0, len(inputs.schemes), size=(e + 1, 2))
        milp = ld.t0 + sum(ld.time[x, g, pick[x, g]] for x in range(e + 1) for g in range(2))
        names = [[inputs.schemes[pick[x, g]] for x in range(e + 1)] for g in range(2)]
        shape = MoEShapes(name="t", hidden=HIDDEN, moe_inter=INTER, num_experts=e, top_k=2,
                          shared_inter=int(INTER * RATIO))
        want = layer_us(inputs.perf, shape, names[0][:e], names[1][:e], ld.tokens[:e],
                        shared=(names[0][e], names[1][e]), tokens=ld.tokens[e])
        assert np.isfinite(milp) and milp == pytest.approx(want, rel=1e-12)


def test_cli_warns_on_a_measured_table_from_other_kernels(files, tmp_path, capsys):
    trace, loss, perf = files
    stale = dict(perf.table, source="measured", device="NVIDIA H200",
                 kernel_version="pallas-000000000000")
    paths = {}
    for name, obj in (("trace", trace), ("loss", loss), ("perf", stale)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(obj))
    out = tmp_path / "q.json"
    args = ["solve", "--trace", str(paths["trace"]), "--loss", str(paths["loss"]), "--perf",
            str(paths["perf"]), "--batch", "128", "--wbits", "4.25", "--out", str(out),
            "--no-plots", "--hull", "2"]
    assert cli(args + ["--strict"]) == 2
    err = capsys.readouterr().err
    assert "kernels 'pallas-000000000000'" in err and "--strict" in err and not out.exists()
    assert cli(args) == 0
    err = capsys.readouterr().err
    assert "solve: warning:" in err and "re-run `mxmoe-jax profile`" in err and out.exists()
