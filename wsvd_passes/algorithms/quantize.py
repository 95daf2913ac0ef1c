"""Fake quantisation (quantise then dequantise) of weights and activations for QAT passes.

Symmetric round-to-nearest of a row x [n] (the last dim) to ``bits`` bits, with
``qmax = 2^(bits-1) - 1`` and a clip ratio c in (0, 1] (1: no clipping)::

    scale = c * max|x| / qmax,    fq(x) = scale * clamp(round(x / scale), -qmax, qmax)

The integer range is the symmetric [-qmax, qmax] ([-7, 7] at 4 bits, [-127, 127] at 8):
it leaves the code -qmax-1 unused but maps +max|x| and -max|x| exactly, so fq(-x) = -fq(x).
An all-zero row gets the smallest normal scale (as in torchao) and quantises to zeros.

- Weights W [out, in]: one scale per output row; the clip ratio per row may be searched
  to minimise ``||w_row - fq(w_row)||^2`` (:func:`search_weight_clip`).
- Activations X [..., d]: dynamic, one scale per token, or per group of ``group``
  consecutive features (per token per head for a latent [..., heads * r] with group=r).

``bits >= 16`` is the identity. Half-precision inputs are quantised in float32 and cast back.

Straight-through estimator: with ``ste=True`` the result is ``x + (fq(x) - x).detach()``,
whose value is fq(x) and whose gradient w.r.t. x is exactly the identity: nothing flows
through the rounding, the clamp or the scale (without ``ste`` only the scale carries a
gradient). Unlike a custom ``autograd.Function`` (torchao's ``_Round``), whose backward is lost
when torch.export inlines it to ``aten.round``, the detach stays in the exported graph;
``ExportedProgram.run_decompositions`` turns it into ``aten.alias`` and so drops the STE.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

import torch

from ..errors import WsvdError

ACTIVATION_KINDS = ("qkv", "o_proj", "gate_up", "down_proj", "latent")  # what a linear's input is (quant_spec.input_role)
EXCEPTION_BITS = 8  # activations an exception (``+down_proj``) keeps


@dataclasses.dataclass(frozen=True)
class Bits:
    """Bit widths of linear-layer weights and input activations, and of the token-embedding table and
    LM head (weight-only, per row; one table when they are tied); 16 means not quantised.

    Low-bit activation options (both off by default): ``activation_clip`` c scales every low-bit activation
    quantiser's range to c * max|x| per token (QuaRot clips A4 at 0.9); ``a8`` names the inputs kept at
    :data:`EXCEPTION_BITS` bits (unclipped): a kind of :data:`ACTIVATION_KINDS` (every layer's) or ``layerN`` (every
    input of decoder layer N; ``layer-1`` the last).
    """

    weight: int
    activation: int
    embedding: int = 16
    activation_clip: float | None = None
    a8: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        """``w8a8``, ``w8a8e8`` with a quantised embedding, ``w4a4c0.9+down_proj+layer0`` with the low-bit
        activation options (what :func:`parse_bits` reads back)."""
        return (f"w{self.weight}a{self.activation}" + (f"e{self.embedding}" if self.embedding < 16 else "")
                + (f"c{self.activation_clip:g}" if self.activation_clip is not None else "")
                + "".join(f"+{s}" for s in self.a8))


BIT_SETTINGS = {
    "w8a8": Bits(8, 8),
    "w4a4": Bits(4, 4),
    "w8a4": Bits(8, 4),
    "w4a8": Bits(4, 8),
    "w16a16": Bits(16, 16),
    "w16": Bits(16, 16),
}
EMBEDDING_BITS = (8, 4)  # the suffixes e8, e4
_BITS = re.compile(r"(?P<base>w\d+(?:a\d+)?)(?:e(?P<embedding>\d+))?(?:c(?P<clip>\d*\.?\d+))?(?P<a8>(?:\+[^+]*)*)")
_LAYER_SELECTOR = re.compile(r"layer-?\d+")


def parse_bits(text: str) -> Bits:
    """``"w8a4"`` -> Bits(weight=8, activation=4); ``"w8a8e8"`` also quantises the embedding and LM head
    to 8 bits; ``"w16"`` turns quantisation off; ``"w4a4c0.9+down_proj+layer0"`` clips the 4-bit activations at
    0.9 of their range and keeps the down_proj inputs and all of layer 0's at 8 bits (:class:`Bits`)."""
    m = _BITS.fullmatch(text)
    if (m is None or m["base"] not in BIT_SETTINGS
            or (m["embedding"] and m["embedding"] not in {str(b) for b in EMBEDDING_BITS})):
        raise WsvdError(f"unknown bit setting {text!r}: use one of {', '.join(BIT_SETTINGS)}, optionally followed "
                        f"by e8 or e4 to quantise the embedding and LM head (e.g. w8a8e8)")
    bits = BIT_SETTINGS[m["base"]]
    clip = float(m["clip"]) if m["clip"] else None
    if clip is not None and not 0 < clip < 1:
        raise WsvdError(f"activation clip {m['clip']!r} in {text!r} is outside (0, 1): use e.g. w4a4c0.9")
    a8 = tuple(m["a8"].split("+")[1:])
    for s in a8:
        if s not in ACTIVATION_KINDS and not _LAYER_SELECTOR.fullmatch(s):
            raise WsvdError(f"unknown 8-bit exception {s!r} in {text!r}: use {', '.join(ACTIVATION_KINDS)} or layerN "
                            "(layer-1: the last), e.g. w4a4+down_proj+layer0")
    if (clip is not None or a8) and bits.activation >= EXCEPTION_BITS:
        raise WsvdError(f"{text!r}: activation clipping and 8-bit exceptions are for activations below "
                        f"{EXCEPTION_BITS} bits (e.g. w4a4c0.9+down_proj)")
    if len(set(a8)) != len(a8):
        raise WsvdError(f"{text!r} names an 8-bit exception twice: name each once")
    return dataclasses.replace(bits, embedding=int(m["embedding"]) if m["embedding"] else 16,
                               activation_clip=clip, a8=a8)


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value q, gradient w.r.t. x the identity (straight-through estimator)."""
    return x + (q - x).detach()


def fake_quant_weight(w: torch.Tensor, bits: int, *, clip_ratio: torch.Tensor | float | None = None,
                      ste: bool = False) -> torch.Tensor:
    """Per-output-row fake quantisation of W [out, in]; ``clip_ratio`` is a float or a tensor [out]."""
    if bits >= 16:
        return w
    if isinstance(clip_ratio, torch.Tensor):
        clip_ratio = clip_ratio.to(_work_dtype(w)).unsqueeze(-1)
    elif clip_ratio is not None and not 0 < clip_ratio <= 1:
        raise WsvdError(f"clip ratio {clip_ratio} is outside (0, 1]: use a ratio such as 0.9")
    return _output(w, _fake_quant_rows(w, bits, clip_ratio), ste)


def quantize_weight(w: torch.Tensor, bits: int, *, clip_ratio: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer form of :func:`fake_quant_weight` for bits <= 8: int8 codes [out, in] and float32
    scales [out] with ``codes * scale[:, None]`` equal to the fake-quant value (same ops, same rounding)."""
    if not 2 <= bits <= 8:
        raise WsvdError(f"int8 codes hold 2 to 8 bits, not {bits}")
    work = w.detach().to(_work_dtype(w))
    clip = None if clip_ratio is None else clip_ratio.to(work.dtype).unsqueeze(-1)
    scale = _row_scale(work, bits, clip)
    codes = torch.clamp(torch.round(work * scale.reciprocal()), -_qmax(bits), _qmax(bits)).to(torch.int8)
    return codes, scale[:, 0]


