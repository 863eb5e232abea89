"""What a denoiser costs: parameters by group, and multiply-accumulates of a call as the kernels run them."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from slimdiff.arch import GROUP_KINDS, ModuleGroup, find_groups
from slimdiff.arch.flux import single_block_columns
from slimdiff.calls import DenoiserCall


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _params_without_output_bias(module: nn.Module) -> int:
    """Parameters of a (possibly factorised) linear, not counting its output bias."""
    bias = getattr(module, "bias", None)
    return _params(module) - (bias.numel() if isinstance(bias, Tensor) else 0)


def _fused_share(block: nn.Module, kind: str) -> int:
    """Weights of a Flux single block's fused ``proj_out`` that count to its ``vo_single`` or ``ffn_single`` group: the
    group's input columns times the output width while ``proj_out`` is dense; a factorised ``proj_out`` (per-matrix
    baselines) splits its weights, both factors, in proportion to the two groups' input columns (the attention's
    share rounded down), so the two shares always sum to the whole."""
    attention, mlp = single_block_columns(block)
    weights = _params_without_output_bias(block.proj_out)
    attention_share = weights * attention // (attention + mlp)
    return attention_share if kind == "vo_single" else weights - attention_share


def group_params(denoiser: nn.Module, group: ModuleGroup) -> int:
    """Parameters a group holds now, counted from its modules (both factors of a factorised linear).

    Same accounting as ``ModuleGroup.unit_params * width``: q/k/v and FFN up-projection biases count,
    the to_out and FFN down-projection biases do not (they do not depend on the width).
    """
    module = denoiser.get_submodule(group.path)
    if group.kind == "qk_joint":
        return sum(_params(module.get_submodule(n)) for n in (*group.query, *group.key))
    if group.kind == "vo_joint":
        return (sum(_params(module.get_submodule(n)) for n in group.value)
                + sum(_params_without_output_bias(module.get_submodule(n)) for n in group.out))
    if group.kind in ("vo_single", "ffn_single"):
        inner = module.get_submodule(group.value[0] if group.kind == "vo_single" else group.up)
        return _params(inner) + _fused_share(module, group.kind)
    if group.kind == "adaln":
        return _params_without_output_bias(module)
    if group.kind.startswith("qk"):
        return _params(module.to_q) + _params(module.to_k)
    if group.kind.startswith("vo"):
        return _params(module.to_v) + _params_without_output_bias(module.to_out[0])
    return _params(module.net[0].proj) + _params_without_output_bias(module.net[2])


def count_params(denoiser: nn.Module, kinds: Sequence[str] = GROUP_KINDS) -> dict[str, Any]:
    """Parameter counts: ``total``, ``compressible`` (sum over the compressible groups of ``kinds``), ``by_kind`` and
    ``groups``."""
    groups = [g for g in find_groups(denoiser) if g.compressible and g.kind in kinds]
    per_group = {g.name: group_params(denoiser, g) for g in groups}
    by_kind = {kind: 0 for kind in GROUP_KINDS}
    for g in groups:
        by_kind[g.kind] += per_group[g.name]
    return {
        "total": _params(denoiser),
        "compressible": sum(per_group.values()),
        "by_kind": {k: v for k, v in by_kind.items() if any(g.kind == k for g in groups)},
        "groups": per_group,
    }


def _batch_of(call: DenoiserCall) -> int:
    args, kwargs = call
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value) and value.ndim > 0:
            return int(value.shape[0])
    raise ValueError("example call holds no tensor to read the batch size from")


def _conv_macs(module: nn.Module, output: Tensor) -> int:
    kernel = math.prod(module.kernel_size)
    return output.numel() * (module.in_channels // module.groups) * kernel


def _attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "heads") and all(isinstance(getattr(m, p, None), nn.Module) for p in ("to_q", "to_k", "to_v"))}


def count_macs(model: nn.Module, call: DenoiserCall) -> dict[str, int]:
    """Multiply-accumulates of ``model(*args, **kwargs)`` for the whole batch of ``call``, as the kernels run them.

    Linear: input tokens x in x out (every ``nn.Linear``, so both factors of a factorised layer);
    Conv: output elements x in/groups x kernel; attention (from the q/k/v projection outputs of each attention
    call): Q K^T and P V each B x heads x Nq x Nk x the run width, the wider of the per-head QK and V widths
    (``slimdiff.runtime.attention.attend`` pads the narrower side), where Nq and Nk count every stream of a joint attention
    (``to_q`` and ``add_q_proj`` rows). Equals ``torch.utils.flop_counter.FlopCounterMode`` / 2 under the math SDPA
    kernel (tested per family). Returns ``linear``, ``conv``, ``attention`` and ``total``.
    """
    counts = {"linear": 0, "conv": 0, "attention": 0}
    shapes: dict[str, dict[str, tuple]] = {}

    def linear_hook(module, args, output):
        x = args[0]
        counts["linear"] += (x.numel() // module.in_features) * module.in_features * module.out_features

    def conv_hook(module, args, output):
        counts["conv"] += _conv_macs(module, output)

    def projection_hook(attn_name: str, role: str):
        def hook(module, args, output):
            shapes.setdefault(attn_name, {})[role] = tuple(output.shape)
        return hook

    def attention_hook(attn_name: str, heads: int):
        def hook(module, args, output):
            seen = shapes.pop(attn_name, {})
            if not {"q", "k", "v"} <= set(seen):
                return
            tokens = lambda role: sum(math.prod(seen[r][1:-1]) for r in (role, f"add_{role}") if r in seen)  # noqa: E731
            batch, width = seen["q"][0], max(seen["q"][-1], seen["v"][-1]) // heads
            counts["attention"] += 2 * batch * heads * tokens("q") * tokens("k") * width
        return hook

    handles = []
    try:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                handles.append(module.register_forward_hook(linear_hook))
            elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                handles.append(module.register_forward_hook(conv_hook))
        for name, attn in _attention_modules(model).items():
            for role in ("q", "k", "v"):
                for stream, proj in ((role, getattr(attn, f"to_{role}")), (f"add_{role}", getattr(attn, f"add_{role}_proj", None))):
                    if isinstance(proj, nn.Module):
                        handles.append(proj.register_forward_hook(projection_hook(name, stream)))
            handles.append(attn.register_forward_hook(attention_hook(name, int(attn.heads))))
        args, kwargs = call
        with torch.inference_mode():
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    counts["total"] = sum(counts.values())
    return counts


def macs_per_call(denoiser: nn.Module, example_call: DenoiserCall, batch: int | None = None) -> int:
    """MACs of one denoiser forward for a batch of 1 (one branch of classifier-free guidance).

    ``example_call`` is ``(args, kwargs)`` of any batch; every counted op is per sample, so the count
    of the whole call divided by its batch (read from the first tensor, or ``batch``) is exact.
    A guided sampling step costs two such calls.
    """
    batch = _batch_of(example_call) if batch is None else batch
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    total = count_macs(denoiser, example_call)["total"]
    return total // batch


def folder_macs(folder) -> dict[str, Any] | None:
    """MACs of one call of a saved compressed denoiser and of its original, per sample, at the capture's call shape
    (the spec the capture recorded), counted on the meta device: no weight is read. None when the folder's capture
    recorded no call (a model saved before calls were recorded)."""
    from pathlib import Path

    from accelerate import init_empty_weights

    from slimdiff.calls import meta_call
    from slimdiff.runtime.folder import empty_denoiser, read_config

    folder = Path(folder)
    key, config = read_config(folder)
    spec = (config.get("info", {}).get("capture") or {}).get("call")
    if not spec:
        return None
    compressed = empty_denoiser(folder / key, config).to("meta")
    cls = type(compressed)
    with init_empty_weights(include_buffers=True):
        original = cls.from_config(cls.load_config(str(folder / key)))
    call = meta_call(spec)
    batch = _batch_of(call)
    before, after = count_macs(original.to("meta"), call)["total"] // batch, count_macs(compressed, call)["total"] // batch
    return {"original_per_call": before, "compressed_per_call": after, "fraction": after / before if before else None,
            "call_batch": batch}
