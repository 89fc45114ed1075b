import math

import numpy as np
import pytest
import torch

from conftest import write_tiny_store
from uts_cli import devices
from uts_cli.data import only_one_mitosis
from uts_cli.errors import InputDataError, Interrupted, ResourceError, UsageError
from uts_cli.io.rundir import RunDir
from uts_cli.io.store import PatchStore
from uts_cli.model.cam import CamNet
from uts_cli.model.predict import bn_adaptation, load_run_model, predict_patches, predict_scores
from pathlib import Path

from uts_cli.config import SCHEMA_VERSION, TeachConfig
from uts_cli.model.fit import fit
from uts_cli.model.losses import (extended_log_barrier, image_loss_each, location_loss, soft_centroid,
                                  trim_positives_mask)

torch.set_num_threads(2)
CPU = torch.device("cpu")
FIELDS_COMPARED = ("epoch", "train_loss", "loss_ce", "loss_location", "val_f1", "threshold", "val_loc_f1",
                   "val_loc_threshold", "n_train_samples")


def params(**kw):
    base = dict(epochs=2, batch_size=4, workers=0, steps_per_epoch=3, lr=1e-3, location="lb", seed=3)
    base.update(kw)
    # fit() is handed its store directly; the config's store and name only matter to api.teach.
    return TeachConfig(store=Path("unused.h5"), name="t", **base)


def model():
    torch.manual_seed(0)
    return CamNet(n_blocks=2)


def train(store, run_path, p, resume=False, **kw):
    run = RunDir(run_path).open_existing() if resume else RunDir(run_path).create()
    return fit(model(), store, only_one_mitosis(store), store.indices("val"), p, run, device=CPU,
               resume=resume, handle_sigint=False, **kw)


def rows(run_path):
    return [{k: r[k] for k in FIELDS_COMPARED} for r in RunDir(run_path).read_history()]


def assert_same_rows(a, b):
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b]
    for ra, rb in zip(a, b):
        for k in FIELDS_COMPARED:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6), k
            else:
                assert ra[k] == rb[k], k


@pytest.fixture
def store(tiny_store):
    return PatchStore(tiny_store)


def test_fit_writes_run(store, tmp_path):
    result = train(store, tmp_path / "run", params())
    run = RunDir(tmp_path / "run")
    assert result.status == "complete" and result.epochs_done == 2
    hist = run.read_history()
    assert [r["epoch"] for r in hist] == [1, 2]
    assert all(r["n_train_samples"] == 12 and r["samples_per_s"] > 0 for r in hist)
    assert all(0 <= r["val_f1"] <= 1 and r["loss_location"] is not None for r in hist)
    cfg = run.read_config()
    assert cfg["schema_version"] == SCHEMA_VERSION
    assert cfg["model"]["n_blocks"] == 2 and cfg["config"]["epochs"] == 2 and cfg["store"]["uuid"] == store.uuid
    for name in ("last", "best"):
        ck = torch.load(run.checkpoint_path(name), weights_only=True)
        assert ck["format"] == "uts-checkpoint" and ck["store_uuid"] == store.uuid
    last = torch.load(run.checkpoint_path("last"), weights_only=True)
    assert last["epoch"] == 2 and last["step_in_epoch"] == 0
    # Default selection: the region-level localization F1 of val; both curves are in the history.
    assert all(0 <= r["val_loc_f1"] <= 1 and 0 < r["val_loc_threshold"] < 1 for r in hist)
    best_epoch = max(hist, key=lambda r: (r["val_loc_f1"], r["epoch"]))["epoch"]  # ties -> later epoch
    assert result.best_epoch == best_epoch
    best = torch.load(run.checkpoint_path("best"), weights_only=True)
    assert best["pixel_threshold"] == hist[best_epoch - 1]["val_loc_threshold"]
    assert run.read_metrics()["monitor"] == "val_loc_f1"
    metrics = run.read_metrics()
    assert metrics["status"] == "complete" and metrics["best_epoch"] == best_epoch
    net, info = load_run_model(run, "best")
    assert info["epoch"] == best_epoch and info["threshold"] == pytest.approx(hist[best_epoch - 1]["threshold"])
    probs = predict_scores(net, store, store.indices("test"), CPU, batch_size=3)
    assert probs.shape == (len(store.indices("test")),) and ((probs >= 0) & (probs <= 1)).all()


