"""Models from the ecosystem, split into freeze stages by their own structure.

There is no list of names per model: a family is recognised by the attributes its own
``forward`` uses, and the head is that ``forward`` itself with the stages taken out, so
the split model computes exactly what the unsplit one does (tests/test_split.py checks
the logits family by family). The families and their cuts are in docs/models.md.

- ResNet, Wide-ResNet, ResNeXt (``conv1`` … ``layer4``): the stem, one stage per
  residual block, then ``avgpool``/``fc``.
- A ``features`` sequence (VGG, AlexNet, SqueezeNet, DenseNet, EfficientNet, MobileNet,
  ConvNeXt, Swin) or RegNet's ``stem`` + ``trunk_output``: one stage per child module;
  plain layers in a row (VGG's conv, ReLU, conv, ReLU, pool) form one stage up to each
  pooling layer. The head is the model's forward after the sequence (pooling, norm,
  classifier).
- A torchvision ViT (``conv_proj``, ``class_token``, ``encoder.layers``): stage 0 is the
  patch embedding with the class token and position embedding, each encoder block a
  stage, the head the final norm, the class token's row and the classifier.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from prefast.errors import ConfigError
from prefast.models.staged import (
    StagedModel,
    from_sequential,
    from_torchvision_resnet,
    remember_state,
)

BY_HAND = (
    "pass the stages by hand from Python: prefast.train(cfg, model=prefast.StagedModel("
    "[stage0, stage1, ..., head])) (docs/python-api.md)"
)
POOLING = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
# (stem attributes, sequence attribute): a forward that runs these first, then the head.
SEQUENCES = ((("stem",), "trunk_output"), ((), "features"), ((), "layers"))


def _copy_without(model: nn.Module, removed: list[str] | tuple[str, ...]) -> nn.Module:
    """A shallow copy of ``model``: the same parameters and submodules, but its own table
    of children, where ``removed`` are identity. The model passed in is left as it was."""
    rest = copy.copy(model)
    rest._modules = dict(model._modules)
    for name in removed:
        rest._modules[name] = nn.Identity()
    return rest


class ForwardWithout(nn.Module):
    """``model``'s own forward with some of its submodules replaced by identity: the
    head of a model whose forward runs those submodules first."""

    def __init__(self, model: nn.Module, removed: tuple[str, ...]):
        super().__init__()
        self.rest = _copy_without(model, removed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(x)


class TimmPart(nn.Module):
    """A part of a timm model that runs the model's own ``forward_features`` (and, for the
    head, ``forward_head``) on a shallow copy whose other parts are identity.

    timm models share one interface: ``forward_features`` (stem, trunk, the norm after
    it) and ``forward_head`` (pooling, classifier). The stem is the copy with the trunk
    and every module registered after it taken out; the head is the copy with every
    module up to the trunk taken out, its own parameters (a ViT's class token and
    position embedding) left to the stem, and a ViT's ``_pos_embed`` step an identity."""

    def __init__(self, model: nn.Module, removed: list[str], head: bool):
        super().__init__()
        rest = _copy_without(model, removed)
        if head:
            rest._parameters, rest._buffers = {}, {}
            if hasattr(model, "_pos_embed"):  # an instance attribute shadows the method
                object.__setattr__(rest, "_pos_embed", nn.Identity())
        self.rest: Any = rest  # a timm model: forward_features, forward_head
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.rest.forward_features(x)
        return self.rest.forward_head(features) if self.head else features


