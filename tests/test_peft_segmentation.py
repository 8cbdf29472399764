"""PEFT through ``kanseg train``: a ``peft:`` section adapts the pretrained 3D UKANet of
``--init-from``. The base tensors stay bit-identical, the run folder holds the adapter (kanpeft's
format) and its base, resume / infer / export work on the run, and ``kanpeft merge`` turns it
into a plain run that predicts the same."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from kanpeft.api import adapter_method
from kanpeft.cli import main as kanpeft_main
from kanpeft.segmentation_runs import adapt, start_adapted
from kanseg.cli import main
from kanseg.config import load_config
from kanseg.engine.checkpoint import load_weights, save_weights
from kanseg.models.io import load_matching
from kanseg.schema import ConfigError

from test_cost_aware_models import write_msd

REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = REPO / "configs" / "msd_hippocampus.yaml"
PEFT = REPO / "configs" / "msd_hippocampus_peft.yaml"
#: the shipped hippocampus model at width 4 on 16^3 patches: seconds per epoch on a CPU
TINY = ["data.patch_size=[16,16,16]", "data.batch_size=2", "data.num_workers=0",
        "model.width=4", "trainer.max_minutes=null", "trainer.schedule_horizon=epochs",
        "trainer.max_epochs=1",
        "trainer.val_every=1", "trainer.warmup_epochs=0", "inference.sw_batch_size=4"]
#: method -> (config, overrides); lora turns the plain hippocampus config into a PEFT run
METHODS = {
    "basis": (PEFT, ["peft.method=basis", "peft.options={degrees: [1], extra_degrees: 1}"]),
    "scales": (PEFT, []),
    "lora": (HIPPOCAMPUS, ["peft.method=lora", "peft.options={r: 2}", "peft.trainable=[heads]"]),
}
RESUMED = {"basis", "lora"}  # the others resume through the same code path
EXPORTED = "scales"


def _sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory) -> Path:
    return write_msd(tmp_path_factory.mktemp("msd"), cases=5, shape=(20, 24, 20))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, msd_root) -> Path:
    """A pretrained run of the plain hippocampus config."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", "--config", str(HIPPOCAMPUS), "--run-dir", str(run),
                 *_sets(f"data.root={msd_root}", *TINY)]) == 0
    return run


def _prepared_before_training(run: Path, base: Path) -> torch.nn.Module:
    """The adapted model as training started: the base's weights, then the run's method."""
    cfg = load_config(run / "config.yaml")
    model = cfg.model.build()
    report = load_matching(model, load_weights(base / "checkpoints/best/model.safetensors"))
    assert report.complete
    return adapt(model, cfg.peft)


def _infer(run: Path, image: Path, out: Path) -> tuple[np.ndarray, np.ndarray]:
    assert main(["infer", "--checkpoint", str(run), "--input", str(image), "--output", str(out),
                 "--save-probabilities"]) == 0
    labels = np.asarray(nib.load(out / "hippocampus_000.nii.gz").dataobj)
    probs = np.asarray(nib.load(out / "probabilities" / "hippocampus_000.nii.gz").dataobj)
    return labels, probs


