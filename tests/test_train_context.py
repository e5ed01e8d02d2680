"""The one training context (raypath.train): in process, on 2 Ray Train workers
(DDP) and in a Ray Tune trial, each killed after step 2 and resumed from its
checkpoint; the device/precision resolver's decisions; the GradScaler path.

One tiny loop (a linear model on seeded batches, full-batch MSE) runs in
every context.  With 2 DDP workers each rank takes half of every batch and
DDP averages the gradients, so the weights must equal the in-process run's:
that only holds when the model really is DDP-wrapped.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from raypath.errors import RaypathError
from raypath.train import (
    LocalContext,
    Precision,
    RayTrainContext,
    SimulatedKill,
    TuneContext,
    current_context,
    load_module_state,
    load_state,
    module_state,
    resolve_device,
    resolve_precision,
)

STEPS = 4
KILL_AT = 2


def _ship_this_module() -> None:
    """Ray workers cannot import a test module: send its functions by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def tiny_train(ctx, steps: int = STEPS) -> dict:
    """A training loop written once for every context."""
    torch.manual_seed(0)
    model = ctx.prepare(torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = ctx.restore()
    start = 0 if state is None else int(state["step"])
    if state is not None:
        load_module_state(model, state["model"])
        opt.load_state_dict(state["optimizer"])
    for step in range(start, steps):
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.randn(8, 4, generator=g)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1
        x, y = x[ctx.rank :: ctx.world_size], y[ctx.rank :: ctx.world_size]  # this rank's half
        with ctx.autocast():
            loss = F.mse_loss(model(x.to(ctx.device)), y.to(ctx.device))
        opt.zero_grad()
        ctx.backward(loss)
        ctx.step(opt)
        ctx.report(
            {"loss": float(loss.detach()), "step": step + 1, "first_step": start + 1},
            checkpoint={"model": module_state(model), "optimizer": opt.state_dict(), "step": step + 1, **ctx.amp_state()},
            step=step + 1,
        )
    return {
        "weights": module_state(model),
        "steps": [r["step"] for r in ctx.reports],
        "world_size": ctx.world_size,
        "ddp": isinstance(model, torch.nn.parallel.DistributedDataParallel),
        "kind": ctx.kind,
    }


@pytest.fixture(scope="module")
def reference() -> dict:
    return tiny_train(LocalContext(device="cpu"))


def _assert_weights(got: dict, want: dict, atol: float = 0.0) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol)


# --------------------------------------------------------------------------- in process


def test_local_kill_and_resume(tmp_path, reference):
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(SimulatedKill):
        tiny_train(LocalContext(ckpt, kill_at_step=KILL_AT, device="cpu"))
    # the checkpoint of the killed step exists, complete; only the newest `keep` are kept
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch_0001", "epoch_0002"]
    assert (tmp_path / "ckpt" / "epoch_0002" / "COMPLETE").read_text() == "2"
    ctx = LocalContext(ckpt, device="cpu", keep=1)
    out = tiny_train(ctx)
    assert ctx.restored_from.endswith("epoch_0002")
    assert out["steps"] == [3, 4]  # continued, not restarted
    _assert_weights(out["weights"], reference["weights"])  # same process, same ops: bit-identical
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch_0004"]
    # a half-written checkpoint (no COMPLETE marker) is never resumed from
    (tmp_path / "ckpt" / "epoch_0009").mkdir()
    (tmp_path / "ckpt" / "epoch_0004.tmp-123").mkdir()  # a copy cut short by a crash
    (tmp_path / "ckpt" / "epoch_0004.tmp-123" / "COMPLETE").write_text("4")
    assert LocalContext(ckpt).latest_checkpoint().endswith("epoch_0004")


def test_local_checkpoints_on_s3(s3_server, reference):
    s3_server.create_bucket("train-ctx")
    ckpt = "s3://train-ctx/run/checkpoints"
    with pytest.raises(SimulatedKill):
        tiny_train(LocalContext(ckpt, kill_at_step=KILL_AT, device="cpu"))
    ctx = LocalContext(ckpt, device="cpu")
    out = tiny_train(ctx)
    assert out["steps"] == [3, 4] and ctx.restored_from == f"{ckpt}/epoch_0002"
    _assert_weights(out["weights"], reference["weights"])


def test_current_context_outside_ray_is_local():
    ctx = current_context(device="cpu", amp="bf16")
    assert isinstance(ctx, LocalContext) and ctx.device.type == "cpu"
    assert ctx.precision.name == "fp32"  # the CPU trains in fp32 whatever --amp says
    assert ctx.restore() is None


# --------------------------------------------------------------------------- precision


