"""LPIPS perceptual distance (Zhang et al., CVPR 2018, "vgg") over fastdae's fused head, with the
`lpips` package's constructor and forward (net="vgg" only).

    lpips = LPIPS(net="vgg", trunk_weights="vgg16-397923af.pth")  # torchvision vgg16 state dict, local file
    d = lpips(x0, x1)                                     # (B, 1, 1, 1), images in [-1, 1] (normalize=True: [0, 1])
    loss = lpips.loss(recon, images).mean()               # training: the target branch runs under no_grad

Nothing is downloaded. The VGG16 trunk is built here (no torchvision import) with torchvision's
parameter names, so torchvision's vgg16 state dict (.pth or .safetensors) loads as is. The lin
weights come from a local lpips v0.1 file, or by default from the copy bundled inside the installed
`lpips` package (`pip install --no-deps lpips==0.1.4`); that package is located, never imported
(it imports torchvision).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdae.kernels.lpips import EPS, lpips_head

# torchvision's vgg16 `features` up to relu5_3: ints are 3x3 conv widths (each followed by ReLU), "M" a 2x2 max-pool
VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # features.N indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
CHANNELS = (64, 128, 256, 512, 512)
MIN_SIZE = 16  # four 2x2 pools before relu5_3: smaller images leave no position there
# lpips' ScalingLayer: x -> (x - shift) / scale maps [-1, 1] images to ImageNet-normalised inputs
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
RANGE_SLACK = 1.0  # inputs beyond [-1 - slack, 1 + slack] are "far outside" the range (e.g. [0, 255] images)
LIN_KEY = "lin{}.model.1.weight"  # lpips v0.1 lin weights, (1, C_l, 1, 1)


def load_state_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Tensors of a local .safetensors file or a torch.save'd state dict (loaded with weights_only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def bundled_lin_weights(version: str = "0.1") -> Path | None:
    """The vgg lin weights of `version` shipped inside the installed `lpips` package, or None.

    find_spec on a top-level name locates the package without running its __init__."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / f"v{version}" / "vgg.pth"
    return path if path.is_file() else None


