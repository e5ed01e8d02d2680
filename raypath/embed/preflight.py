"""Checks ``raypath embed`` makes on the driver before Ray starts anything.

A bad ``--weights`` file found only inside an actor costs a cluster start, a
model build per actor, hundreds of lines of actor traceback and an empty
feature folder; a resource request the cluster can never satisfy makes Ray
wait forever.  Both are checked here first, each failing with one message
that names the input and the remedy (exit 2).
"""

from __future__ import annotations

from pathlib import Path

from raypath.errors import RaypathError


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors in a checkpoint, without reading their data when possible."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as h:
                return {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}
        except Exception as e:  # SafetensorError / OSError: not what the name says
            raise RaypathError(
                f"--weights {str(path)!r} is not a readable .safetensors file ({type(e).__name__}: "
                f"{str(e)[:160]}); download it again or pass the right file"
            ) from None
    import torch

    try:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # truncated zip, random bytes, pickled objects beyond tensors
        raise RaypathError(
            f"--weights {str(path)!r} cannot be loaded as a checkpoint ({type(e).__name__}: {str(e)[:160]}); "
            "download it again, or convert it to .safetensors / a plain state_dict"
        ) from None
    from raypath.fm.backbone import unwrap_checkpoint

    obj = unwrap_checkpoint(obj)
    if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
        raise RaypathError(f"--weights {str(path)!r} holds a {type(obj).__name__}, not a state_dict of tensors; "
                           "pass the model's checkpoint (a state_dict or .safetensors)")
    return {k: tuple(v.shape) for k, v in obj.items()}


def check_weights(model: str, weights: str | None) -> None:
    """Open the weight files of ``model`` on the driver and compare them with the architecture.

    Readability is checked for every family; names and shapes for timm models
    (Hugging Face models rename keys while loading, so their fit is checked
    when the actors load them).

    Raises
    ------
    RaypathError
        Missing, gated, unreadable or mismatching weights, with the remedy.
    """
    from raypath.fm.backbone import _normalise_keys, _parse_random, build_model, resolve_model, resolve_weights
    from raypath.fm.families import IGNORED_PREFIXES, weights_mismatch

    spec = resolve_model(model)
    if _parse_random(weights) is not None or (weights is None and spec.test_only):
        return
    files = resolve_weights(spec, weights)
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        shapes.update(_tensor_shapes(Path(f)))
    if spec.family != "timm":
        return
    own = {k: tuple(v.shape) for k, v in build_model(spec, device="meta").state_dict().items()}
    state = {k: v for k, v in _normalise_keys(shapes, set(own)).items() if not k.startswith(IGNORED_PREFIXES)}
    missing = sorted(k for k in set(own) - set(state) if not k.startswith(IGNORED_PREFIXES))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise weights_mismatch(spec, files, missing, unexpected)
    wrong = [f"{k} {state[k]} vs {own[k]}" for k in sorted(own) if k in state and state[k] != own[k]]
    if wrong:
        raise RaypathError(f"--weights {', '.join(map(str, files))} do not fit model {spec.key!r}: tensor shapes "
                           f"differ ({'; '.join(wrong[:3])}); pick the matching --model or the right checkpoint")


def check_resources(n_actors: int, cpus: float, gpus: float) -> None:
    """The actor pool (and one CPU for reading tiles) must fit the cluster: see
    :func:`raypath.io.ray_env.check_actor_resources`."""
    from raypath.io.ray_env import check_actor_resources

    check_actor_resources(n_actors, cpus, gpus, reserve_cpus=1.0)