@pytest.mark.parametrize("method", sorted(METHODS))
def test_adapted_run_trains_resumes_infers_and_merges(method, tmp_path, msd_root, base_run,
                                                      capsys):
    config, overrides = METHODS[method]
    run = tmp_path / "adapted"
    assert main(["train", "--config", str(config), "--run-dir", str(run),
                 "--init-from", str(base_run),
                 *_sets(f"data.root={msd_root}", *TINY, *overrides)]) == 0
    if method in RESUMED:  # one more epoch from the checkpoint of base + adapter
        first = json.loads((run / "checkpoints/last/meta.json").read_text())["step"]
        assert main(["train", "--run-dir", str(run), "--resume",
                     *_sets("trainer.max_epochs=2")]) == 0
        assert "resumed from" in (run / "train.log").read_text()
        assert json.loads((run / "checkpoints/last/meta.json").read_text())["step"] == 2 * first

    # only the adapter and the trainable modules changed; the base is bit-identical
    initial = _prepared_before_training(run, base_run).state_dict(keep_vars=True)
    final = load_weights(run / "checkpoints/last/model.safetensors")
    assert set(final) == set(initial)
    trainable = {n for n, t in initial.items() if t.requires_grad}
    for name in set(initial) - trainable:
        assert torch.equal(final[name], initial[name]), f"frozen tensor {name} changed"
    changed = [n for n in trainable if not torch.equal(final[n], initial[n])]
    assert any(".heads." in f".{n}" for n in changed), changed

    # the adapter in kanpeft's format and the reference to the base
    assert adapter_method(run / "adapter") == method
    size = (run / "adapter" / "adapter_model.safetensors").stat().st_size
    assert size < (run / "checkpoints/last/model.safetensors").stat().st_size
    record = json.loads((run / "peft.json").read_text())
    assert record["method"] == method
    assert 0 < record["trainable_parameters"] < record["total_parameters"]
    base_weights = (base_run / "checkpoints/best/model.safetensors").resolve()
    assert record["base"]["weights"] == str(base_weights)
    assert record["base"]["frozen_parameter_sha256"]
    assert f"peft {method}:" in (run / "train.log").read_text()

    # infer on the adapted run, merge it, infer on the plain run: the same predictions
    image = msd_root / "imagesTr" / "hippocampus_000.nii.gz"
    labels, probs = _infer(run, image, tmp_path / "pred")
    assert labels.shape == nib.load(image).shape
    merged = tmp_path / "merged"
    assert kanpeft_main(["merge", str(run), "--output", str(merged)]) == 0
    plain = yaml.safe_load((merged / "config.yaml").read_text())
    assert plain["peft"]["method"] is None
    assert plain["model"]["degree"] == (4 if method == "basis" else 3)
    merged_labels, merged_probs = _infer(merged, image, tmp_path / "pred_merged")
    assert np.abs(merged_probs - probs).max() <= 1e-4
    assert np.array_equal(merged_labels, labels)

    if method == EXPORTED:  # export merges too; a base the adapter was not trained on is refused
        assert main(["export", str(run), "--output", str(tmp_path / "model.pt"),
                     "--format", "torchscript"]) == 0
        other = load_weights(base_run / "checkpoints/best/model.safetensors")
        frozen = next(k for k in other if k.startswith("encoder.2.") and k.endswith("weight"))
        other[frozen] += 1.0
        save_weights(other, tmp_path / "other.safetensors")
        assert kanpeft_main(["merge", str(run), "--output", str(tmp_path / "other_merged"),
                             "--backbone", str(tmp_path / "other.safetensors")]) == 1
        assert "trained on another base" in capsys.readouterr().err


def test_decoder_only_trains_the_listed_modules_of_a_plain_run(tmp_path, msd_root, base_run):
    """peft.method null + peft.trainable: no adapter, only those modules change."""
    run = tmp_path / "decoder"
    assert main(["train", "--config", str(HIPPOCAMPUS), "--run-dir", str(run),
                 "--init-from", str(base_run),
                 *_sets(f"data.root={msd_root}", *TINY,
                        "peft.trainable=[up, decoder, heads]")]) == 0
    before = load_weights(base_run / "checkpoints/best/model.safetensors")
    after = load_weights(run / "checkpoints/last/model.safetensors")
    assert set(after) == set(before)  # a plain model: no adapter tensors
    tuned = ("up.", "decoder.", "heads.")
    for name, tensor in after.items():
        if not name.startswith(tuned):
            assert torch.equal(tensor, before[name]), f"frozen tensor {name} changed"
    assert any(not torch.equal(after[n], before[n]) for n in after if n.startswith("decoder."))
    assert not (run / "adapter").exists() and not (run / "peft.json").exists()
    assert "peft none (trains up, decoder, heads):" in (run / "train.log").read_text()
    with pytest.raises(ConfigError, match=r"peft\.options\.r: without peft\.method"):
        load_config(HIPPOCAMPUS, ["peft.trainable=[heads]", "peft.options={r: 2}"])