def fake_quant_activation(x: torch.Tensor, bits: int, *, group: int | None = None, clip: float | None = None,
                          ste: bool = False) -> torch.Tensor:
    """Dynamic per-token fake quantisation of X [..., d], or per token per group of ``group`` features; ``clip`` c
    in (0, 1] quantises each row on the range c * max|row| (values beyond it saturate at +-qmax)."""
    if bits >= 16:
        return x
    if clip is not None and not 0 < clip <= 1:
        raise WsvdError(f"activation clip ratio {clip} is outside (0, 1]: use a ratio such as 0.9")
    if group is None:
        return _output(x, _fake_quant_rows(x, bits, clip), ste)
    if x.shape[-1] % group:
        raise WsvdError(f"group size {group} does not divide the feature width {x.shape[-1]}: use a divisor")
    q = _fake_quant_rows(x.unflatten(-1, (-1, group)), bits, clip).flatten(-2)
    return _output(x, q, ste)


def quantize_activation(x: torch.Tensor, bits: int, *, group: int | None = None, clip: float | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer form of :func:`fake_quant_activation`: int8 codes [..., d] and float32 scales [..., d / group]
    (one per token when ``group`` is None) with ``codes * scale`` (per group) equal to the fake-quant value,
    for bits <= 8. What a latent cache stores instead of the dequantised latent."""
    if not 2 <= bits <= 8:
        raise WsvdError(f"int8 codes hold 2 to 8 bits, not {bits}")
    rows = x if group is None else x.unflatten(-1, (-1, group))
    work = rows.to(_work_dtype(rows))
    scale = _row_scale(work, bits, clip)
    codes = torch.clamp(torch.round(work * scale.reciprocal()), -_qmax(bits), _qmax(bits)).to(torch.int8)
    return (codes if group is None else codes.flatten(-2)), scale[..., 0].float()


@torch.no_grad()
def search_weight_clip(w: torch.Tensor, bits: int, *, grid: int = 100, min_ratio: float = 0.8) -> torch.Tensor:
    """Clip ratio [out] per row of W, from ``linspace(1, min_ratio, grid)``, minimising the squared error.

    Ties keep the larger ratio, so a row that clipping does not help keeps 1.0. Each candidate
    is quantised exactly as :func:`fake_quant_weight` does (same scales, times the reciprocal),
    all ratios of a block of rows at once in one fused kernel (:func:`_clip_errors`, compiled by
    ``torch.compile``: one pass over the block per ratio instead of seven eager ops), so the
    search over every linear of SmolLM2-135M takes seconds instead of minutes.
    """
    if grid < 1 or not 0 < min_ratio <= 1:
        raise WsvdError(f"clip search needs grid >= 1 and min_ratio in (0, 1], got grid={grid}, min_ratio={min_ratio}")
    work = w.to(_work_dtype(w))
    ratios = torch.linspace(1.0, min_ratio, grid, dtype=work.dtype, device=w.device)
    if bits >= 16:
        return torch.ones(w.shape[0], dtype=work.dtype, device=w.device)
    qmax = _qmax(bits)
    absmax = work.abs().amax(dim=-1, keepdim=True)
    scale = (absmax * ratios[:, None, None] / qmax).clamp_min(torch.finfo(work.dtype).tiny)  # [grid, out, 1]
    inverse = scale.reciprocal()
    errors = torch.empty(grid, w.shape[0], dtype=work.dtype, device=w.device)
    block = max(1, 2**16 // max(w.shape[1], 1))  # rows per call: the eager fallback holds grid x 256 KB
    for start in range(0, w.shape[0], block):
        rows = slice(start, start + block)
        errors[:, rows] = _clip_errors_fused(work[rows], scale[:, rows], inverse[:, rows], qmax)
    return ratios[errors.argmin(0)]  # argmin returns the first minimum: the larger ratio on ties


def _clip_errors(x: torch.Tensor, scale: torch.Tensor, inverse: torch.Tensor, qmax: int) -> torch.Tensor:
    """Squared error [grid, b] of the rows x [b, n] fake-quantised at each scale [grid, b, 1] (inverse = 1/scale)."""
    return (torch.clamp(torch.round(x * inverse), -qmax, qmax) * scale - x).square().sum(-1)


_compiled_clip_errors = None


def _clip_errors_fused(x, scale, inverse, qmax: int) -> torch.Tensor:
    """:func:`_clip_errors` compiled once (dynamic shapes); eager, with one warning, where compiling fails."""
    global _compiled_clip_errors
    if _compiled_clip_errors is None:
        _compiled_clip_errors = torch.compile(_clip_errors, dynamic=True)
    if _compiled_clip_errors is not _clip_errors:
        try:
            return _compiled_clip_errors(x, scale, inverse, qmax)
        except Exception as e:  # noqa: BLE001 - no C++ compiler, unsupported device: same maths, eagerly
            warnings.warn(f"clip search runs eagerly (torch.compile failed: {type(e).__name__})", stacklevel=2)
            _compiled_clip_errors = _clip_errors
    return _clip_errors(x, scale, inverse, qmax)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs, else the input's own dtype."""
    return torch.promote_types(x.dtype, torch.float32)


def _qmax(bits: int) -> int:
    if bits < 2:
        raise WsvdError(f"cannot quantise to {bits} bits: use 2 or more (16 or more turns quantisation off)")
    return 2 ** (bits - 1) - 1


def _fake_quant_rows(x: torch.Tensor, bits: int, clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """fq of every row (last dim) of x with its own scale, in x's dtype (see the module docstring)."""
    qmax = _qmax(bits)
    work = x.to(_work_dtype(x))
    scale = _row_scale(work, bits, clip)
    # times the reciprocal rather than divided by the scale, as torchao does, so that ties round alike
    return (torch.clamp(torch.round(work * scale.reciprocal()), -qmax, qmax) * scale).to(x.dtype)


def _row_scale(work: torch.Tensor, bits: int, clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """Symmetric scale [..., 1] of every row: clip * max|row| / qmax, at least the smallest normal."""
    absmax = work.abs().amax(dim=-1, keepdim=True)
    if clip is not None:
        absmax = absmax * clip
    return (absmax / _qmax(bits)).clamp_min(torch.finfo(work.dtype).tiny)


def _output(x: torch.Tensor, q: torch.Tensor, straight_through: bool) -> torch.Tensor:
    return ste(x, q) if straight_through else q
