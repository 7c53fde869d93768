"""Convert a state dict saved by the authors' reference code into ``mmcafnet``'s names.

The reference names (listed in the project's reference notes, official_state_dict.tsv) map one to
one onto ours by the rules below; the reference's unused parts (PENet's ASPP head, decoders and
segmentation output, and three auxiliary linear heads its forward never calls) are dropped and
reported. Every parameter and buffer of ``mmcafnet`` must be covered, with the same shape.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Tuple, Union

import torch

logger = logging.getLogger(__name__)

_IMG = r"^image_encoder\."
_BLOCK = _IMG + r"encoder\.encoders\.(\d+)\.penet_blocks\.(\d+)\."


def _block(suffix: str) -> Callable[[re.Match], str]:
    return lambda m: f"image_encoder.backbone.stages.{m[1]}.blocks.{m[2]}.{suffix}"


def _level(template: str) -> Callable[[re.Match], str]:
    """Reference levels count from 1 (scale1, cab1, ucb1, bfpu1, ...); ours from 0."""
    return lambda m: template.format(i=int(m[1]) - 1, rest=m.lastindex and m[m.lastindex])


_Rule = Tuple["re.Pattern[str]", Union[str, Callable[[re.Match], str]]]

_RENAME: List[_Rule] = [
    (re.compile(_IMG + r"encoder\.in_conv\.0\.(\w+)$"), r"image_encoder.backbone.stem.conv.\1"),
    (re.compile(_IMG + r"encoder\.in_conv\.1\.(\w+)$"), r"image_encoder.backbone.stem.norm.\1"),
    (re.compile(_BLOCK + r"down_sample\.0\.(\w+)$"), lambda m: _block(f"shortcut.conv.{m[3]}")(m)),
    (re.compile(_BLOCK + r"down_sample\.1\.(\w+)$"), lambda m: _block(f"shortcut.norm.{m[3]}")(m)),
    (re.compile(_BLOCK + r"(conv[123]|norm[123])\.(\w+)$"), lambda m: _block(f"{m[3]}.{m[4]}")(m)),
    (re.compile(_BLOCK + r"se_block\.excite\.0\.(\w+)$"), lambda m: _block(f"se.fc1.{m[3]}")(m)),
    (re.compile(_BLOCK + r"se_block\.excite\.2\.(\w+)$"), lambda m: _block(f"se.fc2.{m[3]}")(m)),
    (re.compile(_IMG + r"scale(\d)\.0\.(\w+)$"), _level("image_encoder.pyramid.levels.{i}.norm.{rest}")),
    (re.compile(_IMG + r"sab\.conv\.(\w+)$"), r"image_encoder.pyramid.sab.conv.\1"),
    (re.compile(_IMG + r"cab(\d)\.(fc[12]\.\w+)$"), _level("image_encoder.pyramid.msca.{i}.cab.{rest}")),
    (re.compile(_IMG + r"dcfb(\d)\.pconv1\.0\.(\w+)$"), _level("image_encoder.pyramid.msca.{i}.dcfb.expand.conv.{rest}")),
    (re.compile(_IMG + r"dcfb(\d)\.pconv1\.1\.(\w+)$"), _level("image_encoder.pyramid.msca.{i}.dcfb.expand.norm.{rest}")),
    (re.compile(_IMG + r"dcfb(\d)\.pconv2\.0\.(\w+)$"), _level("image_encoder.pyramid.msca.{i}.dcfb.project.conv.{rest}")),
    (re.compile(_IMG + r"dcfb(\d)\.pconv2\.1\.(\w+)$"), _level("image_encoder.pyramid.msca.{i}.dcfb.project.norm.{rest}")),
    (
        re.compile(_IMG + r"dcfb(\d)\.msdc\.dwconvs\.(\d)\.([01])\.(\w+)$"),
        lambda m: f"image_encoder.pyramid.msca.{int(m[1]) - 1}.dcfb.branches.{m[2]}."
        f"{'conv' if m[3] == '0' else 'norm'}.{m[4]}",
    ),
    (re.compile(_IMG + r"ucb(\d)\.up_dwc\.1\.(\w+)$"), _level("image_encoder.pyramid.ucb.{i}.dwconv.{rest}")),
    (re.compile(_IMG + r"ucb(\d)\.up_dwc\.2\.(\w+)$"), _level("image_encoder.pyramid.ucb.{i}.norm.{rest}")),
    (re.compile(_IMG + r"ucb(\d)\.pwc\.0\.(\w+)$"), _level("image_encoder.pyramid.ucb.{i}.pwconv.{rest}")),
    (re.compile(_IMG + r"bfpu(\d)\.query_conv\.(\w+)$"), _level("image_encoder.pyramid.bfpu.{i}.query.{rest}")),
    (re.compile(_IMG + r"bfpu(\d)\.key_conv\.(\w+)$"), _level("image_encoder.pyramid.bfpu.{i}.key.{rest}")),
    (re.compile(_IMG + r"bfpu(\d)\.adjust_c\.(\w+)$"), _level("image_encoder.pyramid.bfpu.{i}.adjust.{rest}")),
    (re.compile(_IMG + r"bfpu(\d)\.gamma1\.(\w+)$"), _level("image_encoder.pyramid.bfpu.{i}.gate_deep.{rest}")),
    (re.compile(_IMG + r"bfpu(\d)\.gamma2\.(\w+)$"), _level("image_encoder.pyramid.bfpu.{i}.gate_shallow.{rest}")),
    (re.compile(_IMG + r"fc\.0\.(\w+)$"), r"image_encoder.readout.fc.\1"),
    (re.compile(r"^kan\.(grid|coef|mask|scale_base)$"), r"tabular_encoder.\1"),
    (re.compile(r"^kan\.scale_sp$"), "tabular_encoder.scale_spline"),
    (re.compile(r"^multiscale_fusion\.norm_img\.(\w+)$"), r"fusion.norm_image.\1"),
    (re.compile(r"^multiscale_fusion\.norm_tab\.(\w+)$"), r"fusion.norm_tabular.\1"),
    (re.compile(r"^multiscale_fusion\.down(\d)\.0\.(\w+)$"), _level("fusion.down.{i}.{rest}")),
    (
        re.compile(r"^multiscale_fusion\.cross_attention(\d)\.([qkv]_proj\.\w+)$"),
        _level("fusion.attention.{i}.{rest}"),
    ),
    (re.compile(r"^multiscale_fusion\.sample_img(\d)\.(\w+)$"), _level("fusion.carry_image.{i}.{rest}")),
    (re.compile(r"^multiscale_fusion\.sample_tab(\d)\.(\w+)$"), _level("fusion.carry_tabular.{i}.{rest}")),
    # SF1 merges the two coarse scales (our merge.1), SF2 the finest with that (our merge.0)
    (re.compile(r"^multiscale_fusion\.SF1\.fc1([xy])\.(\w+)$"), r"fusion.merge.1.fc_\1.\2"),
    (re.compile(r"^multiscale_fusion\.SF2\.fc1([xy])\.(\w+)$"), r"fusion.merge.0.fc_\1.\2"),
    (re.compile(r"^fin_cls\.(\w+)$"), r"classifier.\1"),
]

_DROP: List[Tuple[re.Pattern[str], str]] = [
    (re.compile(_IMG + r"encoder\.asp_pool\."), "PENet ASPP head (built but never used by the reference)"),
    (re.compile(_IMG + r"encoder\.decoders\."), "PENet decoders (built but never used by the reference)"),
    (re.compile(_IMG + r"encoder\.out_conv\."), "PENet segmentation output (never used)"),
    (re.compile(_IMG + r"fused_cls\."), "auxiliary image head of the image-only training stage"),
    (re.compile(r"^img_cls\."), "auxiliary image head (never called by the forward)"),
    (re.compile(r"^tab_cls\."), "auxiliary clinical head (never called by the forward)"),
]


@dataclass
class ReferenceConversion:
    """The converted state dict and what was left out (name -> reason)."""

    state_dict: Dict[str, torch.Tensor]
    dropped: Dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        reasons: Dict[str, int] = {}
        for reason in self.dropped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        parts = [f"{n} x {reason}" for reason, n in reasons.items()]
        return f"converted {len(self.state_dict)} entries; dropped {len(self.dropped)}" + (
            ": " + "; ".join(parts) if parts else ""
        )


def reference_to_ours(name: str) -> str:
    """Our name for one reference name; KeyError when no rule maps it."""
    for pattern, target in _RENAME:
        match = pattern.match(name)
        if match:
            return target(match) if callable(target) else match.expand(target)
    raise KeyError(name)


def _unwrap(state_dict: Mapping[str, object]) -> Dict[str, torch.Tensor]:
    for key in ("model_state", "state_dict"):
        inner = state_dict.get(key) if isinstance(state_dict, Mapping) else None
        if isinstance(inner, Mapping):
            state_dict = inner
            break
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    # DataParallel / DistributedDataParallel saves carry a "module." prefix
    return {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def _expected_shapes() -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of mmcafnet's state dict, from a model built on the meta device (no memory)."""
    from .registry import create_model

    with torch.device("meta"):
        model = create_model("mmcafnet")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def convert_reference_state_dict(state_dict: Mapping[str, object]) -> ReferenceConversion:
    """Map a reference state dict onto ``mmcafnet`` (binary head, 7 clinical inputs).

    Raises ValueError when a shape differs, when one of our entries is not covered, or when two
    reference entries land on the same name. Unknown reference entries are dropped with a warning.
    """
    source = _unwrap(state_dict)
    expected = _expected_shapes()
    converted: Dict[str, torch.Tensor] = {}
    origin: Dict[str, str] = {}
    dropped: Dict[str, str] = {}
    mismatched: List[str] = []
    for name, value in source.items():
        reason = next((why for pattern, why in _DROP if pattern.match(name)), None)
        if reason is not None:
            dropped[name] = reason
            continue
        try:
            ours = reference_to_ours(name)
        except KeyError:
            dropped[name] = "not part of the reference MMCAF-Net (unknown entry)"
            continue
        if ours not in expected:
            dropped[name] = "not part of the reference MMCAF-Net (unknown entry)"
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"reference entry {name!r} is a {type(value).__name__}, not a tensor")
        if ours in converted:
            raise ValueError(f"reference entries {origin[ours]!r} and {name!r} both map to {ours!r}")
        if tuple(value.shape) != expected[ours]:
            mismatched.append(
                f"{name} has shape {list(value.shape)} but mmcafnet's {ours} needs {list(expected[ours])}"
            )
            continue
        converted[ours] = value
        origin[ours] = name
    if mismatched:
        raise ValueError(
            "the reference state dict does not fit mmcafnet (binary head, 7 clinical inputs): "
            + "; ".join(mismatched[:10])
            + (f"; and {len(mismatched) - 10} more" if len(mismatched) > 10 else "")
        )
    missing = [k for k in expected if k not in converted]
    if missing:
        raise ValueError(
            f"the reference state dict lacks {len(missing)} entries mmcafnet needs, e.g. "
            + ", ".join(missing[:8])
            + "; is it a complete MMCAF-Net checkpoint (model_state of the fusion stage)?"
        )
    unknown = [k for k, why in dropped.items() if why.startswith("not part")]
    if unknown:
        warnings.warn(
            f"{len(unknown)} reference entries are not part of MMCAF-Net and were dropped: {unknown[:8]}",
            stacklevel=2,
        )
    return ReferenceConversion(converted, dropped)


def from_reference_state_dict(state_dict: Mapping[str, object]) -> Dict[str, torch.Tensor]:
    """Reference names -> ``mmcafnet`` names; load the result with ``load_state_dict(strict=True)``.

    The dropped entries (unused ASPP/decoders, auxiliary heads) are reported on this module's
    logger; :func:`convert_reference_state_dict` returns them as well.
    """
    conversion = convert_reference_state_dict(state_dict)
    logger.info("%s", conversion.summary())
    return conversion.state_dict


def read_reference_shapes(path) -> Dict[str, Tuple[int, ...]]:
    """Read a ``name<TAB>shape`` table (``64x3x7x7x7``, ``scalar`` for 0-d) such as official_state_dict.tsv."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                name, shape = line.split("\t")
                shapes[name] = () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))
            except ValueError:
                raise ValueError(f"{path}:{number}: expected 'name<TAB>AxBxC' or 'name<TAB>scalar', got {line!r}") from None
    return shapes
