"""RegMean++ (Nguyen et al., "RegMean++: Enhancing Effectiveness and Generalization of
Regression Mean for Model Merging", arXiv:2508.03121, 2025).

RegMean solves each linear layer from Grams of the inputs each expert sees in its *own* forward
pass, ignoring that in the merged model every layer receives the outputs of the merged layers
below it. RegMean++ merges the transformer blocks bottom-up and feeds each expert's block l with
the output of the already merged blocks 0..l−1 on that expert's task data:

    X_i^(0) = merged stem(task i images);  G_i^(l) = Grams inside expert i's block l on X_i^(l)
    block l = RegMean(G_1^(l) … G_N^(l));  X_i^(l+1) = merged block l (X_i^(l))

Within a block the Grams come from the expert's own block (its attention feeds its MLP), as in
FusionBench. Parameters outside the blocks (patch/position embeddings, pre/post LayerNorms,
open_clip's ``proj``) are the simple average.

Run: ``fusion_bench method=regmean_plusplus`` (``RegMean`` with ``blockwise: true``)
Memory: the merged state dict and encoder (~2 P), one block's Grams, and every task's hidden states
at the current depth (N × num_regmean_examples × tokens × width floats, on the CPU).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from fusion_bench.errors import FusionBenchError
from fusion_bench.method.base import pool_experts
from fusion_bench.method.regmean import GramRecorder, RegMean
from fusion_bench.method.simple_average import SimpleAverage
from fusion_bench.taskpool.data import TaskData
from fusion_bench.tensor_ops import StateDict

BLOCK_LISTS = ("encoder.layers", "transformer.resblocks")  # HF CLIP, open_clip


class Prefixed(Mapping):
    """The entries of a state dict whose keys start with ``prefix`` (keys unchanged, lazy)."""

    def __init__(self, state: StateDict, prefix: str):
        self.state, self.prefix = state, prefix
        self.keys_ = [k for k in state if k.startswith(prefix)]

    def __getitem__(self, key: str) -> Tensor:
        if not key.startswith(self.prefix):
            raise KeyError(key)
        return self.state[key]

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and key.startswith(self.prefix) and key in self.state

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)


def transformer_blocks(encoder: nn.Module) -> tuple[str, nn.ModuleList]:
    for name in BLOCK_LISTS:
        try:
            blocks = encoder.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return name, blocks
    raise FusionBenchError(
        f"RegMean++ supports image towers with transformer blocks under {list(BLOCK_LISTS)}; "
        f"{type(encoder).__name__} has none."
    )


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the first block's input is captured."""


def first_block_inputs(classifier, block: nn.Module, batches, device) -> list[tuple]:
    """(hidden states on CPU, other positional args, kwargs) of each call to ``block``."""
    captured = []

    def hook(_m, args, kwargs):
        captured.append((args[0].detach().cpu(), args[1:], kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for images in batches:
            try:
                classifier.features(classifier.encoder, images.to(device))
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def block_forward(block: nn.Module, call: tuple, device) -> Tensor:
    hidden, args, kwargs = call
    out = block(hidden.to(device), *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def merge_blockwise(method: RegMean, pool, data: TaskData, device) -> dict[str, Tensor]:
    """RegMean++: the blocks merged bottom-up, each expert's block fed the merged blocks' outputs
    (``method``: RegMean's settings, whose closed-form solve is applied to each block)."""
    from tqdm.auto import tqdm

    pretrained, experts = pool.pretrained(), pool_experts(pool)
    # stem and head: the simple average
    merged_state = SimpleAverage(exclude_keys=method.exclude_keys).merge(pretrained, experts)
    encoder = pool.build_encoder(merged_state).to(device).eval()
    classifier = pool.classifier(encoder)
    where, blocks = transformer_blocks(encoder)

    def task_images(name: str):
        return data.images(
            name,
            "train",
            classifier.preprocess,
            method.num_regmean_examples,
            method.batch_size,
            method.seed,
        )

    with torch.no_grad():
        inputs = {
            n: first_block_inputs(classifier, blocks[0], task_images(n), device) for n in experts
        }
        for index in tqdm(range(len(blocks)), desc="regmean_plusplus", unit="block", leave=False):
            prefix = f"{where}.{index}."

            def block_grams(
                prefix=prefix, index=index, inputs=inputs
            ) -> Iterator[dict[str, Tensor]]:
                for name, expert in experts.items():
                    block = copy.deepcopy(blocks[index])
                    block.load_state_dict({k: expert[prefix + k] for k in block.state_dict()})
                    with GramRecorder(block, prefix) as recorder:
                        for call in inputs[name]:
                            block_forward(block, call, device)
                    yield recorder.grams()

            merged_block = method.solve(
                Prefixed(pretrained, prefix),
                {n: Prefixed(e, prefix) for n, e in experts.items()},
                block_grams(),
            )
            merged_state.update(merged_block)
            blocks[index].load_state_dict(
                {k.removeprefix(prefix): v for k, v in merged_block.items()}
            )
            if index + 1 < len(blocks):  # the next block's inputs: this merged block's outputs
                inputs = {
                    n: [(block_forward(blocks[index], c, device).cpu(), c[1], c[2]) for c in calls]
                    for n, calls in inputs.items()
                }
    return merged_state
