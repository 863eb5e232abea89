"""The documented statistics-memory formula (docs/memory.md) is the storage a real capture allocates."""

from __future__ import annotations

import pytest
import torch

from slimdiff.arch import compressible_groups
from slimdiff.arch.sites import sites_for
from slimdiff.statistics.recorder import ActivationRecorder
from slimdiff.statistics.sums import statistics_bytes
from tests.helpers import TINY_DENOISERS, tiny_unet_sd1


@pytest.mark.parametrize("dtype,bucket_bytes", [(torch.float32, 4), (torch.float64, 8)])
@pytest.mark.parametrize("num_buckets", [1, 4])
def test_statistics_bytes_equals_recorded_storage(num_buckets, dtype, bucket_bytes):
    model = tiny_unet_sd1(0).to(dtype)
    tiny = TINY_DENOISERS["unet_sd1"]
    sites = sites_for(compressible_groups(model))
    with ActivationRecorder(model, sites, num_buckets, 1000) as recorder, torch.no_grad():
        for i, t in enumerate((120, 870)):  # two calls, two different buckets when num_buckets > 1
            inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                      for k, v in tiny.inputs(model, 2, t, i).items()}
            tiny.output(model, inputs)
    assert recorder.calls == 2
    stats = recorder.stats
    assert all(int(s.count.sum()) > 0 for s in stats.values())  # the hooks really ran
    dims = [model.get_submodule(site).in_features for site in sites]
    recorded = sum(s.nbytes() for s in stats.values())
    assert statistics_bytes(dims, num_buckets, bucket_bytes) == recorded
    # and the parts are where and in the precision the page says
    for s in stats.values():
        assert s.sum_outer.dtype == s.sum.dtype == torch.float64
        assert s.count.dtype == torch.int64 and s.count.device.type == "cpu"
        if num_buckets == 1:
            assert s.bucket_sum_outer is None and s.bucket_sum is None
        else:
            assert s.bucket_sum_outer.element_size() == s.bucket_sum.element_size() == bucket_bytes


@pytest.mark.parametrize("budget", [0.1, 0.5])
def test_lora_maps_bound_holds_for_the_maps_a_compression_computes(tmp_path, budget):
    """The decompose stage's "LoRA maps" term (every group's ``lora_maps_elements`` x dtype bytes) bounds the maps
    ``slimdiff.compress_pipeline`` really computes and holds until the folder is written, at any budget."""
    from slimdiff.compress import SlimDiffConfig, compress_pipeline
    from slimdiff.pipeline.memory import MemorySettings, footprint, lora_maps_elements, predict
    from slimdiff.runtime.lora import maps_to_tensors
    from slimdiff.runtime.sampling import SamplerSettings
    from tests.helpers import TINY_PROMPTS, tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    sampler = SamplerSettings(2, 4.0)
    fp = footprint(tmp_path / "model", sampler, 2)
    bound = sum(lora_maps_elements(g) for g in fp.groups)
    assert predict(fp, MemorySettings(dtype=torch.float32))["decompose"].host_terms["LoRA maps"] == 4 * bound
    result = compress_pipeline(pipe, TINY_PROMPTS[:4], SlimDiffConfig(budget=budget, gain_prompts=2, gain_calls=2,
                                                                      batch_size=2), sampler, progress=False)
    tensors, _ = maps_to_tensors(result.lora_maps, torch.float32)
    held = sum(t.numel() for t in tensors.values() if t.is_floating_point())
    assert 0 < held <= bound, (held, bound)
