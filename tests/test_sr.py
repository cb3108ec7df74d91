"""The super-resolution track: metrics against known values, the ESPCN models, branch removal by ``cascade``,
the SR data sources and protocol, the config's task rules, and one tiny pipeline run read back from MLflow."""

from __future__ import annotations

import io
import math
import socket
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from skimage.metrics import structural_similarity

from pruneflow import stages
from pruneflow.checkpoint import ModelSpec, load_model, save_model
from pruneflow.config import ConfigError, DataConfig, validate
from pruneflow.data import load_dataset, prepare_dataset
from pruneflow.data.super_resolution import BSDS300
from pruneflow.image_quality import luma, psnr_y, ssim_y
from pruneflow.layout import ProjectLayout, ProjectRun
from pruneflow.methods import create_method, method_name
from pruneflow.models import build_model
from pruneflow.plan import PrunePlan
from pruneflow.training import evaluate_all
from pruneflow.versioning import DataVersion
from tests.conftest import write_params
from tests.test_pipeline_e2e import artifact_paths, runs_of


def espcn(name: str = "espcn", scale: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, 1, None, {"upscale_factor": scale}).eval()


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sr_batches(n: int = 2, size: int = 8, scale: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.rand(4, 1, size, size, generator=generator),
             torch.rand(4, 1, size * scale, size * scale, generator=generator)) for _ in range(n)]


# --- metrics ---------------------------------------------------------------------------------------------------

def test_identical_images_score_infinite_psnr_and_unit_ssim() -> None:
    images = torch.rand(3, 1, 16, 16)
    assert torch.isinf(psnr_y(images, images)).all()
    assert torch.allclose(ssim_y(images, images), torch.ones(3))


def test_psnr_of_a_known_error_level() -> None:
    target = torch.full((2, 1, 8, 8), 0.5)
    signs = torch.tensor([1.0, -1.0]).repeat(32).view(1, 1, 8, 8)
    for error, expected in ((0.1, 20.0), (0.01, 40.0), (1 / 255, 20 * math.log10(255))):
        assert torch.allclose(psnr_y(target + error * signs, target), torch.tensor(expected), atol=1e-4)


def test_psnr_of_gaussian_noise_matches_its_variance() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.full((1, 1, 256, 256), 0.5)
    noisy = target + 0.05 * torch.randn(target.shape, generator=generator)  # σ = 0.05: PSNR ≈ 26.02 dB
    assert abs(psnr_y(noisy, target).item() - 10 * math.log10(1 / 0.05**2)) < 0.05


