"""CUDA-graph capture of the fused layers: one graph replay per forward and one per backward instead of ~40
kernel launches and the Python between them each way (on an H200 the encoder layer's wall time was 1.5-4x its
GPU time: bench/NOTES_layers.md).

The layers are capturable because their CUDA path makes no host sync in forward or backward: dropout seeds are
drawn on the device (``lsquant.ops.new_seeds``) and read by the kernels from device memory, so each replay draws
new seeds and applies new masks; the quantizers keep their "calibrated" flag on the host. :func:`graphed` is
``torch.cuda.make_graphed_callables`` plus the input checks it lacks.
"""
from __future__ import annotations

import torch
from torch import nn


def _copy_grad(g):
    # None: the graph's backward had no gradient for this parameter (an unused one)
    return None if g is None else g.clone()


def graphed(module: nn.Module, sample_args, *, num_warmup_iters: int = 3, pool=None,
            allow_unused_input: bool = True) -> nn.Module:
    """Capture ``module``'s forward and backward in CUDA graphs, in place, and return it.

    Args:
        module: an lsquant layer or any module built from them (an encoder stack, a model with its loss) whose
            forward takes tensors only and makes no host sync; on CUDA, in the train/eval state and quantization
            mode (``enable_quant``, ``qat_mode``: calibrate first) that the graphs are to run.
        sample_args: a tensor or a tuple of CUDA tensors in forward's positional order, with the shapes, dtypes
            and ``requires_grad`` of every later call; arguments left out keep their defaults (a padding mask
            captured here must be passed at every call, one left out is None at every call).
        num_warmup_iters, pool, allow_unused_input: as in ``torch.cuda.make_graphed_callables``;
            allow_unused_input is True here because the quantizers' clips are parameters that the float forward
            (quantization disabled) does not use.

    Afterwards ``module(*args)`` copies ``args`` into the captured inputs and replays the forward graph, and the
    backward of its output replays the backward graph (gradients are accumulated into ``.grad`` as usual), while
    ``module.training`` is what it was at capture; in the other state the module runs eagerly. Arguments of
    another shape or dtype raise ValueError (the graph has fixed shapes: pad batches to one shape, or capture one
    copy of the module per shape and share memory with ``pool``). Rules of CUDA graphs: outputs live in the
    graph's memory and are overwritten by the next replay (clone what you keep); parameters must stay the same
    tensors (in-place optimizer steps and ``load_state_dict`` are fine, ``.to()`` is not); a change of
    quantization mode after capture is not seen by the graph (capture again).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"graphed takes an nn.Module, got {type(module).__name__}")
    name = type(module).__name__
    args = sample_args if isinstance(sample_args, tuple) else (sample_args,)
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor) or not a.is_cuda:
            raise TypeError(f"graphed({name}): sample argument {i} must be a CUDA tensor, got "
                            f"{a.device if isinstance(a, torch.Tensor) else type(a).__name__} (leave optional "
                            "arguments out instead of passing None)")
    off = [n for n, p in module.named_parameters() if not p.is_cuda]
    if off:
        raise ValueError(f"graphed({name}): parameters {off[:3]} are not on CUDA: move the module first "
                         "(module.cuda())")
    expected = [(tuple(a.shape), a.dtype) for a in args]
    training = module.training
    torch.cuda.make_graphed_callables(module, args, num_warmup_iters=num_warmup_iters,
                                      allow_unused_input=allow_unused_input, pool=pool)
    replay = module.forward  # make_graphed_callables' forward: the graphs in the captured state, else eager
    # The backward graph hands out its static gradient buffers (detached views of graph memory). Autograd would
    # adopt such a buffer as a parameter's .grad when .grad is None; the next replay then writes the new gradient
    # into .grad itself, and accumulating it again doubles it under zero_grad(set_to_none=False). (That is how a
    # graphed model trained with SGD + momentum parted from the eager one after its second step on an H100:
    # tests/test_layers_cuda.py::test_graphed_model_trains_like_eager.) A hook on each parameter hands autograd
    # a copy instead: one copy of the gradients per step.
    for p in module.parameters():
        if p.requires_grad:
            p.register_hook(_copy_grad)

    def forward(*call_args, **kwargs):
        if module.training == training:  # the graphs run: check what the copy into their inputs would miss
            if kwargs or len(call_args) != len(expected):
                raise TypeError(f"{name} runs as a CUDA graph captured with {len(expected)} positional "
                                f"arguments; got {len(call_args)} positional and keywords {sorted(kwargs)}")
            for i, (a, (shape, dtype)) in enumerate(zip(call_args, expected)):
                if not isinstance(a, torch.Tensor) or tuple(a.shape) != shape or a.dtype != dtype or not a.is_cuda:
                    got = (f"{tuple(a.shape)} {a.dtype} on {a.device}" if isinstance(a, torch.Tensor)
                           else type(a).__name__)
                    raise ValueError(f"{name} runs as a CUDA graph captured for argument {i} of shape {shape} and "
                                     f"dtype {dtype} on CUDA; got {got}. Pad to the captured shape or capture "
                                     "another copy of the module for this one")
        return replay(*call_args, **kwargs)

    module.forward = forward
    return module
