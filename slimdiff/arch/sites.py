"""Capture sites: which linear inputs a group's decomposition reads."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from slimdiff.arch import ModuleGroup


def group_input_sites(group: ModuleGroup) -> tuple[str, str]:
    """(x_site, y_site): the hooked inputs whose statistics a group's decomposition needs.

    QK needs the query input (x) and key input (y); VO the value input (y, also as x); FFN the
    hidden activation entering the down projection (both entries).
    """
    if group.kind == "ffn":
        site = f"{group.path}.net.2"
        return site, site
    q_site = f"{group.path}.to_q"
    kv_site = f"{group.path}.to_k" if group.kind.endswith("cross") else q_site
    if group.kind.startswith("qk"):
        return q_site, kv_site
    return kv_site, kv_site


def group_sites(group: ModuleGroup) -> tuple[str, ...]:
    """Every capture site a group's decomposition reads: the adapter's ``sites`` for joint, fused and modulation
    layouts, else the (x, y) sites of ``group_input_sites``."""
    return group.sites if group.sites else tuple(dict.fromkeys(group_input_sites(group)))


def sites_for(groups: Sequence[ModuleGroup]) -> list[str]:
    """Unique hooked input sites for ``groups``, in order."""
    sites: dict[str, None] = {}
    for group in groups:
        for site in group_sites(group):
            sites[site] = None
    return list(sites)


def site_width(denoiser: nn.Module, site: str) -> int:
    """Width of a site's statistics: its linear's input width, or the width of its column slice."""
    path, columns = parse_site(site)
    return int(denoiser.get_submodule(path).in_features) if columns is None else columns.stop - columns.start


def parse_site(site: str) -> tuple[str, slice | None]:
    """(module path, input columns) of a site name: ``"a.b.to_q"`` (the whole input of that linear) or
    ``"a.b.proj_out[3072:15360]"`` (columns 3072..15359 of its input: one part of a fused linear)."""
    if not site.endswith("]"):
        return site, None
    path, _, cols = site[:-1].rpartition("[")
    start, _, stop = cols.partition(":")
    try:
        columns = slice(int(start), int(stop))
    except ValueError:
        raise ValueError(f"site {site!r}: columns must read [start:stop]") from None
    if not 0 <= columns.start < columns.stop:
        raise ValueError(f"site {site!r}: empty or negative column range")
    return path, columns