def split_timm(model: Any, name: str) -> StagedModel | None:
    """A timm model (``forward_features``/``forward_head``) whose trunk is ``blocks``
    (ViT, DeiT, EfficientNet), ``stages`` (ConvNeXt), ``layers`` (Swin), ``features``
    (DenseNet, ReXNet, DPN), ``layer1..4`` (ResNet) or ``s1..4`` (RegNet): the stem, each
    block of the trunk, the head. A library model is checked against its own forward when
    it is built (prefast/models/check.py): a trunk its forward does not run in order is
    refused there, in one line."""
    trunk = [
        n
        for n in ("blocks", "stages", "layers", "features")
        if isinstance(getattr(model, n, None), nn.Sequential)
    ]
    numbered = (("layer1", "layer2", "layer3", "layer4"), ("s1", "s2", "s3", "s4"))
    trunk = trunk[:1] or next(([n for n in ns if hasattr(model, n)] for ns in numbered
                               if hasattr(model, ns[0])), [])  # fmt: skip
    if not trunk:
        return None
    names = list(model._modules)
    first, last = names.index(trunk[0]), names.index(trunk[-1])
    stem = TimmPart(model, names[first:], head=False)
    blocks = [block for t in trunk for block in model._modules[t].children()]
    if trunk == ["features"]:  # DenseNet's, ReXNet's: plain layers in a row are one stage
        blocks = group_children(blocks)
    head = TimmPart(model, names[: last + 1], head=True)
    staged = StagedModel([stem, *blocks, head], name=name)
    staged.channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"  # timm's Swin
    return staged


def _has_parameters(modules: list[nn.Module]) -> bool:
    return any(True for m in modules for _ in m.parameters())


def group_children(children: list[nn.Module]) -> list[nn.Module]:
    """A sequence's children as stages: a child with children of its own (a block, a
    dense block, a stage of a ConvNeXt) is one stage; a run of plain layers is one stage
    up to each pooling layer. A run that ends without pooling, or holds no parameters
    (a lone pooling layer), joins the stage before it."""
    stages: list[nn.Module] = []
    run: list[nn.Module] = []

    def flush(ended_by_pooling: bool) -> None:
        if not run:
            return
        own = ended_by_pooling and _has_parameters(run)
        if stages and not own:
            stages[-1] = nn.Sequential(stages[-1], *run)
        else:
            stages.append(run[0] if len(run) == 1 else nn.Sequential(*run))
        run.clear()

    for child in children:
        if next(child.children(), None) is None:  # a plain layer
            run.append(child)
            if isinstance(child, POOLING):
                flush(ended_by_pooling=True)
        else:
            flush(ended_by_pooling=False)
            stages.append(child)
    flush(ended_by_pooling=False)
    return stages


class ViTEmbedding(nn.Module):
    """A torchvision ViT's input stage: patches, class token, position embedding (its
    ``_process_input`` and the first lines of its encoder)."""

    def __init__(self, vit: Any):
        super().__init__()
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.pos_embedding = vit.encoder.pos_embedding
        self.dropout = vit.encoder.dropout
        self.hidden_dim = vit.hidden_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        x = self.conv_proj(x).reshape(n, self.hidden_dim, -1).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.dropout(x + self.pos_embedding)


class ViTHead(nn.Module):
    """A torchvision ViT's head: the encoder's final norm, the class token's row, the
    classifier."""

    def __init__(self, vit: Any):
        super().__init__()
        self.ln = vit.encoder.ln
        self.heads = vit.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.ln(x)[:, 0])


def is_torchvision_resnet(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("conv1", "bn1", "maxpool", "layer4", "avgpool", "fc"))


