"""Layer types as data: each supported type is one :class:`LayerKind`, selected by :mod:`.selection`,
its data captured by the one set of hooks in :mod:`.capture`."""

from rkfac.layers.base import LayerKind
from rkfac.layers.capture import Call, CaptureSink, LayerCapture
from rkfac.layers.conv1d import Conv1dKind
from rkfac.layers.conv2d import Conv2dKind
from rkfac.layers.embedding import EmbeddingKind
from rkfac.layers.grouped_conv import GroupedConv1dKind, GroupedConv2dKind
from rkfac.layers.linear import LinearKind
from rkfac.layers.selection import KINDS, SUPPORTED_TEXT, SkipRule, is_supported, kind_for, select_layers

__all__ = [
    "KINDS",
    "SUPPORTED_TEXT",
    "Call",
    "CaptureSink",
    "Conv1dKind",
    "Conv2dKind",
    "EmbeddingKind",
    "GroupedConv1dKind",
    "GroupedConv2dKind",
    "LayerCapture",
    "LayerKind",
    "LinearKind",
    "SkipRule",
    "is_supported",
    "kind_for",
    "select_layers",
]