def test_ssim_matches_scikit_image() -> None:
    generator = torch.Generator().manual_seed(0)
    target = torch.rand(1, 1, 32, 40, generator=generator)
    output = (target + 0.1 * torch.randn(target.shape, generator=generator)).clamp(0, 1)
    expected = structural_similarity(output[0, 0].double().numpy(), target[0, 0].double().numpy(), data_range=1.0,
                                     gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert abs(ssim_y(output, target).item() - expected) < 1e-5


def test_colour_images_are_scored_on_luma() -> None:
    generator = torch.Generator().manual_seed(0)
    rgb, other = torch.rand(2, 3, 12, 12, generator=generator), torch.rand(2, 3, 12, 12, generator=generator)
    assert torch.allclose(psnr_y(rgb, other), psnr_y(luma(rgb), luma(other)))
    assert torch.allclose(luma(torch.ones(1, 3, 2, 2)), torch.ones(1, 1, 2, 2))


# --- models ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize("name", ["espcn", "espcn_cascade"])
def test_output_is_scale_times_the_input(name: str, scale: int) -> None:
    assert espcn(name, scale)(torch.zeros(2, 1, 10, 13)).shape == (2, 1, 10 * scale, 13 * scale)


def test_parameter_counts_match_the_paper_setup() -> None:
    assert params(espcn()) == 59_657
    assert params(espcn("espcn_cascade")) == 3 * params(espcn()) == 178_971


@pytest.mark.parametrize("drop", [1, 2])
def test_cascade_method_removes_branches_and_averages_the_rest(drop: int) -> None:
    model, x = espcn("espcn_cascade"), torch.rand(2, 1, 12, 12)
    before = {level: branch for level, branch in model.branches.items()}
    result = create_method("cascade", {"drop": drop}).prune(model, x, PrunePlan(), sr_batches(size=12))
    assert len(result.removed_blocks) == drop and params(model) == (3 - drop) * 59_657
    kept = [level for level in before if f"branches.{level}" not in result.removed_blocks]
    assert list(model.branches) == kept and "full" in kept
    reference = espcn("espcn_cascade")  # same seed, same weights: the kept branches alone, averaged
    for name in result.removed_blocks:
        reference.remove_block(name)
    assert torch.allclose(model(x), reference(x))
    if drop == 2:
        assert torch.allclose(model(x), model.branches["full"](x))  # one branch left: exactly an ESPCN


def test_cascade_params_fix_what_goes_and_are_checked() -> None:
    assert create_method("cascade", {"drop": 1}).fixed_by_params()
    assert not create_method("cascade", {}).fixed_by_params()
    model = espcn("espcn_cascade")
    result = create_method("cascade", {"blocks": ["branches.down2"]}).prune(model, torch.zeros(1, 1, 8, 8), PrunePlan())
    assert result.removed_blocks == ["branches.down2"] and list(model.branches) == ["full", "down4"]
    with pytest.raises(ValueError, match="has only 2 removable blocks"):
        create_method("cascade", {"drop": 3}).prune(espcn("espcn_cascade"), torch.zeros(1, 1, 8, 8), PrunePlan(),
                                                    sr_batches())
    with pytest.raises(ValueError, match="not a removable branch"):
        model.remove_block("branches.full")


def test_checkpoint_reloads_a_model_without_branches_and_with_fewer_channels(tmp_path) -> None:
    model, x = espcn("espcn_cascade"), torch.rand(2, 1, 8, 8)
    spec = ModelSpec("espcn_cascade", 1, None, (1, 8, 8), {"upscale_factor": 3})
    removed = create_method("cascade", {"drop": 1}).prune(model, x, PrunePlan(), sr_batches()).removed_blocks
    pruned = create_method("l1").prune(model, x, PrunePlan(ratio=0.5))
    save_model(tmp_path / "m.pt", model, spec, pruned.history, removed)
    loaded, _, surgery = load_model(tmp_path / "m.pt")
    assert surgery.removed_blocks == removed
    assert torch.allclose(loaded(x), model(x))


def test_channel_pruning_never_touches_the_sub_pixel_channels() -> None:
    model, x = espcn(), torch.rand(2, 1, 8, 8)
    create_method("l1").prune(model, x, PrunePlan(ratio=0.5))
    assert model.conv4.out_channels == 9 and model.conv1.out_channels == 64
    assert model.conv2.out_channels < 64 and model(x).shape == (2, 1, 24, 24)


# --- data ------------------------------------------------------------------------------------------------------

def write_images(folder, sizes: list[tuple[int, int]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    for index, (width, height) in enumerate(sizes):
        Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{index}.png")


def test_image_dir_follows_the_classic_protocol(tmp_path) -> None:
    write_images(tmp_path / "photos" / "big", [(40, 30), (33, 50), (36, 36)])
    write_images(tmp_path / "photos" / "eval", [(30, 30), (20, 40)])  # the second is smaller than the crop
    cfg = DataConfig(dataset="image_dir", path=str(tmp_path / "photos"), train_dir="big", test_dir="eval", crop=25,
                     val_fraction=0.3)
    logged = []
    splits = load_dataset(cfg, prepare_dataset(cfg, tmp_path / "data", log=logged.append), progress=logged.append)
    assert splits.task == "super_resolution" and splits.num_classes is None
    assert splits.model_kwargs == {"upscale_factor": 3}
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2, 1, 1)
    assert splits.test.labels.shape == (1, 1, 24, 24) and splits.test.images.shape == (1, 1, 8, 8)  # 25 → 24 (×3)
    assert any("1.png (20x40)" in line for line in logged)
    low, high = next(iter(splits.loader("test", 4)))
    assert low.dtype == high.dtype == torch.float32 and 0 <= high.min() and high.max() <= 1
    with Image.open(tmp_path / "photos" / "eval" / "0.png") as image:  # Y channel, centre crop, as PIL computes them
        y = np.asarray(image.convert("YCbCr").getchannel("Y"))[3:27, 3:27]
    assert np.array_equal((high[0, 0] * 255).round().numpy().astype(np.uint8), y)
    patches = splits.loader("train", 2, shuffle=True, augment="crop_flip")
    low, high = next(iter(patches))
    assert low.shape[-1] * 3 == high.shape[-1] == 12  # patch: half the crop, a multiple of the scale


def test_bsds300_offline_names_the_url_and_the_root(tmp_path, monkeypatch) -> None:
    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    with pytest.raises(ValueError) as error:
        prepare_dataset(DataConfig(dataset="bsds300"), tmp_path / "data", log=lambda _: None)
    for part in (BSDS300.URL, "data.path", BSDS300.ARCHIVE, str(tmp_path / "data" / ".cache" / "bsds300")):
        assert part in str(error.value)


def test_bsds300_extracts_its_archive(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(BSDS300, "COUNTS", {"train": 2, "test": 1})
    with tarfile.open(tmp_path / BSDS300.ARCHIVE, "w:gz") as tar:
        for split, count in BSDS300.COUNTS.items():
            for index in range(count):
                buffer = io.BytesIO()
                Image.new("RGB", (9, 9), (index * 40, 0, 0)).save(buffer, "JPEG")
                info = tarfile.TarInfo(f"BSDS300/images/{split}/{index}.jpg")
                info.size = len(buffer.getvalue())
                tar.addfile(info, io.BytesIO(buffer.getvalue()))
    cfg = DataConfig(dataset="bsds300", path=str(tmp_path), crop=9)
    splits = load_dataset(cfg, prepare_dataset(cfg, tmp_path / "data", log=lambda _: None))
    assert (len(splits.train) + len(splits.val), len(splits.test)) == (2, 1)


# --- config ----------------------------------------------------------------------------------------------------

def test_the_task_sets_defaults_and_every_part_must_match_it() -> None:
    cfg = validate({"task": "super_resolution"})
    assert (cfg.data.dataset, cfg.model.name, cfg.search.objectives) == ("skimage", "espcn", ["psnr"])
    assert "slimming" not in cfg.methods  # ESPCN has no BatchNorm for it to score
    for tree, message in [
        ({"task": "super_resolution", "data": {"dataset": "digits"}}, "digits is a classification dataset"),
        ({"task": "super_resolution", "model": {"name": "resnet20"}}, "resnet20 takes no upscale_factor"),
        ({"model": {"name": "espcn"}}, "espcn takes no num_classes"),
        ({"task": "super_resolution", "methods": ["adversarial"]}, "adversarial cannot prune super_resolution"),
        ({"task": "super_resolution", "search": {"objectives": ["accuracy"]}}, "optimises psnr"),
        ({"methods": {"l1-a b": {}}}, "<method>-<label>"),
    ]:
        with pytest.raises(ConfigError, match=message):
            validate(tree)


def test_one_method_can_run_twice_under_labels() -> None:
    cfg = validate({"task": "super_resolution", "model": {"name": "espcn_cascade"},
                    "methods": {"cascade-one": {"drop": 1}, "cascade-both": {"drop": 2}}})
    assert [method_name(entry) for entry in cfg.methods] == ["cascade", "cascade"]
    assert create_method("cascade-both", cfg.methods["cascade-both"]).params.drop == 2
    with pytest.raises(ConfigError, match="cascade-x: drop"):
        validate({"task": "super_resolution", "methods": {"cascade-x": {"drop": 0}}})


def test_methods_whose_params_fix_the_result_skip_the_search(tmp_path) -> None:
    cfg = validate({"task": "super_resolution", "model": {"name": "espcn_cascade"},
                    "methods": {"cascade-both": {"drop": 2}}})
    data = DataVersion(tmp_path / "no-data", "unused")
    run = ProjectRun(ProjectLayout(tmp_path, cfg), data, tmp_path / "no-baseline", tmp_path).method_run("cascade-both")
    chosen = stages.search_ratio(run, log=lambda _: None)
    assert chosen.searched is False and run.search_json.is_file()


def test_evaluation_reports_the_task_metrics() -> None:
    scores = evaluate_all(espcn(), sr_batches())
    assert list(scores) == ["psnr", "ssim"] and 0 < scores["psnr"] < 60


# --- the pipeline ----------------------------------------------------------------------------------------------

SR_PARAMS = {
    "task": "super_resolution",
    "data": {"crop": 24, "batch_size": 4},  # 8x8 inputs: seconds per stage
    "model": {"name": "espcn_cascade"},
    "train": {"epochs": 1, "optimizer": "adam", "lr": 1e-3, "schedule": "constant", "weight_decay": 0},
    "retrain": {"epochs": 1, "optimizer": "adam", "lr": 1e-3, "schedule": "constant", "weight_decay": 0},
    "methods": {"cascade-half": {}},  # searched ratio 0.5: the cheaper of the two downscaled branches goes
    "search": {"n_trials": 1, "ratio_low": 0.5, "ratio_high": 0.5,
               "target": {"metric": "params_reduction", "value": 0.3}},
    "evaluate": {"latency_repeats": 3, "latency_warmup": 1, "latency_batch_large": 4},
}


@pytest.mark.e2e
def test_sr_pipeline_logs_psnr_and_exports_a_checked_onnx(tmp_path, prefect_server) -> None:
    from pruneflow.flows.pipeline import prune_pipeline

    result = prune_pipeline(params=str(write_params(tmp_path, SR_PARAMS)))
    client = MlflowClient(result["tracking_uri"])
    children = runs_of(client, result["parent_run_id"])
    assert set(children) == {"baseline", "cascade-half"}
    assert {"psnr", "ssim", "val_psnr"} <= set(children["baseline"].data.metrics)
    run = children["cascade-half"]
    assert {"psnr", "ssim", "psnr_drop", "int8_psnr", "latency_ms"} <= set(run.data.metrics)
    assert run.data.metrics["params_reduction"] == pytest.approx(1 / 3, abs=1e-3)  # one of three branches
    assert run.data.metrics["onnx_max_abs_diff"] < 1e-4
    assert {"export/cpu/model.onnx", "retrained.pt"} <= artifact_paths(client, run.info.run_id)
    trials = runs_of(client, run.info.run_id)  # the search's objective is PSNR
    assert len(trials) == 1 and "psnr" in next(iter(trials.values())).data.metrics
    assert "psnr_drop" in (Path(result["run_dir"]) / "compare.md").read_text()
    assert result["champion"]["name"] == "pruneflow-espcn_cascade"