def test_resume_continues_without_gaps(store, tmp_path):
    train(store, tmp_path / "straight", params(epochs=3))
    train(store, tmp_path / "split", params(epochs=2))
    result = train(store, tmp_path / "split", params(epochs=3), resume=True)
    assert result.epochs_done == 3
    assert_same_rows(rows(tmp_path / "split"), rows(tmp_path / "straight"))
    # Resuming a finished run trains nothing more.
    again = train(store, tmp_path / "split", params(epochs=3), resume=True)
    assert [r["epoch"] for r in again.history] == [1, 2, 3]


def test_ctrl_c_saves_loadable_last_and_resume_matches(store, tmp_path):
    def interrupt(info):
        if info.epoch == 2 and info.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted) as err:
        train(store, tmp_path / "run", params(epochs=3), on_step=interrupt)
    assert err.value.exit_code == 130 and "--resume" in err.value.hint
    run = RunDir(tmp_path / "run")
    ck = torch.load(run.checkpoint_path("last"), weights_only=True)
    assert ck["epoch"] == 1 and ck["step_in_epoch"] == 2
    assert run.read_metrics()["status"] == "interrupted"
    assert [r["epoch"] for r in run.read_history()] == [1]
    net = CamNet.from_config(ck["model_config"])
    net.load_state_dict(ck["model"])

    train(store, tmp_path / "run", params(epochs=3), resume=True)
    train(store, tmp_path / "straight", params(epochs=3))
    assert_same_rows(rows(tmp_path / "run"), rows(tmp_path / "straight"))


def test_select_image_keeps_the_original_selection(store, tmp_path):
    result = train(store, tmp_path / "run", params(epochs=3, select="image"))
    run = RunDir(tmp_path / "run")
    hist = run.read_history()
    assert result.best_epoch == max(hist, key=lambda r: (r["val_f1"], r["epoch"]))["epoch"]
    assert run.read_metrics()["monitor"] == "val_f1"
    assert all(r["val_loc_f1"] is not None for r in hist)   # the localization curve is still recorded


STABLE = dict(lr_schedule="warmup-cosine", warmup_epochs=0.5, optimizer="adamw", weight_decay=0.05,
              ema_decay=0.9, bn_reestimate=2)


@pytest.mark.slow
def test_stability_options_train_save_the_average_and_resume_exactly(store, tmp_path):
    def interrupt(info):
        if info.epoch == 2 and info.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        train(store, tmp_path / "run", params(epochs=3, **STABLE), on_step=interrupt)
    train(store, tmp_path / "run", params(epochs=3, **STABLE), resume=True)
    train(store, tmp_path / "straight", params(epochs=3, **STABLE))
    assert_same_rows(rows(tmp_path / "run"), rows(tmp_path / "straight"))
    hist = RunDir(tmp_path / "straight").read_history()
    # Cosine decay: the lr after the last epoch is far below the peak.
    assert hist[-1]["lr"] < 0.1 * 1e-3 and hist[0]["lr"] > hist[-1]["lr"]
    last = torch.load(RunDir(tmp_path / "straight").checkpoint_path("last"), weights_only=True)
    assert last["ema_updates"] == 9 and "train_model" in last
    # eval/distill load the average ("model"), not the raw weights.
    raw = last["train_model"]
    key = next(k for k in last["model"] if k.endswith("weight") and last["model"][k].dtype.is_floating_point)
    assert not torch.equal(last["model"][key], raw[key])
    net, info = load_run_model(RunDir(tmp_path / "straight"), "last")
    assert torch.equal(net.state_dict()[key], last["model"][key]) and info["pixel_threshold"] is not None


def test_stop_callback_interrupts(store, tmp_path):
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] >= 2

    with pytest.raises(Interrupted):
        train(store, tmp_path / "run", params(), stop=stop)
    assert torch.load(RunDir(tmp_path / "run").checkpoint_path("last"), weights_only=True)["step_in_epoch"] == 2


