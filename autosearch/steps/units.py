"""Step 1: which units of the model each knob of the space changes (and why there may be none)."""

from __future__ import annotations

import fnmatch
from typing import Any

import onnx

from autosearch.candidate import SpaceUnits
from autosearch.errors import ConfigError
from autosearch.knobs import knobs
from autosearch.model import SourceModel
from autosearch.presets import is_preset_file
from autosearch.space import KnobSpec, SearchSpace

__all__ = ["discover_units", "no_units_reason"]


def discover_units(source: SourceModel, space: SearchSpace) -> tuple[SpaceUnits, list[str]]:
    """Units of each knob of the space for this model, after its include/exclude; plus notes.

    Raises:
        ConfigError: a pattern of the space (include, exclude, share, by_unit) matches no unit of its knob.
    """
    notes: list[str] = []
    found: dict[str, tuple[str, ...]] = {}
    for k in knobs():
        spec = space.knobs.get(k.name)
        if spec is None:
            continue
        names, knob_notes = k.find_units(source)
        notes += knob_notes
        notes += _check_patterns(k.name, spec, names, space)
        found[k.name] = tuple(n for n in names if spec.applies(n))
    units = SpaceUnits(found)
    for name in space.knobs:
        if not units.of(name) and not any(name in n for n in notes):
            notes.append(f"knob {name!r}: no unit of this model matches its include/exclude patterns")
    return units, notes


def _check_patterns(name: str, spec: KnobSpec, units: list[str], space: SearchSpace) -> list[str]:
    """Every pattern a knob's spec names must match one of its units (else it is a typo or another model's).

    A bundled preset is written for every model, so a pattern of it that matches nothing here is a note, not an error.
    """
    if not units:
        return []
    shipped = is_preset_file(space.source)
    notes: list[str] = []
    where = f" in {space.source}" if space.source else ""
    pats: list[tuple[str, Any]] = [("include", p) for p in spec.include if tuple(spec.include) != ("*",)]
    pats += [("exclude", p) for p in spec.exclude]
    pats += [(f"share.{g}", p) for g, ps in spec.share.items() for p in ps]
    pats += [("by_unit", p) for p in spec.by_unit]
    for key, pat in pats:
        if not any(fnmatch.fnmatchcase(u, pat) for u in units):
            if shipped:
                notes.append(f"knob {name!r}: the preset's {key} pattern {pat!r} matches no {name} unit of this model; "
                             "it has no effect here")
                continue
            shown = ", ".join(units[:10]) + (f" ... ({len(units)} in all)" if len(units) > 10 else "")
            raise ConfigError(f"'knobs.{name}.{key}' pattern {pat!r}{where} matches no {name} unit of this model; "
                              f"its {name} units are: {shown} (fix or remove the pattern; `autosearch analyze` lists them)")
    return notes


_QUANTIZED_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLSTM", "MatMulNBits",
                  "DynamicQuantizeMatMul", "QGemm", "QAttention", "DequantizeLinear")


def no_units_reason(source: SourceModel, space: SearchSpace) -> str:
    """Why a model has nothing to search, and what to do about it (one line)."""
    g = source.onnx_model.graph
    inits = {t.name for t in g.initializer}
    weighted = [n for n in g.node if n.op_type in ("Conv", "MatMul", "Gemm")]
    computed = [n for n in weighted if len(n.input) > 1 and n.input[1] not in inits]
    sub = sum(1 for n in g.node for a in n.attribute if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS))
    integer: dict[str, int] = {}
    for n in g.node:
        if n.op_type in _QUANTIZED_OPS:
            integer[n.op_type] = integer.get(n.op_type, 0) + 1
    if not weighted and integer:
        ops = ", ".join(f"{c} {op}" for op, c in sorted(integer.items(), key=lambda kv: -kv[1]))
        return (f"nothing to search in this model: it is already quantized ({ops}), so no float layer is left for the "
                "bits knob; search the float model it was made from")
    if not weighted:
        why = "it has no Conv, MatMul or Gemm node in its main graph" + (f" ({sub} node(s) hold subgraphs)" if sub else "")
    elif computed:
        why = (f"{len(computed)} of its {len(weighted)} Conv/MatMul/Gemm nodes take a weight computed at run time, not a "
               f"constant (e.g. {computed[0].name!r} from {computed[0].input[1]!r}), and the others match no knob's include patterns")
    else:
        why = f"none of its {len(weighted)} weighted nodes matches the include/exclude patterns of the space's knobs"
    where = space.source or space.name
    return (f"nothing to search in this model: {why}. Check the knobs' include/exclude patterns in {where} "
            "(`autosearch analyze --model ...` lists the units), or fold computed weights into constants "
            "(e.g. onnxruntime.quantization.shape_inference.quant_pre_process)")