def test_peft_section_default_set_and_errors():
    assert load_config(HIPPOCAMPUS).peft.method is None
    assert load_config(HIPPOCAMPUS, ["peft.method=scales"]).peft.method == "scales"
    shipped = load_config(PEFT)
    assert shipped.peft.method == "scales" and shipped.peft.trainable == ["heads"]
    for overrides, message in [
        (["peft.method=nope"], r"peft\.method: method must be one of"),
        (["peft.options={bogus: 1}"], r"unknown key 'peft\.options\.bogus'"),
        (["peft.method=lora", "peft.options={r: 0}"], r"peft\.options: r must be >= 1"),
        (["peft.options={trainable_modules: [heads]}"], r"peft\.trainable"),
        (["peft.trainable=heads"], r"peft\.trainable: expected a list"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(PEFT, overrides)


def test_modules_that_do_not_exist_are_listed():
    cfg = load_config(PEFT, ["model.width=4", "peft.trainable=[head]"])
    with pytest.raises(ConfigError, match=r"peft\.trainable: the model has no module 'head'; "
                                          r"modules that can train .*heads\.0"):
        adapt(cfg.model.build(), cfg.peft)
    cfg = load_config(PEFT, ["model.width=4", "peft.options={target_modules: ['decoder.*']}"])
    with pytest.raises(ConfigError, match=r"target_modules: 'decoder\.\*' matches no KAN layer; "
                                          r"the KAN layers that can be targeted: encoder\.2\."):
        adapt(cfg.model.build(), cfg.peft)


def test_a_reinitialised_head_must_train(tmp_path):
    cfg = load_config(PEFT, ["model.width=4", "model.refine_channels=0", "peft.trainable=[]"])
    model = cfg.model.build()
    state = {k: v for k, v in cfg.model.build().state_dict().items() if not k.startswith("heads")}
    report = load_matching(model, state)
    with pytest.raises(ConfigError, match=r"did not load heads\.0\.weight.*add their modules "
                                          r"\(heads\.0\) to peft\.trainable"):
        start_adapted(model, cfg, tmp_path, (tmp_path / "base.safetensors", report))


def test_cli_errors_name_the_key(tmp_path, msd_root, base_run, capsys):
    args = ["train", "--config", str(PEFT), *_sets(f"data.root={msd_root}", *TINY)]
    assert main([*args, "--run-dir", str(tmp_path / "a")]) == 1
    assert "--init-from" in capsys.readouterr().err
    plain = ["train", "--config", str(HIPPOCAMPUS), "--run-dir", str(tmp_path / "c"),
             *_sets(f"data.root={msd_root}", *TINY, "peft.trainable=[decoder]")]
    assert main(plain) == 1
    assert "peft.trainable=['decoder'] adapts a pretrained network" in capsys.readouterr().err
    assert main([*args, "--run-dir", str(tmp_path / "b"), "--init-from", str(base_run),
                 "--set", "peft.trainable=[decoder, nope]"]) == 1
    err = capsys.readouterr().err
    assert "peft.trainable: the model has no module 'nope'" in err and "heads.0" in err
    assert kanpeft_main(["merge", str(base_run), "--output", str(tmp_path / "m")]) == 1
    assert "not an adapted run" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_ddp_trains_only_the_adapter(tmp_path, msd_root, base_run):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", "-m", "kanseg.cli", "train", "--config", str(PEFT), "--run-dir",
           str(run), "--init-from", str(base_run), *_sets(f"data.root={msd_root}", *TINY)]
    result = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    initial = _prepared_before_training(run, base_run)
    final = load_weights(run / "checkpoints/last/model.safetensors")
    for name, param in initial.named_parameters():
        if not param.requires_grad:
            assert torch.equal(final[name], param.detach()), name
    assert adapter_method(run / "adapter") == "scales"
