"""QuaRot-style Hadamard rotation of a model's flat params (function-preserving).

MxMoE's ``gptq-had`` / ``rtn-had`` methods rotate the model before quantizing: outliers of the
residual stream and of the down_proj inputs are spread over all channels, so per-token 4-bit
activations lose far less (paper §5, the W5A5 / W4A4 results). Steps, on flat params
(``mxmoe_jax.models.to_flat_params`` keys; linear kernels ``[in, out]``), in float64:

1. Fuse every RMSNorm weight over the residual stream into the linears that read its output
   (``input_norm`` -> q/k/v, MLA q_proj or q_a_proj and kv_a_proj; ``post_attn_norm`` -> router,
   expert gate/up, shared gate/up, shared_gate, dense gate/up; ``final_norm`` -> lm_head) and set
   the norm weights to 1. A weightless RMSNorm commutes with an orthogonal ``Q``: the mean of
   squares over the D channels is rotation invariant. No embedding mean-centering (that is for
   LayerNorm; QuaRot's inherited step is not function preserving for RMSNorm models).
2. Rotate the residual stream by ``Q = diag(s) H_D / sqrt(D)``: embedding rows ``E Q``; readers
   ``W <- Q^T W``; writers (o_proj, every down_proj) ``W <- W Q`` (and their biases ``b Q``).
   A tied LM head becomes an explicit ``lm_head`` (``Q^T diag(g) E^T``) and the config untied:
   the embedding and the head need different matrices once the final norm is fused.
3. ``online_down``: every down_proj input (routed experts, shared expert, dense MLP) is rotated by
   ``Q_I`` at run time and the weight pre-multiplied, ``W_down <- Q_I^T W_down``. MxMoE's release
   disables this (it failed for DS2-Lite's 1408 = 11 * 128); we build every size (``hadamard``).
   The model applies the online part itself once ``models.set_rotation`` gave its SwiGLU stacks
   the signs (``quantize.rotation.rotate_model`` does both).

Attention internals (q/k norms, MLA's kv_b_proj, q_b_proj and their norms) are not touched.
The seed and every sign vector are returned (``Rotation``) and saved with the weights
(``save_rotation``); they are never re-drawn at load time.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from mxmoe_jax.quant import hadamard

# parameter names (the part after "layers/{i}/") by role
_ATTN_READERS = ("attn/q_proj/kernel", "attn/k_proj/kernel", "attn/v_proj/kernel",
                 "attn/q_a_proj/kernel", "attn/kv_a_proj/kernel")
_MLP_READERS = ("mlp/router/kernel", "mlp/gate_proj/kernel", "mlp/up_proj/kernel",
                "mlp/shared/gate_proj/kernel", "mlp/shared/up_proj/kernel",
                "mlp/shared_gate/kernel", "mlp/experts/gate", "mlp/experts/up")
_WRITERS = ("attn/o_proj/kernel", "mlp/down_proj/kernel", "mlp/shared/down_proj/kernel",
            "mlp/experts/down")
_WRITER_BIASES = ("attn/o_proj/bias",)
_NORMS = ("input_norm/scale", "post_attn_norm/scale")
_UNTOUCHED = re.compile(
    r"attn/(q_proj|k_proj|v_proj)/bias|attn/(q_norm|k_norm|q_a_norm|kv_a_norm)/scale|"
    r"attn/(q_b_proj|kv_b_proj)/kernel")
_DOWN = {"mlp/experts/down": "moe", "mlp/shared/down_proj/kernel": "shared",
         "mlp/down_proj/kernel": "dense"}


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class Rotation:
    """The random-sign Hadamard rotations applied to a model (saved beside its weights).

    ``residual`` [D] are the signs of ``Q = diag(s) H_D / sqrt(D)``; ``down`` maps an intermediate
    width I to the signs of the online rotation of down_proj inputs of that width (empty when
    ``online_down`` is off).
    """

    seed: int  # the seed every sign vector was drawn from
    residual: np.ndarray  # [D] +-1 signs of the residual-stream rotation
    down: dict[int, np.ndarray]  # I -> [I] +-1 signs of the online down_proj input rotation

    @property
    def online_down(self) -> bool:
        return bool(self.down)

    def down_signs(self, width: int) -> np.ndarray | None:
        return self.down.get(width)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {"seed": np.asarray(self.seed, np.int64), "residual": self.residual}
        out.update({f"down_{i}": s for i, s in self.down.items()})
        return out

    @classmethod
    def from_arrays(cls, arrays) -> Rotation:
        down = {int(k[5:]): np.asarray(v, np.float64) for k, v in arrays.items()
                if k.startswith("down_")}
        return cls(seed=int(arrays["seed"]), residual=np.asarray(arrays["residual"], np.float64),
                   down=down)


def save_rotation(rot: Rotation, path: str | os.PathLike) -> Path:
    """Write ``rot`` to ``path`` (.npz) through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **rot.to_arrays())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_rotation(path: str | os.PathLike) -> Rotation:
    if not Path(path).exists():
        raise FileNotFoundError(f"rotation file {path} does not exist")
    with np.load(path) as z:
        return Rotation.from_arrays({k: z[k] for k in z.files})