class VGG16Trunk(nn.Module):
    """torchvision's vgg16().features[:30] (up to relu5_3), returning the five LPIPS taps."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)  # features.N as in torchvision, so state dicts match

    def forward(self, x: Tensor) -> list[Tensor]:
        """x (B, 3, H, W) ImageNet-normalised -> [relu1_2 (B, 64, H, W), ..., relu5_3 (B, 512, H/16, W/16)]."""
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                taps.append(x)
        return taps

    def load_torchvision(self, path: str | os.PathLike) -> None:
        """Load a torchvision vgg16 state dict file; its classifier.* entries are ignored."""
        state = {k: v for k, v in load_state_file(path).items() if k.startswith("features.")}
        expected = self.state_dict().keys()  # features.{0,2,5,...,28}.{weight,bias}
        missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"{path}: not a torchvision vgg16 state dict (missing {missing[:4]}, unexpected {unexpected[:4]})"
            )
        own = self.state_dict()
        for key, value in state.items():
            if value.shape != own[key].shape:
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, vgg16 needs {tuple(own[key].shape)}")
        self.load_state_dict(state)


VERSIONS = ("0.1", "0.0")  # lpips v0.0 (the arXiv v1 release) feeds the trunk unscaled inputs
NETS = ("vgg", "vgg16")


class LPIPS(nn.Module):
    """LPIPS distance with the lpips package's interface; the VGG16 trunk is frozen unless pnet_tune.

    lpips' arguments (`lpips.LPIPS(pretrained, net, version, lpips, spatial, pnet_rand, pnet_tune,
    use_dropout, model_path, eval_mode, verbose)`), with these differences:
      net: "vgg" (or "vgg16") only; "alex" and "squeeze" raise NotImplementedError. The default is
          "vgg" (lpips' is "alex").
      pnet_rand=False needs `trunk_weights`, a local torchvision vgg16 state dict (lpips downloads it
          through torchvision; fastdae downloads nothing).
      pretrained, model_path: the lin weights come from model_path (or its fastdae name lin_weights),
          else the installed lpips package's bundled v{version}/vgg.pth; pretrained=False draws them
          from U(0, 1) (lpips: a default conv init). A file that is given is always loaded.
      verbose: prints the setup line when True; the default is False (lpips prints by default).
    fastdae's own keyword-only options:
      trunk_weights: see pnet_rand. lin_weights: = model_path.
      random_init: pnet_rand=True and pretrained=False together (tests, benchmarks).
      normalize: the default of forward's `normalize` (inputs in [0, 1] instead of [-1, 1]).
      impl: backend of the fused head (see fastdae.lpips_head).
      trunk_dtype: e.g. torch.bfloat16 to run the trunk in bf16 (the head accumulates in fp32).
      channels_last: run the trunk in channels_last memory format (faster convolutions on GPU).
      check_range: raise when inputs lie more than 1 outside their range (e.g. [0, 255] images); costs
          one host sync per call (skipped under torch.compile); pass False in training loops.
    forward(in0, in1, retPerLayer=False, normalize=False) returns (B, 1, 1, 1), or (B, 1, H, W) maps
    with spatial=True, as lpips does. The fused head computes the distance unless a per-position
    map is needed (spatial=True, or dropout in training mode with use_dropout), where the same
    formula runs in torch with lpips' layer order (so dropout draws the same masks under one seed).
    """

    def __init__(
        self,
        pretrained: bool = True,
        net: str = "vgg",
        version: str = "0.1",
        lpips: bool = True,
        spatial: bool = False,
        pnet_rand: bool = False,
        pnet_tune: bool = False,
        use_dropout: bool = True,
        model_path: str | os.PathLike | None = None,
        eval_mode: bool = True,
        verbose: bool = False,
        *,
        trunk_weights: str | os.PathLike | None = None,
        lin_weights: str | os.PathLike | None = None,
        random_init: bool = False,
        normalize: bool = False,
        impl: str = "auto",
        trunk_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        check_range: bool = True,
    ) -> None:
        super().__init__()
        if net not in NETS:
            raise NotImplementedError(
                f"fastdae.nn.LPIPS implements net='vgg' (VGG16 trunk) only, got net={net!r}; use the lpips "
                "package for 'alex' and 'squeeze'"
            )
        if version not in VERSIONS:
            raise ValueError(f"LPIPS: version must be one of {VERSIONS}, got {version!r}")
        if model_path is not None and lin_weights is not None:
            raise ValueError("LPIPS: pass the lin weights file once, as model_path or lin_weights")
        if random_init:
            pretrained, pnet_rand = False, True
        lin_file = model_path if model_path is not None else lin_weights
        self.version, self.spatial, self.lpips, self.pnet_tune = version, spatial, lpips, pnet_tune
        self.use_dropout = use_dropout and lpips  # lpips' dropout sits in the lin layers
        self.normalize, self.impl, self.check_range = normalize, impl, check_range
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))

        self.trunk = VGG16Trunk()
        if trunk_weights is not None:
            self.trunk.load_torchvision(trunk_weights)
        elif not pnet_rand:
            raise ValueError(
                "LPIPS: trunk_weights is required (a local torchvision vgg16 state dict, e.g. "
                "vgg16-397923af.pth as torchvision saves it under ~/.cache/torch/hub/checkpoints/, or a "
                ".safetensors of it); fastdae downloads nothing. pnet_rand=True (or random_init=True) "
                "gives an untrained trunk (tests only)."
            )
        self.trunk.requires_grad_(pnet_tune).eval()
        self.trunk.to(dtype=trunk_dtype, memory_format=self.memory_format)

        if not lpips:  # lpips' "baseline": every channel weighs 1
            lins = [torch.ones(c) for c in CHANNELS]
        elif lin_file is not None:
            lins = self._load_lins(lin_file)
        elif pretrained:
            bundled = bundled_lin_weights(version)
            if bundled is None:
                raise ValueError(
                    "LPIPS: no lin weights given (model_path) and the lpips package is not installed; pass a "
                    f"local lpips v{version} vgg.pth or `pip install --no-deps lpips==0.1.4` for its bundled weights"
                )
            lins = self._load_lins(bundled)
        else:
            lins = [torch.rand(c) for c in CHANNELS]
        for i, w in enumerate(lins):
            self.register_buffer(f"lin{i}", w)  # (C_l,) non-negative channel weights
        if verbose:
            print(
                f"Setting up [{'LPIPS' if lpips else 'baseline'}] perceptual loss: trunk [vgg], v[{version}], "
                f"spatial [{'on' if spatial else 'off'}] (fastdae)"
            )
        self.train(not eval_mode)

    @staticmethod
    def _load_lins(path: str | os.PathLike) -> list[Tensor]:
        state = load_state_file(path)
        lins = []
        for i, c in enumerate(CHANNELS):
            key = LIN_KEY.format(i)
            if key not in state or state[key].shape != (1, c, 1, 1):
                got = tuple(state[key].shape) if key in state else "missing"
                raise ValueError(f"{path}: {key} must be a (1, {c}, 1, 1) tensor (lpips vgg format), got {got}")
            w = state[key].reshape(c).to(torch.float32)
            if (w < 0).any():
                raise ValueError(f"{path}: {key} has negative entries; LPIPS channel weights are non-negative")
            lins.append(w)
        return lins

    def load_lpips_state_dict(self, state: dict[str, Tensor], prefix: str = "") -> None:
        """Loads a state dict of lpips.LPIPS(net="vgg") (or of taming-transformers' LPIPS, which shares
        its layout), e.g. from a VQGAN checkpoint with prefix="loss.perceptual_loss.": trunk
        `net.slice{k}.{N}.*` -> `trunk.features.{N}.*`, lin `lin{l}.model.{0|1}.weight` (1, C, 1, 1)
        -> `lin{l}` (C,). Every trunk and lin entry must be there; scaling_layer entries are checked."""
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        ours = {}
        for key, value in state.items():
            parts = key.split(".")
            if parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice"):
                ours[f"trunk.features.{parts[2]}.{parts[3]}"] = value
            elif (
                parts[0].startswith("lin")
                and parts[1:3] in (["model", "0"], ["model", "1"])
                and parts[3:] == ["weight"]
            ):
                ours[parts[0]] = value.reshape(-1)
            elif parts[0] == "scaling_layer" and not torch.allclose(
                value.reshape(-1).float(), getattr(self, parts[1]).reshape(-1)
            ):
                raise ValueError(f"load_lpips_state_dict: {prefix}{key} differs from lpips' constants")
        missing = sorted(self.state_dict().keys() - ours.keys() - {"shift", "scale"})
        if missing:
            raise ValueError(
                f"load_lpips_state_dict: not an lpips vgg state dict under prefix {prefix!r}; nothing for {missing[:4]}"
            )
        self.load_state_dict({**self.state_dict(), **ours})

    def train(self, mode: bool = True) -> LPIPS:
        """The trunk stays in eval mode (a feature extractor); training mode only enables dropout."""
        super().train(mode)
        self.trunk.eval()
        return self

    @property
    def lin_weights(self) -> list[Tensor]:
        return [getattr(self, f"lin{i}") for i in range(len(CHANNELS))]

    def _check(self, x0: Tensor, x1: Tensor, normalize: bool) -> None:
        for name, x in (("in0", x0), ("in1", x1)):
            if not isinstance(x, Tensor) or not x.is_floating_point():
                raise TypeError(f"LPIPS: {name} must be a floating-point tensor (B, 3, H, W)")
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"LPIPS: {name} must be (B, 3, H, W) RGB images, got {tuple(x.shape)}")
            if min(x.shape[2:]) < MIN_SIZE:
                raise ValueError(
                    f"LPIPS: {name} must be at least {MIN_SIZE}x{MIN_SIZE} (4 VGG pools), got {tuple(x.shape)}"
                )
        if x0.shape != x1.shape:
            raise ValueError(
                f"LPIPS: in0 and in1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}"
            )
        if self.check_range and not torch.compiler.is_compiling():  # a host sync: kept out of compiled graphs
            lo_ok, hi_ok = (0.0, 1.0) if normalize else (-1.0, 1.0)
            bounds = torch.stack([torch.stack(torch.aminmax(x.detach().float())) for x in (x0, x1)])  # (2, 2)
            lo, hi = torch.stack([bounds[:, 0].min(), bounds[:, 1].max()]).tolist()
            if lo < lo_ok - RANGE_SLACK or hi > hi_ok + RANGE_SLACK:
                raise ValueError(
                    f"LPIPS: inputs must be images in [{lo_ok:g}, {hi_ok:g}] "
                    f"({'normalize=True' if normalize else 'use normalize=True for [0, 1] images'}), "
                    f"got values in [{lo:.3g}, {hi:.3g}]; check_range=False skips this check"
                )

    def features(self, x: Tensor, normalize: bool | None = None) -> list[Tensor]:
        """Images (B, 3, H, W) -> the five trunk feature maps (in the trunk's dtype and memory format)."""
        if self.normalize if normalize is None else normalize:
            x = 2 * x - 1
        x = x.float()
        if self.version == "0.1":  # lpips' ScalingLayer: [-1, 1] -> ImageNet-normalised
            x = (x - self.shift) / self.scale
        w = self.trunk.features[0].weight
        return self.trunk(x.to(dtype=w.dtype, memory_format=self.memory_format))

    def _layer_maps(self, feats0: list[Tensor], feats1: list[Tensor], out_hw: tuple[int, int]) -> list[Tensor]:
        """Per layer, the lin-weighted squared difference of unit-normalised features, in torch:
        (B, 1, H, W) upsampled to the input (spatial) or (B, 1, 1, 1) means, as lpips computes them.
        Dropout (training mode, use_dropout) acts on the (B, C, H_l, W_l) differences, as lpips' lin layer."""
        out = []
        for f0, f1, w in zip(feats0, feats1, self.lin_weights, strict=True):
            u0 = f0.float() / (torch.linalg.vector_norm(f0.float(), dim=1, keepdim=True) + EPS)
            u1 = f1.float() / (torch.linalg.vector_norm(f1.float(), dim=1, keepdim=True) + EPS)
            diff = F.dropout((u0 - u1).square(), 0.5, training=self.training and self.use_dropout)
            d = (w.view(1, -1, 1, 1) * diff).sum(dim=1, keepdim=True)  # (B, 1, H_l, W_l)
            out.append(
                F.interpolate(d, size=out_hw, mode="bilinear", align_corners=False)
                if self.spatial
                else d.mean(dim=(2, 3), keepdim=True)
            )
        return out

    def _distance(
        self, feats0: list[Tensor], feats1: list[Tensor], out_hw: tuple[int, int], per_layer: bool
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        if self.spatial or (self.training and self.use_dropout):
            layers = self._layer_maps(feats0, feats1, out_hw)
        elif per_layer:  # one fused call per layer
            layers = [
                lpips_head([f0], [f1], [w], impl=self.impl).view(-1, 1, 1, 1)
                for f0, f1, w in zip(feats0, feats1, self.lin_weights, strict=True)
            ]
        else:
            return lpips_head(feats0, feats1, self.lin_weights, impl=self.impl).view(-1, 1, 1, 1)
        total = torch.stack(layers).sum(dim=0)
        return (total, layers) if per_layer else total

    def forward(
        self,
        in0: Tensor,
        in1: Tensor,
        retPerLayer: bool = False,  # noqa: N803 (lpips' name)
        normalize: bool | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """LPIPS distance (B, 1, 1, 1) float32 ((B, 1, H, W) with spatial=True); with retPerLayer the
        tuple (distance, [five per-layer terms of the same shape]). normalize: inputs in [0, 1]
        (default: the constructor's, False).
        Differentiable w.r.t. both inputs."""
        normalize = self.normalize if normalize is None else normalize
        self._check(in0, in1, normalize)
        feats0, feats1 = self.features(in0, normalize), self.features(in1, normalize)
        return self._distance(feats0, feats1, tuple(in0.shape[2:]), retPerLayer)

    def loss(self, x: Tensor, target: Tensor) -> Tensor:
        """forward(x, target) for training: differentiable w.r.t. x; target's features run under no_grad."""
        self._check(x, target, self.normalize)
        with torch.no_grad():
            target_feats = self.features(target)
        return self._distance(self.features(x), target_feats, tuple(x.shape[2:]), per_layer=False)
