"""The layers a compressed denoiser holds besides diffusers' own."""

from __future__ import annotations

from torch import Tensor, nn


class LowRankLinear(nn.Module):
    """``up(down(x))``: a linear factorised at ``rank`` (adaLN modulation). ``bias`` is the second factor's."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def bias(self) -> Tensor | None:
        return self.up.bias

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))