def test_precision_decisions():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    for amp in ("auto", "bf16", "fp16", "off"):
        p = resolve_precision(cpu, amp)
        assert (p.name, p.dtype, p.uses_grad_scaler) == ("fp32", None, False)
    assert resolve_precision(gpu, "auto", bf16_supported=True).dtype is torch.bfloat16
    p = resolve_precision(gpu, "auto", bf16_supported=False)
    assert (p.name, p.dtype, p.uses_grad_scaler) == ("fp16", torch.float16, True)
    assert resolve_precision(gpu, "fp16", bf16_supported=True).uses_grad_scaler
    assert resolve_precision(gpu, "bf16", bf16_supported=True).uses_grad_scaler is False
    assert resolve_precision(gpu, "off", bf16_supported=True).dtype is None
    with pytest.raises(RaypathError, match="--amp fp16"):
        resolve_precision(gpu, "bf16", bf16_supported=False)
    with pytest.raises(RaypathError, match="not one of"):
        resolve_precision(cpu, "fp8")
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RaypathError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(RaypathError, match="not a torch device"):
        resolve_device("tpu-ish")


def test_grad_scaler_unscales_before_clipping():
    """Under fp16 the loss is scaled for backward and unscaled before the
    caller's before_step (gradient clipping sees true norms); its state is checkpointed."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def grad_norm_seen(ctx) -> tuple[float, torch.Tensor]:
        torch.manual_seed(1)
        model = ctx.prepare(torch.nn.Linear(4, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ctx.backward(F.mse_loss(model(x), y))
        seen = ctx.step(opt, before_step=lambda: float(model.weight.grad.norm()))
        return seen, model.weight.detach().clone()

    plain = LocalContext(device="cpu", amp="off")
    scaled = LocalContext(device="cpu")
    scaled._precision = Precision(torch.device("cpu"), "fp16", None)  # fp32 forward, fp16's scaler path
    scaled._scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    n_plain, w_plain = grad_norm_seen(plain)
    n_scaled, w_scaled = grad_norm_seen(scaled)
    assert n_scaled == pytest.approx(n_plain, rel=1e-6)
    torch.testing.assert_close(w_scaled, w_plain)
    assert scaled.amp_state()["grad_scaler"]["scale"] == 1024.0 and plain.amp_state() == {}


# --------------------------------------------------------------------------- Ray Train and Tune


def _ray_train_fn(config: dict) -> dict:
    ctx = current_context(kill_at_step=config["kill_at_step"])
    assert isinstance(ctx, RayTrainContext)
    out = tiny_train(ctx)
    out["weights"] = {k: v.numpy() for k, v in out["weights"].items()}  # Ray returns no tensors
    return out


def test_ray_train_two_workers_kill_and_resume(ray_session, tmp_path, reference):
    """2 DDP workers (gloo); rank 0 and 1 both die after the step-2 checkpoint;
    Ray Train restarts the group, which resumes at step 3 from that checkpoint."""
    from raypath.train.launch import fit_on_ray_train

    _ship_this_module()
    result = fit_on_ray_train(
        _ray_train_fn, {"kill_at_step": KILL_AT}, num_workers=2, storage_path=str(tmp_path / "ray"),
        name="ctx", use_gpu=False, max_failures=1,
    )
    out = result.return_value
    assert out["world_size"] == 2 and out["ddp"] and out["kind"] == "Ray Train"
    assert out["steps"] == [3, 4]  # the restarted workers continued from the checkpoint
    assert result.metrics["first_step"] == KILL_AT + 1
    weights = {k: torch.tensor(v) for k, v in out["weights"].items()}
    _assert_weights(weights, reference["weights"], atol=1e-6)  # DDP-averaged = full batch
    with result.checkpoint.as_directory() as d:
        assert load_state(d)["step"] == STEPS


def _tune_trial(config: dict) -> None:
    ctx = current_context(kill_at_step=config["kill_at_step"])
    assert isinstance(ctx, TuneContext)
    tiny_train(ctx)


def test_tune_trial_kill_and_resume(ray_session, tmp_path, reference):
    """A Tune trial dies after its step-2 checkpoint; Tune restarts it and it resumes there."""
    from ray import tune

    _ship_this_module()
    tuner = tune.Tuner(
        tune.with_resources(_tune_trial, {"cpu": 1}),
        param_space={"kill_at_step": KILL_AT},
        run_config=tune.RunConfig(
            storage_path=str(tmp_path / "tune"), name="ctx", failure_config=tune.FailureConfig(max_failures=1),
            verbose=0,
        ),
    )
    result = tuner.fit()[0]
    assert result.error is None
    assert result.metrics["step"] == STEPS and result.metrics["first_step"] == KILL_AT + 1
    with result.checkpoint.as_directory() as d:
        state = load_state(d)
    _assert_weights(state["model"], reference["weights"])
