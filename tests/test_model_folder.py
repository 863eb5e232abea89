"""The job's preflight on model folders it was not made for: every broken or unsupported folder fails in one line that
names the file or class at fault and what would be valid (``check_model_supported``; nothing is loaded but configs)."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

from slimdiff.arch import SUPPORTED_DENOISERS, UnsupportedModelError
from slimdiff.pipeline.stages import check_model_supported, load_params, sampler_settings

REPO = Path(__file__).resolve().parents[1]
FLUX_MODEL = REPO / "data" / "reference-flux" / "model"
SD_MODEL = REPO / "data" / "reference" / "model"


def _sampler(workspace: Path):
    return sampler_settings(load_params(workspace / "params.yaml"))


def _linked_copy(source: Path, target: Path, edit=None) -> Path:
    """``source``'s pipeline folder at ``target``: its components linked, its model_index.json copied and edited."""
    target.mkdir()
    for part in source.iterdir():
        if part.name != "model_index.json":
            (target / part.name).symlink_to(part)
    index = json.loads((source / "model_index.json").read_text())
    if edit:
        edit(index)
    (target / "model_index.json").write_text(json.dumps(index))
    return target


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def test_the_reference_folders_pass():
    check_model_supported(FLUX_MODEL, _sampler(REPO / "data" / "reference-flux" / "job"))
    check_model_supported(SD_MODEL, _sampler(REPO))


@pytest.mark.parametrize("text,expected", [
    ("{not json", r"is not valid JSON \(Expecting property name enclosed in double quotes, line 1"),
    ("[1, 2]", r"holds a JSON list, not an object with _class_name"),
    ("{}", r"has no _class_name naming the pipeline class .*; found None"),
    ('{"_class_name": 5}', r"has no _class_name naming the pipeline class .*; found 5"),
    ('{"_class_name": "NoSuchPipeline"}', r"names pipeline class 'NoSuchPipeline', which is not a pipeline class of diffusers"),
    # a class diffusers has that is not a pipeline
    ('{"_class_name": "UNet2DModel"}', r"names pipeline class 'UNet2DModel', which is not a pipeline class of diffusers"),
    ('{"_class_name": "os.system"}', r"names pipeline class 'os.system', which is not a pipeline class"),
])
def test_a_broken_model_index_is_named_with_what_is_wrong(tmp_path, text, expected):
    (tmp_path / "model_index.json").write_text(text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'model_index.json'))} .*{expected}") as error:
        check_model_supported(tmp_path, _sampler(REPO))
    _one_line(error)


def test_a_model_index_that_is_not_text_is_named(tmp_path):
    (tmp_path / "model_index.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"model_index.json is not UTF-8 text"):
        check_model_supported(tmp_path, _sampler(REPO))


@pytest.mark.parametrize("edit,remove,expected", [
    (lambda i: i.update(transformer=["os", "system"]),
     None, r"component 'transformer' is \['os', 'system'\]; expected \[library, class\] with library one of diffusers, transformers"),
    (lambda i: i.update(transformer=["diffusers"]), None, r"component 'transformer' is \['diffusers'\]; expected \[library, class\]"),
    (lambda i: i.update(transformer=["diffusers", "NoSuchModel"]),
     None, r"component 'transformer' names diffusers.NoSuchModel, which diffusers does not have"),
    (None, "tokenizer", r"component 'tokenizer' \(CLIPTokenizer\): .*/tokenizer is missing"),
    (None, "transformer/config.json", r"component 'transformer' \(FluxTransformer2DModel\): .*/transformer/config.json is missing"),
    (lambda i: i.update(transformer=[None, None]), None, r"FluxPipeline has no 'unet' or 'transformer' component to compress"),
])
def test_a_broken_component_is_named_before_any_weight_is_read(tmp_path, edit, remove, expected):
    folder = _linked_copy(FLUX_MODEL, tmp_path / "model", edit)
    if remove:
        linked, _, rest = remove.partition("/")
        (folder / linked).unlink()
        if rest:  # the component's folder without that file
            (folder / linked).mkdir()
            for part in (FLUX_MODEL / linked).iterdir():
                if part.name != rest:
                    (folder / linked / part.name).symlink_to(part)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(folder))}.*{expected}") as error:
        check_model_supported(folder, _sampler(REPO / "data" / "reference-flux" / "job"))
    _one_line(error)