def test_sigterm_stops_at_the_end_of_the_step_like_ctrl_c(store, tmp_path):
    # A scheduler's SIGTERM (Slurm preemption, scancel) saves the step instead of killing the process.
    import os
    import signal

    def term(info):
        if info.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    def not_caught(signum, frame):  # instead of the default action, which would end pytest
        raise AssertionError("fit did not handle SIGTERM")

    previous = signal.signal(signal.SIGTERM, not_caught)
    try:
        run = RunDir(tmp_path / "run").create()
        with pytest.raises(Interrupted):
            fit(model(), store, only_one_mitosis(store), store.indices("val"), params(), run, device=CPU,
                on_step=term)
        assert signal.getsignal(signal.SIGTERM) is not_caught  # restored afterwards
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert torch.load(run.checkpoint_path("last"), weights_only=True)["step_in_epoch"] == 1
    assert run.read_metrics()["status"] == "interrupted"


def test_resume_errors(store, tmp_path):
    RunDir(tmp_path / "empty").create().write_config({})
    with pytest.raises(InputDataError, match="checkpoint not found"):
        train(store, tmp_path / "empty", params(), resume=True)
    train(store, tmp_path / "run", params(epochs=1))
    other = PatchStore(write_tiny_store(tmp_path / "other.h5", seed=1))
    with pytest.raises(InputDataError, match="trained on store"):
        fit(model(), other, only_one_mitosis(other), other.indices("val"), params(), RunDir(tmp_path / "run"),
            device=CPU, resume=True, handle_sigint=False)


def test_training_set_checks(store, tmp_path):
    neg = np.flatnonzero(store.label == 0)
    with pytest.raises(InputDataError, match="no positive"):
        fit(model(), store, neg, [], params(), RunDir(tmp_path / "a").create(), device=CPU)
    with pytest.raises(InputDataError, match="no training patches"):
        fit(model(), store, [], [], params(), RunDir(tmp_path / "b").create(), device=CPU)
    with pytest.raises(UsageError):
        fit(model(), store, neg, [], params(location="l1"), RunDir(tmp_path / "c").create(), device=CPU)


def test_no_validation_set_keeps_last_as_best(store, tmp_path):
    result = train_no_val = fit(model(), store, only_one_mitosis(store), [], params(location="none"),
                                RunDir(tmp_path / "r").create(), device=CPU, handle_sigint=False)
    assert train_no_val.best_epoch == 2 and result.best_val_f1 is None and result.best_threshold == 0.5


