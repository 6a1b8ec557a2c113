"""Output ensembles: logits equal to the hand-combined logits of the experts' own classifiers, and
one CLI run each on the tiny HF pool."""

from __future__ import annotations

import pytest
import torch

from fusion_bench.method.base import Context, build_classifiers
from fusion_bench.method.ensemble import EnsembleClassifier
from fusion_bench.method.max_model_predictor import MaxModelPredictor, max_logits
from fusion_bench.method.simple_ensemble import SimpleEnsemble
from fusion_bench.method.weighted_ensemble import WeightedEnsemble, weighted_logits
from fusion_bench.modelpool.base import ZeroShotClassifier
from tests.conftest import TASKS
from tests.test_cli import run_cli


def test_combination_rules_by_hand():
    logits = torch.tensor([[[1.0, 4.0, 0.0]], [[3.0, 0.0, 2.0]]])  # (N=2, B=1, C=3)
    torch.testing.assert_close(max_logits(logits), torch.tensor([[3.0, 4.0, 2.0]]))
    torch.testing.assert_close(weighted_logits(logits, [1.0, 3.0]), torch.tensor([[2.5, 1.0, 1.5]]))
    torch.testing.assert_close(
        weighted_logits(logits, [1.0, 3.0], normalize=False), torch.tensor([[10.0, 4.0, 6.0]])
    )


def test_ensembles_match_hand_computed_logits(hf_pool):
    torch.manual_seed(0)
    images, head = torch.randn(4, 3, 16, 16), torch.randn(16, 5)
    experts = [hf_pool.classifier(hf_pool.build_encoder(hf_pool.expert(t))) for t in TASKS]
    with torch.no_grad():
        l1, l2 = (c.logits(images, head) for c in experts)  # (B, C) each
        cases = [
            (SimpleEnsemble(), (l1 + l2) / 2),
            (WeightedEnsemble([1.0, 3.0]), 0.25 * l1 + 0.75 * l2),
            (WeightedEnsemble([1.0, 3.0], normalize=False), l1 + 3 * l2),
            (WeightedEnsemble(), (l1 + l2) / 2),
            (MaxModelPredictor(), torch.maximum(l1, l2)),
        ]
        for method, expected in cases:
            ensemble, state = build_classifiers(method, hf_pool, None, Context(), "ensemble")
            assert state is None  # not a merge: no state dict
            assert isinstance(ensemble, EnsembleClassifier) and isinstance(
                ensemble, ZeroShotClassifier
            )
            ensemble.encoder.to("cpu")  # what the evaluator does: moves every member
            torch.testing.assert_close(ensemble.logits(images, head), expected)
    # the max-model predictor predicts what the expert with the highest top logit predicts
    confident = torch.where((l1.max(-1).values > l2.max(-1).values), l1.argmax(-1), l2.argmax(-1))
    assert torch.equal(torch.maximum(l1, l2).argmax(-1), confident)


def test_weighted_ensemble_needs_one_weight_per_expert(hf_pool):
    from fusion_bench.errors import FusionBenchError

    with pytest.raises(FusionBenchError, match="one weight per expert"):
        WeightedEnsemble([1.0, 2.0, 3.0]).combiner(hf_pool.expert_names)


@pytest.mark.parametrize("method", ["simple_ensemble", "weighted_ensemble", "max_model_predictor"])
def test_cli_runs(method, hf_cli_args, tmp_path, capsys):
    code, out, err = run_cli(
        [
            *hf_cli_args,
            f"method={method}",
            "logger=none",
            f"hydra.run.dir={tmp_path}",
        ],
        capsys,
    )
    assert code == 0, err
    assert f"== {method} ==" in out and "average" in out
