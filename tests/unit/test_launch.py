"""--devices planning and the environment of each spawned rank (no process is started here)."""
import pytest

from uts_cli.errors import ResourceError, UsageError, UtsError
from uts_cli.launch import DevicePlan, _pick_error, plan_devices, rank_env


def test_cpu_plan_and_its_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    plan = plan_devices(["cpu", " CPU ", "cpu"])
    assert plan.world_size == 3 and plan.rank_device_spec == "cpu"
    env = rank_env(plan, 2, 29555, environ={})
    assert env["RANK"] == env["LOCAL_RANK"] == "2" and env["WORLD_SIZE"] == "3"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "29555"
    assert int(env["OMP_NUM_THREADS"]) >= 1 and "CUDA_VISIBLE_DEVICES" not in env
    assert "OMP_NUM_THREADS" not in rank_env(plan, 0, 1, environ={"OMP_NUM_THREADS": "4"})  # the user's wins


def test_gpu_plan_maps_numbers_through_the_visible_devices(monkeypatch):
    import torch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    plan = plan_devices(["2", "cuda:0"])
    assert plan == DevicePlan("cuda", gpus=(2, 0)) and plan.rank_device_spec == "cuda"
    # Each rank sees the listed GPUs in rank order, so LOCAL_RANK numbers its own.
    assert rank_env(plan, 1, 1, environ={})["CUDA_VISIBLE_DEVICES"] == "2,0"
    assert rank_env(plan, 0, 1, environ={"CUDA_VISIBLE_DEVICES": "4,5,6,7"})["CUDA_VISIBLE_DEVICES"] == "6,4"
    assert plan_devices(["1"]).single_device() == "cuda:1"
    for bad, text in ((["0", "0"], "twice"), (["4"], "only 4 GPU"), (["0", "x"], "not a device")):
        with pytest.raises(UsageError, match=text):
            plan_devices(bad)
    with pytest.raises(UsageError, match="contradicts"):
        plan_devices(["0", "1"], "cpu")


def test_refused_under_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="torchrun"):
        plan_devices(["cpu", "cpu"])


def test_the_error_shown_is_the_cause_not_a_lost_partner():
    from uts_cli.distributed import PeerLost

    errors = {0: (PeerLost, "rank 0 of 2 lost its partners", None, False),
              1: (ResourceError, "out of memory", "lower --batch-size", False)}
    assert _pick_error(errors)[0] == 1
    errors[0] = (UtsError, "copied", None, True)  # a mirrored error repeats rank 0's
    errors[2] = (UsageError, "bad", None, False)
    assert _pick_error(errors)[0] == 1  # the lowest rank among the first-hand errors