def test_soft_centroid_and_location_losses():
    cam = torch.full((2, 1, 8, 8), -5.0)
    cam[0, 0, 2, 5] = 5.0
    cam[1, 0, 6, 1] = 5.0
    c = soft_centroid(cam, (36, 36), temperature=10.0)
    # align_corners=True: feature cell (i, j) sits at input pixel (i, j) * 35 / 7 = 5 * (i, j).
    torch.testing.assert_close(c, torch.tensor([[10.0, 25.0], [30.0, 5.0]]), atol=0.5, rtol=0)
    points = torch.tensor([[[10.0, 25.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, False], [False, False]])
    loss, n = location_loss(cam, points, mask, torch.tensor([1.0, 1.0]), (36, 36), "l2")
    assert n == 1 and float(loss) < 0.5
    loss, n = location_loss(cam, points, mask, torch.tensor([0.0, 1.0]), (36, 36), "l2")
    assert n == 0 and float(loss) == 0.0
    lb, _ = location_loss(cam, points, mask, torch.tensor([1.0, 0.0]), (36, 36), "lb", margin=40, tlb=50)
    assert float(lb) == pytest.approx(-math.log(40) / 50, rel=0.01)


def test_trim_positives_drops_the_highest_loss_positives_only():
    loss = torch.tensor([0.1, 5.0, 0.2, 3.0, 9.0, 0.3, 4.0, 0.5])
    labels = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    # 7 positives: floor(0.25 * 7) = 1 dropped (the 5.0); the negative with the highest loss stays.
    assert trim_positives_mask(loss, labels, 0.25).tolist() == [1, 0, 1, 1, 1, 1, 1, 1]
    assert trim_positives_mask(loss, labels, 0.5).tolist() == [1, 0, 1, 0, 1, 1, 0, 1]
    assert trim_positives_mask(loss, labels, 0.0).tolist() == [1] * 8
    assert trim_positives_mask(loss, torch.zeros(8), 0.5).tolist() == [1] * 8


def test_trim_positives_starts_after_the_first_epoch(store, tmp_path):
    train(store, tmp_path / "plain", params(epochs=2, batch_size=8))
    train(store, tmp_path / "trim", params(epochs=2, batch_size=8, trim_positives=0.5))
    plain, trimmed = rows(tmp_path / "plain"), rows(tmp_path / "trim")
    assert_same_rows(plain[:1], trimmed[:1])  # epoch 1 is plain training in both
    assert plain[1]["loss_ce"] != pytest.approx(trimmed[1]["loss_ce"], rel=1e-4)
    with pytest.raises(UsageError, match="trim_positives"):
        params(trim_positives=1.0).validate()


def test_gce_weighs_each_bce_gradient_by_the_label_probability():
    logits = torch.tensor([-3.0, -0.5, 0.0, 2.0, 4.0, -1.0], requires_grad=True)
    labels = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])
    bce = image_loss_each(logits, labels, "bce", 0.7)
    torch.testing.assert_close(bce, torch.nn.functional.binary_cross_entropy_with_logits(logits, labels,
                                                                                        reduction="none"))
    p_label = torch.sigmoid(torch.where(labels > 0.5, logits, -logits)).detach()
    # q -> 0 is BCE, q = 1 is the absolute error 1 - p.
    torch.testing.assert_close(image_loss_each(logits, labels, "gce", 1e-6), bce, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(image_loss_each(logits, labels, "gce", 1.0), 1 - p_label)
    (g_bce,) = torch.autograd.grad(bce.sum(), logits)
    (g_gce,) = torch.autograd.grad(image_loss_each(logits, labels, "gce", 0.7).sum(), logits)
    torch.testing.assert_close(g_gce, g_bce * p_label ** 0.7)


def test_group_norm_fit_saves_and_reloads_a_group_norm_model(store, tmp_path):
    torch.manual_seed(0)
    net = CamNet(n_blocks=2, norm="group")
    run = RunDir(tmp_path / "gn").create()
    fit(net, store, only_one_mitosis(store), store.indices("val"),
        params(norm="group", weights="none", image_loss="gce"), run, device=CPU, handle_sigint=False)
    loaded, info = load_run_model(run, "best")
    assert info["model_config"]["norm"] == "group"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.modules())
    saved = torch.load(run.checkpoint_path("best"), weights_only=True)["model"]
    torch.testing.assert_close(loaded.state_dict()["backbone.bn1.weight"], saved["backbone.bn1.weight"])


def test_extended_log_barrier():
    t = 5.0
    z = torch.tensor([-2.0, -1 / t**2, 0.0, 1.0])
    v = extended_log_barrier(z, t)
    assert float(v[0]) == pytest.approx(-math.log(2.0) / t)
    eps = 1e-6
    left = extended_log_barrier(torch.tensor([-1 / t**2 - eps], dtype=torch.float64), t)
    right = extended_log_barrier(torch.tensor([-1 / t**2 + eps], dtype=torch.float64), t)
    assert float(left) == pytest.approx(float(right), abs=1e-4)   # continuous at the switch
    assert float(v[3] - v[2]) == pytest.approx(t)                  # linear with slope t beyond it


