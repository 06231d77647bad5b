"""Loads a configured model into a callable that takes and returns a batch of tensors.

Runs where torch runs: inside CPU worker processes and the in-process `microbatch infer`;
never on the server's event loop. Model files are trusted input: TorchScript files execute
code when loaded, and torch.export.load may unpickle a `.pt2` file's weights and constants (it
tries torch.load(weights_only=True), then falls back to weights_only=False), so a crafted file
of either kind can run code. Serve only files from a source you trust.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from server.config import ModelConfig
from server.models.builtin import build_builtin, builtin_input_spec
from server.models.padding import zero_batch
from server.models.spec import DYNAMIC, SUPPORTED_DTYPES, TensorSpec, is_dynamic

_TORCH_TO_WIRE = {getattr(torch, name): name for name in SUPPORTED_DTYPES}
_TORCH_TO_WIRE[torch.bfloat16] = "float32"  # widened: the wire has no bfloat16


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    name: str
    module: Any
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...] = ()

    def run(self, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Forward one batch; outputs keyed by name, each with the batch's leading dim."""
        n = tensors[0].shape[0]
        result = _name_outputs(self.module(*tensors))
        for name, out in result.items():
            if out.dim() == 0 or out.shape[0] != n:
                raise ValueError(
                    f"model returned output {name!r} of shape {list(out.shape)} for a batch of {n}"
                )
            if out.dtype == torch.bfloat16:
                result[name] = out.float()
        return result


def declared_output(
    result: dict[str, torch.Tensor], spec: TensorSpec, samples: int, length: int = 1
) -> torch.Tensor:
    """The tensor a batch's result holds for one declared output, checked against its spec:
    a model whose outputs change from batch to batch fails that batch, not the copy."""
    produced = result.get(spec.name)
    if produced is None:
        raise ValueError(f"output {spec.name!r} missing from this batch's result")
    # One row per sample: copied into rows [:samples], a [1, ...] output would broadcast its
    # one row to every request of the batch, and each would get an answer not its own.
    if produced.dim() == 0 or produced.shape[0] != samples:
        raise ValueError(
            f"output {spec.name!r} has shape {list(produced.shape)} for a batch of {samples} "
            "samples: a model must return one row per sample"
        )
    if tuple(produced.shape[1:]) != spec.at_length(length):
        raise ValueError(
            f"output {spec.name!r} has per-sample shape {list(produced.shape[1:])}, "
            f"expected {list(spec.at_length(length))}"
        )
    return produced


def load_model(cfg: ModelConfig) -> LoadedModel:
    try:
        if cfg.format == "builtin":
            builtin = cfg.path.removeprefix("builtin:")
            model = LoadedModel(cfg.name, build_builtin(builtin), builtin_input_spec(builtin))
        elif cfg.format == "export":
            model = _load_export(cfg)
        else:
            module = torch.jit.load(cfg.path, map_location="cpu")  # type: ignore[no-untyped-call]
            model = LoadedModel(cfg.name, module.eval(), cfg.inputs)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"model {cfg.name!r} failed to load from {cfg.path}: {exc}") from exc
    model.outputs = _probe_outputs(model, cfg.batching.max_length)
    return model


def _load_export(cfg: ModelConfig) -> LoadedModel:
    program = torch.export.load(cfg.path)
    user_inputs = set(program.graph_signature.user_inputs)
    declared_inputs = {spec.name: spec for spec in cfg.inputs}
    specs = []
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        val = node.meta["val"]
        dims = list(val.shape)
        if not dims:
            raise ModelLoadError(f"model {cfg.name!r}: input {node.name!r} has no batch dimension")
        if sum(not isinstance(d, int) for d in dims[1:]) > 1:
            raise ModelLoadError(
                f"model {cfg.name!r}: input {node.name!r} has several dynamic dimensions besides "
                f"the first ({dims}); one (a length) at most"
            )
        if isinstance(dims[0], int) and dims[0] != 1 and not cfg.inputs:
            raise ModelLoadError(
                f"model {cfg.name!r}: the batch dimension of {node.name!r} is fixed at {dims[0]}; "
                "export with torch.export.Dim for the first dimension"
            )
        dtype = _TORCH_TO_WIRE.get(val.dtype)
        if dtype is None:
            raise ModelLoadError(f"model {cfg.name!r}: input dtype {val.dtype} is not supported")
        shape = tuple(int(d) if isinstance(d, int) else DYNAMIC for d in dims[1:])
        declared = declared_inputs.get(node.name)  # the config may add a padding value or fill
        pad, fill = (declared.pad, declared.fill) if declared is not None else (0, "")
        specs.append(TensorSpec(node.name, dtype, shape, pad, fill))
    return LoadedModel(cfg.name, program.module(), tuple(specs))


def _probe_outputs(model: LoadedModel, max_length: int) -> tuple[TensorSpec, ...]:
    """Run one zero sample to learn the outputs' names, dtypes and per-sample shapes; for a
    model with a dynamic dimension, at two lengths: an output dimension that follows the
    length is dynamic too (-1), and trimmed back to each request's own length."""
    if not is_dynamic(model.inputs):
        return _output_specs(model, _probe(model, 1), None)
    short, long = min(2, max_length), min(3, max_length)
    return _output_specs(model, _probe(model, short), (long, _probe(model, long)))


def _probe(model: LoadedModel, length: int) -> dict[str, torch.Tensor]:
    tensors = [torch.from_numpy(a) for a in zero_batch(model.inputs, 1, length)]
    try:
        with torch.inference_mode():
            return model.run(tensors)
    except Exception as exc:
        raise ModelLoadError(f"model {model.name!r} failed on a zero input: {exc}") from exc


def _output_specs(
    model: LoadedModel,
    outputs: dict[str, torch.Tensor],
    other: tuple[int, dict[str, torch.Tensor]] | None,
) -> tuple[TensorSpec, ...]:
    specs = []
    for name, out in outputs.items():
        dtype = _TORCH_TO_WIRE.get(out.dtype)
        if dtype is None:
            raise ModelLoadError(f"model {model.name!r}: output dtype {out.dtype} is not supported")
        shape = tuple(out.shape[1:])
        if other is not None:
            length, longer = other
            shape = _dynamic_shape(model.name, name, shape, tuple(longer[name].shape[1:]), length)
        specs.append(TensorSpec(name, dtype, shape))
    return tuple(specs)


def _dynamic_shape(
    model: str, output: str, short: tuple[int, ...], long: tuple[int, ...], length: int
) -> tuple[int, ...]:
    """The output's per-sample shape, -1 where it grew from length - 1 to `length`."""
    changed = [i for i, (a, b) in enumerate(zip(short, long, strict=False)) if a != b]
    if len(short) != len(long) or len(changed) > 1 or (changed and long[changed[0]] != length):
        raise ModelLoadError(
            f"model {model!r}: output {output!r} has shape {list(short)} at length {length - 1} "
            f"and {list(long)} at length {length}; an output may keep its shape or follow the "
            "length in one dimension"
        )
    return tuple(DYNAMIC if i in changed else d for i, d in enumerate(short))


def _name_outputs(result: Any) -> dict[str, torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return {"output": result}
    if isinstance(result, dict):
        return {str(k): v for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        return {f"output_{i}": v for i, v in enumerate(result)}
    raise ValueError(f"model returned {type(result).__name__}; expected a tensor, tuple or dict")