def make_rotation(cfg, seed: int = 0, *, online_down: bool = True) -> Rotation:
    """Draw the sign vectors for ``cfg`` (checks every needed Hadamard order exists)."""
    d = cfg.hidden_size
    hadamard.factor(d)
    widths = set()
    if online_down:
        for i in range(cfg.num_layers):
            if cfg.is_moe_layer(i):
                widths.add(cfg.moe_intermediate_size)
                if cfg.shared_intermediate_size > 0:
                    widths.add(cfg.shared_intermediate_size)
            else:
                widths.add(cfg.intermediate_size)
    for w in widths:
        hadamard.factor(w)
    return Rotation(seed=seed, residual=hadamard.random_signs(d, seed, 0),
                    down={w: hadamard.random_signs(w, seed, 1) for w in sorted(widths)})


def _qt_left(w: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """``Q^T w`` for ``w [..., n, m]`` (rotate the second-to-last axis)."""
    return np.swapaxes(hadamard.rotate_right(np.swapaxes(w, -1, -2), signs), -1, -2)


def _split(key: str) -> tuple[int | None, str]:
    m = re.match(r"layers/(\d+)/(.*)$", key)
    return (int(m[1]), m[2]) if m else (None, key)


def rotate_params(cfg, flat, *, seed: int = 0, online_down: bool = True):
    """Rotate flat params: returns ``(cfg', flat', Rotation)`` (see the module docstring).

    ``cfg'`` equals ``cfg`` except ``tie_word_embeddings=False`` when the input was tied. Arrays
    keep their dtypes (the math is float64). Unknown parameter names are an error, so a model
    change cannot silently break function preservation.
    """
    rot = make_rotation(cfg, seed, online_down=online_down)
    s = rot.residual
    f64 = {k: np.asarray(v, np.float64) for k, v in flat.items()}
    dtypes = {k: np.asarray(v).dtype for k, v in flat.items()}
    out: dict[str, np.ndarray] = {}
    layer_norms: dict[int, dict[str, np.ndarray]] = {}
    for key, v in f64.items():
        layer, name = _split(key)
        if layer is not None and name in _NORMS:
            layer_norms.setdefault(layer, {})[name] = v

    d = cfg.hidden_size
    for key, w in f64.items():
        layer, name = _split(key)
        if layer is None:
            if key == "embed/embedding":
                out[key] = hadamard.rotate_right(w, s)
            elif key == "final_norm/scale":
                out[key] = np.ones_like(w)
            elif key == "lm_head/kernel":
                out[key] = _qt_left(f64["final_norm/scale"][:, None] * w, s)
            else:
                raise ValueError(f"rotate_params: unknown parameter {key!r}")
            continue
        if name in _NORMS:
            out[key] = np.ones_like(w)
        elif name in _ATTN_READERS or name in _MLP_READERS:
            g = layer_norms[layer]["input_norm/scale" if name in _ATTN_READERS
                                   else "post_attn_norm/scale"]
            if w.shape[-2] != d:
                raise ValueError(f"rotate_params: {key} has shape {w.shape}, expected [.., {d}, N]")
            out[key] = _qt_left(g[:, None] * w, s)
        elif name in _WRITERS:
            w = hadamard.rotate_right(w, s)
            if online_down and name in _DOWN:
                w = _qt_left(w, rot.down[w.shape[-2]])
            out[key] = w
        elif name in _WRITER_BIASES:
            out[key] = hadamard.rotate_right(w, s)
        elif _UNTOUCHED.fullmatch(name):
            out[key] = w
        else:
            raise ValueError(f"rotate_params: unknown parameter {key!r}")
    if cfg.tie_word_embeddings:
        out["lm_head/kernel"] = _qt_left(f64["final_norm/scale"][:, None]
                                         * f64["embed/embedding"].T, s)
        dtypes["lm_head/kernel"] = dtypes["embed/embedding"]
        hf = dict(cfg.hf_config)
        hf["tie_word_embeddings"] = False
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False, hf_config=hf)
    return cfg, {k: v.astype(dtypes[k]) for k, v in out.items()}, rot