def test_a_component_config_that_is_not_json_is_named(tmp_path):
    folder = _linked_copy(FLUX_MODEL, tmp_path / "model")
    (folder / "transformer").unlink()
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text("[1")
    with pytest.raises(ValueError, match=r"component 'transformer' \(FluxTransformer2DModel\) cannot be built from .*: "
                                         r".*not a valid JSON file") as error:
        check_model_supported(folder, _sampler(REPO / "data" / "reference-flux" / "job"))
    _one_line(error)


def _config_only_pipeline(folder: Path, pipeline: str, denoiser: str, config: dict) -> Path:
    """A pipeline folder of another family: its transformer's config and a scheduler, every other component left out."""
    import diffusers

    getattr(diffusers, denoiser)(**config).save_config(folder / "transformer")
    diffusers.FlowMatchEulerDiscreteScheduler().save_config(folder / "scheduler")
    index = {"_class_name": pipeline, "_diffusers_version": diffusers.__version__}
    index.update({name: [None, None] for name in inspect.signature(getattr(diffusers, pipeline).__init__).parameters
                  if name != "self"})
    index.update(transformer=["diffusers", denoiser], scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"])
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("pipeline,denoiser,config", [
    ("AuraFlowPipeline", "AuraFlowTransformer2DModel",
     dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8,
          num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, out_channels=4, pos_embed_max_size=64)),
    ("SanaPipeline", "SanaTransformer2DModel",
     dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1, num_cross_attention_heads=2,
          cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16, sample_size=8, patch_size=1)),
    ("HunyuanDiTPipeline", "HunyuanDiT2DModel",
     dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
          cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=8, text_len=4, text_len_t5=4, hidden_size=16)),
])
def test_a_transformer_family_no_adapter_handles_names_pipeline_denoiser_and_the_supported_ones(tmp_path, pipeline, denoiser, config):
    folder = _config_only_pipeline(tmp_path, pipeline, denoiser, config)
    with pytest.raises(UnsupportedModelError) as error:
        check_model_supported(folder, _sampler(REPO / "data" / "reference-flux" / "job"))
    message = _one_line(error)
    assert message.startswith(f"{folder}: pipeline {pipeline}: {denoiser} has no supported transformer block; "), message
    assert message.endswith(f"supported denoisers: {', '.join(SUPPORTED_DENOISERS)}"), message


def test_an_sd15_index_with_a_safety_checker_in_a_pipeline_module_builds(tmp_path):
    """SD 1.5's index names its safety checker ``["stable_diffusion", "StableDiffusionSafetyChecker"]`` (a diffusers
    pipeline module, as diffusers resolves it) and stores ``requires_safety_checker``: both are passed on as diffusers does."""
    from transformers import CLIPConfig, CLIPImageProcessor

    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from slimdiff.pipeline.memory import meta_pipeline

    def edit(index):
        index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                     feature_extractor=["transformers", "CLIPImageProcessor"], requires_safety_checker=True)

    folder = _linked_copy(SD_MODEL, tmp_path / "model", edit)
    tiny = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    StableDiffusionSafetyChecker(CLIPConfig(text_config=tiny, vision_config=dict(tiny, image_size=32, patch_size=16),
                                            projection_dim=8)).save_pretrained(folder / "safety_checker")
    CLIPImageProcessor().save_pretrained(folder / "feature_extractor")
    check_model_supported(folder, _sampler(REPO))
    pipe, stored = meta_pipeline(folder)
    assert type(pipe.safety_checker).__name__ == "StableDiffusionSafetyChecker" and pipe.safety_checker.device.type == "meta"
    assert pipe.config.requires_safety_checker is True
    assert stored["safety_checker"] == "float32"