def test_predict_cams_and_bn_adaptation(store):
    net = model()
    idx = store.indices("val")
    batches = list(predict_patches(net, store, idx, CPU, batch_size=3, want_cam=True))
    assert np.concatenate([b.indices for b in batches]).tolist() == idx.tolist()
    cams = batches[0].cams
    assert cams.dtype == np.float16 and cams.shape == (3, 64, 64) and 0 <= cams.min() and cams.max() <= 1
    # Image probability of max pooling = the CAM's maximum at feature resolution.
    assert batches[0].probs.max() <= float(cams.max()) + 1e-2
    before = {k: v.clone() for k, v in net.state_dict().items()}
    adapted = predict_scores(net, store, idx, CPU, batch_size=4, bn_adapt=True)
    plain = predict_scores(net, store, idx, CPU, batch_size=4)
    assert not np.allclose(adapted, plain)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    with bn_adaptation(net):
        assert net.backbone.bn1.training and not net.backbone.bn1.track_running_stats
    assert net.backbone.bn1.track_running_stats


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.resolve_device("auto") == CPU
    assert devices.resolve_device("CPU") == CPU
    with pytest.raises(ResourceError) as err:
        devices.resolve_device("cuda")
    assert err.value.exit_code == 4 and "is_available() is False" in err.value.message
    assert "--device cpu" in err.value.hint
    with pytest.raises(UsageError):
        devices.resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ResourceError) as err:
        devices.resolve_device("cuda:3")
    assert "CUDA_VISIBLE_DEVICES" in err.value.hint


def test_amp_policy_and_threads(monkeypatch):
    assert not devices.resolve_amp("auto", CPU).enabled
    assert devices.resolve_amp("bf16", CPU).dtype == torch.bfloat16
    with pytest.raises(UsageError):
        devices.resolve_amp("fp16", CPU)
    with pytest.raises(UsageError):
        devices.resolve_amp("fp8", CPU)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    torch.set_num_threads(1)
    assert devices.configure_cpu_threads() == 1          # an explicit lower setting is kept
    assert devices.configure_cpu_threads(2) == 2


SIGINT_SCRIPT = r"""
import multiprocessing, os, signal, sys
sys.path.insert(0, sys.argv[2])
import torch
from conftest import write_tiny_store
from uts_cli.errors import Interrupted
from uts_cli.io.rundir import RunDir
from uts_cli.io.store import PatchStore
from uts_cli.model.cam import CamNet
from uts_cli.config import TeachConfig
from uts_cli.model.fit import fit
from uts_cli.data import only_one_mitosis
from pathlib import Path
torch.set_num_threads(1)
tmp, mode = Path(sys.argv[1]), sys.argv[3]
st = PatchStore(write_tiny_store(tmp / "s.h5"))

def ctrl_c(info):
    if info.epoch == 1 and info.step == 1:
        if mode == "group":   # what a terminal does: the main process and its workers
            os.killpg(os.getpgid(0), signal.SIGINT)
        else:                 # the workers alone: training must go on
            for child in multiprocessing.active_children():
                os.kill(child.pid, signal.SIGINT)

try:
    fit(CamNet(n_blocks=1), st, only_one_mitosis(st), st.indices("val"),
        TeachConfig(store=Path('unused.h5'), name='t', epochs=2, batch_size=4, workers=1, steps_per_epoch=4), RunDir(tmp / mode).create(),
        device=torch.device("cpu"), on_step=ctrl_c)
except Interrupted as exc:
    print("INTERRUPTED", exc.message)
    sys.exit(130)
print("COMPLETE")
"""


@pytest.mark.slow
def test_real_sigint_with_workers(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    tests_dir = str(Path(__file__).resolve().parents[1])

    def run(mode):
        return subprocess.run([sys.executable, "-c", SIGINT_SCRIPT, str(tmp_path), tests_dir, mode],
                              capture_output=True, text=True, timeout=120, start_new_session=True)

    # Ctrl-C in a terminal: the current step finishes, last.pt is saved, exit code 130.
    proc = run("group")
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "INTERRUPTED" in proc.stdout
    ck = torch.load(RunDir(tmp_path / "group").checkpoint_path("last"), weights_only=True)
    assert ck["epoch"] == 0 and ck["step_in_epoch"] == 1
    # Workers ignore SIGINT (the main process decides), so a signal that reaches only them
    # does not kill the data pipeline.
    proc = run("workers")
    assert proc.returncode == 0 and "COMPLETE" in proc.stdout, proc.stderr[-2000:]