def split_model(model: Any, name: str) -> StagedModel | None:
    """``model`` as stages by its own structure, or None for a family not recognised."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):  # timm's
        return split_timm(model, name)
    if is_torchvision_resnet(model):
        return from_torchvision_resnet(model, name=name)
    if all(hasattr(model, a) for a in ("conv_proj", "class_token", "encoder", "heads")):
        blocks = list(model.encoder.layers.children())
        return StagedModel([ViTEmbedding(model), *blocks, ViTHead(model)], name=name)
    for stem, attr in SEQUENCES:
        sequence = getattr(model, attr, None)
        if not isinstance(sequence, nn.Sequential) or not all(hasattr(model, s) for s in stem):
            continue
        stages = [getattr(model, s) for s in stem] + group_children(list(sequence.children()))
        if len(stages) >= 1:
            staged = StagedModel([*stages, ForwardWithout(model, (*stem, attr))], name=name)
            # torchvision's Swin permutes its (H, W, C) features to (C, H, W) in the head
            staged.channels_last = hasattr(model, "permute")
            return staged
    return None


def check_split(
    model: nn.Module,
    staged: StagedModel,
    x: torch.Tensor,
    label: str | None = None,
    unsplit_error: Callable[[Exception], ConfigError] | None = None,
    split_error: Callable[[Exception], ConfigError] | None = None,
) -> None:
    """A model split by a rule must compute what its own forward does: compared on ``x``
    (a sample or two of the training data) in eval mode, without gradients; the modes
    are put back. A forward that does more than run the recognised parts in order (a
    rescaled input, a skip around the trunk) is refused in one line, as is a split whose
    forward fails (``split_error`` words it; by default the exception's first line).
    ``unsplit_error`` words a failure of the model's own forward (by default it is
    raised as it is: your model fails on your data). ``label`` names the model."""
    label = label or f"your {type(model).__name__}"
    restore = [remember_state(model), remember_state(staged)]
    try:
        model.eval()
        staged.eval()
        with torch.no_grad():
            try:
                expected = model(x)
            except Exception as err:
                if unsplit_error is None:
                    raise
                raise unsplit_error(err) from None
            try:
                got = staged(x)
            except Exception as err:
                raise (split_error or _split_fails(label))(err) from None
            difference = _max_difference(got, expected)  # one read back to the host, at setup
    finally:
        for put_back in restore:
            put_back()
    if not difference <= 1e-4:
        raise ConfigError(
            f"the split of {label} into {staged.num_stages} stages does not compute what its "
            f"forward does (logits differ by up to {difference:.3g}): its forward does more "
            "than run the parts docs/models.md names in order; pass "
            "prefast.StagedModel([stage0, stage1, ..., head]) with the modules in order"
        )


def _split_fails(label: str) -> Callable[[Exception], ConfigError]:
    def error(err: Exception) -> ConfigError:
        first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")[:160]
        return ConfigError(
            f"cannot split {label} into freeze stages: the split model fails where the model "
            f"runs ({type(err).__name__}: {first}): pass prefast.StagedModel([stage0, "
            "stage1, ..., head]) with the modules in order"
        )

    return error


def _max_difference(got: Any, expected: Any) -> float:
    """The largest difference between two outputs relative to the logits' size (at least
    1), NaN where they are not both tensors of one shape; NaN at the same place in both
    counts as equal."""
    if not (isinstance(got, torch.Tensor) and isinstance(expected, torch.Tensor)):
        return float("nan")
    if got.shape != expected.shape:
        return float("nan")
    both_nan = got.isnan() & expected.isnan()
    diff = torch.where(both_nan, 0.0, (got.float() - expected.float()).abs())
    scale = torch.where(expected.isfinite(), expected.float().abs(), 0.0).max().clamp_min(1.0)
    return float((diff.max() / scale).cpu()) if diff.numel() else 0.0


def as_staged_model(
    model: nn.Module, name: str = "custom", check_on: torch.Tensor | None = None
) -> StagedModel:
    """A user's model as stages: a StagedModel as is, an ``nn.Sequential`` (each child a
    stage, the last the head) or a torchvision model of a family that splits by its own
    structure (ResNet, VGG, DenseNet, EfficientNet, MobileNet, ConvNeXt, Swin, ViT...:
    prefast/models/split.py)."""
    if isinstance(model, StagedModel):
        return model
    if isinstance(model, nn.Sequential):
        return from_sequential(model, name=name)
    staged = split_model(model, name=name)
    if staged is not None:
        if check_on is not None:
            check_split(model, staged, check_on)
        return staged
    raise ConfigError(
        f"cannot split a {type(model).__name__} into freeze stages: pass "
        "prefast.StagedModel([stage0, stage1, ..., head]) with the modules in order, an "
        "nn.Sequential whose children are the stages (the last is the head), or a model "
        "of a family docs/models.md lists"
    )
